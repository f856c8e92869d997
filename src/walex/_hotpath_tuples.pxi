# Included by _hotpath.pyx (one module): big-endian integers, the TupleData parsers of the
# pure path's forms (_row: a raw row's one bytes object; _tuple: a TupleData's values for
# the table's loaders) and the records built from their values. Uses the names
# _hotpath.pyx imports and cimports.


cdef inline uint32_t _be32(const unsigned char *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | <uint32_t>p[3]


cdef inline uint64_t _be64(const unsigned char *p) noexcept nogil:
    return (<uint64_t>_be32(p) << 32) | <uint64_t>_be32(p + 4)


cdef object _row(const unsigned char *buf, Py_ssize_t size, Py_ssize_t *ppos, bint *plain,
                 Py_ssize_t *count):
    """TupleData at ``ppos[0]`` for a raw table: a raw row (walex.rawrow: the slice of
    ``buf``, one bytes object) when every value is text or NULL, else the values list as
    :func:`_tuple` gives it (``plain`` cleared); None if malformed. Advances ``ppos``;
    ``count`` is the row's column count."""
    cdef Py_ssize_t start = ppos[0], pos = start, n, i
    cdef uint32_t length
    cdef unsigned char kind
    if pos + 2 > size:
        return None
    n = (<Py_ssize_t>buf[pos] << 8) | buf[pos + 1]
    count[0] = n
    pos += 2
    for i in range(n):
        if pos >= size:
            return None
        kind = buf[pos]
        if kind == 116:  # 't' text
            if pos + 5 > size:
                return None
            length = _be32(buf + pos + 1)
            pos += 5
            if <int32_t>length < 0 or <Py_ssize_t>length > size - pos:
                return None
            pos += <Py_ssize_t>length
        elif kind == 110:  # 'n' null
            pos += 1
        else:  # binary, unchanged TOAST or malformed: as the typed path parses it
            return _tuple(buf, size, ppos, plain)
    ppos[0] = pos
    return PyBytes_FromStringAndSize(<const char *>buf + start, pos - start)


cdef object _tuple(const unsigned char *buf, Py_ssize_t size, Py_ssize_t *ppos, bint *plain):
    """TupleData at ``ppos[0]``: the values list (advancing ``ppos``), or None if malformed.

    Accepts exactly what ``Decoder._py_tuple`` accepts, with the same values.
    """
    cdef Py_ssize_t pos = ppos[0], count, i
    cdef uint32_t length
    cdef unsigned char kind
    cdef object item
    if pos + 2 > size:
        return None
    count = (<Py_ssize_t>buf[pos] << 8) | buf[pos + 1]
    pos += 2
    cdef object values = PyList_New(count)
    for i in range(count):
        if pos >= size:
            return None
        kind = buf[pos]
        pos += 1
        if kind == 116 or kind == 98:  # 't' text, 'b' binary
            if pos + 4 > size:
                return None
            length = _be32(buf + pos)
            pos += 4
            if <int32_t>length < 0 or <Py_ssize_t>length > size - pos:
                return None
            item = PyBytes_FromStringAndSize(<const char *>buf + pos, <Py_ssize_t>length)
            pos += <Py_ssize_t>length
            if kind == 98:
                item = BinaryValue(item)
                plain[0] = False
        elif kind == 110:  # 'n' null
            item = None
        elif kind == 117:  # 'u' unchanged TOAST
            item = _UNCHANGED
            plain[0] = False
        else:
            return None
        Py_INCREF(item)
        PyList_SET_ITEM(values, i, item)
    ppos[0] = pos
    return values


cdef list _values(object row):
    """The values list of a row :func:`_row` gave (a raw row parsed again, or the list)."""
    if type(row) is not bytes:
        return row
    cdef Py_ssize_t pos = 0
    cdef bint plain = True
    return _tuple(<const unsigned char *>PyBytes_AS_STRING(row), PyBytes_GET_SIZE(row), &pos,
                  &plain)


cdef inline bint _differ(object a, object b) except -1:
    """``a != b`` for raw column values (bytes, None, BinaryValue, UNCHANGED_TOAST)."""
    cdef Py_ssize_t n
    if type(a) is bytes and type(b) is bytes:
        n = PyBytes_GET_SIZE(a)
        return n != PyBytes_GET_SIZE(b) or memcmp(PyBytes_AS_STRING(a), PyBytes_AS_STRING(b), n) != 0
    return PyObject_RichCompareBool(a, b, Py_NE)


cdef dict _record(list names, object values):
    """``dict(zip(names, values))``."""
    cdef dict record = {}
    cdef Py_ssize_t i, n = min(PyList_GET_SIZE(names), len(values))
    for i in range(n):
        record[<object>PyList_GET_ITEM(names, i)] = values[i]
    return record


cdef dict _key_record(list names, list keys, object values):
    cdef dict record = {}
    for i in keys:
        record[names[i]] = values[i]
    return record
