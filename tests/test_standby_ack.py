"""Standby fence: an instance that lost its standby lock acknowledges nothing it had not
handled, keeps its slot until its abandoned calls ended, and a standby notices a silent
network within its query timeout."""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from support import run, until
from walex import Events, WalEx
from walex.errors import ReplicationError
from walex.lsn import parse_lsn

sys.path.insert(0, str(Path(__file__).parent / "chaos"))
from proxy import Proxy  # noqa: E402


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



def test_a_lock_lost_while_draining_after_a_lost_walsender_keeps_the_slot_until_the_call_ends(
    dsn: str, admin: psycopg.Connection
) -> None:
    """Two apps on one slot with ``standby=True``. The active one (a) has rows 3..5 queued
    behind a long call holding row 2 when its walsender is terminated: still holding the
    lock, it drains. Then its lock's connection is terminated too: it abandons. Its slot
    must stay held until the abandoned call returned, so the standby (b) starts handling
    only after it (on main a released the slot at once and b handled row 2 while a's call
    on it still ran: two instances at once)."""
    admin.execute("CREATE TABLE item (id int PRIMARY KEY)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE item")
    slot = "drain_race_slot"
    started, go = threading.Event(), threading.Event()
    calls: list[tuple[str, int, float, float]] = []  # app, first id, start, end

    def module(label: str) -> Events:
        events = Events()

        @events.on_insert("item")
        def record(batch):  # type: ignore[no-untyped-def]
            begin = time.monotonic()
            if label == "a" and batch[0].new_record["id"] == 2:
                started.set()
                go.wait(30)  # the long call
            calls.append((label, batch[0].new_record["id"], begin, time.monotonic()))

        return events

    def options(label: str) -> dict[str, object]:
        return {"publication": "pub", "modules": [module(label)], "name": f"drain_race_{label}",
                "durable_slot": True, "slot_name": slot, "standby": True,
                "status_interval": 0.2}

    async def scenario() -> None:
        a, b = WalEx(dsn, **options("a")), WalEx(dsn, **options("b"))
        await a.start()
        b_start = asyncio.create_task(b.start())
        try:
            await until(lambda: b.pipeline.stats.standby, "b standing by")
            _insert(admin, range(1, 2))
            await until(lambda: any(c[1] == 1 for c in calls), "row 1 handled by a")
            _insert(admin, range(2, 6))
            await until(started.is_set, "a's long call on row 2")
            await until(lambda: a.pipeline.queue.qsize() >= 3, "rows 3..5 queued in a")
            admin.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                          "WHERE slot_name = %s", [slot])
            # a checked its lock and took its slot back, its queue kept (on main it drained
            # the queue first, the slot free meanwhile)
            await until(lambda: a.pipeline.sessions >= 2 and a.pipeline.repl is not None
                        and a.pipeline.repl.streaming, "a streaming again")
            assert a.pipeline.queue.qsize() >= 3 and not a.pipeline.abandoning
            holder = a.pipeline.fence.conn.pgconn.backend_pid  # type: ignore[union-attr]
            admin.execute("SELECT pg_terminate_backend(%s)", [holder])
            await until(lambda: a.pipeline.abandoning, "a abandoning")
            await asyncio.sleep(4.0)  # b polls the lock and the slot meanwhile
            assert not [c for c in calls if c[0] == "b"], f"b handled while a's call ran: {calls}"
            go.set()
            long_end = time.monotonic()
            await until(lambda: {c[1] for c in calls if c[2] > long_end} >= {2, 3, 4, 5},
                        "rows 2..5 handled again", timeout=30)
        finally:
            go.set()
            await a.stop()
            await b.stop()
            await asyncio.gather(b_start, return_exceptions=True)
        ended = next(c[3] for c in calls if c[0] == "a" and c[1] == 2)
        began_b = min(c[2] for c in calls if c[0] == "b")
        assert began_b >= ended, calls

    run(scenario(), timeout=120)


