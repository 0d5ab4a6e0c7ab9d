/* signer.c -- per-block signatures of a device range, or of spans of a
 * window (an NBD export's are made in nbd.c); for a file: find data extents
 * with SEEK_DATA/SEEK_HOLE, hash the data in large windows, never read holes.
 * When the caller keeps what was read (sign_spans with keep), data is read
 * with pread straight into its memory and hashed there.
 *
 * Data is hashed straight from the page cache through 16 MiB mmap windows
 * (measured ~30% faster than pread into a buffer, which costs a copy). A read
 * error or a file shrinking under a mapping raises SIGBUS instead of
 * returning an errno, so every window runs under a guard: a SIGBUS inside the
 * window jumps back here and the window is read again with pread, which
 * reports the real errno and offset. Without the guard, or when mmap is
 * refused, pread is used throughout. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "dev.h"
#include "fail.h"
#include "io.h"
#include "kernel.h"
#include "pydr.h"

/* 1 MiB measured best on the machines we run on (see benchmarks/); a
 * multiple of every block size up to 1 MiB, and few syscalls per GiB. */
#define DEFAULT_IO_SIZE (1u << 20)
#define IO_ALIGN 4096u
/* mmap window: 16 MiB measured as fast as 64 MiB and keeps the mapped RSS
 * small. Larger blocks get a window of one block (sizes are powers of two,
 * so the window is always a whole number of blocks). */
#define MAP_WINDOW (16u << 20)

/* ---- SIGBUS guard ------------------------------------------------------ */
static __thread sigjmp_buf *guard_jump;
static __thread const uint8_t *guard_lo, *guard_hi;
static struct sigaction previous_sigbus;
static pthread_once_t guard_once = PTHREAD_ONCE_INIT;
static int guard_installed;

static void on_sigbus(int sig, siginfo_t *info, void *ctx)
{
    const uint8_t *addr = info->si_addr;
    if (guard_jump && addr >= guard_lo && addr < guard_hi)
        siglongjmp(*guard_jump, 1);
    /* Not a fault in one of our windows: act as if we were not installed. */
    if (previous_sigbus.sa_flags & SA_SIGINFO) {
        previous_sigbus.sa_sigaction(sig, info, ctx);
    } else if (previous_sigbus.sa_handler != SIG_DFL &&
               previous_sigbus.sa_handler != SIG_IGN) {
        previous_sigbus.sa_handler(sig);
    } else {
        /* restore the default action; the faulting access repeats and dies */
        sigaction(SIGBUS, &previous_sigbus, NULL);
    }
}

static void install_guard(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    guard_installed = sigaction(SIGBUS, &sa, &previous_sigbus) == 0;
}

struct pydr_signer {
    uint32_t block_size;
    int algorithm;
    unsigned words;
    const pydr_kernel *kernel;
    uint8_t *buf;
    size_t buf_size;
    size_t window;             /* mmap window, a multiple of block_size */
    uint64_t zero_hash[2];     /* hash of a full block of zeros */
    int use_mmap;
    long page_size;
};

static int is_power_of_two(uint64_t v) { return v && !(v & (v - 1)); }

