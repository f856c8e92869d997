"""The Kafka destination's records loop: a batch's items handed to the producer, in order.

:func:`records` gives what :mod:`walex.destinations.kafka` calls: the compiled twin
(``walex.destinations._krecords.records``) when that was built, else :func:`py_records`
(``WALEX_PURE_PYTHON=1`` in the environment when a destination is made forces the pure
one). Both take the same arguments and make the same calls of ``produce``
(``tests/destinations/test_kafka_records.py`` runs them side by side):

- each item (an :class:`~walex.destinations.encoding.Outgoing`) is one record of its
  topic (``topic``, or ``render(item)`` when the topic is a template: rendered again
  only when the item's schema, table, type or partition differ from the item before),
  its ``body`` as the value, its ``key`` as the key, the partitioner's partition (-1),
  ``failed`` as the delivery callback, no timestamp (0: now), and the headers
  ``ce_specversion``, ``ce_id``, ``ce_source``, ``ce_type``, ``ce_time``,
  ``content-type`` and, when the item has a subject, ``ce_subject``: a list per
  record (the compiled twin fills its own list, pairs and argument tuple again for
  the next record while nothing else holds them: the client copies them at once),
  of (name, value) pairs whose values shared by many records (the spec
  version, content type, type, source and time) are bytes made once (``sources``
  keeps each source's pair across batches, ``types`` is each type's); with
  ``ce_headers`` false, ``content-type`` alone (one list for every record: the
  client copies the headers at once, and the ``ce_*`` ones cost it about half of a
  record's instructions, see ``bench/PROFILE.md``);
- with ``tombstones``, a ``delete`` item's record is followed by a tombstone: the same
  topic and key, no value, no headers.

``produce`` is called positionally (the client parses a keyword argument by looking
its name up, for each of them). The loop stops at the first record the producer's
queue has no room for (``BufferError``): it returns ``(count, stop, where, headers,
tombstone)``, ``count`` the records produced, ``stop`` the index of the item whose
record (``tombstone`` False: its topic ``where`` and ``headers``) or whose tombstone
(``tombstone`` True: its record was produced) was not; the caller produces that one
when there is room and calls again from ``stop + 1``. When every record was
produced, ``stop`` is ``len(batch)``. A record the client refuses at once
(:class:`~confluent_kafka.KafkaException`) raises what ``refused(where, exc)``
returns.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaException

__all__ = ["CONTENT_TYPE", "compiled_records", "py_records", "records"]

CONTENT_TYPE = b"application/cloudevents+json; charset=UTF-8"
_SPECVERSION = ("ce_specversion", b"1.0")
_CONTENT_TYPE = ("content-type", CONTENT_TYPE)
_MOST_SOURCES = 4096  # pairs kept in ``sources``; more and it starts again


def py_records(produce: Callable[..., Any], batch: list[Any], start: int, topic: str | None,
               render: Callable[[Any], str], failed: Any, sources: dict[str, tuple[str, bytes]],
               types: dict[str, tuple[str, bytes]], tombstones: bool,
               refused: Callable[[str, KafkaException], Exception], ce_headers: bool = True
               ) -> tuple[int, int, str, Any, bool]:
    """Produce the records of ``batch[start:]`` (see the module's docstring)."""
    last_source: str | None = None
    source_header: Any = None
    time_text: str | None = None
    time_header: tuple[str, bytes] = ("ce_time", b"")
    where = topic if topic is not None else ""
    last_schema = last_table = last_kind = None
    last_partition = -1
    count = 0
    only = [_CONTENT_TYPE]  # the headers of every record without the ce_* ones
    for at in range(start, len(batch)):
        item = batch[at]
        (id_, schema, table, kind, partition, body, source, time, key, subject) = item
        if topic is None and (schema is not last_schema or table is not last_table
                              or kind is not last_kind or partition != last_partition):
            where = render(item)
            last_schema, last_table, last_kind, last_partition = schema, table, kind, partition
        if not ce_headers:
            headers = only
        else:
            if source is not last_source:
                last_source = source
                source_header = sources.get(source)
                if source_header is None:
                    if len(sources) >= _MOST_SOURCES:
                        sources.clear()
                    source_header = sources[source] = ("ce_source", source.encode())
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
            produce(where, body, key, -1, failed, None, 0, headers)
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
    return count, len(batch), where, None, False


try:  # the compiled twin, when it was built
    from ._krecords import records as compiled_records
except ImportError:
    compiled_records = None


def records() -> Callable[..., tuple[int, int, str, Any, bool]]:
    """The records loop to use: the compiled twin unless it was not built or
    ``WALEX_PURE_PYTHON`` is set."""
    if compiled_records is None or os.environ.get("WALEX_PURE_PYTHON"):
        return py_records
    return compiled_records
