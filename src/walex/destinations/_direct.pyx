# cython: language_level=3, wraparound=False, boundscheck=False
"""walex.destinations._direct: the direct encoder, compiled (optional).

The twin of ``py_direct_event`` in :mod:`walex.destinations.direct`, which
stays the pure-Python path and makes the per-table plans both twins use: the
same writers, the same rules, the same bytes or the same "unfit"
(``tests/destinations/test_direct.py`` runs every check through both). Here the
document is written into one C buffer, the values found in the raw rows
(:mod:`walex.rawrow`, one bytes object per row) without a Python object per value:
the values of the plain writers (bool,
integers, text, uuid, numeric, date, timestamps) straight from their text, the
rest through their loader, ``json_value`` and orjson, as the pure twin does.
The direct module hands its helpers over with :func:`bind` (this module
imports nothing of walex, so there is no import cycle).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.object cimport PyObject
from cpython.pycapsule cimport PyCapsule_New
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.stdint cimport uint64_t
from libc.string cimport memcmp, memcpy, memmove

from types import MemberDescriptorType

import orjson

__all__ = ["bind", "c_entry", "direct_event", "direct_event_or_raise"]


cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object text, Py_ssize_t* size) except NULL
    object PyUnicode_DecodeUTF8(const char *s, Py_ssize_t size, const char *errors)
    object PyUnicode_DecodeASCII(const char *s, Py_ssize_t size, const char *errors)
    object PyUnicode_Concat(object left, object right)
    object PyUnicode_New(Py_ssize_t size, unsigned int maxchar)
    void *PyUnicode_DATA(object text)
    bint PyUnicode_IS_ASCII(object text)
    Py_ssize_t PyUnicode_GET_LENGTH(object text)
    ctypedef struct _Type "PyTypeObject":
        PyObject *(*tp_alloc)(_Type *, Py_ssize_t) except NULL
    ctypedef struct PyMemberDef:
        int type
        Py_ssize_t offset
    ctypedef struct PyMemberDescrObject:
        PyMemberDef *d_member
    void PyTuple_SET_ITEM_STEAL "PyTuple_SET_ITEM" (PyObject *, Py_ssize_t, PyObject *)
    void Py_INCREF(PyObject *)
    void Py_DECREF(PyObject *)
    void Py_XDECREF(PyObject *)

cdef extern from "structmember.h":
    int T_OBJECT_EX


# the writers (walex.destinations.direct's numbers)
cdef enum:
    GENERIC = 0
    JSON = 1
    BOOL = 2
    INT = 3
    TEXT = 4
    UUID = 5
    NUMERIC = 6
    DATE = 7
    TIMESTAMP = 8
    TIMESTAMPTZ = 9
    JSONB = 10
    MAX_KEY = 32  # PostgreSQL's indexes have at most 32 columns
    STACK = 2048
    COLUMNS = 64  # the widest table whose rows' places _direct keeps on its stack

cdef long long _MAX_SAFE = 2**53 - 1
cdef object _dumps = orjson.dumps
cdef object _tuple_new = tuple.__new__

# orjson's escape of each ASCII character, from the direct module: length and bytes
cdef unsigned char _esc_len[128]
cdef char _esc[128][8]

# the direct module's helpers, set by bind()
cdef object _plan_of = None
cdef object _tolerant_loads = None
cdef object _json_value = None
cdef object _rfc3339 = None
cdef object _partition_of = None
cdef object _Outgoing = None
cdef dict _KINDS = None
cdef object _Unfit = None
cdef object _Tolerant = None
cdef bytes _UTC_OFFSET = b"+00:00"
cdef tuple _last = (None, None, None)  # the Table planned last, its plan, its prefix + "/"
cdef bint _outgoing_direct = False  # Outgoing built as tuple.__new__ builds it (see bind)
# the texts a transaction's events share, with their JSON strings (one object each, replaced
# whole): the commit time and its text, the LSN's, the type name's
cdef tuple _last_time = (None, None)
cdef tuple _time_json = (None, None)
cdef tuple _lsn_json = (None, None)
cdef tuple _type_json = (None, None)
cdef tuple _kind_of = (None, None)  # the last event's type and its _KINDS entry
# ASCII characters orjson writes as they are (from ESCAPES)
cdef unsigned char _as_is[128]
# _as_is is every ASCII character from ' ' on but '"' and '\\' (what orjson's escapes give):
# _put_string then checks eight bytes at a time (set by bind)
cdef bint _words = False

# The event attributes _direct reads, from their object slots when the event's class keeps
# them there (an Event's and a RawEvent's do), as getattr finds them: no attribute lookup.
cdef enum:
    E_RAW, E_SOURCE, E_LSN, E_TYPE, E_TIMESTAMP, E_ID
cdef tuple _ATTRS = ("raw", "source", "lsn", "type", "timestamp", "id")
cdef type _slots_of = None  # the class _offsets are of
cdef Py_ssize_t _offsets[6]  # -1: read with getattr


cdef Py_ssize_t _slot_offset(type cls, str name) except -2:
    """Where instances of ``cls`` keep the attribute ``name``, if getattr reads it from an
    object slot (its member descriptor, first in the MRO); -1 otherwise."""
    for klass in cls.__mro__:
        descr = klass.__dict__.get(name)
        if descr is not None:
            if type(descr) is MemberDescriptorType:
                member = (<PyMemberDescrObject *>descr).d_member
                if member.type == T_OBJECT_EX:
                    return member.offset
            return -1
    return -1


cdef int _learn(type cls) except -1:
    global _slots_of
    cdef int i
    plain = cls.__getattribute__ is object.__getattribute__
    for i in range(6):
        _offsets[i] = _slot_offset(cls, _ATTRS[i]) if plain else -1
    _slots_of = cls
    return 0


cdef inline object _attr(object event, const Py_ssize_t *offsets, int i):
    """``getattr(event, _ATTRS[i])``, ``offsets`` those of the event's class (a copy taken
    when it was learned: a Python call meanwhile, another thread's encoding, may learn
    another class)."""
    cdef Py_ssize_t offset = offsets[i]
    cdef PyObject *value
    if offset >= 0:
        value = (<PyObject **>(<char *><PyObject *>event + offset))[0]
        if value != NULL:
            return <object>value
    return getattr(event, <str>PyTuple_GET_ITEM(_ATTRS, i))  # raises AttributeError if unset


def bind(helpers):
    """Take the direct module's helpers (its namespace); returns :func:`direct_event`."""
    global _plan_of, _tolerant_loads, _json_value, _rfc3339, _partition_of, _Outgoing
    global _KINDS, _Unfit, _Tolerant, _UTC_OFFSET, _outgoing_direct, _kind_of
    cdef int i
    cdef bytes escape
    _plan_of, _tolerant_loads = helpers["plan_of"], helpers["tolerant_loads"]
    _json_value, _rfc3339 = helpers["json_value"], helpers["_rfc3339"]
    _partition_of, _Outgoing = helpers["partition_of"], helpers["Outgoing"]
    _KINDS, _Unfit, _Tolerant = helpers["_KINDS"], helpers["_Unfit"], helpers["_Tolerant"]
    _kind_of = (None, None)
    _UTC_OFFSET = helpers["_UTC_OFFSET"]
    escapes = helpers["ESCAPES"]
    for i in range(128):
        escape = escapes[i]
        if PyBytes_GET_SIZE(escape) > 7:
            raise ValueError("an escape longer than 7 bytes")
        _esc_len[i] = <unsigned char>PyBytes_GET_SIZE(escape)
        memcpy(_esc[i], PyBytes_AS_STRING(escape), PyBytes_GET_SIZE(escape))
        _as_is[i] = PyBytes_GET_SIZE(escape) == 1 and <int>(PyBytes_AS_STRING(escape)[0]) == i
    global _words
    _words = True
    for i in range(128):
        if _as_is[i] != (i >= 0x20 and i != 0x22 and i != 0x5C):
            _words = False
    # a tuple subclass adding no fields, with tuple's allocation: built as tuple.__new__ does
    _outgoing_direct = (issubclass(_Outgoing, tuple) and _Outgoing.__dictoffset__ == 0
                        and _Outgoing.__weakrefoffset__ == 0
                        and _Outgoing.__basicsize__ == tuple.__basicsize__
                        and _Outgoing.__itemsize__ == tuple.__itemsize__
                        and (<_Type *>_Outgoing).tp_alloc == (<_Type *>tuple).tp_alloc
                        and len(_Outgoing._fields) == 10)
    return direct_event


