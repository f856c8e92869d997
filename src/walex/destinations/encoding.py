"""The message every destination sends: one CloudEvents 1.0 JSON document per change.

Structured mode, encoded with orjson::

    {"specversion": "1.0", "id": event.id, "source": "/<db>/<schema>/<table>",
     "type": "walex.insert", "time": "2024-05-01T12:00:00.123456Z",
     "subject": "<primary key>", "datacontenttype": "application/json",
     "walexlsn": "0/16B3748", "partitionkey": "public.user/42", "walexpartition": 0,
     "walexpartitions": 1, "data": {"new_record": {...}, "old_record": {...} | null,
              "changes": {column: {"old_value": ..., "new_value": ...}} | null,
              "columns": {column: type name}, "key": [key columns], "lsn": "0/16B3748",
              "base_types": {domain type name: base type name}}}

``source`` segments are percent-encoded. ``subject`` is the key of the row
(:attr:`~walex.Source.primary_key`): the JSON form of a one-column key as
text (``"42"``, ``"a0eebc99-..."``), a JSON array of the forms for a key of
several columns (``'[1,"x"]'``); absent for a truncate and for a table
without a key. ``data.key`` names the key's columns (absent without a key).
``data.base_types`` maps each column type that is a domain, or an array of
domains, to the type its values load as (``{"amount_d": "numeric",
"day_d[]": "date[]"}``; absent when no column is of such a type), so a
consumer types them back without asking PostgreSQL. ``partitionkey`` (the CloudEvents partitioning extension) is
``schema.table`` followed by ``/subject`` when there is one, and
``walexpartition`` is ``crc32(partitionkey) mod partitions``: stable across
processes, machines and versions, so a row always lands in the same partition
while its key stays the same; ``walexpartitions`` is ``partitions`` (a
worker checks it against its own).

The JSON form of a value depends on its Python type, which psycopg chose from
the column type (``data.columns`` names it, so a consumer can type values
back):

=====================================  ==========================================
null, bool, text, enum, citext, uuid   as is (uuid as its canonical string)
int2, int4, int8, oid                  a number; beyond +/-(2**53 - 1) a string
float4, float8                         a number; ``"NaN"``, ``"Infinity"``, ``"-Infinity"``
numeric                                a string, exact, never in exponent form
bytea                                  base64 (standard alphabet, padded)
date / timestamp / timestamptz         ISO 8601: ``"2024-02-29"``, ``"2024-02-29T23:59:59.999999"``,
                                       ``"2024-02-29T18:59:59.999999+00:00"``
time / timetz                          ``"12:34:56.789000"``, ``"12:34:56.789000+02:30"``
interval                               ISO 8601 duration of days and seconds: ``"P428DT14706.789S"``,
                                       ``"-P1DT1S"`` (psycopg counts a month as 30 days)
a date, time or interval Python        its PostgreSQL text form, which walex delivers as a
cannot hold                            ``str``: ``"infinity"``, ``"-infinity"``, ``"0044-03-15 BC"``,
                                       ``"10000-01-01 00:00:00"``, ``"24:00:00"``, ``"178000000 years"``
                                       (never ISO 8601 with a ``T``, so a consumer tells them apart)
json / jsonb                           the document itself, numbers exact
inet, cidr, macaddr, money            their text form
ranges                                 ``{"lower": .., "upper": .., "bounds": "[)"}``, a bound null
                                       when absent (unbounded), ``"infinity"`` for an infinite
                                       date or timestamp bound; ``{"empty": true}``
multiranges, arrays                    JSON arrays of the element forms (nested for
                                       multi-dimensional arrays)
composite types                        an object of field name to field form
hstore                                 an object of string to string or null
anything else                          its ``str()``
=====================================  ==========================================

A value PostgreSQL did not resend (unchanged TOAST) is left out of its record
and its column is listed in ``data.unchanged_toast``; an upsert of the record's
columns then leaves it untouched. The schema of all this is
``cloudevent.schema.json`` beside this module.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from collections.abc import Callable
from decimal import Decimal
from typing import Any, NamedTuple
from uuid import UUID

import orjson

from ..event import Event, UnchangedToast
from ..rawevent import RawEvent
from .direct import compiled_direct_event, compiled_entry, direct_event
from .values import (_KINDS, _MAX_SAFE, _NATIVE, _OPTIONS, Outgoing, _float, _rfc3339,  # noqa: F401
                     _table_info, _TableInfo, _tuple_new, _Unfit, json_value, partition_of)

__all__ = ["Outgoing", "encode", "encode_event", "encode_event_reference", "encode_reference",
           "encode_sized", "fast_path", "json_value", "partition_of", "SCHEMA_FILE"]

SCHEMA_FILE = "cloudevent.schema.json"


# -- records -----------------------------------------------------------------


def _record(
    record: dict[str, Any], json_columns: frozenset[str], unchanged: list[str]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in record.items():
        kind = type(value)
        if kind in _NATIVE:
            out[name] = value
        elif kind is int:
            out[name] = value if -_MAX_SAFE <= value <= _MAX_SAFE else str(value)
        elif kind is UnchangedToast:
            if name not in unchanged:
                unchanged.append(name)
        elif name in json_columns:
            out[name] = value  # a JSON document goes out as it is
        else:
            out[name] = json_value(value)
    return out


def _changes(changes: dict[str, Any], json_columns: frozenset[str]) -> dict[str, Any]:
    out = {}
    for name, change in changes.items():
        if name in json_columns:
            out[name] = {"old_value": change.old_value, "new_value": change.new_value}
        else:
            out[name] = {"old_value": json_value(change.old_value),
                         "new_value": json_value(change.new_value)}
    return out



def _subject(info: _TableInfo, event: Event) -> str | None:
    if not info.key:
        return None
    record = event.new_record if event.new_record is not None else event.old_record
    if not record or any(name not in record for name in info.key):
        return None
    values = [record[name] for name in info.key]
    if any(isinstance(v, UnchangedToast) for v in values):
        return None
    if len(values) == 1:
        form = json_value(values[0])
        return form if isinstance(form, str) else orjson.dumps(form).decode()
    return orjson.dumps([json_value(v) for v in values]).decode()




def _document(event: Event, info: Any, key: str, partition: int, partitions: int,
              subject: str | None, data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The message's kind and its CloudEvents document (both encoding paths build it here)."""
    kind, type_name = _KINDS[event.type]
    document: dict[str, Any] = {
        "specversion": "1.0",
        "id": event.id,
        "source": info.source,
        "type": type_name,
        "time": _rfc3339(event.timestamp),
        "datacontenttype": "application/json",
        "walexlsn": event.lsn,
        "partitionkey": key,
        "walexpartition": partition,
        "walexpartitions": partitions,
        "data": data,
    }
    if subject is not None:
        document["subject"] = subject
    return kind, document



