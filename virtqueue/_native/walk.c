/*
 * Memory fences and the descriptor chain walk of a split virtqueue (virtio 1.2, 2.7.5).
 *
 * The walk only decodes and validates: it never touches the buffers a chain points to, only
 * the descriptor table it is given, and it never reads outside that table. Python translates
 * the resulting (addr, len, flags) segments into guest memory views, and resolves the
 * address of an indirect table before walking it with a second call.
 * _pywalk.py is the same walk in Python: keep the two in step.
 */
#include <stdint.h>
#include <string.h>

#include "walk.h"

#define VQ_F_NEXT 1u
#define VQ_F_WRITE 2u
#define VQ_F_INDIRECT 4u
#define VQ_MAX_INDIRECT 32768u

struct vq_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

/* The virtio descriptor layout, read with native (little-endian) byte order. */
_Static_assert(sizeof(struct vq_desc) == 16, "descriptor must be 16 bytes");

void vq_fence_acquire(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
void vq_fence_release(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
void vq_fence_full(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

static int vq_fail(uint64_t *io, int code, uint32_t index, uint64_t value)
{
    io[VQ_IO_COUNT] = 0;
    io[VQ_IO_INDEX] = index;
    io[VQ_IO_VALUE] = value;
    return code;
}

int vq_walk(const uint8_t *table, uint32_t n, uint32_t start, int opts, uint64_t total,
            int seen_write, uint64_t *io, uint32_t cap)
{
    uint64_t *seg = io + VQ_IO_HDR;
    uint32_t count = 0;
    uint32_t i = start;
    uint32_t ttl = n; /* a chain visits each descriptor at most once, or it loops */
    struct vq_desc d;
    int code;

    if (start >= n)
        return vq_fail(io, VQ_E_HEAD, start, start);
    for (;;) {
        if (ttl == 0)
            return vq_fail(io, VQ_E_TTL, i, n);
        ttl--;
        /* The driver may rewrite the table under us: read each descriptor exactly once. */
        memcpy(&d, table + (size_t)i * sizeof d, sizeof d);
        if (d.flags & VQ_F_INDIRECT) {
            if (opts & VQ_OPT_IN_INDIRECT)
                return vq_fail(io, VQ_E_NESTED, i, d.flags);
            if (!(opts & VQ_OPT_INDIRECT_OK))
                return vq_fail(io, VQ_E_IND_OFF, i, d.flags);
            if (d.flags & VQ_F_NEXT)
                return vq_fail(io, VQ_E_IND_NEXT, i, d.flags);
            if (d.len == 0 || d.len % sizeof d != 0 || d.len / sizeof d > VQ_MAX_INDIRECT)
                return vq_fail(io, VQ_E_IND_LEN, i, d.len);
            io[VQ_IO_VALUE] = d.len;
            io[VQ_IO_ADDR] = d.addr;
            code = VQ_INDIRECT;
            break;
        }
        if (d.flags & VQ_F_WRITE)
            seen_write = 1;
        else if (seen_write)
            return vq_fail(io, VQ_E_ORDER, i, d.flags);
        /* At most 2 * 32768 lengths below 2^32 each: the sum cannot wrap 64 bits. */
        total += d.len;
        if (total > UINT32_MAX)
            return vq_fail(io, VQ_E_TOTAL, i, total);
        if (count == cap)
            return vq_fail(io, VQ_E_SPACE, i, cap);
        seg[3 * count] = d.addr;
        seg[3 * count + 1] = d.len;
        seg[3 * count + 2] = d.flags;
        count++;
        if (!(d.flags & VQ_F_NEXT)) {
            io[VQ_IO_VALUE] = 0;
            io[VQ_IO_ADDR] = 0;
            code = VQ_DONE;
            break;
        }
        if (d.next >= n)
            return vq_fail(io, VQ_E_NEXT, i, d.next);
        i = d.next;
    }
    io[VQ_IO_COUNT] = count;
    io[VQ_IO_INDEX] = i;
    io[VQ_IO_TOTAL] = total;
    io[VQ_IO_SEEN_WRITE] = (uint64_t)seen_write;
    return code;
}