int pydr_signer_create(pydr_signer **out, uint32_t block_size, int algorithm,
                       size_t io_size, unsigned flags)
{
    if (!out)
        return -EINVAL;
    *out = NULL;
    if (pydr_hash_words(algorithm) < 0)
        return PYDR_E_UNKNOWN_ALGORITHM;
    if (!is_power_of_two(block_size) ||
        block_size < PYDR_BLOCK_MIN || block_size > PYDR_BLOCK_MAX ||
        (flags & ~(unsigned)PYDR_SIGN_NO_MMAP))
        return -EINVAL;
    if (io_size == 0)
        io_size = DEFAULT_IO_SIZE;
    if (io_size < block_size)
        io_size = block_size;
    io_size = (io_size + block_size - 1) / block_size * block_size;

    pydr_signer *s = calloc(1, sizeof *s);
    if (!s)
        return -ENOMEM;
    if (posix_memalign((void **)&s->buf, IO_ALIGN, io_size) != 0) {
        free(s);
        return -ENOMEM;
    }
    s->block_size = block_size;
    s->algorithm = algorithm;
    s->words = (unsigned)pydr_hash_words(algorithm);
    s->kernel = pydr_kernel_get();
    s->buf_size = io_size;
    s->page_size = sysconf(_SC_PAGESIZE);
    s->window = block_size > MAP_WINDOW ? block_size : MAP_WINDOW;
    if (!(flags & PYDR_SIGN_NO_MMAP) && s->page_size > 0) {
        pthread_once(&guard_once, install_guard);
        s->use_mmap = guard_installed;
    }
    memset(s->buf, 0, block_size);
    s->kernel->hash(algorithm, s->buf, block_size, s->zero_hash);
    *out = s;
    return 0;
}

void pydr_signer_free(pydr_signer *s)
{
    if (!s)
        return;
    free(s->buf);
    free(s);
}

static int cancelled(const pydr_progress *p)
{
    return p && __atomic_load_n(&p->cancel, __ATOMIC_ACQUIRE);
}

static void advance(pydr_progress *p, uint64_t done, uint64_t read)
{
    if (!p)
        return;
    __atomic_fetch_add(&p->done, done, __ATOMIC_RELAXED);
    if (read)
        __atomic_fetch_add(&p->read, read, __ATOMIC_RELAXED);
}

/* Hole blocks [first, first + count): zero hashes without reading. `tail` is
 * the length of the last block when it is a short one at the end, else 0. */
static void fill_hole(pydr_signer *s, uint64_t *hashes, uint8_t *zero_mask,
                      size_t first, size_t count, size_t tail)
{
    for (size_t b = first; b < first + count; b++) {
        uint64_t *out = hashes + b * s->words;
        out[0] = s->zero_hash[0];
        if (s->words == 2)
            out[1] = s->zero_hash[1];
        zero_mask[b] = 1;
    }
    if (tail && count) {
        /* buf holds no state between chunks; zero it for the short hash */
        memset(s->buf, 0, tail);
        s->kernel->hash(s->algorithm, s->buf, tail,
                        hashes + (first + count - 1) * s->words);
    }
}

/* After a failed large read: re-read block by block so that the error names
 * the first block that really fails, not the start of the buffer. */
static void locate_error(pydr_signer *s, int fd, uint8_t *dst, size_t len,
                         uint64_t off, pydr_error *error)
{
    for (size_t at = 0; at < len; at += s->block_size) {
        size_t n = len - at < s->block_size ? len - at : s->block_size;
        ssize_t r;
        do {
            r = pread(fd, dst + at, n, (off_t)(off + at));
        } while (r < 0 && errno == EINTR);
        if (r < 0) {
            error->offset = off + at;
            return;
        }
    }
}

/* Reads exactly `len` bytes at `off`; a read error names its first failing
 * block, not the start of the buffer. */
static int read_full(pydr_signer *s, int fd, uint8_t *dst, size_t len,
                     uint64_t off, pydr_error *error)
{
    int rc = pydr_pread_full(fd, dst, len, off, error);
    if (rc < 0 && rc != PYDR_E_FILE_CHANGED) {
        size_t done = (size_t)(error->offset - off);
        locate_error(s, fd, dst + done, len - done, error->offset, error);
    }
    return rc;
}

/* Hashes [pos, pos + len) through a guarded mmap window. Returns 0 when
 * done, 1 when the caller must read the window with pread instead (mmap
 * refused, or SIGBUS: an I/O error or a file that shrank). */
