/*
 * pydr.h -- the one public header of pydr's C core.
 *
 * Conventions (the same for every function below):
 *  - Every symbol starts with pydr_ / PYDR_.
 *  - Functions that can fail return int: 0 (or a count, where said) on
 *    success, a negative errno (-EIO, -ENOMEM, ...) or one of pydr's own
 *    codes (PYDR_E_*, all at or below -1000). pydr_strerror() names any of
 *    them.
 *  - One error channel. The return value says WHAT failed. Where a failure
 *    has a place -- a byte of a device, a record of a buffer -- the function
 *    also takes a caller-owned `pydr_error *error` (NULL: not wanted) and
 *    fills it on failure with the code, the offset and, for NBD, libnbd's
 *    own words. Nothing else carries an error: no error fields in state
 *    structs, no per-handle or thread-local "last error".
 *  - The caller owns every buffer it passes in. State lives in opaque
 *    handles created with pydr_X_create() / pydr_X_open_*() and released
 *    with pydr_X_free(); free accepts NULL.
 *  - One device handle (pydr_device) stands for where the core reads and
 *    writes: an open file or block device, or an NBD export. Signing,
 *    encoding and applying records take a device, whatever its kind.
 *  - All functions are reentrant: distinct handles may be used from distinct
 *    threads at the same time. A file device may be shared by threads; an NBD
 *    device is one connection, used by one thread at a time. A pydr_progress
 *    may be shared by all threads.
 */
#ifndef PYDR_H
#define PYDR_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#  define PYDR_API __attribute__((visibility("default")))
#else
#  define PYDR_API
#endif

#define PYDR_VERSION_MAJOR 0
#define PYDR_VERSION_MINOR 1
#define PYDR_VERSION_PATCH 0
#define PYDR_VERSION_NUMBER \
    (PYDR_VERSION_MAJOR * 10000 + PYDR_VERSION_MINOR * 100 + PYDR_VERSION_PATCH)

/* The version of the library actually linked, as zstd's ZSTD_versionNumber:
 * MAJOR * 10000 + MINOR * 100 + PATCH (0.1.0 is 100), and "MAJOR.MINOR.PATCH".
 * Compare with PYDR_VERSION_NUMBER to catch a header/library mismatch. */
PYDR_API unsigned pydr_version_number(void);
PYDR_API const char *pydr_version_string(void);

/* pydr's own error codes. Stable: never renumbered, only appended. */
#define PYDR_E_BASE          1000
#define PYDR_E_CANCELLED     (-1001) /* the pydr_progress cancel flag was set */
#define PYDR_E_FILE_CHANGED  (-1002) /* file ended before its expected size  */
#define PYDR_E_UNSUPPORTED   (-1003) /* not a regular file or block device   */
#define PYDR_E_CORRUPT       (-1004) /* a record fails its checks            */
#define PYDR_E_BASE_MISMATCH (-1005) /* target blocks are not the delta base */
#define PYDR_E_ALREADY_APPLIED (-1006) /* target already holds the result    */
#define PYDR_E_NO_ROOM       (-1007) /* caller's output buffer is too small  */
#define PYDR_E_NO_NBD        (-1008) /* built without libnbd                  */
#define PYDR_E_NO_BITMAP     (-1009) /* the NBD server exports no such bitmap */
#define PYDR_E_UNKNOWN_ALGORITHM (-1010) /* not a PYDR_XXH3_* hash algorithm  */

/* Where an error happened: the one error channel (see the top comment).
 * Owned by the caller; a function that takes one fills it only when it
 * fails, and always sets `code` to what it returns then. */
typedef struct pydr_error {
    int code;          /* the failing call's return value                     */
    int has_offset;    /* 1 when `offset` tells where                         */
    uint64_t offset;   /* a byte offset in the device for I/O errors, base
                        * mismatches and the like; for PYDR_E_CORRUPT of the
                        * records a call was given, the position of the bad
                        * record in that buffer                               */
    char detail[256];  /* the underlying library's words (libnbd's message),
                        * NUL-terminated; "" when there are none              */
} pydr_error;

