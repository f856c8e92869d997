"""Event fields under each REPLICA IDENTITY: what old_record and changes hold.

Each test inserts a row, updates a non-key column, updates the key, and
deletes the row, one transaction each, then checks every field of every event.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from support import collecting, run

from walex import Change, Event, EventType
from walex.lsn import parse_lsn

INSERT, UPDATE, DELETE = EventType.INSERT, EventType.UPDATE, EventType.DELETE
LSN = re.compile(r"^[0-9A-F]{1,8}/[0-9A-F]{1,8}$")
ID = re.compile(r"^[0-9A-F]{16}-[0-9A-F]{8}$")


def check_envelope(events: list[Event], table: str, before: datetime, after: datetime) -> None:
    """timestamp, lsn, id and source of events that each are one transaction."""
    for event in events:
        assert event.name == table
        assert event.table == f"public.{table}"
        assert event.source.schema == "public" and event.source.table == table
        assert event.timestamp.tzinfo is not None
        assert event.timestamp.utcoffset() == timedelta(0)
        # the server runs on this machine: its commit time is within the test's window
        assert before - timedelta(seconds=1) <= event.timestamp <= after + timedelta(seconds=1)
        assert LSN.match(event.lsn), event.lsn
        assert ID.match(event.id), event.id
    ids = [e.id for e in events]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)  # fixed-width upper-case hex: string order is commit order
    lsns = [parse_lsn(e.lsn) for e in events]
    assert lsns == sorted(lsns) and len(set(lsns)) == len(lsns)
    times = [e.timestamp for e in events]
    assert times == sorted(times)
    for event in events:  # one change per transaction: position 0
        assert event.id.endswith("-00000000")
        # the id's LSN is the transaction's commit LSN (known from its Begin,
        # so batches of a large transaction can be handed on before its Commit)
        assert int(event.id[:16], 16) == parse_lsn(event.lsn)


def fields(event: Event) -> tuple:
    return event.type, event.new_record, event.old_record, event.changes


def run_scenario(admin: psycopg.Connection, dsn: str, table: str, statements: list[str]) -> list[Event]:
    async def main() -> list[Event]:
        async with collecting(dsn, subscriptions=[table]) as rec:
            before = datetime.now(timezone.utc)
            for statement in statements:
                admin.execute(statement)
            events = await rec.wait_for(len(statements))
            after = datetime.now(timezone.utc)
            await rec.settle(0.2)
            assert len(rec.events) == len(statements)
        check_envelope(events, table, before, after)
        current = admin.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert current is not None and parse_lsn(events[-1].lsn) <= parse_lsn(current[0])
        return events

    return run(main())


STEPS = [
    "INSERT INTO {t} VALUES (1, 'k1', 'a')",
    "UPDATE {t} SET v = 'b' WHERE id = 1",
    "UPDATE {t} SET id = 2, code = 'k2' WHERE id = 1",
    "DELETE FROM {t} WHERE id = 2",
]


def create(admin: psycopg.Connection, table: str, identity: str) -> None:
    admin.execute(f"""
        CREATE TABLE {table} (id int PRIMARY KEY, code text NOT NULL, v text);
        CREATE UNIQUE INDEX {table}_code ON {table} (code);
        ALTER TABLE {table} REPLICA IDENTITY {identity};
        CREATE PUBLICATION pub FOR TABLE {table};
    """)


def test_default(admin: psycopg.Connection, dsn: str) -> None:
    create(admin, "t_default", "DEFAULT")
    events = run_scenario(admin, dsn, "t_default", [s.format(t="t_default") for s in STEPS])
    assert [fields(e) for e in events] == [
        (INSERT, {"id": 1, "code": "k1", "v": "a"}, None, None),
        (UPDATE, {"id": 1, "code": "k1", "v": "b"}, None, None),
        # the key changed: PostgreSQL sends the old key, only the key
        (UPDATE, {"id": 2, "code": "k2", "v": "b"}, {"id": 1}, None),
        (DELETE, None, {"id": 2}, None),
    ]


def test_full(admin: psycopg.Connection, dsn: str) -> None:
    create(admin, "t_full", "FULL")
    steps = [s.format(t="t_full") for s in STEPS]
    steps.insert(2, "UPDATE t_full SET v = v WHERE id = 1")  # changes nothing
    steps.insert(3, "UPDATE t_full SET v = NULL WHERE id = 1")
    steps.insert(4, "UPDATE t_full SET v = 'b' WHERE id = 1")
    events = run_scenario(admin, dsn, "t_full", steps)
    row_a = {"id": 1, "code": "k1", "v": "a"}
    row_b = {"id": 1, "code": "k1", "v": "b"}
    row_null = {"id": 1, "code": "k1", "v": None}
    row_2 = {"id": 2, "code": "k2", "v": "b"}
    assert [fields(e) for e in events] == [
        (INSERT, row_a, None, None),
        (UPDATE, row_b, row_a, {"v": Change("a", "b")}),
        (UPDATE, row_b, row_b, {}),  # old values known and equal: truly no change
        (UPDATE, row_null, row_b, {"v": Change("b", None)}),
        (UPDATE, row_b, row_null, {"v": Change(None, "b")}),
        (UPDATE, row_2, row_b, {"id": Change(1, 2), "code": Change("k1", "k2")}),
        (DELETE, None, row_2, None),
    ]


def test_using_index(admin: psycopg.Connection, dsn: str) -> None:
    create(admin, "t_index", "USING INDEX t_index_code")
    steps = [s.format(t="t_index") for s in STEPS]
    steps.insert(3, "UPDATE t_index SET id = 3 WHERE id = 2")  # PK changes, identity does not
    steps[-1] = "DELETE FROM t_index WHERE id = 3"
    events = run_scenario(admin, dsn, "t_index", steps)
    assert [fields(e) for e in events] == [
        (INSERT, {"id": 1, "code": "k1", "v": "a"}, None, None),
        (UPDATE, {"id": 1, "code": "k1", "v": "b"}, None, None),
        # the identity is the index on code: its old value, not the primary key's
        (UPDATE, {"id": 2, "code": "k2", "v": "b"}, {"code": "k1"}, None),
        (UPDATE, {"id": 3, "code": "k2", "v": "b"}, None, None),
        (DELETE, None, {"code": "k2"}, None),
    ]


@pytest.mark.parametrize("ddl", [
    "CREATE TABLE t_nothing (id int PRIMARY KEY, code text NOT NULL, v text);"
    "ALTER TABLE t_nothing REPLICA IDENTITY NOTHING",
    # DEFAULT without a primary key has no identity either
    "CREATE TABLE t_nothing (id int, code text NOT NULL, v text)",
], ids=["nothing", "default-without-key"])
def test_nothing(admin: psycopg.Connection, dsn: str, ddl: str) -> None:
    admin.execute(ddl)
    admin.execute("CREATE PUBLICATION pub FOR TABLE t_nothing")

    async def main() -> list[Event]:
        async with collecting(dsn, subscriptions=["t_nothing"]) as rec:
            admin.execute("INSERT INTO t_nothing VALUES (1, 'k1', 'a')")
            for statement in ("UPDATE t_nothing SET v = 'b' WHERE id = 1",
                              "DELETE FROM t_nothing WHERE id = 1"):
                with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState,
                                   match="does not have a replica identity"):
                    admin.execute(statement)
            admin.execute("INSERT INTO t_nothing VALUES (2, 'k2', 'c')")
            events = await rec.wait_for(2)
            await rec.settle(0.2)
            assert len(rec.events) == 2
        return events

    events = run(main())
    assert [fields(e) for e in events] == [
        (INSERT, {"id": 1, "code": "k1", "v": "a"}, None, None),
        (INSERT, {"id": 2, "code": "k2", "v": "c"}, None, None),
    ]
    assert admin.execute("SELECT v FROM t_nothing WHERE id = 1").fetchone() == ("a",)


def test_nothing_on_insert_only_publication(admin: psycopg.Connection, dsn: str) -> None:
    """A publication that does not publish updates/deletes lets them through, unseen."""
    admin.execute("""
        CREATE TABLE t_nothing (id int, v text);
        ALTER TABLE t_nothing REPLICA IDENTITY NOTHING;
        CREATE PUBLICATION pub FOR TABLE t_nothing WITH (publish = 'insert');
    """)

    async def main() -> list[Event]:
        async with collecting(dsn, subscriptions=["t_nothing"]) as rec:
            admin.execute("INSERT INTO t_nothing VALUES (1, 'a')")
            admin.execute("UPDATE t_nothing SET v = 'b'")
            admin.execute("DELETE FROM t_nothing")
            admin.execute("INSERT INTO t_nothing VALUES (2, 'c')")
            events = await rec.wait_for(2)
            await rec.settle(0.2)
            assert len(rec.events) == 2
        return events

    events = run(main())
    assert [fields(e) for e in events] == [
        (INSERT, {"id": 1, "v": "a"}, None, None),
        (INSERT, {"id": 2, "v": "c"}, None, None),
    ]