static int hash_mapped(pydr_signer *s, int fd, uint64_t pos, size_t len,
                       uint64_t *hashes, uint8_t *zero_mask)
{
    uint64_t map_off = pos - pos % (uint64_t)s->page_size;
    size_t delta = (size_t)(pos - map_off);
    size_t map_len = len + delta;
    uint8_t *map = mmap(NULL, map_len, PROT_READ, MAP_SHARED, fd, (off_t)map_off);
    if (map == MAP_FAILED)
        return 1;
    (void)madvise(map, map_len, MADV_SEQUENTIAL);
    sigjmp_buf jump;
    volatile int faulted = 0;
    if (sigsetjmp(jump, 1) == 0) {
        guard_lo = map;
        guard_hi = map + map_len;
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        guard_jump = &jump;
        s->kernel->hash_blocks(map + delta, len, s->block_size, s->algorithm,
                               s->zero_hash, hashes, zero_mask);
    } else {
        faulted = 1;
    }
    guard_jump = NULL;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    munmap(map, map_len);
    return faulted;
}

/* Reads and hashes [start, end); start is block aligned relative to `base`.
 * With `keep` (the caller's memory for device offset `base`), every byte is
 * read straight into it with pread and hashed there: no mmap, no copy. */
static int sign_data(pydr_signer *s, int fd, uint64_t base, uint64_t start,
                     uint64_t end, uint64_t *hashes, uint8_t *zero_mask, uint8_t *keep,
                     pydr_progress *progress, pydr_error *error)
{
    uint64_t pos = start;
    while (pos < end) {
        if (cancelled(progress))
            return pydr_fail_at(error, PYDR_E_CANCELLED, pos);
        size_t first = (size_t)((pos - base) / s->block_size);
        uint64_t *h = hashes + first * s->words;
        uint8_t *z = zero_mask + first;
        if (s->use_mmap && !keep) {
            size_t len = end - pos < s->window ? (size_t)(end - pos) : s->window;
            if (hash_mapped(s, fd, pos, len, h, z) == 0) {
                advance(progress, len, len);
                pos += len;
                continue;
            }
            /* fall through: this window again, buffer by buffer */
            uint64_t window_end = pos + len;
            while (pos < window_end) {
                size_t n = window_end - pos < s->buf_size ? (size_t)(window_end - pos)
                                                          : s->buf_size;
                first = (size_t)((pos - base) / s->block_size);
                int rc = read_full(s, fd, s->buf, n, pos, error);
                if (rc)
                    return rc;
                s->kernel->hash_blocks(s->buf, n, s->block_size, s->algorithm,
                                       s->zero_hash, hashes + first * s->words,
                                       zero_mask + first);
                advance(progress, n, n);
                pos += n;
            }
            continue;
        }
        size_t len = end - pos < s->buf_size ? (size_t)(end - pos) : s->buf_size;
        uint8_t *dst = keep ? keep + (pos - base) : s->buf;
        int rc = read_full(s, fd, dst, len, pos, error);
        if (rc)
            return rc;
        s->kernel->hash_blocks(dst, len, s->block_size, s->algorithm, s->zero_hash, h, z);
        advance(progress, len, len);
        pos += len;
    }
    return 0;
}

/* Signs [offset, offset + length) of a file into hashes/zero_mask indexed
 * from offset; keep (NULL, or memory for device offset `offset`) gets every
 * byte read. Holes are not read, and stay untouched in keep. */