/* Returns a static, human-readable description of any code returned by a
 * pydr function (negative errno included). Never returns NULL. */
PYDR_API const char *pydr_strerror(int code);

/* Hash algorithms. A signature stores 1 (xxh3-64) or 2 (xxh3-128) uint64
 * words per block; for xxh3-128 the words are [low64, high64]. Seed is 0, so
 * every value equals xxhash's xxh3_64/xxh3_128 digest of the block's bytes. */
#define PYDR_XXH3_64   1
#define PYDR_XXH3_128  2

/* Block sizes are powers of two in [PYDR_BLOCK_MIN, PYDR_BLOCK_MAX]. */
#define PYDR_BLOCK_MIN 512u
#define PYDR_BLOCK_MAX (64u * 1024u * 1024u)

/* Number of uint64 words per block for an algorithm (1 or 2), or
 * PYDR_E_UNKNOWN_ALGORITHM. */
PYDR_API int pydr_hash_words(int algorithm);

/* One-shot hash of a buffer: writes pydr_hash_words(algorithm) words. */
PYDR_API int pydr_hash(int algorithm, const void *data, size_t size,
                       uint64_t *out);

/* Name of the hash kernel chosen for this CPU ("avx2", "sse2", ...). */
PYDR_API const char *pydr_kernel_name(void);

/*
 * Shared progress and cancellation, owned by the caller (zero it before use).
 * Many threads may update one record; read it only through the accessors.
 */
typedef struct pydr_progress {
    uint64_t done;   /* bytes of the range covered so far (holes included) */
    uint64_t read;   /* bytes actually read from the file                  */
    int cancel;      /* set non-zero to make running calls stop            */
} pydr_progress;

PYDR_API uint64_t pydr_progress_done(const pydr_progress *p);
PYDR_API uint64_t pydr_progress_read(const pydr_progress *p);
PYDR_API void pydr_progress_request_cancel(pydr_progress *p);

/*
 * Size of an open file: st_size for regular files, BLKGETSIZE64 for block
 * devices. *is_block_device is set to 1 or 0. Other file types give
 * PYDR_E_UNSUPPORTED.
 */
PYDR_API int pydr_fd_size(int fd, uint64_t *size, int *is_block_device);

/* Open `path` relative to the directory `dir_fd` so that it cannot leave it:
 * openat2() with RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
 * ("..", an absolute path or any symlink on the way fails with -EXDEV or
 * -ELOOP). `flags` and `mode` are those of open(2). Returns the new file
 * descriptor (>= 0) or a negative errno; -ENOSYS (or -EPERM under a seccomp
 * filter) where the kernel has no openat2, and the caller walks the path
 * itself. */
PYDR_API int pydr_open_beneath(int dir_fd, const char *path, int flags, unsigned mode);

/* What tells whether a file was written since it was last looked at:
 * identity = {size, mtime ns, ctime ns, inode, (device major << 32) | minor}
 * of `path` relative to `dir_fd` (AT_FDCWD: -100), or of `dir_fd` itself
 * when `path` is "". Read with statx(AT_STATX_FORCE_SYNC), so that a FUSE or
 * network file system answers its own times, not ones its client guessed
 * (a symlink is followed, as stat(2) does). Returns 0 or a negative errno. */
PYDR_API int pydr_file_identity(int dir_fd, const char *path, uint64_t identity[5]);

/*
 * Devices: where the core reads and writes. One handle for every kind:
 *  - a file or block device this process opened (pydr_device_open_fd; the
 *    descriptor stays the caller's, to close after pydr_device_free);
 *  - an NBD export (qemu-nbd, qemu-storage-daemon, QEMU) through libnbd
 *    (pydr_device_open_nbd): one connection, used from one thread at a time.
 *    Without libnbd at build time it gives PYDR_E_NO_NBD;
 *  - caller memory standing for a range of a disk (pydr_device_open_memory),
 *    read-only.
 * Signing, encoding and applying records (below) take a device.
 */
