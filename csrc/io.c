/* io.c -- whole-buffer pread/pwrite with EINTR retries, and the file device
 * (dev.h): reads, writes, and zeros as holes (files) or BLKZEROOUT (block
 * devices), written zeros where neither works. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "dev.h"
#include "fail.h"
#include "io.h"
#include "pydr.h"

int pydr_pread_full(int fd, void *dst, size_t len, uint64_t off, pydr_error *error)
{
    size_t got = 0;
    while (got < len) {
        ssize_t n = pread(fd, (uint8_t *)dst + got, len - got, (off_t)(off + got));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return pydr_fail_at(error, n < 0 ? -errno : PYDR_E_FILE_CHANGED, off + got);
        got += (size_t)n;
    }
    return 0;
}

int pydr_pwrite_full(int fd, const void *src, size_t len, uint64_t off, pydr_error *error)
{
    size_t put = 0;
    while (put < len) {
        ssize_t n = pwrite(fd, (const uint8_t *)src + put, len - put, (off_t)(off + put));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return pydr_fail_at(error, n < 0 ? -errno : -EIO, off + put);
        put += (size_t)n;
    }
    return 0;
}

static const uint8_t zeros[1 << 16];

static int file_read(pydr_device *d, void *dst, size_t len, uint64_t off, pydr_error *error)
{
    return pydr_pread_full(d->fd, dst, len, off, error);
}

static int file_write(pydr_device *d, const void *src, size_t len, uint64_t off,
                      pydr_error *error)
{
    return pydr_pwrite_full(d->fd, src, len, off, error);
}

static int file_zero(pydr_device *d, uint64_t off, uint64_t len, pydr_error *error)
{
    if (d->is_block_device) {
        uint64_t range[2] = {off, len};
        if (off % 512 == 0 && len % 512 == 0 && ioctl(d->fd, BLKZEROOUT, range) == 0)
            return 0;
    } else if (fallocate(d->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off,
                         (off_t)len) == 0) {
        return 0;
    }
    /* neither works here (e.g. tmpfs without hole punching): write zeros */
    while (len) {
        size_t n = len < sizeof zeros ? (size_t)len : sizeof zeros;
        int rc = pydr_pwrite_full(d->fd, zeros, n, off, error);
        if (rc)
            return rc;
        off += n;
        len -= n;
    }
    return 0;
}

void pydr_dev_file(pydr_device *d, int fd, int is_block_device)
{
    d->read = file_read;
    d->write = file_write;
    d->zero = file_zero;
    d->fd = fd;
    d->is_block_device = is_block_device;
    d->nbd = NULL;
}
