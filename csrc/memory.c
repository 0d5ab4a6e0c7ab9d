/* memory.c -- a read-only device over caller memory: the bytes of a window
 * that pydr_signer_sign_spans kept, lying at their device offset, so that
 * records are encoded from what was hashed without reading the disk again.
 * A read outside the memory is a bug in the caller: it fails with -EINVAL
 * at the first offset outside, never reads as zeros. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "dev.h"
#include "fail.h"
#include "pydr.h"

static int memory_read(pydr_device *d, void *dst, size_t len, uint64_t off,
                       pydr_error *error)
{
    uint64_t lo = d->mem_offset, hi = d->mem_offset + d->mem_len;
    if (off < lo || off > hi)
        return pydr_fail_at(error, -EINVAL, off);
    if (len > hi - off)
        return pydr_fail_at(error, -EINVAL, hi);  /* the first byte it does not hold */
    memcpy(dst, d->mem + (off - lo), len);
    return 0;
}

static int memory_write(pydr_device *d, const void *src, size_t len, uint64_t off,
                        pydr_error *error)
{
    (void)d; (void)src; (void)len;
    return pydr_fail_at(error, -EROFS, off);
}

static int memory_zero(pydr_device *d, uint64_t off, uint64_t len, pydr_error *error)
{
    (void)d; (void)len;
    return pydr_fail_at(error, -EROFS, off);
}

uint64_t pydr_memory_end(const pydr_device *d)
{
    return d->mem_offset + d->mem_len;
}

int pydr_device_open_memory(pydr_device **out, const void *data, size_t len,
                            uint64_t offset)
{
    if (!out)
        return -EINVAL;
    *out = NULL;
    if ((!data && len) || offset + len < offset || offset + len > (uint64_t)INT64_MAX)
        return -EINVAL;
    pydr_device *d = calloc(1, sizeof *d);
    if (!d)
        return -ENOMEM;
    static const uint8_t nothing[1];
    d->read = memory_read;
    d->write = memory_write;
    d->zero = memory_zero;
    d->fd = -1;
    d->is_block_device = 1;  /* it cannot be resized */
    d->nbd = NULL;
    d->mem = data ? data : nothing;
    d->mem_len = len;
    d->mem_offset = offset;
    *out = d;
    return 0;
}
