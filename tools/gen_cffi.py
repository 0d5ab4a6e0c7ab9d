"""Emit the C source of the cffi API-mode module pydr._core.

Run by CMake at build time: ``python tools/gen_cffi.py OUT.c``. The cdef below
is written by hand for pydr's own small API (csrc/pydr.h), never produced by
running a header through the preprocessor.
"""

import sys

import cffi

CDEF = """
#define PYDR_E_CANCELLED ...
#define PYDR_E_FILE_CHANGED ...
#define PYDR_E_UNSUPPORTED ...
#define PYDR_XXH3_64 ...
#define PYDR_XXH3_128 ...
#define PYDR_BLOCK_MIN ...
#define PYDR_BLOCK_MAX ...
#define PYDR_VERSION_MAJOR ...
#define PYDR_VERSION_MINOR ...
#define PYDR_VERSION_PATCH ...
#define PYDR_VERSION_NUMBER ...
unsigned pydr_version_number(void);
const char *pydr_version_string(void);

#define PYDR_E_UNKNOWN_ALGORITHM ...
typedef struct pydr_error {
    int code;
    int has_offset;
    uint64_t offset;
    char detail[256];
} pydr_error;

const char *pydr_strerror(int code);
int pydr_hash_words(int algorithm);
int pydr_hash(int algorithm, const void *data, size_t size, uint64_t *out);
const char *pydr_kernel_name(void);

typedef struct pydr_progress {
    uint64_t done;
    uint64_t read;
    int cancel;
} pydr_progress;
uint64_t pydr_progress_done(const pydr_progress *p);
uint64_t pydr_progress_read(const pydr_progress *p);
void pydr_progress_request_cancel(pydr_progress *p);

int pydr_fd_size(int fd, uint64_t *size, int *is_block_device);
int pydr_open_beneath(int dir_fd, const char *path, int flags, unsigned mode);
int pydr_file_identity(int dir_fd, const char *path, uint64_t identity[5]);

#define PYDR_E_NO_NBD ...
#define PYDR_E_NO_BITMAP ...
typedef struct pydr_device pydr_device;
#define PYDR_DEVICE_BLOCK ...
#define PYDR_NBD_WRITE ...
#define PYDR_NBD_EXTRA ...
#define PYDR_CAN_FLUSH ...
#define PYDR_CAN_ZERO ...
#define PYDR_CAN_MULTI_CONN ...
#define PYDR_READ_ONLY ...
#define PYDR_NBD_STATE_HOLE ...
#define PYDR_NBD_STATE_ZERO ...
#define PYDR_NBD_DIRTY ...
int pydr_nbd_available(void);
int pydr_device_open_fd(pydr_device **out, int fd, unsigned flags);
int pydr_device_open_nbd(pydr_device **out, const char *uri, const char *bitmap,
                         unsigned flags, pydr_error *error);
int pydr_device_open_memory(pydr_device **out, const void *data, size_t len,
                            uint64_t offset);
void pydr_device_free(pydr_device *device);
int pydr_device_size(pydr_device *device, uint64_t *size, pydr_error *error);
int pydr_device_can(pydr_device *device, int what);
int pydr_device_flush(pydr_device *device, pydr_error *error);
int pydr_device_pread(pydr_device *device, void *buf, size_t len, uint64_t off,
                      pydr_error *error);
int pydr_device_pwrite(pydr_device *device, const void *buf, size_t len, uint64_t off,
                       pydr_error *error);
int pydr_device_extents(pydr_device *device, int dirty_bitmap, const char *bitmap,
                        uint64_t offset, uint64_t length, uint64_t *out, size_t cap,
                        size_t *count, uint64_t *reached, pydr_error *error);

typedef struct pydr_signer pydr_signer;
#define PYDR_SIGN_NO_MMAP ...
int pydr_signer_create(pydr_signer **out, uint32_t block_size, int algorithm,
                       size_t io_size, unsigned flags);
void pydr_signer_free(pydr_signer *signer);
int pydr_signer_sign(pydr_signer *signer, pydr_device *device, uint64_t offset,
                     uint64_t length, uint64_t *hashes, uint8_t *zero_mask,
                     size_t nblocks, pydr_progress *progress, pydr_error *error);
int pydr_signer_sign_spans(pydr_signer *signer, pydr_device *device, uint64_t offset,
                           size_t nblocks, const uint64_t *spans, size_t nspans,
                           uint64_t *hashes, uint8_t *zero_mask, uint8_t *keep,
                           size_t keep_len, pydr_progress *progress, pydr_error *error);

size_t pydr_mask_pack(const uint8_t *mask, size_t nblocks, uint8_t *packed);
size_t pydr_mask_unpack(const uint8_t *packed, size_t nblocks, uint8_t *mask);
int pydr_mask_tail_clear(const uint8_t *packed, size_t nblocks);

#define PYDR_E_CORRUPT ...
#define PYDR_E_BASE_MISMATCH ...
#define PYDR_E_ALREADY_APPLIED ...
#define PYDR_E_NO_ROOM ...
#define PYDR_RECORD_HEADER ...
#define PYDR_RECORD_MAX ...
#define PYDR_RECORD_DATA ...
#define PYDR_RECORD_ZERO ...
#define PYDR_RECORD_END ...
#define PYDR_RECORD_COMMIT ...

typedef struct pydr_record {
    uint32_t type;
    uint64_t offset;
    uint64_t length;
    uint64_t base_hash[2];
    uint64_t payload_hash;
    uint64_t seq;
} pydr_record;
void pydr_record_build(uint8_t *out, const pydr_record *record);
int pydr_record_parse(const uint8_t *in, pydr_record *record);

typedef struct pydr_scan {
    size_t complete;
    size_t records;
    size_t journal_bound;
    int end;
} pydr_scan;
int pydr_records_scan(const uint8_t *buf, size_t len, pydr_scan *scan, pydr_error *error);
void pydr_blocks_digest(const void *data, size_t len, uint32_t block_size,
                        uint64_t out[2]);
void pydr_hashes_digest_ranges(const uint64_t *hashes, size_t nblocks,
                               uint32_t block_size, const uint64_t *extents,
                               size_t n, uint64_t *out);
int pydr_encode(pydr_device *src, const uint64_t *extents, const uint8_t *zero,
                const uint64_t *base_hashes, size_t n, uint64_t first_seq,
                uint8_t *out, size_t cap, size_t *used, size_t *done,
                uint32_t block_size, uint64_t *payload_hashes,
                size_t payload_hashes_cap, size_t *payload_hashes_used,
                pydr_error *error);

typedef struct pydr_apply_state {
    uint64_t next_offset;
    uint64_t next_seq;
    uint64_t records, data_bytes, zero_bytes;
} pydr_apply_state;
int pydr_apply_prepare(pydr_device *target, const uint8_t *recs, size_t len,
                       uint32_t block_size, uint64_t old_size, uint64_t new_size,
                       pydr_apply_state *state, uint8_t *scratch,
                       size_t scratch_cap, uint8_t *journal,
                       size_t journal_cap, size_t *journal_used, pydr_error *error);
int pydr_apply_write(pydr_device *target, const uint8_t *recs, size_t len,
                     pydr_error *error);

int pydr_start_writeback(int fd);

typedef struct pydr_digest pydr_digest;
int pydr_digest_create(pydr_digest **out);
void pydr_digest_free(pydr_digest *digest);
int pydr_digest_reset(pydr_digest *digest);
int pydr_digest_update(pydr_digest *digest, const void *data, size_t size);
void pydr_digest_final(const pydr_digest *digest, uint64_t out[2]);
"""


def main(out_path):
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    ffi.set_source("pydr._core", '#include "pydr.h"')
    ffi.emit_c_code(out_path)


if __name__ == "__main__":
    main(sys.argv[1])
