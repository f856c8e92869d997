"""Reading one chunk: the next rows in key order, typed like streamed rows, and their snapshot.

A chunk is read in one ``REPEATABLE READ READ ONLY`` transaction that locks
the table (``ACCESS SHARE``) and then records the snapshot
(``pg_current_snapshot()``) and the table's shape, so the watermark logic
knows exactly which transactions the rows reflect and DDL cannot come between
the check of the shape and the read. Rows are fetched from a cursor until the
row limit or the byte budget (:class:`Limit`) is reached. Rows come in text
format and are typed by a psycopg ``Transformer`` over the app's adapters
and the columns' type OIDs, which is what :meth:`walex.relations.Table.load`
does for a streamed row: a ``read`` event's ``new_record`` equals what an
insert of the same row would give. A value that cannot be typed raises the
same :class:`~walex.errors.DecodeError` a streamed row would. Each row's
version (a digest of its key and ``xmin``, the transaction that wrote it) is
read with it, to replay its read under its id (:mod:`.replay`).

A chunk can also re-read rows of earlier chunks, in the same snapshot: rows
the watermark logic left to the stream although the stream's change did not
carry every column (an unchanged TOASTed value under the default replica
identity), so that their handlers still get the whole row. Each such row is
read as the first row from its key on (:meth:`Target.chunk_query` with a
limit of one, the backfill's conditions included; not the first row after the
key before it, which a row inserted since may be) and kept only if it is
still the same key. They are read before the next rows, in pieces, within
half the byte budget (the whole budget once no next rows are left): those the
budget leaves out (:attr:`Chunk.untried`) are read by a later chunk, so
however many wait, and however wide their TOASTed values, a chunk holds about
its budget, and both the rows to read again and the next rows advance.

The byte budget counts rows in memory, as the pipeline counts streamed
batches (:func:`walex.sizes.events_bytes`: a few events of each fetch,
sampled, times their number), plus the key text forms a chunk keeps, and never
less than the rows' text: a row of small typed values (numeric, timestamptz,
jsonb) takes several times its text as an event.
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
from ..sizes import events_bytes, value_bytes
from .target import SHAPE, Target

__all__ = ["Snapshot", "Chunk", "Bound", "Limit", "read_chunk", "SLICE"]

SLICE = 1000  # rows typed at once; the event loop runs between slices
_READ = EventType.READ
_UNSET: Any = None
_REFETCH_BATCH = 100  # rows re-read by one statement
_TEXT_OID = 25

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
    reshaped: bool = False  # not read: the table (its columns, keys) changed or is gone
    more: bool = False  # rows may follow: the row limit was reached or the byte budget spent
    size: int = 0  # bytes of the rows in memory (walex.sizes), when the limit has a budget
    rows: int = 0  # events[:rows] are the next rows in key order, the rest rows read again
    after: tuple[str, ...] | None = None  # the key the chunk's rows follow
    texts: list[tuple[str, ...]] = field(default_factory=list)  # key text forms of events[:rows]
    # each event's row version: a digest of its key and the xmin of its tuple, 16 hex digits
    versions: list[bytes] = field(default_factory=list)
    again: list[Bound] = field(default_factory=list)  # the bounds of events[rows:]
    # bounds of rows to read again that this chunk did not try (the budget was spent)
    untried: list[Bound] = field(default_factory=list)

    def bound(self, index: int) -> Bound:
        """How to read the row of ``events[index]`` again."""
        rows = self.rows
        if index >= rows:
            return self.again[index - rows]
        return (self.texts[index - 1] if index else self.after, self.texts[index])


@dataclass(slots=True, frozen=True)
class Limit:
    """How much one chunk may hold: ``rows`` rows and about ``bytes`` bytes of rows in
    memory, as :mod:`walex.sizes` counts streamed batches (at least one row, however wide;
    with rows to read again, at least one of those and one next row)."""

    rows: int
    bytes: int | None = None


_CURSOR = "walex_backfill_chunk"
LOCK_TIMEOUT = 60  # seconds a chunk waits for the table's lock (behind a migration's)
_FIRST_FETCH = 4  # rows fetched before the first size estimate


async def read_chunk(
    conn: psycopg.AsyncConnection, target: Target, table: Table, adapters: AdaptersMap,
    where: str | None, after: list[str] | None, limit: int | Limit,
    again: list[Bound] | None = None,
) -> Chunk:
    """The next rows after the key ``after`` (text forms), in one snapshot, within ``limit``,
    and the rows of ``again`` that still exist (and still match the conditions), as many
    as the byte budget takes.

    The table is locked (``ACCESS SHARE``, as any read does) before the snapshot
    is taken, so DDL cannot commit between the check of its shape and the read:
    a chunk is read with the definition it was checked against, or not at all
    (``reshaped``). The rows of ``again`` are read first, in pieces, until they
    hold half the byte budget (all of it when ``limit.rows`` is 0: no next rows
    are read), at least one piece; those not tried are :attr:`Chunk.untried`,
    for a later chunk. Then the next rows are fetched from a cursor until the row
    limit or what is left of the byte budget is reached (at least one row). Sizes
    are in memory, as :func:`walex.sizes.events_bytes` estimates them, never below
    the rows' text."""
    if isinstance(limit, int):
        limit = Limit(limit)
    query = sql.SQL("DECLARE {} NO SCROLL CURSOR FOR {}").format(
        sql.Identifier(_CURSOR), target.chunk_query(where, after is not None))
    lock = sql.SQL("LOCK TABLE {}{} IN ACCESS SHARE MODE").format(
        sql.SQL("ONLY ") if target.relkind == "r" else sql.SQL(""),
        sql.Identifier(target.schema, target.name))
    positions = target.key_positions()
    encoding = conn.info.encoding  # key text forms go back as parameters: the same encoding
    cur = conn.cursor()
    events: list[Event] = []
    texts: list[tuple[str, ...]] = []
    versions: list[bytes] = []
    found = _Again(again or [], limit.bytes, limit.rows > 0)
    size = 0
    more = False
    await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    try:
        try:
            # the lock comes before the snapshot (LOCK TABLE and SET take none); waiting
            # longer than LOCK_TIMEOUT behind DDL is an OperationalError: retried later
            await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}s'")
            await conn.execute(lock, prepare=False)
            await cur.execute(f"SELECT pg_current_snapshot()::text, ({SHAPE}), "
                              "to_regclass(%s) = %s::oid", (target.oid, target.quoted, target.oid),
                              prepare=False)
            row = await cur.fetchone()
            assert row is not None
            snapshot = Snapshot.parse(row[0])
            if (row[1] or "") != target.shape or not row[2]:  # changed since it was resolved
                await conn.execute("ROLLBACK")
                return Chunk([], None, snapshot, reshaped=True)
            # the rows to read again first: however many wait, they take their share of
            # the budget, and the next rows the rest
            while found.want():
                part = found.next_part()
                await cur.execute(
                    sql.SQL(" UNION ALL ").join(
                        sql.SQL("({})").format(target.chunk_query(where, True, at=True))
                        for _ in part
                    ),
                    [param for _, key in part for param in (*key, 1)],
                    prepare=False,
                )
                result = cur.pgresult
                assert result is not None
                typed, keys, xmins = await _typed(result, table, adapters, positions, encoding)
                found.add(typed, keys, xmins, _held(typed, keys, result) if limit.bytes else 0)
                del result
            size = found.size
            if limit.rows > 0:  # 0: only rows to read again are left
                await cur.execute(query, [*(after or []), limit.rows], prepare=False)
        except (psycopg.errors.UndefinedTable, psycopg.errors.FeatureNotSupported) as exc:
            # dropped or renamed before the lock; a plan cached before DDL ("cached plan
            # must not change result type"): the caller resolves the table again
            if isinstance(exc, psycopg.errors.FeatureNotSupported) and "cached plan" not in str(exc):
                raise
            await conn.execute("ROLLBACK")
            return Chunk([], None, Snapshot(0, 0, frozenset()), reshaped=True)
        want = min(limit.rows, _FIRST_FETCH if limit.bytes else limit.rows)
        if limit.bytes and size:
            want = min(want, 1)  # the rows read again took part of the budget: one row first
        fetched = taken = 0  # rows fetched, their bytes
        while want > 0:
            await cur.execute(f"FETCH FORWARD {int(want)} FROM {_CURSOR}", prepare=False)
            result = cur.pgresult
            assert result is not None
            count = result.ntuples
            if count:
                fetched += count
                typed, keys, xmins = await _typed(result, table, adapters, positions, encoding)
                if limit.bytes:
                    taken += _held(typed, keys, result)
                events += typed
                texts += keys
                versions += xmins
                del result  # typed: only the events stay
            if count < want or fetched >= limit.rows:
                more = count == want  # the row limit: the next chunk tells
                break
            if limit.bytes:
                left = limit.bytes - size - taken
                if left <= 0:
                    more = True
                    break
                # about half of what the budget still takes, by the rows' mean size so far
                want = min(limit.rows - fetched, max(1, left * fetched // max(1, 2 * taken)))
        size += taken
        await conn.execute("COMMIT")
    except BaseException:
        if not conn.closed:
            try:
                await conn.execute("ROLLBACK")
            except psycopg.Error:
                pass
        raise
    chunk = Chunk(events, list(texts[-1]) if texts else None, snapshot, more=more, size=size,
                  rows=len(events), after=tuple(after) if after is not None else None,
                  texts=texts, versions=versions, untried=found.untried())
    chunk.events += found.events
    chunk.versions += found.versions
    chunk.again = found.bounds
    return chunk


class _Again:
    """The rows of a chunk to read again, read in pieces within their share of the budget.

    A piece is a statement of up to ``_REFETCH_BATCH`` rows: the first of one row (they
    are often wide: a TOASTed value), the next ones of about half of what the share still
    takes, by the mean size of the rows read so far. A row is taken by its key, whichever
    bound's statement returned it (the row from a deleted one's key on is another row)."""

    def __init__(self, bounds: list[Bound], budget: int | None, rows_follow: bool) -> None:
        self.bounds_in = bounds
        self.wanted = {key: (before, key) for before, key in bounds}
        self.share = None if not budget else max(1, budget // 2) if rows_follow else budget
        self.tried = 0  # bounds_in[:tried] were tried
        self.size = 0  # bytes of the rows read, in memory
        self.events: list[Event] = []
        self.bounds: list[Bound] = []  # of each of events
        self.versions: list[bytes] = []  # of each of events
        self._step = 1

    def want(self) -> bool:
        """Whether another piece is read: bounds are left and the share is not spent."""
        return self.tried < len(self.bounds_in) and (self.share is None or self.size < self.share)

    def next_part(self) -> list[Bound]:
        start = self.tried
        if self.share is None:
            step = _REFETCH_BATCH
        elif self.events:  # about half of what the share still takes
            step = max(1, (self.share - self.size) * len(self.events) // max(1, 2 * self.size))
        else:  # none read yet, or the rows tried were gone: they took nothing
            step = self._step
            self._step = min(_REFETCH_BATCH, 2 * step)
        self.tried = min(len(self.bounds_in), start + min(step, _REFETCH_BATCH))
        return self.bounds_in[start:self.tried]

    def add(self, typed: list[Event], keys: list[tuple[str, ...]], xmins: list[bytes],
            size: int) -> None:
        """The rows a piece returned, their versions, and their size."""
        wanted = self.wanted
        for event, key, xmin in zip(typed, keys, xmins):
            bound = wanted.pop(key, None)
            if bound is not None:  # else not a row to read again (the row after a gone one)
                self.events.append(event)
                self.bounds.append(bound)
                self.versions.append(xmin)
        self.size += size

    def untried(self) -> list[Bound]:
        """The bounds not tried yet whose row no statement returned."""
        wanted = self.wanted
        return [bound for bound in self.bounds_in[self.tried:] if bound[1] in wanted]


async def _typed(
    result: Any, table: Table, adapters: AdaptersMap, positions: list[int], encoding: str,
) -> tuple[list[Event], list[tuple[str, ...]], list[bytes]]:
    """A result's rows as read events, typed like the rows of the stream, each row's key
    in text form, and each row's version (the column after the table's)."""
    assert result is not None
    count = result.ntuples
    names = table.column_names
    name, source = table.name, table.source
    tx = Transformer(adapters)  # the app's type catalog: the loaders of streamed rows
    tx.set_pgresult(result, set_loaders=False)
    # the version is loaded too (as text: every column needs a loader), then left out
    tx.set_loader_types([*table.type_oids, _TEXT_OID], Format.TEXT)
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
    column = len(names)
    versions = [bytes(value(i, column) or b"") for i in range(count)]  # 16 hex digits
    return events, texts, versions


def _held(events: list[Event], keys: list[tuple[str, ...]], result: Any) -> int:
    """What the rows of a result take in memory as typed events (walex.sizes) with their keys'
    text forms, never less than their text (which a value takes at least)."""
    count = len(keys)
    held = events_bytes(events) + (count and count * value_bytes(keys[count // 2]))
    return max(held, _bytes(result))


def _bytes(result: Any) -> int:
    """About the bytes of the values of a result: variable-width values as received
    (text forms), fixed-width ones by their type's size."""
    rows = result.ntuples
    sizes = [result.fsize(j) for j in range(result.nfields)]
    total = rows * sum(size for size in sizes if size > 0)
    get = result.get_value
    for j, size in enumerate(sizes):
        if size < 0:
            total += sum(len(get(i, j) or b"") for i in range(rows))
    return total