def _json_fallback(document: dict[str, Any], json_columns: frozenset[str]) -> bytes:
    """Encode when orjson refused a JSON document (an integer beyond 64 bits)."""

    def fragment(value: Any) -> Any:
        return orjson.Fragment(
            json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
        )

    data = document["data"]
    for part in ("new_record", "old_record"):
        record = data.get(part)
        if record:
            data[part] = {k: fragment(v) if k in json_columns else v for k, v in record.items()}
    if data.get("changes"):
        data["changes"] = {
            k: {"old_value": fragment(c["old_value"]), "new_value": fragment(c["new_value"])}
            if k in json_columns else c
            for k, c in data["changes"].items()
        }
    return orjson.dumps(document)


def encode_event_reference(event: Event, partitions: int = 1) -> Outgoing:
    """One event as a CloudEvent, every value through :func:`json_value`: the reference.

    :func:`encode_event` gives the same bytes for every event (tested over the type
    matrix and generated values) and falls back to this for anything it does not
    take on itself."""
    if type(event) is RawEvent and event.raw is not None:
        event = event.typed()  # the RawEvent itself stays untyped (small)
    info = _table_info(event)
    json_columns = info.json_columns
    unchanged: list[str] = []
    new, old, changes = event.new_record, event.old_record, event.changes
    data: dict[str, Any] = {
        "new_record": None if new is None else _record(new, json_columns, unchanged),
        "old_record": None if old is None else _record(old, json_columns, unchanged),
        "changes": None if changes is None else _changes(changes, json_columns),
        "columns": event.source.columns,
        "lsn": event.lsn,
    }
    if event.source.base_types:
        data["base_types"] = event.source.base_types
    if info.key:
        data["key"] = info.key
    if unchanged:
        data["unchanged_toast"] = unchanged
    subject = _subject(info, event)
    key = info.prefix if subject is None else f"{info.prefix}/{subject}"
    partition = partition_of(key, partitions)
    kind, document = _document(event, info, key, partition, partitions, subject, data)
    try:
        body = orjson.dumps(document)
    except orjson.JSONEncodeError:
        body = _json_fallback(document, json_columns)
    body = bytes(memoryview(body))  # see _tuple_new
    src = event.source
    return Outgoing(event.id, src.schema, src.table, kind, partition, body, info.source,
                    document["time"], key, subject)


