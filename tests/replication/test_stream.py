"""The replication connection end to end: encodings and stream errors (a connection libpq
dropped)."""

from __future__ import annotations

import asyncio
import fcntl
import struct
import termios
from typing import Any

import psycopg
import pytest
from psycopg import sql
from support import collecting, run

from walex.errors import ReplicationError
from walex.replication.stream import ReplicationConnection


def test_latin1_database_names_and_values_arrive_as_unicode(pg_cluster: Any, drop_database: Any) -> None:
    dbname = "walex_latin1"
    with psycopg.connect(pg_cluster.dsn("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
        conn.execute(sql.SQL(
            "CREATE DATABASE {} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
        ).format(sql.Identifier(dbname)))
    dsn = pg_cluster.dsn(dbname)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute('CREATE TABLE "café" (id int PRIMARY KEY, "crème" text)')
            conn.execute("CREATE PUBLICATION pub FOR ALL TABLES")

        async def scenario() -> list:
            async with collecting(dsn, subscriptions=["café"]) as rec:
                with psycopg.connect(dsn, autocommit=True) as conn:
                    conn.execute("""INSERT INTO "café" VALUES (1, 'brûlée à 5 €')""".replace(" €", ""))
                return await rec.wait_for(1)

        [event] = run(scenario())
        assert event.name == "café"
        assert event.new_record == {"id": 1, "crème": "brûlée à 5"}
        assert event.source.columns == {"id": "int4", "crème": "text"}
    finally:  # its slots first: the stopped app's walsender may still be exiting
        drop_database(dbname)


def test_a_connection_libpq_dropped_ends_the_read_as_a_retriable_replication_error(
        admin: psycopg.Connection, dsn: str) -> None:
    """A replication connection whose socket libpq has dropped (a status update's write
    failed first, say, after the walsender was terminated: seen as an app that stopped with
    "the connection is lost" instead of reconnecting) ends ``read``, a status update and a
    START_REPLICATION (a reconnect meeting a closed connection) with a retriable
    ReplicationError, whichever libpq call sees it first."""
    admin.execute("CREATE TABLE dropped_t (id int PRIMARY KEY)")
    admin.execute("CREATE PUBLICATION dropped_pub FOR TABLE dropped_t")

    async def scenario() -> None:
        stream = await ReplicationConnection.connect(dsn)
        try:
            await stream.create_slot("dropped_slot", temporary=True)
            await stream.start("dropped_slot", 0, {"proto_version": "1",
                                                  "publication_names": "dropped_pub"})
            admin.execute("INSERT INTO dropped_t VALUES (1)")
            assert await stream.read()  # frames come
            stream.pgconn.finish()  # what libpq does to a connection whose write failed
            with pytest.raises(ReplicationError) as caught:
                await stream.read()
            assert caught.value.retriable and "replication connection lost" in str(caught.value)
            assert not stream.streaming
            stream.streaming = True  # a status update sent on it meanwhile
            with pytest.raises(ReplicationError) as caught:
                await stream.send_status(1, 1, 1)
            assert caught.value.retriable and "cannot send a status update" in str(caught.value)
            with pytest.raises(ReplicationError) as caught:  # a session starting on it
                await stream.start("dropped_slot", 0, {"proto_version": "1",
                                                       "publication_names": "dropped_pub"})
            assert caught.value.retriable and "connection was lost" in str(caught.value)
        finally:
            await stream.close()

    run(scenario())


def test_a_read_takes_what_the_socket_holds_beyond_libpqs_buffer_up_to_a_turns_worth(
        admin: psycopg.Connection, dsn: str) -> None:
    """When the reader is behind (the socket holds far more than libpq's 16 kB buffer),
    one ``read`` returns what the socket holds, up to a loop turn's worth of frames (256),
    instead of one libpq buffer per turn of the event loop through select (a loop turn
    and two epoll_ctl per 16 kB were ~1,300 instructions a W1 row, bench/readturns.py);
    every frame still comes, in order, and a read never returns more than 1,024."""
    admin.execute("CREATE TABLE turns_t (id int PRIMARY KEY, t text)")
    admin.execute("CREATE PUBLICATION turns_pub FOR TABLE turns_t")
    rows = 20000

    async def scenario() -> tuple[list[int], int]:
        stream = await ReplicationConnection.connect(dsn)
        try:
            await stream.create_slot("turns_slot", temporary=True)
            admin.execute("INSERT INTO turns_t SELECT i, repeat('x', 50) FROM "
                          f"generate_series(1, {rows}) i")
            await stream.start("turns_slot", 0, {"proto_version": "1",
                                                "publication_names": "turns_pub"})
            fd = stream.pgconn.socket
            held = 0
            for _ in range(600):  # until the walsender filled the socket (a bounded wait)
                await asyncio.sleep(0.05)
                held = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]
                if held >= 48 * 1024:
                    break
            assert held >= 48 * 1024, f"the walsender sent only {held} bytes"
            sizes: list[int] = []
            ids: list[int] = []
            while len(ids) < rows:
                frames = await stream.read()
                sizes.append(len(frames))
                for frame in frames:  # an Insert: 'I', relation, 'N', 2 columns, 't' len id
                    if frame[:1] == b"w" and frame[25:26] == b"I":
                        size = int.from_bytes(frame[34:38], "big")
                        ids.append(int(frame[38:38 + size]))
            assert ids == list(range(1, rows + 1))
            return sizes, held
        finally:
            await stream.close()

    sizes, held = run(scenario())
    assert max(sizes) <= 1024
    # the first reads, with over 48 kB of ~100-byte frames in the socket: more than libpq's
    # 16 kB buffer holds (at most ~165 of them)
    assert max(sizes[:3]) >= 256, (sizes[:5], held)
