"""What a streamed transaction writes to disk must read back: every type of the type
matrix (composite named tuples are classes made at run time), typed with the table
definition that was current when the change was made."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
from psycopg import sql
from support import collecting, run
from test_types import COLUMNS, SCHEMA, ROW_VALUES, assert_record, register_for_select, select_rows

from walex import EventType


def small_work_mem(admin: psycopg.Connection) -> None:
    admin.execute(sql.SQL("ALTER DATABASE {} SET logical_decoding_work_mem = '64kB'").format(
        sql.Identifier(admin.info.dbname)))


async def streamed_count(admin: psycopg.Connection, slot: str) -> int:
    for _ in range(50):  # slot statistics are flushed asynchronously
        row = admin.execute(
            "SELECT stream_txns FROM pg_stat_replication_slots WHERE slot_name = %s", (slot,)
        ).fetchone()
        if row and row[0]:
            return int(row[0])
        await asyncio.sleep(0.1)
    return 0


COPIES = 100  # copies of the matrix rows, ids 10 * k + id: well past 64 kB


def test_spilled_transaction_of_every_type(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(SCHEMA)
    register_for_select(admin)
    small_work_mem(admin)
    data = ", ".join(c for c in COLUMNS if c != "id")

    async def main() -> tuple[list[Any], int, int]:
        async with collecting(dsn, subscriptions=["typed"], streaming=True, batch_size=7) as rec:
            with admin.transaction():
                admin.execute(f"INSERT INTO typed VALUES {ROW_VALUES}")
                admin.execute(f"INSERT INTO typed SELECT 10 * g + id, {data} "
                              f"FROM typed, generate_series(1, {COPIES}) g WHERE id < 10")
                admin.execute(f"UPDATE typed t SET ({data}) = (SELECT {data} FROM typed s "
                              "WHERE s.id = 3 - t.id) WHERE t.id IN (1, 2)")
                admin.execute("DELETE FROM typed WHERE id = 4")
            events = await rec.wait_for(5 + 5 * COPIES + 3, timeout=30)
            assert rec.app is not None
            spilled = rec.app.pipeline.assembler.spilled_events
            streamed = await streamed_count(admin, rec.app.slot_name)
        return events, spilled, streamed

    events, spilled, streamed = run(main())
    assert streamed >= 1 and spilled > 0, "nothing was streamed and spilled: the test proves nothing"
    now = select_rows(admin)

    def inserted(row_id: int) -> dict[str, Any]:  # the copies keep the values first inserted
        return now[row_id] if row_id >= 10 else {**now[10 + row_id], "id": row_id}

    inserts = [e for e in events if e.type is EventType.INSERT]
    assert len(inserts) == 5 + 5 * COPIES
    for event in inserts:
        assert event.source.columns == COLUMNS
        row_id = event.new_record["id"]  # type: ignore[index]
        assert_record(event.new_record, inserted(row_id), f"insert of row {row_id}")
    updates = [e for e in events if e.type is EventType.UPDATE]
    assert [e.new_record["id"] for e in updates] == [1, 2]  # type: ignore[index]
    for event in updates:
        row_id = event.new_record["id"]  # type: ignore[index]
        assert_record(event.old_record, inserted(row_id), f"old_record of row {row_id}")
        assert_record(event.new_record, now[row_id], f"new_record of row {row_id}")
    [delete] = [e for e in events if e.type is EventType.DELETE]
    assert_record(delete.old_record, inserted(4), "old_record of the delete")


def test_spilled_changes_typed_with_the_definition_of_their_time(
    admin: psycopg.Connection, dsn: str
) -> None:
    """A Relation message in the middle of a streamed transaction replaces the table's
    definition; the changes before it are typed with the one before."""
    admin.execute("CREATE TABLE t (id int PRIMARY KEY, a int, pad text); CREATE PUBLICATION pub FOR TABLE t")
    small_work_mem(admin)

    async def main() -> tuple[list[Any], int]:
        async with collecting(dsn, subscriptions=["t"], streaming=True, batch_size=10) as rec:
            with admin.transaction():
                admin.execute("INSERT INTO t SELECT g, g, repeat('x', 200) FROM generate_series(1, 500) g")
                admin.execute("ALTER TABLE t ALTER COLUMN a TYPE text, ADD COLUMN b int")
                admin.execute("INSERT INTO t SELECT g, g, 'y', g FROM generate_series(501, 600) g")
            events = await rec.wait_for(600, timeout=30)
            assert rec.app is not None
            streamed = await streamed_count(admin, rec.app.slot_name)
        return events, streamed

    events, streamed = run(main())
    assert streamed >= 1
    first, last = events[0], events[-1]
    assert first.new_record == {"id": 1, "a": 1, "pad": "x" * 200}
    assert first.source.columns == {"id": "int4", "a": "int4", "pad": "text"}
    assert last.new_record == {"id": 600, "a": "600", "pad": "y", "b": 600}
    assert last.source.columns == {"id": "int4", "a": "text", "pad": "text", "b": "int4"}
    assert all(type(e.new_record["a"]) is int for e in events[:500])  # type: ignore[index]