static int sign_file(pydr_signer *s, int fd, uint64_t offset, uint64_t length,
                     uint64_t *hashes, uint8_t *zero_mask, uint8_t *keep,
                     pydr_progress *progress, pydr_error *error)
{
    const uint64_t bs = s->block_size;
    const uint64_t end = offset + length;
    const size_t tail = (size_t)(length % bs); /* short last block, if any */
    /* Readahead hint only: failure is harmless (e.g. pipes, some devices). */
    (void)posix_fadvise(fd, (off_t)offset, (off_t)length, POSIX_FADV_SEQUENTIAL);

    int seek_holes = 1;
    uint64_t pos = offset;
    while (pos < end) {
        uint64_t data = pos, hole = end;
        if (seek_holes) {
            off_t d = lseek(fd, (off_t)pos, SEEK_DATA);
            if (d < 0 && errno == ENXIO) {
                /* Only hole up to the end of the file -- unless the file is
                 * now shorter than the range we were asked to sign. */
                struct stat st;
                if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) &&
                    (uint64_t)st.st_size < end)
                    return pydr_fail_at(error, PYDR_E_FILE_CHANGED, (uint64_t)st.st_size);
                data = end;
            } else if (d < 0) {
                /* EINVAL/EOPNOTSUPP (devices, old filesystems): read all */
                seek_holes = 0;
            } else {
                data = (uint64_t)d < end ? (uint64_t)d : end;
            }
        }
        /* Blocks lying wholly inside [pos, data) are holes. */
        uint64_t hole_end = data == end ? end : offset + (data - offset) / bs * bs;
        if (hole_end > pos) {
            size_t first = (size_t)((pos - offset) / bs);
            size_t count = (size_t)((hole_end - pos + bs - 1) / bs);
            fill_hole(s, hashes, zero_mask, first, count,
                      hole_end == end ? tail : 0);
            advance(progress, hole_end - pos, 0);
            pos = hole_end;
            if (pos >= end)
                break;
        }
        if (seek_holes) {
            /* from `data`, not `pos`: pos may still lie in the hole */
            off_t h = lseek(fd, (off_t)data, SEEK_HOLE);
            if (h < 0) {
                if (errno != ENXIO)
                    return pydr_fail_at(error, -errno, data);
                /* the file shrank under us: the read below reports it */
                hole = end;
            } else {
                hole = (uint64_t)h < end ? (uint64_t)h : end;
            }
        }
        /* Read whole blocks covering [pos, hole); hole > data >= pos. */
        uint64_t data_end = offset + (hole - offset + bs - 1) / bs * bs;
        if (data_end <= pos) /* only if the file changes under us */
            data_end = pos + bs;
        if (data_end > end)
            data_end = end;
        int rc = sign_data(s, fd, offset, pos, data_end, hashes, zero_mask, keep,
                           progress, error);
        if (rc)
            return rc;
        pos = data_end;
    }
    return 0;
}

/* Signs [offset, offset + length) of a device without holes or mmap (a
 * memory device) through its read operation, a buffer at a time, into keep
 * when given (memory for device offset `offset`). */
static int sign_by_reads(pydr_signer *s, pydr_device *device, uint64_t offset,
                         uint64_t length, uint64_t *hashes, uint8_t *zero_mask,
                         uint8_t *keep, pydr_progress *progress, pydr_error *error)
{
    for (uint64_t pos = offset; pos < offset + length;) {
        if (cancelled(progress))
            return pydr_fail_at(error, PYDR_E_CANCELLED, pos);
        uint64_t left = offset + length - pos;
        size_t len = left < s->buf_size ? (size_t)left : s->buf_size;
        uint8_t *dst = keep ? keep + (pos - offset) : s->buf;
        int rc = device->read(device, dst, len, pos, error);
        if (rc)
            return rc;
        size_t first = (size_t)((pos - offset) / s->block_size);
        s->kernel->hash_blocks(dst, len, s->block_size, s->algorithm, s->zero_hash,
                               hashes + first * s->words, zero_mask + first);
        advance(progress, len, len);
        pos += len;
    }
    return 0;
}

