"""A lost walsender with transactions received and not yet handled: the durable slot is taken
back at once (no other consumer can take it meanwhile), the queue goes on being handled, and
what the new session sends again of it is handled once, not twice; a large transaction cut by
the loss is delivered whole."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest

from support import run, until
from walex import Events, WalEx
from walex.lsn import parse_lsn


def _active_pid(admin: psycopg.Connection, slot: str) -> int | None:
    row = admin.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s",
                        [slot]).fetchone()
    assert row is not None, f"no slot {slot}"
    return row[0]


def _confirmed(admin: psycopg.Connection, slot: str) -> int:
    row = admin.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots "
                        "WHERE slot_name = %s", [slot]).fetchone()
    assert row is not None and row[0] is not None
    return parse_lsn(row[0])


def test_a_lost_walsender_takes_the_slot_back_while_the_queue_is_handled_once(
    dsn: str, admin: psycopg.Connection
) -> None:
    """Rows 2..6 (one transaction each) queued behind a call holding row 1 when the walsender
    is terminated. The app must hold its slot again while that call still runs (on main it
    waited for the queue to drain first, the slot free to any other consumer meanwhile), and
    each transaction must be handled exactly once, in order: the new session sends 1..6
    again, which are queued or in hand already. Rows 7..8, committed after the reconnect,
    come once too; the slot's position passes them all."""
    admin.execute("CREATE TABLE item (id int PRIMARY KEY)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE item")
    slot = "requeue_slot"
    started, go = threading.Event(), threading.Event()
    seen: list[int] = []
    events = Events()

    @events.on_insert("item")
    def record(batch: Any) -> None:
        started.set()
        go.wait(30)
        seen.extend(e.new_record["id"] for e in batch)

    async def scenario() -> None:
        app = WalEx(dsn, publication="pub", modules=[events], name="requeue",
                    durable_slot=True, slot_name=slot, status_interval=0.2)
        await app.start()
        try:
            admin.execute("INSERT INTO item VALUES (1)")
            await until(started.is_set, "the call on row 1")
            for pk in range(2, 7):
                admin.execute("INSERT INTO item VALUES (%s)", [pk])
            await until(lambda: app.pipeline.queue.qsize() >= 5, "rows 2..6 queued")
            first = _active_pid(admin, slot)
            admin.execute("SELECT pg_terminate_backend(%s)", [first])
            await until(lambda: app.pipeline.sessions >= 2 and app.pipeline.repl is not None
                        and app.pipeline.repl.streaming, "the slot taken back", timeout=10)
            holder = _active_pid(admin, slot)
            assert holder is not None and holder != first
            assert not go.is_set() and seen == [], "the call on row 1 still runs"
            for pk in (7, 8):
                admin.execute("INSERT INTO item VALUES (%s)", [pk])
            end = parse_lsn(admin.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0])
            go.set()
            await until(lambda: len(seen) >= 8, "rows 1..8 handled")
            await until(lambda: _confirmed(admin, slot) >= end, "the slot past row 8")
            assert app.pipeline.replays_dropped >= 6
        finally:
            go.set()
            await app.stop()
        assert seen == list(range(1, 9))

    run(scenario(), timeout=90)


@pytest.mark.parametrize("rows", [30000])
def test_a_large_transaction_cut_by_a_lost_walsender_is_delivered_whole(
    dsn: str, admin: psycopg.Connection, rows: int
) -> None:
    """One transaction of ``rows`` rows (~4 MB, more than the sockets buffer), in batches of
    50, whose first batch's call holds the handlers while the rest is received: the queue
    keeps its first batches (not the last) when the walsender is terminated. The new session
    sends the transaction again from its start: every row must reach the handlers, the ones
    queued before maybe twice (same ids), none lost, and the transaction after it once."""
    admin.execute("CREATE TABLE item (id int PRIMARY KEY, pad text)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE item")
    slot = "requeue_large_slot"
    started, go = threading.Event(), threading.Event()
    ids: list[str] = []
    seen: list[int] = []
    events = Events()

    @events.on_insert("item")
    def record(batch: Any) -> None:
        started.set()
        go.wait(30)
        ids.extend(e.id for e in batch)
        seen.extend(e.new_record["id"] for e in batch)

    async def scenario() -> None:
        app = WalEx(dsn, publication="pub", modules=[events], name="requeue_large",
                    durable_slot=True, slot_name=slot, status_interval=0.2, batch_size=50,
                    max_pending_transactions=8)
        await app.start()
        try:
            admin.execute("INSERT INTO item SELECT g, repeat('x', 100) FROM "
                          "generate_series(1, %s) g", [rows])
            await until(started.is_set, "the call on the first batch")
            await until(lambda: app.pipeline.queue.qsize() >= 8, "batches queued")
            admin.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                          "WHERE slot_name = %s", [slot])
            go.set()
            await until(lambda: app.pipeline.sessions >= 2, "a new session", timeout=20)
            admin.execute("INSERT INTO item VALUES (%s, 'after')", [rows + 1])
            await until(lambda: rows + 1 in seen, "the row after the transaction", timeout=30)
        finally:
            go.set()
            await app.stop()
        assert set(seen) == set(range(1, rows + 2))
        assert len(seen) > rows + 1, "the loss did not cut the transaction: nothing was tested"
        assert seen.count(rows + 1) == 1
        by_id: dict[str, int] = {}
        for event_id, pk in zip(ids, seen):
            assert by_id.setdefault(event_id, pk) == pk, "one id, two rows"
        assert len(by_id) == rows + 1
        tail = seen[len(seen) - rows - 1:]  # the last pass is the whole transaction, in order
        assert tail == list(range(1, rows + 2))

    run(scenario(), timeout=120)