include "_direct_buffer.pxi"
include "_rfc3339.pxi"  # _rfc3339_c, _time_text, _time_json_c


cdef object _outgoing(object ident, object schema, object table, object kind, object partition,
                      object body, object source, object time, object key, object subject):
    """``Outgoing(...)``, as ``tuple.__new__(Outgoing, (...))`` builds it (no argument
    tuple, no call)."""
    if not _outgoing_direct:
        return _tuple_new(_Outgoing, (ident, schema, table, kind, partition, body, source,
                                      time, key, subject))
    cdef _Type *tp = <_Type *>_Outgoing
    cdef PyObject *obj = tp.tp_alloc(tp, 10)
    cdef PyObject *items[10]
    cdef int i
    items[0] = <PyObject *>ident
    items[1] = <PyObject *>schema
    items[2] = <PyObject *>table
    items[3] = <PyObject *>kind
    items[4] = <PyObject *>partition
    items[5] = <PyObject *>body
    items[6] = <PyObject *>source
    items[7] = <PyObject *>time
    items[8] = <PyObject *>key
    items[9] = <PyObject *>subject
    for i in range(10):
        Py_INCREF(items[i])
        PyTuple_SET_ITEM_STEAL(obj, i, items[i])
    result = <object>obj
    Py_DECREF(obj)  # the reference tp_alloc gave
    return result


