"""Reading one chunk: the next rows in key order, typed like streamed rows, and their snapshot.

A chunk is read in one ``REPEATABLE READ READ ONLY`` transaction whose first
statement records the snapshot (``pg_current_snapshot()``), so the watermark
logic knows exactly which transactions the rows reflect. Rows come in text
format and are typed by a psycopg ``Transformer`` over the app's adapters
and the columns' type OIDs, which is what :meth:`walex.relations.Table.load`
does for a streamed row: a ``read`` event's ``new_record`` equals what an
insert of the same row would give. A value that cannot be typed raises the
same :class:`~walex.errors.DecodeError` a streamed row would.

A chunk can also re-read rows of earlier chunks, in the same snapshot: rows
the watermark logic left to the stream although the stream's change did not
carry every column (an unchanged TOASTed value under the default replica
identity), so that their handlers still get the whole row. Each such row is
read as the first row after the key before it (:meth:`Target.chunk_query`
with a limit of one, the backfill's conditions included) and kept only if it
is still the same key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import asyncio

import psycopg
from psycopg import sql
from psycopg.adapt import AdaptersMap, Transformer
from psycopg.pq import Format

from ..event import Event, EventType
from ..pgoutput.messages import TupleData
from ..relations import Table
from .target import SHAPE, Target

__all__ = ["Snapshot", "Chunk", "Bound", "read_chunk", "SLICE"]

SLICE = 1000  # rows typed at once; the event loop runs between slices
_READ = EventType.READ
_UNSET: Any = None
_REFETCH_BATCH = 100  # rows re-read by one statement

# A row to read again: (the key before it, or None for the table's first row; its key),
# in the text forms of the chunk key's columns.
Bound = tuple[tuple[str, ...] | None, tuple[str, ...]]


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
    rows: int = 0  # events[:rows] are the next rows in key order, the rest rows read again
    after: tuple[str, ...] | None = None  # the key the chunk's rows follow
    texts: list[tuple[str, ...]] = field(default_factory=list)  # key text forms of events[:rows]
    again: list[Bound] = field(default_factory=list)  # the bounds of events[rows:]

    def bound(self, index: int) -> Bound:
        """How to read the row of ``events[index]`` again."""
        rows = self.rows
        if index >= rows:
            return self.again[index - rows]
        return (self.texts[index - 1] if index else self.after, self.texts[index])


async def read_chunk(
    conn: psycopg.AsyncConnection, target: Target, table: Table, adapters: AdaptersMap,
    where: str | None, after: list[str] | None, limit: int, again: list[Bound] | None = None,
) -> Chunk:
    """The next ``limit`` rows after the key ``after`` (text forms), in one snapshot, and
    the rows of ``again`` that still exist (and still match the conditions)."""
    query = target.chunk_query(where, after is not None, limit)
    cur = conn.cursor()
    results = []
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
        results.append(cur.pgresult)
        for start in range(0, len(again or ()), _REFETCH_BATCH):
            part = again[start:start + _REFETCH_BATCH]  # type: ignore[index]
            await cur.execute(
                sql.SQL(" UNION ALL ").join(
                    sql.SQL("({})").format(target.chunk_query(where, before is not None, 1))
                    for before, _ in part
                ),
                [text for before, _ in part for text in before or ()],
            )
            results.append(cur.pgresult)
        await conn.execute("COMMIT")
    except BaseException:
        if not conn.closed:
            try:
                await conn.execute("ROLLBACK")
            except psycopg.Error:
                pass
        raise
    positions = target.key_positions()
    encoding = conn.info.encoding  # key text forms go back as parameters: the same encoding
    events, texts = await _typed(results[0], table, adapters, positions, encoding)
    chunk = Chunk(events, list(texts[-1]) if texts else None, snapshot, rows=len(events),
                  after=tuple(after) if after is not None else None, texts=texts)
    if again:
        wanted = {key: (before, key) for before, key in again}
        for result in results[1:]:
            found, keys = await _typed(result, table, adapters, positions, encoding)
            for event, key in zip(found, keys):
                bound = wanted.pop(key, None)
                if bound is not None:  # else the row is gone: the next one was read
                    chunk.events.append(event)
                    chunk.again.append(bound)
    return chunk


async def _typed(
    result: Any, table: Table, adapters: AdaptersMap, positions: list[int], encoding: str,
) -> tuple[list[Event], list[tuple[str, ...]]]:
    """A result's rows as read events, and each row's key in text form."""
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
    value = result.get_value
    texts = [tuple(bytes(value(i, p) or b"").decode(encoding) for p in positions)
             for i in range(count)]
    return events, texts
