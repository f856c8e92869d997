"""The direct encoder: a :class:`~walex.rawevent.RawEvent`'s CloudEvent written from the
text PostgreSQL sent, without typing its rows.

:func:`direct_event` returns the :class:`~walex.destinations.values.Outgoing` that
``encode_event_reference(event.typed(), partitions)`` gives, byte for byte and field
for field, or ``None`` ("unfit": the caller encodes ``event.typed()`` instead, never
the RawEvent itself, which stays small). The replication session sends values in
text with DateStyle=ISO, IntervalStyle=postgres, extra_float_digits=3, TimeZone=UTC.

A table's plan (cached by :class:`~walex.relations.Table` identity: a new Relation
message brings a new Table) gives each column a writer, chosen by the loader the
table's Transformer holds for the column, never by the type name alone: a column
goes direct only when its loader is psycopg's default one for the type (and gives
what it should for a probe value), so a loader the user registered (numeric as
float, say) is honoured. The writers:

- ``bool`` ``t``/``f``: ``true``/``false``;
- int2/int4/int8/oid: the digits; beyond +/-(2**53 - 1) a JSON string of them;
- text, varchar, bpchar, name, "char", enum, citext (psycopg's text loader): the
  text as a JSON string, escaped as orjson escapes (its own escapes, taken from
  it at import), UTF-8 checked;
- uuid: the text quoted (PostgreSQL writes the canonical lower-case form);
- numeric: the text quoted (``format(Decimal(text), "f")`` is the text for
  what PostgreSQL writes, ``NaN`` and ``Infinity`` included);
- date, timestamp, timestamptz (``+00`` only): orjson's ISO form (``T``, six
  digits of microseconds unless they are zero, ``+00:00``);
- json/jsonb columns (by type name, as the reference): the loader's value through
  ``orjson.dumps``;
- every other column: the loader's value through ``json_value`` and ``orjson.dumps``.

A row with a value its loader refuses (``infinity``, a year BC or after 9999,
``24:00:00``, a range or array of such values) is written again as the typed
path types it again (:meth:`walex.relations.Table.load`): every column with
the table's tolerant loaders (:meth:`walex.pgtypes.TypeCatalog.tolerant`),
where such a value is its text. Anything a writer does not take (a row that is not
a raw row of the table's width, :mod:`walex.rawrow`; a loader raising, orjson
refusing, text not in the expected form) makes the event unfit. The key of the
row (``subject``, ``partitionkey``) is formed from the same pieces as the
reference forms it from the typed values.

:mod:`walex.destinations._direct` (Cython) is the compiled twin of
:func:`py_direct_event`; it serves when built, unless ``WALEX_PURE_PYTHON`` is set
(read at import). ``tests/destinations/test_direct.py`` holds both to the reference.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import uuid
from decimal import Decimal
from typing import Any, NamedTuple

import orjson
from psycopg import postgres
from psycopg.adapt import AdaptersMap, Transformer
from psycopg.pq import Format

from ..pgtypes import json_loaders
from ..rawrow import row_values
from .values import _KINDS, _MAX_SAFE, Outgoing, _rfc3339, _table_info, _tuple_new, json_value, \
    partition_of

__all__ = ["direct_event", "py_direct_event", "compiled_direct_event", "plan_of"]

# the writers, one per column (the compiled twin knows them by these numbers)
GENERIC, JSON, BOOL, INT, TEXT, UUID, NUMERIC, DATE, TIMESTAMP, TIMESTAMPTZ, JSONB = range(11)
_TEMPORAL = (DATE, TIMESTAMP, TIMESTAMPTZ)

# orjson's escape of each ASCII character (the byte itself when it writes it as is)
ESCAPES = tuple(orjson.dumps(chr(b))[1:-1] for b in range(128))


def _register_loaders(adapters: AdaptersMap) -> None:
    """psycopg's default loaders of the types below: only the modules of psycopg that
    register them (``postgres.register_default_adapters``, ranges and arrays included,
    took ~2M instructions of every relay's start); ``tests/destinations/test_direct.py``
    checks that :func:`_defaults` finds what that one gives."""
    from psycopg.types import bool as pg_bool
    from psycopg.types import datetime as pg_datetime
    from psycopg.types import numeric, string
    from psycopg.types import uuid as pg_uuid

    for module in (pg_bool, numeric, string, pg_uuid, pg_datetime):
        module.register_default_adapters(adapters)


def _defaults(register: Any = _register_loaders) -> dict[type, int]:
    """The writer of each of psycopg's default loader classes (of a fresh adapters map,
    whatever the user registered in ``psycopg.adapters`` since)."""
    pristine = AdaptersMap(types=postgres.types)
    register(pristine)
    out: dict[type, int] = {}
    for kind, names in ((BOOL, ["bool"]), (INT, ["int2", "int4", "int8", "oid"]),
                        (TEXT, ["text", "varchar", "bpchar", "name"]), (UUID, ["uuid"]),
                        (NUMERIC, ["numeric"]), (DATE, ["date"]), (TIMESTAMP, ["timestamp"]),
                        (TIMESTAMPTZ, ["timestamptz"])):
        for name in names:
            cls = pristine.get_loader(postgres.types[name].oid, Format.TEXT)
            if cls is not None and out.setdefault(cls, kind) != kind:
                del out[cls]  # one class for two kinds: neither goes direct
    return out


_DEFAULTS = _defaults()
_JSON_LOADERS = json_loaders()  # walex's own json/jsonb loader classes (jsonb_compact's twin)
_UTC_OFFSET = orjson.dumps(dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc))[-7:-1]  # b"+00:00"
# what each writer's loader must give for a probe, and the probe
_PROBES: dict[int, tuple[bytes, Any]] = {}


def _probes() -> None:
    utc = dt.timezone.utc
    _PROBES.update({
        BOOL: (b"t", True), INT: (b"-42", -42), TEXT: ("é\"x".encode(), "é\"x"),
        UUID: (b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
               uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")),
        NUMERIC: (b"-1.50", Decimal("-1.50")), DATE: (b"2024-02-29", dt.date(2024, 2, 29)),
        TIMESTAMP: (b"2024-02-29 23:59:59.5", dt.datetime(2024, 2, 29, 23, 59, 59, 500000)),
        TIMESTAMPTZ: (b"2024-02-29 23:59:59.5+00",
                      dt.datetime(2024, 2, 29, 23, 59, 59, 500000, tzinfo=utc)),
    })


_probes()


def _probe_ok(kind: int, load: Any) -> bool:
    raw, expected = _PROBES[kind]
    try:
        value = load(raw)
    except Exception:  # noqa: BLE001 - a loader that cannot take the probe does not go direct
        return False
    if type(value) is not type(expected) or value != expected or repr(value) != repr(expected):
        return False
    if kind == TIMESTAMPTZ:  # orjson writes its offset as +00:00
        return orjson.dumps(value).endswith(_UTC_OFFSET + b'"')
    return True


class Plan(NamedTuple):
    """One table's writers and the fixed parts of its documents (the compiled twin reads
    the fields by position: keep the order)."""

    table: Any
    source: Any  # the Source the parts were made of
    kinds: bytes  # the writer of each column
    names: tuple[bytes, ...]  # b'"name":' per column
    loads: tuple[Any, ...]  # the loader's load per column
    key: tuple[int, ...] | None  # the columns of the row's key (empty: no subject; None: unfit)
    key_in_k: bool  # every key column is in a key ('K') old row
    key_indexes: tuple[int, ...]  # the columns of a key ('K') old row
    source_part: bytes  # b',"source":"/db/schema/table","type":'
    prefix: str  # of the partition key: "schema.table"
    prefix_part: bytes  # b',"partitionkey":"schema.table' (no closing quote)
    columns_part: bytes  # b',"columns":{...},"lsn":'
    tail: bytes  # b',"base_types":{...},"key":[...]}' (either may be absent)
    ce_source: str  # the CloudEvents source, for the Outgoing
    schema: str
    table_name: str
    tolerant_loads: list[Any]  # [the tolerant loaders' load per column], made when first needed
    key_position: bytes  # per column: 0, or 1 + its position in the key


_plans: dict[int, Plan] = {}  # id(Table) -> plan (the plan keeps its Table alive)


def plan_of(event: Any, table: Any) -> Plan:
    """The plan of ``table`` for the events of its Source (cached)."""
    plan = _plans.get(id(table))
    if plan is not None and plan.table is table and plan.source is event.source:
        return plan
    src = event.source
    info = _table_info(event)
    kinds, names, loads = [], [], []
    for name, oid in zip(table.column_names, table.type_oids):
        loader = table._tx.get_loader(oid, Format.TEXT)
        kind = _DEFAULTS.get(type(loader), GENERIC)
        if name in info.json_columns:
            kind = JSONB if src.columns.get(name) == "jsonb" and type(loader) in _JSON_LOADERS \
                else JSON
        elif kind != GENERIC and not _probe_ok(kind, loader.load):
            kind = GENERIC
        kinds.append(kind)
        names.append(orjson.dumps(name) + b":")
        loads.append(loader.load)
    position = {name: i for i, name in enumerate(table.column_names)}
    key: tuple[int, ...] | None = ()
    if info.key and all(name in position for name in info.key):
        # PostgreSQL's indexes have at most 32 columns; a longer key is left to the typed path
        key = tuple(position[name] for name in info.key) if len(info.key) <= 32 else None
    tail = b""
    if src.base_types:
        tail += b',"base_types":' + orjson.dumps(src.base_types)
    if info.key:
        tail += b',"key":' + orjson.dumps(info.key)
    plan = Plan(
        table, src, bytes(kinds), tuple(names), tuple(loads), key,
        all(i in table.key_indexes for i in key or ()), tuple(table.key_indexes),
        b',"source":' + orjson.dumps(info.source) + b',"type":',
        info.prefix, b',"partitionkey":' + orjson.dumps(info.prefix)[:-1],
        b',"columns":' + orjson.dumps(src.columns) + b',"lsn":', tail + b"}",
        info.source, src.schema, src.table, [],
        bytes(key.index(i) + 1 if key and i in key else 0 for i in range(len(kinds))),
    )
    if len(_plans) >= 4096:  # tables redefined long ago
        _plans.clear()
    _plans[id(table)] = plan
    return plan


# -- the writers, pure Python ----------------------------------------------------

# jsonb text: PostgreSQL writes it in one form (", " and ": " between items, keys in
# jsonb's order, no duplicates, strings with the escapes below): without the spaces it is
# what walex's json loader and orjson.dumps give of it, as long as every number is an
# integer of at most 15 digits (orjson would write a fraction or an exponent its own way)
_JSONB_ESCAPES = frozenset(b'"\\bfnrt')
_JSONB_MAX_DEPTH = 64


def jsonb_compact(raw: bytes) -> bytes | None:
    """``orjson.dumps`` of what walex's json loader gives for ``raw`` (jsonb text as
    PostgreSQL writes it), or None where that is not certain (a number with a fraction, an
    exponent or more than 15 digits, an escape PostgreSQL does not write, white space other
    than its single spaces after a comma or a colon, nesting beyond 64 levels).
    ``_direct``'s ``_jsonb`` is the twin."""
    out = bytearray()
    i, n, depth = 0, len(raw), 0
    while i < n:
        c = raw[i]
        if c == 0x22:  # a string: copied as it is, its escapes checked
            j = i + 1
            while True:
                if j >= n:
                    return None
                d = raw[j]
                if d == 0x22:
                    break
                if d < 0x20:
                    return None
                if d == 0x5C:
                    if j + 1 >= n:
                        return None
                    e = raw[j + 1]
                    if e == 0x75:  # \u00xx: the control characters PostgreSQL writes so
                        code = raw[j + 2:j + 6]
                        if (len(code) != 4 or not code.startswith(b"00")
                                or code[2:] != code[2:].lower()
                                or not all(x in b"0123456789abcdef" for x in code[2:])):
                            return None
                        value = int(code, 16)
                        if value >= 0x20 or value in (8, 9, 10, 12, 13):
                            return None
                        j += 6
                        continue
                    if e not in _JSONB_ESCAPES:
                        return None
                    j += 2
                    continue
                j += 1
            out += raw[i:j + 1]
            i = j + 1
        elif c == 0x20:  # only PostgreSQL's, after a comma or a colon
            if not out or out[-1] not in b",:":
                return None
            i += 1
        elif c in b"{[":
            depth += 1
            if depth > _JSONB_MAX_DEPTH:
                return None
            out.append(c)
            i += 1
        elif c in b"}]":
            depth -= 1
            if depth < 0:
                return None
            out.append(c)
            i += 1
        elif c in b",:":
            out.append(c)
            i += 1
        elif c in b"-0123456789":
            j = i + 1 if c == 0x2D else i
            start = j
            while j < n and 0x30 <= raw[j] <= 0x39:
                j += 1
            digits = j - start
            if (digits == 0 or digits > 15 or (raw[start] == 0x30 and (digits > 1 or c == 0x2D))
                    or (j < n and raw[j] in b".eE")):
                return None
            out += raw[i:j]
            i = j
        else:
            for word in (b"true", b"false", b"null"):
                if raw.startswith(word, i):
                    out += word
                    i += len(word)
                    break
            else:
                return None
    return bytes(out) if depth == 0 else None