def encode_reference(events: list[Event], partitions: int = 1) -> list[Outgoing]:
    """:func:`encode` through :func:`encode_event_reference` (tests and ``bench/encode.py``)."""
    return [encode_event_reference(event, partitions) for event in events]



# -- the fast path -----------------------------------------------------------
#
# orjson writes str, int (up to 2**53 - 1; beyond it OPT_STRICT_INTEGER makes it
# refuse), bool, None, datetime, date and UUID exactly as the reference does, so a
# column whose type name says its values are of these types ("plain") is checked with
# one pass in C over the types of its values and goes out as it is, without a copy; a
# json column goes out as it is (as in the reference); every other column goes
# through json_value. The per-table parts (source, columns, base_types, key) are
# encoded once per table. Anything else (a value of another type in a plain column, an
# unchanged TOAST value, an integer beyond 2**53, an object orjson does not know, a
# subclass) sends the event to the reference, so the bytes are always the reference's.
# walex._encode (Cython) is the compiled twin of _fast_event and _fast_record; it serves
# when built, unless WALEX_PURE_PYTHON is set (read at import).

_PLAIN_TYPES = frozenset({"bool", "int2", "int4", "int8", "oid", "text", "varchar", "bpchar",
                          "char", "name", "citext", "uuid", "date", "timestamp", "timestamptz"})
_PLAIN_VALUES = frozenset({str, int, bool, type(None), dt.datetime, dt.date, UUID})


class _Plan(NamedTuple):  # the compiled twin reads its fields by position: keep the order
    info: _TableInfo
    names: frozenset[str]  # every column
    plain: tuple[str, ...]  # checked by the types of their values, then as they are
    convert: tuple[str, ...]  # through json_value
    columns: orjson.Fragment
    base_types: orjson.Fragment | None
    key: orjson.Fragment | None
    key1: str | None  # the key column of a one-column key


_plans: dict[int, tuple[Any, _Plan]] = {}  # id(Source) -> (Source, plan)
# the Source planned last and its plan, one tuple replaced whole (the events of a table
# come in runs; the Source is kept alive, so its identity is not reused)
_last_plan: tuple[Any, Any] = (None, None)


def _plan(event: Event) -> _Plan:
    src = event.source
    cached = _plans.get(id(src))
    if cached is not None and cached[0] is src:
        return cached[1]
    info = _table_info(event)
    columns = src.columns
    plain = tuple(name for name, kind in columns.items() if kind in _PLAIN_TYPES)
    convert = tuple(name for name, kind in columns.items()
                    if kind not in _PLAIN_TYPES and name not in info.json_columns)
    plan = _Plan(info, frozenset(columns), plain, convert, orjson.Fragment(orjson.dumps(columns)),
                 orjson.Fragment(orjson.dumps(src.base_types)) if src.base_types else None,
                 orjson.Fragment(orjson.dumps(info.key)) if info.key else None,
                 info.key[0] if len(info.key) == 1 else None)
    if len(_plans) >= 4096:
        _plans.clear()
    _plans[id(src)] = (src, plan)
    return plan


def _fast_record(record: dict[str, Any], names: frozenset[str], plain: tuple[str, ...],
                 convert: tuple[str, ...]) -> dict[str, Any]:
    if not (type(record) is dict and record.keys() <= names
            and set(map(type, map(record.get, plain))) <= _PLAIN_VALUES):
        raise _Unfit
    if not convert:
        return record  # orjson reads it as it is
    out = record.copy()
    for name in convert:
        if name in out:
            value = out[name]
            kind = type(value)
            if kind is Decimal:  # numeric and float columns first, as json_value does them
                text = str(value)  # three times faster than format(value, "f"), the same text
                out[name] = text if "E" not in text else format(value, "f")  # unless exponent form
            elif kind is float:
                if not math.isfinite(value):
                    out[name] = _float(value)
            elif kind is UnchangedToast:
                raise _Unfit
            else:
                out[name] = json_value(value)
    return out


