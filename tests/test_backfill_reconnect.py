"""Backfill across lost sessions: a standby lock lost while a chunk's reads are queued, a
walsender terminated while they are (walex.backfill.runner, .watermarks; the pipeline keeps
its queue across a durable slot's reconnect and drops it when the lock is lost)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from support import run, until
from test_backfill import table_rows
from walex import UNCHANGED_TOAST, Event, Events, EventType, WalEx
from walex.errors import ReplicationError
from walex.pgoutput.messages import Commit, LogicalMessage
from walex.backfill import chunks as backfill_chunks
from walex.backfill.store import Store


class Delivered:
    """Rows by key from every event, and every read event's id by key; the first read
    call can be held (a slow handler: the chunk's other reads queue up behind it)."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[int, dict[str, Any]]] = {"item": {}, "marker": {}}
        self.reads: dict[int, set[str]] = {}
        self.ids: list[str] = []  # every event's id, in the order handled
        self.held, self.go = threading.Event(), threading.Event()
        self.hold: Any = None  # which call to hold: a test of the events, once
        self.events = Events()
        self.events.on_event("all")(self.apply)

    def apply(self, events: list[Event]) -> None:  # on the handlers' thread
        if self.hold is not None and self.hold(events):
            self.hold = None
            self.held.set()
            self.go.wait(30)
        for e in events:
            self.ids.append(e.id)
            rows = self.rows[e.name]
            if e.type in (EventType.READ, EventType.INSERT, EventType.UPDATE):
                rows[e.new_record["id"]] = e.new_record
            elif e.type is EventType.DELETE:
                rows.pop(e.old_record["id"], None)
            if e.type is EventType.READ:
                self.reads.setdefault(e.new_record["id"], set()).add(e.id)


def _schema(admin: psycopg.Connection, rows: int) -> None:
    admin.execute("CREATE TABLE marker (id serial PRIMARY KEY)")
    admin.execute("CREATE TABLE item (id int PRIMARY KEY, v int NOT NULL)")
    admin.execute(f"INSERT INTO item SELECT g, g FROM generate_series(1, {rows}) g")
    admin.execute("CREATE PUBLICATION pub FOR TABLE item, marker")


async def _caught_up(admin: psycopg.Connection, got: Delivered) -> None:
    marker = admin.execute("INSERT INTO marker DEFAULT VALUES RETURNING id").fetchone()[0]
    await until(lambda: marker in got.rows["marker"], "the marker row", 30)


def _every_row(admin: psycopg.Connection, got: Delivered, anew: set[int] = set()) -> None:
    """Every row delivered, each under one id (but the rows of ``anew``)."""
    want = {k[0]: r for k, r in table_rows(admin, "item", ("id",)).items()}
    missing = sorted(set(want) - set(got.rows["item"]))
    assert not missing, f"{len(missing)} rows never delivered: {missing[:10]}"
    assert got.rows["item"] == want
    twice = {k: ids for k, ids in got.reads.items() if len(ids) > 1 and k not in anew}
    assert not twice, f"rows read twice under different event ids: {list(twice.items())[:5]}"


def test_reads_dropped_with_the_queue_when_the_standby_lock_is_lost_are_delivered_again(
    dsn: str, admin: psycopg.Connection,
) -> None:
    """``standby=True``: the first read call of the backfill is held, the chunk's other reads
    wait in the queue; the standby lock's connection is terminated, so the instance drops
    its queue (what it did not acknowledge comes again from the slot). Once the lock is
    taken again the stream sends the high watermark again: the chunk's reads must come
    with it (on main they were gone for good, the chunk was marked done when its replayed
    watermark was acknowledged, and its rows were never delivered)."""
    _schema(admin, 200)
    got = Delivered()
    got.hold = lambda events: any(e.type is EventType.READ for e in events)

    async def scenario() -> Any:
        app = WalEx(dsn, publication="pub", modules=[got.events], name="bf_fence",
                    durable_slot=True, slot_name="bf_fence_slot", standby=True,
                    status_interval=0.2, batch_size=10, backfill_chunk_size=50)
        await app.start()
        try:
            job = asyncio.ensure_future(app.backfill("item"))
            await until(got.held.is_set, "the first read call")
            await until(lambda: app.pipeline.queue.qsize() >= 3, "the chunk's reads queued")
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE "
                          "locktype = 'advisory' AND granted AND database = "
                          "(SELECT oid FROM pg_database WHERE datname = current_database())")
            await until(lambda: app.pipeline.abandoning, "the instance abandoning", timeout=15)
            got.go.set()
            done = await asyncio.wait_for(job, 60)
            await _caught_up(admin, got)
            return done
        finally:
            got.go.set()
            await app.stop()

    job = run(scenario(), timeout=120)
    assert job.state == "done"
    _every_row(admin, got)