_INT = re.compile(rb"0|-?[1-9][0-9]{0,18}")
_UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_NUMERIC = re.compile(rb"NaN|-?Infinity|-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?")
_DAY = rb"([0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01]))"
_DATE = re.compile(_DAY)
_TIMESTAMP = re.compile(_DAY + rb" ((?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9])(?:\.([0-9]{1,6}))?")
_TIMESTAMPTZ = re.compile(_TIMESTAMP.pattern + rb"\+00")
_TEMPORAL_RE = {DATE: _DATE, TIMESTAMP: _TIMESTAMP, TIMESTAMPTZ: _TIMESTAMPTZ}


class _Unfit(Exception):
    pass


class _Tolerant(Exception):
    """A value the table's loader refuses: the typed path types the row again with the
    tolerant loaders (:meth:`walex.relations.Table.load`), and so does this module."""


def tolerant_loads(plan: Plan) -> tuple[Any, ...]:
    """The tolerant loaders' load of each column (made once per plan)."""
    if not plan.tolerant_loads:
        tx = Transformer(plan.table._tolerant)
        plan.tolerant_loads.append(tuple(tx.get_loader(oid, Format.TEXT).load
                                         for oid in plan.table.type_oids))
    return plan.tolerant_loads[0]  # type: ignore[no-any-return]