cdef tuple _json_of(tuple cache, object text):
    """``cache`` if it is ``text``'s, else ``(text, text as a JSON string)``."""
    if <object>PyTuple_GET_ITEM(cache, 0) is text:
        return cache
    cdef char stack[256]
    cdef Buf k
    _init(&k, stack, 256)
    try:
        _put_str(&k, text)
        return (text, PyBytes_FromStringAndSize(k.p, k.n))
    finally:
        _free(&k)


include "_direct_values.pxi"  # _piece, _temporal_text, _ascii/_text/_concat, _columns


cdef int _record(Buf *b, tuple plan, const char *row, const Py_ssize_t *cols, tuple columns,
                 Py_ssize_t width, int mode, Py_ssize_t *spans, Py_ssize_t *key_spans,
                 PyObject **key_forms) except -1:
    """Write ``{"name":piece,...}`` of the raw row's columns (all of them, or ``columns``;
    ``row`` its bytes, ``cols`` its values' places): each piece's span in ``spans`` (when
    given, two per column) and, for the key's columns, in ``key_spans`` with their str
    forms in ``key_forms``."""
    cdef bytes kinds = <bytes>PyTuple_GET_ITEM(plan, 2)
    cdef tuple names = <tuple>PyTuple_GET_ITEM(plan, 3)
    cdef tuple loads
    if mode:
        loads = <tuple>_tolerant_loads(plan)
    else:
        loads = <tuple>PyTuple_GET_ITEM(plan, 4)
    cdef bytes positions = <bytes>PyTuple_GET_ITEM(plan, 17)
    cdef const unsigned char *kind = <const unsigned char *>PyBytes_AS_STRING(kinds)
    cdef const unsigned char *position = <const unsigned char *>PyBytes_AS_STRING(positions)
    cdef Py_ssize_t count = width if columns is None else PyTuple_GET_SIZE(columns), j, i, at
    cdef int keyed
    _put_char(b, b'{')
    for j in range(count):
        i = j if columns is None else <Py_ssize_t>(<object>PyTuple_GET_ITEM(columns, j))
        if j:
            _put_char(b, b',')
        _put_bytes(b, <bytes>PyTuple_GET_ITEM(names, i))
        at = b.n
        keyed = position[i]
        if cols[2 * i + 1] < 0:
            _put(b, b"null", 4)
            form = None
        else:
            form = _piece(b, kind[i], row + cols[2 * i], cols[2 * i + 1],
                          <object>PyTuple_GET_ITEM(loads, i), mode, keyed != 0)
        if spans != NULL:
            spans[2 * i] = at
            spans[2 * i + 1] = b.n
        if keyed:
            key_spans[2 * (keyed - 1)] = at
            key_spans[2 * (keyed - 1) + 1] = b.n
            _set_form(key_forms, keyed - 1, form)
    _put_char(b, b'}')
    return 0


