/* io.h -- whole-buffer pread/pwrite (internal), shared by the signer and
 * the file device. */
#ifndef PYDR_IO_H
#define PYDR_IO_H

#include <stddef.h>
#include <stdint.h>

#include "pydr.h"

/* Reads exactly len bytes at off, retrying short reads and EINTR. Returns 0,
 * -errno, or PYDR_E_FILE_CHANGED at end of file, at the offset where it
 * stopped (in *error). */
int pydr_pread_full(int fd, void *dst, size_t len, uint64_t off, pydr_error *error);
/* Writes exactly len bytes at off. Returns 0 or -errno (at its offset). */
int pydr_pwrite_full(int fd, const void *src, size_t len, uint64_t off, pydr_error *error);

#endif
