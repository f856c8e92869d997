# cython: language_level=3, wraparound=False, boundscheck=False
"""walex._json: the json/jsonb value loader, compiled (optional).

The twin of :func:`walex.pgtypes.py_json_loads`, which stays the reference and
the fallback: the same rule, the same results. A value is parsed by orjson
(about four times faster than the json module) unless it holds a run of 19 or
more digits (a number orjson could turn into a float, or lose digits of), or
orjson rejects it (NaN, Infinity, ...): then the json module parses it, as
psycopg's default loader would. Here the digit scan is a C loop over the
bytes, instead of a regular expression, and no Python frame runs per value.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE

import json

import orjson

__all__ = ["loads"]

cdef object _orjson_loads = orjson.loads
cdef object _json_loads = json.loads
cdef object _OrjsonError = orjson.JSONDecodeError


cdef bint _long_digit_run(const unsigned char *p, Py_ssize_t n) noexcept nogil:
    """Whether ``p[:n]`` holds 19 consecutive ASCII digits (the pure twin's regex)."""
    cdef Py_ssize_t i, run = 0
    for i in range(n):
        if <unsigned char>(p[i] - 48) < 10:
            run += 1
            if run == 19:
                return True
        else:
            run = 0
    return False


def loads(data):
    """One json/jsonb value in text format (bytes, or a buffer) as Python objects."""
    if type(data) is not bytes:
        data = bytes(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    if n >= 19 and _long_digit_run(<const unsigned char *>PyBytes_AS_STRING(data), n):
        return _json_loads(data)
    try:
        return _orjson_loads(data)
    except _OrjsonError:
        return _json_loads(data)
