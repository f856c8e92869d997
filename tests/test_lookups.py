"""The normal connection walex keeps for type lookups and heartbeats can be lost
at any time (``idle_session_timeout``, ``pg_terminate_backend``): it is reopened
on demand and the stream goes on. It is opened on first use: the first row of a
table with an enum column needs a ``pg_type`` lookup."""

from __future__ import annotations

import asyncio

import psycopg
from psycopg import sql
from support import collecting, run

CLIENTS = """
SELECT pid FROM pg_stat_activity
WHERE datname = current_database() AND backend_type = 'client backend' AND pid <> pg_backend_pid()
"""

SCHEMA = """
CREATE TYPE color AS ENUM ('red', 'green');
CREATE TYPE mood AS ENUM ('calm', 'keen');
CREATE TABLE plain (id int PRIMARY KEY);
CREATE TABLE colored (id int PRIMARY KEY, c color, cs color[]);
CREATE TABLE moody (id int PRIMARY KEY, m mood);
CREATE PUBLICATION pub FOR TABLE plain, colored, moody;
"""


def clients(admin: psycopg.Connection) -> set[int]:
    """The pids of the other client connections to the test database (walex's)."""
    return {row[0] for row in admin.execute(CLIENTS).fetchall()}


def test_type_lookup_after_idle_session_timeout(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(SCHEMA)
    admin.execute(sql.SQL("ALTER DATABASE {} SET idle_session_timeout = '3s'").format(
        sql.Identifier(admin.info.dbname)))

    async def main() -> None:
        async with collecting(dsn, subscriptions=["plain", "colored", "moody"]) as rec:
            admin.execute("INSERT INTO plain VALUES (1)")
            await rec.wait_for(1)
            assert not clients(admin), "a normal connection was opened before it was needed"
            admin.execute("INSERT INTO moody VALUES (1, 'keen')")  # opens it: a lookup
            await rec.wait_for(2)
            before = clients(admin)
            assert before, "walex holds no normal connection: the test proves nothing"
            for _ in range(100):  # the server closes idle sessions after 3 s
                if not clients(admin) & before:
                    break
                await asyncio.sleep(0.1)
            assert not clients(admin) & before, "idle_session_timeout did not close walex's connection"
            # The first row of a table with an enum column needs a pg_type lookup.
            admin.execute("INSERT INTO colored VALUES (1, 'red', '{green,red}')")
            events = await rec.wait_for(3)
        assert events[2].new_record == {"id": 1, "c": "red", "cs": ["green", "red"]}

    run(main())


def test_type_lookup_after_its_connection_was_terminated(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(SCHEMA)

    async def main() -> None:
        async with collecting(dsn, subscriptions=["plain", "colored", "moody"]) as rec:
            admin.execute("INSERT INTO plain VALUES (1)")
            admin.execute("INSERT INTO moody VALUES (1, 'calm')")  # opens it: a lookup
            await rec.wait_for(2)
            killed = clients(admin)
            assert killed
            for pid in killed:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            admin.execute("INSERT INTO colored VALUES (1, 'green', '{red}')")
            events = await rec.wait_for(3)
        assert events[2].new_record == {"id": 1, "c": "green", "cs": ["red"]}
        assert rec.app is not None and rec.app.pipeline.sessions == 1  # no reconnect of the stream

    run(main())


def test_heartbeat_reopens_its_connection(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(SCHEMA)

    async def main() -> None:
        async with collecting(dsn, subscriptions=["plain"], heartbeat_interval=0.2):
            for _ in range(100):
                killed = clients(admin)
                if killed:
                    break
                await asyncio.sleep(0.05)
            for pid in killed:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            for _ in range(100):  # the next heartbeats reconnect
                if clients(admin) - killed:
                    break
                await asyncio.sleep(0.1)
            assert clients(admin) - killed, "the heartbeat did not reopen its connection"
            # the new connection shows the heartbeat once it sent one (it may be
            # seen between its connect and its first heartbeat)
            for _ in range(50):
                sent = admin.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND query LIKE '%%walex.heartbeat%%' AND pid <> pg_backend_pid()").fetchone()
                if sent is not None and sent[0] >= 1:
                    break
                await asyncio.sleep(0.1)
            assert sent is not None and sent[0] >= 1

    run(main())
