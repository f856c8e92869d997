"""A straightforward pgoutput (protocol version 1) decoder, as a Python user would write it.

This is the decoder of the ``psycopg2`` level of the benchmark: what you get
if you take psycopg2's ``LogicalReplicationConnection`` and write the
decoding yourself, without trying to be clever. Every row becomes a ``dict``
of typed Python values, chosen by type OID (ints, Decimal, datetime, dicts
for json/jsonb, ...; anything else stays ``str``).

Only what protocol version 1 sends is handled: Begin, Commit, Origin,
Relation, Type, Insert, Update, Delete, Truncate.
"""

from __future__ import annotations

import json
import struct
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Callable

PG_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)

_U32 = struct.Struct("!I")
_I32 = struct.Struct("!i")
_U16 = struct.Struct("!H")
_BEGIN = struct.Struct("!QqI")
_COMMIT = struct.Struct("!BQQq")


def _bool(s: str) -> bool:
    return s == "t"


def _timestamptz(s: str) -> datetime:
    return datetime.fromisoformat(s)


# type OID -> converter from the text representation
CONVERTERS: dict[int, Callable[[str], Any]] = {
    16: _bool,              # bool
    20: int, 21: int, 23: int, 26: int,  # int8, int2, int4, oid
    700: float, 701: float,  # float4, float8
    1700: Decimal,          # numeric
    114: json.loads, 3802: json.loads,  # json, jsonb
    1082: date.fromisoformat,  # date
    1114: datetime.fromisoformat,  # timestamp
    1184: _timestamptz,     # timestamptz
    2950: uuid.UUID,        # uuid
}


@dataclass(slots=True)
class Relation:
    relid: int
    schema: str
    name: str
    columns: list[str]
    converters: list[Callable[[str], Any] | None]


@dataclass(slots=True)
class Change:
    op: str  # "insert" / "update" / "delete" / "truncate"
    schema: str
    table: str
    new: dict[str, Any] | None
    old: dict[str, Any] | None


@dataclass(slots=True)
class Begin:
    final_lsn: int
    commit_time: datetime
    xid: int


@dataclass(slots=True)
class Commit:
    commit_lsn: int
    end_lsn: int
    commit_time: datetime


class Decoder:
    """Decodes one pgoutput message at a time; keeps the relation cache."""

    def __init__(self) -> None:
        self.relations: dict[int, Relation] = {}

    def decode(self, data: bytes) -> Begin | Commit | Change | list[Change] | None:
        tag = data[0:1]
        if tag == b"I":
            rel = self.relations[_U32.unpack_from(data, 1)[0]]
            new, _ = self._tuple(rel, data, 6)  # 5 is the 'N'
            return Change("insert", rel.schema, rel.name, new, None)
        if tag == b"U":
            rel = self.relations[_U32.unpack_from(data, 1)[0]]
            pos = 5
            old = None
            if data[pos:pos + 1] in (b"K", b"O"):
                old, pos = self._tuple(rel, data, pos + 1)
            new, _ = self._tuple(rel, data, pos + 1)  # skip 'N'
            return Change("update", rel.schema, rel.name, new, old)
        if tag == b"D":
            rel = self.relations[_U32.unpack_from(data, 1)[0]]
            old, _ = self._tuple(rel, data, 6)  # 5 is 'K' or 'O'
            return Change("delete", rel.schema, rel.name, None, old)
        if tag == b"B":
            final_lsn, ts, xid = _BEGIN.unpack_from(data, 1)
            return Begin(final_lsn, PG_EPOCH + timedelta(microseconds=ts), xid)
        if tag == b"C":
            _flags, commit_lsn, end_lsn, ts = _COMMIT.unpack_from(data, 1)
            return Commit(commit_lsn, end_lsn, PG_EPOCH + timedelta(microseconds=ts))
        if tag == b"R":
            self._relation(data)
            return None
        if tag == b"T":
            (count,) = _U32.unpack_from(data, 1)
            ids = struct.unpack_from(f"!{count}I", data, 6)
            return [Change("truncate", self.relations[i].schema, self.relations[i].name, None, None)
                    for i in ids]
        # 'O' origin, 'Y' type: nothing to do for this benchmark
        return None

    def _relation(self, data: bytes) -> None:
        (relid,) = _U32.unpack_from(data, 1)
        pos = 5
        end = data.index(b"\0", pos)
        schema = data[pos:end].decode()
        pos = end + 1
        end = data.index(b"\0", pos)
        name = data[pos:end].decode()
        pos = end + 2  # skip the replica identity byte
        (ncols,) = _U16.unpack_from(data, pos)
        pos += 2
        columns: list[str] = []
        converters: list[Callable[[str], Any] | None] = []
        for _ in range(ncols):
            pos += 1  # flags
            end = data.index(b"\0", pos)
            columns.append(data[pos:end].decode())
            pos = end + 1
            (type_oid,) = _U32.unpack_from(data, pos)
            pos += 8  # type oid and typmod
            converters.append(CONVERTERS.get(type_oid))
        self.relations[relid] = Relation(relid, schema, name, columns, converters)

    @staticmethod
    def _tuple(rel: Relation, data: bytes, pos: int) -> tuple[dict[str, Any], int]:
        (ncols,) = _U16.unpack_from(data, pos)
        pos += 2
        row: dict[str, Any] = {}
        columns, converters = rel.columns, rel.converters
        for i in range(ncols):
            kind = data[pos]
            pos += 1
            if kind == 0x74:  # 't'
                (length,) = _I32.unpack_from(data, pos)
                pos += 4
                text = data[pos:pos + length].decode()
                pos += length
                conv = converters[i]
                row[columns[i]] = conv(text) if conv is not None else text
            elif kind == 0x6E:  # 'n'
                row[columns[i]] = None
            elif kind == 0x75:  # 'u' unchanged TOAST value
                row[columns[i]] = ...
            else:
                raise ValueError(f"unexpected tuple column kind {kind!r}")
        return row, pos
