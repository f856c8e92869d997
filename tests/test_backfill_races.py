"""Backfill beyond the happy path: rows left to the stream that lack a TOASTed column, a
commit the stream passed before snapshots show it, keys Python cannot hash or compare
(walex.backfill.watermarks, .chunks, .keys, .runner)."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from support import run, until
from test_backfill import Copy, caught_up, table_rows
from walex import UNCHANGED_TOAST, Event, EventType, WalEx
from walex.errors import BackfillCancelledError
from walex.backfill import chunks as backfill_chunks

# ~6.4 kB of incompressible text, stored out of line (the column is SET STORAGE EXTERNAL)
BIG = "(SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 200))"


class MergingCopy(Copy):
    """A copy kept the way a consumer must keep one: a value an update did not resend
    (UNCHANGED_TOAST) keeps the value the row had."""

    async def apply(self, events: list[Event]) -> None:
        for e in events:
            if e.type is EventType.UPDATE and e.name in self.keys:
                rows = self.rows.setdefault(e.name, {})
                was = rows.get(self.key(e.name, e.old_record or e.new_record), {})
                e.new_record = {k: was.get(k, v) if v is UNCHANGED_TOAST else v
                                for k, v in e.new_record.items()}
        await super().apply(events)


def _doc_schema(admin: psycopg.Connection, rows: int) -> None:
    admin.execute("CREATE TABLE marker (id serial PRIMARY KEY)")
    admin.execute("CREATE TABLE doc (id int PRIMARY KEY, body text, n int NOT NULL DEFAULT 0)")
    admin.execute("ALTER TABLE doc ALTER COLUMN body SET STORAGE EXTERNAL")
    admin.execute(f"INSERT INTO doc SELECT g, {BIG}, 0 FROM generate_series(1, {rows}) g")
    admin.execute("CREATE PUBLICATION pub FOR TABLE doc, marker")


def _complete(copy: Copy, admin: psycopg.Connection) -> None:
    rows = copy.rows["doc"]
    lacking = sorted(k for k, r in rows.items() if any(v is UNCHANGED_TOAST for v in r.values()))
    assert not lacking, f"{len(lacking)} rows never got their body: {lacking[:10]}"
    assert rows == table_rows(admin, "doc", ("id",))


def test_a_row_left_to_a_change_without_its_toasted_value_is_read_again(
    dsn: str, admin: psycopg.Connection, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Default replica identity: an update of a small column sends the large one as
    unchanged TOAST. The row, left out of its chunk, is read again with a later chunk."""
    _doc_schema(admin, 40)
    real = backfill_chunks.read_chunk
    again_seen: set[tuple[str, ...]] = set()

    async def racing(conn: Any, target: Any, table: Any, adapters: Any, where: Any,
                     after: list[str] | None, limit: int, **kw: Any) -> Any:
        base = int(after[0]) if after else 0
        for _, key in kw.get("again") or ():
            if key not in again_seen:  # changed once more while it is read again
                again_seen.add(key)
                admin.execute("UPDATE doc SET n = n + 1 WHERE id = %s", (int(key[0]),))
        if limit:
            admin.execute("UPDATE doc SET n = n + 1 WHERE id = %s", (base + 2,))
        chunk = await real(conn, target, table, adapters, where, after, limit, **kw)
        if limit:
            admin.execute("UPDATE doc SET n = n + 1 WHERE id = %s", (base + 5,))
        return chunk

    monkeypatch.setattr(backfill_chunks, "read_chunk", racing)

    async def main() -> tuple[Copy, Any, int]:
        copy = MergingCopy({"doc": ("id",), "marker": ("id",)})
        app = WalEx(dsn, publication="pub", name="toast", backfill_chunk_size=10,
                    modules=[copy.events])
        async with app:
            job = await app.backfill("doc")
            await caught_up(admin, copy)
            left = app.pipeline.backfill.rows_left_to_stream
        return copy, job, left

    copy, job, left = run(main())
    assert job.state == "done" and left >= 8
    _complete(copy, admin)


