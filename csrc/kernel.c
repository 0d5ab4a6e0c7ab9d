/* kernel.c -- block hashing and zero detection over an in-memory buffer.
 * Built once per instruction set: PYDR_KERNEL_VARIANT names the variant
 * (generic, avx2) and the build sets the matching compiler flags and
 * XXH_VECTOR. Everything from xxHash is inlined and static here. */
#define XXH_INLINE_ALL
#define XXH_STATIC_LINKING_ONLY
#include <xxhash.h>
#include <string.h>

#include "kernel.h"
#include "pydr.h"

#ifndef PYDR_KERNEL_VARIANT
#  define PYDR_KERNEL_VARIANT generic
#endif
#define PYDR_STR2(x) #x
#define PYDR_STR(x) PYDR_STR2(x)
#define PYDR_CAT2(a, b) a##b
#define PYDR_CAT(a, b) PYDR_CAT2(a, b)

static inline uint64_t load64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Most data blocks have a non-zero byte at one end, so test those first;
 * only blocks that look zero are scanned in full. */
static int is_zero(const uint8_t *p, size_t n)
{
    size_t i = 0;
    if (n >= 16 && (load64(p) | load64(p + n - 8)))
        return 0;
    for (; i + 64 <= n; i += 64) {
        uint64_t acc = 0;
        for (int j = 0; j < 8; j++)
            acc |= load64(p + i + 8 * j);
        if (acc)
            return 0;
    }
    for (; i < n; i++)
        if (p[i])
            return 0;
    return 1;
}

static void hash_one(int algorithm, const void *data, size_t size,
                     uint64_t *out)
{
    if (algorithm == PYDR_XXH3_64) {
        out[0] = XXH3_64bits(data, size);
    } else {
        XXH128_hash_t h = XXH3_128bits(data, size);
        out[0] = h.low64;
        out[1] = h.high64;
    }
}

static size_t hash_blocks(const uint8_t *data, size_t size, uint32_t block_size,
                          int algorithm, const uint64_t *zero_hash,
                          uint64_t *hashes, uint8_t *zero_mask)
{
    const unsigned words = algorithm == PYDR_XXH3_64 ? 1 : 2;
    size_t zeros = 0;
    size_t pos = 0;
    for (size_t b = 0; pos < size; b++, pos += block_size) {
        size_t len = size - pos < block_size ? size - pos : block_size;
        uint64_t *out = hashes + b * words;
        if (is_zero(data + pos, len)) {
            zero_mask[b] = 1;
            zeros++;
            if (len == block_size) {
                out[0] = zero_hash[0];
                if (words == 2)
                    out[1] = zero_hash[1];
                continue;
            }
        } else {
            zero_mask[b] = 0;
        }
        hash_one(algorithm, data + pos, len, out);
    }
    return zeros;
}

const pydr_kernel PYDR_CAT(pydr_kernel_, PYDR_KERNEL_VARIANT) = {
    PYDR_STR(PYDR_KERNEL_VARIANT),
    hash_blocks,
    hash_one,
    is_zero,
};
