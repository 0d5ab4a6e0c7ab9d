/* delta.c -- delta records (docs/FORMAT.md): build, parse, encode from a
 * source file, verify-and-journal before apply, write to a target.
 *
 * A record is a 64-byte little-endian header, followed for DATA records by
 * `length` bytes of payload. Undo journals use the same records (their
 * payload is the old content), so apply and rollback share one writer. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define XXH_INLINE_ALL
#define XXH_STATIC_LINKING_ONLY
#include <xxhash.h>

#include "dev.h"
#include "fail.h"
#include "kernel.h"
#include "pydr.h"

static inline void put64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static inline void put32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static inline uint64_t get64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static inline uint32_t get32(const uint8_t *p)
{
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

/* One-shot hashes go through the kernel chosen for this CPU (AVX2 where
 * there is one); only the small streaming digests below use xxHash's state
 * directly. */
static uint64_t hash64(const void *data, size_t size)
{
    uint64_t h;
    pydr_kernel_get()->hash(PYDR_XXH3_64, data, size, &h);
    return h;
}

void pydr_record_build(uint8_t *out, const pydr_record *r)
{
    put32(out + 0, r->type);
    put32(out + 4, 0);
    put64(out + 8, r->offset);
    put64(out + 16, r->length);
    put64(out + 24, r->base_hash[0]);
    put64(out + 32, r->base_hash[1]);
    put64(out + 40, r->payload_hash);
    put64(out + 48, r->seq);
    put64(out + 56, hash64(out, 56));
}

int pydr_record_parse(const uint8_t *in, pydr_record *r)
{
    if (get64(in + 56) != hash64(in, 56))
        return PYDR_E_CORRUPT;
    r->type = get32(in + 0);
    if (get32(in + 4) != 0 || r->type < PYDR_RECORD_DATA || r->type > PYDR_RECORD_COMMIT)
        return PYDR_E_CORRUPT;
    r->offset = get64(in + 8);
    r->length = get64(in + 16);
    r->base_hash[0] = get64(in + 24);
    r->base_hash[1] = get64(in + 32);
    r->payload_hash = get64(in + 40);
    r->seq = get64(in + 48);
    if (r->type != PYDR_RECORD_END && r->type != PYDR_RECORD_COMMIT &&
        (r->length > PYDR_RECORD_MAX || r->offset > (uint64_t)INT64_MAX - r->length))
        return PYDR_E_CORRUPT;
    return 0;
}

static size_t record_size(const pydr_record *r)
{
    return PYDR_RECORD_HEADER + (r->type == PYDR_RECORD_DATA ? (size_t)r->length : 0);
}

int pydr_records_scan(const uint8_t *buf, size_t len, pydr_scan *scan, pydr_error *error)
{
    PYDR_ERROR_OR_LOCAL(error);
    size_t pos = 0;
    memset(scan, 0, sizeof *scan);
    while (len - pos >= PYDR_RECORD_HEADER) {
        pydr_record r;
        if (pydr_record_parse(buf + pos, &r) != 0)
            return pydr_fail_at(error, PYDR_E_CORRUPT, pos);
        size_t size = record_size(&r);
        if (len - pos < size)
            break; /* payload not all here yet */
        pos += size;
        scan->records++;
        if (r.type == PYDR_RECORD_DATA || r.type == PYDR_RECORD_ZERO)
            scan->journal_bound += PYDR_RECORD_HEADER + r.length;
        if (r.type == PYDR_RECORD_END || r.type == PYDR_RECORD_COMMIT) {
            scan->end = 1;
            break;
        }
    }
    scan->complete = pos;
    return 0;
}

/* A digest of a sequence of block hashes, each fed as 16 bytes: low64 then
 * high64, little-endian (the bytes a signature file stores). */
static void digest_begin(XXH3_state_t *state)
{
    XXH3_INITSTATE(state);
    XXH3_128bits_reset(state);
}