cdef int _row(Buf *b, tuple plan, const char *row, const Py_ssize_t *cols, tuple columns,
              Py_ssize_t width, Py_ssize_t *spans, Py_ssize_t *key_spans,
              PyObject **key_forms) except -1:
    """:func:`_record` with the table's loaders, or again with the tolerant ones; the mode."""
    cdef Py_ssize_t at = b.n
    try:
        _record(b, plan, row, cols, columns, width, 0, spans, key_spans, key_forms)
        return 0
    except _Tolerant:
        b.n = at
    _record(b, plan, row, cols, columns, width, 1, spans, key_spans, key_forms)
    return 1


cdef object _subject(Buf *b, tuple plan, const char *row, const Py_ssize_t *cols, int mode,
                     Py_ssize_t *key_spans, PyObject **key_forms):
    """The twin of ``direct._subject``: the key's text from its pieces in ``b``."""
    cdef tuple key = <tuple>PyTuple_GET_ITEM(plan, 5)
    cdef bytes kinds = <bytes>PyTuple_GET_ITEM(plan, 2)
    cdef Py_ssize_t count = PyTuple_GET_SIZE(key), j, i
    cdef list pieces = None
    cdef bint json_key = False
    cdef char stack[256]
    cdef Buf k
    for j in range(count):
        i = <Py_ssize_t>(<object>PyTuple_GET_ITEM(key, j))
        if ((<const unsigned char *>PyBytes_AS_STRING(kinds))[i] == JSON
                or (<const unsigned char *>PyBytes_AS_STRING(kinds))[i] == JSONB) \
                and cols[2 * i + 1] >= 0:
            json_key = True
    if json_key:  # a json key's form is json_value's of the document: through Python
        pieces = []
        loads = _tolerant_loads(plan) if mode else <tuple>PyTuple_GET_ITEM(plan, 4)
        for j in range(count):
            i = <Py_ssize_t>(<object>PyTuple_GET_ITEM(key, j))
            if ((<const unsigned char *>PyBytes_AS_STRING(kinds))[i] == JSON
                    or (<const unsigned char *>PyBytes_AS_STRING(kinds))[i] == JSONB) \
                    and cols[2 * i + 1] >= 0:
                form = _json_value(loads[i](PyBytes_FromStringAndSize(row + cols[2 * i],
                                                                      cols[2 * i + 1])))
                pieces.append(_dumps(form))
                _set_form(key_forms, j, form if type(form) is str else None)
            else:
                pieces.append(PyBytes_FromStringAndSize(b.p + key_spans[2 * j],
                                                        key_spans[2 * j + 1] - key_spans[2 * j]))
    if count == 1:
        if key_forms[0] != NULL:
            return <object>key_forms[0]
        if pieces is not None:
            return (<bytes>pieces[0]).decode()
        return _text(b.p + key_spans[0], key_spans[1] - key_spans[0])
    if pieces is not None:
        return (b"[" + b",".join(pieces) + b"]").decode()
    _init(&k, stack, 256)
    try:
        _put_char(&k, b'[')
        for j in range(count):
            if j:
                _put_char(&k, b',')
            _put(&k, b.p + key_spans[2 * j], key_spans[2 * j + 1] - key_spans[2 * j])
        _put_char(&k, b']')
        return _text(k.p, k.n)
    finally:
        _free(&k)


