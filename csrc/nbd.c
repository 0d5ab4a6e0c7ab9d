/*
 * nbd.c -- disks behind an NBD server (qemu-nbd, qemu-storage-daemon, a
 * running QEMU), through libnbd: one connection per handle.
 *
 * Signing asks the server which ranges are holes or read as zeros
 * (base:allocation block status) and does not read them; the data is read
 * with several requests in flight and hashed as it arrives, by the same
 * kernels as files. Changed-block tracking reads a QEMU dirty bitmap the
 * same way (qemu:dirty-bitmap:NAME). Records are encoded from, and applied
 * to, an export through the device operations (dev.h); the public functions
 * are those of pydr_device (device.c).
 *
 * Built without libnbd (PYDR_HAVE_LIBNBD undefined), connecting fails with
 * PYDR_E_NO_NBD, so no NBD device ever exists.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dev.h"
#include "fail.h"
#include "kernel.h"
#include "pydr.h"

#ifdef PYDR_HAVE_LIBNBD
#include <libnbd.h>

#define NBD_CHUNK (2u << 20)      /* bytes per read request                  */
#define NBD_IN_FLIGHT 8           /* read requests in flight while signing   */
#define NBD_STATUS_SPAN (1u << 30) /* bytes asked per block-status request   */
#define NBD_STATUS_MIN (8u << 20)  /* shorter ranges are read, not asked about:
                                      a round trip costs more than the read */

struct pydr_nbd {
    struct nbd_handle *h;
    int has_bitmap;
    uint8_t *bufs;   /* NBD_IN_FLIGHT chunk buffers, made on first use */
    size_t buf_size;
};

/* Fails with errno err (0: libnbd's), libnbd's message in error->detail. */
static int nbd_failed(pydr_error *error, int err)
{
    const char *msg = nbd_get_error();
    if (err == 0)
        err = nbd_get_errno();
    pydr_fail(error, err > 0 ? -err : -EIO);
    snprintf(error->detail, sizeof error->detail, "%s", msg ? msg : "NBD request failed");
    return error->code;
}

static int nbd_failed_at(pydr_error *error, int err, uint64_t offset)
{
    nbd_failed(error, err);
    error->has_offset = 1;
    error->offset = offset;
    return error->code;
}

/* Fails with our own words. */
static int nbd_refused(pydr_error *error, int code, const char *why)
{
    pydr_fail(error, code);
    snprintf(error->detail, sizeof error->detail, "%s", why);
    return code;
}

static int nbd_refused_at(pydr_error *error, int code, uint64_t offset, const char *why)
{
    nbd_refused(error, code, why);
    error->has_offset = 1;
    error->offset = offset;
    return code;
}

int pydr_nbd_available(void)
{
    return 1;
}

static int nbd_dev_read(pydr_device *d, void *dst, size_t len, uint64_t off,
                        pydr_error *error)
{
    struct nbd_handle *h = d->nbd->h;
    size_t got = 0;
    while (got < len) {  /* requests bounded like the server's maximum */
        size_t n = len - got < NBD_CHUNK * 8 ? len - got : NBD_CHUNK * 8;
        if (nbd_pread(h, (uint8_t *)dst + got, n, off + got, 0) == -1)
            return nbd_failed_at(error, 0, off + got);
        got += n;
    }
    return 0;
}

static int nbd_dev_write(pydr_device *d, const void *src, size_t len, uint64_t off,
                         pydr_error *error)
{
    struct nbd_handle *h = d->nbd->h;
    size_t put = 0;
    while (put < len) {
        size_t n = len - put < NBD_CHUNK * 8 ? len - put : NBD_CHUNK * 8;
        if (nbd_pwrite(h, (const uint8_t *)src + put, n, off + put, 0) == -1)
            return nbd_failed_at(error, 0, off + put);
        put += n;
    }
    return 0;
}

static int nbd_dev_zero(pydr_device *d, uint64_t off, uint64_t len, pydr_error *error)
{
    static const uint8_t zeros[1 << 16];
    struct nbd_handle *h = d->nbd->h;
    while (len) {
        uint64_t n = len < (1u << 30) ? len : (1u << 30);
        if (nbd_can_zero(h) == 1) {
            if (nbd_zero(h, n, off, 0) == -1)
                return nbd_failed_at(error, 0, off);
        } else {  /* a server without WRITE_ZEROES: write them */
            for (uint64_t done = 0; done < n;) {
                size_t m = n - done < sizeof zeros ? (size_t)(n - done) : sizeof zeros;
                if (nbd_pwrite(h, zeros, m, off + done, 0) == -1)
                    return nbd_failed_at(error, 0, off + done);
                done += m;
            }
        }
        off += n;
        len -= n;
    }
    return 0;
}

