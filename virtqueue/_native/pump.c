/*
 * The data-plane thread: moves bytes between split virtqueues in guest memory and stream
 * sockets, without Python. virtqueue/pump.py drives it and documents the contract.
 *
 * One thread, one epoll set. Each lane is one direction of one port: its kick eventfd is
 * always in the set, its socket only while the lane waits for it (EPOLLOUT: a g2h chain was
 * partly written; EPOLLIN: an h2g chain is held and the socket had nothing). Chains are walked
 * by vq_walk (walk.c), the one chain walker; buffers are translated through the lane's copy of
 * the region table with the bounds check of GuestMemory.view.
 *
 * Commands (attach, detach, quit) come through one slot guarded by a mutex: the caller fills
 * it, wakes the thread through an eventfd and waits on a condition variable. Only the thread
 * touches a lane between its attach and its detach; counters are read with atomic loads.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "walk.h"
#include "pump.h"

#define F_WRITE 2u
#define AVAIL_F_NO_INTERRUPT 1u
#define USED_F_NO_NOTIFY 1u
#define IO_CAP0 16u
#define BUDGET 256       /* chains per run before other lanes get their turn */
#define SCRATCH 65536    /* consume buffer for peeked bytes of non-inet sockets */
#define MAX_EVENTS 64
#define POLL_MAX_BYTES 2048   /* a run that moved more is bulk: no polling after it */
#define POLL_NS_DEFAULT 200000u
#define TAG_CMD UINT64_MAX
#define TAG_KICK 0u
#define TAG_SOCK 1u

enum { CMD_NONE, CMD_ATTACH, CMD_DETACH, CMD_QUIT };

struct lane {
    int id, dir;
    uint8_t *desc, *avail, *used;
    uint32_t size, mask;
    uint16_t next_avail, next_used, signalled;
    int event_idx, indirect;
    int kick, call, sock;
    int kick_blocking, sock_inet;
    uint32_t sock_events; /* current epoll interest in sock, 0: not in the set */
    struct pump_region *regions;
    uint32_t nregions, last_region;
    uint32_t max_chain;
    uint32_t skip; /* g2h: bytes of the next chain popped that were already sent */
    int queued;    /* in the ready list */
    int stopped;
    /* The chain held: its head, the iovecs still to move (from iov_first), bytes moved. */
    int have;
    uint16_t head;
    struct iovec *iov;
    uint32_t niov, iov_cap, iov_first;
    uint64_t chain_len, done;
    uint64_t *io[2];
    uint32_t io_cap[2];
    struct pump_state st;
};

struct pump {
    pthread_t thread;
    int epfd, cmdfd, notifyfd;
    pthread_mutex_t cmd_mu; /* one command at a time, and lanes[] stable for pump_peek */
    pthread_mutex_t mu;     /* the slot, the done flag and the stopped list */
    pthread_cond_t cv;
    int cmd, cmd_lane, cmd_result, cmd_done;
    struct lane *cmd_new;
    struct pump_state *cmd_out;
    struct lane *lanes[PUMP_MAX_LANES];
    int stopped[PUMP_MAX_LANES];
    int nstopped;
    int ready[PUMP_MAX_LANES];
    int nready;
    uint8_t *scratch;
    uint64_t poll_ns;    /* how long to poll after the last chain moved, 0: never */
    uint64_t poll_until; /* CLOCK_MONOTONIC ns */
};

/* Guest memory is shared with the driver: every ring access is one untorn load or store. */
static inline uint16_t ld16(const uint8_t *p) { return __atomic_load_n((const uint16_t *)p, __ATOMIC_RELAXED); }
static inline void st16(uint8_t *p, uint16_t v) { __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELAXED); }
static inline void st32(uint8_t *p, uint32_t v) { __atomic_store_n((uint32_t *)p, v, __ATOMIC_RELAXED); }
/* Counters: written by the thread only, read by anyone. */
static inline void bump(uint64_t *c, uint64_t n) { __atomic_store_n(c, *c + n, __ATOMIC_RELAXED); }
static inline uint64_t rd(const uint64_t *c) { return __atomic_load_n(c, __ATOMIC_RELAXED); }

/* ---------------------------------------------------------------- stopping */

