# Included by _hotpath.pyx (one module): a row's values typed in C from the text
# PostgreSQL sent, straight into the record dict, for the types whose text form the
# replication session fixes (DateStyle=ISO, TimeZone=UTC, extra_float_digits=3:
# walex.replication.stream._SESSION_OPTIONS) and whose loader in the table's adapters is
# psycopg's own compiled one. A value of those types gives exactly what that loader gives;
# one the C code is not sure of (infinity, BC, a year past 9999, an offset other than
# +00, an int beyond 18 digits, text not UTF-8, a float not parsed whole...) makes the
# whole row _UNSURE, and the row is typed as before (Table.load, its tolerant loaders and
# errors). A column of any other type is typed by its loader's ``load``, as psycopg's
# ``load_sequence`` calls a Python loader. Uses the names _hotpath.pyx imports and cimports.

from cpython.float cimport PyFloat_FromDouble
from cpython.long cimport PyLong_FromLongLong
from cpython.unicode cimport PyUnicode_DecodeUTF8
from cpython.datetime cimport date_new

cdef extern from "Python.h":
    double PyOS_string_to_double(const char *s, char **endptr, PyObject *overflow_exception) noexcept
    PyObject *PyErr_Occurred() noexcept
    void PyErr_Clear() noexcept
    int PyErr_ExceptionMatches(PyObject *exc) noexcept
    PyObject *PyExc_OverflowError
    PyObject *PyExc_Exception
    # the same calls, their failure left to _or_unsure (no try block per value)
    PyObject *_decode_utf8 "PyUnicode_DecodeUTF8" (const char *s, Py_ssize_t size, const char *errors) noexcept
    PyObject *_decode_ascii "PyUnicode_DecodeASCII" (const char *s, Py_ssize_t size, const char *errors) noexcept
    PyObject *_call_one "PyObject_CallOneArg" (PyObject *callable, PyObject *arg) noexcept

cdef extern from "Python.h":
    dict _PyDict_NewPresized(Py_ssize_t minused)

cdef extern from *:
    """
    static PyObject *walex_current_error(void) { return NULL; }
    """
    object _current_error "walex_current_error" ()  # raises the exception set

cdef enum:  # a column's kind: how _value types its text
    V_LOADER = 0, V_INT, V_TEXT, V_BOOL, V_FLOAT, V_NUMERIC, V_TSTZ, V_TS, V_DATE

cdef object _UNSURE = object()  # _value: not sure, the row goes the way it went before
cdef object _TIMEZONE_UTC = datetime.timezone.utc


def _loader_kinds():
    """{psycopg's compiled text loader class: its kind}, from psycopg's default adapters
    (a pristine map: what the user registered globally is not in it); empty when psycopg
    is not the compiled one."""
    from psycopg import postgres
    from psycopg.adapt import AdaptersMap, Transformer
    from psycopg.pq import Format
    try:
        pristine = AdaptersMap(types=postgres.types)
        postgres.register_default_adapters(pristine)
        tx = Transformer(pristine)
        found = {}
        for oid, kind in ((16, V_BOOL), (20, V_INT), (21, V_INT), (23, V_INT), (25, V_TEXT),
                          (1043, V_TEXT), (700, V_FLOAT), (701, V_FLOAT), (1700, V_NUMERIC),
                          (1184, V_TSTZ), (1114, V_TS), (1082, V_DATE)):
            cls = type(tx.get_loader(oid, Format.TEXT))
            if cls.__module__.split(".")[0] not in ("psycopg_binary", "psycopg_c"):
                continue
            found.setdefault(cls, set()).add(kind)
    except Exception:  # another psycopg: nothing typed in C
        return {}
    return {cls: kinds.pop() for cls, kinds in found.items() if len(kinds) == 1}


cdef dict _KINDS = _loader_kinds()


