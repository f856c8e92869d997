"""A backfill whose chunk key changes type, collation or definition mid-job (walex.backfill):
the job starts over from the first row, never ``done`` with rows skipped, never a raw
"cached plan must not change result type"."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from support import collecting, run, until
from walex import Event, Events, EventType, WalEx
from walex.backfill import chunks as backfill_chunks  # the runner imports read_chunk on use


def _migrating(monkeypatch: pytest.MonkeyPatch, admin: psycopg.Connection, at: list[str],
               ddl: str) -> list[Any]:
    """Run ``ddl`` once, just before the chunk after the key ``at`` is read; the calls."""
    real = backfill_chunks.read_chunk
    calls: list[Any] = []

    async def migrating(conn: Any, target: Any, table: Any, adapters: Any, where: Any,
                        after: list[str] | None, limit: Any, **kw: Any) -> Any:
        calls.append(after)
        if after == at and calls.count(at) == 1:
            admin.execute(ddl)
        return await real(conn, target, table, adapters, where, after, limit, **kw)

    monkeypatch.setattr(backfill_chunks, "read_chunk", migrating)
    return calls


def test_a_key_changing_type_mid_job_starts_the_job_over(
    dsn: str, admin: psycopg.Connection, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """int -> text: '100' and '3' sort before '30', the last key read; going on after it
    would skip them."""
    admin.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    admin.execute("INSERT INTO t SELECT g, 'v' FROM generate_series(1, 100) g")
    admin.execute("CREATE PUBLICATION pub FOR TABLE t")
    calls = _migrating(monkeypatch, admin, ["30"], "ALTER TABLE t ALTER COLUMN id TYPE text")

    async def main() -> tuple[Any, list[Event]]:
        async with collecting(dsn, subscriptions=["t"], backfill_chunk_size=10) as rec:
            job = await asyncio.wait_for(rec.app.backfill("t"), 60)
            return job, [e for e in rec.events if e.type is EventType.READ]

    with caplog.at_level("WARNING", logger="walex.backfill"):
        job, reads = run(main())
    after_change = [e.new_record["id"] for e in reads if isinstance(e.new_record["id"], str)]
    assert sorted(after_change) == sorted(str(g) for g in range(1, 101))  # every row, once
    assert (job.state, job.rows_done) == ("done", 100)  # counted once, since the restart
    assert calls[:5] == [None, ["10"], ["20"], ["30"], None]  # read again from the first row
    assert any("the key of public.t changed" in r.getMessage() and "starts over" in r.getMessage()
               for r in caplog.records)


def test_a_key_changing_collation_mid_job_starts_the_job_over(
    dsn: str, admin: psycopg.Connection, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The collation decides the key's order: with ICU, "C" -> "und-x-icu" puts 'a' before
    'B'; without it, "C" -> "C.utf8" orders alike but is a change all the same."""
    icu = admin.execute("SELECT count(*) FROM pg_collation WHERE collname = 'und-x-icu'").fetchone()[0]
    collation = "und-x-icu" if icu else "C.utf8"
    admin.execute('CREATE TABLE t (code text COLLATE "C" PRIMARY KEY, v text)')
    admin.execute("INSERT INTO t SELECT chr(g), 'v' FROM generate_series(65, 90) g")  # A-Z
    admin.execute("INSERT INTO t SELECT chr(g), 'v' FROM generate_series(97, 122) g")  # a-z
    admin.execute("CREATE PUBLICATION pub FOR TABLE t")
    calls = _migrating(monkeypatch, admin, ["J"],
                       f'ALTER TABLE t ALTER COLUMN code TYPE text COLLATE "{collation}"')

    async def main() -> tuple[Any, list[Event]]:
        async with collecting(dsn, subscriptions=["t"], backfill_chunk_size=10) as rec:
            job = await asyncio.wait_for(rec.app.backfill("t"), 60)
            return job, [e for e in rec.events if e.type is EventType.READ]

    job, reads = run(main())
    codes = [e.new_record["code"] for e in reads]
    assert codes[:10] == list("ABCDEFGHIJ")  # the first chunk, in "C" order
    assert sorted(codes[10:]) == sorted(chr(g) for g in [*range(65, 91), *range(97, 123)])
    assert calls.count(None) == 2  # read again from the first row
    assert (job.state, job.rows_done) == ("done", 52)


