# cython: language_level=3, wraparound=False, boundscheck=False
"""walex.destinations._longnum: the long-number scan of a CloudEvent body, compiled (optional).

The twin of :func:`walex.destinations.decoding.py_long_number`, which stays the
reference and the fallback. :func:`long_number` answers as it does in one C
loop over the bytes: whether a run of 19 digits lies outside the JSON strings,
a run being inside a string when an odd number of quotes precede it. A run
with a backslash anywhere before it is the reference's slow case (its strings
cut out by a regular expression, escapes and all): for that body the
reference itself answers, so both give the same answer for every body.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE

__all__ = ["long_number"]


cdef int _scan(const unsigned char *p, Py_ssize_t n) noexcept nogil:
    """1: a run of 19 digits after an even number of quotes; 0: none; 2: a run with a
    backslash before it was met first (the reference decides)."""
    cdef Py_ssize_t i, run = 0
    cdef bint odd = False, backslash = False
    cdef unsigned char c
    for i in range(n):
        c = p[i]
        if <unsigned char>(c - 48) < 10:
            run += 1
            if run >= 19:
                if backslash:
                    return 2
                if not odd:
                    return 1
        else:
            run = 0
            if c == 34:  # "
                odd = not odd
            elif c == 92:  # backslash
                backslash = True
    return 0


def long_number(raw, reference):
    """Whether the JSON body ``raw`` (bytes) has a run of 19 digits outside its strings;
    ``reference`` (the pure twin) answers for a body the scan leaves to it."""
    if type(raw) is not bytes:
        return reference(raw)
    cdef int found = _scan(<const unsigned char *>PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw))
    if found == 2:
        return reference(raw)
    return found == 1
