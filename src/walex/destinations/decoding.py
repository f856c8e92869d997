"""Events back from the CloudEvents walex published: the inverse of :mod:`.encoding`.

:class:`Decoder` turns one message body into the :class:`~walex.Event` an
in-process handler would have received, typing each value back from its
JSON form by the column's type name in ``data.columns``:

=====================================  ==========================================
bool, int2, int4, int8, oid            ``bool``, ``int`` (int8 beyond 2**53 comes as a string)
float4, float8                         ``float`` (``"NaN"``, ``"Infinity"``, ``"-Infinity"`` too)
numeric                                ``Decimal``
bytea                                  ``bytes``
uuid                                   ``UUID``
date, time, timetz,                    ``date``, ``time``, ``datetime``; the tz kinds with a
timestamp, timestamptz                 fixed-offset ``tzinfo`` (the same instant as psycopg's
                                       zone-aware value, which compares equal)
interval                               ``timedelta``
  a value Python cannot hold           its PostgreSQL text form, a ``str`` (``"infinity"``,
                                       ``"0044-03-15 BC"``, ``"24:00:00"``), as in-process
inet, cidr                             ``ipaddress`` interface or address, network
built-in ranges and multiranges        psycopg's ``Range`` / ``Multirange`` of typed bounds
json, jsonb (and their arrays)         the document, integers of any size exact
arrays (``int4[]``, ``mood[]`` ...)    lists (nested), each element typed as above
hstore                                 ``dict``
text kinds, enums, money, macaddr,     ``str``, as psycopg loads them
every other type psycopg loads as str
domains, arrays of domains             as their base type (``data.base_types`` names it)
=====================================  ==========================================

What the message cannot say:

- **composite types**: a JSON object of a column whose type walex does not
  know by name becomes a named tuple of the type's name with the object's
  fields, in order. It equals the in-process value (named tuples compare as
  tuples) when every field's JSON form is its Python value (text, enum,
  integers, bool, null, nested composites); a field of another type (numeric,
  a date ...) keeps its JSON form, since the message does not carry field
  types. Type such fields, or any user type, with ``types={"type name":
  callable}``: the callable receives the JSON form (of each element, for an
  array of that type) and returns the value.
- a user type with a loader registered in the relay (psycopg ``register_*``)
  comes back as its JSON form unless ``types`` says how to type it;
- ``Source.version`` is this process's walex version.

An unchanged TOAST value (``data.unchanged_toast``) is
:data:`~walex.UNCHANGED_TOAST` again, in the record it was left out of.
Sources are shared: the events of one table (with the same columns) carry
the same :class:`~walex.Source` object, as in-process.

Imports no psycopg (a worker reading what a relay published never talks to
PostgreSQL): psycopg's range types are imported when a range or multirange
column is first typed.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import keyword
import re
from collections import namedtuple
from collections.abc import Callable, Mapping
from decimal import Decimal
from ipaddress import ip_address, ip_interface, ip_network
from typing import Any
from urllib.parse import unquote
from uuid import UUID

import orjson

from ..errors import ConfigError, DecodeError
from ..event import UNCHANGED_TOAST, Change, Event, EventType, Source

__all__ = ["Decoder", "decode"]

Convert = Callable[[Any], Any]

# orjson turns integers beyond 64 bits into floats: a body with 19 digits in a row in a
# number goes to the json module. Every digit as "0", every other byte as " ", so a run of
# digits is a find() for _RUN, much cheaper than a regular expression's search.
_DIGITS = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x20 for byte in range(256))
_RUN = b"0" * 19
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # a JSON string, escapes and all
_INTERVAL = re.compile(r"^(-?)P(\d+)DT(\d+)(?:\.(\d{1,6}))?S$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_NOT_IN_NAME = re.compile(r"[^A-Za-z0-9_]")
_TYPES = {f"walex.{t.value}": t for t in EventType}


class _ColumnError(Exception):
    def __init__(self, column: str, type_name: str, exc: Exception) -> None:
        super().__init__(f"cannot type the value of column {column!r} ({type_name}) back: {exc!r}")


def _identity(value: Any) -> Any:
    return value


# int, float ("NaN", "Infinity", "-Infinity" too) and Decimal type their values themselves
_int: Convert = int
_float: Convert = float
_decimal: Convert = Decimal


def _bytes(value: str) -> bytes:
    return base64.b64decode(value)


# A date, time or interval Python cannot hold came as its PostgreSQL text form, which
# walex delivers as a str in-process: it stays one. Such a form is never the ISO form
# walex writes for a value Python holds (a date of 10 characters, a timestamp with a "T",
# a time before 24:00, an interval "P...DT...S").


def _date(value: str) -> dt.date | str:
    return dt.date.fromisoformat(value) if _DATE.match(value) else value


def _timestamp_value(value: str) -> dt.datetime | str:
    return dt.datetime.fromisoformat(value) if value[10:11] == "T" else value


def _time(value: str) -> dt.time | str:
    return value if value.startswith("24:") else dt.time.fromisoformat(value)


def _interval(value: str) -> dt.timedelta | str:
    match = _INTERVAL.match(value)
    if match is None:
        return value  # PostgreSQL's text form: beyond timedelta, or infinite
    sign, days, seconds, fraction = match.groups()
    delta = dt.timedelta(days=int(days), seconds=int(seconds),
                         microseconds=int((fraction or "").ljust(6, "0")))
    return -delta if sign else delta


def _inet(value: str) -> Any:
    return ip_interface(value) if "/" in value else ip_address(value)


def _range_of(bound: Convert) -> Convert:
    # psycopg's Range (importing psycopg, ~90 ms) when a range column is first typed,
    # not at import: a worker whose tables have none never loads psycopg
    from psycopg.types.range import Range

    def load(value: dict[str, Any]) -> Range[Any]:
        if value.get("empty"):
            return Range(empty=True)
        lower, upper = value.get("lower"), value.get("upper")
        return Range(None if lower is None else bound(lower), None if upper is None else bound(upper),
                     value.get("bounds") or "[)")

    return load


def _multirange_of(bound: Convert) -> Convert:
    from psycopg.types.multirange import Multirange

    load_range = _range_of(bound)

    def load(value: list[Any]) -> Multirange[Any]:
        return Multirange([load_range(item) for item in value])

    return load


_BOUNDS: dict[str, Convert] = {
    "int4": _int, "int8": _int, "num": _decimal, "date": _date,
    "ts": _timestamp_value, "tstz": _timestamp_value,
}

_BUILT_IN: dict[str, Convert] = {
    "bool": _identity, "int2": _int, "int4": _int, "int8": _int, "oid": _int,
    "float4": _float, "float8": _float, "numeric": _decimal, "bytea": _bytes,
    "uuid": UUID, "date": _date, "time": _time, "timetz": _time,
    "timestamp": _timestamp_value, "timestamptz": _timestamp_value, "interval": _interval,
    "json": _identity, "jsonb": _identity, "json[]": _identity, "jsonb[]": _identity,
    "inet": _inet, "cidr": ip_network,
}

# the built-in ranges and multiranges: their converters are made when first asked for
_RANGES: dict[str, tuple[Callable[[Convert], Convert], Convert]] = {
    **{f"{kind}range": (_range_of, bound) for kind, bound in _BOUNDS.items()},
    **{f"{kind}multirange": (_multirange_of, bound) for kind, bound in _BOUNDS.items()},
}

# Built-in types psycopg loads as str: their JSON form is the value itself.
_TEXT = frozenset({
    "text", "varchar", "bpchar", "name", '"char"', "money", "macaddr", "macaddr8", "xml",
    "pg_lsn", "bit", "varbit", "tsvector", "tsquery", "jsonpath", "point", "line", "lseg",
    "box", "path", "polygon", "circle", "xid", "xid8", "cid", "tid", "regclass", "regtype",
    "regproc", "regprocedure", "regoper", "regoperator", "regconfig", "regdictionary",
    "regnamespace", "regrole", "regcollation", "int2vector", "oidvector", "txid_snapshot",
    "aclitem", "refcursor",
})


def _python_name(name: str) -> str:
    """A type or field name as psycopg names its composite named tuples."""
    if not name.isidentifier():
        if name[:1].isdigit():
            name = "f" + name
        if not name.isidentifier():
            name = _NOT_IN_NAME.sub("_", name)
    if name[:1] == "_":
        name = "f" + name
    return name


class Decoder:
    """Decodes message bodies into Events; holds the caches that make it cheap.

    ``types``: ``{"type name": callable}`` typing the JSON form of a column of
    that type (a user type; a composite whose fields the message cannot type; a
    domain named here is typed by its callable, not as its base type).
    """

    def __init__(self, types: Mapping[str, Convert] | None = None) -> None:
        if types is not None and not (isinstance(types, Mapping) and all(
                isinstance(name, str) and callable(convert) for name, convert in types.items())):
            raise ConfigError(f"types must map type names to callables typing a value's JSON "
                              f"form back, like {{'mytype': MyType.from_json}}, got {types!r}")
        self.types = dict(types or {})
        self._converters: dict[str, Convert] = {}
        self._tuples: dict[tuple[str, tuple[str, ...]], type] = {}
        # the Source of a table, and the type each of its columns is typed back as
        self._sources: dict[tuple[Any, ...], tuple[Source, dict[str, str]]] = {}
        # by source: the last forms seen (columns, their names, key, base types) and what
        # they gave; the forms compared as they are (no key tuples built, no hashing)
        self._last: dict[str, tuple[Any, ...]] = {}

    # -- values ------------------------------------------------------------

    def converter(self, type_name: str) -> Convert:
        """The function typing a non-null JSON form of a value of ``type_name``."""
        convert = self._converters.get(type_name)
        if convert is None:
            convert = self._converters[type_name] = self._make_converter(type_name)
        return convert

    def _make_converter(self, type_name: str) -> Convert:
        user = self.types.get(type_name)
        if user is not None:
            return user
        if type_name.endswith("[]"):
            element = type_name[:-2]
            if self.types.get(element) is None and element in ("json", "jsonb"):
                return _identity  # documents, which may be arrays themselves
            return self._array_of(self.converter(element))
        built_in = _BUILT_IN.get(type_name)
        if built_in is not None:
            return built_in
        ranged = _RANGES.get(type_name)
        if ranged is not None:
            make, bound = ranged
            return make(bound)
        if type_name in _TEXT or type_name.rpartition(".")[2] == "hstore":
            return _identity
        return self._unknown_of(type_name.rpartition(".")[2])

    @staticmethod
    def _array_of(element: Convert) -> Convert:
        def load(value: Any) -> Any:
            if isinstance(value, list):
                return [None if item is None else load(item) for item in value]
            return element(value)

        return load

    def _unknown_of(self, type_name: str) -> Convert:
        """An enum, a domain, a user type: its JSON form; an object is a composite."""

        def load(value: Any) -> Any:
            if isinstance(value, dict):
                return self.composite(type_name, value)
            return value

        return load

    def composite(self, type_name: str, fields: dict[str, Any]) -> Any:
        """A named tuple of the fields' JSON forms (nested objects as named tuples)."""
        names = tuple(fields)
        cls = self._tuples.get((type_name, names))
        if cls is None:
            try:
                cls = namedtuple(_python_name(type_name), names)  # type: ignore[misc]
            except ValueError:  # a keyword, a repeated name
                cls = namedtuple(_python_name(type_name) + ("_" if keyword.iskeyword(type_name) else ""),
                                 names, rename=True)  # type: ignore[misc]
            self._tuples[(type_name, names)] = cls
        return cls(*(self.composite(name, v) if isinstance(v, dict) else v
                     for name, v in fields.items()))

    def value(self, type_name: str, form: Any) -> Any:
        """One value of a column of ``type_name`` from its JSON form."""
        return None if form is None else self.converter(type_name)(form)

    # -- events ------------------------------------------------------------

    def _record(self, form: dict[str, Any], columns: dict[str, str],
                unchanged: frozenset[str]) -> dict[str, Any]:
        record: dict[str, Any] = {}
        name = ""
        try:
            if unchanged:  # in column order, the unchanged values where they were
                for name in columns:
                    if name in form:
                        record[name] = self.value(columns[name], form[name])
                    elif name in unchanged:
                        record[name] = UNCHANGED_TOAST
                return record
            for name, value in form.items():
                if value is None:
                    record[name] = None
                else:
                    type_name = columns.get(name, "text")
                    convert = self._converters.get(type_name) or self.converter(type_name)
                    record[name] = value if convert is _identity else convert(value)
        except Exception as exc:
            raise _ColumnError(name, columns.get(name, "text"), exc) from None
        return record

    def _changes(self, forms: dict[str, Any], columns: dict[str, str]) -> dict[str, Change]:
        changes: dict[str, Change] = {}
        for name, change in forms.items():
            type_name = columns.get(name, "text")
            try:
                changes[name] = Change(self.value(type_name, change["old_value"]),
                                       self.value(type_name, change["new_value"]))
            except Exception as exc:
                raise _ColumnError(name, type_name, exc) from None
        return changes

    def _source(self, doc: dict[str, Any], data: dict[str, Any]) -> tuple[Source, dict[str, str]]:
        """The event's Source, and the type each column is typed back as: a domain's base
        type (``data.base_types``) unless ``types`` names the domain itself."""
        columns = data.get("columns") or {}
        bases = data.get("base_types") or {}
        named, keyed = doc["source"], data.get("key")
        last = self._last.get(named)
        if last is not None and last[0] == columns and last[2] == keyed and \
                last[3] == bases and last[1] == tuple(columns):  # (dicts compare unordered)
            return last[4]  # type: ignore[no-any-return]
        found = self._found(doc, columns, bases, keyed)
        if len(self._last) >= 4096:
            self._last.clear()
        self._last[named] = (dict(columns), tuple(columns),
                             None if keyed is None else list(keyed), dict(bases), found)
        return found

    def _found(self, doc: dict[str, Any], columns: dict[str, Any], bases: dict[str, Any],
               keyed: Any) -> tuple[Source, dict[str, str]]:
        key = (doc["source"], tuple(columns.items()), tuple(keyed or ()),
               tuple(bases.items()))
        found = self._sources.get(key)
        if found is None:
            parts = doc["source"].split("/")
            if len(parts) != 4:
                raise ValueError(f"source {doc['source']!r} is not /<db>/<schema>/<table>")
            db, schema, table = (unquote(p) for p in parts[1:])
            if len(self._sources) >= 4096:
                self._sources.clear()
            source = Source(
                db=db, schema=schema, table=table, columns=dict(columns), primary_key=key[2],
                base_types=dict(bases),
            )
            typing = {name: kind if kind in self.types else bases.get(kind, kind)
                      for name, kind in columns.items()}
            found = self._sources[key] = (source, typing)
        return found

    @staticmethod
    def document(body: bytes | str) -> dict[str, Any]:
        """The parsed JSON object of a message body; :class:`~walex.errors.DecodeError` if none."""
        try:
            return _parse(body)
        except Exception as exc:
            raise DecodeError(f"message {_excerpt(body)} is not a walex CloudEvent: {exc!r}") from None

    def decode(self, body: bytes | str | dict[str, Any]) -> Event:
        """The Event of one message body (the CloudEvent JSON, or it parsed).

        Raises :class:`~walex.errors.DecodeError` naming the message when the
        body is not a walex CloudEvent.
        """
        doc: Any = None
        try:
            doc = body if isinstance(body, dict) else _parse(body)
            return self._event(doc)
        except Exception as exc:
            name = doc.get("id") if isinstance(doc, dict) else None
            if isinstance(exc, _ColumnError):
                raise DecodeError(f"message {name}: {exc}") from None
            raise DecodeError(
                f"message {name or _excerpt(body)} is not a walex CloudEvent: {exc!r}"
            ) from None

    def _event(self, doc: dict[str, Any]) -> Event:
        kind = _TYPES.get(doc.get("type", ""))
        if kind is None:
            raise ValueError(f"type {doc.get('type')!r} is not one of {', '.join(_TYPES)}")
        data = doc["data"]
        source, columns = self._source(doc, data)
        listed = data.get("unchanged_toast")
        new_form, old_form = data.get("new_record"), data.get("old_record")
        new_unchanged = old_unchanged = frozenset()
        if listed:
            # a listed column missing from new_record was left out of it; one that
            # new_record has (or every listed one, for a delete) was left out of old_record
            new_unchanged = frozenset(c for c in listed if new_form is not None and c not in new_form)
            old_unchanged = frozenset(listed) - new_unchanged
        changes = data.get("changes")
        moment = doc["time"]
        return Event(  # positional (cheaper): name, type, source, new_record, old_record,
            # changes, timestamp, lsn, id
            source.table,
            kind,
            source,
            None if new_form is None else self._record(new_form, columns, new_unchanged),
            None if old_form is None else self._record(old_form, columns, old_unchanged),
            None if changes is None else self._changes(changes, columns),
            _timestamp(moment),
            doc.get("walexlsn") or data["lsn"],
            doc["id"],
        )