/* An additional connection, given up if the server does not start its
 * handshake: it is at its client limit (qemu-nbd --shared) and would
 * leave us waiting until another client leaves. */
static int connect_extra(struct nbd_handle *h, const char *uri, pydr_error *error)
{
    if (nbd_aio_connect_uri(h, uri) == -1)
        return nbd_failed(error, ECONNREFUSED);
    int idle_ms = 0;
    while (nbd_aio_is_connecting(h) == 1) {
        int r = nbd_poll(h, 100);
        if (r == -1)
            return nbd_failed(error, ECONNREFUSED);
        if (r == 0 && (idle_ms += 100) >= PYDR_NBD_EXTRA_WAIT_MS)
            return nbd_refused(error, -EAGAIN, "the NBD server takes no more clients");
    }
    if (nbd_aio_is_ready(h) != 1)
        return nbd_failed(error, ECONNREFUSED);
    return 0;
}

int pydr_nbd_connect(pydr_device *d, const char *uri, const char *bitmap, unsigned flags,
                     pydr_error *error)
{
    if (flags & ~(unsigned)(PYDR_NBD_WRITE | PYDR_NBD_EXTRA))
        return pydr_fail(error, -EINVAL);
    pydr_nbd *n = calloc(1, sizeof *n);
    if (!n)
        return pydr_fail(error, -ENOMEM);
    n->h = nbd_create();
    if (!n->h) {
        free(n);
        return nbd_failed(error, ENOMEM);
    }
    char context[256];
    int rc = 0;
    if (nbd_add_meta_context(n->h, LIBNBD_CONTEXT_BASE_ALLOCATION) == -1)
        rc = nbd_failed(error, 0);
    if (!rc && bitmap) {
        snprintf(context, sizeof context, "qemu:dirty-bitmap:%s", bitmap);
        if (nbd_add_meta_context(n->h, context) == -1)
            rc = nbd_failed(error, 0);
    }
    if (!rc && !(flags & PYDR_NBD_EXTRA) && nbd_connect_uri(n->h, uri) == -1)
        rc = nbd_failed(error, ECONNREFUSED);
    if (!rc && (flags & PYDR_NBD_EXTRA))
        rc = connect_extra(n->h, uri, error);
    if (!rc && (flags & PYDR_NBD_WRITE) && nbd_is_read_only(n->h) == 1)
        rc = nbd_refused(error, -EROFS, "the NBD export is read-only");
    if (!rc && bitmap) {
        n->has_bitmap = nbd_can_meta_context(n->h, context) == 1;
        if (!n->has_bitmap) {
            rc = nbd_refused(error, PYDR_E_NO_BITMAP, "");
            snprintf(error->detail, sizeof error->detail,
                     "the NBD server does not export the dirty bitmap %s", bitmap);
        }
    }
    if (rc) {
        nbd_close(n->h);
        free(n);
        return rc;
    }
    d->read = nbd_dev_read;
    d->write = nbd_dev_write;
    d->zero = nbd_dev_zero;
    d->fd = -1;
    d->is_block_device = 1; /* an export cannot be resized */
    d->nbd = n;
    return 0;
}

void pydr_nbd_close(pydr_nbd *n)
{
    if (!n)
        return;
    nbd_shutdown(n->h, 0);
    nbd_close(n->h);
    free(n->bufs);
    free(n);
}

int pydr_nbd_size(pydr_nbd *n, uint64_t *size, pydr_error *error)
{
    int64_t s = nbd_get_size(n->h);
    if (s < 0)
        return nbd_failed(error, 0);
    *size = (uint64_t)s;
    return 0;
}

int pydr_nbd_can(pydr_nbd *n, int what)
{
    switch (what) {
    case PYDR_CAN_FLUSH: return nbd_can_flush(n->h) == 1;
    case PYDR_CAN_ZERO: return nbd_can_zero(n->h) == 1;
    case PYDR_CAN_MULTI_CONN: return nbd_can_multi_conn(n->h) == 1;
    case PYDR_READ_ONLY: return nbd_is_read_only(n->h) == 1;
    default: return 0;
    }
}

