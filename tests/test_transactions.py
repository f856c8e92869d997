"""Transactions: TRUNCATE, WAL order, which handler gets which list, commit order, ids."""

from __future__ import annotations

import asyncio
import threading

import psycopg
from psycopg import sql
from support import Recorder, collecting, run

from walex import Event, Events, EventType

INSERT, UPDATE, DELETE, TRUNCATE = (
    EventType.INSERT, EventType.UPDATE, EventType.DELETE, EventType.TRUNCATE,
)

SCHEMA = """
CREATE TABLE "user" (id int PRIMARY KEY, name text);
CREATE TABLE todo (id int PRIMARY KEY, user_id int REFERENCES "user", title text);
CREATE TABLE audit (id serial PRIMARY KEY, note text);
ALTER TABLE "user" REPLICA IDENTITY FULL;
CREATE PUBLICATION pub FOR ALL TABLES;
"""


def summary(events: list[Event]) -> list[tuple[str, str, int]]:
    """(type, table, id of the row) per event, for order checks."""
    return [(e.type.value, e.name, (e.record or {}).get("id", 0)) for e in events]


def position(event: Event) -> int:
    return int(event.id.rpartition("-")[2], 16)


def commit_part(event: Event) -> str:
    return event.id.rpartition("-")[0]


def test_truncate_cascade_one_event_per_table(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(SCHEMA)
    admin.execute("INSERT INTO \"user\" VALUES (1, 'ann'); INSERT INTO todo VALUES (1, 1, 'x')")

    async def main() -> tuple[list[Event], list[Event]]:
        async with collecting(dsn, subscriptions=["user", "todo"]) as rec:
            admin.execute('TRUNCATE "user" CASCADE')  # takes todo with it
            events = await rec.wait_for(2)
            admin.execute("INSERT INTO \"user\" VALUES (2, 'bob')")
            admin.execute('TRUNCATE todo, "user"')  # two tables named in one statement
            events = await rec.wait_for(5)
            calls = rec.calls_of("__all__")
        return events, calls

    events, calls = run(main())
    assert [(e.type, e.name) for e in events] == [
        (TRUNCATE, "user"), (TRUNCATE, "todo"),
        (INSERT, "user"),
        (TRUNCATE, "todo"), (TRUNCATE, "user"),
    ]
    assert [len(c) for c in calls] == [2, 1, 2]  # one call per transaction
    for first, second in (events[0:2], events[3:5]):
        for event in (first, second):
            assert isinstance(event, Event)
            assert event.new_record is None and event.old_record is None
            assert event.changes is None and event.record is None
        # one transaction: same commit, consecutive positions
        assert first.lsn == second.lsn and first.timestamp == second.timestamp
        assert commit_part(first) == commit_part(second)
        assert [position(first), position(second)] == [0, 1]


def test_truncate_of_an_unsubscribed_table_keeps_positions(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(SCHEMA)

    async def main() -> list[Event]:
        async with collecting(dsn, subscriptions=["todo"]) as rec:
            admin.execute('TRUNCATE "user" CASCADE')
            return await rec.wait_for(1)

    [event] = run(main())
    assert (event.type, event.name) == (TRUNCATE, "todo")
    assert position(event) == 1  # "user" was position 0, though not delivered


MIXED = [
    "INSERT INTO \"user\" VALUES (1, 'ann'), (2, 'bob')",
    "INSERT INTO todo VALUES (10, 1, 'a'), (11, 2, 'b')",
    "INSERT INTO audit (note) VALUES ('n1')",
    "UPDATE \"user\" SET name = 'anne' WHERE id = 1",
    "DELETE FROM todo WHERE id = 10",
    "INSERT INTO \"user\" VALUES (3, 'cy')",
    "UPDATE todo SET title = 'bb' WHERE id = 11",
    "DELETE FROM \"user\" WHERE id = 3",
]
MIXED_ORDER = [
    ("insert", "user", 1), ("insert", "user", 2), ("insert", "todo", 10), ("insert", "todo", 11),
    ("insert", "audit", 1), ("update", "user", 1), ("delete", "todo", 10), ("insert", "user", 3),
    ("update", "todo", 11), ("delete", "user", 3),
]


def run_mixed_transaction(admin: psycopg.Connection) -> None:
    with admin.transaction():
        for statement in MIXED:
            admin.execute(statement)


def test_handlers_get_their_lists_in_wal_order(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(SCHEMA)
    rec = Recorder()
    events = Events()
    events.on_event("all")(rec.handler("all sync", sync=True))
    events.on_event("user")(rec.handler("user async"))
    events.on_event("todo")(rec.handler("todo sync", sync=True))
    events.on_insert("user")(rec.handler("insert user async"))
    events.on_update("user")(rec.handler("update user sync", sync=True))
    events.on_delete("todo")(rec.handler("delete todo async"))
    events.on_insert(rec.handler("insert all (bare decorator)"))
    events.on_truncate("user")(rec.handler("truncate user"))  # never called: no truncate
    events.on_event("public.todo")(rec.handler("public.todo"))
    events.on_event("other.todo")(rec.handler("other.todo"))  # wrong schema: never called

    async def main() -> None:
        async with collecting(dsn, modules=[events], recorder=rec) as rec_:
            run_mixed_transaction(admin)
            await rec_.wait_for(len(MIXED_ORDER))
            await rec_.wait_calls("delete todo async", 1)
            await rec_.wait_calls("update user sync", 1)
            await rec_.settle(0.2)

    run(main())
    everything = rec.events
    assert summary(everything) == MIXED_ORDER

    def only(table: str | None = None, kind: str | None = None) -> list[tuple[str, str, int]]:
        return [s for s in MIXED_ORDER if (table is None or s[1] == table) and (kind is None or s[0] == kind)]

    expected = {
        "all sync": only(),
        "user async": only("user"),
        "todo sync": only("todo"),
        "insert user async": only("user", "insert"),
        "update user sync": only("user", "update"),
        "delete todo async": only("todo", "delete"),
        "insert all (bare decorator)": only(kind="insert"),
        "public.todo": only("todo"),
    }
    for label, wanted in expected.items():
        calls = rec.calls_of(label)
        assert len(calls) == 1, f"{label}: {len(calls)} calls"  # one call per transaction
        assert summary(calls[0]) == wanted, label
        # the same Event objects as the "all" handler got, not copies with other ids
        assert {e.id for e in calls[0]} <= {e.id for e in everything}
    assert rec.calls_of("truncate user") == [] and rec.calls_of("other.todo") == []

    # plain functions run in a worker thread, coroutine functions on the loop
    threads = {c.label: c.thread for c in rec.calls}
    main_thread = threading.main_thread().name
    assert threads["user async"] == main_thread and threads["delete todo async"] == main_thread
    assert threads["all sync"] != main_thread and threads["todo sync"] != main_thread

    # one transaction: one commit LSN, positions 0..n-1 in WAL order
    assert len({e.lsn for e in everything}) == 1 and len({commit_part(e) for e in everything}) == 1
    assert [position(e) for e in everything] == list(range(len(MIXED_ORDER)))


def test_unsubscribed_table_has_no_events_and_does_not_shift_ids(
    admin: psycopg.Connection, dsn: str
) -> None:
    """Two apps on one publication: one subscribed to every table, one to "user" only."""
    admin.execute(SCHEMA)

    async def main() -> tuple[list[Event], list[Event]]:
        async with collecting(dsn, subscriptions=["user", "todo", "audit"], name="tx_all") as every, \
                collecting(dsn, subscriptions=["user"], name="tx_user") as users:
            run_mixed_transaction(admin)
            admin.execute("INSERT INTO audit (note) VALUES ('alone')")  # nothing for tx_user
            admin.execute("INSERT INTO \"user\" VALUES (9, 'zed')")
            everything = await every.wait_for(len(MIXED_ORDER) + 2)
            user_events = await users.wait_for(6)
            await users.settle(0.3)
            assert len(users.events) == 6
            assert len(users.calls_of("__all__")) == 2  # the audit-only transaction: no call
        return everything, user_events

    everything, user_events = run(main())
    assert {e.name for e in user_events} == {"user"}
    by_id = {e.id: e for e in everything}
    for event in user_events:
        twin = by_id[event.id]  # same id as in the app that gets every table
        assert (twin.type, twin.name, twin.new_record, twin.old_record) == (
            event.type, event.name, event.new_record, event.old_record)
    assert [position(e) for e in user_events] == [0, 1, 5, 7, 9, 0]


def test_concurrent_transactions_arrive_in_commit_order(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(SCHEMA)

    async def main() -> list[Event]:
        async with collecting(dsn, subscriptions=["user", "todo"]) as rec, \
                await psycopg.AsyncConnection.connect(dsn) as t1, \
                await psycopg.AsyncConnection.connect(dsn) as t2:
            await t1.execute("INSERT INTO \"user\" VALUES (1, 't1 first')")  # T1 begins
            await t2.execute("INSERT INTO \"user\" VALUES (2, 't2')")  # T2 begins
            await t2.execute("INSERT INTO todo VALUES (20, 2, 't2')")
            await t2.commit()  # T2 commits first
            await t1.execute("INSERT INTO todo VALUES (10, 1, 't1 second')")
            await t1.execute("UPDATE \"user\" SET name = 't1 third' WHERE id = 1")
            await t1.commit()
            events = await rec.wait_for(5)
            assert [len(c) for c in rec.calls_of("__all__")] == [2, 3]
        return events

    events = run(main())
    assert summary(events) == [
        ("insert", "user", 2), ("insert", "todo", 20),
        ("insert", "user", 1), ("insert", "todo", 10), ("update", "user", 1),
    ]
    ids = [e.id for e in events]
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert events[0].timestamp <= events[2].timestamp
    assert events[0].lsn == events[1].lsn != events[2].lsn == events[3].lsn == events[4].lsn


def test_streamed_transaction_gives_the_same_events_and_ids(admin: psycopg.Connection, dsn: str) -> None:
    """A transaction bigger than logical_decoding_work_mem, with aborted subtransactions,
    arrives streamed (protocol 2) to one app and whole to the other: same events, same ids."""
    admin.execute(SCHEMA)
    admin.execute(
        sql.SQL("ALTER DATABASE {} SET logical_decoding_work_mem = '64kB'").format(
            sql.Identifier(admin.info.dbname))
    )

    async def main() -> tuple[list[Event], list[Event], int]:
        async with collecting(dsn, subscriptions=["user", "todo"], name="tx_streamed",
                              streaming=True) as streamed, \
                collecting(dsn, subscriptions=["user", "todo"], name="tx_whole") as whole:
            with admin.transaction():
                admin.execute(
                    "INSERT INTO \"user\" SELECT g, repeat('x', 200) FROM generate_series(1, 1000) g")
                admin.execute("SAVEPOINT a")
                admin.execute(
                    "INSERT INTO \"user\" SELECT g, 'gone' FROM generate_series(1001, 1500) g")
                admin.execute("ROLLBACK TO SAVEPOINT a")  # aborted subtransaction
                admin.execute("INSERT INTO audit (note) VALUES ('unsubscribed')")
                admin.execute("SAVEPOINT b")
                admin.execute("INSERT INTO todo SELECT g, g, 'kept' FROM generate_series(1, 300) g")
                admin.execute("RELEASE SAVEPOINT b")  # committed subtransaction
                admin.execute("UPDATE \"user\" SET name = 'last' WHERE id = 1")
            n = 1000 + 300 + 1
            got_streamed = await streamed.wait_for(n, timeout=20)
            got_whole = await whole.wait_for(n, timeout=20)
            stream_txns = -1
            for _ in range(50):  # slot statistics are flushed asynchronously
                row = admin.execute(
                    "SELECT stream_txns FROM pg_stat_replication_slots WHERE slot_name = %s",
                    (streamed.app.slot_name,)).fetchone()
                stream_txns = row[0] if row else -1
                if stream_txns >= 1:
                    break
                await asyncio.sleep(0.1)
        return got_streamed, got_whole, stream_txns

    got_streamed, got_whole, stream_txns = run(main())
    assert stream_txns >= 1, "the transaction was not streamed: the test proves nothing"
    assert [e.id for e in got_streamed] == [e.id for e in got_whole]
    assert [(e.type, e.name, e.new_record, e.old_record, e.changes) for e in got_streamed] == [
        (e.type, e.name, e.new_record, e.old_record, e.changes) for e in got_whole]
    assert [position(e) for e in got_whole] == [*range(1000), *range(1001, 1302)]
    assert {e.new_record["name"] for e in got_whole if e.name == "user"} == {"x" * 200, "last"}  # type: ignore[index]