static void stop(struct pump *p, struct lane *l, int kind)
{
    struct epoll_event unused;
    uint64_t one = 1;

    if (l->stopped)
        return;
    l->stopped = 1;
    epoll_ctl(p->epfd, EPOLL_CTL_DEL, l->kick, &unused);
    if (l->sock_events)
        epoll_ctl(p->epfd, EPOLL_CTL_DEL, l->sock, &unused);
    l->sock_events = 0;
    l->st.next_avail = l->next_avail;
    l->st.next_used = l->next_used;
    l->st.signalled = l->signalled;
    __atomic_store_n(&l->st.stop_kind, kind, __ATOMIC_RELEASE);
    pthread_mutex_lock(&p->mu);
    p->stopped[p->nstopped++] = l->id;
    pthread_mutex_unlock(&p->mu);
    if (write(p->notifyfd, &one, sizeof one) < 0) {
        /* Only a full counter fails, and then the reader is already woken. */
    }
}

static void stop_errno(struct pump *p, struct lane *l, int err)
{
    l->st.stop_errno = err;
    stop(p, l, PUMP_STOP_ERRNO);
}

/* ---------------------------------------------------------------- ring */

static uint8_t *translate(struct lane *l, uint64_t gpa, uint64_t len)
{
    uint32_t k, i;

    for (k = 0; k < l->nregions; k++) {
        /* Start with the region of the previous lookup: consecutive buffers share one. */
        i = (l->last_region + k) % l->nregions;
        const struct pump_region *r = &l->regions[i];
        uint64_t off = gpa - r->gpa;
        if (gpa >= r->gpa && off < r->size) {
            /* Regions never overlap: no other one can hold the range either. */
            if (len > r->size - off)
                return NULL;
            l->last_region = i;
            return r->host + off;
        }
    }
    return NULL;
}

/* Chains the driver made available beyond next_avail, or -1 (lane stopped: ring broken). */
static int pending(struct pump *p, struct lane *l)
{
    uint16_t n = (uint16_t)(ld16(l->avail + 2) - l->next_avail);

    if (n > l->size) {
        l->st.stop_value = n;
        stop(p, l, PUMP_STOP_AVAIL);
        return -1;
    }
    return n;
}

/* vq_walk with io[k] grown until the table's segments fit; its result code. */
static int walk(struct pump *p, struct lane *l, int k, const uint8_t *table, uint32_t n,
                uint32_t start, int opts, uint64_t total, int seen)
{
    for (;;) {
        int rc = vq_walk(table, n, start, opts, total, seen, l->io[k], l->io_cap[k]);
        if (rc != VQ_E_SPACE)
            return rc;
        uint64_t *io = realloc(l->io[k], sizeof(uint64_t) * (VQ_IO_HDR + 3 * (size_t)n));
        if (io == NULL) {
            stop_errno(p, l, ENOMEM);
            return VQ_E_SPACE;
        }
        l->io[k] = io;
        l->io_cap[k] = n;
    }
}

static void chain_fault(struct pump *p, struct lane *l, int rc, int k, uint32_t n)
{
    if (rc == VQ_E_SPACE)
        return; /* out of memory: already stopped */
    l->st.stop_code = rc;
    l->st.stop_index = (uint32_t)l->io[k][VQ_IO_INDEX];
    l->st.stop_value = l->io[k][VQ_IO_VALUE];
    l->st.stop_n = n;
    l->st.stop_indirect = k;
    stop(p, l, PUMP_STOP_CHAIN);
}

/*
 * Take the chain at next_avail into l->iov (the readable buffers for g2h, the writable ones
 * for h2g): 1, or 0 when the ring is empty, or -1 when the lane stopped. As SplitQueue.pop,
 * the queue moves past a bad chain.
 */
