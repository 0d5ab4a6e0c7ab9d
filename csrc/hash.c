/* hash.c -- kernel dispatch, one-shot hashing and the streaming digest. */
#define XXH_INLINE_ALL
#define XXH_STATIC_LINKING_ONLY
#include <xxhash.h>
#include <errno.h>
#include <stdlib.h>

#include "kernel.h"
#include "pydr.h"

const pydr_kernel *pydr_kernel_get(void)
{
#if defined(PYDR_HAVE_AVX2_KERNEL)
    static const pydr_kernel *chosen;
    const pydr_kernel *k = __atomic_load_n(&chosen, __ATOMIC_ACQUIRE);
    if (!k) {
        __builtin_cpu_init();
        k = __builtin_cpu_supports("avx2") ? &pydr_kernel_avx2
                                           : &pydr_kernel_generic;
        __atomic_store_n(&chosen, k, __ATOMIC_RELEASE);
    }
    return k;
#else
    return &pydr_kernel_generic;
#endif
}

const char *pydr_kernel_name(void)
{
    return pydr_kernel_get()->name;
}

int pydr_hash_words(int algorithm)
{
    switch (algorithm) {
    case PYDR_XXH3_64: return 1;
    case PYDR_XXH3_128: return 2;
    default: return PYDR_E_UNKNOWN_ALGORITHM;
    }
}

int pydr_hash(int algorithm, const void *data, size_t size, uint64_t *out)
{
    if (pydr_hash_words(algorithm) < 0)
        return PYDR_E_UNKNOWN_ALGORITHM;
    if (!out || (!data && size))
        return -EINVAL;
    pydr_kernel_get()->hash(algorithm, data, size, out);
    return 0;
}

struct pydr_digest {
    XXH3_state_t *state;
};

int pydr_digest_create(pydr_digest **out)
{
    if (!out)
        return -EINVAL;
    *out = NULL;
    pydr_digest *d = malloc(sizeof *d);
    if (!d)
        return -ENOMEM;
    d->state = XXH3_createState();
    if (!d->state) {
        free(d);
        return -ENOMEM;
    }
    XXH3_128bits_reset(d->state);
    *out = d;
    return 0;
}

void pydr_digest_free(pydr_digest *d)
{
    if (!d)
        return;
    XXH3_freeState(d->state);
    free(d);
}

int pydr_digest_reset(pydr_digest *d)
{
    if (!d)
        return -EINVAL;
    XXH3_128bits_reset(d->state);
    return 0;
}

int pydr_digest_update(pydr_digest *d, const void *data, size_t size)
{
    if (!d || (!data && size))
        return -EINVAL;
    if (XXH3_128bits_update(d->state, data, size) != XXH_OK)
        return -EINVAL;
    return 0;
}

void pydr_digest_final(const pydr_digest *d, uint64_t out[2])
{
    XXH128_hash_t h = XXH3_128bits_digest(d->state);
    out[0] = h.low64;
    out[1] = h.high64;
}
