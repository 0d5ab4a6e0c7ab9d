/* errors.c -- the words of the one error channel (negative errno or
 * PYDR_E_*), and the library's version. */
#include <string.h>

#include "pydr.h"

const char *pydr_strerror(int code)
{
    switch (code) {
    case 0: return "success";
    case PYDR_E_CANCELLED: return "operation cancelled";
    case PYDR_E_FILE_CHANGED: return "file ended before its expected size (changed while being read?)";
    case PYDR_E_UNSUPPORTED: return "not a regular file or block device";
    case PYDR_E_CORRUPT: return "corrupt record";
    case PYDR_E_BASE_MISMATCH: return "target does not hold the base this delta was made against";
    case PYDR_E_ALREADY_APPLIED: return "target already holds this delta's result";
    case PYDR_E_NO_ROOM: return "output buffer too small";
    case PYDR_E_NO_NBD: return "pydr was built without libnbd: install libnbd-dev (Debian) and rebuild pydr";
    case PYDR_E_NO_BITMAP: return "the NBD server does not export that dirty bitmap";
    case PYDR_E_UNKNOWN_ALGORITHM: return "unknown hash algorithm";
    }
    if (code < 0 && code > -PYDR_E_BASE)
        return strerror(-code); /* glibc returns static strings for errnos */
    return "unknown pydr error";
}

#define PYDR_STR_(x) #x
#define PYDR_STR(x) PYDR_STR_(x)

unsigned pydr_version_number(void)
{
    return PYDR_VERSION_NUMBER;
}

const char *pydr_version_string(void)
{
    return PYDR_STR(PYDR_VERSION_MAJOR) "." PYDR_STR(PYDR_VERSION_MINOR) "."
           PYDR_STR(PYDR_VERSION_PATCH);
}
