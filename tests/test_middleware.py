"""message_middleware: every decoded message, handed on now, later, or from plain code.

Concern: ``message_middleware(message, app)`` receives every decoded pgoutput
message in stream order (Begin, Relation, Insert, ..., Commit; also of tables
the app does not subscribe to), and nothing reaches the handlers until it
hands the message on with ``await app.process_message(message)`` or, from
plain code, ``app.process_message_nowait(message)`` (order kept). While it
holds messages nothing is acknowledged past them. A middleware may be given
as an import string; one that raises stops the app with its error.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from support import collecting, run, until

from walex import ConfigError, Event, WalEx
from walex.pgoutput.messages import Commit, Relation

SCHEMA = """
CREATE TABLE item (id int PRIMARY KEY, label text);
ALTER TABLE item REPLICA IDENTITY FULL;
CREATE TABLE other (id int PRIMARY KEY);
CREATE PUBLICATION pub FOR TABLE item, other;
"""


def describe(events: list[Event]) -> list[str]:
    return [f"{e.type.value}:{e.name}:{(e.new_record or e.old_record or {}).get('id')}"
            for e in events]


def test_middleware_sees_every_message_in_order(admin: psycopg.Connection, dsn: str) -> None:
    """Every message, in stream order. Where PostgreSQL puts Relation messages is its own
    business: one comes before a table's first change in a session, and it may send another
    at any time (after any invalidation of the table, e.g. an autovacuum's ANALYZE), so the
    test asserts the order of everything else, and a Relation before each table's first change.
    """
    admin.execute(SCHEMA)
    seen: list[Any] = []
    apps: list[Any] = []

    async def middleware(message: Any, app: WalEx) -> None:
        seen.append(message)
        apps.append(app)
        await app.process_message(message)

    async def main() -> None:
        async with collecting(dsn, subscriptions=["item"], message_middleware=middleware) as rec:
            admin.execute("INSERT INTO item VALUES (1, 'a'), (2, 'b')")
            admin.execute("ANALYZE item")  # as autovacuum may: PostgreSQL resends item's Relation
            admin.execute("UPDATE item SET label = 'c' WHERE id = 1; DELETE FROM item WHERE id = 2")
            admin.execute("INSERT INTO other VALUES (1)")  # not subscribed: no event
            admin.execute("TRUNCATE item")
            await rec.wait_for(5)
            await until(lambda: rec.app.transactions_handled == 4, "4 transactions")  # type: ignore[union-attr]
            assert set(map(id, apps)) == {id(rec.app)}
            assert describe(rec.events) == [
                "insert:item:1", "insert:item:2", "update:item:1", "delete:item:2",
                "truncate:item:None",
            ]
        names = [type(m).__name__ for m in seen]
        assert [n for n in names if n != "Relation"] == [
            "Begin", "Insert", "Insert", "Commit",
            "Begin", "Update", "Delete", "Commit",
            "Begin", "Insert", "Commit",  # a table the app does not subscribe to as well
            "Begin", "Truncate", "Commit",
        ], names
        announced: dict[int, str] = {}
        for message in seen:  # each change's table was announced before it, in this session
            if isinstance(message, Relation):
                announced[message.relation_id] = message.name
            for oid in getattr(message, "relation_ids", None) or [getattr(message, "relation_id", None)]:
                if oid is not None and not isinstance(message, Relation):
                    assert oid in announced, (names, message)
        assert sorted(set(announced.values())) == ["item", "other"]

    run(main())


def test_held_messages_are_handed_on_later(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(SCHEMA)
    held: list[Any] = []
    passing = {"on": False}

    async def middleware(message: Any, app: WalEx) -> None:
        if passing["on"]:
            await app.process_message(message)
        else:
            held.append(message)

    async def main() -> None:
        async with collecting(dsn, subscriptions=["item"], message_middleware=middleware,
                              status_interval=0.1) as rec:
            app = rec.app
            assert app is not None
            admin.execute("INSERT INTO item VALUES (1, 'a')")
            await until(lambda: bool(held) and isinstance(held[-1], Commit), "the held commit")
            commit = held[-1]
            # status_interval=0.1: the server is asked for a keepalive after each 0.1s of
            # silence, so several keepalives come while the transaction is held
            await asyncio.sleep(0.6)
            assert rec.events == []
            assert app.ack.flushed < commit.end_lsn
            passing["on"] = True
            for message in held:
                await app.process_message(message)
            await rec.wait_for(1)
            await until(lambda: app.ack.flushed >= commit.end_lsn, "the acknowledgement")
            admin.execute("INSERT INTO item VALUES (2, 'b')")
            await rec.wait_for(2)
            assert describe(rec.events) == ["insert:item:1", "insert:item:2"]

    run(main())


def test_plain_middleware_with_process_message_nowait(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(SCHEMA)
    count = {"messages": 0}

    def middleware(message: Any, app: WalEx) -> None:
        count["messages"] += 1
        app.process_message_nowait(message)

    async def main() -> None:
        async with collecting(dsn, subscriptions=["item"], message_middleware=middleware) as rec:
            admin.execute("INSERT INTO item SELECT g, 'x' FROM generate_series(1, 50) g")
            admin.execute("UPDATE item SET label = 'y' WHERE id <= 3")
            admin.execute("DELETE FROM item WHERE id > 3")
            await rec.wait_for(50 + 3 + 47)
            await rec.settle()
            ids = [(e.type.value, (e.new_record or e.old_record)["id"]) for e in rec.events]
            assert ids == ([("insert", i) for i in range(1, 51)] + [("update", i) for i in (1, 2, 3)]
                           + [("delete", i) for i in range(4, 51)])
            assert count["messages"] == 3 * 2 + 1 + 50 + 3 + 47  # Begin/Commit, Relation, rows

    run(main())


def test_middleware_as_import_string(admin: psycopg.Connection, dsn: str, on_path: Path) -> None:
    admin.execute(SCHEMA)
    module = f"wxmw_{uuid.uuid4().hex[:10]}"
    (on_path / f"{module}.py").write_text(
        "SEEN = []\n"
        "async def middleware(message, app):\n"
        "    SEEN.append(type(message).__name__)\n"
        "    await app.process_message(message)\n"
    )
    importlib.invalidate_caches()

    async def main() -> None:
        async with collecting(dsn, subscriptions=["item"],
                              message_middleware=f"{module}:middleware") as rec:
            admin.execute("INSERT INTO item VALUES (1, 'a')")
            await rec.wait_for(1)
        assert sys.modules[module].SEEN == ["Begin", "Relation", "Insert", "Commit"]

    run(main())


def test_middleware_that_raises_stops_the_app(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(SCHEMA)
    commits: list[Commit] = []

    async def middleware(message: Any, app: WalEx) -> None:
        if type(message).__name__ == "Insert":
            raise RuntimeError("middleware broke")
        if isinstance(message, Commit):
            commits.append(message)
        await app.process_message(message)

    async def main() -> None:
        with pytest.raises(RuntimeError, match="middleware broke"):
            async with collecting(dsn, subscriptions=["item"], message_middleware=middleware) as rec:
                admin.execute("INSERT INTO item VALUES (1, 'a')")
                await rec.wait_for(1)
        assert rec.events == [] and commits == []
        assert rec.app is not None and rec.app.transactions_handled == 0

    run(main())


@pytest.mark.parametrize(("middleware", "message"), [
    (42, "message_middleware: must be a callable(message, app)"),
    ("no_such_module_xyz:handle", "message_middleware: cannot import 'no_such_module_xyz'"),
    ("walex:no_such_function", "message_middleware: module 'walex' has no attribute 'no_such_function'"),
])
def test_invalid_middleware(middleware: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        WalEx("postgresql://localhost/x", publication="pub", message_middleware=middleware)
    assert message in str(info.value)