int pydr_nbd_flush(pydr_nbd *n, pydr_error *error)
{
    if (nbd_can_flush(n->h) != 1)
        return 0;
    return nbd_flush(n->h, 0) == -1 ? nbd_failed(error, 0) : 0;
}

/* Collects the extents of one metadata context into a caller's buffer. */
typedef struct {
    const char *context;
    uint64_t *out;
    size_t cap, n;
    uint64_t end;   /* how far the extents reached */
    int full;
} extent_sink;

static int on_extents(void *user, const char *metacontext, uint64_t offset,
                      uint32_t *entries, size_t nr, int *error)
{
    (void)error;
    extent_sink *s = user;
    if (strcmp(metacontext, s->context) != 0)
        return 0;
    for (size_t i = 0; i + 1 < nr; i += 2) {
        if (s->n == s->cap) {
            s->full = 1;
            return 0;
        }
        s->out[3 * s->n] = offset;
        s->out[3 * s->n + 1] = entries[i];
        s->out[3 * s->n + 2] = entries[i + 1];
        s->n++;
        offset += entries[i];
        s->end = offset;
    }
    return 0;
}

int pydr_nbd_extents(pydr_nbd *n, int dirty_bitmap, const char *bitmap, uint64_t offset,
                     uint64_t length, uint64_t *out, size_t cap, size_t *count,
                     uint64_t *reached, pydr_error *error)
{
    char context[256];
    if (dirty_bitmap)
        snprintf(context, sizeof context, "qemu:dirty-bitmap:%s", bitmap ? bitmap : "");
    extent_sink s = {dirty_bitmap ? context : LIBNBD_CONTEXT_BASE_ALLOCATION, out, cap, 0,
                     offset, 0};
    uint64_t end = offset + length;
    *count = 0;
    while (s.end < end && !s.full) {
        uint64_t span = end - s.end < NBD_STATUS_SPAN ? end - s.end : NBD_STATUS_SPAN;
        uint64_t before = s.end;
        nbd_extent_callback cb = {.callback = on_extents, .user_data = &s};
        if (nbd_block_status(n->h, span, s.end, cb, 0) == -1)
            return nbd_failed_at(error, 0, s.end);
        if (s.end == before)  /* a server that answers nothing: do not spin */
            return nbd_refused_at(error, -EIO, s.end,
                                  "the NBD server answered block status with nothing");
    }
    if (s.end > end && s.n) {  /* the last extent may reach past the range */
        out[3 * (s.n - 1) + 1] -= s.end - end;
        s.end = end;
    }
    *count = s.n;
    *reached = s.end;
    return 0;
}

/* Marks the blocks of [start, end) that lie wholly in extents flagged HOLE
 * or ZERO: they are not read. */
static void zero_blocks_from(pydr_nbd *n, uint64_t start, uint64_t end, uint32_t bs,
                             uint8_t *skip, uint64_t *scratch, size_t cap, int *rc,
                             pydr_error *error)
{
    uint64_t pos = start;
    *rc = 0;
    while (pos < end) {
        size_t count;
        uint64_t reached;
        *rc = pydr_nbd_extents(n, 0, NULL, pos, end - pos, scratch, cap, &count, &reached,
                               error);
        if (*rc)
            return;
        for (size_t i = 0; i < count; i++) {
            uint64_t off = scratch[3 * i], len = scratch[3 * i + 1];
            if (!(scratch[3 * i + 2] & (LIBNBD_STATE_HOLE | LIBNBD_STATE_ZERO)))
                continue;
            uint64_t b0 = (off - start + bs - 1) / bs, b1 = (off + len - start) / bs;
            if (off + len >= end)  /* the short last block */
                b1 = (end - start + bs - 1) / bs;
            for (uint64_t b = b0; b < b1; b++)
                skip[b] = 1;
        }
        pos = reached;
    }
}

/* The first block of the requests still out, or `otherwise`. */
static uint64_t lowest_out(const int *busy, const uint64_t *first, uint64_t otherwise)
{
    for (int slot = 0; slot < NBD_IN_FLIGHT; slot++)
        if (busy[slot] && first[slot] < otherwise)
            otherwise = first[slot];
    return otherwise;
}

