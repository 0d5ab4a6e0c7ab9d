/*
 * nbd.c -- disks behind an NBD server (qemu-nbd, qemu-storage-daemon, a
 * running QEMU), through libnbd: one connection per handle.
 *
 * Signing asks the server which ranges are holes or read as zeros
 * (base:allocation block status) and does not read them; the data is read
 * with several requests in flight and hashed as it arrives, by the same
 * kernels as files. Changed-block tracking reads a QEMU dirty bitmap the
 * same way (qemu:dirty-bitmap:NAME). Records are encoded from, and applied
 * to, an export through the delta code's device interface (dev.h).
 *
 * Built without libnbd (PYDR_HAVE_LIBNBD undefined), every function returns
 * PYDR_E_NO_NBD.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dev.h"
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
    pydr_dev dev;
    int has_bitmap;
    uint8_t *bufs;   /* NBD_IN_FLIGHT chunk buffers, made on first use */
    size_t buf_size;
};

static __thread char last_error[512];

static int fail(int err)
{
    const char *msg = nbd_get_error();
    snprintf(last_error, sizeof last_error, "%s", msg ? msg : "NBD request failed");
    if (err == 0)
        err = nbd_get_errno();
    return err > 0 ? -err : -EIO;
}

const char *pydr_nbd_last_error(void)
{
    return last_error;
}

int pydr_nbd_available(void)
{
    return 1;
}

static int nbd_dev_read(const pydr_dev *d, void *dst, size_t len, uint64_t off,
                        uint64_t *error_offset)
{
    struct nbd_handle *h = d->nbd;
    size_t got = 0;
    while (got < len) {  /* requests bounded like the server's maximum */
        size_t n = len - got < NBD_CHUNK * 8 ? len - got : NBD_CHUNK * 8;
        if (nbd_pread(h, (uint8_t *)dst + got, n, off + got, 0) == -1) {
            *error_offset = off + got;
            return fail(0);
        }
        got += n;
    }
    return 0;
}

static int nbd_dev_write(const pydr_dev *d, const void *src, size_t len, uint64_t off,
                         uint64_t *error_offset)
{
    struct nbd_handle *h = d->nbd;
    size_t put = 0;
    while (put < len) {
        size_t n = len - put < NBD_CHUNK * 8 ? len - put : NBD_CHUNK * 8;
        if (nbd_pwrite(h, (const uint8_t *)src + put, n, off + put, 0) == -1) {
            *error_offset = off + put;
            return fail(0);
        }
        put += n;
    }
    return 0;
}

