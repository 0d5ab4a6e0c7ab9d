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

const char *pydr_strerror(int code);
unsigned pydr_hash_words(int algorithm);
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

typedef struct pydr_signer pydr_signer;
#define PYDR_SIGN_NO_MMAP ...
int pydr_signer_create(pydr_signer **out, uint32_t block_size, int algorithm,
                       size_t io_size, unsigned flags);
void pydr_signer_free(pydr_signer *signer);
int pydr_signer_sign(pydr_signer *signer, int fd, uint64_t offset,
                     uint64_t length, uint64_t *hashes, uint8_t *zero_mask,
                     size_t nblocks, pydr_progress *progress);
uint64_t pydr_signer_error_offset(const pydr_signer *signer);

size_t pydr_mask_pack(const uint8_t *mask, size_t nblocks, uint8_t *packed);
size_t pydr_mask_unpack(const uint8_t *packed, size_t nblocks, uint8_t *mask);
int pydr_mask_tail_clear(const uint8_t *packed, size_t nblocks);

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
