"""The compiled frame loop (``walex.replication._readloop``) reads what the Python loop reads.

Both loops of ``ReplicationConnection.read`` stream the same slot contents from a real
walsender: the same frames, in the same order, within the same bounds per read; a
walsender terminated mid-read ends both with the same ReplicationError. A subprocess
streams with the compiled loop under ``PYTHONMALLOC=debug`` and glibc's malloc checks,
with psycopg's binary and pure-Python implementations (the libpq found both ways).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import struct
import subprocess
import sys
import termios
from typing import Any

import psycopg
import pytest
from support import run

from walex.errors import ReplicationError
from walex.replication import readloop
from walex.replication.stream import ReplicationConnection

needs_compiled = pytest.mark.skipif(
    not readloop.compiled_available(), reason="walex.replication._readloop is not built"
)
pytestmark = needs_compiled

ROWS = 20000
OPTIONS = {"proto_version": "1", "publication_names": "loop_pub"}


def insert_id(frame: bytes) -> int | None:
    """The id of an Insert frame ('I', relation, 'N', 2 columns, 't' len id), else None."""
    if frame[:1] == b"w" and frame[25:26] == b"I":
        size = int.from_bytes(frame[34:38], "big")
        return int(frame[38:38 + size])
    return None


def prepare(admin: psycopg.Connection, slots: list[str], rows: int = ROWS) -> None:
    admin.execute("CREATE TABLE loop_t (id int PRIMARY KEY, t text)")
    admin.execute("CREATE PUBLICATION loop_pub FOR TABLE loop_t")
    for slot in slots:
        admin.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [slot])
    admin.execute("INSERT INTO loop_t SELECT i, repeat('x', 50) FROM "
                  f"generate_series(1, {rows}) i")


async def wait_for_backlog(stream: ReplicationConnection) -> None:
    """Until the walsender filled the socket (a bounded wait): the reader is behind."""
    fd = stream.pgconn.socket
    for _ in range(600):
        await asyncio.sleep(0.05)
        held = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]
        if held >= 48 * 1024:
            return
    raise AssertionError(f"the walsender sent only {held} bytes")


async def stream_slot(dsn: str, slot: str, compiled: bool) -> tuple[list[bytes], list[int]]:
    """Every XLogData frame up to the transaction's Commit (without its send time), and
    the size of each read."""
    stream = await ReplicationConnection.connect(dsn)
    try:
        assert (stream._read_loop is not None) is True  # found here: psycopg_binary's libpq
        if not compiled:
            stream._read_loop = None
        await stream.start(slot, 0, OPTIONS)
        await wait_for_backlog(stream)
        frames: list[bytes] = []
        sizes: list[int] = []
        while not frames or frames[-1][17:18] != b"C":  # the kind, without the send time
            got = await stream.read()
            sizes.append(len(got))
            # an XLogData's header: 'w', WAL start, WAL end, then the send time (varies)
            frames.extend(f[:17] + f[25:] for f in got if f[:1] == b"w")
        return frames, sizes
    finally:
        await stream.close()


def test_the_compiled_loop_reads_the_frames_the_python_loop_reads(
        admin: psycopg.Connection, dsn: str) -> None:
    prepare(admin, ["loop_c", "loop_py"])
    compiled, compiled_sizes = run(stream_slot(dsn, "loop_c", compiled=True))
    python, python_sizes = run(stream_slot(dsn, "loop_py", compiled=False))
    assert compiled == python
    # an Insert without the send time: 'I', relation, 'N', 2 columns, 't' len id
    ids = [int(f[30:30 + int.from_bytes(f[26:30], "big")]) for f in compiled if f[17:18] == b"I"]
    assert ids == list(range(1, ROWS + 1)) and len(compiled) == ROWS + 3  # Begin, Relation, Commit
    for sizes in (compiled_sizes, python_sizes):
        # a turn's worth from the socket beyond libpq's buffer (~165 of these frames)
        assert max(sizes) <= 1024 and max(sizes[:3]) >= 256, sizes[:5]


def test_both_loops_take_turns_on_one_connection(admin: psycopg.Connection, dsn: str) -> None:
    """Reads alternating between the loops (the state between reads is libpq's alone)
    give every frame once, in order."""
    prepare(admin, ["loop_mix"])

    async def scenario() -> list[int]:
        stream = await ReplicationConnection.connect(dsn)
        compiled = stream._read_loop
        assert compiled is not None
        try:
            await stream.start("loop_mix", 0, OPTIONS)
            await wait_for_backlog(stream)
            ids: list[int] = []
            turn = 0
            while len(ids) < ROWS:
                stream._read_loop = compiled if turn % 2 else None
                turn += 1
                got = await stream.read()
                assert 1 <= len(got) <= 1024
                ids.extend(i for i in map(insert_id, got) if i is not None)
            return ids
        finally:
            await stream.close()

    assert run(scenario()) == list(range(1, ROWS + 1))


def test_a_walsender_terminated_mid_read_ends_both_loops_with_the_same_error(
        admin: psycopg.Connection, dsn: str) -> None:
    prepare(admin, ["loop_kill_c", "loop_kill_py"])

    async def scenario(slot: str, compiled: bool) -> tuple[str, bool, bool, list[int]]:
        stream = await ReplicationConnection.connect(dsn)
        if not compiled:
            stream._read_loop = None
        ids: list[int] = []
        try:
            await stream.start(slot, 0, OPTIONS)
            await wait_for_backlog(stream)
            ids.extend(i for i in map(insert_id, await stream.read()) if i is not None)
            admin.execute("SELECT pg_terminate_backend(%s)", [stream.pgconn.backend_pid])
            with pytest.raises(ReplicationError) as caught:
                for _ in range(10000):  # what the socket held, then the error
                    ids.extend(i for i in map(insert_id, await stream.read()) if i is not None)
            return str(caught.value), caught.value.retriable, stream.streaming, ids
        finally:
            await stream.close()

    for compiled in (True, False):
        message, retriable, streaming, ids = run(scenario(f"loop_kill_{'c' if compiled else 'py'}",
                                                          compiled))
        assert ids == list(range(1, len(ids) + 1)), compiled  # in order, none lost before it
        assert retriable and not streaming, (compiled, message)
        if compiled:
            compiled_message = message
    assert compiled_message == message
    assert "57P01" in message or "connection" in message, message


_CHILD = """
import asyncio, os, sys
from psycopg import pq
from walex.replication.stream import ReplicationConnection

async def main():
    stream = await ReplicationConnection.connect(os.environ["LOOP_DSN"])
    assert stream._read_loop is not None, "the compiled loop was not found"
    await stream.start(os.environ["LOOP_SLOT"], 0,
                       {"proto_version": "1", "publication_names": "loop_pub"})
    ids = []
    while len(ids) < int(os.environ["LOOP_ROWS"]):
        for frame in await stream.read():
            if frame[:1] == b"w" and frame[25:26] == b"I":
                size = int.from_bytes(frame[34:38], "big")
                ids.append(int(frame[38:38 + size]))
    assert ids == list(range(1, int(os.environ["LOOP_ROWS"]) + 1))
    stream.pgconn.finish()  # a closed connection: psycopg's own error, not a crash
    try:
        await stream.read()
    except Exception as exc:
        print(type(exc).__name__, exc.retriable)
    await stream.close()
    print(pq.__impl__, len(ids))

asyncio.run(main())
"""


@pytest.mark.parametrize("impl", ["binary", "python"])
def test_the_compiled_loop_is_memory_safe_under_debug_allocators(
        admin: psycopg.Connection, dsn: str, impl: str) -> None:
    prepare(admin, ["loop_mem"], rows=5000)
    env = dict(os.environ, PYTHONMALLOC="debug", MALLOC_CHECK_="3", MALLOC_PERTURB_="165",
               PSYCOPG_IMPL=impl, LOOP_DSN=dsn, LOOP_SLOT="loop_mem", LOOP_ROWS="5000")
    env.pop("WALEX_PURE_PYTHON", None)
    done = subprocess.run([sys.executable, "-X", "dev", "-c", _CHILD], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[:2] == ["ReplicationError True", f"{impl} 5000"], done.stdout


def test_the_python_loop_serves_when_forced(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WALEX_PURE_PYTHON", "1")

    async def scenario() -> Any:
        stream = await ReplicationConnection.connect(dsn)
        try:
            return stream._read_loop
        finally:
            await stream.close()

    assert run(scenario()) is None


def test_the_return_codes_match_the_compiled_modules() -> None:
    from walex.replication import _readloop

    assert (readloop.READY, readloop.WAIT, readloop.END, readloop.COPY_FAILED,
            readloop.CONSUME_FAILED) == (_readloop.READY, _readloop.WAIT, _readloop.END,
                                         _readloop.COPY_FAILED, _readloop.CONSUME_FAILED)


def test_an_unknown_psycopg_implementation_leaves_the_python_loop_with_one_debug_line(
        admin: psycopg.Connection, dsn: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    prepare(admin, ["loop_unknown"], rows=100)
    monkeypatch.setattr(readloop, "_found", None)  # looked for again, then forgotten
    monkeypatch.setattr(readloop.pq, "__impl__", "cffi")

    async def scenario() -> tuple[Any, list[int]]:
        stream = await ReplicationConnection.connect(dsn)
        try:
            await stream.start("loop_unknown", 0, OPTIONS)
            ids: list[int] = []
            while len(ids) < 100:
                ids.extend(i for i in map(insert_id, await stream.read()) if i is not None)
            return stream._read_loop, ids
        finally:
            await stream.close()

    with caplog.at_level("DEBUG", logger="walex"):
        loop, ids = run(scenario())
    assert loop is None and ids == list(range(1, 101))
    assert [r.getMessage() for r in caplog.records if "Python loop" in r.getMessage()] == [
        "replication reads use the Python loop: unknown psycopg implementation 'cffi'"]