static int pop(struct pump *p, struct lane *l)
{
    int avail = pending(p, l);
    uint32_t slot, k, j, nseg[2] = {0, 0}, ntab = l->size;
    const uint8_t *table;
    uint64_t len = 0;
    int rc, seen_write = 0, want;

    if (avail <= 0)
        return avail;
    /* The entry and the descriptors are read after the avail idx that published them. */
    vq_fence_acquire();
    slot = l->next_avail & l->mask;
    l->head = ld16(l->avail + 4 + 2 * slot);
    l->next_avail++;
    l->st.stop_head = l->head;
    if (l->head >= l->size) {
        l->st.stop_index = slot;
        l->st.stop_value = l->head;
        stop(p, l, PUMP_STOP_HEAD);
        return -1;
    }
    rc = walk(p, l, 0, l->desc, l->size, l->head, l->indirect ? VQ_OPT_INDIRECT_OK : 0, 0, 0);
    nseg[0] = (uint32_t)l->io[0][VQ_IO_COUNT];
    if (rc == VQ_INDIRECT) {
        uint64_t at = l->io[0][VQ_IO_INDEX], tlen = l->io[0][VQ_IO_VALUE];
        uint64_t taddr = l->io[0][VQ_IO_ADDR];
        table = translate(l, taddr, tlen);
        if (table == NULL) {
            l->st.stop_index = (uint32_t)at;
            l->st.stop_addr = taddr;
            l->st.stop_len = tlen;
            l->st.stop_indirect = 1;
            stop(p, l, PUMP_STOP_MEMORY);
            return -1;
        }
        ntab = (uint32_t)(tlen / 16);
        rc = walk(p, l, 1, table, ntab, 0, VQ_OPT_IN_INDIRECT, l->io[0][VQ_IO_TOTAL],
                  (int)l->io[0][VQ_IO_SEEN_WRITE]);
        if (rc != VQ_DONE) {
            chain_fault(p, l, rc, 1, ntab);
            return -1;
        }
        nseg[1] = (uint32_t)l->io[1][VQ_IO_COUNT];
    } else if (rc != VQ_DONE) {
        chain_fault(p, l, rc, 0, ntab);
        return -1;
    }
    if (nseg[0] + nseg[1] > l->iov_cap) {
        struct iovec *iov = realloc(l->iov, sizeof *iov * (nseg[0] + nseg[1]));
        if (iov == NULL) {
            stop_errno(p, l, ENOMEM);
            return -1;
        }
        l->iov = iov;
        l->iov_cap = nseg[0] + nseg[1];
    }
    /* Every buffer is translated before the direction is judged, as SplitQueue.pop does. */
    want = l->dir == PUMP_G2H ? 0 : 1;
    l->niov = 0;
    for (k = 0; k < 2; k++) {
        for (j = 0; j < nseg[k]; j++) {
            const uint64_t *s = l->io[k] + VQ_IO_HDR + 3 * j;
            uint8_t *host = translate(l, s[0], s[1]);
            int writable = (s[2] & F_WRITE) != 0;
            if (host == NULL) {
                l->st.stop_addr = s[0];
                l->st.stop_len = s[1];
                stop(p, l, PUMP_STOP_MEMORY);
                return -1;
            }
            seen_write |= writable;
            if (writable == want) {
                l->iov[l->niov].iov_base = host;
                l->iov[l->niov].iov_len = s[1];
                l->niov++;
                len += s[1];
            }
        }
    }
    if (l->dir == PUMP_G2H && seen_write) {
        stop(p, l, PUMP_STOP_WRITABLE);
        return -1;
    }
    if (l->dir == PUMP_H2G && !seen_write) {
        stop(p, l, PUMP_STOP_READONLY);
        return -1;
    }
    if (l->dir == PUMP_G2H && l->max_chain && len > l->max_chain) {
        l->st.stop_value = len;
        stop(p, l, PUMP_STOP_TOO_LONG);
        return -1;
    }
    l->have = 1;
    l->chain_len = len;
    l->done = 0;
    l->iov_first = 0;
    return 1;
}

/* Move past n bytes of the held chain's iovecs. */
static void advance(struct lane *l, uint64_t n)
{
    l->done += n;
    while (n && l->iov_first < l->niov) {
        struct iovec *v = &l->iov[l->iov_first];
        if (n < v->iov_len) {
            v->iov_base = (uint8_t *)v->iov_base + n;
            v->iov_len -= n;
            return;
        }
        n -= v->iov_len;
        l->iov_first++;
    }
}

/* Complete the held chain: the element, then (release) the used idx, at once. */
static void complete(struct lane *l, uint32_t written)
{
    uint8_t *e = l->used + 4 + 8 * (size_t)(l->next_used & l->mask);

    st32(e, l->head);
    st32(e + 4, written);
    l->next_used++;
    vq_fence_release();
    st16(l->used + 2, l->next_used);
    l->have = 0;
    bump(&l->st.chains, 1);
}

