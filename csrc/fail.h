/* fail.h -- filling the caller's pydr_error (internal): the one error
 * channel of pydr.h. Public functions that take a pydr_error * replace a
 * NULL one with a local, so that the code below never checks for it. */
#ifndef PYDR_FAIL_H
#define PYDR_FAIL_H

#include <stdint.h>

#include "pydr.h"

/* Fails with `code`, at no particular place. */
static inline int pydr_fail(pydr_error *error, int code)
{
    error->code = code;
    error->has_offset = 0;
    error->offset = 0;
    error->detail[0] = 0;
    return code;
}

/* Fails with `code` at `offset`. */
static inline int pydr_fail_at(pydr_error *error, int code, uint64_t offset)
{
    pydr_fail(error, code);
    error->has_offset = 1;
    error->offset = offset;
    return code;
}

#define PYDR_ERROR_OR_LOCAL(error)                                   \
    pydr_error error##_local;                                        \
    if (!(error))                                                    \
        (error) = &error##_local

#endif