typedef struct pydr_device pydr_device;

#define PYDR_DEVICE_BLOCK 1u            /* open_fd: zero ranges with
                                           BLKZEROOUT, not by punching holes */
#define PYDR_NBD_WRITE 1u               /* open_nbd: the export must be
                                           writable                          */
#define PYDR_NBD_EXTRA 2u               /* open_nbd: one more connection to a
                                           server: -EAGAIN if its handshake has
                                           not begun in PYDR_NBD_EXTRA_WAIT_MS
                                           (a server at its client limit
                                           leaves it waiting for good)       */
#define PYDR_NBD_EXTRA_WAIT_MS 2000

/* 1 when pydr was built with libnbd. */
PYDR_API int pydr_nbd_available(void);

/* A device over an open regular file or block device (check it with
 * pydr_fd_size first); -EINVAL for a negative fd or an unknown flag. */
PYDR_API int pydr_device_open_fd(pydr_device **out, int fd, unsigned flags);
/* Connects to a libnbd URI (nbd://HOST[:PORT]/EXPORT,
 * nbd+unix:///EXPORT?socket=PATH), asking for base:allocation and, when
 * bitmap is not NULL, the dirty bitmap qemu:dirty-bitmap:BITMAP
 * (PYDR_E_NO_BITMAP if the server does not export it). error->detail gets
 * libnbd's reason for a failure. */
PYDR_API int pydr_device_open_nbd(pydr_device **out, const char *uri, const char *bitmap,
                                  unsigned flags, pydr_error *error);
/* A read-only device over caller memory: it reads as the bytes
 * data[0, len) lying at device offset `offset` (a window kept by
 * pydr_signer_sign_spans), so that records are encoded (pydr_encode) from
 * what was hashed, without reading the disk again. A read outside
 * [offset, offset + len) fails with -EINVAL at the first offset outside it
 * (a bug in the caller, never silently zeros). The memory must outlive the
 * device. Writes and zeroing fail with -EROFS; flush does nothing; its size
 * is offset + len; it is read-only and may be read by threads side by side
 * (PYDR_CAN_MULTI_CONN); it has no extents (-EOPNOTSUPP). -EINVAL for a
 * NULL out, NULL data with len > 0, or a range past INT64_MAX. */
PYDR_API int pydr_device_open_memory(pydr_device **out, const void *data, size_t len,
                                     uint64_t offset);
PYDR_API void pydr_device_free(pydr_device *device);

PYDR_API int pydr_device_size(pydr_device *device, uint64_t *size, pydr_error *error);
#define PYDR_CAN_FLUSH 1
#define PYDR_CAN_ZERO 2
#define PYDR_CAN_MULTI_CONN 3  /* more connections may read side by side */
#define PYDR_READ_ONLY 4
/* 1 or 0 for one of PYDR_CAN_* / PYDR_READ_ONLY (a file can all of them,
 * and is read-only when opened O_RDONLY). */
PYDR_API int pydr_device_can(pydr_device *device, int what);
/* Makes writes durable (fdatasync, NBD flush where the server has one). */
PYDR_API int pydr_device_flush(pydr_device *device, pydr_error *error);
/* Exactly len bytes at off: PYDR_E_FILE_CHANGED when a file ends first;
 * error->offset is where the transfer stopped. */
PYDR_API int pydr_device_pread(pydr_device *device, void *buf, size_t len, uint64_t off,
                               pydr_error *error);
PYDR_API int pydr_device_pwrite(pydr_device *device, const void *buf, size_t len,
                                uint64_t off, pydr_error *error);