def test_rows_left_out_of_chunks_cut_by_bytes_are_read_again(
    dsn: str, admin: psycopg.Connection, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Chunks cut by bytes (a 20 kB budget, rows of ~6.4 kB: a few rows a chunk, not the
    1,000 of backfill_chunk_size) and rows of them left to a change without their TOASTed
    value: those are read again with later chunks, and the chunks still go on from the
    last row read in key order."""
    _doc_schema(admin, 30)
    real = backfill_chunks.read_chunk
    sizes: list[int] = []

    async def racing(conn: Any, target: Any, table: Any, adapters: Any, where: Any,
                     after: list[str] | None, limit: Any, **kw: Any) -> Any:
        base = int(after[0]) if after else 0
        if limit and base < 30:  # after the low watermark: the row is left to the stream
            admin.execute("UPDATE doc SET n = n + 1 WHERE id = %s", (base + 1,))
        chunk = await real(conn, target, table, adapters, where, after, limit, **kw)
        sizes.append(chunk.rows)
        return chunk

    monkeypatch.setattr(backfill_chunks, "read_chunk", racing)

    async def main() -> tuple[Copy, Any, int]:
        copy = MergingCopy({"doc": ("id",), "marker": ("id",)})
        app = WalEx(dsn, publication="pub", name="toastbytes", backfill_chunk_size=1000,
                    max_pending_bytes=4 * 20_000, modules=[copy.events])
        async with app:
            job = await app.backfill("doc")
            await caught_up(admin, copy)
            again = app.pipeline.backfill.rows_read_again
        return copy, job, again

    copy, job, again = run(main())
    assert job.state == "done"
    assert max(sizes) < 10 and len([s for s in sizes if s]) >= 5, sizes  # cut by bytes
    assert again >= 5  # the first row of each chunk, read again
    assert job.rows_done == 30  # each row delivered as a read once, left out or not
    _complete(copy, admin)


def test_toasted_rows_under_writers_updating_a_small_column(
    dsn: str, admin: psycopg.Connection,
) -> None:
    """The report's workload, smaller: writers update the small column of random rows
    while the table is backfilled; every row ends up with its body."""
    _doc_schema(admin, 1500)
    stop = threading.Event()
    done = {"txns": 0}

    def writer(seed: int) -> None:
        rnd = random.Random(seed)
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.is_set():
                conn.execute("UPDATE doc SET n = n + 1 WHERE id = %s", (rnd.randrange(1, 1501),))
                done["txns"] += 1

    async def main() -> tuple[Copy, Any]:
        copy = MergingCopy({"doc": ("id",), "marker": ("id",)})
        app = WalEx(dsn, publication="pub", name="writers", backfill_chunk_size=50,
                    modules=[copy.events])
        threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
        async with app:
            for t in threads:
                t.start()
            try:
                await until(lambda: done["txns"] > 20, "the writers to start")
                job = await app.backfill("doc")
            finally:
                stop.set()
                for t in threads:
                    await asyncio.to_thread(t.join)
            await caught_up(admin, copy, 60)
        return copy, job

    copy, job = run(main(), timeout=180)
    assert job.state == "done"
    _complete(copy, admin)


@pytest.mark.parametrize("release", ["standby", "cancel"])
def test_a_commit_streamed_before_the_backfill_but_not_yet_visible_is_not_overwritten(
    dsn: str, admin: psycopg.Connection, release: str,
) -> None:
    """A commit waiting for a synchronous standby is in the WAL, so the stream delivers
    it, while snapshots do not show it yet. A backfill started then must not deliver the
    row's older value after it: it waits until the commit is visible (the standby is no
    longer required, or the waiting session is cancelled: its commit stands)."""
    local = make_conninfo(dsn, options="-c synchronous_commit=local")
    admin.execute("CREATE TABLE marker (id serial PRIMARY KEY)")
    admin.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    admin.execute("INSERT INTO t SELECT g, 'old' FROM generate_series(1, 30) g")
    admin.execute("CREATE PUBLICATION pub FOR TABLE t, marker")
    hung: dict[str, Any] = {}

    def commit_waiting_for_a_standby() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            hung["pid"] = conn.info.backend_pid
            conn.execute("UPDATE t SET v = 'committed, not yet visible' WHERE id = 7")

    def reset() -> None:
        admin.execute("ALTER SYSTEM RESET synchronous_standby_names")
        admin.execute("SELECT pg_reload_conf()")

    def let_go() -> None:
        if release == "cancel":  # "canceling wait for synchronous replication": committed
            admin.execute("SELECT pg_cancel_backend(%s)", (hung["pid"],))
            deadline = time.monotonic() + 30
            while admin.execute("SELECT v FROM t WHERE id = 7").fetchone() == ("old",):
                assert time.monotonic() < deadline, "the cancelled commit never became visible"
                time.sleep(0.01)
        reset()

    async def main() -> tuple[Copy, Any, list[int]]:
        copy = Copy({"t": ("id",), "marker": ("id",)})
        app = WalEx(local, publication="pub", name="early", backfill_chunk_size=10,
                    modules=[copy.events])
        async with app:
            await caught_up(admin, copy)
            admin.execute("ALTER SYSTEM SET synchronous_standby_names = 'nobody'")
            admin.execute("SELECT pg_reload_conf()")
            thread = threading.Thread(target=commit_waiting_for_a_standby)
            thread.start()
            try:
                # the stream delivered the update; its session still waits for the standby
                await until(lambda: copy.rows["t"].get((7,), {}).get("v")
                            == "committed, not yet visible", "the streamed update")
                # the walsender may send the commit before its session starts to wait
                # (the WAL is flushed first): look until it waits
                def waiting() -> Any:
                    return admin.execute("SELECT backend_xid::text::bigint FROM pg_stat_activity "
                                         "WHERE pid = %s AND wait_event = 'SyncRep'",
                                         (hung["pid"],)).fetchone()
                await until(waiting, "the committing session to wait for the standby")
                hung["xid"] = waiting()[0]
                assert admin.execute("SELECT v FROM t WHERE id = 7").fetchone() == ("old",)
                backfills = app.pipeline.backfill
                task = asyncio.create_task(app.backfill("t"))
                await until(lambda: task.done() or getattr(backfills, "waiting_for", None),
                            "the backfill to finish or to wait", 30)
                waited = list(getattr(backfills, "waiting_for", []))
            finally:
                await asyncio.to_thread(let_go)
                await asyncio.to_thread(thread.join)
            job = await task
            await caught_up(admin, copy)
        return copy, job, waited

    try:
        copy, job, waited = run(main())
    finally:
        reset()
    assert job.state == "done"
    assert copy.rows["t"][(7,)]["v"] == "committed, not yet visible"
    assert copy.rows["t"] == table_rows(admin, "t", ("id",))
    assert hung["xid"] in {x & 0xFFFFFFFF for x in waited}  # it waited for that commit


def test_a_backfill_waiting_for_a_commit_not_yet_visible_can_be_cancelled(
    dsn: str, admin: psycopg.Connection,
) -> None:
    """While the job waits, before its first chunk, for a commit whose session waits for
    a synchronous standby, app.cancel_backfill() stops it (the standby never comes)."""
    local = make_conninfo(dsn, options="-c synchronous_commit=local")
    admin.execute("CREATE TABLE marker (id serial PRIMARY KEY)")
    admin.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    admin.execute("INSERT INTO t SELECT g, 'old' FROM generate_series(1, 30) g")
    admin.execute("CREATE PUBLICATION pub FOR TABLE t, marker")
    hung: dict[str, Any] = {}

    def commit_waiting_for_a_standby() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            hung["pid"] = conn.info.backend_pid
            conn.execute("UPDATE t SET v = 'committed, not yet visible' WHERE id = 7")

    def reset() -> None:
        admin.execute("ALTER SYSTEM RESET synchronous_standby_names")
        admin.execute("SELECT pg_reload_conf()")

    async def main() -> tuple[Any, Any, bool]:
        copy = Copy({"t": ("id",), "marker": ("id",)})
        app = WalEx(local, publication="pub", name="settlecancel", backfill_chunk_size=10,
                    modules=[copy.events])
        async with app:
            await caught_up(admin, copy)
            admin.execute("ALTER SYSTEM SET synchronous_standby_names = 'nobody'")
            admin.execute("SELECT pg_reload_conf()")
            thread = threading.Thread(target=commit_waiting_for_a_standby)
            thread.start()
            try:
                await until(lambda: copy.rows["t"].get((7,), {}).get("v")
                            == "committed, not yet visible", "the streamed update")
                backfills = app.pipeline.backfill
                task = asyncio.create_task(app.backfill("t"))
                await until(lambda: backfills.waiting_for, "the backfill to wait", 30)
                job = await asyncio.wait_for(app.cancel_backfill("t"), 60)
                stopped = backfills.current is None  # the runner let go of the job
                outcome = (await asyncio.gather(task, return_exceptions=True))[0]
            finally:
                await asyncio.to_thread(reset)
                await asyncio.to_thread(thread.join)
        return job, outcome, stopped

    try:
        job, outcome, stopped = run(main(), timeout=150)
    finally:
        reset()
    assert job is not None and job.state == "cancelled"
    assert stopped
    assert isinstance(outcome, BackfillCancelledError), outcome
    assert admin.execute("SELECT state, rows_done FROM walex_backfill").fetchone() == (
        "cancelled", 0)


# keys PostgreSQL accepts that Python cannot hash (arrays, jsonb) or compare (NaN), and
# jsonb keys equal in Python but not in PostgreSQL (true and 1); the key changed
# after each chunk's snapshot is the one named last
KEYS = {
    "int[]": ("int[]", ["'{1,2}'", "'{3}'", "'{}'", "'{4,NULL}'"], "'{1,2}'"),
    "text[]": ("text[]", ["'{a,b}'", "'{c}'"], "'{a,b}'"),
    "jsonb": ("jsonb", ["'true'", "'1'", "'{\"a\": [1, true]}'", "'[1, 2]'", "'\"x\"'"], "'1'"),
    "jsonb-scalars": ("jsonb", ["'true'", "'1'", "'false'", "'0'"], "'1'"),  # equal in Python
    "float8": ("float8", ["'NaN'", "1.5", "'-Infinity'", "0"], "'NaN'"),
    "numeric": ("numeric", ["'NaN'", "2", "2.50"], "'NaN'"),
    "int4multirange": ("int4multirange", ["'{[1,3), [5,7)}'", "'{}'", "'{[2,3)}'"],
                       "'{[1,3), [5,7)}'"),
    "composite": ("pair", ["ROW('{1}', 'NaN')", "ROW('{2}', 1)", "ROW('{}', 'NaN')"],
                  "ROW('{1}', 'NaN')::pair"),
}


def _repr_rows(rows: dict[Any, dict[str, Any]]) -> dict[str, str]:
    # NaN is not equal to itself and lists are unhashable: compare the reprs
    return {repr(k): repr(sorted(r.items())) for k, r in rows.items()}


class ReprCopy(Copy):
    def key(self, table: str, record: dict[str, Any]) -> tuple[Any, ...]:
        if table != "k":
            return super().key(table, record)
        return (repr(record["id"]),)


@pytest.mark.parametrize("kind", list(KEYS))
def test_keys_python_cannot_hash_or_compare(
    dsn: str, admin: psycopg.Connection, monkeypatch: pytest.MonkeyPatch, kind: str,
) -> None:
    pgtype, values, changed = KEYS[kind]
    admin.execute("CREATE TABLE marker (id serial PRIMARY KEY)")
    admin.execute("CREATE TYPE pair AS (a int[], b float8)")
    admin.execute(f"CREATE TABLE k (id {pgtype} PRIMARY KEY, v text)")
    for value in values:
        admin.execute(f"INSERT INTO k VALUES ({value}, 'old')")
    admin.execute("CREATE PUBLICATION pub FOR TABLE k, marker")
    real = backfill_chunks.read_chunk

    async def racing(conn: Any, target: Any, table: Any, adapters: Any, where: Any,
                     after: list[str] | None, limit: int, **kw: Any) -> Any:
        chunk = await real(conn, target, table, adapters, where, after, limit, **kw)
        if after is None:
            admin.execute(f"UPDATE k SET v = 'after the snapshot' WHERE id = {changed}")
        return chunk

    monkeypatch.setattr(backfill_chunks, "read_chunk", racing)

    async def main() -> tuple[Copy, Any]:
        copy = ReprCopy({"k": ("id",), "marker": ("id",)})
        app = WalEx(dsn, publication="pub", name="keys", modules=[copy.events])
        async with app:
            job = await app.backfill("k")
            await caught_up(admin, copy)
        return copy, job

    copy, job = run(main())
    assert job.state == "done"
    if kind != "composite":  # psycopg's own connection gets a composite as text
        with admin.cursor(row_factory=psycopg.rows.dict_row) as cur:
            table = {(repr(r["id"]),): r for r in cur.execute("SELECT * FROM k")}
        assert _repr_rows(copy.rows["k"]) == _repr_rows(table)
    # every row once, the changed one from the stream only
    assert sorted(r["v"] for r in copy.rows["k"].values()) == sorted(
        r[0] for r in admin.execute("SELECT v FROM k"))
    assert copy.counts["read"] == len(values) - 1 and copy.counts["update"] == 1


def test_a_chunk_is_not_marked_done_past_a_row_still_to_read_again(
    dsn: str, admin: psycopg.Connection, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Row 5 is changed again each time it is read again: the progress store never moves
    past the row before it, so a restart (here: a stop, then a new app) reads it again."""
    _doc_schema(admin, 40)
    real = backfill_chunks.read_chunk
    state = {"busy": True, "tries": 0}
    marks: list[Any] = []

    async def racing(conn: Any, target: Any, table: Any, adapters: Any, where: Any,
                     after: list[str] | None, limit: int, **kw: Any) -> Any:
        again = [key for _, key in kw.get("again") or ()]
        if state["busy"] and (after is None or ("5",) in again):
            state["tries"] += 1
            admin.execute("UPDATE doc SET n = n + 1 WHERE id = 5")  # after the low watermark
        if ("5",) in again:
            marks.append(admin.execute("SELECT last_key FROM walex_backfill").fetchone()[0])
        return await real(conn, target, table, adapters, where, after, limit, **kw)

    monkeypatch.setattr(backfill_chunks, "read_chunk", racing)
    copy = MergingCopy({"doc": ("id",), "marker": ("id",)})

    def app() -> WalEx:
        return WalEx(dsn, publication="pub", name="marks", durable_slot=True,
                     backfill_chunk_size=10, modules=[copy.events])

    def progress() -> tuple[Any, ...]:
        if admin.execute("SELECT to_regclass('walex_backfill')").fetchone() == (None,):
            return (None, 0, None)
        row = admin.execute("SELECT state, rows_done, last_key FROM walex_backfill").fetchone()
        return row or (None, 0, None)

    async def main() -> tuple[Any, ...]:
        first = app()
        async with first:
            waiting = asyncio.create_task(first.backfill("doc"))
            # rows_done counts the read events delivered: every row but row 5
            await until(lambda: progress()[1] == 39 and state["tries"] > 5,
                        "every chunk read, row 5 still to read again", 60)
        await asyncio.gather(waiting, return_exceptions=True)
        stopped = progress()
        state["busy"] = False
        async with app():
            await until(lambda: progress()[0] == "done", "the resumed backfill", 60)
            await caught_up(admin, copy)
        return stopped

    stopped = run(main(), timeout=150)
    assert stopped[0] == "running" and stopped[2] == ["4"]
    assert marks and all(m in (None, ["4"]) for m in marks)
    _complete(copy, admin)


