"""Large transactions flow through in batches, acknowledged after the last one."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from support import Recorder, collecting, run
from walex import Event, Events
from walex.lsn import parse_lsn


def test_large_transaction_arrives_in_batches_and_is_acked_after_the_last(
    dsn: str, admin: psycopg.Connection
) -> None:
    admin.execute("CREATE TABLE big (id int PRIMARY KEY, v text)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE big")
    release = asyncio.Event()
    batches: list[list[Event]] = []
    events = Events()

    @events.on_insert("big")
    async def slow(batch: list[Event]) -> None:
        batches.append(batch)
        if len(batches) == 3:
            await release.wait()  # hold the third batch

    async def main() -> None:
        async with collecting(dsn, subscriptions=["big"], modules=[events], batch_size=1000,
                              max_pending_transactions=2, status_interval=0.2) as rec:
            admin.execute("INSERT INTO big SELECT g, 'row ' || g FROM generate_series(1, 4500) g")
            for _ in range(200):
                if len(batches) >= 3:
                    break
                await asyncio.sleep(0.05)
            assert len(batches) == 3
            await asyncio.sleep(0.5)  # status updates go out meanwhile
            commit_lsn = parse_lsn(batches[0][0].lsn)
            assert rec.app.ack.flushed <= commit_lsn  # nothing of it acknowledged yet
            slot = admin.execute(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
                (rec.app.slot_name,)).fetchone()
            assert parse_lsn(slot[0]) <= commit_lsn
            release.set()
            got = await rec.wait_for(4500, timeout=30)
            for _ in range(100):
                if rec.app.ack.flushed > commit_lsn:
                    break
                await asyncio.sleep(0.05)
            assert rec.app.ack.flushed > commit_lsn
        assert [len(b) for b in batches] == [1000, 1000, 1000, 1000, 500]
        flat = [e for b in batches for e in b]
        assert [e.new_record["id"] for e in flat] == list(range(1, 4501))
        prefix = flat[0].id.split("-")[0]
        assert [e.id for e in flat] == [f"{prefix}-{i:08X}" for i in range(4500)]
        assert [e.id for e in got] == [e.id for e in flat]

    run(main())


def test_streamed_transaction_spills_to_disk_and_matches_the_whole_one(
    dsn: str, admin: psycopg.Connection
) -> None:
    admin.execute("CREATE TABLE s (id int PRIMARY KEY, v text)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE s")
    # small enough that the server streams the transaction while it is in progress
    admin.execute(f"ALTER DATABASE {admin.info.dbname} SET logical_decoding_work_mem = '64kB'")

    async def main() -> tuple[Recorder, Recorder, int]:
        async with collecting(dsn, subscriptions=["s"], name="spill_streamed", streaming=True,
                              batch_size=300) as streamed, \
                collecting(dsn, subscriptions=["s"], name="spill_whole") as whole:
            with admin.transaction():
                admin.execute("INSERT INTO s SELECT g, repeat('x', 100) FROM generate_series(1, 3000) g")
                admin.execute("SAVEPOINT a")
                admin.execute("INSERT INTO s SELECT g, 'gone' FROM generate_series(3001, 4000) g")
                admin.execute("ROLLBACK TO SAVEPOINT a")
                admin.execute("UPDATE s SET v = 'changed' WHERE id <= 500")
            await streamed.wait_for(3500, timeout=30)
            await whole.wait_for(3500, timeout=30)
            spilled = streamed.app.pipeline.assembler.spilled_events
        return streamed, whole, spilled

    streamed, whole, spilled = run(main())
    assert spilled >= 3000  # most of it was held on disk, not in memory
    assert [e.id for e in streamed.events] == [e.id for e in whole.events]
    assert [e.new_record for e in streamed.events] == [e.new_record for e in whole.events]
    assert max(len(c.events) for c in streamed.calls) <= 300
    assert not any(e.new_record["v"] == "gone" for e in streamed.events)


def test_gc_freeze_option_freezes_what_lives_at_start(dsn: str, admin: psycopg.Connection) -> None:
    import gc

    admin.execute("CREATE TABLE g (id int PRIMARY KEY)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE g")

    async def main() -> int:
        gc.unfreeze()
        async with collecting(dsn, subscriptions=["g"], gc_freeze=True) as rec:
            frozen = gc.get_freeze_count()
            admin.execute("INSERT INTO g VALUES (1)")
            await rec.wait_for(1)
        return frozen

    try:
        assert run(main()) > 1000  # modules, settings, connections: out of every full collection
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("setting", [None, 0, 25_000])
def test_gc_threshold_raised_while_streaming_and_restored_at_stop(
    dsn: str, admin: psycopg.Connection, setting: int | None
) -> None:
    import gc

    admin.execute("CREATE TABLE g (id int PRIMARY KEY)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE g")
    options = {} if setting is None else {"gc_threshold": setting}
    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)

    async def main() -> tuple[int, int, int]:
        async with collecting(dsn, subscriptions=["g"], **options) as rec:
            admin.execute("INSERT INTO g VALUES (1)")
            await rec.wait_for(1)
            return gc.get_threshold()

    try:
        streaming = run(main())
        assert gc.get_threshold() == (700, 10, 10)
    finally:
        gc.set_threshold(*before)
    assert streaming == ({None: 100_000, 0: 700}.get(setting, setting), 10, 10)  # type: ignore[arg-type]
