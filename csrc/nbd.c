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
#define NBD_IN_FLIGHT_KEEP 32     /* the same, reading straight into a keep  */
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
 * or ZERO in skip (indexed in blocks from `base`): they are not read. */
static void zero_blocks_from(pydr_nbd *n, uint64_t base, uint64_t start, uint64_t end,
                             uint32_t bs, uint8_t *skip, uint64_t *scratch, size_t cap,
                             int *rc, pydr_error *error)
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
            uint64_t b0 = (off - base + bs - 1) / bs, b1 = (off + len - base) / bs;
            if (off + len >= end)  /* the short last block */
                b1 = (end - base + bs - 1) / bs;
            for (uint64_t b = b0; b < b1; b++)
                skip[b] = 1;
        }
        pos = reached;
    }
}

/* A read request in flight: where it reads, into what. */
typedef struct {
    int64_t cookie;
    uint64_t pos, len;
    uint8_t *dst;
    int busy;
} nbd_read_slot;

/* The lowest offset of the requests still out, or `otherwise`. */
static uint64_t lowest_out(const nbd_read_slot *slots, int nslots, uint64_t otherwise)
{
    for (int i = 0; i < nslots; i++)
        if (slots[i].busy && slots[i].pos < otherwise)
            otherwise = slots[i].pos;
    return otherwise;
}

/* A request could not be made or waited for, at device offset `at`: a
 * server that closed the connection (qemu-nbd does on a read error) is
 * -ENOTCONN, said so; anything else is libnbd's error. */
static int nbd_request_failed(pydr_nbd *n, pydr_error *error, uint64_t at)
{
    if (nbd_aio_is_dead(n->h) == 1 || nbd_aio_is_closed(n->h) == 1)
        return nbd_refused_at(error, -ENOTCONN, at,
                              "the NBD server closed the connection before this was read");
    return nbd_failed_at(error, 0, at);
}

/* A read request [pos, pos + len) failed: while the connection stands, read
 * it again block by block so that the error names the first block that
 * fails, not the start of the request. Returns the error code. */
static int locate_read_error(pydr_nbd *n, uint8_t *dst, uint64_t pos, uint64_t len,
                             uint32_t block_size, pydr_error *error)
{
    int rc = nbd_failed_at(error, 0, pos);
    if (nbd_aio_is_ready(n->h) != 1)
        return rc;
    for (uint64_t at = 0; at < len; at += block_size) {
        size_t m = len - at < block_size ? (size_t)(len - at) : block_size;
        if (nbd_pread(n->h, dst + at, m, pos + at, 0) == -1)
            return nbd_failed_at(error, 0, pos + at);
    }
    return rc;  /* it reads now: report the request as it failed */
}

/* Where the next read starts: the spans of a window, walked in order. */
typedef struct {
    const uint64_t *spans;
    size_t nspans, span;
    uint64_t pos;         /* the next byte to cover in spans[span]        */
} span_cursor;

static uint64_t span_end(const span_cursor *c)
{
    return c->spans[2 * c->span] + c->spans[2 * c->span + 1];
}

/* Moves the cursor past finished spans and skipped blocks (their hash is
 * that of a zero block, never read). Returns 1 when a block to read lies at
 * c->pos, 0 when all spans are covered. */
static int next_read(span_cursor *c, uint64_t offset, uint32_t bs, int algorithm,
                     const uint8_t *skip, const uint64_t zero_hash[2],
                     const uint8_t *zero_block, uint64_t *hashes, uint8_t *zero_mask,
                     pydr_progress *progress)
{
    const pydr_kernel *k = pydr_kernel_get();
    size_t words = (size_t)pydr_hash_words(algorithm);
    while (c->span < c->nspans) {
        uint64_t end = span_end(c);
        if (c->pos >= end) {
            if (++c->span < c->nspans)
                c->pos = c->spans[2 * c->span];
            continue;
        }
        size_t b = (size_t)((c->pos - offset) / bs);
        if (!skip[b])
            return 1;
        uint64_t len = end - c->pos < bs ? end - c->pos : bs;
        if (len == bs)
            memcpy(hashes + b * words, zero_hash, words * sizeof(uint64_t));
        else
            k->hash(algorithm, zero_block, (size_t)len, hashes + b * words);
        zero_mask[b] = 1;
        if (progress)
            __atomic_fetch_add(&progress->done, len, __ATOMIC_RELAXED);
        c->pos += len;
    }
    return 0;
}

/* The signer's work on an export (pydr_signer_sign_spans checked the
 * arguments): the data blocks of all spans are read as runs of at most a
 * chunk, many in flight at once (across spans, not one span at a time),
 * straight into keep when there is one, else into the connection's buffers;
 * each is hashed as it arrives. */
