# cython: language_level=3, wraparound=False, boundscheck=False
"""walex._sizes: an event's deep size in memory, compiled (optional).

The twin of ``py_event_bytes`` / ``py_value_bytes`` in :mod:`walex.sizes`, which
stay the reference and the fallback: the same walk, the same totals
(``tests/test_sizes.py`` checks both on every kind of value). The pipeline sizes
every batch it queues (``Sizer.measure``), so a one-row transaction paid a
Python frame or two and a dozen ``sys.getsizeof`` calls (each an argument
parse, a bound ``__sizeof__`` and an int); here the walk is a C loop and the
size of an object is:

- for a compact ASCII ``str`` (ids, most text), its header and characters, as
  ``str.__sizeof__`` counts them;
- for an exact ``bytes`` or ``tuple`` (a RawEvent's rows as sent, its raw tuple), the size of one
  of no length (``sys.getsizeof``'s, at import) and its length times its item's size;
- for an ``int`` within 64 bits, ``sys.getsizeof`` of the first one of as many
  digits, kept by digits;
- for a type whose instances all take the same memory (no items, the
  ``__sizeof__`` of ``object``: float, datetime, date, time, timedelta, UUID,
  Event), ``sys.getsizeof`` of its first instance, kept per type;
- for anything else, ``sys.getsizeof`` (in C, without the call, where the
  interpreter exports it).

:mod:`walex.sizes` hands its constants over with :func:`bind` (this module
imports nothing of walex, so there is no import cycle).
"""

from cpython.dict cimport PyDict_GetItem, PyDict_Next, PyDict_SetItem, PyDict_Size
from cpython.object cimport PyObject

import sys

__all__ = ["bind", "event_bytes", "measure", "value_bytes"]

cdef extern from *:
    """
    #if PY_VERSION_HEX < 0x030D0000
    #define WALEX_SIZEOF_C 1
    #else
    #define WALEX_SIZEOF_C 0
    #define _PySys_GetSizeOf(o) ((size_t)-1)
    #endif
    /* str.__sizeof__ of a compact ASCII str (no separate UTF-8 or wchar_t copy):
       -1 for any other object */
    static Py_ssize_t walex_ascii_sizeof(PyObject *o) {
        if (!PyUnicode_CheckExact(o) || !PyUnicode_IS_COMPACT_ASCII(o))
            return -1;
    #if PY_VERSION_HEX < 0x030C0000
        if (((PyASCIIObject *)o)->wstr != NULL)
            return -1;
    #endif
        return (Py_ssize_t)sizeof(PyASCIIObject) + PyUnicode_GET_LENGTH(o) + 1;
    }
    /* the size of an exact bytes or tuple (the rows of a RawEvent as sent), from its
       length and the size of one of no length (getsizeof's, measured at import): -1 for
       any other object */
    static Py_ssize_t walex_bytes_base, walex_tuple_base;
    static Py_ssize_t walex_var_sizeof(PyObject *o) {
        if (PyBytes_CheckExact(o))
            return walex_bytes_base + PyBytes_GET_SIZE(o);
        if (PyTuple_CheckExact(o))
            return walex_tuple_base + PyTuple_GET_SIZE(o) * (Py_ssize_t)sizeof(PyObject *);
        return -1;
    }
    /* the PyLong digits of an int within a long long (getsizeof depends on nothing
       else), -1 past that */
    static int walex_int_digits(PyObject *o) {
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
        unsigned long long a;
        int bits = 0;
        if (overflow || (v == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            return -1;
        }
        a = v < 0 ? (unsigned long long)0 - (unsigned long long)v : (unsigned long long)v;
        while (a) {
            bits++;
            a >>= 1;
        }
        return (bits + PyLong_SHIFT - 1) / PyLong_SHIFT;
    }
    /* whether every instance of a type has the same size (its __sizeof__ being object's):
       no items, and a GC header that does not depend on the instance */
    static int walex_fixed_layout(PyObject *kind) {
        PyTypeObject *t = (PyTypeObject *)kind;
        return t->tp_itemsize == 0 && t->tp_is_gc == NULL;
    }
    """
    const int WALEX_SIZEOF_C
    Py_ssize_t walex_ascii_sizeof(object o)
    Py_ssize_t walex_var_sizeof(object o)
    Py_ssize_t walex_bytes_base, walex_tuple_base
    bint walex_fixed_layout(object kind)
    int walex_int_digits(object o)
    size_t _PySys_GetSizeOf(object o) except? <size_t>-1