_times: dict[str, dt.datetime] = {}


def _timestamp(text: str) -> dt.datetime:
    moment = _times.get(text)
    if moment is None:
        moment = dt.datetime.fromisoformat(text)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.timezone.utc)
        if len(_times) > 64:
            _times.clear()
        _times[text] = moment
    return moment


def py_long_number(raw: bytes) -> bool:
    """Whether a JSON number of ``raw`` has 19 digits in a row (an integer orjson may not
    hold exactly): only then does the slower json module parse it. A run of digits inside
    a string (a zero-padded code, an id) does not count, so such a body keeps orjson: a
    run is in a string when an odd number of quotes precede it (exact while no backslash
    precedes it; else the strings are cut out first). The reference of the compiled twin
    ``walex.destinations._longnum.long_number`` (one C loop), and its fallback."""
    flat = raw.translate(_DIGITS)
    at = flat.find(_RUN)
    while at >= 0:
        if raw.find(b"\\", 0, at) >= 0:  # an escape: maybe a quote that is not one
            return _RUN in _STRING.sub(b'""', raw).translate(_DIGITS)
        if not raw.count(b'"', 0, at) % 2:  # outside the strings: a number's digits
            return True
        at = flat.find(_RUN, at + len(_RUN))
    return False


try:
    from ._longnum import long_number as compiled_long_number
except ImportError:  # not built: the pure-Python scan serves
    compiled_long_number = None


def _parse(body: bytes | str) -> dict[str, Any]:
    raw = body.encode() if isinstance(body, str) else bytes(body)
    if compiled_long_number(raw, py_long_number) if compiled_long_number is not None else \
            py_long_number(raw):
        doc = json.loads(raw)  # integers of any size stay exact
    else:
        doc = orjson.loads(raw)
    if not isinstance(doc, dict):
        raise ValueError(f"a JSON {type(doc).__name__}, not an object")
    return doc


def _excerpt(body: Any) -> str:
    text = body if isinstance(body, str) else bytes(body or b"")[:80].decode("utf-8", "replace")
    return repr(text[:80])


_default = Decoder()


def decode(body: bytes | str | dict[str, Any]) -> Event:
    """The Event of one message body, with no ``types`` (see :class:`Decoder`)."""
    return _default.decode(body)
