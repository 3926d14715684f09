/*
 * Interface of walk.c, read both by the C compiler (after <stdint.h>) and by cffi's cdef,
 * which is why it holds nothing but plain declarations and integer defines.
 * The codes and options are mirrored in _common.py.
 */

/* Bump on any change here, so that a stale in-tree build is not used (see _cwalk.py). */
#define VQ_API_VERSION 1

/* vq_walk results: the chain is complete, or it continues in an indirect table. */
#define VQ_DONE 0
#define VQ_INDIRECT 1
/* Errors; index is the descriptor at fault, value the offending value. */
#define VQ_E_HEAD -1
#define VQ_E_NEXT -2
#define VQ_E_TTL -3
#define VQ_E_TOTAL -4
#define VQ_E_IND_LEN -5
#define VQ_E_NESTED -6
#define VQ_E_IND_NEXT -7
#define VQ_E_IND_OFF -8
#define VQ_E_ORDER -9
/* Not a verdict: io had too little room; call again with cap >= n. */
#define VQ_E_SPACE -10

/* opts bits */
#define VQ_OPT_INDIRECT_OK 1
#define VQ_OPT_IN_INDIRECT 2

/*
 * vq_walk's io array: a header of VQ_IO_HDR outputs, then room for cap segments of three
 * values each (addr, len, flags). A flat array of integers is what Python unpacks fastest.
 */
#define VQ_IO_COUNT 0       /* segments stored (0 on error) */
#define VQ_IO_INDEX 1       /* last or faulty descriptor */
#define VQ_IO_VALUE 2       /* indirect table length, or the offending value */
#define VQ_IO_ADDR 3        /* indirect table address (VQ_INDIRECT) */
#define VQ_IO_TOTAL 4       /* bytes in the chain so far */
#define VQ_IO_SEEN_WRITE 5  /* 1 once a device-writable descriptor came */
#define VQ_IO_HDR 6

void vq_fence_acquire(void);
void vq_fence_release(void);
void vq_fence_full(void);

/*
 * Walk the chain starting at descriptor start of the n-descriptor table; total and seen_write
 * carry over from the part of the chain already walked (the direct part, for an indirect
 * table). io holds VQ_IO_HDR + 3 * cap values.
 */
int vq_walk(const uint8_t *table, uint32_t n, uint32_t start, int opts, uint64_t total,
            int seen_write, uint64_t *io, uint32_t cap);
