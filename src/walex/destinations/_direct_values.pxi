# Included by _direct.pyx (one module): a value's JSON written from the text PostgreSQL sent
# (_piece, by its column's kind; _temporal_text), the strs a key needs (_ascii, _text,
# _concat), and a raw row's columns found in its bytes (_columns, _same, _set_form). Uses
# the names _direct.pyx declares before its include.


cdef inline object _ascii(const char *s, Py_ssize_t n):
    """The str of ``n`` ASCII bytes (PyUnicode_DecodeASCII's result, made directly)."""
    text = PyUnicode_New(n, 127)
    memcpy(PyUnicode_DATA(text), s, n)
    return text


cdef object _text(const char *s, Py_ssize_t n):
    """``PyUnicode_DecodeUTF8(s, n)``: made directly when the bytes are ASCII."""
    cdef Py_ssize_t i
    for i in range(n):
        if <unsigned char>s[i] >= 0x80:
            return PyUnicode_DecodeUTF8(s, n, NULL)
    return _ascii(s, n)


cdef object _concat(object a, object b):
    """``a + b`` of two str: made directly when both are plain ASCII str."""
    cdef Py_ssize_t na, nb
    if type(a) is str and type(b) is str and PyUnicode_IS_ASCII(a) and PyUnicode_IS_ASCII(b):
        na = PyUnicode_GET_LENGTH(a)
        nb = PyUnicode_GET_LENGTH(b)
        text = PyUnicode_New(na + nb, 127)
        memcpy(PyUnicode_DATA(text), PyUnicode_DATA(a), na)
        memcpy(<char *>PyUnicode_DATA(text) + na, PyUnicode_DATA(b), nb)
        return text
    return PyUnicode_Concat(a, b)


cdef object _load(object load, bytes raw, int mode):
    """The loader's value; a refusal in a row typed with the table's loaders (mode 0)
    raises _Tolerant (the row is written again with the tolerant loaders)."""
    try:
        return load(raw)
    except Exception as exc:
        if mode == 0:
            raise _Tolerant() from exc
        raise


cdef object _piece(Buf *b, int kind, const char *s, Py_ssize_t n, object load, int mode,
                   bint keyed):
    """Write one value (its text at ``s``, ``n`` bytes, in a raw row); returns its JSON form
    when it is a str and ``keyed`` (else None)."""
    cdef Py_ssize_t i, start
    cdef unsigned long long v
    if kind == INT:
        start = 1 if n > 0 and s[0] == b'-' else 0
        if n - start < 1 or n - start > 19 or not _digit(s[start]) \
                or (s[start] == b'0' and (n - start > 1 or start == 1)):
            raise _Unfit
        v = 0
        for i in range(start, n):
            if not _digit(s[i]):
                raise _Unfit
            v = v * 10 + <unsigned long long>(s[i] - 48)
        if n - start <= 15 or v <= <unsigned long long>_MAX_SAFE:
            _put(b, s, n)
            return None
        _put_quoted(b, s, n)
        return _ascii(s, n) if keyed else None
    if kind == TEXT:
        _put_string(b, <const unsigned char *>s, n)
        return _text(s, n) if keyed else None
    if kind == BOOL:
        if n == 1 and s[0] == b't':
            _put(b, b"true", 4)
        elif n == 1 and s[0] == b'f':
            _put(b, b"false", 5)
        else:
            raise _Unfit
        return None
    if kind == NUMERIC:
        if not _numeric(s, n):
            raise _Unfit
        _put_quoted(b, s, n)
        return _ascii(s, n) if keyed else None
    if kind == UUID:
        if not _uuid(s, n):
            raise _Unfit
        _put_quoted(b, s, n)
        return None
    if kind == DATE:
        if n == 10 and _day(s):
            _put_quoted(b, s, n)
            return None
        return _temporal_text(b, PyBytes_FromStringAndSize(s, n), load, mode)
    if kind == TIMESTAMP or kind == TIMESTAMPTZ:
        if _timestamp(b, s, n, kind == TIMESTAMPTZ):
            return None
        return _temporal_text(b, PyBytes_FromStringAndSize(s, n), load, mode)
    if kind == JSONB and _jsonb(b, s, n):
        return None  # its form for a key: see _subject
    if kind == JSON or kind == JSONB:
        value = _load(load, PyBytes_FromStringAndSize(s, n), mode)
        if type(value) is int and not -_MAX_SAFE <= value <= _MAX_SAFE:
            value = str(value)  # as the reference writes a whole document that is one
        _put_bytes(b, _dumps(value))
        return None  # its form for a key: see _subject
    form = _json_value(_load(load, PyBytes_FromStringAndSize(s, n), mode))
    _put_bytes(b, _dumps(form))
    return form if type(form) is str else None


cdef object _temporal_text(Buf *b, bytes raw, object load, int mode):
    """The twin of ``temporal_text``: the text the tolerant loader gives."""
    if mode == 0:
        raise _Tolerant()
    value = load(raw)
    if type(value) is not str:
        raise _Unfit
    _put_str(b, value)
    return value


cdef int _columns(object row, Py_ssize_t width, Py_ssize_t *cols) except -1:
    """Find the values of a raw row (walex.rawrow): per column, where its text starts in
    the row and its length (-1: NULL) in ``cols``. Unfit if it is not a raw row of
    ``width`` columns (as ``row_values`` refuses it, or the pure twin's width check)."""
    if type(row) is not bytes:
        raise _Unfit
    cdef const unsigned char *s = <const unsigned char *>PyBytes_AS_STRING(row)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(row), pos = 2, i
    cdef size_t length
    if size < 2 or ((<Py_ssize_t>s[0] << 8) | s[1]) != width:
        raise _Unfit
    for i in range(width):
        if pos >= size:
            raise _Unfit
        if s[pos] == b'n':
            cols[2 * i] = pos
            cols[2 * i + 1] = -1
            pos += 1
        elif s[pos] == b't' and pos + 5 <= size:
            length = ((<size_t>s[pos + 1] << 24) | (<size_t>s[pos + 2] << 16)
                      | (<size_t>s[pos + 3] << 8) | <size_t>s[pos + 4])
            pos += 5
            if length > <size_t>(size - pos):
                raise _Unfit
            cols[2 * i] = pos
            cols[2 * i + 1] = <Py_ssize_t>length
            pos += <Py_ssize_t>length
        else:
            raise _Unfit
    if pos != size:
        raise _Unfit
    return 0


cdef inline bint _same(const char *a, const Py_ssize_t *a_cols, const char *b,
                       const Py_ssize_t *b_cols, Py_ssize_t i) noexcept:
    """Whether column ``i`` holds the same value in two raw rows (NULL equals NULL)."""
    cdef Py_ssize_t n = a_cols[2 * i + 1]
    if n != b_cols[2 * i + 1]:
        return False
    return n <= 0 or memcmp(a + a_cols[2 * i], b + b_cols[2 * i], n) == 0


cdef inline void _set_form(PyObject **forms, Py_ssize_t i, object form) noexcept:
    """``forms[i] = form``: a reference of its own, NULL for None (the one before dropped:
    a row written again with the tolerant loaders sets its forms again)."""
    cdef PyObject *old = forms[i]
    if form is None:
        forms[i] = NULL
    else:
        Py_INCREF(<PyObject *>form)
        forms[i] = <PyObject *>form
    Py_XDECREF(old)
