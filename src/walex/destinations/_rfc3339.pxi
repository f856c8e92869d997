# Included by walex._encode and walex.destinations._direct (one copy in each module): the
# CloudEvents "time" of an event, the text of walex.destinations.values._rfc3339, written
# in C from the datetime's fields. Uses the module's ``_rfc3339`` (the Python function its
# bind() took), which serves what this one leaves to it, and the names both modules cimport
# before including it (PyObject, PyTuple_GET_ITEM, PyBytes_FromStringAndSize, memcpy).

from cpython.datetime cimport (PyDateTime_CheckExact, PyDateTime_DATE_GET_HOUR,
                               PyDateTime_DATE_GET_MICROSECOND, PyDateTime_DATE_GET_MINUTE,
                               PyDateTime_DATE_GET_SECOND, PyDateTime_DateTime,
                               PyDateTime_GET_DAY, PyDateTime_GET_MONTH, PyDateTime_GET_YEAR,
                               import_datetime)

import datetime as _rfc_dt

cdef extern from "Python.h":
    object _rfc_unicode_new "PyUnicode_New" (Py_ssize_t size, unsigned int maxchar)
    char *_rfc_ascii "PyUnicode_1BYTE_DATA" (object text)

import_datetime()
cdef PyObject *_RFC_UTC = <PyObject *>_rfc_dt.timezone.utc  # a singleton: never freed
cdef tuple _rfc_last = (None, None)  # the moment _time_text wrote last and its text


cdef inline void _rfc_digits(char *out, int value, int width) noexcept:
    """``value`` (0 <= value < 10**width) in ``width`` decimal digits, zero-padded."""
    cdef int k
    for k in range(width - 1, -1, -1):
        out[k] = <char>(48 + value % 10)
        value //= 10


cdef Py_ssize_t _rfc3339_c(object moment, char *out) noexcept:
    """``_rfc3339(moment)`` written into ``out`` (room for 27 characters), its length; 0
    where it is left to ``_rfc3339``: anything but a ``datetime`` itself (a subclass may
    format itself otherwise) with no tzinfo or ``timezone.utc`` (another one is converted).

    Those are the ones ``_rfc3339`` formats as ``isoformat()`` (orjson's text of an UTC
    one is the same) with ``Z`` for ``+00:00``: ``YYYY-MM-DDTHH:MM:SS``, ``.ffffff`` when
    the microseconds are not 0, then ``Z`` (a naive one taken as UTC; fold is not shown)."""
    if not PyDateTime_CheckExact(moment):
        return 0
    cdef PyDateTime_DateTime *fields = <PyDateTime_DateTime *>moment
    if fields.hastzinfo and fields.tzinfo != _RFC_UTC and fields.tzinfo != <PyObject *>None:
        return 0
    _rfc_digits(out, PyDateTime_GET_YEAR(moment), 4)  # 1 to 9999
    out[4] = b'-'
    _rfc_digits(out + 5, PyDateTime_GET_MONTH(moment), 2)
    out[7] = b'-'
    _rfc_digits(out + 8, PyDateTime_GET_DAY(moment), 2)
    out[10] = b'T'
    _rfc_digits(out + 11, PyDateTime_DATE_GET_HOUR(moment), 2)
    out[13] = b':'
    _rfc_digits(out + 14, PyDateTime_DATE_GET_MINUTE(moment), 2)
    out[16] = b':'
    _rfc_digits(out + 17, PyDateTime_DATE_GET_SECOND(moment), 2)
    cdef Py_ssize_t n = 19
    cdef int micros = PyDateTime_DATE_GET_MICROSECOND(moment)
    if micros:
        out[19] = b'.'
        _rfc_digits(out + 20, micros, 6)
        n = 26
    out[n] = b'Z'
    return n + 1


cdef str _rfc_str(const char *text, Py_ssize_t n):
    """The ASCII ``text`` as a str, written in place."""
    result = _rfc_unicode_new(n, 127)
    memcpy(_rfc_ascii(result), text, n)
    return result


cdef str _time_text(object moment):
    """``_rfc3339(moment)``: the text of the moment given last again (a transaction's
    events share one), else written here, else ``_rfc3339``'s."""
    if <object>PyTuple_GET_ITEM(_rfc_last, 0) is moment:
        return <str>PyTuple_GET_ITEM(_rfc_last, 1)
    global _rfc_last
    cdef char text[32]
    cdef Py_ssize_t n = _rfc3339_c(moment, text)
    time = _rfc_str(text, n) if n else _rfc3339(moment)
    _rfc_last = (moment, time)
    return time


cdef tuple _time_json_c(object moment):
    """``(_rfc3339(moment), that as a JSON string)`` (its characters need no escape),
    written here; None where :func:`_rfc3339_c` leaves it to ``_rfc3339``."""
    cdef char text[32]
    text[0] = b'"'
    cdef Py_ssize_t n = _rfc3339_c(moment, text + 1)
    if not n:
        return None
    text[n + 1] = b'"'
    return (_rfc_str(text + 1, n), PyBytes_FromStringAndSize(text, n + 2))


def _time_texts(moment):
    """For tests: the text :func:`_rfc3339_c` writes of ``moment`` (None where it leaves it
    to ``_rfc3339``), :func:`_time_text`'s, and :func:`_time_json_c`'s pair."""
    cdef char text[32]
    cdef Py_ssize_t n = _rfc3339_c(moment, text)
    return (_rfc_str(text, n) if n else None), _time_text(moment), _time_json_c(moment)