@pytest.mark.parametrize("durable", [False, True], ids=["temporary", "durable"])
def test_a_reconnect_between_the_watermarks_of_a_chunk(
    dsn: str, admin: psycopg.Connection, monkeypatch: pytest.MonkeyPatch, durable: bool,
) -> None:
    """The walsender is terminated after the first chunk's low watermark was streamed;
    its high watermark is written once the next session streams, behind a large
    transaction the walsender takes a while to decode.

    Temporary slot: the new slot skipped WAL (a gap), so the backfill gives the chunk up
    and reads it again; the stream then reaches the first high watermark while the next
    chunk is not yet armed (the store answers slowly): on main it still emitted the
    given-up chunk's reads, so every row of it was read twice, under two event ids.

    Durable slot: the new session sends everything after the position acknowledged
    again, the watermarks included: the chunk goes through, read once (on main it was
    given up at every reconnect, so reconnects coming faster than the stream reached a
    high watermark read the same chunk again and again)."""
    _schema(admin, 200)
    admin.execute("CREATE TABLE filler (n int)")  # not published: decoded, sent nowhere
    got = Delivered()
    real_read, real_state = backfill_chunks.read_chunk, Store.state
    state = {"app": None, "cut": False, "slow": False}

    async def cut_after_read(*args: Any, **kw: Any) -> Any:
        chunk = await real_read(*args, **kw)
        if not state["cut"]:
            state["cut"] = True
            pipeline = state["app"].pipeline  # type: ignore[attr-defined]
            before = pipeline.sessions
            admin.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                          "WHERE slot_name = 'bf_cut_slot' AND active_pid IS NOT NULL")
            await until(lambda: pipeline.sessions > before, "the next session", timeout=20)
            await asyncio.to_thread(admin.execute,
                                    "INSERT INTO filler SELECT generate_series(1, 400000)")
            state["slow"] = True
        return chunk

    async def slow_state(self: Store, conn: Any, job: Any) -> Any:
        if state["slow"]:  # once: the answer to the check after the chunk was given up
            state["slow"] = False
            await asyncio.sleep(3)
        return await real_state(self, conn, job)

    monkeypatch.setattr(backfill_chunks, "read_chunk", cut_after_read)
    monkeypatch.setattr(Store, "state", slow_state)

    async def scenario() -> Any:
        app = state["app"] = WalEx(dsn, publication="pub", modules=[got.events], name="bf_cut",
                                   durable_slot=durable, slot_name="bf_cut_slot",
                                   status_interval=0.2, batch_size=10, backfill_chunk_size=50)
        async with app:
            job = await asyncio.wait_for(app.backfill("item"), 60)
            await _caught_up(admin, got)
            redone = app.pipeline.backfill.chunks_redone
        return job, redone

    job, redone = run(scenario(), timeout=120)
    assert job.state == "done"
    if durable:
        assert redone == 0, f"{redone} chunk(s) read again after a reconnect of a durable slot"
    else:
        assert redone >= 1  # the first chunk was given up at the reconnect
    _every_row(admin, got)


