"""A backfill holds no more than its share of ``max_pending_bytes``, in Python bytes.

Concern (walex.backfill.chunks): a chunk ends once its rows take a quarter of
``max_pending_bytes`` *in memory*, as :mod:`walex.sizes` counts streamed
batches, not by the length of their text; and rows read again because the
stream's change of them lacked an unchanged TOASTed value are read within the
same budget, however many accumulate. Two tables, each backfilled under a
4 MiB budget by an app whose handler keeps nothing:

- ``w1``: 20,000 rows of small typed values (int, text, timestamptz, numeric,
  jsonb), about 100 bytes of text and over 1 kB as an event each. Counted by
  their text, a chunk held some 10,000 rows: about 13 MB;
- ``doc``: 60 rows of a 256 kB TOASTed text. During the first chunks every row
  is updated (a small column: the stream's change lacks the body) between each
  chunk's low watermark and its read, so each chunk's rows, and the rows it
  reads again, are left to the stream and must be read again; before, every
  row waiting to be read again was read with the next chunk, all at once
  (some 9 MB in one chunk at the end).

Measured with tracemalloc in this process from a baseline taken with the app
streaming: the peak of Python's allocations while the backfill runs (the
libpq buffers of a result are not Python's; the events made of them are). At
most two chunks are held at once (one queued or in hand, the next being
read), half the budget; the margin covers a chunk's last row read past its
budget, the stream's batches of the updates, the runner's and the event
loop's own allocations. Every row still reaches the handler, with its whole
body.
"""

from __future__ import annotations

import asyncio
import tracemalloc
from typing import Any

import psycopg
import pytest
from support import run

from walex import UNCHANGED_TOAST, Event, Events, EventType, WalEx
from walex.backfill import (
    chunks as backfill_chunks,  # the runner imports read_chunk on use
)

MiB = 1024 * 1024
BUDGET = 4 * MiB
MARGIN = 1 * MiB
TYPED_ROWS = 20_000
DOCS, BODY = 60, 256 * 1024
UPDATED_CHUNKS = 8  # chunks in whose window every doc row is updated


def _typed(admin: psycopg.Connection) -> None:
    admin.execute(
        "CREATE TABLE w1 (id bigint PRIMARY KEY, a int, b text, c timestamptz, d numeric, e jsonb)")
    admin.execute(
        "INSERT INTO w1 SELECT i, i, 'row ' || md5(i::text), "
        "timestamptz '2025-01-01 00:00:00+00' + i * interval '1 second', round(i * 1.2345, 4), "
        "jsonb_build_object('k', i, 'tag', 'x', 'even', i % 2 = 0) "
        f"FROM generate_series(1, {TYPED_ROWS}) i")
    admin.execute("CREATE PUBLICATION pub FOR TABLE w1")


def _docs(admin: psycopg.Connection) -> None:
    admin.execute("CREATE TABLE doc (id int PRIMARY KEY, body text, n int NOT NULL DEFAULT 0)")
    admin.execute("ALTER TABLE doc ALTER COLUMN body SET STORAGE EXTERNAL")  # out of line, as is
    # incompressible text, each row its own
    admin.execute(
        "INSERT INTO doc SELECT g, left(g || ':' || (SELECT string_agg(md5(g * 100000 + i || ''), '') "
        f"FROM generate_series(1, {BODY // 32 + 1}) i), {BODY}), 0 FROM generate_series(1, {DOCS}) g")
    admin.execute("CREATE PUBLICATION pub FOR TABLE doc")


def _updating_every_row(monkeypatch: pytest.MonkeyPatch, admin: psycopg.Connection) -> None:
    """Update every doc row after each of the first chunks' low watermark, before its read."""
    real = backfill_chunks.read_chunk
    calls = {"n": 0}

    async def racing(conn: Any, target: Any, table: Any, adapters: Any, where: Any,
                     after: Any, limit: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] <= UPDATED_CHUNKS:
            admin.execute("UPDATE doc SET n = n + 1")
        return await real(conn, target, table, adapters, where, after, limit, **kw)

    monkeypatch.setattr(backfill_chunks, "read_chunk", racing)


@pytest.mark.parametrize("table", ["w1", "doc"])
def test_a_backfill_holds_no_more_than_max_pending_bytes(
    dsn: str, admin: psycopg.Connection, monkeypatch: pytest.MonkeyPatch, table: str,
) -> None:
    if table == "w1":
        _typed(admin)
    else:
        _docs(admin)
        _updating_every_row(monkeypatch, admin)
    reads: dict[int, int] = {}  # id -> a fingerprint of the row as read (doc: its body's length)
    events = Events()

    @events.on_event(table)
    async def keep_nothing(batch: list[Event]) -> None:
        for e in batch:
            if e.type is EventType.READ:
                record = e.new_record
                assert record is not None
                body = record.get("body")
                assert body is not UNCHANGED_TOAST
                reads[record["id"]] = len(body) if table == "doc" else 1

    async def main() -> tuple[int, Any, int]:
        app = WalEx(dsn, publication="pub", name="bfmem", modules=[events],
                    max_pending_bytes=BUDGET)
        async with app:
            await asyncio.sleep(0.5)  # streaming; the backfill's own imports done below
            tracemalloc.start()
            try:
                baseline = tracemalloc.get_traced_memory()[0]
                job = await app.backfill(table)
                peak = tracemalloc.get_traced_memory()[1] - baseline
            finally:
                tracemalloc.stop()
            again = app.pipeline.backfill.rows_read_again
        return peak, job, again

    peak, job, again = run(main(), timeout=240)
    assert job.state == "done"
    if table == "doc":
        assert again >= DOCS // 2  # the scenario did happen: many rows read again
        assert reads == {i: BODY for i in range(1, DOCS + 1)}  # every body, whole
    else:
        assert len(reads) == TYPED_ROWS
    assert peak <= BUDGET + MARGIN, (
        f"{peak / MiB:.1f} MiB allocated by a backfill of {table} for max_pending_bytes of "
        f"{BUDGET / MiB:.0f} MiB (margin {MARGIN / MiB:.0f} MiB)")