#define PYDR_NBD_STATE_HOLE 1u          /* base:allocation extent flags     */
#define PYDR_NBD_STATE_ZERO 2u
#define PYDR_NBD_DIRTY 1u               /* qemu:dirty-bitmap extent flag    */
/* Extents of [offset, offset + length) as (offset, length, flags) triples
 * in out (cap triples at most): base:allocation (PYDR_NBD_STATE_* flags), or
 * with dirty_bitmap the bitmap's (PYDR_NBD_DIRTY). *reached tells how far
 * they go: less than the range's end when out was full. NBD devices only
 * (-EOPNOTSUPP for a file). */
PYDR_API int pydr_device_extents(pydr_device *device, int dirty_bitmap, const char *bitmap,
                                 uint64_t offset, uint64_t length, uint64_t *out,
                                 size_t cap, size_t *count, uint64_t *reached,
                                 pydr_error *error);

/*
 * Block signer: hashes a byte range of a device in fixed blocks.
 * One signer per thread; it owns an aligned I/O buffer of about io_size bytes
 * (0 picks the default), rounded up to a multiple of block_size.
 * Files: by default data is hashed from guarded mmap windows (faster: no
 * copy); an I/O error there is caught (SIGBUS) and the window re-read with
 * pread so the error comes back as -EIO with its offset. The first signer
 * created installs a process-wide SIGBUS handler that passes every other
 * SIGBUS on to the handler that was there before. PYDR_SIGN_NO_MMAP uses
 * pread only. NBD exports: holes and zero extents are not read (the hash of
 * a zero block); data is read with several requests in flight.
 */
typedef struct pydr_signer pydr_signer;

#define PYDR_SIGN_NO_MMAP 1u

/* -EINVAL for a bad block size or flag, PYDR_E_UNKNOWN_ALGORITHM. */
PYDR_API int pydr_signer_create(pydr_signer **out, uint32_t block_size,
                                int algorithm, size_t io_size, unsigned flags);
PYDR_API void pydr_signer_free(pydr_signer *signer);

/*
 * Hashes [offset, offset + length) of device.
 *  - offset must be a multiple of the block size; length may end on a partial
 *    block only where the device ends, and that block is hashed over its real
 *    (short) length.
 *  - hashes receives nblocks * pydr_hash_words(algorithm) words, zero_mask one
 *    byte per block (1 when the block is all zeros, hole or data), where
 *    nblocks must equal ceil(length / block_size).
 *  - Holes (SEEK_DATA/SEEK_HOLE, NBD block status) are not read: their hash
 *    is the precomputed hash of a zero block. Files without hole support are
 *    read in full.
 *  - progress may be NULL. When its cancel flag is set the call stops within
 *    one I/O buffer and returns PYDR_E_CANCELLED.
 * On failure error->offset tells the device offset concerned (the first
 * failing block of a failed read).
 */
PYDR_API int pydr_signer_sign(pydr_signer *signer, pydr_device *device, uint64_t offset,
                              uint64_t length, uint64_t *hashes,
                              uint8_t *zero_mask, size_t nblocks,
                              pydr_progress *progress, pydr_error *error);

/*
 * Like pydr_signer_sign, but over `nspans` spans of the window
 * [offset, offset + nblocks blocks), reading each byte once for the caller:
 *  - spans[2i] is a span's start (absolute, block aligned), spans[2i+1] its
 *    length (it may end on a short block only in the window's last block,
 *    where the device ends); spans sorted, disjoint, inside the window, else
 *    -EINVAL at the bad span's start. Empty spans are allowed and ignored.
 *  - hashes / zero_mask are the WINDOW's arrays (nblocks entries, indexed
 *    from `offset`); blocks outside every span are left untouched.
 *  - keep, when not NULL, gets every byte read at (device offset - offset);
 *    keep_len must cover every span (keep_len >= the window's byte length
 *    does), else -EINVAL. Blocks that were not read (file holes, NBD hole
 *    and zero extents) are left untouched in keep and have zero_mask 1.
 *    Files: pread straight into keep (no mmap, no bounce buffer). NBD:
 *    reads go straight into keep, many requests in flight across all spans.
 *    Without keep, files are hashed through mmap windows as by
 *    pydr_signer_sign.
 *  - A memory device (pydr_device_open_memory) is hashed from its memory.
 * Progress, cancel and errors as pydr_signer_sign: a failed read is
 * reported at its first failing block; on failure keep, hashes and
 * zero_mask hold what was done before, and garbage nowhere it was not
 * asked to write.
 */
