/* fileinfo.c -- size of regular files and block devices; a file's identity;
 * progress record. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <linux/fs.h>

#include "pydr.h"

int pydr_fd_size(int fd, uint64_t *size, int *is_block_device)
{
    struct stat st;
    if (!size || !is_block_device)
        return -EINVAL;
    if (fstat(fd, &st) != 0)
        return -errno;
    if (S_ISREG(st.st_mode)) {
        *size = (uint64_t)st.st_size;
        *is_block_device = 0;
        return 0;
    }
    if (S_ISBLK(st.st_mode)) {
        uint64_t bytes = 0;
        if (ioctl(fd, BLKGETSIZE64, &bytes) != 0)
            return -errno;
        *size = bytes;
        *is_block_device = 1;
        return 0;
    }
    if (S_ISDIR(st.st_mode))
        return -EISDIR;
    return PYDR_E_UNSUPPORTED;
}

int pydr_file_identity(int dir_fd, const char *path, uint64_t identity[5])
{
    struct statx stx;
    int flags = AT_STATX_FORCE_SYNC;
    if (!path || !identity)
        return -EINVAL;
    if (!*path)
        flags |= AT_EMPTY_PATH;
    if (statx(dir_fd, path, flags, STATX_BASIC_STATS, &stx) != 0)
        return -errno;
    identity[0] = stx.stx_size;
    identity[1] = (uint64_t)stx.stx_mtime.tv_sec * 1000000000u + stx.stx_mtime.tv_nsec;
    identity[2] = (uint64_t)stx.stx_ctime.tv_sec * 1000000000u + stx.stx_ctime.tv_nsec;
    identity[3] = stx.stx_ino;
    identity[4] = ((uint64_t)stx.stx_dev_major << 32) | stx.stx_dev_minor;
    return 0;
}

uint64_t pydr_progress_done(const pydr_progress *p)
{
    return __atomic_load_n(&p->done, __ATOMIC_RELAXED);
}

uint64_t pydr_progress_read(const pydr_progress *p)
{
    return __atomic_load_n(&p->read, __ATOMIC_RELAXED);
}

void pydr_progress_request_cancel(pydr_progress *p)
{
    __atomic_store_n(&p->cancel, 1, __ATOMIC_RELEASE);
}