def _plan(table):
    """(kinds, loads) for a table's columns (kinds a bytes, one V_* each; loads each
    column's loader's ``load``), or None when no column has a kind typed in C."""
    from psycopg.pq import Format
    tx = table._tx
    kinds = bytearray()
    loads = []
    for oid in table.type_oids:
        loader = tx.get_loader(oid, Format.TEXT)
        kind = _KINDS.get(type(loader), V_LOADER)
        try:  # the loader is set up as this file expects (UTC; UTF-8, no connection)
            if kind == V_TSTZ:
                probe = loader.load(b"2000-01-02 03:04:05.6+00")
                if probe.tzinfo is not _TIMEZONE_UTC or probe != datetime.datetime(
                        2000, 1, 2, 3, 4, 5, 600000, _TIMEZONE_UTC):
                    kind = V_LOADER
            elif kind == V_TEXT:
                if loader.load(b"\xc3\xa9") != "\xe9":
                    kind = V_LOADER
        except Exception:
            kind = V_LOADER
        kinds.append(kind)
        loads.append(loader.load)
    if not any(kinds):
        return None
    return bytes(kinds), loads


cdef inline int _digits(const unsigned char *p, Py_ssize_t n) noexcept:
    """The number ``p[:n]`` spells (n <= 9), or -1 if not all digits."""
    cdef int value = 0
    cdef unsigned int d
    cdef Py_ssize_t i
    for i in range(n):
        d = p[i] - 48
        if d > 9:
            return -1
        value = value * 10 + <int>d
    return value


cdef inline bint _valid_date(int year, int month, int day) noexcept:
    if year < 1 or month < 1 or month > 12 or day < 1:
        return False
    if month == 2:
        return day <= (29 if (year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)) else 28)
    if month == 4 or month == 6 or month == 9 or month == 11:
        return day <= 30
    return day <= 31


cdef object _stamp(const unsigned char *p, Py_ssize_t n, int kind):
    """``YYYY-MM-DD`` (date), ``YYYY-MM-DD HH:MM:SS[.f{1,6}]`` (timestamp) or that and
    ``+00`` (timestamptz, UTC) as PostgreSQL writes them with DateStyle=ISO; else _UNSURE."""
    if n < 10 or p[4] != 45 or p[7] != 45:  # '-'
        return _UNSURE
    cdef int year = _digits(p, 4), month = _digits(p + 5, 2), day = _digits(p + 8, 2)
    if year < 0 or month < 0 or day < 0 or not _valid_date(year, month, day):
        return _UNSURE
    if kind == V_DATE:
        return date_new(year, month, day) if n == 10 else _UNSURE
    if n < 19 or p[10] != 32 or p[13] != 58 or p[16] != 58:  # ' ', ':', ':'
        return _UNSURE
    cdef int hour = _digits(p + 11, 2), minute = _digits(p + 14, 2), second = _digits(p + 17, 2)
    if hour < 0 or hour > 23 or minute < 0 or minute > 59 or second < 0 or second > 59:
        return _UNSURE
    cdef Py_ssize_t pos = 19, start, j
    cdef int micro = 0
    if pos < n and p[pos] == 46:  # '.'
        pos += 1
        start = pos
        while pos < n and pos - start < 6 and <unsigned int>(p[pos] - 48) <= 9:
            micro = micro * 10 + (p[pos] - 48)
            pos += 1
        if pos == start:
            return _UNSURE
        for j in range(6 - (pos - start)):
            micro *= 10
    if kind == V_TS:
        if pos != n:
            return _UNSURE
        return datetime_new(year, month, day, hour, minute, second, micro, None)
    if n - pos != 3 or p[pos] != 43 or p[pos + 1] != 48 or p[pos + 2] != 48:  # "+00"
        return _UNSURE
    return datetime_new(year, month, day, hour, minute, second, micro, _TIMEZONE_UTC)


cdef object _integer(const unsigned char *p, Py_ssize_t n):
    """An int as PostgreSQL writes it (``-``, then digits), up to 18 digits; else _UNSURE."""
    cdef Py_ssize_t i = 1 if n > 0 and p[0] == 45 else 0
    cdef int64_t value = 0
    cdef unsigned int d
    if n - i < 1 or n - i > 18:
        return _UNSURE
    while i < n:
        d = p[i] - 48
        if d > 9:
            return _UNSURE
        value = value * 10 + d
        i += 1
    return PyLong_FromLongLong(-value if p[0] == 45 else value)


cdef object _float(const unsigned char *p, Py_ssize_t n):
    """``float(text)`` as psycopg's loader gives it (PyOS_string_to_double); _UNSURE when
    the text is not parsed whole or overflows."""
    cdef char copy[64]
    cdef char *end
    if n < 1 or n > 63:
        return _UNSURE
    memcpy(copy, p, n)
    copy[n] = 0
    cdef double value = PyOS_string_to_double(copy, &end, PyExc_OverflowError)
    if value == -1.0 and PyErr_Occurred() != NULL:
        PyErr_Clear()
        return _UNSURE
    if end != copy + n:
        return _UNSURE
    return PyFloat_FromDouble(value)