def test_an_async_handler_finishing_after_its_cancellation_keeps_the_slot_until_it_ends(
    dsn: str, admin: psycopg.Connection
) -> None:
    """Two apps on one slot with ``standby=True``; the active one's (a) async handler, when
    cancelled, finishes its write first (2 s, as one shielding its critical section does).
    a's lock connection is terminated while the handler runs: a abandons and cancels the
    call. The slot must stay held by a until the handler's coroutine has ended, so the
    standby (b) handles nothing before (on main a released the slot as soon as its
    handlers' thread was idle, and b handled row 1 while a's handler still wrote it)."""
    admin.execute("CREATE TABLE item (id int PRIMARY KEY)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE item")
    slot = "async_fence_slot"
    started = asyncio.Event()
    calls: list[tuple[str, int, float, float]] = []  # app, first id, start, end

    def module(label: str) -> Events:
        events = Events()

        @events.on_insert("item")
        async def record(batch):  # type: ignore[no-untyped-def]
            begin = time.monotonic()
            if label == "a":
                started.set()
                try:
                    await asyncio.sleep(30)
                except asyncio.CancelledError:
                    await asyncio.shield(asyncio.sleep(2.0))  # the write it finishes first
                    calls.append((label, batch[0].new_record["id"], begin, time.monotonic()))
                    raise
            calls.append((label, batch[0].new_record["id"], begin, time.monotonic()))

        return events

    def options(label: str) -> dict[str, object]:
        return {"publication": "pub", "modules": [module(label)], "name": f"async_fence_{label}",
                "durable_slot": True, "slot_name": slot, "standby": True,
                "status_interval": 0.2}

    async def scenario() -> None:
        a, b = WalEx(dsn, **options("a")), WalEx(dsn, **options("b"))
        await a.start()
        b_start = asyncio.create_task(b.start())
        try:
            await until(lambda: b.pipeline.stats.standby, "b standing by")
            _insert(admin, range(1, 2))
            await until(started.is_set, "a's call on row 1")
            holder = a.pipeline.fence.conn.pgconn.backend_pid  # type: ignore[union-attr]
            admin.execute("SELECT pg_terminate_backend(%s)", [holder])
            await until(lambda: any(c[0] == "b" for c in calls), "b handling row 1",
                        timeout=30)
            await until(lambda: any(c[0] == "a" for c in calls), "a's call ending")
        finally:
            await a.stop()
            await b.stop()
            await asyncio.gather(b_start, return_exceptions=True)
        ended = next(c[3] for c in calls if c[0] == "a")
        began_b = min(c[2] for c in calls if c[0] == "b")
        assert began_b >= ended, f"b began {ended - began_b:.2f}s before a's call ended: {calls}"

    run(scenario(), timeout=90)