/* A request could not be made or waited for, at block `block` of the range:
 * a server that closed the connection (qemu-nbd does on a read error) is
 * -ENOTCONN, said so; anything else is libnbd's error. */
static int nbd_request_failed(pydr_nbd *n, pydr_error *error, uint64_t block, uint64_t offset,
                              uint32_t block_size)
{
    uint64_t at = offset + block * block_size;
    if (nbd_aio_is_dead(n->h) == 1 || nbd_aio_is_closed(n->h) == 1)
        return nbd_refused_at(error, -ENOTCONN, at,
                              "the NBD server closed the connection before this was read");
    return nbd_failed_at(error, 0, at);
}

/* The signer's work on an export (pydr_signer_sign checked the arguments). */
int pydr_nbd_sign(pydr_nbd *n, uint64_t offset, uint64_t length, uint32_t block_size,
                  int algorithm, uint64_t *hashes, uint8_t *zero_mask, size_t nblocks,
                  pydr_progress *progress, pydr_error *error)
{
    size_t words = (size_t)pydr_hash_words(algorithm);
    const pydr_kernel *k = pydr_kernel_get();
    size_t chunk = block_size > NBD_CHUNK ? block_size : NBD_CHUNK;
    if (!n->bufs || n->buf_size < chunk) {
        free(n->bufs);
        n->bufs = malloc(chunk * NBD_IN_FLIGHT);
        n->buf_size = n->bufs ? chunk : 0;
        if (!n->bufs)
            return pydr_fail_at(error, -ENOMEM, offset);
    }
    uint8_t *skip = calloc(nblocks ? nblocks : 1, 1);
    uint64_t *scratch = malloc(3 * 4096 * sizeof *scratch);
    uint8_t *zero_block = calloc(block_size, 1);
    int rc = (!skip || !scratch || !zero_block) ? pydr_fail_at(error, -ENOMEM, offset) : 0;
    uint64_t zero_hash[2];
    if (!rc) {
        k->hash(algorithm, zero_block, block_size, zero_hash);
        if (length >= NBD_STATUS_MIN)
            zero_blocks_from(n, offset, offset + length, block_size, skip, scratch, 4096, &rc,
                             error);
    }
    /* blocks to read, as runs of at most `chunk` bytes, several in flight */
    int64_t cookies[NBD_IN_FLIGHT];
    uint64_t first[NBD_IN_FLIGHT], bytes[NBD_IN_FLIGHT];
    int busy[NBD_IN_FLIGHT] = {0};
    size_t b = 0, in_flight = 0;
    uint64_t end = offset + length;
    while (!rc && (b < nblocks || in_flight)) {
        if (progress && __atomic_load_n(&progress->cancel, __ATOMIC_RELAXED)) {
            rc = pydr_fail_at(error, PYDR_E_CANCELLED, offset + (uint64_t)b * block_size);
            break;
        }
        /* skipped blocks: the hash of a zero block, never read */
        while (b < nblocks && skip[b]) {
            uint64_t pos = offset + (uint64_t)b * block_size;
            uint64_t len = end - pos < block_size ? end - pos : block_size;
            if (len == block_size)
                memcpy(hashes + (size_t)b * words, zero_hash, words * sizeof(uint64_t));
            else
                k->hash(algorithm, zero_block, (size_t)len, hashes + (size_t)b * words);
            zero_mask[b] = 1;
            if (progress)
                __atomic_fetch_add(&progress->done, len, __ATOMIC_RELAXED);
            b++;
        }
        /* fill the free slots with reads of the next data blocks */
        for (int slot = 0; slot < NBD_IN_FLIGHT && b < nblocks && !skip[b]; slot++) {
            if (busy[slot])
                continue;
            size_t count = 0;
            while (b + count < nblocks && !skip[b + count] &&
                   (count + 1) * (uint64_t)block_size <= chunk)
                count++;
            uint64_t pos = offset + (uint64_t)b * block_size;
            uint64_t len = (uint64_t)count * block_size;
            if (pos + len > end)
                len = end - pos;
            cookies[slot] = nbd_aio_pread(n->h, n->bufs + (size_t)slot * n->buf_size,
                                          (size_t)len, pos, NBD_NULL_COMPLETION, 0);
            if (cookies[slot] == -1) {
                rc = nbd_request_failed(n, error, lowest_out(busy, first, b), offset,
                                        block_size);
                break;
            }
            first[slot] = b;
            bytes[slot] = len;
            busy[slot] = 1;
            in_flight++;
            b += count;
        }
        if (rc || !in_flight)
            continue;
        /* A server may drop the connection on a read error (qemu-nbd does):
         * poll then fails and libnbd ends every request in flight. Report the
         * first failed request (its errno, its offset), else poll's failure
         * at the first request still out. */
        int polled = nbd_poll(n->h, -1);
        uint64_t failed_first = UINT64_MAX, out_first = b;
        for (int slot = 0; slot < NBD_IN_FLIGHT; slot++) {
            if (!busy[slot])
                continue;
            int done = nbd_aio_command_completed(n->h, (uint64_t)cookies[slot]);
            if (done == 0) {
                out_first = first[slot] < out_first ? first[slot] : out_first;
                continue;
            }
            busy[slot] = 0;
            in_flight--;
            if (done == -1) {
                if (first[slot] < failed_first) {
                    failed_first = first[slot];
                    rc = nbd_failed_at(error, 0, offset + first[slot] * block_size);
                }
                continue;
            }
            if (rc)
                continue;
            k->hash_blocks(n->bufs + (size_t)slot * n->buf_size, (size_t)bytes[slot],
                           block_size, algorithm, zero_hash,
                           hashes + (size_t)first[slot] * words, zero_mask + first[slot]);
            if (progress) {
                __atomic_fetch_add(&progress->done, bytes[slot], __ATOMIC_RELAXED);
                __atomic_fetch_add(&progress->read, bytes[slot], __ATOMIC_RELAXED);
            }
        }
        if (polled == -1 && !rc)
            rc = nbd_request_failed(n, error, out_first, offset, block_size);
    }
    /* requests still out after an error: let them finish into our buffers */
    while (in_flight) {
        if (nbd_poll(n->h, -1) == -1)
            break;
        for (int slot = 0; slot < NBD_IN_FLIGHT; slot++)
            if (busy[slot] && nbd_aio_command_completed(n->h, (uint64_t)cookies[slot]) != 0) {
                busy[slot] = 0;
                in_flight--;
            }
    }
    free(skip);
    free(scratch);
    free(zero_block);
    return rc;
}

