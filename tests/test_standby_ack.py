"""Standby fence and acknowledgements: an instance that lost its standby lock acknowledges
nothing it had not handled, whatever its acknowledger and reader see meanwhile."""

from __future__ import annotations

import asyncio
import threading

import psycopg
import pytest

from support import run, until
from walex import Events, WalEx
from walex.lsn import parse_lsn


def _confirmed(admin: psycopg.Connection, slot: str) -> int:
    row = admin.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots "
                        "WHERE slot_name = %s", [slot]).fetchone()
    assert row is not None and row[0] is not None
    return parse_lsn(row[0])


def _insert(admin: psycopg.Connection, pks: range) -> list[int]:
    """One autocommit transaction per row of ``item``; the WAL position after each."""
    ends = []
    for pk in pks:
        admin.execute("INSERT INTO item VALUES (%s)", [pk])
        ends.append(parse_lsn(admin.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]))
    return ends


def test_an_instance_that_lost_its_lock_acknowledges_nothing_it_dropped(
    dsn: str, admin: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """``standby=True``; rows 2..5 queued behind a call holding row 1, and the keepalive
    the walsender sends once it has caught up received meanwhile. The standby lock's
    connection is terminated: the instance abandons the queue. While the abandoned call
    still runs (the slot stays with this instance), no status update may confirm past
    row 1 (on main the acknowledger confirmed the keepalive's WAL end, since nothing was
    in flight any more: rows 2..5 were never delivered again, to anyone). Once the call
    returns and the lock is taken again, every row is delivered."""
    admin.execute("CREATE TABLE item (id int PRIMARY KEY)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE item")
    slot = "fence_ack_slot"
    started, go = threading.Event(), threading.Event()
    seen: list[int] = []
    events = Events()

    @events.on_insert("item")
    def record(batch):  # type: ignore[no-untyped-def]
        started.set()
        go.wait(30)  # the first call holds the handlers' thread until the test lets it go
        seen.extend(e.new_record["id"] for e in batch)

    async def scenario() -> None:
        app = WalEx(dsn, publication="pub", modules=[events], name="fence_ack",
                    durable_slot=True, slot_name=slot, standby=True, status_interval=0.2)
        await app.start()
        try:
            ack = app.pipeline.ack
            ends = _insert(admin, range(1, 2))
            await until(started.is_set, "the first call")
            ends += _insert(admin, range(2, 6))
            await until(lambda: app.pipeline.queue.qsize() >= 4, "rows 2..5 queued")
            await until(lambda: ack.after_flight >= ends[-1] or ack.flushed >= ends[-1],
                        "the walsender's keepalive after the last row")
            before = _confirmed(admin, slot)
            assert before < ends[0], "row 1 acknowledged while its call runs"
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE "
                          "locktype = 'advisory' AND granted AND database = "
                          "(SELECT oid FROM pg_database WHERE datname = current_database())")
            await until(lambda: app.pipeline.abandoning, "the instance abandoning", timeout=15)
            await asyncio.sleep(1.5)  # many status intervals while the abandoned call runs
            confirmed = _confirmed(admin, slot)
            assert confirmed < ends[0], (
                f"the slot was confirmed at {confirmed:X}, past rows never handled "
                f"(row 1 ends at {ends[0]:X}, row 5 at {ends[-1]:X})")
            go.set()
            await until(lambda: set(seen) >= {1, 2, 3, 4, 5}, "every row handled", timeout=30)
        finally:
            go.set()
            await app.stop()

    with caplog.at_level("INFO", logger="walex"):
        run(scenario(), timeout=90)
    assert "lost its standby lock" in caplog.text

