"""Backfill limits and control (walex.backfill): memory bounded by max_pending_bytes with
wide rows, backoff reset by progress, cancelling (app.cancel_backfill, walex backfill
--cancel), two first requests at once, rows_done counting read events once."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from support import collecting, run, until
from walex import Event, Events, EventType, WalEx
from walex.backfill import chunks as backfill_chunks  # the runner imports read_chunk on use
from walex.backfill.store import Store
from walex.errors import BackfillCancelledError

WORKER = Path(__file__).with_name("backfill_worker.py")
MiB = 1024 * 1024


def _figures(out: str) -> dict[str, float]:
    return {k: float(v) for k, v in (part.split("=") for part in out.split())}


def test_wide_rows_are_read_in_chunks_cut_by_bytes(
    dsn: str, admin: psycopg.Connection, tmp_path: Path,
) -> None:
    """600 rows of 200 kB (120 MB as text) with a 10,000-row chunk size and a 16 MiB
    budget: read as one chunk they took some 250 MB; cut by bytes, a few budgets."""
    admin.execute("CREATE TABLE wide (id int PRIMARY KEY, payload text)")
    admin.execute("CREATE TABLE narrow (id int PRIMARY KEY, payload text)")
    admin.execute("INSERT INTO wide SELECT g, repeat(md5(g::text), 6250) FROM generate_series(1, 600) g")
    admin.execute("INSERT INTO narrow SELECT g, md5(g::text) FROM generate_series(1, 600) g")
    admin.execute("CREATE PUBLICATION pub FOR TABLE wide, narrow")
    env = {**os.environ, "WALEX_MAX_PENDING_BYTES": "16MiB"}

    def backfill(table: str) -> dict[str, float]:
        proc = subprocess.Popen([sys.executable, str(WORKER), dsn, str(tmp_path / "unused"),
                                 "--request", table, "--count-only", "--chunk", "10000"],
                                stdout=subprocess.PIPE, text=True, env=env)
        try:
            out, _ = proc.communicate(timeout=300)
        finally:
            proc.kill()
        assert proc.returncode == 0, out
        return _figures(out.splitlines()[-1])

    baseline = backfill("narrow")  # the same process reading 600 narrow rows
    large = backfill("wide")
    assert large["reads"] == 600
    grown = (large["peak_kb"] - baseline["peak_kb"]) * 1024
    assert grown < 10 * 16 * MiB, (baseline, large)
    chunks = admin.execute("SELECT chunks_done FROM walex_backfill WHERE table_name = 'wide'").fetchone()[0]
    assert chunks >= 10  # about 20 rows (4 MiB) a chunk


def test_backoff_starts_again_once_the_job_made_progress(
    dsn: str, admin: psycopg.Connection, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The backfill's connection is cut four times, each after some chunks were completed:
    each time the first delay, not one doubling from interruption to interruption."""
    admin.execute("CREATE TABLE t (id int PRIMARY KEY)")
    admin.execute("INSERT INTO t SELECT g FROM generate_series(1, 100) g")
    admin.execute("CREATE PUBLICATION pub FOR TABLE t")
    real = backfill_chunks.read_chunk
    calls: list[Any] = []

    async def cutting(conn: Any, target: Any, table: Any, adapters: Any, where: Any,
                      after: list[str] | None, limit: Any, **kw: Any) -> Any:
        calls.append(after)
        if len(calls) % 3 == 0 and len(calls) <= 12:
            admin.execute("SELECT pg_terminate_backend(%s, 10000)", (conn.info.backend_pid,))
        return await real(conn, target, table, adapters, where, after, limit, **kw)

    monkeypatch.setattr(backfill_chunks, "read_chunk", cutting)

    async def main() -> Any:
        async with collecting(dsn, subscriptions=["t"], backfill_chunk_size=5,
                              reconnect_backoff_max=4) as rec:
            return await asyncio.wait_for(rec.app.backfill("t"), 90)

    with caplog.at_level(logging.WARNING, logger="walex.backfill"):
        job = run(main(), timeout=120)
    assert job.state == "done"
    delays = [m.group(1) for r in caplog.records
              if (m := re.search(r"backfill interrupted .*; resuming in ([0-9.]+)s", r.getMessage()))]
    assert delays == ["1.0"] * 4