def _fast_event(event: Event, partitions: int) -> Outgoing:
    global _last_plan
    if type(event) is RawEvent and event.raw is not None:  # rows as PostgreSQL sent them
        out = direct_event(event, partitions)
        if out is not None:
            return out
        event = event.typed()
    src = event.source
    last = _last_plan
    if last[0] is src:
        plan = last[1]
    else:
        plan = _plan(event)
        _last_plan = (src, plan)
    info, names, plain, convert, columns, base_types, key_columns, key1 = plan  # no lookups
    new, old, changes = event.new_record, event.old_record, event.changes
    data: dict[str, Any] = {
        "new_record": None if new is None else _fast_record(new, names, plain, convert),
        "old_record": None if old is None else _fast_record(old, names, plain, convert),
        "changes": None if changes is None else _changes(changes, info.json_columns),
        "columns": columns,
        "lsn": event.lsn,
    }
    if base_types is not None:
        data["base_types"] = base_types
    if key_columns is not None:
        data["key"] = key_columns
    subject: str | None
    record = new if new is not None else old
    value = record.get(key1) if record and key1 is not None else None
    if type(value) is int and -_MAX_SAFE <= value <= _MAX_SAFE:
        subject = str(value)  # what orjson writes for it
    elif type(value) is str:
        subject = value
    else:
        subject = _subject(info, event)
    key = info.prefix if subject is None else f"{info.prefix}/{subject}"
    partition = partition_of(key, partitions) if partitions > 1 else 0
    kind, document = _document(event, info, key, partition, partitions, subject, data)
    return _tuple_new(Outgoing, (event.id, src.schema, src.table, kind, partition,
                                 bytes(memoryview(orjson.dumps(document, option=_OPTIONS))),
                                 info.source, document["time"], key, subject))


def _encode_events(events: list[Event], partitions: int) -> list[Outgoing]:
    """:func:`encode`, pure Python (``walex._encode.fast_events`` is its compiled twin)."""
    return [encode_event(event, partitions) for event in events]


def _encode_events_sized(events: list[Event], partitions: int) -> tuple[list[Outgoing], int]:
    """:func:`encode_sized`, pure Python (``walex._encode.fast_events_sized`` is its
    compiled twin)."""
    out = _encode_events(events, partitions)
    return out, sum(len(o.body) for o in out)


# the compiled direct encoder as a C function, when it is the one serving (walex._encode's)
direct_c_entry = compiled_entry if direct_event is compiled_direct_event else None

try:  # the compiled twins of _fast_event and _encode_events (walex._encode), when built
    from .. import _encode as _compiled
except ImportError:
    compiled_fast_event = compiled_fast_events = compiled_fast_events_sized = None
else:
    compiled_fast_event = _compiled.bind(globals())
    compiled_fast_events = _compiled.fast_events
    compiled_fast_events_sized = _compiled.fast_events_sized

_PURE = compiled_fast_event is None or bool(os.environ.get("WALEX_PURE_PYTHON"))
_fast = _fast_event if _PURE else compiled_fast_event
_events = _encode_events if _PURE else compiled_fast_events
_events_sized = _encode_events_sized if _PURE else compiled_fast_events_sized


_UNFIT = (_Unfit, orjson.JSONEncodeError)  # what sends an event from _fast to the reference


def encode_event(event: Event, partitions: int = 1) -> Outgoing:
    """One event as a CloudEvent, with its partition."""
    try:
        return _fast(event, partitions)
    except _UNFIT:
        return encode_event_reference(event, partitions)


def fast_path() -> tuple[Callable[[Event, int], Outgoing], tuple[type[Exception], ...]]:
    """:func:`encode_event` in two parts, for a caller that inlines it in its loop (the
    destinations' window): the fast path, and the exceptions on which the event goes to
    :func:`encode_event_reference` instead (the same bytes either way)."""
    return _fast, _UNFIT


def encode(events: list[Event], partitions: int = 1) -> list[Outgoing]:
    """The events of one transaction batch, in order."""
    return _events(events, partitions)


def encode_sized(events: list[Event], partitions: int = 1) -> tuple[list[Outgoing], int]:
    """:func:`encode`, and the bytes of the messages' bodies added up (the destinations'
    window counts them in ``held_bytes``)."""
    return _events_sized(events, partitions)
