/* dev.h -- where the core reads and writes (internal): a file descriptor or
 * an NBD connection. The delta code (encode, verify-and-journal, write) works
 * on either through these three operations. */
#ifndef PYDR_DEV_H
#define PYDR_DEV_H

#include <stddef.h>
#include <stdint.h>

typedef struct pydr_dev pydr_dev;

struct pydr_dev {
    /* Each returns 0 or a negative code, setting *error_offset on failure. */
    int (*read)(const pydr_dev *d, void *dst, size_t len, uint64_t off,
                uint64_t *error_offset);
    int (*write)(const pydr_dev *d, const void *src, size_t len, uint64_t off,
                 uint64_t *error_offset);
    /* [off, off + len) reads as zeros afterwards (a hole where possible). */
    int (*zero)(const pydr_dev *d, uint64_t off, uint64_t len, uint64_t *error_offset);
    int fd;
    int is_block_device;
    void *nbd;   /* struct nbd_handle *, for an NBD connection */
};

/* A device over an open file or block device. */
void pydr_dev_file(pydr_dev *d, int fd, int is_block_device);

/* The delta code on a device (delta.c); the public pydr_encode,
 * pydr_apply_prepare and pydr_apply_write are these on a file. */
int pydr_encode_dev(const pydr_dev *src, const uint64_t *extents, const uint8_t *zero,
                    const uint64_t *base_hashes, size_t n, uint64_t first_seq,
                    uint8_t *out, size_t cap, size_t *used, size_t *done,
                    uint32_t block_size, uint64_t *payload_hashes,
                    size_t payload_hashes_cap, size_t *payload_hashes_used,
                    uint64_t *error_offset);
struct pydr_apply_state;
int pydr_apply_prepare_dev(const pydr_dev *target, const uint8_t *recs, size_t len,
                           uint32_t block_size, uint64_t old_size, uint64_t new_size,
                           struct pydr_apply_state *state, uint8_t *scratch,
                           size_t scratch_cap, uint8_t *journal, size_t journal_cap,
                           size_t *journal_used);
int pydr_apply_write_dev(const pydr_dev *target, const uint8_t *recs, size_t len,
                         uint64_t *error_offset);

#endif
