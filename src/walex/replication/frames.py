"""Frames of the streaming replication protocol inside COPY BOTH. No I/O.

The server sends XLogData (``w``: WAL start, WAL end, send time, payload) and
primary keepalives (``k``: WAL end, send time, reply requested); the client
sends standby status updates (``r``: write, flush, apply LSN, time, reply
requested). Only ``flush`` moves a slot's ``confirmed_flush_lsn``.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

from ..errors import ReplicationError
from ..records import Record

__all__ = ["Keepalive", "XLOGDATA_HEADER", "XLOGDATA_POSITIONS", "parse_keepalive", "standby_status", "pg_now"]

XLOGDATA_HEADER = struct.Struct("!cQQq")  # 'w', wal_start, wal_end, send_time; 25 bytes
XLOGDATA_POSITIONS = struct.Struct("!xQQ")  # just wal_start and wal_end, for the hot path
_KEEPALIVE = struct.Struct("!cQqB")
_STATUS = struct.Struct("!cQQQqB")
_PG_EPOCH_UNIX = 946_684_800  # 2000-01-01 in seconds since the Unix epoch


@dataclass(slots=True, repr=False, eq=False)
class Keepalive(Record):
    """A Primary keepalive message of the stream."""

    wal_end: int
    send_time: int
    reply_requested: bool


def pg_now() -> int:
    """Microseconds since 2000-01-01 UTC, the protocol's clock."""
    return int((time.time() - _PG_EPOCH_UNIX) * 1_000_000)


def parse_keepalive(frame: bytes) -> Keepalive:
    if len(frame) != _KEEPALIVE.size:
        raise ReplicationError(f"malformed primary keepalive frame of {len(frame)} bytes")
    _, wal_end, send_time, reply = _KEEPALIVE.unpack(frame)
    return Keepalive(wal_end, send_time, bool(reply))


def standby_status(write: int, flush: int, apply: int, reply: bool = False) -> bytes:
    """A standby status update telling the server what the client has done."""
    return _STATUS.pack(b"r", write, flush, apply, pg_now(), 1 if reply else 0)