cdef object _getsizeof = sys.getsizeof
cdef object _object_sizeof = object.__sizeof__
cdef dict _fixed = {}  # type -> the size of each of its instances, or -1: not fixed
# the last types looked up in _fixed (which holds them), by their address: a dict lookup saved
cdef enum:
    _WAYS = 16
cdef PyObject *_seen_type[_WAYS]
cdef Py_ssize_t _seen_size[_WAYS]
cdef Py_ssize_t _int_sizes[8]  # getsizeof of an int by its digits, 64 bits at most (-1: not seen)
for _i in range(8):
    _int_sizes[_i] = -1
# getsizeof(b"x") less its one byte, getsizeof((None,)) less its one item: what a bytes or
# tuple of no length takes (object.__sizeof__ and bytes.__sizeof__ add tp_itemsize per item)
walex_bytes_base = sys.getsizeof(b"x") - bytes.__itemsize__
walex_tuple_base = sys.getsizeof((None,)) - tuple.__itemsize__

# set by bind()
cdef object _RawEvent = None
cdef object _FLAT = frozenset()
cdef Py_ssize_t _MOST_NODES = 5000
cdef Py_ssize_t _PER_EVENT = 8, _PER_BATCH = 200
cdef object _events_bytes = None


def bind(raw_event, flat, Py_ssize_t most_nodes, Py_ssize_t per_event, Py_ssize_t per_batch,
         events_bytes):
    """Take :mod:`walex.sizes`' definitions: the RawEvent class, the flat value types, the
    most nodes of one value walked, the bytes counted per event and per batch, and its
    ``events_bytes``."""
    global _RawEvent, _FLAT, _MOST_NODES, _PER_EVENT, _PER_BATCH, _events_bytes
    _RawEvent, _FLAT, _MOST_NODES = raw_event, frozenset(flat), most_nodes
    _PER_EVENT, _PER_BATCH, _events_bytes = per_event, per_batch, events_bytes


def measure(sizer, txn):
    """``walex.sizes.Sizer.py_measure`` (a method of ``Sizer`` when compiled): set
    ``txn.size`` to the batch's size in memory; returns it."""
    wire = txn.size
    events = txn.events
    cdef Py_ssize_t held
    if len(events) == 1:  # a one-change transaction: the common case
        held = event_bytes(events[0]) + _PER_EVENT + _PER_BATCH
    else:
        held = _events_bytes(events) + _PER_BATCH
    if wire > 4096:
        sizer.scale = max(1.0, held / wire)
    size = max(held, wire)
    txn.size = size
    return size


cdef Py_ssize_t _size(object o) except -1:
    """``sys.getsizeof(o)``."""
    cdef Py_ssize_t n = walex_ascii_sizeof(o)
    if n >= 0:
        return n
    n = walex_var_sizeof(o)
    if n >= 0:
        return n
    cdef object kind = type(o)
    cdef int digits
    if kind is int:
        digits = walex_int_digits(o)
        if digits >= 0:
            n = _int_sizes[digits]
            if n < 0:
                n = _int_sizes[digits] = _getsizeof(o)
            return n
    cdef size_t way = (<size_t><PyObject *>kind >> 4) % _WAYS
    cdef PyObject *found
    if _seen_type[way] == <PyObject *>kind:
        n = _seen_size[way]
    else:
        found = PyDict_GetItem(_fixed, kind)
        if found != NULL:
            n = <object>found
        elif walex_fixed_layout(kind) and getattr(kind, "__sizeof__", None) is _object_sizeof:
            n = _getsizeof(o)  # every instance takes the type's basic size (and GC header)
            PyDict_SetItem(_fixed, kind, n)
        else:
            n = -1
            PyDict_SetItem(_fixed, kind, n)
        _seen_type[way] = <PyObject *>kind  # held by _fixed
        _seen_size[way] = n
    if n >= 0:
        return n
    if WALEX_SIZEOF_C:
        return <Py_ssize_t>_PySys_GetSizeOf(o)
    return _getsizeof(o)


