/* beneath.c -- open a path that cannot leave a directory (openat2). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "pydr.h"

#ifndef SYS_openat2
#  if defined(__NR_openat2)
#    define SYS_openat2 __NR_openat2
#  else
#    define SYS_openat2 437  /* the same number on every Linux architecture */
#  endif
#endif

/* struct open_how and the RESOLVE_* flags of <linux/openat2.h> (Linux 5.6),
 * spelled out so that older headers build too. */
struct pydr_open_how {
    uint64_t flags;
    uint64_t mode;
    uint64_t resolve;
};
#define PYDR_RESOLVE_NO_MAGICLINKS 0x02
#define PYDR_RESOLVE_NO_SYMLINKS   0x04
#define PYDR_RESOLVE_BENEATH       0x08

int pydr_open_beneath(int dir_fd, const char *path, int flags, unsigned mode)
{
    struct pydr_open_how how;
    long fd;
    if (!path || !*path)
        return -EINVAL;
    memset(&how, 0, sizeof how);
    how.flags = (uint64_t)(unsigned)flags;
    /* the kernel refuses a mode without O_CREAT/O_TMPFILE */
    how.mode = ((flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE) ? mode : 0;
    how.resolve = PYDR_RESOLVE_BENEATH | PYDR_RESOLVE_NO_SYMLINKS | PYDR_RESOLVE_NO_MAGICLINKS;
    do {
        fd = syscall(SYS_openat2, dir_fd, path, &how, sizeof how);
    } while (fd < 0 && errno == EINTR);
    return fd < 0 ? -errno : (int)fd;
}
