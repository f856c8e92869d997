"""The JSON forms of typed values and the per-table CloudEvents parts, shared by the encoders.

:func:`json_value` gives the JSON form of one typed value (the table in
:mod:`walex.destinations.encoding`'s docstring); :func:`_table_info`,
:func:`_rfc3339` and :func:`partition_of` give the parts of a CloudEvent that
do not depend on the row's values. :mod:`~walex.destinations.encoding` (the
reference and the fast path over typed events) and
:mod:`~walex.destinations.direct` (raw rows written straight to JSON) both
build their documents from these, so their bytes agree. Imports nothing of
either.
"""

from __future__ import annotations

import base64
import datetime as dt
import math
import zlib
from collections.abc import Callable
from decimal import Decimal
from enum import Enum
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network
from typing import Any, NamedTuple
from urllib.parse import quote
from uuid import UUID

import orjson

from ..event import EventType
from .base import Outgoing

__all__ = ["Outgoing", "json_value", "partition_of"]

_MAX_SAFE = 2**53 - 1  # beyond this a JSON number loses precision in most parsers
_JSON_TYPES = frozenset({"json", "jsonb", "json[]", "jsonb[]"})
_NATIVE = frozenset({str, bool, type(None), dt.date, dt.datetime, UUID})  # orjson's own form is ours

# -- values ------------------------------------------------------------------


def _float(value: float) -> float | str:
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def _decimal(value: Decimal) -> str:
    return format(value, "f")  # "NaN", "Infinity" and "-Infinity" as they are


def _bytes(value: bytes | bytearray | memoryview) -> str:
    return base64.b64encode(value).decode("ascii")


def _time(value: dt.time) -> str:
    return value.isoformat()


def _interval(value: dt.timedelta) -> str:
    micros = (value.days * 86400 + value.seconds) * 1_000_000 + value.microseconds
    sign = "-" if micros < 0 else ""
    days, micros = divmod(abs(micros), 86_400_000_000)
    seconds, fraction = divmod(micros, 1_000_000)
    text = f"{seconds}.{fraction:06d}".rstrip("0").rstrip(".") if fraction else str(seconds)
    return f"{sign}P{days}DT{text}S"


def _range(value: Any) -> dict[str, Any]:
    if value.isempty:
        return {"empty": True}
    return {"lower": json_value(value.lower), "upper": json_value(value.upper), "bounds": value.bounds}


def _mapping(value: dict[Any, Any]) -> dict[str, Any]:
    return {str(k): json_value(v) for k, v in value.items()}


def _sequence(value: Any) -> list[Any]:
    return [json_value(v) for v in value]


def _tuple(value: tuple[Any, ...]) -> Any:
    fields = getattr(value, "_fields", None)
    if fields is None:
        return _sequence(value)
    return {name: json_value(v) for name, v in zip(fields, value)}  # a composite


def _text(value: Any) -> str:
    return str(value)


_CONVERT: dict[type, Callable[[Any], Any]] = {
    float: _float, Decimal: _decimal, bytes: _bytes, bytearray: _bytes, memoryview: _bytes,
    dt.time: _time, dt.timedelta: _interval, dict: _mapping, list: _sequence, tuple: _tuple,
    IPv4Address: _text, IPv6Address: _text, IPv4Interface: _text, IPv6Interface: _text,
    IPv4Network: _text, IPv6Network: _text,
}

try:  # psycopg's range types; a lookup by type keeps the common path free of isinstance
    from psycopg.types.multirange import Multirange
    from psycopg.types.range import Range

    _CONVERT[Range] = _range
    _CONVERT[Multirange] = _sequence
except ImportError:  # pragma: no cover - psycopg always has them
    pass


def json_value(value: Any) -> Any:
    """The JSON form (something orjson encodes natively) of one typed value."""
    kind = type(value)
    if kind in _NATIVE:
        return value
    if kind is int:
        return value if -_MAX_SAFE <= value <= _MAX_SAFE else str(value)
    convert = _CONVERT.get(kind)
    if convert is not None:
        return convert(value)
    return _json_value_slow(value)