#else /* built without libnbd: NBD disks are refused with a clear error */

struct pydr_nbd {
    int unused;
};

int pydr_nbd_available(void) { return 0; }

int pydr_nbd_connect(pydr_device *d, const char *uri, const char *bitmap, unsigned flags,
                     pydr_error *error)
{
    (void)d; (void)uri; (void)bitmap; (void)flags;
    pydr_fail(error, PYDR_E_NO_NBD);
    snprintf(error->detail, sizeof error->detail, "%s", pydr_strerror(PYDR_E_NO_NBD));
    return PYDR_E_NO_NBD;
}

/* Never called: without libnbd no device has an NBD connection. */
void pydr_nbd_close(pydr_nbd *n) { (void)n; }

int pydr_nbd_size(pydr_nbd *n, uint64_t *size, pydr_error *error)
{
    (void)n; (void)size;
    return pydr_fail(error, PYDR_E_NO_NBD);
}

int pydr_nbd_can(pydr_nbd *n, int what) { (void)n; (void)what; return 0; }

int pydr_nbd_flush(pydr_nbd *n, pydr_error *error)
{
    (void)n;
    return pydr_fail(error, PYDR_E_NO_NBD);
}

int pydr_nbd_extents(pydr_nbd *n, int dirty_bitmap, const char *bitmap, uint64_t offset,
                     uint64_t length, uint64_t *out, size_t cap, size_t *count,
                     uint64_t *reached, pydr_error *error)
{
    (void)n; (void)dirty_bitmap; (void)bitmap; (void)offset; (void)length; (void)out;
    (void)cap; (void)count; (void)reached;
    return pydr_fail(error, PYDR_E_NO_NBD);
}

int pydr_nbd_sign(pydr_nbd *n, uint64_t offset, uint64_t length, uint32_t block_size,
                  int algorithm, uint64_t *hashes, uint8_t *zero_mask, size_t nblocks,
                  pydr_progress *progress, pydr_error *error)
{
    (void)n; (void)offset; (void)length; (void)block_size; (void)algorithm; (void)hashes;
    (void)zero_mask; (void)nblocks; (void)progress;
    return pydr_fail(error, PYDR_E_NO_NBD);
}

#endif