PYDR_API int pydr_signer_sign_spans(pydr_signer *signer, pydr_device *device, uint64_t offset,
                                    size_t nblocks, const uint64_t *spans, size_t nspans,
                                    uint64_t *hashes, uint8_t *zero_mask,
                                    uint8_t *keep, size_t keep_len,
                                    pydr_progress *progress, pydr_error *error);

/*
 * Zero masks: in memory one byte per block (0 or 1), on disk one bit per
 * block, block i in bit (i % 8) of byte i / 8. pack writes (nblocks + 7) / 8
 * bytes, unpack nblocks; both return the number of set blocks.
 * tail_clear tells whether the unused bits of the last packed byte are 0.
 */
PYDR_API size_t pydr_mask_pack(const uint8_t *mask, size_t nblocks,
                               uint8_t *packed);
PYDR_API size_t pydr_mask_unpack(const uint8_t *packed, size_t nblocks,
                                 uint8_t *mask);
PYDR_API int pydr_mask_tail_clear(const uint8_t *packed, size_t nblocks);

/* Streaming XXH3-128 (seed 0) for checksums of pydr's file formats. */
typedef struct pydr_digest pydr_digest;

PYDR_API int pydr_digest_create(pydr_digest **out);
PYDR_API void pydr_digest_free(pydr_digest *digest);
PYDR_API int pydr_digest_reset(pydr_digest *digest);
PYDR_API int pydr_digest_update(pydr_digest *digest, const void *data,
                                size_t size);
/* Writes [low64, high64]; the digest may keep being updated afterwards. */
PYDR_API void pydr_digest_final(const pydr_digest *digest, uint64_t out[2]);

/*
 * Delta and undo-journal records (docs/FORMAT.md). A record is a 64-byte
 * little-endian header, followed for DATA records by `length` payload bytes.
 */
#define PYDR_RECORD_HEADER 64u
#define PYDR_RECORD_MAX (16u * 1024u * 1024u) /* payload bytes per record */
#define PYDR_RECORD_DATA 1u
#define PYDR_RECORD_ZERO 2u
#define PYDR_RECORD_END 3u
#define PYDR_RECORD_COMMIT 4u

typedef struct pydr_record {
    uint32_t type;
    uint64_t offset;
    uint64_t length;
    uint64_t base_hash[2];  /* digest of the base's block hashes it replaces */
    uint64_t payload_hash;  /* xxh3-64 of the payload (DATA)                 */
    uint64_t seq;           /* record number, from 0                          */
} pydr_record;

/* Fills the 64-byte header at out, checksum included. */
PYDR_API void pydr_record_build(uint8_t *out, const pydr_record *record);
/* Checks and decodes a 64-byte header; PYDR_E_CORRUPT if it is not valid. */
PYDR_API int pydr_record_parse(const uint8_t *in, pydr_record *record);

typedef struct pydr_scan {
    size_t complete;        /* bytes of whole records at the start of buf   */
    size_t records;         /* how many                                     */
    size_t journal_bound;   /* journal bytes their apply may need at most   */
    int end;                /* the last one is END (or COMMIT)              */
} pydr_scan;

/* Finds the whole records at the start of buf (stopping after END/COMMIT).
 * PYDR_E_CORRUPT when a header is invalid (error->offset: where it starts in
 * buf). */
PYDR_API int pydr_records_scan(const uint8_t *buf, size_t len, pydr_scan *scan,
                               pydr_error *error);