def test_a_key_that_changed_type_while_the_app_was_stopped_starts_over_at_resume(
    dsn: str, admin: psycopg.Connection,
) -> None:
    """The stored progress records the key's type: a resume after the change would go on
    after, say, '400' in text order and skip the rows 1000 to 2999."""
    admin.execute("CREATE TABLE t (id int PRIMARY KEY)")
    admin.execute("INSERT INTO t SELECT g FROM generate_series(1, 3000) g")
    admin.execute("CREATE PUBLICATION pub FOR TABLE t")
    seen: list[Any] = []
    slow = Events()

    @slow.on_read("t")
    async def record(events: list[Event]) -> None:
        seen.extend(e.new_record["id"] for e in events)
        await asyncio.sleep(0.05)

    def app() -> WalEx:
        return WalEx(dsn, publication="pub", name="keyresume", durable_slot=True,
                     backfill_chunk_size=100, batch_size=50, modules=[slow])

    def state() -> tuple[str, list[str] | None]:
        if not admin.execute("SELECT to_regclass('walex_backfill') IS NOT NULL").fetchone()[0]:
            return "", None
        return admin.execute("SELECT state, last_key FROM walex_backfill").fetchone() or ("", None)

    async def main() -> None:
        first = app()
        async with first:
            waiting = asyncio.create_task(first.backfill("t"))
            await until(lambda: int((state()[1] or ["0"])[0]) >= 300, "some chunks marked done")
        with pytest.raises(Exception):
            await waiting
        assert state()[0] == "running"
        admin.execute("ALTER TABLE t ALTER COLUMN id TYPE text")
        second = app()
        async with second:
            await until(lambda: state()[0] == "done", "the backfill after the restart", 60)

    run(main(), timeout=120)
    text_ids = [i for i in seen if isinstance(i, str)]
    assert sorted(text_ids) == sorted(str(g) for g in range(1, 3001))
    assert admin.execute("SELECT rows_done, key_signature FROM walex_backfill").fetchone() == (
        3000, "25:-1:100")  # text, no typmod, the default collation


def test_a_column_changing_type_after_many_chunks_is_read_with_its_new_type(
    dsn: str, admin: psycopg.Connection, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same chunk query text after a column's type changed: a plan cached for it
    must not surface as "cached plan must not change result type"."""
    admin.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    admin.execute("INSERT INTO t SELECT g, repeat('x', g % 7) FROM generate_series(1, 120) g")
    admin.execute("CREATE PUBLICATION pub FOR TABLE t")
    _migrating(monkeypatch, admin, ["80"],
               "ALTER TABLE t ALTER COLUMN v TYPE int USING length(v)")

    async def main() -> tuple[Any, list[Event]]:
        async with collecting(dsn, subscriptions=["t"], backfill_chunk_size=10) as rec:
            job = await asyncio.wait_for(rec.app.backfill("t"), 60)
            return job, [e for e in rec.events if e.type is EventType.READ]

    job, reads = run(main())
    assert job.state == "done" and job.rows_done == 120
    assert [e.new_record for e in reads[80:]] == [{"id": g, "v": g % 7} for g in range(81, 121)]
    assert all(isinstance(e.new_record["v"], str) for e in reads[:80])


def test_a_table_dropped_mid_job_fails_it_naming_the_drop(
    dsn: str, admin: psycopg.Connection, monkeypatch: pytest.MonkeyPatch,
) -> None:
    admin.execute("CREATE TABLE t (id int PRIMARY KEY)")
    admin.execute("INSERT INTO t SELECT g FROM generate_series(1, 50) g")
    admin.execute("CREATE PUBLICATION pub FOR ALL TABLES")
    _migrating(monkeypatch, admin, ["20"], "DROP TABLE t")

    async def main() -> None:
        async with collecting(dsn, subscriptions=["t"], backfill_chunk_size=10) as rec:
            with pytest.raises(Exception, match=r"the backfill of public.t failed: table "
                                                r"'public.t' does not exist \(was it dropped"):
                await asyncio.wait_for(rec.app.backfill("t"), 60)

    run(main())
    state, error = admin.execute("SELECT state, error FROM walex_backfill").fetchone()
    assert state == "failed" and "does not exist (was it dropped or renamed?)" in error


def test_backfill_of_a_partition_parent_published_by_partition_names_the_fix(
    dsn: str, admin: psycopg.Connection,
) -> None:
    admin.execute("CREATE TABLE m (id int PRIMARY KEY, at int) PARTITION BY RANGE (id)")
    admin.execute("CREATE TABLE m_1 PARTITION OF m FOR VALUES FROM (0) TO (100)")
    admin.execute("CREATE TABLE m_2 PARTITION OF m FOR VALUES FROM (100) TO (200)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE m")  # publish_via_partition_root off

    async def main() -> None:
        async with collecting(dsn) as rec:
            with pytest.raises(Exception, match=r"public.m is partitioned and publication 'pub' "
                                                r"publishes its partitions \(public.m_1, public.m_2\)"
                                                r".*publish_via_partition_root = true"):
                await rec.app.backfill("m")
            job = await rec.app.backfill("m_1")
            assert job.state == "done"

    run(main())
