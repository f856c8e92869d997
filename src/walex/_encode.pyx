# cython: language_level=3, wraparound=False, boundscheck=False
"""walex._encode: the CloudEvents encoder's fast path, compiled (optional).

The twin of ``_fast_event`` / ``_fast_record`` in
:mod:`walex.destinations.encoding`, which stay the pure-Python path and, with
``encode_event_reference``, the reference: the same rules, the same bytes
(``tests/destinations/test_encoding_paths.py`` runs every check through both
paths). Here the type checks of the plain columns are pointer comparisons in
a C loop and no Python frame runs per event. The encoding module hands its
helpers over with :func:`bind` (this module imports nothing of walex, so
there is no import cycle); anything the fast path does not take on raises
the module's ``_Unfit`` (or orjson's error), and ``encode_event`` falls back
to the reference. A :class:`~walex.rawevent.RawEvent` still holding its raw rows
goes through the direct encoder first (:mod:`walex.destinations.direct`), and is
typed (``event.typed()``, the RawEvent left as it is) only when that one leaves
it. The body is copied out of orjson's result at its exact size, as the pure
twin does (see ``_tuple_new`` there).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_Copy, PyDict_GetItem, PyDict_Size
from cpython.object cimport PyObject
from cpython.pycapsule cimport PyCapsule_GetPointer
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.string cimport memcpy

import datetime as _dt
import math as _math
from decimal import Decimal as _Decimal
from uuid import UUID as _UUID_class

import orjson

__all__ = ["bind", "fast_event", "fast_events", "fast_events_sized"]

cdef object _dumps = orjson.dumps
cdef object _isfinite = _math.isfinite
cdef object _tuple_new = tuple.__new__
cdef object _DATETIME = _dt.datetime
cdef object _DATE = _dt.date
cdef object _UUID = _UUID_class
cdef object _DECIMAL = _Decimal
cdef long long _MAX_SAFE = 2**53 - 1

# the encoding module's helpers, set by bind()
cdef object _plan = None
cdef object _json_value = None
cdef object _changes = None
cdef object _subject = None
cdef object _rfc3339 = None
cdef object _partition_of = None
cdef object _float = None
cdef object _Outgoing = None
cdef object _Unfit = None
cdef object _UnchangedToast = None
cdef dict _KINDS = None
cdef object _OPTIONS = None
cdef object _reference = None  # encode_event_reference
cdef object _RawEvent = None  # walex.rawevent.RawEvent
cdef object _direct = None  # walex.destinations.direct.direct_event
ctypedef object (*_direct_fn)(object, Py_ssize_t)
cdef _direct_fn _direct_c = NULL  # the same, when it is the compiled one: its C function
cdef object _JSON_ERROR = orjson.JSONEncodeError
# the Source planned last and its plan, as one tuple (the events of a table come in runs;
# the Source is kept alive, so its identity is not reused)
cdef tuple _last_plan = (None, None)

include "destinations/_rfc3339.pxi"  # _time_text: the event's CloudEvents time


def bind(helpers):
    """Take the encoding module's helpers (its namespace); returns :func:`fast_event`."""
    global _plan, _json_value, _changes, _subject, _rfc3339, _partition_of, _float
    global _Outgoing, _Unfit, _UnchangedToast, _KINDS, _OPTIONS, _reference, _RawEvent, _direct
    _plan, _json_value, _changes = helpers["_plan"], helpers["json_value"], helpers["_changes"]
    _subject, _rfc3339 = helpers["_subject"], helpers["_rfc3339"]
    _partition_of, _float = helpers["partition_of"], helpers["_float"]
    _Outgoing, _Unfit = helpers["Outgoing"], helpers["_Unfit"]
    if _Outgoing._fields.index("body") != 5:  # fast_events_sized reads it by position
        raise ImportError("walex._encode is older than walex.destinations.base.Outgoing: "
                          "rebuild it (pip install -e .)")
    _UnchangedToast, _KINDS, _OPTIONS = helpers["UnchangedToast"], helpers["_KINDS"], helpers["_OPTIONS"]
    _reference = helpers["encode_event_reference"]
    _RawEvent, _direct = helpers["RawEvent"], helpers["direct_event"]
    global _direct_c
    entry = helpers.get("direct_c_entry")
    _direct_c = (<_direct_fn>PyCapsule_GetPointer(entry, b"walex.destinations._direct.direct_event")
                 if entry is not None else NULL)
    return fast_event


cdef inline bint _plain_value(object value):
    """The twin of ``type(value) in _PLAIN_VALUES``."""
    cdef object kind = type(value)
    return (kind is str or kind is int or kind is bool or value is None or kind is _DATETIME
            or kind is _DATE or kind is _UUID)