def direct_event(event, Py_ssize_t partitions):
    """The twin of ``direct.py_direct_event``: the Outgoing, or None when unfit."""
    try:
        return _direct(event, partitions)
    except Exception:  # unfit: the typed path encodes it (and raises, if it must)
        return None


cdef object _direct(object event, Py_ssize_t partitions):
    global _last, _last_time, _lsn_json, _type_json, _time_json, _kind_of
    cdef Py_ssize_t offsets[6]
    if type(event) is not _slots_of:
        _learn(type(event))
    memcpy(offsets, _offsets, sizeof(offsets))  # no Python code ran since the check
    cdef tuple raw = <tuple?>_attr(event, offsets, E_RAW)
    table = <object>PyTuple_GET_ITEM(raw, 0)
    new = <object>PyTuple_GET_ITEM(raw, 1)
    old = <object>PyTuple_GET_ITEM(raw, 2)
    old_kind = <object>PyTuple_GET_ITEM(raw, 3)
    cdef tuple plan
    if <object>PyTuple_GET_ITEM(_last, 0) is table \
            and <object>PyTuple_GET_ITEM(<tuple>PyTuple_GET_ITEM(_last, 1), 1) is _attr(event, offsets, E_SOURCE):
        plan = <tuple>PyTuple_GET_ITEM(_last, 1)
    else:
        plan = <tuple>_plan_of(event, table)
        _last = (table, plan, <object>PyTuple_GET_ITEM(plan, 9) + "/")
    prefix_slash = <object>PyTuple_GET_ITEM(_last, 2)
    key = <object>PyTuple_GET_ITEM(plan, 5)
    if key is None:
        raise _Unfit
    cdef Py_ssize_t width = PyBytes_GET_SIZE(<bytes>PyTuple_GET_ITEM(plan, 2))
    cdef Py_ssize_t subject_at = 0, subject_end = 0
    cdef Py_ssize_t nkey = PyTuple_GET_SIZE(<tuple>key), i
    cdef Py_ssize_t key_spans[2 * MAX_KEY]
    cdef Py_ssize_t old_key_spans[2 * MAX_KEY]
    # the key's forms in each row sent (an insert has no old row, a delete no new one)
    cdef PyObject *key_forms[MAX_KEY]  # owned references, NULL for None (see _set_form)
    cdef PyObject *old_key_forms[MAX_KEY]
    if nkey > MAX_KEY:
        raise _Unfit
    for i in range(nkey):
        key_forms[i] = NULL
        old_key_forms[i] = NULL
    cdef Py_ssize_t *spans = NULL
    # per column of each raw row, where its value is (_columns), then the pieces' spans
    cdef Py_ssize_t places_stack[8 * COLUMNS]
    cdef Py_ssize_t *places = places_stack
    cdef Py_ssize_t *new_cols = NULL
    cdef Py_ssize_t *old_cols = NULL
    cdef const char *new_p = NULL
    cdef const char *old_p = NULL
    cdef int new_mode = 0, old_mode = 0
    cdef bint full_old = old is None or old_kind != "K"  # asked only of an old row sent
    cdef bint changes = old is not None and new is not None and full_old
    cdef char data_stack[STACK]
    cdef char head_stack[512]
    cdef tuple lsn_json, type_json, time_json
    cdef Buf d, h
    _init(&d, data_stack, STACK)
    _init(&h, head_stack, 512)
    try:
        if width > COLUMNS:
            places = <Py_ssize_t *>PyMem_Malloc(8 * width * sizeof(Py_ssize_t))
            if places == NULL:
                places = places_stack
                raise MemoryError()
        new_cols, old_cols = places, places + 2 * width
        if changes:
            spans = places + 4 * width
        if new is not None:
            _columns(new, width, new_cols)
            new_p = PyBytes_AS_STRING(new)
        if old is not None:
            _columns(old, width, old_cols)
            old_p = PyBytes_AS_STRING(old)
        _put(&d, b'"data":{"new_record":', 21)
        if new is not None:
            new_mode = _row(&d, plan, new_p, new_cols, None, width, spans, key_spans, key_forms)
        else:
            _put(&d, b"null", 4)
        _put(&d, b',"old_record":', 14)
        if old is not None:
            old_mode = _row(&d, plan, old_p, old_cols, None if full_old else
                            <tuple>PyTuple_GET_ITEM(plan, 7), width,
                            spans + 2 * width if spans != NULL else NULL,
                            old_key_spans, old_key_forms)
        else:
            _put(&d, b"null", 4)
        _put(&d, b',"changes":', 11)
        if changes:
            _put_char(&d, b'{')
            first = True
            names = <tuple>PyTuple_GET_ITEM(plan, 3)
            for i in range(width):
                if _same(new_p, new_cols, old_p, old_cols, i):
                    continue
                if not first:
                    _put_char(&d, b',')
                first = False
                _put_bytes(&d, <bytes>PyTuple_GET_ITEM(names, i))
                _put(&d, b'{"old_value":', 13)  # the pieces copied from d itself: by offset
                _put_own(&d, spans[2 * width + 2 * i], spans[2 * width + 2 * i + 1] - spans[2 * width + 2 * i])
                _put(&d, b',"new_value":', 13)
                _put_own(&d, spans[2 * i], spans[2 * i + 1] - spans[2 * i])
                _put_char(&d, b'}')
            _put_char(&d, b'}')
        else:
            _put(&d, b"null", 4)
        subject = None
        if nkey:
            if new is not None:
                subject = _subject(&d, plan, new_p, new_cols, new_mode, key_spans, key_forms)
            elif old is not None and (full_old or <object>PyTuple_GET_ITEM(plan, 6)):
                subject = _subject(&d, plan, old_p, old_cols, old_mode, old_key_spans,
                                   old_key_forms)
        _put_bytes(&d, <bytes>PyTuple_GET_ITEM(plan, 11))  # ,"columns":...,"lsn":
        lsn = _attr(event, offsets, E_LSN)
        # the caches' entries held in locals: another thread's encoding may replace them
        # while a Python call here runs (the partition's hash, a loader)
        lsn_json = _json_of(_lsn_json, lsn)
        _lsn_json = lsn_json
        _put_bytes(&d, <bytes>PyTuple_GET_ITEM(lsn_json, 1))
        _put_bytes(&d, <bytes>PyTuple_GET_ITEM(plan, 12))  # base_types, key, }
        prefix = <object>PyTuple_GET_ITEM(plan, 9)
        if subject is not None:
            _put(&d, b',"subject":', 11)
            subject_at = d.n
            _put_str(&d, subject)
            subject_end = d.n  # the subject as a JSON string: d.p[subject_at:subject_end]
            key_text = _concat(prefix_slash, subject)
        else:
            key_text = prefix
        _put_char(&d, b'}')

        event_type = _attr(event, offsets, E_TYPE)
        if <object>PyTuple_GET_ITEM(_kind_of, 0) is not event_type:  # not the last event's
            _kind_of = (event_type, _KINDS[event_type])
        kind, type_name = <tuple>PyTuple_GET_ITEM(_kind_of, 1)
        moment = _attr(event, offsets, E_TIMESTAMP)
        if <object>PyTuple_GET_ITEM(_last_time, 0) is moment:  # the transaction's time again
            time = <object>PyTuple_GET_ITEM(_last_time, 1)
        else:  # written here with its JSON string, else _rfc3339's
            pair = _time_json_c(moment)
            time = _rfc3339(moment) if pair is None else <object>PyTuple_GET_ITEM(pair, 0)
            _time_json = _time_json if pair is None else pair
            _last_time = (moment, time)
        partition = _partition_of(key_text, partitions) if partitions > 1 else 0
        ident = _attr(event, offsets, E_ID)
        _put(&h, b'{"specversion":"1.0","id":', 26)
        _put_str(&h, ident)
        _put_bytes(&h, <bytes>PyTuple_GET_ITEM(plan, 8))  # ,"source":...,"type":
        type_json = _json_of(_type_json, type_name)
        _type_json = type_json
        _put_bytes(&h, <bytes>PyTuple_GET_ITEM(type_json, 1))
        _put(&h, b',"time":', 8)
        time_json = _json_of(_time_json, time)
        _time_json = time_json
        _put_bytes(&h, <bytes>PyTuple_GET_ITEM(time_json, 1))
        _put(&h, b',"datacontenttype":"application/json","walexlsn":', 49)
        _put_bytes(&h, <bytes>PyTuple_GET_ITEM(lsn_json, 1))
        _put_bytes(&h, <bytes>PyTuple_GET_ITEM(plan, 10))  # ,"partitionkey":"schema.table
        if subject is not None:  # "/" and the subject's JSON string without its opening quote
            _put_char(&h, b'/')
            _put(&h, d.p + subject_at + 1, subject_end - subject_at - 1)
        else:
            _put_char(&h, b'"')
        _put(&h, b',"walexpartition":', 18)
        _put_int(&h, partition)
        _put(&h, b',"walexpartitions":', 19)
        _put_int(&h, partitions)
        _put_char(&h, b',')
        body = PyBytes_FromStringAndSize(NULL, h.n + d.n)
        memcpy(PyBytes_AS_STRING(body), h.p, h.n)
        memcpy(PyBytes_AS_STRING(body) + h.n, d.p, d.n)
    finally:
        _free(&d)
        _free(&h)
        if places != places_stack:
            PyMem_Free(places)
        for i in range(nkey):
            Py_XDECREF(key_forms[i])
            Py_XDECREF(old_key_forms[i])
    return _outgoing(ident, <object>PyTuple_GET_ITEM(plan, 14), <object>PyTuple_GET_ITEM(plan, 15),
                     kind, partition, body, <object>PyTuple_GET_ITEM(plan, 13), time, key_text,
                     subject)


cdef object _direct_or_none(object event, Py_ssize_t partitions):
    """:func:`direct_event` as a C function (see :func:`c_entry`)."""
    try:
        return _direct(event, partitions)
    except Exception:  # unfit: the typed path encodes it (and raises, if it must)
        return None


def c_entry():
    """:func:`direct_event` as a C function in a capsule (``object (*)(object, Py_ssize_t)``,
    named ``walex.destinations._direct.direct_event``): walex._encode calls it with no
    Python call per event."""
    return PyCapsule_New(<void *>_direct_or_none, b"walex.destinations._direct.direct_event", NULL)


def direct_event_or_raise(event, Py_ssize_t partitions):
    """:func:`direct_event` that raises what made the event unfit (for tests)."""
    return _direct(event, partitions)


def jsonb_compact(bytes raw):
    """The twin of ``direct.jsonb_compact`` (for tests): the compact jsonb, or None."""
    cdef char stack[256]
    cdef Buf b
    _init(&b, stack, 256)
    try:
        if not _jsonb(&b, PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw)):
            return None
        return PyBytes_FromStringAndSize(b.p, b.n)
    finally:
        _free(&b)
