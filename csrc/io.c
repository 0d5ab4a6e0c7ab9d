/* io.c -- whole-buffer pread/pwrite with EINTR retries. */
#include <errno.h>
#include <unistd.h>

#include "io.h"
#include "pydr.h"

int pydr_pread_full(int fd, void *dst, size_t len, uint64_t off, uint64_t *error_offset)
{
    size_t got = 0;
    while (got < len) {
        ssize_t n = pread(fd, (uint8_t *)dst + got, len - got, (off_t)(off + got));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            *error_offset = off + got;
            return n < 0 ? -errno : PYDR_E_FILE_CHANGED;
        }
        got += (size_t)n;
    }
    return 0;
}

int pydr_pwrite_full(int fd, const void *src, size_t len, uint64_t off,
                     uint64_t *error_offset)
{
    size_t put = 0;
    while (put < len) {
        ssize_t n = pwrite(fd, (const uint8_t *)src + put, len - put, (off_t)(off + put));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            *error_offset = off + put;
            return n < 0 ? -errno : -EIO;
        }
        put += (size_t)n;
    }
    return 0;
}