cdef inline bint _small_int(object value):
    """An int the interpreter shares (-5..256)."""
    return -5 <= value <= 256


cpdef Py_ssize_t value_bytes(object value) except -1:
    """``walex.sizes.py_value_bytes``: deep size of one typed value."""
    kind = type(value)
    if kind is str or kind is float or kind is bytes:
        return _size(value)
    if kind is int:
        return 0 if _small_int(value) else _size(value)
    if kind in _FLAT:
        return _size(value)
    if value is None or kind is bool:
        return 0
    if kind is not dict and kind is not list and not isinstance(value, tuple):
        extra = getattr(value, "__dict__", None)  # a value class with attributes
        return _size(value) + (_size(extra) if extra is not None else 0)
    cdef Py_ssize_t total = 0, nodes = 0
    if kind is dict:
        total = _flat_dict_bytes(<dict>value)
        if total >= 0:
            return total
        total = 0
    cdef list stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if item is None or kind is bool:
            continue
        if kind is int and _small_int(item):  # the interpreter's shared small ints
            continue
        total += _size(item)
        nodes += 1
        if kind is dict:  # keys up to 64 bytes: shared through orjson's key cache
            for key in <dict>item:
                if type(key) is not str or len(<str>key) > 64:
                    stack.append(key)
            stack.extend((<dict>item).values())
        elif kind is list or isinstance(item, tuple):
            stack.extend(item)
        if nodes >= _MOST_NODES and stack:  # a huge document: the rest at the mean node size
            return total + total // nodes * len(stack)
    return total


cdef Py_ssize_t _flat_dict_bytes(dict value) except -2:
    """value_bytes of a dict (a json object) whose keys are all str of 64 characters at most
    and whose values are no containers, in one pass (the walk below would size the same
    nodes, and cannot reach the node bound with so few); -1 for any other dict."""
    if PyDict_Size(value) >= _MOST_NODES - 1:
        return -1
    cdef Py_ssize_t total = _size(value), pos = 0
    cdef PyObject *key
    cdef PyObject *item
    while PyDict_Next(value, &pos, &key, &item):
        if type(<object>key) is not str or len(<str>key) > 64:
            return -1
        kind = type(<object>item)
        if kind is dict or kind is list or isinstance(<object>item, tuple):
            return -1
        if item == <PyObject *>None or kind is bool or (kind is int and _small_int(<object>item)):
            continue
        total += _size(<object>item)
    return total


cdef Py_ssize_t _raw_bytes(object event, tuple raw) except -1:
    """``walex.sizes._raw_bytes``: a RawEvent not typed yet, its rows as sent."""
    cdef Py_ssize_t total = _size(event) + _size(event.id) + _size(raw) + _size(raw[4])
    for row in (raw[1], raw[2]):
        if row is not None:
            total += _size(row)  # one bytes object (walex.rawrow)
    return total


cpdef Py_ssize_t event_bytes(object event) except -1:
    """``walex.sizes.py_event_bytes``: deep size of one event."""
    if type(event) is _RawEvent:
        raw = event.raw
        if raw is not None:
            return _raw_bytes(event, raw)
    cdef Py_ssize_t total = _size(event) + _size(event.id)
    new, old, changes = event.new_record, event.old_record, event.changes
    if new is not None:
        total += _size(new)
        for value in new.values():
            kind = type(value)
            if kind is str:
                total += _size(value)
            elif kind is int:
                if not _small_int(value):
                    total += _size(value)
            elif value is not None and kind is not bool:
                total += value_bytes(value)
    if old is not None:
        total += _size(old)
        get = new.get if new is not None else None
        for key, value in old.items():
            if get is None or get(key) is not value:
                total += value_bytes(value)
    if changes:  # named tuples of values the records hold
        total += _size(changes) + 56 * len(changes)
    return total
