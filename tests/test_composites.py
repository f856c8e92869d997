"""Composite values: typed the same way whatever order walex met the types in, and
delivered (never a wedged slot) when the type changed after the value was written.

PostgreSQL sends no Relation or Type message when a composite type is altered, and
old WAL rows keep the shape the type had when they were written. walex reads the
definition from ``pg_type`` / ``pg_attribute``; a value that does not fit it is
handled as the README's "values" paragraph documents.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import psycopg
import pytest
from support import collecting, run, until

NESTED = """
CREATE EXTENSION hstore;
CREATE TYPE color AS ENUM ('red', 'green');
CREATE TYPE inner_c AS (a int, b text, c color, d int[]);
CREATE TYPE comp_fields AS (colors color[], h hstore, n int, inner_v inner_c);
CREATE TABLE comp (id int PRIMARY KEY, v comp_fields);
CREATE TABLE other (id int PRIMARY KEY, colors color[], h hstore, inner_v inner_c);
CREATE PUBLICATION pub FOR TABLE comp, other;
"""
NESTED_VALUE = "ROW(ARRAY['red','green']::color[], 'a=>1', 5, ROW(1,'x','red','{}'))::comp_fields"


def check_nested(value: Any) -> None:
    """A comp_fields value whose fields are typed like the same types at top level."""
    assert value._fields == ("colors", "h", "n", "inner_v")
    assert value.colors == ["red", "green"]
    assert value.h == {"a": "1"}
    assert value.n == 5
    assert value.inner_v._fields == ("a", "b", "c", "d")
    assert tuple(value.inner_v) == (1, "x", "red", [])


def test_composite_fields_typed_when_its_table_comes_first(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(NESTED)

    async def main() -> None:
        async with collecting(dsn, name="comp_first") as rec:
            admin.execute(f"INSERT INTO comp VALUES (1, {NESTED_VALUE})")
            [event] = await rec.wait_for(1)
        assert event.new_record is not None
        check_nested(event.new_record["v"])

    run(main())


def test_composite_fields_typed_the_same_whatever_the_order(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(NESTED)

    async def main() -> None:
        async with collecting(dsn, name="other_first") as rec:
            admin.execute("INSERT INTO other VALUES (1, '{green}', 'b=>2', ROW(2,'y','green','{1}'))")
            await rec.wait_for(1)
            admin.execute(f"INSERT INTO comp VALUES (2, {NESTED_VALUE})")
            events = await rec.wait_for(2)
        other, comp = (e.new_record for e in events)
        assert other is not None and comp is not None
        assert other["colors"] == ["green"] and other["h"] == {"b": "2"}
        assert tuple(other["inner_v"]) == (2, "y", "green", [1])
        check_nested(comp["v"])

    run(main())


def slot_position(admin: psycopg.Connection, slot: str) -> int:
    row = admin.execute(
        "SELECT confirmed_flush_lsn - '0/0'::pg_lsn FROM pg_replication_slots WHERE slot_name = %s",
        (slot,)).fetchone()
    assert row is not None
    return int(row[0])


def wal_position(admin: psycopg.Connection) -> int:
    row = admin.execute("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn").fetchone()
    assert row is not None
    return int(row[0])


def offline_change(admin: psycopg.Connection, dsn: str, before: str, after: str,
                   rows_before: list[str], rows_after: list[str]) -> tuple[list[Any], int, int]:
    """A durable app caught up and stopped; rows written, the type altered, more rows
    written; the app started again. Returns the values received, the slot's
    position and the WAL position just before the last row was written."""
    admin.execute(f"{before}; CREATE TABLE t (id int PRIMARY KEY, v cc); CREATE PUBLICATION pub FOR TABLE t")
    options: dict[str, Any] = {"name": "offline", "durable_slot": True, "subscriptions": ["t"]}

    async def main() -> tuple[list[Any], int, int]:
        async with collecting(dsn, **options):
            pass  # the slot exists and is caught up
        for row in rows_before:
            admin.execute(f"INSERT INTO t VALUES {row}")
        admin.execute(after)
        end = 0
        for row in rows_after:
            end = wal_position(admin)  # the commit of the row ends beyond this
            admin.execute(f"INSERT INTO t VALUES {row}")
        async with collecting(dsn, **options) as rec:
            events = await rec.wait_for(len(rows_before) + len(rows_after))
        assert rec.app is not None
        name = rec.app.slot_name
        slot = 0
        for _ in range(100):  # the walsender applies the last status update as it exits
            slot = slot_position(admin, name)
            if slot > end:
                break
            await asyncio.sleep(0.1)
        async with collecting(dsn, **options) as again:  # nothing is delivered twice
            await again.settle(0.5)
            assert again.events == []
        return [e.new_record["v"] for e in events], slot, end  # type: ignore[index]

    return run(main())


def test_composite_attribute_added_while_durable_consumer_offline(
    admin: psycopg.Connection, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The old row has fewer fields than the type now: the missing ones are None,
    as PostgreSQL itself reads a value stored before ALTER TYPE ... ADD ATTRIBUTE."""
    values, slot, end = offline_change(
        admin, dsn, "CREATE TYPE cc AS (a int, b text)", "ALTER TYPE cc ADD ATTRIBUTE z int",
        ["(1, ROW(1, 'x'))"], ["(2, ROW(2, 'y', 3))"],
    )
    assert [v._fields for v in values] == [("a", "b", "z")] * 2
    assert [tuple(v) for v in values] == [(1, "x", None), (2, "y", 3)]
    assert slot > end, "the slot did not move past the rows"