def _slow(seen: list[Any], table: str = "t") -> Events:
    events = Events()

    @events.on_read(table)
    async def record(batch: list[Event]) -> None:
        seen.extend(e.new_record["id"] for e in batch)
        await asyncio.sleep(0.05)

    return events


def test_cancel_backfill_stops_a_running_job(dsn: str, admin: psycopg.Connection) -> None:
    admin.execute("CREATE TABLE t (id int PRIMARY KEY)")
    admin.execute("INSERT INTO t SELECT g FROM generate_series(1, 5000) g")
    admin.execute("CREATE TABLE u (id int PRIMARY KEY)")
    admin.execute("INSERT INTO u SELECT g FROM generate_series(1, 10) g")
    admin.execute("CREATE PUBLICATION pub FOR TABLE t, u")
    seen: list[Any] = []

    async def main() -> tuple[Any, Any, Any]:
        app = WalEx(dsn, publication="pub", name="cancels", backfill_chunk_size=100,
                    batch_size=50, modules=[_slow(seen)])
        async with app:
            waiting = asyncio.create_task(app.backfill("t"))
            await until(lambda: len(seen) >= 300, "some rows")
            job = await app.cancel_backfill("t")
            with pytest.raises(BackfillCancelledError, match="the backfill of public.t was cancelled"):
                await asyncio.wait_for(waiting, 30)
            other = await asyncio.wait_for(app.backfill("u"), 60)  # the runner is free again
            nothing = await app.cancel_backfill("t")
        return job, other, nothing

    job, other, nothing = run(main(), timeout=120)
    assert job.state == "cancelled" and 300 <= job.rows_done < 5000
    assert other.state == "done" and nothing is None
    assert len(seen) <= job.rows_done + 100  # at most the chunk in flight at the cancel
    state, error = admin.execute(
        "SELECT state, error FROM walex_backfill WHERE table_name = 't'").fetchone()
    assert (state, error) == ("cancelled", "cancelled")