static void digest_pair(XXH3_state_t *state, uint64_t low, uint64_t high)
{
    uint8_t le[16];
    put64(le, low);
    put64(le + 8, high);
    XXH3_128bits_update(state, le, 16);
}

static void digest_end(XXH3_state_t *state, uint64_t out[2])
{
    XXH128_hash_t d = XXH3_128bits_digest(state);
    out[0] = d.low64;
    out[1] = d.high64;
}

/* Digest of the per-block XXH3-128 hashes of data[0, len), blocks relative
 * to data (which starts on a block boundary). */
static void blocks_digest(const uint8_t *data, size_t len, uint32_t block_size,
                          uint64_t out[2])
{
    const pydr_kernel *k = pydr_kernel_get();
    XXH3_state_t state;
    digest_begin(&state);
    for (size_t pos = 0; pos < len; pos += block_size) {
        uint64_t h[2];
        k->hash(PYDR_XXH3_128, data + pos, len - pos < block_size ? len - pos : block_size, h);
        digest_pair(&state, h[0], h[1]);
    }
    digest_end(&state, out);
}

void pydr_blocks_digest(const void *data, size_t len, uint32_t block_size,
                        uint64_t out[2])
{
    blocks_digest(data, len, block_size, out);
}

void pydr_hashes_digest_ranges(const uint64_t *hashes, size_t nblocks,
                               uint32_t block_size, const uint64_t *extents,
                               size_t n, uint64_t *out)
{
    for (size_t i = 0; i < n; i++) {
        uint64_t first = extents[2 * i] / block_size;
        uint64_t end = (extents[2 * i] + extents[2 * i + 1] + block_size - 1) / block_size;
        if (first > nblocks)
            first = nblocks;
        if (end > nblocks)
            end = nblocks;
        XXH3_state_t state;
        digest_begin(&state);
        for (uint64_t b = first; b < end; b++)
            digest_pair(&state, hashes[2 * b], hashes[2 * b + 1]);
        digest_end(&state, out + 2 * i);
    }
}

static int all_zero(const uint8_t *p, size_t n)
{
    return pydr_kernel_get()->is_zero(p, n);
}

int pydr_encode(pydr_device *src, const uint64_t *extents, const uint8_t *zero,
                const uint64_t *base_hashes, size_t n, uint64_t first_seq,
                uint8_t *out, size_t cap, size_t *used, size_t *done,
                uint32_t block_size, uint64_t *payload_hashes,
                size_t payload_hashes_cap, size_t *payload_hashes_used,
                pydr_error *error)
{
    PYDR_ERROR_OR_LOCAL(error);
    size_t pos = 0, i = 0, hpos = 0;
    *used = 0;
    *done = 0;
    if (payload_hashes_used)
        *payload_hashes_used = 0;
    if (!src)
        return pydr_fail(error, -EINVAL);
    for (; i < n; i++) {
        pydr_record r;
        r.offset = extents[2 * i];
        r.length = extents[2 * i + 1];
        if (r.length > PYDR_RECORD_MAX) {
            *used = pos;
            *done = i;
            if (payload_hashes_used)
                *payload_hashes_used = hpos;
            return pydr_fail_at(error, -EINVAL, r.offset);
        }
        r.type = zero[i] ? PYDR_RECORD_ZERO : PYDR_RECORD_DATA;
        size_t size = PYDR_RECORD_HEADER + (r.type == PYDR_RECORD_DATA ? r.length : 0);
        size_t nb = r.type == PYDR_RECORD_DATA && block_size
                        ? (size_t)((r.length + block_size - 1) / block_size) : 0;
        if (cap - pos < size || (payload_hashes && payload_hashes_cap - hpos < 2 * nb))
            break;
        r.base_hash[0] = base_hashes[2 * i];
        r.base_hash[1] = base_hashes[2 * i + 1];
        r.seq = first_seq + i;
        r.payload_hash = 0;
        if (r.type == PYDR_RECORD_DATA) {
            uint8_t *payload = out + pos + PYDR_RECORD_HEADER;
            int rc = src->read(src, payload, (size_t)r.length, r.offset, error);
            if (rc) {
                *used = pos;
                *done = i;
                if (payload_hashes_used)
                    *payload_hashes_used = hpos;
                return rc;
            }
            r.payload_hash = hash64(payload, (size_t)r.length);
            if (payload_hashes) {
                /* the blocks as read now: the source may have changed since
                 * it was signed, and a signature cache must describe what
                 * the target receives */
                const pydr_kernel *k = pydr_kernel_get();
                for (size_t b = 0; b < nb; b++, hpos += 2) {
                    size_t off = b * block_size;
                    size_t len = r.length - off < block_size ? (size_t)(r.length - off) : block_size;
                    k->hash(PYDR_XXH3_128, payload + off, len, payload_hashes + hpos);
                }
            }
        }
        pydr_record_build(out + pos, &r);
        pos += size;
    }
    *used = pos;
    *done = i;
    if (payload_hashes_used)
        *payload_hashes_used = hpos;
    return 0;
}

