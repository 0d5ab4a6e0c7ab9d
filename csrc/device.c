/* device.c -- the public device handle (pydr.h): one type for a file or
 * block device, an NBD export and caller memory; the kind-specific work is
 * in io.c (files), nbd.c (exports) and memory.c. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include "dev.h"
#include "fail.h"
#include "pydr.h"

int pydr_device_open_fd(pydr_device **out, int fd, unsigned flags)
{
    if (!out)
        return -EINVAL;
    *out = NULL;
    if (fd < 0 || (flags & ~(unsigned)PYDR_DEVICE_BLOCK))
        return -EINVAL;
    pydr_device *d = calloc(1, sizeof *d);
    if (!d)
        return -ENOMEM;
    pydr_dev_file(d, fd, (flags & PYDR_DEVICE_BLOCK) != 0);
    *out = d;
    return 0;
}

int pydr_device_open_nbd(pydr_device **out, const char *uri, const char *bitmap,
                         unsigned flags, pydr_error *error)
{
    PYDR_ERROR_OR_LOCAL(error);
    if (!out || !uri)
        return pydr_fail(error, -EINVAL);
    *out = NULL;
    pydr_device *d = calloc(1, sizeof *d);
    if (!d)
        return pydr_fail(error, -ENOMEM);
    int rc = pydr_nbd_connect(d, uri, bitmap, flags, error);
    if (rc) {
        free(d);
        return rc;
    }
    *out = d;
    return 0;
}

void pydr_device_free(pydr_device *d)
{
    if (!d)
        return;
    if (d->nbd)
        pydr_nbd_close(d->nbd);
    free(d);
}

int pydr_device_size(pydr_device *d, uint64_t *size, pydr_error *error)
{
    PYDR_ERROR_OR_LOCAL(error);
    if (!d || !size)
        return pydr_fail(error, -EINVAL);
    if (d->nbd)
        return pydr_nbd_size(d->nbd, size, error);
    if (d->mem) {
        *size = pydr_memory_end(d);
        return 0;
    }
    int is_block;
    int rc = pydr_fd_size(d->fd, size, &is_block);
    return rc ? pydr_fail(error, rc) : 0;
}

int pydr_device_can(pydr_device *d, int what)
{
    if (!d)
        return 0;
    if (d->nbd)
        return pydr_nbd_can(d->nbd, what);
    if (d->mem)  /* read-only; threads may read it side by side */
        return what == PYDR_READ_ONLY || what == PYDR_CAN_MULTI_CONN;
    switch (what) {
    case PYDR_CAN_FLUSH:
    case PYDR_CAN_ZERO:
    case PYDR_CAN_MULTI_CONN:
        return 1;
    case PYDR_READ_ONLY: {
        int fl = fcntl(d->fd, F_GETFL);
        return fl != -1 && (fl & O_ACCMODE) == O_RDONLY;
    }
    default:
        return 0;
    }
}

int pydr_device_flush(pydr_device *d, pydr_error *error)
{
    PYDR_ERROR_OR_LOCAL(error);
    if (!d)
        return pydr_fail(error, -EINVAL);
    if (d->nbd)
        return pydr_nbd_flush(d->nbd, error);
    if (d->mem)
        return 0;  /* nothing was written */
    return fdatasync(d->fd) == 0 ? 0 : pydr_fail(error, -errno);
}

int pydr_device_pread(pydr_device *d, void *buf, size_t len, uint64_t off, pydr_error *error)
{
    PYDR_ERROR_OR_LOCAL(error);
    if (!d || (!buf && len))
        return pydr_fail(error, -EINVAL);
    return d->read(d, buf, len, off, error);
}

int pydr_device_pwrite(pydr_device *d, const void *buf, size_t len, uint64_t off,
                       pydr_error *error)
{
    PYDR_ERROR_OR_LOCAL(error);
    if (!d || (!buf && len))
        return pydr_fail(error, -EINVAL);
    return d->write(d, buf, len, off, error);
}

int pydr_device_extents(pydr_device *d, int dirty_bitmap, const char *bitmap,
                        uint64_t offset, uint64_t length, uint64_t *out, size_t cap,
                        size_t *count, uint64_t *reached, pydr_error *error)
{
    PYDR_ERROR_OR_LOCAL(error);
    if (!d || !out || !count || !reached)
        return pydr_fail(error, -EINVAL);
    if (!d->nbd)
        return pydr_fail(error, -EOPNOTSUPP);
    return pydr_nbd_extents(d->nbd, dirty_bitmap, bitmap, offset, length, out, cap, count,
                            reached, error);
}
