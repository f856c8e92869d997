"""Replication protocol frames: primary keepalive and standby status update.

Round trips through ``struct`` (the byte layout of the PostgreSQL docs,
"Streaming Replication Protocol"), malformed keepalives, and one live exchange
with a real walsender: its keepalive parses, and the status update we send is
what ``pg_stat_replication`` / ``pg_replication_slots`` then report.
"""

from __future__ import annotations

import select
import struct
import time
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from psycopg import pq
from psycopg.conninfo import make_conninfo

from walex.errors import ReplicationError
from walex.lsn import format_lsn, parse_lsn
from walex.replication.frames import (
    XLOGDATA_HEADER, Keepalive, parse_keepalive, pg_now, standby_status,
)

KEEPALIVE = "!cQqB"  # 'k', WAL end, send time (µs since 2000-01-01 UTC), reply requested
STATUS = "!cQQQqB"  # 'r', written, flushed, applied LSN, client time, reply requested
PG_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)
FRAMES = settings(max_examples=300, deadline=None)

u64 = st.integers(0, 2**64 - 1)
i64 = st.integers(-2**63, 2**63 - 1)


def _keepalive(wal_end: int = 0x16_B374D848, send_time: int = 123_456_789,
               reply: int = 0) -> bytes:
    return struct.pack(KEEPALIVE, b"k", wal_end, send_time, reply)


# -- primary keepalive ------------------------------------------------------------------

def test_parse_keepalive() -> None:
    assert parse_keepalive(_keepalive()) == Keepalive(0x16_B374D848, 123_456_789, False)
    assert parse_keepalive(_keepalive(reply=1)).reply_requested is True
    assert len(_keepalive()) == 18


@FRAMES
@given(u64, i64, st.integers(0, 255))
@example(2**64 - 1, -2**63, 255)
def test_parse_keepalive_round_trip(wal_end: int, send_time: int, reply: int) -> None:
    keepalive = parse_keepalive(_keepalive(wal_end, send_time, reply))
    assert keepalive == Keepalive(wal_end, send_time, reply != 0)
    assert type(keepalive.reply_requested) is bool


@pytest.mark.parametrize("frame", [
    b"", b"k", _keepalive()[:-1], _keepalive()[:9], _keepalive() + b"\x00",
    _keepalive() * 2, b"k" + bytes(40),
], ids=["empty", "tag-only", "17-bytes", "9-bytes", "19-bytes", "doubled", "41-bytes"])
def test_malformed_keepalive(frame: bytes) -> None:
    with pytest.raises(ReplicationError, match=f"malformed primary keepalive frame of {len(frame)}"):
        parse_keepalive(frame)


@FRAMES
@given(st.binary(max_size=64).filter(lambda b: len(b) != 18))
def test_keepalive_of_any_other_length_is_a_replication_error(frame: bytes) -> None:
    with pytest.raises(ReplicationError):
        parse_keepalive(frame)


# -- standby status update --------------------------------------------------------------

def test_standby_status_layout() -> None:
    before = pg_now()
    frame = standby_status(0x10, 0x20, 0x30, reply=True)
    after = pg_now()
    assert len(frame) == 34 == struct.calcsize(STATUS)
    tag, write, flush, apply, sent, reply = struct.unpack(STATUS, frame)
    assert (tag, write, flush, apply, reply) == (b"r", 0x10, 0x20, 0x30, 1)
    assert before <= sent <= after
    assert struct.unpack(STATUS, standby_status(1, 2, 3))[-1] == 0  # reply defaults to no


@FRAMES
@given(u64, u64, u64, st.booleans())
@example(2**64 - 1, 0, 2**64 - 1, True)
def test_standby_status_round_trip(write: int, flush: int, apply: int, reply: bool) -> None:
    tag, *lsns, _, flag = struct.unpack(STATUS, standby_status(write, flush, apply, reply))
    assert (tag, lsns, flag) == (b"r", [write, flush, apply], int(reply))


def test_pg_now_is_microseconds_since_2000() -> None:
    now = PG_EPOCH + timedelta(microseconds=pg_now())
    assert abs(now - datetime.now(timezone.utc)) < timedelta(seconds=1)


def test_xlogdata_header() -> None:
    frame = XLOGDATA_HEADER.pack(b"w", 1, 2, 3) + b"B..."
    assert XLOGDATA_HEADER.size == 25
    assert XLOGDATA_HEADER.unpack_from(frame) == (b"w", 1, 2, 3)
    assert frame[XLOGDATA_HEADER.size:] == b"B..."


# -- a real walsender ----------------------------------------------------------------

def _start_replication(dsn: str, slot: str) -> pq.PGconn:
    conn = pq.PGconn.connect(make_conninfo(dsn, replication="database").encode())
    assert conn.status == pq.ConnStatus.OK, conn.error_message
    conn.send_query(f"START_REPLICATION SLOT {slot} LOGICAL 0/0"
                    " (proto_version '1', publication_names 'walex_frames')".encode())
    result = conn.get_result()
    assert result is not None and result.status == pq.ExecStatus.COPY_BOTH
    return conn


def _next_frame(conn: pq.PGconn, tag: bytes, timeout: float = 30) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        nbytes, data = conn.get_copy_data(1)
        if nbytes > 0:
            if bytes(data[:1]) == tag:
                return bytes(data)
        elif nbytes == 0:
            assert time.monotonic() < deadline, f"no {tag!r} frame from the server"
            select.select([conn.socket], [], [], 0.5)
            conn.consume_input()
        else:
            pytest.fail(f"replication stream ended: {conn.error_message!r}")


def _send(conn: pq.PGconn, frame: bytes) -> None:
    assert conn.put_copy_data(frame) == 1
    assert conn.flush() == 0


def test_live_keepalive_and_status_update(dsn: str, admin: psycopg.Connection) -> None:
    admin.execute("CREATE PUBLICATION walex_frames")
    admin.execute("SELECT pg_create_logical_replication_slot('walex_frames', 'pgoutput')")
    admin.execute("CREATE TABLE t AS SELECT 1 AS n")  # WAL past the slot's start
    conn = _start_replication(dsn, "walex_frames")
    try:
        _send(conn, standby_status(0, 0, 0, reply=True))  # the server answers a keepalive
        keepalive = parse_keepalive(_next_frame(conn, b"k"))
        flushed = parse_lsn(admin.execute("SELECT pg_current_wal_flush_lsn()::text")
                            .fetchone()[0])  # type: ignore[index]
        assert 0 < keepalive.wal_end <= flushed
        assert abs(keepalive.send_time - pg_now()) < 5_000_000

        end = keepalive.wal_end
        frame = standby_status(end, end, end - 8)
        _, write, flush, apply, sent, _ = struct.unpack(STATUS, frame)
        _send(conn, frame)
        query = """
            SELECT r.write_lsn::text, r.flush_lsn::text, r.replay_lsn::text, r.reply_time,
                   s.confirmed_flush_lsn::text
            FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid
            WHERE s.slot_name = 'walex_frames'"""
        deadline = time.monotonic() + 10
        while True:
            row = admin.execute(query).fetchone()
            if row and row[1] == row[4] == format_lsn(flush):
                break
            assert time.monotonic() < deadline, f"status update not seen: {row}"
            time.sleep(0.05)
        assert [parse_lsn(x) for x in row[:3]] == [write, flush, apply]
        assert row[3] == PG_EPOCH + timedelta(microseconds=sent)  # our clock, to the µs
        assert parse_lsn(row[4]) == flush  # the slot's confirmed_flush_lsn
    finally:
        conn.finish()