def test_composite_attribute_dropped_while_durable_consumer_offline(
    admin: psycopg.Connection, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Which field was dropped cannot be told from an old value: it arrives as its text
    form, with one warning naming the type."""
    caplog.set_level(logging.WARNING, logger="walex")
    values, slot, end = offline_change(
        admin, dsn, "CREATE TYPE cc AS (a int, b text, c int)", "ALTER TYPE cc DROP ATTRIBUTE b",
        ["(1, ROW(1, 'x', 2))", "(2, ROW(3, 'y', 4))"], ["(3, ROW(5, 6))"],
    )
    assert values[:2] == ["(1,x,2)", "(3,y,4)"]
    assert values[2]._fields == ("a", "c") and tuple(values[2]) == (5, 6)
    assert slot > end
    warnings = [r.getMessage() for r in caplog.records if "public.cc" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "3 fields" in warnings[0] and "text" in warnings[0]


def test_composite_altered_while_streaming(
    admin: psycopg.Connection, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL sends no new Relation/Type message after ALTER TYPE ... ADD ATTRIBUTE:
    a value of the new shape arrives as its text form with a warning, the stream goes
    on, and after a reconnect (or a restart) walex reads the new definition."""
    caplog.set_level(logging.WARNING, logger="walex")
    admin.execute("""
        CREATE TYPE late AS (a int, b text);
        CREATE TABLE t (id int PRIMARY KEY, l late);
        CREATE PUBLICATION pub FOR TABLE t;
    """)

    async def main() -> None:
        async with collecting(dsn, subscriptions=["t"]) as rec:
            admin.execute("INSERT INTO t VALUES (1, ROW(1, 'x'))")
            await rec.wait_for(1)
            admin.execute("ALTER TYPE late ADD ATTRIBUTE c int")
            admin.execute("INSERT INTO t VALUES (2, ROW(2, 'y', 3))")
            admin.execute("INSERT INTO t VALUES (3, ROW(4, 'z', 5))")
            events = await rec.wait_for(3)
            assert [e.new_record["l"] for e in events[1:]] == ["(2,y,3)", "(4,z,5)"]  # type: ignore[index]
            warnings = [r.getMessage() for r in caplog.records if "public.late" in r.getMessage()]
            assert len(warnings) == 1 and "reconnects or restarts" in warnings[0], warnings

            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                          " WHERE datname = current_database() AND backend_type = 'walsender'")
            await until(lambda: rec.app is not None and rec.app.pipeline.sessions == 2, "a reconnect", 20)
            admin.execute("INSERT INTO t VALUES (4, ROW(6, 'w', 7))")
            events = await rec.wait_for(4)
        assert events[3].new_record is not None and tuple(events[3].new_record["l"]) == (6, "w", 7)

    run(main())