/* Ask for kicks again; then, as SplitQueue.enable_notifications, whether chains wait. */
static int enable(struct pump *p, struct lane *l)
{
    if (l->event_idx)
        st16(l->used + 4 + 8 * (size_t)l->size, l->next_avail);
    else
        st16(l->used, ld16(l->used) & ~USED_F_NO_NOTIFY);
    /* The request is visible before avail idx is read, or a chain could be seen by neither. */
    vq_fence_full();
    return pending(p, l);
}

static void disable(struct lane *l)
{
    if (!l->event_idx)
        st16(l->used, ld16(l->used) | USED_F_NO_NOTIFY);
}

/* Signal the call eventfd if the driver wants an interrupt for what was completed. */
static void notify(struct pump *p, struct lane *l)
{
    uint16_t old = l->signalled, now = l->next_used;
    uint64_t one = 1;
    int need;

    if (old == now)
        return;
    /* The used idx store is visible before the driver's suppression state is read. */
    vq_fence_full();
    l->signalled = now;
    if (l->event_idx) {
        uint16_t event = ld16(l->avail + 4 + 2 * (size_t)l->size);
        need = (uint16_t)(now - event - 1) < (uint16_t)(now - old);
    } else {
        need = !(ld16(l->avail) & AVAIL_F_NO_INTERRUPT);
    }
    if (!need)
        return;
    while (write(l->call, &one, sizeof one) < 0) {
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN)
            stop(p, l, PUMP_STOP_CALL_FULL);
        else
            stop_errno(p, l, errno);
        return;
    }
    bump(&l->st.calls, 1);
}

/* ---------------------------------------------------------------- lanes */

static void want_sock(struct pump *p, struct lane *l, uint32_t events)
{
    struct epoll_event ev = {.events = events, .data.u64 = ((uint64_t)l->id << 2) | TAG_SOCK};
    int op = l->sock_events == 0 ? EPOLL_CTL_ADD : events == 0 ? EPOLL_CTL_DEL : EPOLL_CTL_MOD;

    if (events == l->sock_events)
        return;
    if (epoll_ctl(p->epfd, op, l->sock, &ev) < 0) {
        stop_errno(p, l, errno);
        return;
    }
    l->sock_events = events;
}

static void make_ready(struct pump *p, struct lane *l)
{
    if (!l->queued) {
        l->queued = 1;
        p->ready[p->nready++] = l->id;
    }
}

/* Write what is left of the held chain: 1 all written, 0 the socket is full, -1 stopped. */
static int send_chain(struct pump *p, struct lane *l)
{
    while (l->iov_first < l->niov) {
        struct msghdr m = {.msg_iov = l->iov + l->iov_first};
        uint32_t left = l->niov - l->iov_first;
        ssize_t n;

        if (l->iov[l->iov_first].iov_len == 0) {
            l->iov_first++;
            continue;
        }
        m.msg_iovlen = left < IOV_MAX ? left : IOV_MAX;
        n = sendmsg(l->sock, &m, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            stop_errno(p, l, errno);
            return -1;
        }
        advance(l, (uint64_t)n);
        bump(&l->st.bytes, (uint64_t)n);
    }
    return 1;
}

/* The next chain, kicks asked for again when the ring is empty (disable, drain, enable,
   check again): 1 a chain is held, 0 the ring is empty, -1 the lane stopped. */
static int next_chain(struct pump *p, struct lane *l)
{
    for (;;) {
        int r = pop(p, l);
        if (r != 0)
            return r;
        r = enable(p, l);
        if (r <= 0) {
            if (r == 0)
                want_sock(p, l, 0); /* nothing to move: the socket does not matter */
            return r;
        }
        disable(l);
    }
}

static void run_g2h(struct pump *p, struct lane *l)
{
    int budget = BUDGET, r;

    disable(l);
    for (;;) {
        if (l->have) {
            r = send_chain(p, l);
            if (r < 0)
                break;
            if (r == 0) {
                want_sock(p, l, EPOLLOUT);
                break;
            }
            complete(l, 0);
        }
        if (budget-- == 0) {
            make_ready(p, l);
            break;
        }
        if (next_chain(p, l) <= 0)
            break;
        if (l->skip) {
            /* Resuming a chain that an earlier lane (or Python) partly wrote. */
            advance(l, l->skip < l->chain_len ? l->skip : l->chain_len);
            l->skip = 0;
        }
    }
    if (l->st.stop_kind != PUMP_STOP_CALL_FULL)
        notify(p, l);
}