def temporal_text(load: Any, raw: bytes, mode: int) -> bytes:
    """The piece of a date or timestamp not in the plain ISO form. The table's loader
    refuses such a value (``mode`` 0: :class:`_Tolerant` is raised, the row is written
    again as the typed path types it again); the tolerant loader (``mode`` 1) gives its
    text (a value Python cannot hold), or else a value in a form this module does not
    write (another offset): unfit."""
    if not mode:
        raise _Tolerant
    value = load(raw)
    if type(value) is not str:
        raise _Unfit
    return orjson.dumps(value)


def _loaded(load: Any, raw: bytes, mode: int) -> Any:
    """The value ``load`` gives; a refusal with the plain loaders (``mode`` 0) asks for the
    row's tolerant loaders (:func:`temporal_text`), with them it is the loader's error."""
    try:
        return load(raw)
    except Exception as exc:  # noqa: BLE001 - the typed path catches any, too
        if not mode:
            raise _Tolerant from exc
        raise


def generic(load: Any, raw: bytes, mode: int) -> tuple[bytes, Any]:
    """The piece of a value of any other type, and its JSON form (``mode``: see
    :func:`temporal_text`)."""
    form = json_value(_loaded(load, raw, mode))
    return orjson.dumps(form), form


def _piece(kind: int, raw: bytes, load: Any, mode: int) -> tuple[bytes, Any]:
    """The JSON of one value, and its JSON form when that is a str (else None)."""
    if kind == INT:
        if not _INT.fullmatch(raw):
            raise _Unfit
        if len(raw) <= 15 or -_MAX_SAFE <= int(raw) <= _MAX_SAFE:
            return raw, None
        return b'"' + raw + b'"', raw.decode()
    if kind == TEXT:
        text = raw.decode()
        return orjson.dumps(text), text
    if kind == BOOL:
        if raw == b"t":
            return b"true", None
        if raw == b"f":
            return b"false", None
        raise _Unfit
    if kind == NUMERIC:
        if not _NUMERIC.fullmatch(raw):
            raise _Unfit
        return b'"' + raw + b'"', raw.decode()
    if kind == UUID:
        if not _UUID.fullmatch(raw):
            raise _Unfit
        return b'"' + raw + b'"', None
    if kind in _TEMPORAL:
        match = _TEMPORAL_RE[kind].fullmatch(raw)
        if match is None or raw.startswith(b"0000"):
            piece = temporal_text(load, raw, mode)
            return piece, orjson.loads(piece)
        if kind == DATE:
            return b'"' + raw + b'"', None
        fraction = (match[3] or b"").ljust(6, b"0")
        return (b'"' + match[1] + b"T" + match[2] + (b"." + fraction if fraction != b"000000" else b"")
                + (_UTC_OFFSET if kind == TIMESTAMPTZ else b"") + b'"'), None
    if kind == JSONB:
        piece = jsonb_compact(raw)
        if piece is not None:
            return piece, None
        kind = JSON
    if kind == JSON:
        value = _loaded(load, raw, mode)
        if type(value) is int and not -_MAX_SAFE <= value <= _MAX_SAFE:
            return orjson.dumps(str(value)), None  # as the reference writes a whole document
        return orjson.dumps(value), None  # its form for a key: see _subject
    piece, form = generic(load, raw, mode)
    return piece, form if type(form) is str else None