cdef object _or_unsure(PyObject *result):
    """``result`` (a new reference), or, when NULL, _UNSURE for an Exception (cleared: the
    row is typed as before, and fails there as before); anything else (KeyboardInterrupt)
    raised."""
    if result != NULL:
        value = <object>result
        Py_DECREF(value)  # <object> took a reference of its own
        return value
    if PyErr_ExceptionMatches(PyExc_Exception):
        PyErr_Clear()
        return _UNSURE
    return _current_error()


cdef object _value(int kind, const unsigned char *p, Py_ssize_t n, object load):
    """One value of a column of ``kind`` from its text ``p[:n]``, or _UNSURE."""
    if kind == V_INT:
        return _integer(p, n)
    if kind == V_TEXT:
        return _or_unsure(_decode_utf8(<const char *>p, n, NULL))
    if kind == V_TSTZ or kind == V_TS or kind == V_DATE:
        return _stamp(p, n, kind)
    if kind == V_NUMERIC:
        text = _or_unsure(_decode_ascii(<const char *>p, n, NULL))
        if text is _UNSURE:
            return _UNSURE
        return _or_unsure(_call_one(<PyObject *>_Decimal, <PyObject *>text))
    if kind == V_FLOAT:
        return _float(p, n)
    if kind == V_BOOL:
        if n == 1 and p[0] == 116:
            return True
        if n == 1 and p[0] == 102:
            return False
        return _UNSURE
    data = PyBytes_FromStringAndSize(<const char *>p, n)
    return _or_unsure(_call_one(<PyObject *>load, <PyObject *>data))


cdef object _typed_record(const unsigned char *buf, Py_ssize_t size, Py_ssize_t *ppos,
                          bytes kinds, list loads, list names):
    """The record (a new dict, one value per column of ``names``, in their order) of the
    TupleData at ``ppos[0]``, every value text or NULL, typed by :func:`_value`; advances
    ``ppos``. None when the row is malformed, of another width, holds a binary or
    unchanged TOAST value or a value _value is not sure of: the caller then parses it as
    before, from the same position."""
    cdef Py_ssize_t pos = ppos[0], count, i
    cdef uint32_t length
    cdef unsigned char tag
    cdef const unsigned char *k = <const unsigned char *>PyBytes_AS_STRING(kinds)
    if pos + 2 > size:
        return None
    count = (<Py_ssize_t>buf[pos] << 8) | buf[pos + 1]
    if count != PyBytes_GET_SIZE(kinds):
        return None
    pos += 2
    cdef dict record = _PyDict_NewPresized(count)  # (filled: cheaper than a template's copy)
    for i in range(count):
        if pos >= size:
            return None
        tag = buf[pos]
        if tag == 110:  # 'n' null
            pos += 1
            PyDict_SetItem(record, <object>PyList_GET_ITEM(names, i), None)
            continue
        if tag != 116 or pos + 5 > size:  # not 't' text
            return None
        length = _be32(buf + pos + 1)
        pos += 5
        if <int32_t>length < 0 or <Py_ssize_t>length > size - pos:
            return None
        value = _value(k[i], buf + pos, <Py_ssize_t>length, <object>PyList_GET_ITEM(loads, i))
        if value is _UNSURE:
            return None
        PyDict_SetItem(record, <object>PyList_GET_ITEM(names, i), value)
        pos += <Py_ssize_t>length
    ppos[0] = pos
    return record


def _typed_row(bytes tuple_data, table):
    """The record of a TupleData (its bytes) typed by the C path, or None where the row
    goes the way it went before (for tests)."""
    plan = _plan(table)
    if plan is None:
        return None
    cdef Py_ssize_t pos = 0
    names = list(table.column_names)
    record = _typed_record(<const unsigned char *>PyBytes_AS_STRING(tuple_data),
                           PyBytes_GET_SIZE(tuple_data), &pos, plan[0], plan[1], names)
    return record if pos == PyBytes_GET_SIZE(tuple_data) else None