/* Drop n peeked bytes from the socket: they are in guest memory and marked used. */
static int consume(struct pump *p, struct lane *l, uint64_t n)
{
    while (n) {
        size_t chunk = l->sock_inet ? n : n < SCRATCH ? n : SCRATCH;
        /* TCP discards with MSG_TRUNC and no buffer; AF_UNIX streams need somewhere to copy. */
        ssize_t got = recv(l->sock, l->sock_inet ? NULL : p->scratch, chunk,
                           MSG_DONTWAIT | (l->sock_inet ? MSG_TRUNC : 0));
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0) {
            stop_errno(p, l, got < 0 ? errno : EPIPE);
            return -1;
        }
        n -= (uint64_t)got;
    }
    return 0;
}

static void run_h2g(struct pump *p, struct lane *l)
{
    int budget = BUDGET;

    disable(l);
    for (;;) {
        if (!l->have) {
            if (budget-- == 0) {
                make_ready(p, l);
                break;
            }
            if (next_chain(p, l) <= 0)
                break;
        }
        if (l->chain_len == 0) {
            complete(l, 0);
            continue;
        }
        struct msghdr m = {.msg_iov = l->iov, .msg_iovlen = l->niov < IOV_MAX ? l->niov : IOV_MAX};
        /* Peek, publish, then consume: a crash in between duplicates this buffer, loses nothing. */
        ssize_t n = recvmsg(l->sock, &m, MSG_PEEK | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                want_sock(p, l, EPOLLIN);
                break;
            }
            stop_errno(p, l, errno);
            break;
        }
        if (n == 0) {
            stop(p, l, PUMP_STOP_EOF);
            break;
        }
        complete(l, (uint32_t)n);
        bump(&l->st.bytes, (uint64_t)n);
        if (consume(p, l, (uint64_t)n) < 0)
            break;
    }
    if (l->st.stop_kind != PUMP_STOP_CALL_FULL)
        notify(p, l);
}

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void run(struct pump *p, struct lane *l)
{
    uint64_t before = l->st.bytes, moved;

    if (l->stopped)
        return;
    if (l->dir == PUMP_G2H)
        run_g2h(p, l);
    else
        run_h2g(p, l);
    moved = l->st.bytes - before;
    if (moved > POLL_MAX_BYTES)
        p->poll_until = 0;
    else if (p->poll_ns && moved)
        p->poll_until = now_ns() + p->poll_ns;
}

static void drain_kick(struct pump *p, struct lane *l)
{
    uint64_t v;

    if (l->kick_blocking) {
        /* A blocking eventfd handed in: read only what poll promises, never sleep here. */
        struct pollfd pfd = {.fd = l->kick, .events = POLLIN};
        if (poll(&pfd, 1, 0) != 1)
            return;
    }
    if (read(l->kick, &v, sizeof v) == sizeof v)
        bump(&l->st.kicks, 1);
    else if (errno != EAGAIN && errno != EINTR)
        stop_errno(p, l, errno);
}

static void lane_free(struct lane *l)
{
    close(l->kick);
    close(l->call);
    close(l->sock);
    free(l->regions);
    free(l->iov);
    free(l->io[0]);
    free(l->io[1]);
    free(l);
}

/* ---------------------------------------------------------------- commands */

static void fill_state(const struct lane *l, struct pump_state *out)
{
    *out = l->st;
    out->chains = rd(&l->st.chains);
    out->bytes = rd(&l->st.bytes);
    out->wakeups = rd(&l->st.wakeups);
    out->calls = rd(&l->st.calls);
    out->kicks = rd(&l->st.kicks);
}

static int do_attach(struct pump *p, struct lane *l)
{
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = ((uint64_t)l->id << 2) | TAG_KICK};

    if (p->lanes[l->id] != NULL)
        return -EBUSY;
    if (epoll_ctl(p->epfd, EPOLL_CTL_ADD, l->kick, &ev) < 0)
        return -errno;
    p->lanes[l->id] = l;
    /* Chains may be waiting already: attach acts as a kick. */
    make_ready(p, l);
    return 0;
}