def _record(plan: Plan, row: tuple[Any, ...], columns: Any) -> tuple[bytes, list[Any], int]:
    """``{"name":piece,...}`` of ``row``'s ``columns``, each column's (piece, str form), and
    the mode the row was typed in (1: with the tolerant loaders)."""
    try:
        return _record_in(plan, row, columns, 0)
    except _Tolerant:
        return _record_in(plan, row, columns, 1)


def _record_in(plan: Plan, row: tuple[Any, ...], columns: Any,
               mode: int) -> tuple[bytes, list[Any], int]:
    kinds, names = plan.kinds, plan.names
    loads = tolerant_loads(plan) if mode else plan.loads
    pieces: list[Any] = [None] * len(kinds)
    parts = []
    for i in columns:
        raw = row[i]
        if raw is None:
            piece = pieces[i] = (b"null", None)
        elif type(raw) is bytes:
            piece = pieces[i] = _piece(kinds[i], raw, loads[i], mode)
        else:
            raise _Unfit  # a binary or unchanged TOAST value: not a raw row
        parts.append(names[i] + piece[0])
    return b"{" + b",".join(parts) + b"}", pieces, mode


def _subject(plan: Plan, row: tuple[Any, ...], pieces: list[Any], mode: int) -> str:
    """The reference's subject (``encoding._subject``) from the pieces of the key columns."""
    key = plan.key
    forms = []
    for i in key:
        if plan.kinds[i] in (JSON, JSONB) and row[i] is not None:  # the key's: json_value's
            piece, text = generic((tolerant_loads(plan) if mode else plan.loads)[i], row[i], 1)
            forms.append((piece, text if type(text) is str else None))
        else:
            forms.append(pieces[i])
    if len(key) == 1:
        piece, text = forms[0]
        return text if text is not None else piece.decode()
    return (b"[" + b",".join(piece for piece, _ in forms) + b"]").decode()


