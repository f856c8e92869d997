"""Reading one chunk: the next rows in key order, typed like streamed rows, and their snapshot.

A chunk is read in one ``REPEATABLE READ READ ONLY`` transaction whose first
statement records the snapshot (``pg_current_snapshot()``), so the watermark
logic knows exactly which transactions the rows reflect. Rows come in text
format and are typed by a psycopg ``Transformer`` over the app's adapters
and the columns' type OIDs, which is what :meth:`walex.relations.Table.load`
does for a streamed row: a ``read`` event's ``new_record`` equals what an
insert of the same row would give. A value that cannot be typed raises the
same :class:`~walex.errors.DecodeError` a streamed row would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncio

import psycopg
from psycopg.adapt import AdaptersMap, Transformer
from psycopg.pq import Format

from ..event import Event, EventType
from ..pgoutput.messages import TupleData
from ..relations import Table
from .target import SHAPE, Target

__all__ = ["Snapshot", "Chunk", "read_chunk", "SLICE"]

SLICE = 1000  # rows typed at once; the event loop runs between slices
_READ = EventType.READ
_UNSET: Any = None


@dataclass(slots=True, frozen=True)
class Snapshot:
    """A snapshot as ``pg_current_snapshot()`` reports it (64-bit transaction ids)."""

    xmin: int
    xmax: int
    xip: frozenset[int]

    @classmethod
    def parse(cls, text: str) -> Snapshot:
        xmin, xmax, xip = text.split(":")
        return cls(int(xmin), int(xmax), frozenset(int(x) for x in xip.split(",") if x))

    def visible(self, xid: int) -> bool:
        """Whether the committed transaction ``xid`` (32 bits, as the stream gives it) is visible."""
        # widen to 64 bits: the stream's transactions are within 2^31 of xmax
        delta = (xid - self.xmax) & 0xFFFFFFFF
        full = self.xmax + delta if delta < 0x80000000 else self.xmax - (0x100000000 - delta)
        if full >= self.xmax:
            return False
        return full < self.xmin or full not in self.xip


@dataclass(slots=True)
class Chunk:
    """The rows of one chunk as read events, and what the next chunk needs."""

    events: list[Event]  # typed, in key order; timestamp, lsn and id set at the high watermark
    last_key: list[str] | None  # the last row's key columns in text form; None when empty
    snapshot: Snapshot
    reshaped: bool = False  # not read: the table's columns changed since the target was resolved


async def read_chunk(
    conn: psycopg.AsyncConnection, target: Target, table: Table, adapters: AdaptersMap,
    where: str | None, after: list[str] | None, limit: int,
) -> Chunk:
    """The next ``limit`` rows after the key ``after`` (text forms), in one snapshot."""
    query = target.chunk_query(where, after is not None, limit)
    cur = conn.cursor()
    await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    try:
        await cur.execute(f"SELECT pg_current_snapshot()::text, ({SHAPE})", (target.oid,))
        row = await cur.fetchone()
        assert row is not None
        snapshot = Snapshot.parse(row[0])
        if (row[1] or "") != target.shape:  # the table changed since the backfill started
            await conn.execute("COMMIT")
            return Chunk([], None, snapshot, reshaped=True)
        await cur.execute(query, after or [])
        result = cur.pgresult
        await conn.execute("COMMIT")
    except BaseException:
        if not conn.closed:
            try:
                await conn.execute("ROLLBACK")
            except psycopg.Error:
                pass
        raise
    assert result is not None
    count = result.ntuples
    names = table.column_names
    tx = Transformer(adapters)  # the app's type catalog: the loaders of streamed rows
    tx.set_pgresult(result, set_loaders=False)
    tx.set_loader_types(table.type_oids, Format.TEXT)
    name, source = table.name, table.source
    events: list[Event] = []
    try:
        for start in range(0, count, SLICE):  # let the stream go on between slices
            records = tx.load_rows(start, min(count, start + SLICE), lambda v: dict(zip(names, v)))
            events += [Event(name, _READ, source, r, None, None, _UNSET, "", "") for r in records]
            await asyncio.sleep(0)
    except Exception:
        # type row by row, as a streamed row: a value Python cannot hold ('infinity', a
        # year BC) becomes its text form, any other failure the error naming the column
        events = []
        for i in range(count):
            raw = [result.get_value(i, j) for j in range(len(names))]
            record = dict(zip(names, table.load(TupleData(raw, True), "Read", 0)))
            events.append(Event(name, _READ, source, record, None, None, _UNSET, "", ""))
    last = None
    if count:
        last = [bytes(result.get_value(count - 1, p) or b"").decode() for p in target.key_positions()]
    return Chunk(events, last, snapshot)
