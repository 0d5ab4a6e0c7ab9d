/* io.h -- whole-buffer pread/pwrite (internal), shared by the signer and
 * the delta code. */
#ifndef PYDR_IO_H
#define PYDR_IO_H

#include <stddef.h>
#include <stdint.h>

/* Reads exactly len bytes at off, retrying short reads and EINTR. Returns 0,
 * -errno, or PYDR_E_FILE_CHANGED at end of file; *error_offset tells where. */
int pydr_pread_full(int fd, void *dst, size_t len, uint64_t off, uint64_t *error_offset);
/* Writes exactly len bytes at off. Returns 0 or -errno (at *error_offset). */
int pydr_pwrite_full(int fd, const void *src, size_t len, uint64_t off,
                     uint64_t *error_offset);

#endif