def py_direct_event(event: Any, partitions: int) -> Outgoing | None:
    """The event's Outgoing, written from its raw rows; None when unfit (see the module)."""
    try:
        return _direct(event, partitions)
    except Exception:  # noqa: BLE001 - unfit: the typed path encodes it (and raises, if it must)
        return None


def _direct(event: Any, partitions: int) -> Outgoing:
    table, new_row, old_row, old_kind, _lsn = event.raw
    new = None if new_row is None else row_values(new_row)  # raises (unfit) if not a raw row
    old = None if old_row is None else row_values(old_row)
    plan = plan_of(event, table)
    if plan.key is None:
        raise _Unfit
    width = len(plan.kinds)
    everything = range(width)
    new_part = old_part = changes_part = b"null"
    new_pieces = old_pieces = None
    if new is not None:
        if len(new) != width:
            raise _Unfit
        new_part, new_pieces, new_mode = _record(plan, new, everything)
    if old is not None:
        if len(old) != width:
            raise _Unfit
        if old_kind == "K":
            old_part, old_pieces, old_mode = _record(plan, old, plan.key_indexes)
        else:
            old_part, old_pieces, old_mode = _record(plan, old, everything)
            if new_pieces is not None:
                names = plan.names
                changes_part = b"{" + b",".join(
                    names[i] + b'{"old_value":' + old_pieces[i][0] + b',"new_value":'
                    + new_pieces[i][0] + b"}"
                    for i in everything if new[i] != old[i]) + b"}"
    subject = None
    if plan.key:
        if new_pieces is not None:
            subject = _subject(plan, new, new_pieces, new_mode)
        elif old_pieces is not None and (old_kind != "K" or plan.key_in_k):
            subject = _subject(plan, old, old_pieces, old_mode)
    prefix = plan.prefix
    if subject is None:
        key = prefix
        key_part = plan.prefix_part + b'"'
    else:
        key = f"{prefix}/{subject}"
        escaped = orjson.dumps(subject)
        key_part = plan.prefix_part + b"/" + escaped[1:]
    partition = partition_of(key, partitions) if partitions > 1 else 0
    kind, type_name = _KINDS[event.type]
    time = _rfc3339(event.timestamp)
    lsn = orjson.dumps(event.lsn)
    body = b"".join((
        b'{"specversion":"1.0","id":', orjson.dumps(event.id), plan.source_part,
        orjson.dumps(type_name), b',"time":', orjson.dumps(time),
        b',"datacontenttype":"application/json","walexlsn":', lsn, key_part,
        b',"walexpartition":', str(partition).encode(), b',"walexpartitions":',
        str(partitions).encode(), b',"data":{"new_record":', new_part, b',"old_record":', old_part,
        b',"changes":', changes_part, plan.columns_part, lsn, plan.tail,
        b"}" if subject is None else b',"subject":' + escaped + b"}",
    ))
    return _tuple_new(Outgoing, (event.id, plan.schema, plan.table_name, kind, partition, body,
                                 plan.ce_source, time, key, subject))


try:  # the compiled twin (walex.destinations._direct), when built
    from . import _direct as _compiled
except ImportError:
    compiled_direct_event = compiled_entry = None
else:
    compiled_direct_event = _compiled.bind(globals())
    compiled_entry = _compiled.c_entry()  # the same as a C function, for walex._encode

direct_event = (py_direct_event if compiled_direct_event is None
                or os.environ.get("WALEX_PURE_PYTHON") else compiled_direct_event)
