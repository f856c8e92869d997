# cython: language_level=3, boundscheck=False, wraparound=False
"""The compiled twin of ``walex.destinations.krecords.py_records``: a batch's records handed
to the Kafka producer, in order (the same calls of ``produce``, with the same arguments;
``tests/destinations/test_kafka_records.py`` holds the twins equal). See ``krecords``'
docstring for the contract.

The items are read as tuples (an ``Outgoing`` is one) and ``produce`` is called with
``PyObject_Call`` on an argument tuple of the loop's own, no Python frame, attribute
lookup or unpacking per record. The client keeps no reference to its arguments (it
copies the value, key and headers into librdkafka's message before it returns), so
the argument tuple, the header list and its ``("ce_id", id)`` pair are filled again
for the next record instead of being made anew, but only while the loop holds the
sole reference to each (``Py_REFCNT``): whatever a ``produce`` kept (a recording test
double, a future client) is never changed, a new object takes its place.
"""

from cpython.ref cimport PyObject, Py_INCREF, Py_XDECREF
from confluent_kafka import KafkaException

__all__ = ["records"]

cdef extern from "Python.h":
    Py_ssize_t Py_REFCNT(object o)
    PyObject* PyTuple_GET_ITEM(object p, Py_ssize_t pos)
    void PyTuple_SET_ITEM(object p, Py_ssize_t pos, object o)  # steals o
    PyObject* PyList_GET_ITEM(object p, Py_ssize_t pos)
    void PyList_SET_ITEM(object p, Py_ssize_t pos, object o)  # steals o
    object PyObject_Call(object callable_object, object args, PyObject* kw)

cdef tuple _SPECVERSION = ("ce_specversion", b"1.0")
cdef tuple _CONTENT_TYPE = ("content-type", b"application/cloudevents+json; charset=UTF-8")
cdef Py_ssize_t _MOST_SOURCES = 4096


cdef inline void _tuple_put(tuple t, Py_ssize_t at, object value):
    """``t[at] = value`` in a tuple no one else holds (the old item released)."""
    cdef PyObject* old = PyTuple_GET_ITEM(t, at)
    Py_INCREF(value)
    PyTuple_SET_ITEM(t, at, value)
    Py_XDECREF(old)


cdef inline void _list_put(list l, Py_ssize_t at, object value):
    cdef PyObject* old = PyList_GET_ITEM(l, at)
    if old == <PyObject*>value:  # (the source, type and time pairs: mostly the same)
        return
    Py_INCREF(value)
    PyList_SET_ITEM(l, at, value)
    Py_XDECREF(old)


cdef inline Py_ssize_t _holds(tuple args, list headers):
    """1 when the argument tuple holds ``headers`` (its last item), else 0."""
    if args is None or headers is None:
        return 0
    return PyTuple_GET_ITEM(args, 7) == <PyObject*>headers


cdef inline list _headers(list reused, Py_ssize_t held, object id_, object source_header,
                          object type_header, object time_header, object subject):
    """The record's ce_* header list: ``reused`` filled again when the loop's ``held``
    references are all it has, else a new one."""
    cdef object slot
    if reused is None or Py_REFCNT(reused) != held:
        if subject is None:
            return [_SPECVERSION, ("ce_id", id_), source_header, type_header, time_header,
                    _CONTENT_TYPE]
        return [_SPECVERSION, ("ce_id", id_), source_header, type_header, time_header,
                _CONTENT_TYPE, ("ce_subject", subject)]
    slot = <object>PyList_GET_ITEM(reused, 1)
    if Py_REFCNT(slot) == 2:  # the list's reference and `slot`'s: no one kept the pair
        _tuple_put(<tuple>slot, 1, id_)
    else:
        _list_put(reused, 1, ("ce_id", id_))
    _list_put(reused, 2, source_header)
    _list_put(reused, 3, type_header)
    _list_put(reused, 4, time_header)
    if subject is not None:
        slot = <object>PyList_GET_ITEM(reused, 6)
        if Py_REFCNT(slot) == 2:
            _tuple_put(<tuple>slot, 1, subject)
        else:
            _list_put(reused, 6, ("ce_subject", subject))
    return reused


def records(object produce, list batch, Py_ssize_t start, object topic, object render,
            object failed, dict sources, dict types, bint tombstones, object refused,
            bint ce_headers=True):
    cdef Py_ssize_t at, n = len(batch), count = 0
    cdef tuple item, source_header = None, time_header = ("ce_time", b"")
    cdef object type_kind = None, type_header = None  # the ce_type pair of the last kind
    cdef tuple args = None  # produce's arguments, filled again while the loop alone holds it
    cdef list headers = None, plain = None, with_subject = None
    cdef list only = [_CONTENT_TYPE]  # the headers of every record without the ce_* ones
    cdef object id_, schema, table, kind, partition, body, source, time, key, subject
    cdef object last_source = None, time_text = None
    cdef object last_schema = None, last_table = None, last_kind = None, last_partition = -1
    cdef object where = topic if topic is not None else ""
    cdef object entry
    cdef bint fixed = topic is not None
    for at in range(start, n):
        entry = batch[at]
        if not isinstance(entry, tuple) or len(<tuple>entry) != 10:
            raise TypeError(f"expected an Outgoing, got {entry!r}")
        item = <tuple>entry
        id_ = item[0]
        kind = item[3]
        source = item[6]
        time = item[7]
        key = item[8]
        subject = item[9]
        if not fixed:
            schema = item[1]
            table = item[2]
            partition = item[4]
            if (schema is not last_schema or table is not last_table or kind is not last_kind
                    or partition != last_partition):
                where = render(item)
                last_schema = schema
                last_table = table
                last_kind = kind
                last_partition = partition
        if not ce_headers:
            headers = only
        else:
            if source is not last_source:
                last_source = source
                source_header = sources.get(source)
                if source_header is None:
                    if len(sources) >= _MOST_SOURCES:
                        sources.clear()
                    source_header = ("ce_source", source.encode())
                    sources[source] = source_header
            if time is not time_text:
                time_text = time
                time_header = ("ce_time", time.encode())
            if kind is not type_kind:
                type_header = types[kind]
                type_kind = kind
            headers = None  # the loop's references to a list: its own and the argument tuple's
            if subject is None:
                plain = _headers(plain, 1 + _holds(args, plain), id_, source_header,
                                 type_header, time_header, None)
                headers = plain
            else:
                with_subject = _headers(with_subject, 1 + _holds(args, with_subject), id_,
                                        source_header, type_header, time_header, subject)
                headers = with_subject
        if args is None or Py_REFCNT(args) != 1:
            args = (where, item[5], key, -1, failed, None, 0, headers)
        else:
            _tuple_put(args, 0, where)
            _tuple_put(args, 1, item[5])
            _tuple_put(args, 2, key)
            _tuple_put(args, 7, headers)
        try:
            PyObject_Call(produce, args, NULL)
        except BufferError:  # the producer's queue is full
            return count, at, where, headers, False
        except KafkaException as exc:
            raise refused(where, exc) from None
        count += 1
        if tombstones and kind == "delete":
            try:
                produce(where, None, key, -1, failed, None, 0, None)
            except BufferError:
                return count, at, where, None, True
            except KafkaException as exc:
                raise refused(where, exc) from None
            count += 1
    return count, n, where, None, False