def test_a_row_to_read_again_is_found_after_a_row_inserted_before_it(
    dsn: str, admin: psycopg.Connection, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A row left out of its chunk by an update without its TOASTed value, and a row
    inserted just before it in key order before it is read again: the row is still read
    again (not taken for deleted because the first row after the one before it is another)."""
    admin.execute("CREATE TABLE marker (id serial PRIMARY KEY)")
    admin.execute("CREATE TABLE doc (id int PRIMARY KEY, body text, n int NOT NULL DEFAULT 0)")
    admin.execute("ALTER TABLE doc ALTER COLUMN body SET STORAGE EXTERNAL")
    admin.execute(f"INSERT INTO doc SELECT 2 * g, {BIG}, 0 FROM generate_series(1, 20) g")
    admin.execute("CREATE PUBLICATION pub FOR TABLE doc, marker")
    real = backfill_chunks.read_chunk
    tried: list[tuple[str, ...]] = []

    async def racing(conn: Any, target: Any, table: Any, adapters: Any, where: Any,
                     after: list[str] | None, limit: Any, **kw: Any) -> Any:
        again = [key for _, key in kw.get("again") or ()]
        if again == [("8",)] and not tried:  # before it is read again: a row before it
            admin.execute(f"INSERT INTO doc VALUES (7, {BIG}, 0)")
        tried.extend(again)
        chunk = await real(conn, target, table, adapters, where, after, limit, **kw)
        if after is None and limit:  # after the first chunk's read: row 8 left to the stream
            admin.execute("UPDATE doc SET n = n + 1 WHERE id = 8")
        return chunk

    monkeypatch.setattr(backfill_chunks, "read_chunk", racing)

    async def main() -> tuple[Copy, Any]:
        copy = MergingCopy({"doc": ("id",), "marker": ("id",)})
        app = WalEx(dsn, publication="pub", name="toastbefore", backfill_chunk_size=10,
                    modules=[copy.events])
        async with app:
            job = await app.backfill("doc")
            await caught_up(admin, copy)
        return copy, job

    copy, job = run(main())
    assert job.state == "done" and ("8",) in tried
    _complete(copy, admin)
