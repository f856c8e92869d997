"""Unchanged TOASTed values: PostgreSQL does not resend them on an UPDATE.

The big value is 20 000 random hex characters stored out of line without
compression (``SET STORAGE EXTERNAL``), so it is TOASTed for sure.
"""

from __future__ import annotations

import psycopg
import pytest
from support import collecting, run

import walex
from walex import Change, Event, EventType

BIG = "(SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 625))"


def setup_table(admin: psycopg.Connection, identity: str) -> None:
    admin.execute(f"""
        CREATE TABLE doc (id int PRIMARY KEY, body text, n int);
        ALTER TABLE doc ALTER COLUMN body SET STORAGE EXTERNAL;
        ALTER TABLE doc REPLICA IDENTITY {identity};
        CREATE PUBLICATION pub FOR TABLE doc;
    """)


def body(admin: psycopg.Connection) -> str:
    row = admin.execute("SELECT body FROM doc WHERE id = 1").fetchone()
    assert row is not None and len(row[0]) == 20000
    return str(row[0])


def assert_toasted(admin: psycopg.Connection) -> None:
    row = admin.execute(
        "SELECT pg_relation_size(reltoastrelid) >= 20000 FROM pg_class WHERE oid = 'doc'::regclass"
    ).fetchone()
    assert row == (True,)  # the body is stored out of line


def collect(admin: psycopg.Connection, dsn: str, statements: list[str]) -> tuple[list[Event], list[str]]:
    """Run ``statements``; return the events and the body after each statement."""

    async def main() -> tuple[list[Event], list[str]]:
        bodies = []
        async with collecting(dsn, subscriptions=["doc"]) as rec:
            for statement in statements:
                admin.execute(statement)
                bodies.append(body(admin))
                assert_toasted(admin)
            events = await rec.wait_for(len(statements))
        return events, bodies

    return run(main())


STEPS = [
    f"INSERT INTO doc VALUES (1, {BIG}, 0)",
    "UPDATE doc SET n = 1",
    f"UPDATE doc SET body = {BIG}",
    "UPDATE doc SET n = 2, body = body",  # assigned its own value: still not resent
]


def test_full_identity_fills_unchanged_toast(admin: psycopg.Connection, dsn: str) -> None:
    setup_table(admin, "FULL")
    events, bodies = collect(admin, dsn, STEPS)
    first, second = bodies[0], bodies[2]
    assert first != second and bodies[1] == first and bodies[3] == second
    assert [e.type for e in events] == [EventType.INSERT] + [EventType.UPDATE] * 3

    assert events[0].new_record == {"id": 1, "body": first, "n": 0}

    update = events[1]
    assert update.new_record == {"id": 1, "body": first, "n": 1}  # filled from the old row
    assert update.old_record == {"id": 1, "body": first, "n": 0}
    assert update.changes == {"n": Change(0, 1)}

    update = events[2]
    assert update.new_record == {"id": 1, "body": second, "n": 1}
    assert update.old_record == {"id": 1, "body": first, "n": 1}
    assert update.changes == {"body": Change(first, second)}

    update = events[3]
    assert update.new_record == {"id": 1, "body": second, "n": 2}
    assert update.old_record == {"id": 1, "body": second, "n": 1}
    assert update.changes == {"n": Change(1, 2)}
    for event in events:
        assert walex.UNCHANGED_TOAST not in (event.new_record or {}).values()


def test_default_identity_marks_unchanged_toast(admin: psycopg.Connection, dsn: str) -> None:
    setup_table(admin, "DEFAULT")
    steps = [*STEPS, "DELETE FROM doc WHERE id = 1"]
    events, bodies = collect(admin, dsn, steps[:-1])
    first, second = bodies[0], bodies[2]
    assert events[0].new_record == {"id": 1, "body": first, "n": 0}

    update = events[1]
    assert update.new_record == {"id": 1, "body": walex.UNCHANGED_TOAST, "n": 1}
    assert update.new_record["body"] is walex.UNCHANGED_TOAST  # type: ignore[index]
    assert update.old_record is None and update.changes is None

    update = events[2]  # the big value changed: it is sent
    assert update.new_record == {"id": 1, "body": second, "n": 1}
    assert update.old_record is None and update.changes is None

    update = events[3]
    assert update.new_record == {"id": 1, "body": walex.UNCHANGED_TOAST, "n": 2}
    assert update.old_record is None and update.changes is None


@pytest.mark.parametrize("identity", ["DEFAULT", "FULL"])
def test_unchanged_toast_in_key_changing_update_and_delete(
    admin: psycopg.Connection, dsn: str, identity: str
) -> None:
    setup_table(admin, identity)

    async def main() -> list[Event]:
        async with collecting(dsn, subscriptions=["doc"]) as rec:
            admin.execute(f"INSERT INTO doc VALUES (1, {BIG}, 0)")
            text = body(admin)
            admin.execute("UPDATE doc SET id = 2")
            admin.execute("DELETE FROM doc")
            events = await rec.wait_for(3)
        return [text, *events]  # type: ignore[list-item]

    text, _insert, update, delete = run(main())
    if identity == "FULL":
        assert update.new_record == {"id": 2, "body": text, "n": 0}
        assert update.old_record == {"id": 1, "body": text, "n": 0}
        assert update.changes == {"id": Change(1, 2)}
        assert delete.old_record == {"id": 2, "body": text, "n": 0}
    else:
        assert update.new_record == {"id": 2, "body": walex.UNCHANGED_TOAST, "n": 0}
        assert update.old_record == {"id": 1} and update.changes is None
        assert delete.old_record == {"id": 2}


def test_unchanged_toasted_key_is_filled_from_the_old_key(admin: psycopg.Connection, dsn: str) -> None:
    """A TOASTed primary key (2 400 random characters, stored out of line) that did not
    change is not resent; PostgreSQL sends the old key instead, which holds its value."""
    admin.execute("""
        CREATE TABLE k (id text PRIMARY KEY, n int);
        ALTER TABLE k ALTER COLUMN id SET STORAGE EXTERNAL;
        CREATE PUBLICATION pub FOR TABLE k;
    """)

    async def main() -> tuple[str, list[Event]]:
        async with collecting(dsn, subscriptions=["k"]) as rec:
            admin.execute("INSERT INTO k SELECT string_agg(md5(random()::text), ''), 1 "
                          "FROM generate_series(1, 75)")
            row = admin.execute("SELECT id FROM k").fetchone()
            assert row is not None and len(row[0]) == 2400
            admin.execute("UPDATE k SET n = 2")
            admin.execute("DELETE FROM k")
            return row[0], await rec.wait_for(3)

    key, (insert, update, delete) = run(main())
    assert insert.new_record == {"id": key, "n": 1}
    assert update.new_record == {"id": key, "n": 2}
    assert update.old_record == {"id": key} and update.changes is None
    assert delete.old_record == {"id": key}