def test_a_high_watermark_cut_off_before_its_commit_counts_only_when_it_comes_again(
    dsn: str, admin: psycopg.Connection,
) -> None:
    """Durable slot; a slow handler holds a transaction, two more wait in the queue. The
    session ends between the last chunk's high watermark message and its commit (the
    middleware plays the connection lost there). The next session sends the held
    transactions again first: on main the first of them was taken for the high watermark's
    transaction, so the chunk's reads went out with its position (event ids older than
    ones handled before them) and the chunk was marked done once that old transaction was
    acknowledged, before its reads were handled."""
    _schema(admin, 30)
    got = Delivered()
    state = {"high": False, "cut": False}

    async def middleware(message: Any, app: WalEx) -> None:
        if (isinstance(message, LogicalMessage) and message.prefix == "walex.backfill"
                and b'"mark":"high"' in message.content and not state["cut"]):
            state["high"] = True
        elif isinstance(message, Commit) and state["high"]:
            state["high"], state["cut"] = False, True
            raise ReplicationError("the connection was lost (test)", retriable=True)
        await app.process_message(message)

    async def scenario() -> Any:
        app = WalEx(dsn, publication="pub", modules=[got.events], name="bf_commit",
                    durable_slot=True, slot_name="bf_commit_slot", status_interval=0.2,
                    backfill_chunk_size=100, message_middleware=middleware)
        async with app:
            admin.execute("INSERT INTO marker DEFAULT VALUES")
            await until(lambda: got.rows["marker"], "the stream flowing")
            got.hold = lambda events: any(e.type is EventType.UPDATE for e in events)
            admin.execute("UPDATE item SET v = -1 WHERE id = 1")  # held by the handler
            await until(got.held.is_set, "the held call")
            admin.execute("UPDATE item SET v = -2 WHERE id = 2")  # queued behind it
            admin.execute("UPDATE item SET v = -3 WHERE id = 3")
            job = asyncio.ensure_future(app.backfill("item"))
            await until(lambda: state["cut"], "the session cut before the high commit", 30)
            got.go.set()
            done = await asyncio.wait_for(job, 60)
            early = sorted(set(range(1, 31)) - set(got.rows["item"]))
            await _caught_up(admin, got)
            return done, early

    job, early = run(scenario(), timeout=120)
    assert job.state == "done"
    assert not early, f"backfill() returned before rows {early} were handled"
    _every_row(admin, got)
    handled = [i for i in got.ids if i]
    late = [(a, b) for a, b in zip(handled, handled[1:]) if b < a]
    assert not late, f"event ids going back in stream order: {late[:3]}"



PAIR_APP = """
import os, sqlite3, time
from walex import WalEx, Events

events = Events()
db = sqlite3.connect(os.environ["PAIR_LOG"], isolation_level=None, check_same_thread=False,
                     timeout=30)
db.execute("PRAGMA journal_mode=WAL")
db.execute("CREATE TABLE IF NOT EXISTS seen (pid INTEGER, id TEXT, pk INTEGER)")

@events.on_event("item")
def record(batch):  # slow: the chunk's reads queue up behind it
    time.sleep(0.1)
    db.executemany("INSERT INTO seen VALUES (?, ?, ?)",
                   [(os.getpid(), e.id, e.new_record["id"]) for e in batch])

app = WalEx({dsn!r}, publication="pub", modules=[events], name="bf_pair",
            durable_slot=True, slot_name="bf_pair_slot", status_interval=0.2,
            snapshot="initial", batch_size=10, backfill_chunk_size=60)
"""