cdef object _record(object record, object names, tuple plain, tuple convert):
    cdef Py_ssize_t i
    cdef PyObject *found
    cdef object name, value, kind
    cdef dict out
    if type(record) is not dict:
        raise _Unfit
    for name in record:
        if name not in names:
            raise _Unfit
    for i in range(PyTuple_GET_SIZE(plain)):
        found = PyDict_GetItem(record, <object>PyTuple_GET_ITEM(plain, i))
        if found is not NULL and not _plain_value(<object>found):
            raise _Unfit
    if PyTuple_GET_SIZE(convert) == 0:
        return record  # orjson reads it as it is
    out = PyDict_Copy(record)
    for i in range(PyTuple_GET_SIZE(convert)):
        name = <object>PyTuple_GET_ITEM(convert, i)
        found = PyDict_GetItem(out, name)
        if found is NULL:
            continue
        value = <object>found
        kind = type(value)
        if kind is _DECIMAL:
            text = str(value)  # three times faster than format(value, "f"), the same text
            out[name] = text if "E" not in text else format(value, "f")  # unless exponent form
        elif kind is float:
            if not _isfinite(value):
                out[name] = _float(value)
        elif kind is _UnchangedToast:
            raise _Unfit
        else:
            out[name] = _json_value(value)
    return out


def fast_events(list events, Py_ssize_t partitions):
    """The twin of ``encoding._encode_events``: each event through :func:`fast_event`, or
    through the reference when the fast path does not take it on; no Python frame per event."""
    cdef list out = []
    for event in events:
        try:
            out.append(_fast_event(event, partitions))
        except (_Unfit, _JSON_ERROR):
            out.append(_reference(event, partitions))
    return out


def fast_events_sized(list events, Py_ssize_t partitions):
    """The twin of ``encoding._encode_events_sized``: :func:`fast_events`, and the bytes of
    the bodies added up as each is made (no pass over the messages afterwards)."""
    cdef list out = []
    cdef Py_ssize_t size = 0
    for event in events:
        try:
            one = _fast_event(event, partitions)
        except (_Unfit, _JSON_ERROR):
            one = _reference(event, partitions)
        out.append(one)
        body = <object>PyTuple_GET_ITEM(<tuple>one, 5)  # Outgoing.body (checked at bind)
        size += PyBytes_GET_SIZE(body) if type(body) is bytes else len(body)
    return out, size


def fast_event(event, partitions):
    """One event as an ``Outgoing``; raises ``_Unfit`` or orjson's error for the reference."""
    return _fast_event(event, partitions)


cdef object _fast_event(object event, Py_ssize_t partitions):
    global _last_plan
    if type(event) is _RawEvent and event.raw is not None:  # rows as PostgreSQL sent them
        out = _direct_c(event, partitions) if _direct_c != NULL else _direct(event, partitions)
        if out is not None:
            return out
        event = event.typed()
    src = event.source
    last = _last_plan
    if <object>PyTuple_GET_ITEM(last, 0) is src:
        plan = <object>PyTuple_GET_ITEM(last, 1)
    else:
        plan = _plan(event)
        _last_plan = (src, plan)
    # the plan's fields by position (a _Plan is a tuple): no attribute lookup each
    cdef tuple fields = <tuple>plan
    info = <object>PyTuple_GET_ITEM(fields, 0)
    names = <object>PyTuple_GET_ITEM(fields, 1)
    plain = <tuple>PyTuple_GET_ITEM(fields, 2)
    convert = <tuple>PyTuple_GET_ITEM(fields, 3)
    base_types = <object>PyTuple_GET_ITEM(fields, 5)
    key_columns = <object>PyTuple_GET_ITEM(fields, 6)
    key1 = <object>PyTuple_GET_ITEM(fields, 7)
    new, old, changes = event.new_record, event.old_record, event.changes
    data = {
        "new_record": None if new is None else _record(new, names, plain, convert),
        "old_record": None if old is None else _record(old, names, plain, convert),
        "changes": None if changes is None else _changes(changes, info.json_columns),
        "columns": <object>PyTuple_GET_ITEM(fields, 4),
        "lsn": event.lsn,
    }
    if base_types is not None:
        data["base_types"] = base_types
    if key_columns is not None:
        data["key"] = key_columns
    record = new if new is not None else old
    value = record.get(key1) if record and key1 is not None else None
    if type(value) is int and -_MAX_SAFE <= value <= _MAX_SAFE:
        subject = str(value)
    elif type(value) is str:
        subject = value
    else:
        subject = _subject(info, event)
    key = info.prefix if subject is None else info.prefix + "/" + subject
    partition = _partition_of(key, partitions) if partitions > 1 else 0
    kind, type_name = _KINDS[event.type]
    source = info.source
    time = _time_text(event.timestamp)
    document = {
        "specversion": "1.0",
        "id": event.id,
        "source": source,
        "type": type_name,
        "time": time,
        "datacontenttype": "application/json",
        "walexlsn": event.lsn,
        "partitionkey": key,
        "walexpartition": partition,
        "walexpartitions": partitions,
        "data": data,
    }
    if subject is not None:
        document["subject"] = subject
    body = _dumps(document, option=_OPTIONS)
    return _tuple_new(_Outgoing, (event.id, src.schema, src.table, kind, partition,
                                  PyBytes_FromStringAndSize(PyBytes_AS_STRING(body),
                                                            PyBytes_GET_SIZE(body)),
                                  source, time, key, subject))