/* Turns the old content into undo records at out, one per run of all-zero
 * or data blocks: zero runs cost a header and are restored as holes, so
 * journaling sparse or zeroed regions takes no space. Returns the bytes
 * written (at most old_len + 64 per block). */
static size_t journal_runs(uint8_t *out, const uint8_t *old, uint64_t old_len,
                           uint64_t offset, uint64_t seq, uint32_t block_size)
{
    size_t w = 0, pos = 0;
    uint8_t header[PYDR_RECORD_HEADER];
    while (pos < old_len) {
        size_t n = old_len - pos < block_size ? (size_t)(old_len - pos) : block_size;
        int zero = all_zero(old + pos, n);
        size_t end = pos + n;
        while (end < old_len) {
            size_t m = old_len - end < block_size ? (size_t)(old_len - end) : block_size;
            if (all_zero(old + end, m) != zero)
                break;
            end += m;
        }
        pydr_record j;
        j.offset = offset + pos;
        j.length = end - pos;
        j.seq = seq;
        j.base_hash[0] = j.base_hash[1] = 0;
        j.type = zero ? PYDR_RECORD_ZERO : PYDR_RECORD_DATA;
        j.payload_hash = zero ? 0 : hash64(old + pos, end - pos);
        pydr_record_build(header, &j);
        if (!zero)
            memcpy(out + w + PYDR_RECORD_HEADER, old + pos, end - pos);
        memcpy(out + w, header, PYDR_RECORD_HEADER);
        w += record_size(&j);
        pos = end;
    }
    return w;
}

