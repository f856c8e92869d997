"""Slots over time: idle acknowledgement, heartbeat, failover, invalidation, temporary gaps
(after a reconnect, at a stop after a failure), a slot held by another consumer."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pytest

from support import collecting, run, until
from walex import Event, Events, HandlerError, SlotInUseError, SlotLostError, WalEx
from walex import errors as walex_errors
from walex.embedded import Cluster
from walex.lsn import format_lsn, parse_lsn


def _slot(admin: psycopg.Connection, name: str) -> tuple[int, bool]:
    row = admin.execute(
        "SELECT confirmed_flush_lsn::text, active FROM pg_replication_slots WHERE slot_name = %s",
        (name,)).fetchone()
    assert row is not None, f"no slot {name}"
    return parse_lsn(row[0]), row[1]


def _wal(admin: psycopg.Connection) -> int:
    return parse_lsn(admin.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0])


def test_writes_to_unpublished_tables_do_not_hold_wal(dsn: str, admin: psycopg.Connection) -> None:
    admin.execute("CREATE TABLE published (id int PRIMARY KEY)")
    admin.execute("CREATE TABLE unpublished (id int, pad text)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE published")

    async def main() -> tuple[int, int]:
        async with collecting(dsn, subscriptions=["published"], status_interval=0.2) as rec:
            admin.execute("INSERT INTO unpublished SELECT g, repeat('x', 500) FROM generate_series(1, 40000) g")
            written = _wal(admin)
            deadline = time.monotonic() + 20
            while _slot(admin, rec.app.slot_name)[0] < written and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            return _slot(admin, rec.app.slot_name)[0], written

    confirmed, written = run(main())
    assert written > 20_000_000  # ~20 MB of WAL that no handler ever saw
    assert confirmed >= written  # acknowledged through keepalives: the slot holds nothing


def test_heartbeat_moves_a_quiet_slot(dsn: str, admin: psycopg.Connection) -> None:
    admin.execute("CREATE TABLE t (id int PRIMARY KEY)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE t")

    async def main() -> list[int]:
        async with collecting(dsn, subscriptions=["t"], status_interval=0.2,
                              heartbeat_interval=0.2) as rec:
            seen = []
            for _ in range(4):
                await asyncio.sleep(0.7)
                seen.append(_slot(admin, rec.app.slot_name)[0])
            return seen

    seen = run(main())
    assert seen == sorted(seen) and seen[-1] > seen[0]  # nobody else writes: only the heartbeat


def test_failover_slot(pg_cluster: Any, dsn: str, admin: psycopg.Connection) -> None:
    admin.execute("CREATE TABLE t (id int PRIMARY KEY)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE t")

    async def main() -> None:
        app = WalEx(dsn, publication="pub", name="failover_app", durable_slot=True, failover=True)
        async with app:
            row = admin.execute("SELECT failover FROM pg_replication_slots WHERE slot_name = %s",
                                (app.slot_name,)).fetchone()
            assert row == (True,)

    if pg_cluster.major_version < 17:
        with pytest.raises(Exception, match="failover slots need PostgreSQL 17"):
            run(main())
    else:
        run(main())


def test_temporary_slot_gap_is_reported_after_a_reconnect(dsn: str, admin: psycopg.Connection) -> None:
    admin.execute("CREATE TABLE t (id int PRIMARY KEY)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE t")

    async def main() -> list[str]:
        async with collecting(dsn, subscriptions=["t"], status_interval=0.2) as rec:
            admin.execute("INSERT INTO t VALUES (1)")
            await rec.wait_for(1)
            admin.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                          "WHERE slot_name = %s", (rec.app.slot_name,))
            deadline = time.monotonic() + 20
            while rec.app.pipeline.sessions < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            admin.execute("INSERT INTO t VALUES (2)")
            await rec.wait_for(2)
            return list(rec.app.gaps)

    gaps = run(main())
    assert len(gaps) == 1 and "temporary slot" in gaps[0] and "durable_slot=True" in gaps[0]


def test_invalidated_slot_fails_loudly_and_recreation_is_opt_in() -> None:
    with Cluster(settings={"max_slot_wal_keep_size": "1MB", "wal_keep_size": "0",
                           "max_wal_size": "32MB", "min_wal_size": "32MB"}) as cluster:
        dsn = cluster.dsn("postgres")
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute("CREATE TABLE t (id int PRIMARY KEY, pad text)")
            admin.execute("CREATE PUBLICATION pub FOR TABLE t")
            admin.execute("SELECT pg_create_logical_replication_slot('lost_slot', 'pgoutput')")
            for _ in range(100):  # write WAL past max_slot_wal_keep_size, until invalidated
                admin.execute("INSERT INTO t SELECT g, repeat(md5(random()::text), 300) "
                              "FROM generate_series(1, 200) g ON CONFLICT DO NOTHING")
                admin.execute("SELECT pg_switch_wal()")
                admin.execute("CHECKPOINT")
                status = admin.execute("SELECT wal_status FROM pg_replication_slots "
                                       "WHERE slot_name = 'lost_slot'").fetchone()[0]
                if status == "lost":
                    break
            assert status == "lost"

            async def start(**options: Any) -> WalEx:
                app = WalEx(dsn, publication="pub", name="lost", durable_slot=True,
                            slot_name="lost_slot", **options)
                await app.start()
                return app

            with pytest.raises(SlotLostError, match="invalidated.*recreate_lost_slot=True"):
                run(start())

            async def recreate() -> list[str]:
                app = await start(recreate_lost_slot=True)
                try:
                    return list(app.gaps)
                finally:
                    await app.stop()

            gaps = run(recreate())
            assert len(gaps) == 1 and "lost_slot" in gaps[0]
            assert admin.execute("SELECT wal_status FROM pg_replication_slots "
                                 "WHERE slot_name = 'lost_slot'").fetchone()[0] != "lost"


def test_slot_held_by_another_consumer_is_waited_for_the_whole_timeout(
    dsn: str, admin: psycopg.Connection
) -> None:
    admin.execute("CREATE TABLE t (id int PRIMARY KEY)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE t")

    async def main() -> tuple[float, str, tuple[Any, ...]]:
        async with collecting(dsn, subscriptions=["t"], name="slot_holder", durable_slot=True,
                              slot_name="busy_slot"):
            # the holder's connections carry its name, so an operator can find it
            holder = admin.execute("SELECT pid, client_addr::text, application_name "
                                   "FROM pg_stat_replication").fetchone()
            waiter = WalEx(dsn, publication="pub", subscriptions=["t"], name="slot_waiter",
                           durable_slot=True, slot_name="busy_slot", slot_wait_timeout=3)
            began = time.monotonic()
            with pytest.raises(SlotInUseError) as info:
                await waiter.start()
            return time.monotonic() - began, str(info.value), holder

    waited, message, (pid, addr, app_name) = run(main())
    assert app_name == "slot_holder"
    assert 3 <= waited < 3 + 5  # the whole slot_wait_timeout, not half of it
    assert f"in use by PostgreSQL process {pid}, the walsender streaming it to another consumer " \
           f"(client {addr}:" in message
    assert "application_name 'slot_holder'" in message and "stayed so for 3s" in message
    assert f"FROM pg_stat_replication WHERE pid = {pid};" in message


def failing_on(row: int) -> tuple[Events, list[int]]:
    """A module whose handler records ids and raises on ``row``."""
    events, seen = Events(), []

    @events.on_insert("t")
    def handle(items: list[Event]) -> None:
        seen.extend(e.new_record["id"] for e in items)
        if any(e.new_record["id"] == row for e in items):
            raise RuntimeError(f"row {row}")

    return events, seen


@pytest.mark.parametrize("durable", [False, True])
def test_stop_after_a_failure_loses_the_transaction_only_on_a_temporary_slot(
    dsn: str, admin: psycopg.Connection, durable: bool, caplog: pytest.LogCaptureFixture
) -> None:
    admin.execute("CREATE TABLE t (id int PRIMARY KEY)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE t")
    options: dict[str, Any] = dict(publication="pub", subscriptions=["t"], max_retries=0,
                                   durable_slot=durable, slot_name="stop_gap" if durable else None)

    async def main() -> tuple[list[str], int, list[int]]:
        events, seen = failing_on(2)
        app = WalEx(dsn, name="stop_gap_1", modules=[events], **options)
        await app.start()
        admin.execute("INSERT INTO t VALUES (1)")
        await until(lambda: app.transactions_handled == 1, "the first transaction")
        handled = app.ack.flushed
        admin.execute("INSERT INTO t VALUES (2)")
        with pytest.raises(HandlerError, match="row 2"):
            await asyncio.wait_for(app.wait(), 15)
        assert seen == [1, 2]
        admin.execute("INSERT INTO t VALUES (3)")  # committed while stopped
        events, seen = failing_on(0)
        again = WalEx(dsn, name="stop_gap_2", modules=[events], **options)
        async with again:
            admin.execute("INSERT INTO t VALUES (4)")
            await until(lambda: 4 in seen, "the row inserted after the restart")
        return app.gaps, handled, seen

    with caplog.at_level("ERROR", logger="walex"):
        gaps, handled, seen = run(main())
    if durable:  # the next start resumes at the failed transaction
        assert (gaps, seen) == ([], [2, 3, 4])
        return
    assert seen == [4]  # the failed transaction and what was committed while stopped are gone
    [gap] = gaps
    assert gap in caplog.text  # logged as an error, too
    assert "'stop_gap_1' stopped after a failure, and its temporary slot" in gap
    assert f"the changes committed after {format_lsn(handled)} " in gap
    assert "durable_slot=True" in gap


def test_clean_stop_of_a_temporary_slot_reports_no_gap(dsn: str, admin: psycopg.Connection) -> None:
    admin.execute("CREATE TABLE t (id int PRIMARY KEY)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE t")

    async def main() -> list[str]:
        async with collecting(dsn, subscriptions=["t"]) as rec:
            admin.execute("INSERT INTO t VALUES (1)")
            await rec.wait_for(1)
            app = rec.app
        assert app is not None
        await app.start()  # the same app again: what was committed meanwhile is not a gap either
        await app.stop()
        return app.gaps

    assert run(main()) == []


@pytest.mark.parametrize("durable", [True, False])
def test_slot_creation_held_by_an_open_transaction_times_out_with_the_holder(
        dsn: str, admin: psycopg.Connection, durable: bool) -> None:
    """CREATE_REPLICATION_SLOT waits for a transaction that has written: bounded by
    slot_create_timeout, the error names the holder and the fix, the creation is cancelled
    (no slot left), and once the transaction ends walex starts."""
    admin.execute("CREATE TABLE a (id int PRIMARY KEY)")
    admin.execute("CREATE PUBLICATION pub FOR ALL TABLES")
    name = f"held_{'durable' if durable else 'temp'}"
    blocker = psycopg.connect(dsn, application_name="the_blocker")
    try:
        blocker.execute("INSERT INTO a VALUES (1)")  # a transaction with an xid, left open
        pid = blocker.info.backend_pid

        async def fails() -> BaseException:
            app = WalEx(dsn, publication="pub", name=name, durable_slot=durable,
                        slot_create_timeout=2)
            started = time.monotonic()
            with pytest.raises(walex_errors.ReplicationError) as info:
                await asyncio.wait_for(app.start(), 60)
            assert time.monotonic() - started < 30
            return info.value

        message = str(run(fails(), timeout=90))
        assert "did not finish within 2s (slot_create_timeout)" in message, message
        assert f"pid {pid} (application_name 'the_blocker'" in message, message
        assert f"SELECT pg_terminate_backend({pid})" in message
        assert "no slot was left behind" in message, message
        assert admin.execute("SELECT count(*) FROM pg_replication_slots").fetchone() == (0,)
        blocker.commit()

        async def starts() -> None:
            async with collecting(dsn, name=name, durable_slot=durable,
                                  slot_create_timeout=10) as rec:
                admin.execute("INSERT INTO a VALUES (2)")
                [event] = await rec.wait_for(1)
                assert event.new_record == {"id": 2}

        run(starts(), timeout=90)
    finally:
        blocker.close()
        if durable:
            admin.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                          "WHERE slot_name = %s", (name,))