def test_the_standby_taking_over_mid_backfill_delivers_every_row(
    dsn: str, admin: psycopg.Connection, tmp_path: Path,
) -> None:
    """Two ``walex run --standby`` processes; the active one (a) backfills the table
    (``snapshot="initial"``) with a slow handler, the chunk's reads queued; its standby
    lock's connection is terminated, so it drops them. The standby (b) takes over and
    carries the job on from the store: between them every row is delivered, the job ends
    done."""
    _schema(admin, 400)
    (tmp_path / "pair_app.py").write_text(textwrap.dedent(PAIR_APP.format(dsn=dsn)))
    log_path = tmp_path / "seen.sqlite"
    procs: dict[str, subprocess.Popen[str]] = {}

    def start(name: str) -> None:
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "walex.cli", "run", "pair_app:app", "--standby"],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(tmp_path), "PAIR_LOG": str(log_path)})

    def seen() -> list[tuple[int, str, int]]:
        if not log_path.exists():
            return []
        with sqlite3.connect(log_path, timeout=30) as db:
            try:
                return db.execute("SELECT pid, id, pk FROM seen").fetchall()
            except sqlite3.OperationalError:
                return []

    def state() -> str | None:
        try:
            row = admin.execute(
                "SELECT state FROM walex_backfill WHERE table_name = 'item'").fetchone()
        except psycopg.errors.UndefinedTable:
            return None
        return row[0] if row else None

    def wait(predicate: Any, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    try:
        start("a")
        wait(lambda: len(seen()) >= 20, "a handling reads")
        start("b")
        time.sleep(3)  # b starts and stands by (a holds the lock)
        assert procs["b"].poll() is None, procs["b"].communicate()
        assert state() == "running", state()
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE "
                      "locktype = 'advisory' AND granted AND database = "
                      "(SELECT oid FROM pg_database WHERE datname = current_database())")
        wait(lambda: state() == "done", "the job done", timeout=120)
        time.sleep(3)  # the last reads handled (the job is marked done once they were)
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
    rows = seen()
    missing = sorted(set(range(1, 401)) - {pk for _, _, pk in rows})
    assert len({pid for pid, _, _ in rows}) == 2, "b never handled"
    assert not missing, f"{len(missing)} rows delivered by neither: {missing[:10]}"


def test_walsenders_terminated_again_and_again_during_a_backfill_under_a_toast_workload(
    dsn: str, admin: psycopg.Connection,
) -> None:
    """Durable slot, default replica identity, a TOASTed column; a workload updates the
    small column (the stream sends the TOASTed one unchanged), the TOASTed one, deletes and
    inserts rows while they are backfilled, the handler is slow (queues kept across the
    reconnects) and the walsender is terminated every few tenths of a second. Every row
    ends with its final value and its TOASTed value, and no row is read twice under two
    event ids."""
    admin.execute("CREATE TABLE marker (id serial PRIMARY KEY)")
    admin.execute("CREATE TABLE item (id int PRIMARY KEY, v int NOT NULL, body text)")
    admin.execute("ALTER TABLE item ALTER COLUMN body SET STORAGE EXTERNAL")
    big = "(SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 100))"
    admin.execute(f"INSERT INTO item SELECT g, 0, {big} FROM generate_series(1, 3000) g")
    admin.execute("CREATE PUBLICATION pub FOR TABLE item, marker")
    got = Delivered()
    stop = threading.Event()

    def merge(events: list[Event]) -> None:
        for e in events:
            if e.type is EventType.UPDATE:
                was = got.rows["item"].get(e.new_record["id"], {})
                e.new_record = {k: was.get(k, v) if v is UNCHANGED_TOAST else v
                                for k, v in e.new_record.items()}
        time.sleep(0.001)  # slow: batches queue up behind the handler

    got.hold = lambda events: merge(events) and False

    def workload() -> None:
        rnd = random.Random(7)
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.wait(0.004):  # slower than the handler can go
                i, op = rnd.randrange(1, 3100), rnd.random()
                if op < 0.5:
                    conn.execute("UPDATE item SET v = v + 1 WHERE id = %s", (i,))
                elif op < 0.7:
                    conn.execute(f"UPDATE item SET body = {big} WHERE id = %s", (i,))
                elif op < 0.85:
                    conn.execute("DELETE FROM item WHERE id = %s", (i,))
                else:
                    conn.execute(f"INSERT INTO item VALUES (%s, 0, {big}) ON CONFLICT (id) "
                                 "DO UPDATE SET v = item.v + 100", (i,))

    def cutter() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.wait(0.15):
                conn.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                             "WHERE slot_name = 'bf_toast_slot' AND active_pid IS NOT NULL")

    async def scenario() -> Any:
        app = WalEx(dsn, publication="pub", modules=[got.events], name="bf_toast",
                    durable_slot=True, slot_name="bf_toast_slot", status_interval=0.2,
                    batch_size=20, backfill_chunk_size=40, reconnect_backoff_max=0.5)
        threads = [threading.Thread(target=workload), threading.Thread(target=cutter)]
        async with app:
            for t in threads:
                t.start()
            try:
                job = await asyncio.wait_for(app.backfill("item"), 150)
            finally:
                stop.set()
                for t in threads:
                    await asyncio.to_thread(t.join)
            await _caught_up(admin, got)
            return job, app.pipeline.sessions

    job, sessions = run(scenario(), timeout=240)
    assert job.state == "done" and sessions >= 3
    lacking = sorted(k for k, r in got.rows["item"].items()
                     if any(v is UNCHANGED_TOAST for v in r.values()))
    assert not lacking, f"rows without their TOASTed value: {lacking[:10]}"
    _every_row(admin, got)