static int nbd_dev_zero(const pydr_dev *d, uint64_t off, uint64_t len, uint64_t *error_offset)
{
    static const uint8_t zeros[1 << 16];
    struct nbd_handle *h = d->nbd;
    while (len) {
        uint64_t n = len < (1u << 30) ? len : (1u << 30);
        if (nbd_can_zero(h) == 1) {
            if (nbd_zero(h, n, off, 0) == -1) {
                *error_offset = off;
                return fail(0);
            }
        } else {  /* a server without WRITE_ZEROES: write them */
            for (uint64_t done = 0; done < n;) {
                size_t m = n - done < sizeof zeros ? (size_t)(n - done) : sizeof zeros;
                if (nbd_pwrite(h, zeros, m, off + done, 0) == -1) {
                    *error_offset = off + done;
                    return fail(0);
                }
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
static int connect_extra(struct nbd_handle *h, const char *uri)
{
    if (nbd_aio_connect_uri(h, uri) == -1)
        return fail(ECONNREFUSED);
    int idle_ms = 0;
    while (nbd_aio_is_connecting(h) == 1) {
        int r = nbd_poll(h, 100);
        if (r == -1)
            return fail(ECONNREFUSED);
        if (r == 0 && (idle_ms += 100) >= PYDR_NBD_EXTRA_WAIT_MS) {
            snprintf(last_error, sizeof last_error, "the NBD server takes no more clients");
            return -EAGAIN;
        }
    }
    if (nbd_aio_is_ready(h) != 1)
        return fail(ECONNREFUSED);
    return 0;
}

int pydr_nbd_open(pydr_nbd **out, const char *uri, const char *bitmap, unsigned flags)
{
    *out = NULL;
    last_error[0] = 0;
    pydr_nbd *n = calloc(1, sizeof *n);
    if (!n)
        return -ENOMEM;
    n->h = nbd_create();
    if (!n->h) {
        free(n);
        return fail(ENOMEM);
    }
    char context[256];
    int rc = 0;
    if (nbd_add_meta_context(n->h, LIBNBD_CONTEXT_BASE_ALLOCATION) == -1)
        rc = fail(0);
    if (!rc && bitmap) {
        snprintf(context, sizeof context, "qemu:dirty-bitmap:%s", bitmap);
        if (nbd_add_meta_context(n->h, context) == -1)
            rc = fail(0);
    }
    if (!rc && !(flags & PYDR_NBD_EXTRA) && nbd_connect_uri(n->h, uri) == -1)
        rc = fail(ECONNREFUSED);
    if (!rc && (flags & PYDR_NBD_EXTRA))
        rc = connect_extra(n->h, uri);
    if (!rc && (flags & PYDR_NBD_WRITE) && nbd_is_read_only(n->h) == 1) {
        snprintf(last_error, sizeof last_error, "the NBD export is read-only");
        rc = -EROFS;
    }
    if (!rc && bitmap) {
        n->has_bitmap = nbd_can_meta_context(n->h, context) == 1;
        if (!n->has_bitmap) {
            snprintf(last_error, sizeof last_error,
                     "the NBD server does not export the dirty bitmap %s", bitmap);
            rc = PYDR_E_NO_BITMAP;
        }
    }
    if (rc) {
        nbd_close(n->h);
        free(n);
        return rc;
    }
    n->dev.read = nbd_dev_read;
    n->dev.write = nbd_dev_write;
    n->dev.zero = nbd_dev_zero;
    n->dev.fd = -1;
    n->dev.is_block_device = 1; /* an export cannot be resized */
    n->dev.nbd = n->h;
    *out = n;
    return 0;
}

void pydr_nbd_free(pydr_nbd *n)
{
    if (!n)
        return;
    nbd_shutdown(n->h, 0);
    nbd_close(n->h);
    free(n->bufs);
    free(n);
}

int pydr_nbd_size(pydr_nbd *n, uint64_t *size)
{
    int64_t s = nbd_get_size(n->h);
    if (s < 0)
        return fail(0);
    *size = (uint64_t)s;
    return 0;
}

int pydr_nbd_can(pydr_nbd *n, int what)
{
    switch (what) {
    case PYDR_NBD_CAN_FLUSH: return nbd_can_flush(n->h) == 1;
    case PYDR_NBD_CAN_ZERO: return nbd_can_zero(n->h) == 1;
    case PYDR_NBD_CAN_MULTI_CONN: return nbd_can_multi_conn(n->h) == 1;
    case PYDR_NBD_READ_ONLY: return nbd_is_read_only(n->h) == 1;
    default: return 0;
    }
}

int pydr_nbd_flush(pydr_nbd *n)
{
    if (nbd_can_flush(n->h) != 1)
        return 0;
    return nbd_flush(n->h, 0) == -1 ? fail(0) : 0;
}

int pydr_nbd_pread(pydr_nbd *n, void *buf, size_t len, uint64_t off, uint64_t *error_offset)
{
    return nbd_dev_read(&n->dev, buf, len, off, error_offset);
}

int pydr_nbd_pwrite(pydr_nbd *n, const void *buf, size_t len, uint64_t off,
                    uint64_t *error_offset)
{
    return nbd_dev_write(&n->dev, buf, len, off, error_offset);
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
                     uint64_t *reached)
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
            return fail(0);
        if (s.end == before)  /* a server that answers nothing: do not spin */
            return -EIO;
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
                             uint8_t *skip, uint64_t *scratch, size_t cap, int *rc)
{
    uint64_t pos = start;
    *rc = 0;
    while (pos < end) {
        size_t count;
        uint64_t reached;
        *rc = pydr_nbd_extents(n, 0, NULL, pos, end - pos, scratch, cap, &count, &reached);
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

int pydr_nbd_sign(pydr_nbd *n, uint64_t offset, uint64_t length, uint32_t block_size,
                  int algorithm, uint64_t *hashes, uint8_t *zero_mask, size_t nblocks,
                  pydr_progress *progress, uint64_t *error_offset)
{
    *error_offset = offset;
    unsigned words = pydr_hash_words(algorithm);
    if (!words || block_size < PYDR_BLOCK_MIN || block_size > PYDR_BLOCK_MAX ||
        (block_size & (block_size - 1)) || offset % block_size ||
        nblocks != (length + block_size - 1) / block_size)
        return -EINVAL;
    const pydr_kernel *k = pydr_kernel_get();
    size_t chunk = block_size > NBD_CHUNK ? block_size : NBD_CHUNK;
    if (!n->bufs || n->buf_size < chunk) {
        free(n->bufs);
        n->bufs = malloc(chunk * NBD_IN_FLIGHT);
        n->buf_size = n->bufs ? chunk : 0;
        if (!n->bufs)
            return -ENOMEM;
    }
    uint8_t *skip = calloc(nblocks ? nblocks : 1, 1);
    uint64_t *scratch = malloc(3 * 4096 * sizeof *scratch);
    uint8_t *zero_block = calloc(block_size, 1);
    int rc = (!skip || !scratch || !zero_block) ? -ENOMEM : 0;
    uint64_t zero_hash[2];
    if (!rc) {
        k->hash(algorithm, zero_block, block_size, zero_hash);
        if (length >= NBD_STATUS_MIN)
            zero_blocks_from(n, offset, offset + length, block_size, skip, scratch, 4096, &rc);
    }
    /* blocks to read, as runs of at most `chunk` bytes, several in flight */
    int64_t cookies[NBD_IN_FLIGHT];
    uint64_t first[NBD_IN_FLIGHT], bytes[NBD_IN_FLIGHT];
    int busy[NBD_IN_FLIGHT] = {0};
    size_t b = 0, in_flight = 0;
    uint64_t end = offset + length;
    while (!rc && (b < nblocks || in_flight)) {
        if (progress && __atomic_load_n(&progress->cancel, __ATOMIC_RELAXED)) {
            rc = PYDR_E_CANCELLED;
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
                *error_offset = pos;
                rc = fail(0);
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
        if (nbd_poll(n->h, -1) == -1) {
            rc = fail(0);
            break;
        }
        for (int slot = 0; slot < NBD_IN_FLIGHT; slot++) {
            if (!busy[slot])
                continue;
            int done = nbd_aio_command_completed(n->h, (uint64_t)cookies[slot]);
            if (done == 0)
                continue;
            busy[slot] = 0;
            in_flight--;
            if (done == -1) {
                *error_offset = offset + first[slot] * block_size;
                rc = fail(0);
                break;
            }
            k->hash_blocks(n->bufs + (size_t)slot * n->buf_size, (size_t)bytes[slot],
                           block_size, algorithm, zero_hash,
                           hashes + (size_t)first[slot] * words, zero_mask + first[slot]);
            if (progress) {
                __atomic_fetch_add(&progress->done, bytes[slot], __ATOMIC_RELAXED);
                __atomic_fetch_add(&progress->read, bytes[slot], __ATOMIC_RELAXED);
            }
        }
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

int pydr_nbd_encode(pydr_nbd *n, const uint64_t *extents, const uint8_t *zero,
                    const uint64_t *base_hashes, size_t count, uint64_t first_seq,
                    uint8_t *out, size_t cap, size_t *used, size_t *done,
                    uint32_t block_size, uint64_t *payload_hashes, size_t payload_hashes_cap,
                    size_t *payload_hashes_used, uint64_t *error_offset)
{
    return pydr_encode_dev(&n->dev, extents, zero, base_hashes, count, first_seq, out, cap,
                           used, done, block_size, payload_hashes, payload_hashes_cap,
                           payload_hashes_used, error_offset);
}

int pydr_nbd_apply_prepare(pydr_nbd *n, const uint8_t *recs, size_t len, uint32_t block_size,
                           uint64_t old_size, uint64_t new_size, pydr_apply_state *state,
                           uint8_t *scratch, size_t scratch_cap, uint8_t *journal,
                           size_t journal_cap, size_t *journal_used)
{
    return pydr_apply_prepare_dev(&n->dev, recs, len, block_size, old_size, new_size, state,
                                  scratch, scratch_cap, journal, journal_cap, journal_used);
}

int pydr_nbd_apply_write(pydr_nbd *n, const uint8_t *recs, size_t len, uint64_t *error_offset)
{
    return pydr_apply_write_dev(&n->dev, recs, len, error_offset);
}

#else /* built without libnbd: NBD disks are refused with a clear error */

struct pydr_nbd {
    int unused;
};

const char *pydr_nbd_last_error(void)
{
    return "pydr was built without libnbd: install libnbd-dev (Debian) and rebuild pydr";
}

int pydr_nbd_available(void) { return 0; }

int pydr_nbd_open(pydr_nbd **out, const char *uri, const char *bitmap, unsigned flags)
{
    (void)uri; (void)bitmap; (void)flags;
    *out = NULL;
    return PYDR_E_NO_NBD;
}

void pydr_nbd_free(pydr_nbd *n) { (void)n; }
int pydr_nbd_size(pydr_nbd *n, uint64_t *size) { (void)n; (void)size; return PYDR_E_NO_NBD; }
int pydr_nbd_can(pydr_nbd *n, int what) { (void)n; (void)what; return 0; }
int pydr_nbd_flush(pydr_nbd *n) { (void)n; return PYDR_E_NO_NBD; }

int pydr_nbd_pread(pydr_nbd *n, void *buf, size_t len, uint64_t off, uint64_t *error_offset)
{
    (void)n; (void)buf; (void)len; (void)off; (void)error_offset;
    return PYDR_E_NO_NBD;
}

int pydr_nbd_pwrite(pydr_nbd *n, const void *buf, size_t len, uint64_t off,
                    uint64_t *error_offset)
{
    (void)n; (void)buf; (void)len; (void)off; (void)error_offset;
    return PYDR_E_NO_NBD;
}

int pydr_nbd_extents(pydr_nbd *n, int dirty_bitmap, const char *bitmap, uint64_t offset,
                     uint64_t length, uint64_t *out, size_t cap, size_t *count,
                     uint64_t *reached)
{
    (void)n; (void)dirty_bitmap; (void)bitmap; (void)offset; (void)length; (void)out;
    (void)cap; (void)count; (void)reached;
    return PYDR_E_NO_NBD;
}

int pydr_nbd_sign(pydr_nbd *n, uint64_t offset, uint64_t length, uint32_t block_size,
                  int algorithm, uint64_t *hashes, uint8_t *zero_mask, size_t nblocks,
                  pydr_progress *progress, uint64_t *error_offset)
{
    (void)n; (void)offset; (void)length; (void)block_size; (void)algorithm; (void)hashes;
    (void)zero_mask; (void)nblocks; (void)progress; (void)error_offset;
    return PYDR_E_NO_NBD;
}

int pydr_nbd_encode(pydr_nbd *n, const uint64_t *extents, const uint8_t *zero,
                    const uint64_t *base_hashes, size_t count, uint64_t first_seq,
                    uint8_t *out, size_t cap, size_t *used, size_t *done,
                    uint32_t block_size, uint64_t *payload_hashes, size_t payload_hashes_cap,
                    size_t *payload_hashes_used, uint64_t *error_offset)
{
    (void)n; (void)extents; (void)zero; (void)base_hashes; (void)count; (void)first_seq;
    (void)out; (void)cap; (void)used; (void)done; (void)block_size; (void)payload_hashes;
    (void)payload_hashes_cap; (void)payload_hashes_used; (void)error_offset;
    return PYDR_E_NO_NBD;
}

int pydr_nbd_apply_prepare(pydr_nbd *n, const uint8_t *recs, size_t len, uint32_t block_size,
                           uint64_t old_size, uint64_t new_size, pydr_apply_state *state,
                           uint8_t *scratch, size_t scratch_cap, uint8_t *journal,
                           size_t journal_cap, size_t *journal_used)
{
    (void)n; (void)recs; (void)len; (void)block_size; (void)old_size; (void)new_size;
    (void)state; (void)scratch; (void)scratch_cap; (void)journal; (void)journal_cap;
    (void)journal_used;
    return PYDR_E_NO_NBD;
}

int pydr_nbd_apply_write(pydr_nbd *n, const uint8_t *recs, size_t len, uint64_t *error_offset)
{
    (void)n; (void)recs; (void)len; (void)error_offset;
    return PYDR_E_NO_NBD;
}

#endif