int pydr_nbd_sign_spans(pydr_nbd *n, uint64_t offset, size_t nblocks, const uint64_t *spans,
                        size_t nspans, uint32_t block_size, int algorithm, uint64_t *hashes,
                        uint8_t *zero_mask, uint8_t *keep, pydr_progress *progress,
                        pydr_error *error)
{
    size_t words = (size_t)pydr_hash_words(algorithm);
    const pydr_kernel *k = pydr_kernel_get();
    size_t chunk = block_size > NBD_CHUNK ? block_size : NBD_CHUNK;
    /* into keep: no buffer bounds the requests, so more are in flight (many
     * short dirty runs cost round trips, not bandwidth) */
    const int nslots = keep ? NBD_IN_FLIGHT_KEEP : NBD_IN_FLIGHT;
    if (!keep && (!n->bufs || n->buf_size < chunk)) {
        free(n->bufs);
        n->bufs = malloc(chunk * NBD_IN_FLIGHT);
        n->buf_size = n->bufs ? chunk : 0;
        if (!n->bufs)
            return pydr_fail_at(error, -ENOMEM, offset);
    }
    uint8_t *skip = calloc(nblocks ? nblocks : 1, 1);
    uint64_t *scratch = malloc(3 * 4096 * sizeof *scratch);
    uint8_t *zero_block = calloc(block_size, 1);
    nbd_read_slot *slots = calloc((size_t)nslots, sizeof *slots);
    int rc = (!skip || !scratch || !zero_block || !slots)
                 ? pydr_fail_at(error, -ENOMEM, offset) : 0;
    uint64_t zero_hash[2];
    uint64_t first = spans[0], last = spans[2 * (nspans - 1)] + spans[2 * (nspans - 1) + 1];
    uint64_t wanted = 0;
    for (size_t i = 0; i < nspans; i++)
        wanted += spans[2 * i + 1];
    if (!rc) {
        k->hash(algorithm, zero_block, block_size, zero_hash);
        /* one block status walk over all the spans, when they are worth it */
        if (wanted >= NBD_STATUS_MIN)
            zero_blocks_from(n, offset, first, last, block_size, skip, scratch, 4096, &rc,
                             error);
    }
    span_cursor c = {spans, nspans, 0, first};
    int in_flight = 0, more = 1;
    while (!rc && (more || in_flight)) {
        if (progress && __atomic_load_n(&progress->cancel, __ATOMIC_RELAXED)) {
            rc = pydr_fail_at(error, PYDR_E_CANCELLED, lowest_out(slots, nslots, c.pos));
            break;
        }
        /* fill the free slots with reads of the next data blocks */
        for (int i = 0; i < nslots && !rc; i++) {
            if (slots[i].busy)
                continue;
            more = next_read(&c, offset, block_size, algorithm, skip, zero_hash, zero_block,
                             hashes, zero_mask, progress);
            if (!more)
                break;
            uint64_t end = span_end(&c), len = 0;
            while (c.pos + len < end && len + block_size <= chunk &&
                   !skip[(c.pos + len - offset) / block_size])
                len += block_size;
            if (c.pos + len > end)
                len = end - c.pos;
            uint8_t *dst = keep ? keep + (c.pos - offset) : n->bufs + (size_t)i * n->buf_size;
            slots[i].cookie = nbd_aio_pread(n->h, dst, (size_t)len, c.pos,
                                            NBD_NULL_COMPLETION, 0);
            if (slots[i].cookie == -1) {
                rc = nbd_request_failed(n, error, lowest_out(slots, nslots, c.pos));
                break;
            }
            slots[i] = (nbd_read_slot){slots[i].cookie, c.pos, len, dst, 1};
            in_flight++;
            c.pos += len;
        }
        if (rc || !in_flight)
            continue;
        /* A server may drop the connection on a read error (qemu-nbd does):
         * poll then fails and libnbd ends every request in flight. Report the
         * first failed request (its errno, its first failing block), else
         * poll's failure at the first request still out. */
        int polled = nbd_poll(n->h, -1);
        uint64_t failed_at = UINT64_MAX, out_at = more ? c.pos : UINT64_MAX;
        for (int i = 0; i < nslots; i++) {
            nbd_read_slot *r = &slots[i];
            if (!r->busy)
                continue;
            int done = nbd_aio_command_completed(n->h, (uint64_t)r->cookie);
            if (done == 0) {
                out_at = r->pos < out_at ? r->pos : out_at;
                continue;
            }
            r->busy = 0;
            in_flight--;
            if (done == -1) {
                if (r->pos < failed_at) {
                    failed_at = r->pos;
                    rc = locate_read_error(n, r->dst, r->pos, r->len, block_size, error);
                }
                continue;
            }
            if (rc)
                continue;
            size_t b = (size_t)((r->pos - offset) / block_size);
            k->hash_blocks(r->dst, (size_t)r->len, block_size, algorithm, zero_hash,
                           hashes + b * words, zero_mask + b);
            if (progress) {
                __atomic_fetch_add(&progress->done, r->len, __ATOMIC_RELAXED);
                __atomic_fetch_add(&progress->read, r->len, __ATOMIC_RELAXED);
            }
        }
        if (polled == -1 && !rc)
            rc = nbd_request_failed(n, error, out_at == UINT64_MAX ? c.pos : out_at);
    }
    /* requests still out after an error: let them finish into our buffers */
    while (in_flight) {
        if (nbd_poll(n->h, -1) == -1)
            break;
        for (int i = 0; i < nslots; i++)
            if (slots[i].busy &&
                nbd_aio_command_completed(n->h, (uint64_t)slots[i].cookie) != 0) {
                slots[i].busy = 0;
                in_flight--;
            }
    }
    free(skip);
    free(scratch);
    free(zero_block);
    free(slots);
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

int pydr_nbd_sign_spans(pydr_nbd *n, uint64_t offset, size_t nblocks, const uint64_t *spans,
                        size_t nspans, uint32_t block_size, int algorithm, uint64_t *hashes,
                        uint8_t *zero_mask, uint8_t *keep, pydr_progress *progress,
                        pydr_error *error)
{
    (void)n; (void)offset; (void)nblocks; (void)spans; (void)nspans; (void)block_size;
    (void)algorithm; (void)hashes; (void)zero_mask; (void)keep; (void)progress;
    return pydr_fail(error, PYDR_E_NO_NBD);
}

#endif