def test_a_standby_waiting_for_the_slot_notices_a_silent_network_within_its_query_timeout(
    dsn: str, admin: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """b holds the lock and polls the slot, which a (abandoning, its call in hand) still
    holds; b's network goes silent. Its poll must fail within the standby's query timeout
    (5 s) plus a connect, as the lock's queries do: on main it waited for the lookup
    connection's 30 s and two more 10 s connects (~61 s)."""
    admin.execute("CREATE TABLE item (id int PRIMARY KEY)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE item")
    slot = "silent_wait_slot"
    params = conninfo_to_dict(dsn)
    proxy = Proxy(str(params.get("host") or "127.0.0.1"), int(params["port"])).start()
    via = make_conninfo(dsn, host="127.0.0.1", port=proxy.port)
    started, go = threading.Event(), threading.Event()
    events = Events()

    @events.on_insert("item")
    def record(batch):  # type: ignore[no-untyped-def]
        started.set()
        go.wait(60)  # a's call: a keeps the slot while it runs

    def options(label: str) -> dict[str, object]:
        return {"publication": "pub", "modules": [events if label == "a" else Events()],
                "name": f"silent_wait_{label}", "durable_slot": True, "slot_name": slot,
                "standby": True, "status_interval": 0.2}

    def polling() -> bool:  # b holds the lock and polls the slot a still holds
        return admin.execute(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND "
            "a.application_name = 'silent_wait_b'").fetchone() == (1,)

    async def scenario() -> float:
        a, b = WalEx(dsn, **options("a")), WalEx(via, **options("b"))
        await a.start()
        b_start = asyncio.create_task(b.start())
        try:
            await until(lambda: b.pipeline.stats.standby, "b standing by")
            _insert(admin, range(1, 2))
            await until(started.is_set, "a's call")
            holder = a.pipeline.fence.conn.pgconn.backend_pid  # type: ignore[union-attr]
            admin.execute("SELECT pg_terminate_backend(%s)", [holder])
            await until(polling, "b holding the lock, waiting for the slot")
            await asyncio.sleep(1.0)
            began = time.monotonic()
            proxy.partition()
            await until(lambda: "retrying in" in caplog.text, "b noticing the silence",
                        timeout=45)
            return time.monotonic() - began
        finally:
            go.set()
            proxy.heal()
            await a.stop()
            await b.stop()
            await asyncio.gather(b_start, return_exceptions=True)

    try:
        with caplog.at_level("INFO", logger="walex"):
            noticed = run(scenario(), timeout=120)
    finally:
        proxy.stop()
    assert noticed < 20, noticed


def test_a_standby_keeps_trying_past_1024_failed_attempts(dsn: str) -> None:
    """reconnect_max_attempts above 1024 (keep trying) with the server unreachable: the
    standby's wait gives up after them with its ReplicationError; on main the backoff of the
    1025th attempt (0.2 * 2**1024 as a float) raised OverflowError."""
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dead = make_conninfo(dsn, port=port, connect_timeout=1)

    async def scenario() -> None:
        app = WalEx(dead, publication="pub", modules=[Events()], name="many_tries",
                    durable_slot=True, standby=True, reconnect_max_attempts=1100,
                    reconnect_backoff_max=0.0001)
        with pytest.raises(ReplicationError, match="after 1100 failed attempts"):
            await app.start()

    run(scenario(), timeout=90)


def test_a_lock_lost_while_reconnecting_abandons_the_queue_it_kept(
    dsn: str, admin: psycopg.Connection
) -> None:
    """Two apps on one slot with ``standby=True``. a's walsender is terminated while rows
    3..5 are queued behind its long call on row 2: a checks its lock and reconnects, keeping
    its queue. Its lock's connection is terminated during the reconnect's pause, so the
    reconnect finds the lock gone: a must abandon the queue at once (without hold()'s
    abandon, a would go on handling rows 3..5 from it while not holding the lock, as b
    could take it and the slot), and rows 2..5 come again to the next holder."""
    admin.execute("CREATE TABLE item (id int PRIMARY KEY)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE item")
    slot = "reconnect_lock_slot"
    started, go = threading.Event(), threading.Event()
    calls: list[tuple[str, int]] = []

    def module(label: str) -> Events:
        events = Events()

        @events.on_insert("item")
        def record(batch):  # type: ignore[no-untyped-def]
            if label == "a" and batch[0].new_record["id"] == 2:
                started.set()
                go.wait(30)
            calls.extend((label, e.new_record["id"]) for e in batch)

        return events

    def options(label: str) -> dict[str, object]:
        return {"publication": "pub", "modules": [module(label)], "name": f"reconnect_lock_{label}",
                "durable_slot": True, "slot_name": slot, "standby": True,
                "status_interval": 0.2, "reconnect_backoff_max": 1.0}

    async def scenario() -> None:
        a, b = WalEx(dsn, **options("a")), WalEx(dsn, **options("b"))
        await a.start()
        b_start = asyncio.create_task(b.start())
        try:
            await until(lambda: b.pipeline.stats.standby, "b standing by")
            _insert(admin, range(1, 2))
            await until(lambda: ("a", 1) in calls, "row 1 handled by a")
            _insert(admin, range(2, 6))
            await until(started.is_set, "a's long call on row 2")
            await until(lambda: a.pipeline.queue.qsize() >= 3, "rows 3..5 queued in a")
            holder = a.pipeline.fence.conn.pgconn.backend_pid  # type: ignore[union-attr]
            admin.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                          "WHERE slot_name = %s", [slot])
            await until(lambda: a.pipeline.repl is None, "a between two sessions")
            admin.execute("SELECT pg_terminate_backend(%s)", [holder])
            await until(lambda: a.pipeline.abandoning, "a abandoning its queue")
            assert a.pipeline.queue.qsize() == 0
            dropped = len(calls)
            go.set()
            # whichever takes the lock next (a once its call ended, or b) has them again
            await until(lambda: {i for _, i in calls[dropped:]} >= {2, 3, 4, 5},
                        "rows 2..5 handled again", timeout=30)
        finally:
            go.set()
            await a.stop()
            await b.stop()
            await asyncio.gather(b_start, return_exceptions=True)

    run(scenario(), timeout=120)