def test_network_cuts_during_a_backfill_with_a_slow_handler(
    dsn: str, admin: psycopg.Connection,
) -> None:
    """Every connection of the app (walsender, backfill, lookups) goes through a proxy that
    resets them all every few tenths of a second while a backfill runs under an
    update/delete/insert workload of its rows, the handler slow (queues kept across the
    reconnects). Every row ends with its final value."""
    sys.path.insert(0, str(Path(__file__).parent / "chaos"))
    from proxy import Proxy

    admin.execute("CREATE TABLE marker (id serial PRIMARY KEY)")
    admin.execute("CREATE TABLE item (id int PRIMARY KEY, v int NOT NULL)")
    admin.execute("INSERT INTO item SELECT g, 0 FROM generate_series(1, 3000) g")
    admin.execute("CREATE PUBLICATION pub FOR TABLE item, marker")
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    proxy = Proxy(str(params.get("host") or "127.0.0.1"), int(params["port"])).start()
    via = psycopg.conninfo.make_conninfo(dsn, host="127.0.0.1", port=proxy.port)
    got = Delivered()
    got.hold = lambda events: time.sleep(0.001) and False
    stop = threading.Event()

    def workload() -> None:
        rnd = random.Random(11)
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.wait(0.004):
                i, op = rnd.randrange(1, 3100), rnd.random()
                if op < 0.6:
                    conn.execute("UPDATE item SET v = v + 1 WHERE id = %s", (i,))
                elif op < 0.8:
                    conn.execute("DELETE FROM item WHERE id = %s", (i,))
                else:
                    conn.execute("INSERT INTO item VALUES (%s, 0) ON CONFLICT (id) "
                                 "DO UPDATE SET v = item.v + 100", (i,))

    def cutter() -> None:
        while not stop.wait(0.3):
            proxy.cut()

    async def scenario() -> Any:
        app = WalEx(via, publication="pub", modules=[got.events], name="bf_net",
                    durable_slot=True, slot_name="bf_net_slot", status_interval=0.2,
                    batch_size=20, backfill_chunk_size=40, reconnect_backoff_max=0.5)
        threads = [threading.Thread(target=workload), threading.Thread(target=cutter)]
        async with app:
            for t in threads:
                t.start()
            try:
                job = await asyncio.wait_for(app.backfill("item"), 150)
            finally:
                stop.set()
                for t in threads:
                    await asyncio.to_thread(t.join)
            await _caught_up(admin, got)
            return job, app.pipeline.sessions

    try:
        job, sessions = run(scenario(), timeout=240)
    finally:
        proxy.stop()
    assert job.state == "done" and sessions >= 3 and proxy.resets > 0
    want = {k[0]: r for k, r in table_rows(admin, "item", ("id",)).items()}
    missing = sorted(set(want) - set(got.rows["item"]))
    assert not missing, f"{len(missing)} rows never delivered: {missing[:10]}"
    assert got.rows["item"] == want