def test_walex_backfill_cancel_stops_the_running_app_s_job(
    dsn: str, admin: psycopg.Connection, tmp_path: Path,
) -> None:
    admin.execute("CREATE TABLE t (id int PRIMARY KEY)")
    admin.execute("INSERT INTO t SELECT g FROM generate_series(1, 5000) g")
    admin.execute("CREATE PUBLICATION pub FOR TABLE t")
    config = tmp_path / "walex.toml"
    config.write_text(textwrap.dedent(f"""
        url = {dsn!r}
        publication = "pub"
        name = "shop"
    """))
    seen: list[Any] = []

    async def cli(*args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "walex.cli", "backfill", *args, "--config", str(config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=tmp_path,
            env={**os.environ, "COLUMNS": "200"})
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode or 0, out.decode()

    async def main() -> tuple[tuple[int, str], tuple[int, str], Any]:
        app = WalEx(dsn, publication="pub", name="shop", backfill_chunk_size=100, batch_size=50,
                    modules=[_slow(seen)])
        async with app:
            waiting = asyncio.create_task(app.backfill("t"))
            await until(lambda: len(seen) >= 300, "some rows")
            cancelled = await cli("t", "--cancel")
            with pytest.raises(BackfillCancelledError):
                await asyncio.wait_for(waiting, 30)
            again = await cli("t", "--cancel")
            return cancelled, again, app.pipeline.backfill.current

    (code, out), (code2, out2), current = run(main(), timeout=150)
    assert code == 0 and "cancelled the backfill of public.t after" in out, out
    assert code2 == 1 and "no backfill of t is pending or running" in out2, out2
    assert current is None and len(seen) < 5000
    assert admin.execute("SELECT state FROM walex_backfill").fetchone()[0] == "cancelled"


def test_first_requests_at_the_same_moment_create_the_store_once(
    dsn: str, admin: psycopg.Connection,
) -> None:
    """Six apps asking for their first backfill at once, ten times over: CREATE TABLE IF
    NOT EXISTS alone lets two of them collide on the new table's type."""

    async def main() -> None:
        conns = [await psycopg.AsyncConnection.connect(dsn, autocommit=True) for _ in range(6)]
        try:
            for _ in range(10):
                admin.execute("DROP TABLE IF EXISTS walex_backfill")
                await asyncio.gather(*(Store("walex_backfill", f"app{i}").request(
                    conn, "public", "t", None, ["id"]) for i, conn in enumerate(conns)))
        finally:
            for conn in conns:
                await conn.close()

    run(main())
    assert admin.execute("SELECT count(*) FROM walex_backfill").fetchone()[0] == 6


def test_rows_done_counts_the_read_events_delivered(
    dsn: str, admin: psycopg.Connection, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rows of a chunk changed in the stream meanwhile reach handlers from the stream, not
    as reads: rows_done counts the reads, each once."""
    admin.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    admin.execute("INSERT INTO t SELECT g, 'old' FROM generate_series(1, 100) g")
    admin.execute("CREATE PUBLICATION pub FOR TABLE t")
    real = backfill_chunks.read_chunk

    async def racing(conn: Any, target: Any, table: Any, adapters: Any, where: Any,
                     after: list[str] | None, limit: Any, **kw: Any) -> Any:
        chunk = await real(conn, target, table, adapters, where, after, limit, **kw)
        base = int(after[0]) if after else 0
        admin.execute("UPDATE t SET v = 'new' WHERE id = %s", (base + 3,))  # after the snapshot
        return chunk

    monkeypatch.setattr(backfill_chunks, "read_chunk", racing)

    async def main() -> tuple[Any, list[Event]]:
        async with collecting(dsn, subscriptions=["t"], backfill_chunk_size=10) as rec:
            job = await asyncio.wait_for(rec.app.backfill("t"), 60)
            return job, [e for e in rec.events if e.type is EventType.READ]

    job, reads = run(main())
    assert len(reads) == 90  # one row of each chunk came from the stream
    assert job.rows_done == len(reads) and job.chunks_done == 10


def test_a_progress_store_of_an_earlier_walex_is_brought_up_to_date(
    dsn: str, admin: psycopg.Connection,
) -> None:
    """A store without key_signature and without the state 'cancelled' (as walex made
    them before): its unfinished job runs, and a job of it can be cancelled."""
    admin.execute("""
        CREATE TABLE walex_backfill (
            app text NOT NULL, table_schema text NOT NULL, table_name text NOT NULL,
            condition text,
            state text NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'running', 'done', 'failed')),
            chunk_key text[], last_key text[], rows_done bigint NOT NULL DEFAULT 0,
            rows_estimated bigint, chunks_done integer NOT NULL DEFAULT 0,
            rate double precision, requested_at timestamptz NOT NULL DEFAULT now(),
            started_at timestamptz, updated_at timestamptz NOT NULL DEFAULT now(),
            finished_at timestamptz, error text,
            PRIMARY KEY (app, table_schema, table_name))""")
    admin.execute("CREATE TABLE t (id int PRIMARY KEY)")
    admin.execute("INSERT INTO t SELECT g FROM generate_series(1, 3000) g")
    admin.execute("CREATE PUBLICATION pub FOR TABLE t")
    admin.execute("INSERT INTO walex_backfill (app, table_schema, table_name, state, chunk_key, "
                  "last_key, rows_done, chunks_done) VALUES "
                  "('old', 'public', 't', 'running', '{id}', '{2000}', 2000, 20)")
    seen: list[Any] = []

    async def main() -> Any:
        app = WalEx(dsn, publication="pub", name="old", backfill_chunk_size=100, batch_size=50,
                    modules=[_slow(seen)])
        # polled on a connection of the loop: the upgrade locks the store while it runs, and
        # a blocking query would keep the loop (and so the upgrade) from going on
        async with app, await psycopg.AsyncConnection.connect(dsn, autocommit=True) as watch:
            deadline = time.monotonic() + 60
            while (await (await watch.execute("SELECT state FROM walex_backfill")).fetchone())[0] \
                    != "done":
                assert time.monotonic() < deadline, "timed out waiting for the resumed job"
                await asyncio.sleep(0.05)
            waiting = asyncio.create_task(app.backfill("t"))
            await until(lambda: len(seen) >= 1300, "some rows of a new job")
            job = await app.cancel_backfill("t")
            with pytest.raises(BackfillCancelledError):
                await asyncio.wait_for(waiting, 30)
        return job

    job = run(main(), timeout=120)
    assert seen[:1000] == list(range(2001, 3001))  # resumed after the stored key
    assert job.state == "cancelled"
    row = admin.execute("SELECT state, key_signature FROM walex_backfill").fetchone()
    assert row == ("cancelled", "23:-1:0")  # int4, no typmod, no collation
