/*
 * Interface of pump.c, the data-plane thread; read by the C compiler (after <stdint.h>) and by
 * cffi's cdef, so it holds only plain declarations and integer defines (as walk.h does).
 * virtqueue/pump.py is the only user; its module doc is the contract.
 */

/* Bump on any change here (checked by virtqueue/pump.py, as VQ_API_VERSION is by _cwalk). */
#define PUMP_API_VERSION 1

#define PUMP_MAX_LANES 1024

/* A lane's direction. */
#define PUMP_G2H 0 /* guest tx ring -> socket */
#define PUMP_H2G 1 /* socket -> guest rx ring */

/* Why a lane stopped (pump_state.stop_kind); 0 while it runs. */
#define PUMP_RUNNING 0
#define PUMP_STOP_EOF 1       /* h2g: the peer closed its side */
#define PUMP_STOP_ERRNO 2     /* a socket, kick or call fd error: stop_errno */
#define PUMP_STOP_HUP 3       /* the socket reported EPOLLHUP / EPOLLERR without an errno */
#define PUMP_STOP_CHAIN 4     /* vq_walk failed: stop_code (VQ_E_*), index, value, n */
#define PUMP_STOP_MEMORY 5    /* a buffer (or, stop_indirect, the indirect table) outside */
#define PUMP_STOP_AVAIL 6     /* avail idx ahead by stop_value > size: the ring is broken */
#define PUMP_STOP_HEAD 7      /* avail entry stop_index holds head stop_value >= size: broken */
#define PUMP_STOP_WRITABLE 8  /* g2h: the chain has device-writable buffers */
#define PUMP_STOP_READONLY 9  /* h2g: the chain has no device-writable buffer */
#define PUMP_STOP_TOO_LONG 10 /* g2h: the chain holds stop_value > max_chain bytes */
#define PUMP_STOP_CALL_FULL 11 /* the call eventfd counter is full */

struct pump_region {
    uint64_t gpa;
    uint64_t size;
    uint8_t *host;
};

struct pump_lane_cfg {
    int dir;
    uint8_t *desc;  /* descriptor table, 16 * size bytes */
    uint8_t *avail; /* avail area: flags, idx, ring[size], used_event */
    uint8_t *used;  /* used area: flags, idx, ring[size], avail_event */
    uint32_t size;
    uint16_t next_avail;
    uint16_t next_used;
    uint16_t signalled; /* used idx at the last notification decision */
    int event_idx;
    int indirect;
    int kick_fd; /* all three are dup'ed: the caller keeps and may close its own */
    int call_fd;
    int sock_fd;
    const struct pump_region *regions; /* copied */
    uint32_t nregions;
    uint32_t offset;    /* g2h: bytes of the chain at next_avail already sent */
    uint32_t max_chain; /* g2h: longest chain accepted, 0 for any */
};

struct pump_state {
    /* Positions and the partial chain: meaningful once the lane is stopped or detached. */
    uint16_t next_avail;
    uint16_t next_used;
    uint16_t signalled;
    uint32_t offset; /* g2h: the chain at next_avail had this many bytes sent (0: none) */
    /* Counters, readable at any time. */
    uint64_t chains;
    uint64_t bytes;
    uint64_t wakeups; /* times the lane was run on an event */
    uint64_t calls;   /* call eventfd writes */
    uint64_t kicks;   /* kick eventfd reads that found a kick */
    /* Why it stopped (PUMP_RUNNING while it runs); fields as the kind says. */
    int stop_kind;
    int stop_code;
    int stop_errno;
    int stop_indirect;
    uint32_t stop_head;
    uint32_t stop_index;
    uint64_t stop_value;
    uint64_t stop_addr;
    uint64_t stop_len;
    uint32_t stop_n;
};

typedef struct pump pump_t;

/* A pump and its thread; NULL with errno set on failure. */
pump_t *pump_new(void);
/* Stop and join the thread, close every lane's fds and free everything. */
void pump_free(pump_t *p);
/* The eventfd that becomes readable when lanes stopped by themselves (see pump_stopped). */
int pump_notify_fd(pump_t *p);
/* Start lane `lane`; 0, or -errno (-EBUSY: in use, -EINVAL: bad lane or config). */
int pump_attach(pump_t *p, int lane, const struct pump_lane_cfg *cfg);
/* Stop lane `lane` and fill *out; when it returns the thread no longer touches the lane's
   ring, memory or fds. 0, or -EINVAL when the lane is not attached. */
int pump_detach(pump_t *p, int lane, struct pump_state *out);
/* Counters (and, once stopped, everything) of an attached lane; 0 or -EINVAL. */
int pump_peek(pump_t *p, int lane, struct pump_state *out);
/* Up to cap lanes that stopped by themselves since the last call; resets notify_fd. */
int pump_stopped(pump_t *p, int *lanes, int cap);