/* Digest of the per-block XXH3-128 hashes of data (blocks from its start). */
PYDR_API void pydr_blocks_digest(const void *data, size_t len,
                                 uint32_t block_size, uint64_t out[2]);
/* For each extent [off, off+len) (pairs in `extents`), the digest of the
 * signature hashes (2 words per block, nblocks of them) of the blocks it
 * covers, clipped to nblocks: what pydr_blocks_digest gives on those bytes. */
PYDR_API void pydr_hashes_digest_ranges(const uint64_t *hashes, size_t nblocks,
                                        uint32_t block_size,
                                        const uint64_t *extents, size_t n,
                                        uint64_t *out);

/* Encodes extents of src as records into out[0, cap): ZERO where zero[i],
 * else DATA read from src; base_hashes gives 2 words per extent; records
 * are numbered from first_seq. Stops at the first record that does not fit:
 * *done extents were written in *used bytes. If payload_hashes is not NULL,
 * the XXH3-128 of every block_size block of every DATA payload, as read,
 * is appended there (2 words per block, in extent order; *payload_hashes_used
 * words in all): what the target will hold, even if the source changed
 * since it was signed. A failed read is reported at its device offset;
 * *used, *done and *payload_hashes_used then tell what was encoded before. */
PYDR_API int pydr_encode(pydr_device *src, const uint64_t *extents, const uint8_t *zero,
                         const uint64_t *base_hashes, size_t n, uint64_t first_seq,
                         uint8_t *out, size_t cap, size_t *used, size_t *done,
                         uint32_t block_size, uint64_t *payload_hashes,
                         size_t payload_hashes_cap, size_t *payload_hashes_used,
                         pydr_error *error);

typedef struct pydr_apply_state {
    uint64_t next_offset;   /* records must start at or after this         */
    uint64_t next_seq;      /* and carry this sequence number              */
    uint64_t records, data_bytes, zero_bytes;
} pydr_apply_state;

/* scratch holds one record's old content (PYDR_RECORD_MAX + block_size is
 * always enough); journal needs, per record, its length + block_size + 64
 * bytes per block (pydr_journal_capacity).
 * Checks every DATA/ZERO record of a batch (header and payload checksums,
 * order, bounds, alignment) and, before anything is written, reads the old
 * content each one replaces, verifies it against the record's base hash
 * (PYDR_E_BASE_MISMATCH, or PYDR_E_ALREADY_APPLIED when the new content is
 * already there), and appends it to `journal` as undo records. Writes
 * nothing to the target. Errors: PYDR_E_CORRUPT at the record's position in
 * recs; anything about the target at the record's device offset (a failed
 * read: where it failed). */
PYDR_API int pydr_apply_prepare(pydr_device *target, const uint8_t *recs, size_t len,
                                uint32_t block_size, uint64_t old_size,
                                uint64_t new_size, pydr_apply_state *state,
                                uint8_t *scratch, size_t scratch_cap,
                                uint8_t *journal, size_t journal_cap,
                                size_t *journal_used, pydr_error *error);

/* Writes DATA records and ZERO records: holes in a file, BLKZEROOUT on a
 * block device (PYDR_DEVICE_BLOCK), WRITE_ZEROES on an NBD export, written
 * zeros where none of these works. Used for deltas and for undo journals
 * alike. No fsync: the caller decides when. Errors: PYDR_E_CORRUPT at the
 * record's position in recs, a failed write at its device offset. */
PYDR_API int pydr_apply_write(pydr_device *target, const uint8_t *recs, size_t len,
                              pydr_error *error);

/* Starts writing a file's dirty pages back (sync_file_range WRITE), so that
 * a later fdatasync has less to wait for. A hint, not a durability point. */
PYDR_API int pydr_start_writeback(int fd);

#ifdef __cplusplus
}
#endif
#endif /* PYDR_H */