static int do_detach(struct pump *p, int id, struct pump_state *out)
{
    struct lane *l = p->lanes[id];
    int i, j;

    if (l == NULL)
        return -EINVAL;
    if (!l->stopped) {
        struct epoll_event unused;
        epoll_ctl(p->epfd, EPOLL_CTL_DEL, l->kick, &unused);
        if (l->sock_events)
            epoll_ctl(p->epfd, EPOLL_CTL_DEL, l->sock, &unused);
        notify(p, l);
    }
    if (l->have) {
        /* A held chain goes back to the avail side, with what of it was already sent. */
        l->next_avail--;
        l->st.offset = (uint32_t)l->done;
        l->have = 0;
    } else {
        l->st.offset = l->skip;
    }
    l->st.next_avail = l->next_avail;
    l->st.next_used = l->next_used;
    l->st.signalled = l->signalled;
    fill_state(l, out);
    p->lanes[id] = NULL;
    pthread_mutex_lock(&p->mu);
    for (i = j = 0; i < p->nstopped; i++)
        if (p->stopped[i] != id)
            p->stopped[j++] = p->stopped[i];
    p->nstopped = j;
    pthread_mutex_unlock(&p->mu);
    for (i = j = 0; i < p->nready; i++)
        if (p->ready[i] != id)
            p->ready[j++] = p->ready[i];
    p->nready = j;
    return 0;
}

/* Handle the command in the slot; 1 when the thread must end. */
static int command(struct pump *p)
{
    uint64_t v;
    int quit = 0, rc = 0;

    if (read(p->cmdfd, &v, sizeof v) < 0 && errno != EAGAIN)
        return 0;
    pthread_mutex_lock(&p->mu);
    switch (p->cmd) {
    case CMD_ATTACH:
        pthread_mutex_unlock(&p->mu);
        rc = do_attach(p, p->cmd_new);
        pthread_mutex_lock(&p->mu);
        break;
    case CMD_DETACH:
        pthread_mutex_unlock(&p->mu);
        rc = do_detach(p, p->cmd_lane, p->cmd_out);
        pthread_mutex_lock(&p->mu);
        break;
    case CMD_QUIT:
        quit = 1;
        break;
    default:
        pthread_mutex_unlock(&p->mu);
        return 0;
    }
    p->cmd = CMD_NONE;
    p->cmd_result = rc;
    p->cmd_done = 1;
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    return quit;
}

static void *thread_main(void *arg)
{
    struct pump *p = arg;
    struct epoll_event evs[MAX_EVENTS];
    int ready[PUMP_MAX_LANES];

    for (;;) {
        int spin = p->nready || (p->poll_until && now_ns() < p->poll_until);
        int n = epoll_wait(p->epfd, evs, MAX_EVENTS, spin ? 0 : -1);
        int cmd = 0, i, nready;

        if (n < 0 && errno != EINTR)
            break;
        for (i = 0; i < n; i++) {
            uint64_t tag = evs[i].data.u64;
            struct lane *l;
            if (tag == TAG_CMD) {
                cmd = 1;
                continue;
            }
            l = p->lanes[tag >> 2];
            if (l == NULL || l->stopped)
                continue;
            bump(&l->st.wakeups, 1);
            if ((tag & 3) == TAG_KICK)
                drain_kick(p, l);
            run(p, l);
            if ((evs[i].events & (EPOLLERR | EPOLLHUP)) && (tag & 3) == TAG_SOCK &&
                !l->stopped && l->sock_events)
                /* Level-triggered and unmaskable: waiting again would spin. */
                stop(p, l, PUMP_STOP_HUP);
        }
        /* Lanes that used up their budget, or were just attached, run again now. */
        nready = p->nready;
        memcpy(ready, p->ready, sizeof ready[0] * (size_t)nready);
        p->nready = 0;
        for (i = 0; i < nready; i++) {
            struct lane *l = p->lanes[ready[i]];
            if (l == NULL)
                continue;
            l->queued = 0;
            run(p, l);
        }
        /* Last, so that no event of this batch meets a lane detached by the command. */
        if (cmd && command(p))
            break;
    }
    return NULL;
}

/* Post a command and wait for the thread to carry it out; called with cmd_mu held. */
static int post(struct pump *p, int cmd)
{
    uint64_t one = 1;
    int rc;

    pthread_mutex_lock(&p->mu);
    p->cmd = cmd;
    p->cmd_done = 0;
    pthread_mutex_unlock(&p->mu);
    if (write(p->cmdfd, &one, sizeof one) < 0)
        return -errno;
    pthread_mutex_lock(&p->mu);
    while (!p->cmd_done)
        pthread_cond_wait(&p->cv, &p->mu);
    rc = p->cmd_result;
    pthread_mutex_unlock(&p->mu);
    return rc;
}