int pydr_apply_prepare(pydr_device *target, const uint8_t *recs, size_t len,
                       uint32_t block_size, uint64_t old_size, uint64_t new_size,
                       pydr_apply_state *st, uint8_t *scratch, size_t scratch_cap,
                       uint8_t *journal, size_t journal_cap, size_t *journal_used,
                       pydr_error *error)
{
    PYDR_ERROR_OR_LOCAL(error);
    size_t pos = 0, jpos = 0;
    *journal_used = 0;
    if (!target || !st || block_size == 0)
        return pydr_fail(error, -EINVAL);
    while (pos < len) {
        pydr_record r;
        /* a corrupt record is reported at its position in the batch */
        if (len - pos < PYDR_RECORD_HEADER || pydr_record_parse(recs + pos, &r))
            return pydr_fail_at(error, PYDR_E_CORRUPT, pos);
        size_t size = record_size(&r);
        if (len - pos < size)
            return pydr_fail_at(error, PYDR_E_CORRUPT, pos);
        if (r.type == PYDR_RECORD_END || r.type == PYDR_RECORD_COMMIT)
            return pydr_fail_at(error, PYDR_E_CORRUPT, pos); /* the caller strips END */
        const uint8_t *payload = recs + pos + PYDR_RECORD_HEADER;
        /* bounds: aligned, in order, no overlap, inside the new image */
        if (r.seq != st->next_seq || r.offset % block_size || r.offset < st->next_offset ||
            r.length == 0 || r.offset + r.length > new_size ||
            (r.length % block_size && r.offset + r.length != new_size))
            return pydr_fail_at(error, PYDR_E_CORRUPT, pos);
        if (r.type == PYDR_RECORD_DATA &&
            hash64(payload, (size_t)r.length) != r.payload_hash)
            return pydr_fail_at(error, PYDR_E_CORRUPT, pos);
        /* from here on errors are about the target, at the record's offset */
        /* Old content: every base block the record covers, up to the base's
         * end. That is more than `length` only for a short last block of a
         * shrunk result, whose base block was longer (its hash is too). */
        uint64_t old_len = 0;
        if (r.offset < old_size) {
            uint64_t covered = (r.length + block_size - 1) / block_size * block_size;
            old_len = old_size - r.offset < covered ? old_size - r.offset : covered;
        }
        uint64_t runs_max = (old_len + block_size - 1) / block_size;
        if (old_len > scratch_cap ||
            journal_cap - jpos < old_len + PYDR_RECORD_HEADER * runs_max)
            return pydr_fail_at(error, PYDR_E_NO_ROOM, r.offset);
        uint8_t *jpayload = scratch;
        int rc = target->read(target, jpayload, (size_t)old_len, r.offset, error);
        if (rc)
            return rc;
        uint64_t digest[2];
        blocks_digest(jpayload, (size_t)old_len, block_size, digest);
        if (digest[0] != r.base_hash[0] || digest[1] != r.base_hash[1]) {
            /* Is the new content already there? Then say so. */
            int applied = 0;
            if (old_len == r.length) {
                if (r.type == PYDR_RECORD_ZERO)
                    applied = all_zero(jpayload, (size_t)old_len);
                else
                    applied = memcmp(jpayload, payload, (size_t)old_len) == 0;
            }
            return pydr_fail_at(error, applied ? PYDR_E_ALREADY_APPLIED : PYDR_E_BASE_MISMATCH,
                                r.offset);
        }
        jpos += journal_runs(journal + jpos, jpayload, old_len, r.offset, r.seq, block_size);
        st->next_offset = r.offset + r.length;
        st->next_seq = r.seq + 1;
        st->records++;
        if (r.type == PYDR_RECORD_DATA)
            st->data_bytes += r.length;
        else
            st->zero_bytes += r.length;
        pos += size;
    }
    *journal_used = jpos;
    return 0;
}

int pydr_start_writeback(int fd)
{
    /* Only a hint: durability still comes from fdatasync. */
    if (sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE) != 0)
        return -errno;
    return 0;
}

int pydr_apply_write(pydr_device *target, const uint8_t *recs, size_t len, pydr_error *error)
{
    PYDR_ERROR_OR_LOCAL(error);
    size_t pos = 0;
    if (!target)
        return pydr_fail(error, -EINVAL);
    while (pos < len) {
        pydr_record r;
        if (len - pos < PYDR_RECORD_HEADER || pydr_record_parse(recs + pos, &r))
            return pydr_fail_at(error, PYDR_E_CORRUPT, pos);
        size_t size = record_size(&r);
        if (len - pos < size)
            return pydr_fail_at(error, PYDR_E_CORRUPT, pos);
        int rc = 0;
        if (r.type == PYDR_RECORD_DATA)
            rc = target->write(target, recs + pos + PYDR_RECORD_HEADER, (size_t)r.length,
                               r.offset, error);
        else if (r.type == PYDR_RECORD_ZERO)
            rc = target->zero(target, r.offset, r.length, error);
        if (rc)
            return rc;
        pos += size;
    }
    return 0;
}