def test_a_session_that_starts_past_the_high_watermark_reads_the_chunk_again(
    dsn: str, admin: psycopg.Connection, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``standby=True``: the instance loses its standby lock while its second chunk is read
    (another connection takes the lock meanwhile), so its stream stops before that chunk's
    high watermark; the slot is moved past it (as a standby that held it would), then the
    lock is given back. The new session starts past the high watermark: the chunk is read
    again and the backfill ends, every row delivered (with only a count of gaps deciding,
    the backfill waited for that watermark for ever)."""
    import hashlib

    _schema(admin, 200)
    got = Delivered()
    key = int.from_bytes(hashlib.sha256(b"walex standby bf_jump_slot").digest()[:8], "big",
                         signed=True)
    blocker = psycopg.connect(dsn, autocommit=True)
    real_read = backfill_chunks.read_chunk
    calls = {"n": 0}

    async def lose_the_lock(*args: Any, **kw: Any) -> Any:
        chunk = await real_read(*args, **kw)
        calls["n"] += 1
        if calls["n"] == 2:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE "
                          "locktype = 'advisory' AND granted AND database = "
                          "(SELECT oid FROM pg_database WHERE datname = current_database())")
            await asyncio.to_thread(blocker.execute, "SELECT pg_advisory_lock(%s)", (key,))
            await until(lambda: admin.execute(
                "SELECT active_pid IS NULL FROM pg_replication_slots "
                "WHERE slot_name = 'bf_jump_slot'").fetchone()[0], "the slot free", 20)
        return chunk

    monkeypatch.setattr(backfill_chunks, "read_chunk", lose_the_lock)

    async def scenario() -> Any:
        app = WalEx(dsn, publication="pub", modules=[got.events], name="bf_jump",
                    durable_slot=True, slot_name="bf_jump_slot", standby=True,
                    status_interval=0.2, batch_size=10, backfill_chunk_size=50)
        await app.start()
        try:
            job = asyncio.ensure_future(app.backfill("item"))
            await until(lambda: calls["n"] >= 2, "the second chunk read", 30)
            window = app.pipeline.backfill.window
            await until(lambda: window is not None and window.chunk is not None,
                        "the second chunk waiting for its high watermark", 20)
            await asyncio.sleep(0.3)  # its high watermark written
            admin.execute("SELECT pg_replication_slot_advance('bf_jump_slot', "
                          "pg_current_wal_lsn())")
            blocker.execute("SELECT pg_advisory_unlock(%s)", (key,))
            done = await asyncio.wait_for(job, 60)
            await _caught_up(admin, got)
            return done
        finally:
            await app.stop()

    try:
        job = run(scenario(), timeout=120)
    finally:
        blocker.close()
    assert job.state == "done"
    _every_row(admin, got)


def _lose_the_lock_to_another_instance(
    dsn: str, admin: psycopg.Connection, caplog: pytest.LogCaptureFixture, name: str,
    move_the_slot: bool,
) -> tuple[Any, Delivered]:
    """``standby=True``: the first read call of the backfill is held, more reads queued;
    the standby lock's connection is terminated and another connection (the other
    instance) takes the lock at once. The instance abandons its queue; its backfill must
    stop (not wait for its dropped reads for ever) and say so. With ``move_the_slot`` the
    other instance moves the slot past the chunks' watermarks (as it does when it streams
    without this job's window) before it gives the lock back; then the lock is free again
    and the instance takes it back: the job must end done with every row delivered."""
    import hashlib

    _schema(admin, 200)
    got = Delivered()
    got.hold = lambda events: any(e.type is EventType.READ for e in events)
    slot = f"{name}_slot"
    key = int.from_bytes(hashlib.sha256(f"walex standby {slot}".encode()).digest()[:8], "big",
                         signed=True)
    other = psycopg.connect(dsn, autocommit=True)

    async def scenario() -> Any:
        app = WalEx(dsn, publication="pub", modules=[got.events], name=name,
                    durable_slot=True, slot_name=slot, standby=True,
                    status_interval=0.2, batch_size=10, backfill_chunk_size=50)
        await app.start()
        backfills = app.pipeline.backfill
        try:
            job = asyncio.ensure_future(app.backfill("item"))
            await until(got.held.is_set, "the first read call")
            await until(lambda: app.pipeline.queue.qsize() >= 3, "the chunk's reads queued")
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE "
                          "locktype = 'advisory' AND granted AND database = "
                          "(SELECT oid FROM pg_database WHERE datname = current_database())")
            await asyncio.to_thread(other.execute, "SELECT pg_advisory_lock(%s)", (key,))
            await until(lambda: app.pipeline.abandoning, "the instance abandoning", timeout=15)
            got.go.set()
            if not move_the_slot:
                # the instance stands by; its backfill stops instead of waiting for the reads
                # it dropped (on main it waited for ever, warning every minute)
                await until(lambda: backfills.current is None,
                            "the backfill of the instance that lost its lock to stop", 30)
                assert ("lost its standby lock: its backfill of public.item stops here"
                        in caplog.text)
                assert app.pipeline.abandoning and not job.done()
            await until(lambda: admin.execute(
                "SELECT active_pid IS NULL FROM pg_replication_slots WHERE slot_name = %s",
                (slot,)).fetchone()[0], "the slot free", 20)
            if move_the_slot:
                admin.execute("SELECT pg_replication_slot_advance(%s, pg_current_wal_lsn())",
                              (slot,))
            other.execute("SELECT pg_advisory_unlock(%s)", (key,))
            done = await asyncio.wait_for(job, 60)
            await _caught_up(admin, got)
            return done
        finally:
            got.go.set()
            await app.stop()

    caplog.set_level("WARNING", logger="walex.backfill")
    try:
        job = run(scenario(), timeout=120)
    finally:
        other.close()
    return job, got


def test_a_backfill_stops_when_its_instance_loses_the_standby_lock_to_another(
    dsn: str, admin: psycopg.Connection, caplog: pytest.LogCaptureFixture,
) -> None:
    """The backfill task of an instance that lost its standby lock to another instance
    stops its job with a clear message (on main it waited for its dropped reads' watermark
    to be acknowledged, for ever while the other instance held the slot); once the lock is
    free again and taken back, the job resumes from the store and ends done, every row
    delivered, each under one id."""
    job, got = _lose_the_lock_to_another_instance(dsn, admin, caplog, "bf_lost",
                                                  move_the_slot=False)
    assert job.state == "done"
    _every_row(admin, got)


def test_chunks_whose_reads_the_other_instance_never_delivered_are_not_marked_done(
    dsn: str, admin: psycopg.Connection, caplog: pytest.LogCaptureFixture,
) -> None:
    """The other instance moved the slot past the watermarks of the chunks whose reads
    this one dropped, then gave the lock back. The new session starts past them: on main
    the first chunk was marked done once that position counted as acknowledged, and its
    dropped rows were never delivered by anybody. A chunk is done only once its reads
    were delivered: the job reads them again. The slot no longer sends their high
    watermark, so they cannot be replayed where they went out: the rows of the first
    read call (1 to 10, handled before the lock was lost) come again under new ids."""
    job, got = _lose_the_lock_to_another_instance(dsn, admin, caplog, "bf_moved",
                                                  move_the_slot=True)
    assert job.state == "done"
    _every_row(admin, got, anew=set(range(1, 11)))