/* ---------------------------------------------------------------- API */

pump_t *pump_new(void)
{
    struct pump *p = calloc(1, sizeof *p);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = TAG_CMD};
    sigset_t all, old;
    int err;

    if (p == NULL)
        return NULL;
    p->epfd = epoll_create1(EPOLL_CLOEXEC);
    p->cmdfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    p->notifyfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    p->scratch = malloc(SCRATCH);
    /* Waking from epoll costs each step of a round trip ~10-20 us here; polling a while
       after a small transfer takes most of it off (bench qemu rtt p50 x1.07 -> x0.70 of
       QEMU's). Only after small ones: after bulk transfers it burnt a core for nothing
       and took it from the guest (g2h x1.04 -> x0.89). VHOSTSER_PUMP_POLL_US=0 turns it off. */
    p->poll_ns = POLL_NS_DEFAULT;
    if (getenv("VHOSTSER_PUMP_POLL_US"))
        p->poll_ns = strtoull(getenv("VHOSTSER_PUMP_POLL_US"), NULL, 10) * 1000u;
    if (p->epfd < 0 || p->cmdfd < 0 || p->notifyfd < 0 || p->scratch == NULL ||
        epoll_ctl(p->epfd, EPOLL_CTL_ADD, p->cmdfd, &ev) < 0)
        goto fail;
    pthread_mutex_init(&p->cmd_mu, NULL);
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    /* The thread blocks every signal (it inherits the mask): they are the main thread's,
       and its syscalls are never interrupted. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    err = pthread_create(&p->thread, NULL, thread_main, p);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (err) {
        errno = err;
        goto fail;
    }
    /* Named, so that top -H and /proc/PID/task show the data plane's own CPU time. */
    pthread_setname_np(p->thread, "vq-pump");
    return p;
fail:
    err = errno ? errno : ENOMEM;
    if (p->epfd >= 0)
        close(p->epfd);
    if (p->cmdfd >= 0)
        close(p->cmdfd);
    if (p->notifyfd >= 0)
        close(p->notifyfd);
    free(p->scratch);
    free(p);
    errno = err;
    return NULL;
}

void pump_free(pump_t *p)
{
    int i;

    pthread_mutex_lock(&p->cmd_mu);
    post(p, CMD_QUIT);
    pthread_mutex_unlock(&p->cmd_mu);
    pthread_join(p->thread, NULL);
    for (i = 0; i < PUMP_MAX_LANES; i++)
        if (p->lanes[i] != NULL)
            lane_free(p->lanes[i]);
    close(p->epfd);
    close(p->cmdfd);
    close(p->notifyfd);
    pthread_mutex_destroy(&p->cmd_mu);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    free(p->scratch);
    free(p);
}

int pump_notify_fd(pump_t *p) { return p->notifyfd; }

static int dup_fd(int fd) { return fcntl(fd, F_DUPFD_CLOEXEC, 0); }