def _json_value_slow(value: Any) -> Any:
    """Subclasses (named tuples, enums, user types) and everything else."""
    if isinstance(value, Enum):
        return json_value(value.value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return json_value(int(value))  # bool cannot be subclassed: this is an int subclass
    for kind, convert in _CONVERT.items():
        if isinstance(value, kind):
            return convert(value)
    if isinstance(value, dt.date):  # a subclass of date or datetime
        return value.isoformat()
    if hasattr(value, "isempty") and hasattr(value, "bounds"):  # a range of another kind
        return _range(value)
    return str(value)


class _TableInfo(NamedTuple):
    source: str  # the CloudEvents source
    json_columns: frozenset[str]
    key: tuple[str, ...]
    prefix: str  # of the partition key: "schema.table"


_tables: dict[int, tuple[Any, _TableInfo]] = {}  # id(Source) -> (Source, info)


def _table_info(event: Any) -> _TableInfo:
    src = event.source
    cached = _tables.get(id(src))
    if cached is not None and cached[0] is src:
        return cached[1]
    info = _TableInfo(
        "/" + "/".join(quote(part, safe="") for part in (src.db, src.schema, src.table)),
        frozenset(name for name, kind in src.columns.items() if kind in _JSON_TYPES),
        tuple(getattr(src, "primary_key", ())),
        f"{src.schema}.{src.table}",
    )
    if len(_tables) >= 4096:  # sources of tables redefined long ago
        _tables.clear()
    _tables[id(src)] = (src, info)  # the Source is kept alive, so its id is not reused
    return info


def partition_of(partition_key: str, partitions: int) -> int:
    """The partition of a row: a stable hash of its table and key, mod ``partitions``."""
    if partitions <= 1:
        return 0
    return zlib.crc32(partition_key.encode("utf-8", "surrogatepass")) % partitions


_times: dict[dt.datetime, str] = {}


_UTC = dt.timezone.utc
_last_time: tuple[Any, str] = (None, "")  # the moment formatted last and its text (one
# object, replaced whole: a thread encoding meanwhile sees either pair, never a mix)


def _rfc3339(moment: dt.datetime) -> str:
    """``moment`` in UTC, ISO 8601 with ``Z`` (a naive one taken as UTC).

    The events of a transaction share one commit time object, and one-change
    transactions each bring a new one: the text of the last moment is kept (an
    identity test, no hashing), and a moment already in UTC (as the decoder
    makes them) is formatted by orjson, with no conversion (the same text as
    ``isoformat()`` with ``Z``, which formats through C's printf: ten times the
    instructions). Other moments are kept by value (equal ones, the same instant, have
    the same text), a datetime subclass's not: it may format itself otherwise, and an
    equal datetime must not be given its text. The compiled encoders write the same text
    in C for a datetime naive or in UTC (``destinations/_rfc3339.pxi``) and call this one
    for the rest."""
    global _last_time
    last = _last_time
    if moment is last[0]:
        return last[1]
    plain = type(moment) is dt.datetime
    if moment.tzinfo is _UTC and plain:
        text = orjson.dumps(moment, option=orjson.OPT_UTC_Z)[1:-1].decode()
    else:
        text = _times.get(moment) if plain else None
        if text is None:
            aware = moment.replace(tzinfo=_UTC) if moment.tzinfo is None else moment
            text = aware.astimezone(_UTC).isoformat().replace("+00:00", "Z")
            if plain:
                if len(_times) > 64:
                    _times.clear()
                _times[moment] = text
    _last_time = (moment, text)
    return text


_OPTIONS = orjson.OPT_STRICT_INTEGER | orjson.OPT_PASSTHROUGH_SUBCLASS


_tuple_new = tuple.__new__  # an Outgoing without its Python-level __new__
# An orjson result is a bytes object over a buffer of a page or more: kept (a batch is
# kept until the broker confirmed it) each costs a page fault and ~4 KB of memory.
# A copy of its exact size (bytes(memoryview(...))) costs a tenth of that.
_KINDS = {kind: (kind.value, f"walex.{kind.value}") for kind in EventType}


class _Unfit(Exception):
    """A value the fast path does not take on: the reference encodes the event."""
