# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# (cdivision: C division and remainder; every number divided here is a size, never negative)
"""The compiled twin of ``walex.destinations.redis.py_xadd_commands``: a batch's ``XADD``
commands in RESP, in one buffer (the same bytes; a test holds the twins equal).

Two passes over the batch: the first finds each message's head (the start of the
command, per stream) and sums the sizes, the second copies the parts into one bytes
object. No Python object per message but the head lookup's key, and only when the
message's (schema, table, type, partition) are not the previous message's objects.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM
from cpython.object cimport PyObject
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.string cimport memcpy


cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object text, Py_ssize_t* size) except NULL
    void Py_INCREF(PyObject *)
    void Py_DECREF(PyObject *)
    PyObject *PyList_GET_ITEM_PTR "PyList_GET_ITEM" (object, Py_ssize_t)
    void PyList_SET_ITEM_STEAL "PyList_SET_ITEM" (object, Py_ssize_t, PyObject *)


cdef inline void PyList_SET_ITEM_REF(list items, Py_ssize_t i, object value) noexcept:
    """``items[i] = value`` (no bounds check: i is within the list)."""
    cdef PyObject *old = PyList_GET_ITEM_PTR(items, i)
    Py_INCREF(<PyObject *>value)
    PyList_SET_ITEM_STEAL(items, i, <PyObject *>value)
    Py_DECREF(old)


cdef inline Py_ssize_t _digits(Py_ssize_t n) noexcept:
    if n < 10:
        return 1
    if n < 100:
        return 2
    if n < 1000:
        return 3
    if n < 10000:
        return 4
    cdef Py_ssize_t d = 5
    n //= 100000
    while n > 0:
        n //= 10
        d += 1
    return d


cdef inline char* _length(char* p, Py_ssize_t n) noexcept:
    """Write ``$<n>\\r\\n`` at p; return the end."""
    cdef Py_ssize_t d = _digits(n)
    cdef char* q = p + d
    p[0] = b'$'
    while True:
        q[0] = <char>(48 + n % 10)
        n //= 10
        if n == 0:
            break
        q -= 1
    p += d + 1
    p[0] = b'\r'
    p[1] = b'\n'
    return p + 2


def xadd_commands(list batch, dict heads, head_of):
    cdef Py_ssize_t count = len(batch), i, total = 0, size
    cdef list found = [None] * count  # each message's head, kept alive while copying
    cdef PyObject *item
    cdef PyObject *previous = NULL  # the message before (batch holds it)
    cdef object head = None
    cdef bytes body, out
    cdef const char* ident
    cdef char* p
    for i in range(count):
        if not isinstance(<object>PyList_GET_ITEM(batch, i), tuple) \
                or PyTuple_GET_SIZE(<tuple>PyList_GET_ITEM(batch, i)) < 6:
            raise TypeError("xadd_commands: a message is not an Outgoing tuple")
        item = PyList_GET_ITEM(batch, i)
        if previous == NULL or not (PyTuple_GET_ITEM(<tuple>item, 1) == PyTuple_GET_ITEM(<tuple>previous, 1)
                                    and PyTuple_GET_ITEM(<tuple>item, 2) == PyTuple_GET_ITEM(<tuple>previous, 2)
                                    and PyTuple_GET_ITEM(<tuple>item, 3) == PyTuple_GET_ITEM(<tuple>previous, 3)
                                    and PyTuple_GET_ITEM(<tuple>item, 4) == PyTuple_GET_ITEM(<tuple>previous, 4)):
            head = heads.get((<tuple>item)[1:5])
            if head is None:
                head = head_of(<tuple>item)
            if type(head) is not bytes:
                raise TypeError(f"xadd_commands: a head must be bytes, not {type(head).__name__}")
            previous = item
        PyList_SET_ITEM_REF(found, i, head)
        PyUnicode_AsUTF8AndSize(<object>PyTuple_GET_ITEM(<tuple>item, 0), &size)
        body = <bytes?><object>PyTuple_GET_ITEM(<tuple>item, 5)
        total += (PyBytes_GET_SIZE(<bytes>head) + 3 + _digits(size) + size + 2 + 11
                  + 3 + _digits(PyBytes_GET_SIZE(body)) + PyBytes_GET_SIZE(body) + 2)
    out = PyBytes_FromStringAndSize(NULL, total)
    p = PyBytes_AS_STRING(out)
    for i in range(count):
        item = PyList_GET_ITEM(batch, i)
        head = <object>PyList_GET_ITEM(found, i)
        size = PyBytes_GET_SIZE(<bytes>head)
        memcpy(p, PyBytes_AS_STRING(<bytes>head), size)
        p += size
        ident = PyUnicode_AsUTF8AndSize(<object>PyTuple_GET_ITEM(<tuple>item, 0), &size)
        p = _length(p, size)
        memcpy(p, ident, size)
        p += size
        memcpy(p, b"\r\n$5\r\nevent\r\n", 13)
        p += 13
        body = <bytes><object>PyTuple_GET_ITEM(<tuple>item, 5)
        size = PyBytes_GET_SIZE(body)
        p = _length(p, size)
        memcpy(p, PyBytes_AS_STRING(body), size)
        p += size
        p[0] = b'\r'
        p[1] = b'\n'
        p += 2
    return out


def scan_ids(bytes data, Py_ssize_t most):
    """The compiled twin of ``walex.destinations.redis.py_scan_ids``: how many whole bulk
    string replies (``$<n>\\r\\n<n bytes>\\r\\n``, an XADD's entry id) ``data`` starts
    with, at most ``most``; the bytes they take; and whether the scan stopped only for
    want of more bytes (a bulk string begun, not whole yet) rather than at ``most`` or at
    a reply of another kind (an error, a push, a null), left to hiredis."""
    cdef const char* p = PyBytes_AS_STRING(data)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(data), at = 0, n = 0, j, length, digits
    cdef bint more = False
    while n < most:
        if at >= size:
            more = True
            break
        if p[at] != b'$':
            break
        j = at + 1
        length = 0
        digits = 0
        while j < size and b'0' <= p[j] <= b'9' and digits < 18:
            length = length * 10 + (p[j] - 48)
            j += 1
            digits += 1
        if j >= size:  # the length not whole yet (or only "$")
            more = True
            break
        if digits == 0 or p[j] != b'\r':  # "$-1" (a null), more than 18 digits, or not RESP
            break
        if j + 1 >= size:
            more = True
            break
        if p[j + 1] != b'\n':
            break
        j += 2 + length
        if j + 2 > size:
            more = True
            break
        if p[j] != b'\r' or p[j + 1] != b'\n':
            break
        at = j + 2
        n += 1
    return n, at, more
