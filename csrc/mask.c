/* mask.c -- zero masks: one byte per block in memory, one bit on disk. */
#include "pydr.h"

size_t pydr_mask_pack(const uint8_t *mask, size_t nblocks, uint8_t *packed)
{
    size_t count = 0;
    for (size_t i = 0; i < (nblocks + 7) / 8; i++)
        packed[i] = 0;
    for (size_t i = 0; i < nblocks; i++) {
        if (mask[i]) {
            packed[i >> 3] |= (uint8_t)(1u << (i & 7));
            count++;
        }
    }
    return count;
}

size_t pydr_mask_unpack(const uint8_t *packed, size_t nblocks, uint8_t *mask)
{
    size_t count = 0;
    for (size_t i = 0; i < nblocks; i++) {
        mask[i] = (packed[i >> 3] >> (i & 7)) & 1u;
        count += mask[i];
    }
    return count;
}

int pydr_mask_tail_clear(const uint8_t *packed, size_t nblocks)
{
    if (nblocks % 8 == 0)
        return 1;
    return (packed[nblocks / 8] >> (nblocks % 8)) == 0;
}
