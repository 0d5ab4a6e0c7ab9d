/* kernel.h -- per-CPU hash kernels (internal). kernel.c is compiled once per
 * instruction set; hash.c picks the best one the CPU supports at run time. */
#ifndef PYDR_KERNEL_H
#define PYDR_KERNEL_H

#include <stddef.h>
#include <stdint.h>

typedef struct pydr_kernel {
    const char *name;
    /* Hashes the blocks of data[0, size): full blocks of block_size and a
     * last, shorter one when size is not a multiple. Writes words_per_block
     * words per block into hashes and 0/1 into zero_mask. A full all-zero
     * block takes zero_hash instead of being hashed. Returns the number of
     * all-zero blocks. */
    size_t (*hash_blocks)(const uint8_t *data, size_t size, uint32_t block_size,
                          int algorithm, const uint64_t *zero_hash,
                          uint64_t *hashes, uint8_t *zero_mask);
    void (*hash)(int algorithm, const void *data, size_t size, uint64_t *out);
    /* 1 when data[0, size) is all zeros. */
    int (*is_zero)(const uint8_t *data, size_t size);
} pydr_kernel;

extern const pydr_kernel pydr_kernel_generic;
#if defined(PYDR_HAVE_AVX2_KERNEL)
extern const pydr_kernel pydr_kernel_avx2;
#endif

/* The kernel chosen for this CPU. */
const pydr_kernel *pydr_kernel_get(void);

#endif
