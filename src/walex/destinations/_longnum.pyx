# cython: language_level=3, wraparound=False, boundscheck=False
"""walex.destinations._longnum: the long-number scan of a CloudEvent body, compiled (optional).

The twin of :func:`walex.destinations.decoding.py_long_number`, which stays the
reference and the fallback. :func:`long_number` answers as it does in C (most
bytes skipped, see ``_scan``): whether a run of 19 digits lies outside the JSON strings,
a run being inside a string when an odd number of quotes precede it. A run
with a backslash anywhere before it is the reference's slow case (its strings
cut out by a regular expression, escapes and all): for that body the
reference itself answers, so both give the same answer for every body.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE

__all__ = ["long_number"]


cdef int _scan(const unsigned char *p, Py_ssize_t n) noexcept nogil:
    """1: a run of 19 digits after an even number of quotes; 0: none; 2: a run with a
    backslash before it was met first (the reference decides). The windows of 19 bytes
    are tried leftmost first, each from its end: a byte that is not a digit rules out
    every window holding it, so most bytes are never looked at; the quotes and
    backslashes before a run are counted only when one is found."""
    cdef Py_ssize_t i = 0, j, k, counted = 0, quotes = 0
    cdef bint backslash = False
    while i + 19 <= n:
        j = i + 18
        while j >= i and <unsigned char>(p[j] - 48) < 10:
            j -= 1
        if j >= i:  # p[j] is not a digit: no window from i to j holds 19
            i = j + 1
            continue
        for k in range(counted, i):  # p[i:i + 19] are digits: what precedes them
            if p[k] == 34:  # "
                quotes += 1
            elif p[k] == 92:  # backslash
                backslash = True
        counted = i
        if backslash:
            return 2
        if not (quotes & 1):
            return 1
        i += 19  # in a string: past the run (its other windows are as much inside it)
        while i < n and <unsigned char>(p[i] - 48) < 10:
            i += 1
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