int pump_attach(pump_t *p, int lane, const struct pump_lane_cfg *cfg)
{
    struct lane *l;
    int flags, domain = 0, rc, err;
    socklen_t dlen = sizeof domain;

    if (lane < 0 || lane >= PUMP_MAX_LANES || (cfg->dir != PUMP_G2H && cfg->dir != PUMP_H2G) ||
        cfg->size == 0 || cfg->size > 32768 || (cfg->size & (cfg->size - 1)) ||
        cfg->nregions == 0)
        return -EINVAL;
    l = calloc(1, sizeof *l);
    if (l == NULL)
        return -ENOMEM;
    l->id = lane;
    l->dir = cfg->dir;
    l->desc = cfg->desc;
    l->avail = cfg->avail;
    l->used = cfg->used;
    l->size = cfg->size;
    l->mask = cfg->size - 1;
    l->next_avail = cfg->next_avail;
    l->next_used = cfg->next_used;
    l->signalled = cfg->signalled;
    l->event_idx = cfg->event_idx;
    l->indirect = cfg->indirect;
    l->max_chain = cfg->max_chain;
    l->skip = cfg->dir == PUMP_G2H ? cfg->offset : 0;
    l->kick = dup_fd(cfg->kick_fd);
    l->call = dup_fd(cfg->call_fd);
    l->sock = dup_fd(cfg->sock_fd);
    l->regions = malloc(sizeof *l->regions * cfg->nregions);
    l->io[0] = malloc(sizeof(uint64_t) * (VQ_IO_HDR + 3 * IO_CAP0));
    l->io[1] = malloc(sizeof(uint64_t) * (VQ_IO_HDR + 3 * IO_CAP0));
    l->io_cap[0] = l->io_cap[1] = IO_CAP0;
    if (l->kick < 0 || l->call < 0 || l->sock < 0) {
        rc = -errno;
        goto fail;
    }
    if (l->regions == NULL || l->io[0] == NULL || l->io[1] == NULL) {
        rc = -ENOMEM;
        goto fail;
    }
    memcpy(l->regions, cfg->regions, sizeof *l->regions * cfg->nregions);
    l->nregions = cfg->nregions;
    flags = fcntl(l->kick, F_GETFL);
    l->kick_blocking = flags >= 0 && !(flags & O_NONBLOCK);
    if (getsockopt(l->sock, SOL_SOCKET, SO_DOMAIN, &domain, &dlen) < 0) {
        rc = -errno;
        goto fail;
    }
    l->sock_inet = domain == AF_INET || domain == AF_INET6;
    pthread_mutex_lock(&p->cmd_mu);
    p->cmd_new = l;
    rc = post(p, CMD_ATTACH);
    pthread_mutex_unlock(&p->cmd_mu);
    if (rc == 0)
        return 0;
fail:
    err = rc;
    if (l->kick >= 0)
        close(l->kick);
    if (l->call >= 0)
        close(l->call);
    if (l->sock >= 0)
        close(l->sock);
    free(l->regions);
    free(l->io[0]);
    free(l->io[1]);
    free(l);
    return err;
}

int pump_detach(pump_t *p, int lane, struct pump_state *out)
{
    struct lane *l;
    int rc;

    if (lane < 0 || lane >= PUMP_MAX_LANES)
        return -EINVAL;
    pthread_mutex_lock(&p->cmd_mu);
    l = p->lanes[lane];
    p->cmd_lane = lane;
    p->cmd_out = out;
    rc = post(p, CMD_DETACH);
    pthread_mutex_unlock(&p->cmd_mu);
    if (rc == 0)
        lane_free(l);
    return rc;
}

int pump_peek(pump_t *p, int lane, struct pump_state *out)
{
    struct lane *l;

    if (lane < 0 || lane >= PUMP_MAX_LANES)
        return -EINVAL;
    pthread_mutex_lock(&p->cmd_mu);
    l = p->lanes[lane];
    if (l == NULL) {
        pthread_mutex_unlock(&p->cmd_mu);
        return -EINVAL;
    }
    if (__atomic_load_n(&l->st.stop_kind, __ATOMIC_ACQUIRE) != PUMP_RUNNING) {
        fill_state(l, out); /* a stopped lane is frozen: every field is settled */
    } else {
        memset(out, 0, sizeof *out);
        out->chains = rd(&l->st.chains);
        out->bytes = rd(&l->st.bytes);
        out->wakeups = rd(&l->st.wakeups);
        out->calls = rd(&l->st.calls);
        out->kicks = rd(&l->st.kicks);
    }
    pthread_mutex_unlock(&p->cmd_mu);
    return 0;
}

int pump_stopped(pump_t *p, int *lanes, int cap)
{
    uint64_t v;
    int n, i;

    pthread_mutex_lock(&p->mu);
    if (read(p->notifyfd, &v, sizeof v) < 0) {
        /* EAGAIN: nothing was signalled; the list is read all the same. */
    }
    n = p->nstopped < cap ? p->nstopped : cap;
    memcpy(lanes, p->stopped, sizeof *lanes * (size_t)n);
    for (i = n; i < p->nstopped; i++)
        p->stopped[i - n] = p->stopped[i];
    p->nstopped -= n;
    if (p->nstopped) {
        uint64_t one = 1;
        if (write(p->notifyfd, &one, sizeof one) < 0) {
            /* full: the reader is woken anyway */
        }
    }
    pthread_mutex_unlock(&p->mu);
    return n;
}
