# cython: language_level=3, boundscheck=False, wraparound=False
"""The compiled twin of ``walex.destinations.krecords.py_records``: a batch's records handed
to the Kafka producer, in order (the same calls of ``produce``, with the same arguments;
``tests/destinations/test_kafka_records.py`` holds the twins equal). See ``krecords``'
docstring for the contract.

The items are read as tuples (an ``Outgoing`` is one), each record's header list is
built at once, and the call's arguments go straight into the tuple the client parses:
no Python frame, no attribute lookup or unpacking per record.
"""

from confluent_kafka import KafkaException

__all__ = ["records"]

cdef tuple _SPECVERSION = ("ce_specversion", b"1.0")
cdef tuple _CONTENT_TYPE = ("content-type", b"application/cloudevents+json; charset=UTF-8")
cdef Py_ssize_t _MOST_SOURCES = 4096


def records(object produce, list batch, Py_ssize_t start, object topic, object render,
            object failed, dict sources, dict types, bint tombstones, object refused,
            bint ce_headers=True):
    cdef Py_ssize_t at, n = len(batch), count = 0
    cdef tuple item, source_header = None, time_header = ("ce_time", b"")
    cdef list headers = None
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
            if subject is None:
                headers = [_SPECVERSION, ("ce_id", id_), source_header, types[kind],
                           time_header, _CONTENT_TYPE]
            else:
                headers = [_SPECVERSION, ("ce_id", id_), source_header, types[kind],
                           time_header, _CONTENT_TYPE, ("ce_subject", subject)]
        try:
            produce(where, item[5], key, -1, failed, None, 0, headers)
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