int pydr_signer_sign(pydr_signer *s, pydr_device *device, uint64_t offset, uint64_t length,
                     uint64_t *hashes, uint8_t *zero_mask, size_t nblocks,
                     pydr_progress *progress, pydr_error *error)
{
    PYDR_ERROR_OR_LOCAL(error);
    if (!s || !device || !hashes || !zero_mask)
        return pydr_fail(error, -EINVAL);
    const uint64_t bs = s->block_size;
    if (offset % bs || offset + length < offset ||
        offset + length > (uint64_t)INT64_MAX ||
        nblocks != (length + bs - 1) / bs)
        return pydr_fail_at(error, -EINVAL, offset);
    if (length == 0)
        return 0;
    if (device->nbd) {
        const uint64_t span[2] = {offset, length};
        return pydr_nbd_sign_spans(device->nbd, offset, nblocks, span, 1, s->block_size,
                                   s->algorithm, hashes, zero_mask, NULL, progress, error);
    }
    if (device->mem)
        return sign_by_reads(s, device, offset, length, hashes, zero_mask, NULL, progress,
                             error);
    return sign_file(s, device->fd, offset, length, hashes, zero_mask, NULL, progress, error);
}

/* Checks the spans of the window [offset, offset + nblocks blocks): block
 * aligned, sorted, disjoint, inside it, a short end only in its last block,
 * and inside keep (keep_len bytes from offset) when there is one. */
static int check_spans(uint64_t offset, size_t nblocks, uint32_t bs, const uint64_t *spans,
                       size_t nspans, const uint8_t *keep, size_t keep_len,
                       pydr_error *error)
{
    if ((uint64_t)nblocks > ((uint64_t)INT64_MAX - offset) / bs)
        return pydr_fail_at(error, -EINVAL, offset);
    const uint64_t window_end = offset + (uint64_t)nblocks * bs;
    const uint64_t last_block = window_end - bs;  /* nblocks > 0 here */
    uint64_t previous_end = offset;
    for (size_t i = 0; i < nspans; i++) {
        uint64_t start = spans[2 * i], len = spans[2 * i + 1];
        if (start % bs || start < previous_end || start >= window_end ||
            len > window_end - start)
            return pydr_fail_at(error, -EINVAL, start);
        uint64_t end = start + len;
        if (len % bs && end <= last_block)  /* a short block inside the window */
            return pydr_fail_at(error, -EINVAL, start);
        if (keep && end - offset > keep_len)
            return pydr_fail_at(error, -EINVAL, start);
        previous_end = end;
    }
    return 0;
}

int pydr_signer_sign_spans(pydr_signer *s, pydr_device *device, uint64_t offset,
                           size_t nblocks, const uint64_t *spans, size_t nspans,
                           uint64_t *hashes, uint8_t *zero_mask,
                           uint8_t *keep, size_t keep_len,
                           pydr_progress *progress, pydr_error *error)
{
    PYDR_ERROR_OR_LOCAL(error);
    if (!s || !device || (nspans && (!spans || !hashes || !zero_mask)))
        return pydr_fail(error, -EINVAL);
    const uint32_t bs = s->block_size;
    if (offset % bs)
        return pydr_fail_at(error, -EINVAL, offset);
    if (nspans == 0)
        return 0;
    if (nblocks == 0)
        return pydr_fail_at(error, -EINVAL, offset);
    int rc = check_spans(offset, nblocks, bs, spans, nspans, keep, keep_len, error);
    if (rc)
        return rc;
    if (device->nbd)
        return pydr_nbd_sign_spans(device->nbd, offset, nblocks, spans, nspans, bs,
                                   s->algorithm, hashes, zero_mask, keep, progress, error);
    for (size_t i = 0; i < nspans && !rc; i++) {
        uint64_t start = spans[2 * i], len = spans[2 * i + 1];
        size_t first = (size_t)((start - offset) / bs);
        uint64_t *h = hashes + first * s->words;
        uint8_t *z = zero_mask + first;
        uint8_t *k = keep ? keep + (start - offset) : NULL;
        if (len == 0)
            continue;
        if (device->mem)
            rc = sign_by_reads(s, device, start, len, h, z, k, progress, error);
        else
            rc = sign_file(s, device->fd, start, len, h, z, k, progress, error);
    }
    return rc;
}
