"""Existing rows as read events: initial snapshot, backfill under concurrent changes and
around each chunk's snapshot, typing, keys, conditions, filters, truncate, reconnect, stop,
DDL, the progress store (walex.backfill). Crash and memory: test_backfill_process.py."""

from __future__ import annotations

import asyncio
import random
import threading
from typing import Any

import psycopg
import pytest

from psycopg.conninfo import make_conninfo

from support import collecting, run, until
from walex import ConfigError, Event, Events, EventType, ReplicationError, SetupError, WalEx
from walex.backfill import chunks as backfill_chunks  # the runner imports read_chunk on use


class Copy:
    """What a consumer building a copy of tables keeps: rows by key, from every event."""

    def __init__(self, keys: dict[str, tuple[str, ...]]) -> None:
        self.keys = keys
        self.rows: dict[str, dict[tuple[Any, ...], dict[str, Any]]] = {t: {} for t in keys}
        self.counts: dict[str, int] = {}
        self.events = Events()
        self.events.on_event("all")(self.apply)

    def key(self, table: str, record: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(record[k] for k in self.keys[table])

    async def apply(self, events: list[Event]) -> None:
        for e in events:
            self.counts[e.type.value] = self.counts.get(e.type.value, 0) + 1
            rows = self.rows.setdefault(e.name, {})
            if e.type in (EventType.READ, EventType.INSERT):
                rows[self.key(e.name, e.new_record)] = e.new_record
            elif e.type is EventType.UPDATE:
                if e.old_record is not None:
                    rows.pop(self.key(e.name, e.old_record), None)
                rows[self.key(e.name, e.new_record)] = e.new_record
            elif e.type is EventType.DELETE:
                rows.pop(self.key(e.name, e.old_record), None)
            elif e.type is EventType.TRUNCATE:
                rows.clear()


def table_rows(admin: psycopg.Connection, table: str, keys: tuple[str, ...]) -> dict:
    with admin.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return {tuple(r[k] for k in keys): r for r in cur.execute(f"SELECT * FROM {table}")}


def jobs(admin: psycopg.Connection) -> dict[str, tuple]:
    return {r[0]: r[1:] for r in admin.execute(
        "SELECT table_name, state, rows_done, chunks_done, last_key, error FROM walex_backfill")}


async def caught_up(admin: psycopg.Connection, copy: Copy, timeout: float = 30) -> None:
    """Wait until the stream delivered a marker row committed now (everything before it is in)."""
    marker = admin.execute("INSERT INTO marker DEFAULT VALUES RETURNING id").fetchone()[0]
    await until(lambda: (marker,) in copy.rows.get("marker", {}), "the marker row", timeout)


def _schema(admin: psycopg.Connection) -> None:
    admin.execute("CREATE TABLE marker (id serial PRIMARY KEY)")


def test_initial_snapshot_then_live_changes(dsn: str, admin: psycopg.Connection) -> None:
    _schema(admin)
    admin.execute("CREATE TABLE item (id int PRIMARY KEY, name text, price numeric, "
                  "tags jsonb, at timestamptz DEFAULT now())")
    admin.execute("INSERT INTO item (id, name, price, tags) SELECT g, 'item ' || g, g * 1.5, "
                  "jsonb_build_object('g', g) FROM generate_series(1, 250) g")
    admin.execute("CREATE TABLE pair (a text, b int, v text, PRIMARY KEY (b, a))")
    admin.execute("INSERT INTO pair SELECT 'k' || (g % 7), g, 'v' FROM generate_series(1, 60) g")
    admin.execute("CREATE TABLE empty (id int PRIMARY KEY)")
    admin.execute("CREATE PUBLICATION pub FOR ALL TABLES")  # the progress store is published too
    keys = {"item": ("id",), "pair": ("a", "b"), "empty": ("id",), "marker": ("id",)}

    tables: dict[str, dict] = {}

    async def main() -> tuple[Copy, Copy]:
        copy = Copy(keys)
        app = WalEx(dsn, publication="pub", name="snap", durable_slot=True, snapshot="initial",
                    backfill_chunk_size=40, modules=[copy.events])
        async with app:
            admin.execute("UPDATE item SET price = -1 WHERE id % 10 = 0")
            admin.execute("DELETE FROM item WHERE id % 25 = 1")
            admin.execute("INSERT INTO item (id, name) VALUES (1000, 'new')")
            admin.execute("INSERT INTO pair VALUES ('zz', 0, 'first')")
            await until(lambda: all(j[0] == "done" for j in jobs(admin).values())
                        and len(jobs(admin)) == 4, "the snapshot", 30)
            await caught_up(admin, copy)
            tables.update({t: table_rows(admin, t, keys[t]) for t in ("item", "pair", "empty")})
        second = Copy(keys)  # a restart takes no new snapshot: the slot exists
        app2 = WalEx(dsn, publication="pub", name="snap", durable_slot=True, snapshot="initial",
                     backfill_chunk_size=40, modules=[second.events])
        async with app2:
            admin.execute("UPDATE item SET name = 'renamed' WHERE id = 2")
            await caught_up(admin, second)
        return copy, second

    copy, second = run(main())
    for table in ("item", "pair", "empty"):
        assert copy.rows[table] == tables[table], table
    # the changes made at start came before or after the chunks: either way 300 or so reads
    assert 290 <= copy.counts["read"] <= 311
    assert {t: s[0] for t, s in jobs(admin).items()} == {
        "item": "done", "pair": "done", "empty": "done", "marker": "done"}
    assert "walex_backfill" not in copy.rows  # the store's own changes never reach handlers
    assert "read" not in second.counts and second.counts["update"] == 1


def test_backfill_while_a_workload_changes_the_same_rows(dsn: str, admin: psycopg.Connection) -> None:
    _schema(admin)
    admin.execute("CREATE TABLE acct (id int PRIMARY KEY, balance int NOT NULL, note text)")
    admin.execute("INSERT INTO acct SELECT g * 2, 0, 'x' FROM generate_series(1, 4000) g")
    admin.execute("CREATE PUBLICATION pub FOR TABLE acct, marker")
    stop = threading.Event()
    done = {"txns": 0}

    def workload() -> None:
        rnd = random.Random(12)
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.is_set():
                with conn.transaction():
                    for _ in range(8):
                        i, op = rnd.randrange(1, 8002), rnd.random()
                        if op < 0.6:
                            conn.execute("UPDATE acct SET balance = balance + 1 WHERE id = %s", (i,))
                        elif op < 0.8:
                            conn.execute("DELETE FROM acct WHERE id = %s", (i,))
                        else:
                            conn.execute("INSERT INTO acct VALUES (%s, 0, 'new') ON CONFLICT (id) "
                                         "DO UPDATE SET note = 'again'", (i,))
                done["txns"] += 1

    async def main() -> tuple[Copy, Any, WalEx]:
        copy = Copy({"acct": ("id",), "marker": ("id",)})
        app = WalEx(dsn, publication="pub", name="busy", backfill_chunk_size=150,
                    modules=[copy.events])
        thread = threading.Thread(target=workload)
        async with app:
            thread.start()
            try:
                await until(lambda: done["txns"] > 20, "the workload to start")
                before = done["txns"]
                job = await app.backfill("acct")
                done["during"] = done["txns"] - before
            finally:
                stop.set()
                await asyncio.to_thread(thread.join)
            await caught_up(admin, copy)
        return copy, job, app

    copy, job, _ = run(main())
    assert copy.rows["acct"] == table_rows(admin, "acct", ("id",))
    assert job.state == "done" and job.chunks_done >= 20
    assert done["during"] > 0  # transactions of the workload committed during the backfill


def test_rows_changed_while_their_chunk_is_read_come_from_the_stream(
    dsn: str, admin: psycopg.Connection, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Changes committed between the low watermark and the chunk's snapshot, and between
    the snapshot and the high watermark, of rows of that very chunk: never overwritten."""
    _schema(admin)
    admin.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    admin.execute("INSERT INTO t SELECT g * 10, 'old' FROM generate_series(1, 100) g")
    admin.execute("CREATE PUBLICATION pub FOR TABLE t, marker")
    real = backfill_chunks.read_chunk

    async def racing(conn: Any, target: Any, table: Any, adapters: Any, where: Any,
                     after: list[str] | None, limit: int, **kw: Any) -> Any:
        base = int(after[0]) if after else 0
        admin.execute("UPDATE t SET v = 'seen by the snapshot' WHERE id = %s", (base + 10,))
        chunk = await real(conn, target, table, adapters, where, after, limit, **kw)
        admin.execute("UPDATE t SET v = 'after the snapshot' WHERE id = %s", (base + 30,))
        admin.execute("DELETE FROM t WHERE id = %s", (base + 40,))
        admin.execute("INSERT INTO t VALUES (%s, 'inserted')", (base + 45,))
        admin.execute("UPDATE t SET id = id + 5 WHERE id = %s", (base + 60,))
        return chunk

    monkeypatch.setattr(backfill_chunks, "read_chunk", racing)

    async def main() -> tuple[Copy, Any, int]:
        copy = Copy({"t": ("id",), "marker": ("id",)})
        app = WalEx(dsn, publication="pub", name="race", backfill_chunk_size=10,
                    modules=[copy.events])
        async with app:
            job = await app.backfill("t")
            await caught_up(admin, copy)
            left = app.pipeline.backfill.rows_left_to_stream
        return copy, job, left

    copy, job, left = run(main())
    assert copy.rows["t"] == table_rows(admin, "t", ("id",))
    assert left >= 3 * 9  # per chunk: the update, the delete and the key change after the snapshot


def test_a_commit_the_chunk_snapshot_cannot_see_yet_is_not_overwritten(
    dsn: str, admin: psycopg.Connection, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A transaction whose commit is in the stream but not yet visible (it waits for a
    synchronous standby) while the next chunks are read: its row comes from the stream."""
    local = make_conninfo(dsn, options="-c synchronous_commit=local")
    _schema(admin)
    admin.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    admin.execute("INSERT INTO t SELECT g * 10, 'old' FROM generate_series(1, 12) g")
    admin.execute("CREATE PUBLICATION pub FOR TABLE t, marker")
    real = backfill_chunks.read_chunk
    hung: dict[str, Any] = {}

    def commit_waiting_for_a_standby() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            hung["pid"] = conn.info.backend_pid
            conn.execute("UPDATE t SET v = 'committed late' WHERE id = 100")

    async def racing(conn: Any, target: Any, table: Any, adapters: Any, where: Any,
                     after: list[str] | None, limit: int, **kw: Any) -> Any:
        chunk = await real(conn, target, table, adapters, where, after, limit, **kw)
        if after is None:  # chunk 1 was read: a commit of a row of chunk 3 goes by, unseen
            admin.execute("ALTER SYSTEM SET synchronous_standby_names = 'nobody'")
            admin.execute("SELECT pg_reload_conf()")
            hung["thread"] = threading.Thread(target=commit_waiting_for_a_standby)
            hung["thread"].start()
            await until(lambda: "pid" in hung and admin.execute(
                "SELECT wait_event FROM pg_stat_activity WHERE pid = %s", (hung["pid"],)
            ).fetchone() == ("SyncRep",), "a commit waiting for the standby")
        elif after == ["80"]:  # chunk 3 read while that commit is still invisible
            admin.execute("ALTER SYSTEM RESET synchronous_standby_names")
            admin.execute("SELECT pg_reload_conf()")
            await asyncio.to_thread(hung["thread"].join)
        return chunk

    monkeypatch.setattr(backfill_chunks, "read_chunk", racing)

    async def main() -> Copy:
        copy = Copy({"t": ("id",), "marker": ("id",)})
        app = WalEx(local, publication="pub", name="standby", backfill_chunk_size=4,
                    modules=[copy.events])
        async with app:
            await app.backfill("t")
            await caught_up(admin, copy)
        return copy

    try:
        copy = run(main())
    finally:
        admin.execute("ALTER SYSTEM RESET synchronous_standby_names")
        admin.execute("SELECT pg_reload_conf()")
    assert copy.rows["t"][(100,)]["v"] == "committed late"
    assert copy.rows["t"] == table_rows(admin, "t", ("id",))


def test_read_events_are_typed_exactly_like_inserts(dsn: str, admin: psycopg.Connection) -> None:
    from test_types import ROW_VALUES, SCHEMA, same

    admin.execute(SCHEMA)
    admin.execute("ALTER TABLE typed ADD COLUMN c_gen int GENERATED ALWAYS AS (id * 2) STORED")

    async def main() -> list[Event]:
        async with collecting(dsn, subscriptions=["typed"]) as rec:
            admin.execute(f"INSERT INTO typed VALUES {ROW_VALUES}")
            await rec.wait_for(5)
            job = await rec.app.backfill("typed")
            assert (job.state, job.rows_done, job.chunk_key) == ("done", 5, ["id"])
            return await rec.wait_for(10)

    events = run(main())
    inserts, reads = events[:5], events[5:]
    assert [e.type for e in reads] == [EventType.READ] * 5
    for insert, read in zip(inserts, reads):
        assert read.source == insert.source and read.name == insert.name
        assert list(read.new_record) == list(insert.new_record)  # no generated column either
        wrong = {k: (v, insert.new_record[k]) for k, v in read.new_record.items()
                 if not same(v, insert.new_record[k])}
        assert not wrong
        assert read.old_record is None and read.changes is None
    assert len({e.id for e in events}) == 10
    assert all(e.id[16:18] == "-R" and len(e.id) == len(inserts[0].id) for e in reads)
    assert sorted(e.id for e in events) == [e.id for e in events]  # increasing in stream order
    assert reads[0].lsn != inserts[0].lsn and reads[0].timestamp > inserts[0].timestamp


def test_read_events_name_the_primary_key_as_streamed_ones_do(
    dsn: str, admin: psycopg.Connection
) -> None:
    """Under REPLICA IDENTITY FULL the stream flags every column as key; Source.primary_key
    (the destinations' subject and partition) is the primary key for reads too."""
    admin.execute("CREATE TABLE full_t (b int, a int, note text, PRIMARY KEY (a, b))")
    admin.execute("ALTER TABLE full_t REPLICA IDENTITY FULL")
    admin.execute("CREATE TABLE uniq_t (u int NOT NULL UNIQUE, note text)")
    admin.execute("ALTER TABLE uniq_t REPLICA IDENTITY FULL")
    admin.execute("CREATE PUBLICATION pub FOR ALL TABLES")

    async def main() -> list[Event]:
        async with collecting(dsn, subscriptions=["full_t", "uniq_t"]) as rec:
            admin.execute("INSERT INTO full_t VALUES (1, 2, 'x')")
            admin.execute("INSERT INTO uniq_t VALUES (1, 'x')")
            await rec.wait_for(2)
            await rec.app.backfill("full_t")
            await rec.app.backfill("uniq_t")
            return await rec.wait_for(4)

    inserted_full, inserted_uniq, read_full, read_uniq = run(main())
    assert read_full.type == EventType.READ and read_full.name == "full_t"
    assert read_full.source == inserted_full.source
    assert read_full.source.primary_key == ("a", "b")
    assert read_uniq.source == inserted_uniq.source and read_uniq.source.primary_key == ()


def test_the_publication_decides_columns_and_rows(dsn: str, admin: psycopg.Connection) -> None:
    admin.execute("CREATE TABLE t (id int PRIMARY KEY, shown text, hidden text, n int)")
    admin.execute("INSERT INTO t SELECT g, 's' || g, 'h', g FROM generate_series(1, 20) g")
    admin.execute("CREATE PUBLICATION pub FOR TABLE t (id, shown, n) WHERE (n > 5)")

    async def main() -> list[Event]:
        async with collecting(dsn, subscriptions=["t"], backfill_chunk_size=4) as rec:
            await rec.app.backfill("t", where="n % 2 = 0")
            return await rec.wait_for(8)

    reads = run(main())  # the column list, the row filter, the condition: 6, 8, ..., 20
    assert [e.new_record for e in reads] == [
        {"id": g, "shown": f"s{g}", "n": g} for g in range(6, 21, 2)]


def test_chunk_keys_and_tables_without_one(dsn: str, admin: psycopg.Connection) -> None:
    admin.execute("CREATE TABLE by_unique (code text NOT NULL UNIQUE, n int UNIQUE, v text)")
    admin.execute("ALTER TABLE by_unique REPLICA IDENTITY FULL")
    admin.execute("INSERT INTO by_unique SELECT 'c' || g, g, 'v' FROM generate_series(1, 30) g")
    admin.execute("CREATE TABLE by_identity (id int PRIMARY KEY, code int NOT NULL UNIQUE, v text)")
    admin.execute("ALTER TABLE by_identity REPLICA IDENTITY USING INDEX by_identity_code_key")
    admin.execute("INSERT INTO by_identity SELECT g, 100 - g, 'v' FROM generate_series(1, 30) g")
    admin.execute("CREATE TABLE nokey (n int UNIQUE, v text)")  # unique but nullable: no key
    admin.execute("ALTER TABLE nokey REPLICA IDENTITY FULL")
    admin.execute("CREATE TABLE not_subscribed (id int PRIMARY KEY)")
    admin.execute("CREATE PUBLICATION pub FOR ALL TABLES")

    async def main() -> tuple[list[Any], list[Event]]:
        async with collecting(dsn, subscriptions=["by_unique", "by_identity", "nokey"],
                              backfill_chunk_size=7) as rec:
            jobs_done = [await rec.app.backfill("by_unique"), await rec.app.backfill("by_identity")]
            with pytest.raises(SetupError, match=r"public.nokey has no primary key .*ADD PRIMARY KEY"):
                await rec.app.backfill("nokey")
            with pytest.raises(ConfigError, match="not among the app's subscriptions"):
                await rec.app.backfill("not_subscribed")
            with pytest.raises(SetupError, match="'no_such_table' does not exist"):
                await rec.app.backfill("no_such_table")
            with pytest.raises(ConfigError, match="is not a valid condition"):
                await rec.app.backfill("by_unique", where="no_such_column = 1")
            return jobs_done, await rec.wait_for(60)

    (by_unique, by_identity), events = run(main())
    assert by_unique.chunk_key == ["code"]  # the unique NOT NULL index (n may be NULL)
    assert by_identity.chunk_key == ["code"]  # the replica identity index: deletes carry it
    assert [e.new_record["code"] for e in events[:30]] == sorted(f"c{g}" for g in range(1, 31))
    assert [e.new_record["code"] for e in events[30:]] == list(range(70, 100))


def test_snapshot_initial_of_a_table_without_key_fails_before_the_slot_exists(
    dsn: str, admin: psycopg.Connection,
) -> None:
    admin.execute("CREATE TABLE nokey (v text)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE nokey")
    app = WalEx(dsn, publication="pub", name="nokeys", durable_slot=True, snapshot="initial")
    with pytest.raises(SetupError, match=r"snapshot='initial' cannot read every subscribed table "
                                         r"\(the slot was not created\).*nokey has no primary key"):
        run(app.start())
    assert admin.execute("SELECT count(*) FROM pg_replication_slots").fetchone()[0] == 0


def test_read_events_pass_the_filters(dsn: str, admin: psycopg.Connection) -> None:
    admin.execute("CREATE TABLE u (id int PRIMARY KEY, subscribed bool)")
    admin.execute("INSERT INTO u SELECT g, g % 2 = 0 FROM generate_series(1, 10) g")
    admin.execute("CREATE PUBLICATION pub FOR TABLE u")
    mine = Events()
    got: dict[str, list[int]] = {"read": [], "insert": [], "fields": []}

    @mine.on_read("u", unwatched_records={"subscribed": False})
    async def reads(events: list[Event]) -> None:
        got["read"] += [e.new_record["id"] for e in events]

    @mine.on_insert("u")
    async def inserts(events: list[Event]) -> None:
        got["insert"] += [e.new_record["id"] for e in events]

    @mine.on_event("u", unwatched_fields=["subscribed"])  # an update filter: reads pass
    async def fields(events: list[Event]) -> None:
        got["fields"] += [e.new_record["id"] for e in events if e.new_record]

    async def main() -> None:
        async with collecting(dsn, subscriptions=["u"], modules=[mine]) as rec:
            await rec.app.backfill("u")
            await rec.wait_for(10)

    run(main())
    assert got == {"read": [2, 4, 6, 8, 10], "insert": [], "fields": list(range(1, 11))}


@pytest.mark.parametrize("durable", [True, False], ids=["durable", "temporary"])
def test_a_truncate_or_a_reconnect_while_a_chunk_is_read(
    dsn: str, admin: psycopg.Connection, monkeypatch: pytest.MonkeyPatch, durable: bool,
) -> None:
    """A TRUNCATE in a chunk's window: the chunk is read again. A reconnect: a durable slot
    sends the watermarks again, a new temporary slot does not have them: read again."""
    _schema(admin)
    admin.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    admin.execute("INSERT INTO t SELECT g, 'old' FROM generate_series(1, 40) g")
    admin.execute("CREATE PUBLICATION pub FOR TABLE t, marker")
    real = backfill_chunks.read_chunk
    calls: list[list[str] | None] = []

    async def racing(conn: Any, target: Any, table: Any, adapters: Any, where: Any,
                     after: list[str] | None, limit: int, **kw: Any) -> Any:
        chunk = await real(conn, target, table, adapters, where, after, limit, **kw)
        calls.append(after)
        if len(calls) == 2:  # the walsender goes away while chunk 2 is in flight
            admin.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots")
        elif len(calls) == 4:  # and then a TRUNCATE (and new rows) while chunk 3 is
            admin.execute("TRUNCATE t")
            admin.execute("INSERT INTO t SELECT g, 'new' FROM generate_series(25, 45) g")
        return chunk

    monkeypatch.setattr(backfill_chunks, "read_chunk", racing)

    async def main() -> tuple[Copy, Any, int]:
        copy = Copy({"t": ("id",), "marker": ("id",)})
        app = WalEx(dsn, publication="pub", name="again", durable_slot=durable,
                    backfill_chunk_size=10, modules=[copy.events])
        async with app:
            job = await app.backfill("t")
            await caught_up(admin, copy)
        return copy, job, app.pipeline.backfill.chunks_redone

    copy, job, redone = run(main(), timeout=120)
    assert copy.rows["t"] == table_rows(admin, "t", ("id",))
    assert job.state == "done"
    if durable:  # chunk 2 went through (unless the slot had confirmed its low watermark)
        assert calls[:6] == [None, ["10"], ["20"], ["30"], ["30"], ["40"]] or redone == 2
        assert redone >= 1
    else:
        assert calls[:6] == [None, ["10"], ["10"], ["20"], ["20"], ["34"]] and redone == 2


def test_a_stopped_backfill_resumes_at_the_next_start(dsn: str, admin: psycopg.Connection) -> None:
    admin.execute("CREATE TABLE t (id int PRIMARY KEY)")
    admin.execute("INSERT INTO t SELECT g FROM generate_series(1, 2000) g")
    admin.execute("CREATE PUBLICATION pub FOR TABLE t")
    seen: list[int] = []
    slow = Events()

    @slow.on_read("t")
    async def record(events: list[Event]) -> None:
        seen.extend(e.new_record["id"] for e in events)
        await asyncio.sleep(0.05)

    def app() -> WalEx:
        return WalEx(dsn, publication="pub", name="resume", durable_slot=True,
                     backfill_chunk_size=100, batch_size=50, modules=[slow])

    async def main() -> tuple[int, Any]:
        first = app()
        async with first:
            waiting = asyncio.create_task(first.backfill("t"))
            await until(lambda: len(seen) >= 500, "some chunks")
        with pytest.raises(ReplicationError, match="stopped before the backfill of public.t "
                                                   "finished; it resumes at the next start"):
            await waiting
        stopped_at = len(seen)
        second = app()
        async with second:
            await until(lambda: jobs(admin)["t"][0] == "done", "the resumed backfill", 60)
        return stopped_at, jobs(admin)["t"]

    stopped_at, job = run(main(), timeout=120)
    assert sorted(set(seen)) == list(range(1, 2001))
    assert len(seen) - 2000 <= 200  # at most the chunks handled since the last mark, again
    assert stopped_at < 2000 and job[1] == 2000


def test_the_progress_store_can_live_elsewhere_and_must_be_writable(
    dsn: str, admin: psycopg.Connection,
) -> None:
    admin.execute("CREATE SCHEMA ops")
    admin.execute("CREATE TABLE t (id int PRIMARY KEY)")
    admin.execute("INSERT INTO t VALUES (1), (2)")
    admin.execute("CREATE PUBLICATION pub FOR ALL TABLES")

    async def main() -> None:
        async with collecting(dsn, backfill_table="ops.progress") as rec:
            await rec.app.backfill("t")
            await rec.wait_for(2)
            await rec.settle()
            assert {e.name for e in rec.events} == {"t"}  # not ops.progress's own changes
        async with collecting(dsn, backfill_table="nowhere.progress") as rec:
            with pytest.raises(SetupError, match=r"cannot write the backfill progress store "
                                                 r"'nowhere.progress': .*set backfill_table"):
                await rec.app.backfill("t")

    run(main())
    assert admin.execute("SELECT table_name, state FROM ops.progress").fetchall() == [("t", "done")]
    with pytest.raises(ConfigError, match="backfill_table: must be a table name or 'schema.table'"):
        WalEx(dsn, publication="pub", backfill_table="progress; DROP TABLE t")


def test_a_column_added_during_a_backfill_is_in_the_next_chunks(
    dsn: str, admin: psycopg.Connection, monkeypatch: pytest.MonkeyPatch,
) -> None:
    _schema(admin)
    admin.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    admin.execute("INSERT INTO t SELECT g, 'v' FROM generate_series(1, 30) g")
    admin.execute("CREATE PUBLICATION pub FOR TABLE t, marker")
    real = backfill_chunks.read_chunk
    calls: list[Any] = []

    async def migrating(conn: Any, target: Any, table: Any, adapters: Any, where: Any,
                        after: list[str] | None, limit: int, **kw: Any) -> Any:
        calls.append(after)
        if after == ["10"] and calls.count(after) == 1:  # a migration between chunks 1 and 2
            admin.execute("ALTER TABLE t ADD COLUMN extra int DEFAULT 7")
        return await real(conn, target, table, adapters, where, after, limit, **kw)

    monkeypatch.setattr(backfill_chunks, "read_chunk", migrating)

    async def main() -> Copy:
        copy = Copy({"t": ("id",), "marker": ("id",)})
        async with collecting(dsn, subscriptions=["t", "marker"], modules=[copy.events],
                              backfill_chunk_size=10) as rec:
            await rec.app.backfill("t")
            await caught_up(admin, copy)
        return copy

    copy = run(main())
    assert calls == [None, ["10"], ["10"], ["20"], ["30"]]  # chunk 2 read again, with the new column
    assert copy.rows["t"][(11,)] == {"id": 11, "v": "v", "extra": 7}
    assert copy.rows["t"][(1,)] == {"id": 1, "v": "v"}  # read before the migration


def test_the_progress_store_cannot_move_while_the_app_exists(dsn: str) -> None:
    app = WalEx(dsn, publication="pub")
    app.config.replace("backfill_chunk_size", 500)  # the next backfill reads 500 rows a chunk
    assert app.pipeline.settings.backfill_chunk_size == 500
    with pytest.raises(ConfigError, match="backfill_table cannot change while the app exists"):
        app.config.replace("backfill_table", "elsewhere")


def test_a_service_logs_progress_with_rate_and_time_left(
    dsn: str, admin: psycopg.Connection, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from walex.backfill import report

    monkeypatch.setattr(report, "LOG_INTERVAL", 0.0)  # a line per chunk instead of every 10 s
    admin.execute("CREATE TABLE t (id int PRIMARY KEY)")
    admin.execute("INSERT INTO t SELECT g FROM generate_series(1, 100) g")
    admin.execute("ANALYZE t")
    admin.execute("CREATE PUBLICATION pub FOR TABLE t")

    async def main() -> None:
        async with collecting(dsn, name="logs", backfill_chunk_size=20) as rec:
            await rec.app.backfill("t")

    with caplog.at_level("INFO", logger="walex.backfill"):
        run(main())
    lines = [r.getMessage() for r in caplog.records if r.name == "walex.backfill"]
    assert lines[0] == "walex 'logs': backfilling public.t by id (~100 rows)"
    progress = [line for line in lines if "rows/s, about" in line]
    assert progress and progress[0].startswith("walex 'logs': backfill of public.t: 20 of ~100 "
                                               "rows (20%), ")
    assert lines[-1].startswith("walex 'logs': backfill of public.t done: 100 rows in ")
