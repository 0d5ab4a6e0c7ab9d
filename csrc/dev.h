/* dev.h -- the device handle (internal): a file descriptor, an NBD
 * connection, or caller memory (memory.c). The delta code (encode, verify-and-journal, write) and the
 * signer work on either through these operations; errors go to the
 * caller's pydr_error (fail.h), never into the device. */
#ifndef PYDR_DEV_H
#define PYDR_DEV_H

#include <stddef.h>
#include <stdint.h>

#include "pydr.h"

typedef struct pydr_nbd pydr_nbd;

struct pydr_device {
    /* Each returns 0 or a negative code, filling *error (never NULL here)
     * with the offset on failure. */
    int (*read)(pydr_device *d, void *dst, size_t len, uint64_t off, pydr_error *error);
    int (*write)(pydr_device *d, const void *src, size_t len, uint64_t off,
                 pydr_error *error);
    /* [off, off + len) reads as zeros afterwards (a hole where possible). */
    int (*zero)(pydr_device *d, uint64_t off, uint64_t len, pydr_error *error);
    int fd;                /* a file's descriptor (the caller's), or -1   */
    int is_block_device;
    struct pydr_nbd *nbd;  /* the NBD connection (nbd.c), or NULL         */
    /* A memory device (memory.c): it reads as mem[0, mem_len) lying at
     * device offset mem_offset; mem is NULL for the other kinds. */
    const uint8_t *mem;
    size_t mem_len;
    uint64_t mem_offset;
};

/* A file device (io.c), filled in place. */
void pydr_dev_file(pydr_device *d, int fd, int is_block_device);

/* nbd.c: the NBD side of the public device functions. connect fills d
 * (its operations and d->nbd); the others take d->nbd. */
int pydr_nbd_connect(pydr_device *d, const char *uri, const char *bitmap, unsigned flags,
                     pydr_error *error);
void pydr_nbd_close(struct pydr_nbd *n);
int pydr_nbd_size(struct pydr_nbd *n, uint64_t *size, pydr_error *error);
int pydr_nbd_can(struct pydr_nbd *n, int what);
int pydr_nbd_flush(struct pydr_nbd *n, pydr_error *error);
int pydr_nbd_extents(struct pydr_nbd *n, int dirty_bitmap, const char *bitmap,
                     uint64_t offset, uint64_t length, uint64_t *out, size_t cap,
                     size_t *count, uint64_t *reached, pydr_error *error);
/* Signs the spans of a window (pydr_signer_sign_spans checked them): reads
 * go straight into keep when it is not NULL, several in flight across all
 * spans. pydr_signer_sign is the same with one span and no keep. */
int pydr_nbd_sign_spans(struct pydr_nbd *n, uint64_t offset, size_t nblocks,
                        const uint64_t *spans, size_t nspans, uint32_t block_size,
                        int algorithm, uint64_t *hashes, uint8_t *zero_mask, uint8_t *keep,
                        pydr_progress *progress, pydr_error *error);

/* memory.c: a memory device's size (where its memory ends). */
uint64_t pydr_memory_end(const pydr_device *d);

#endif
