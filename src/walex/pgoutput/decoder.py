"""Decode pgoutput message bytes into :mod:`walex.pgoutput.messages`. No I/O.

Covers every message of protocol versions 1-4. The only state is whether the
decoder is inside a streamed block (between Stream Start and Stream Stop),
because changes there carry an extra xid field.

The per-column TupleData loop runs in C (``_tuple.c``) when that optional
extension was built, else in Python; both give identical results and errors
of the same kind (``WALEX_PURE_PYTHON=1`` forces the Python one).

Invariant: any input either decodes to exactly one message that consumed every
byte, or raises :class:`walex.errors.DecodeError` naming the message tag and the
WAL position; no ``IndexError``/``struct.error`` escapes.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from ..errors import DecodeError
from ..lsn import format_lsn
from .messages import (
    UNCHANGED_TOAST, Begin, BeginPrepare, BinaryValue, Column, Commit, CommitPrepared,
    Delete, Insert, LogicalMessage, Message, Origin, Prepare, Relation, RollbackPrepared,
    StreamAbort, StreamCommit, StreamPrepare, StreamStart, StreamStop, Truncate,
    TupleData, Type, Update,
)

__all__ = ["Decoder", "TAG_NAMES", "pg_timestamp"]

_I8 = struct.Struct("!B").unpack_from
_I16 = struct.Struct("!H").unpack_from
_I32 = struct.Struct("!I").unpack_from
_S32 = struct.Struct("!i").unpack_from
_I64 = struct.Struct("!Q").unpack_from
_BEGIN = struct.Struct("!QqI").unpack_from
_COMMIT = struct.Struct("!BQQq").unpack_from
_PREPARE = struct.Struct("!BQQqI").unpack_from
_BEGIN_PREPARE = struct.Struct("!QQqI").unpack_from
_ROLLBACK_PREPARED = struct.Struct("!BQQqqI").unpack_from
_STREAM_COMMIT = struct.Struct("!IBQQq").unpack_from
_COLUMN_TAIL = struct.Struct("!Ii").unpack_from

_PG_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)

TAG_NAMES = {
    "B": "Begin", "C": "Commit", "O": "Origin", "R": "Relation", "Y": "Type",
    "I": "Insert", "U": "Update", "D": "Delete", "T": "Truncate", "M": "Message",
    "S": "Stream Start", "E": "Stream Stop", "c": "Stream Commit", "A": "Stream Abort",
    "b": "Begin Prepare", "P": "Prepare", "K": "Commit Prepared",
    "r": "Rollback Prepared", "p": "Stream Prepare",
}


def pg_timestamp(micros: int) -> datetime:
    """Convert PostgreSQL's microseconds since 2000-01-01 UTC to a datetime."""
    return _PG_EPOCH + timedelta(microseconds=micros)


try:
    from ._tuple import parse_tuple as _c_parse_tuple
except ImportError:  # not built: the pure-Python parser serves
    _c_parse_tuple = None


def _c_tuple(data: bytes, pos: int) -> tuple[TupleData, int]:
    values, plain, end = _c_parse_tuple(data, pos, UNCHANGED_TOAST, BinaryValue)  # type: ignore[misc]
    return TupleData(values, plain), end


class _Malformed(Exception):
    """Raised inside the decoder; turned into DecodeError with context."""


class Decoder:
    """Turns the payload of one XLogData frame into one pgoutput message."""

    __slots__ = ("in_stream", "_dispatch", "_tuple", "accelerated")

    def __init__(self, accelerated: bool | None = None) -> None:
        """``accelerated``: use the C tuple parser (default: when it was built)."""
        if accelerated is None:
            accelerated = _c_parse_tuple is not None and not os.environ.get("WALEX_PURE_PYTHON")
        if accelerated and _c_parse_tuple is None:
            raise RuntimeError("walex.pgoutput._tuple (the C accelerator) is not built")
        self.accelerated = accelerated
        self._tuple: Callable[[bytes, int], tuple[TupleData, int]] = (
            _c_tuple if accelerated else self._py_tuple
        )
        self.in_stream = False
        self._dispatch: dict[int, Callable[[bytes], Message]] = {
            ord(tag): getattr(self, "_" + name.lower().replace(" ", "_"))
            for tag, name in TAG_NAMES.items()
        }

    def decode(self, data: bytes, lsn: int = 0) -> Message:
        """Decode one message; ``lsn`` is the XLogData start, used in errors."""
        if not data:
            raise DecodeError(f"empty pgoutput message at LSN {format_lsn(lsn)}", lsn=lsn)
        tag = data[0]
        method = self._dispatch.get(tag)
        if method is None:
            raise DecodeError(
                f"unknown pgoutput message tag {chr(tag)!r} (0x{tag:02x}) at LSN "
                f"{format_lsn(lsn)}; is the server using a newer protocol version?",
                tag=chr(tag), lsn=lsn,
            )
        try:
            return method(data)
        except (_Malformed, struct.error, IndexError, UnicodeDecodeError, ValueError, OverflowError) as exc:
            name = TAG_NAMES[chr(tag)]
            raise DecodeError(
                f"malformed pgoutput {name} message ({chr(tag)!r}, {len(data)} bytes) at LSN "
                f"{format_lsn(lsn)}: {exc}",
                tag=chr(tag), lsn=lsn,
            ) from None

    # -- helpers ---------------------------------------------------------

    @staticmethod
    def _string(data: bytes, pos: int) -> tuple[str, int]:
        end = data.index(0, pos)  # ValueError when unterminated
        return data[pos:end].decode(), end + 1

    @staticmethod
    def _end(data: bytes, pos: int) -> None:
        if pos != len(data):
            raise _Malformed(f"{len(data) - pos} unexpected trailing bytes")

    def _xid(self, data: bytes) -> tuple[int | None, int]:
        if self.in_stream:
            return _I32(data, 1)[0], 5
        return None, 1

    @staticmethod
    def _py_tuple(data: bytes, pos: int) -> tuple[TupleData, int]:
        """The reference TupleData parser (``_tuple.c`` must give identical results)."""
        (count,) = _I16(data, pos)
        pos += 2
        size = len(data)
        values: list = []
        append = values.append
        plain = True
        for _ in range(count):
            kind = data[pos]
            if kind == 116:  # 't' text; lengths are unsigned here, so an overrun
                end = pos + 5 + _I32(data, pos + 1)[0]  # shows as pos > size below
                append(data[pos + 5:end])
                pos = end
                continue
            pos += 1
            if kind == 110:  # 'n' null
                append(None)
            elif kind == 117:  # 'u' unchanged TOAST
                append(UNCHANGED_TOAST)
                plain = False
            elif kind == 98:  # 'b' binary
                (length,) = _S32(data, pos)
                pos += 4
                end = pos + length
                if length < 0 or end > size:
                    raise _Malformed(f"column value of {length} bytes overruns the message")
                append(BinaryValue(data[pos:end]))
                pos = end
                plain = False
            else:
                raise _Malformed(f"unknown column kind {chr(kind)!r} in tuple data")
        if pos > size:
            raise _Malformed(f"a column value overruns the message by {pos - size} bytes")
        return TupleData(values, plain), pos

    # -- messages --------------------------------------------------------

    def _begin(self, data: bytes) -> Begin:
        final_lsn, ts, xid = _BEGIN(data, 1)
        self._end(data, 21)
        return Begin(final_lsn, pg_timestamp(ts), xid)

    def _commit(self, data: bytes) -> Commit:
        flags, commit_lsn, end_lsn, ts = _COMMIT(data, 1)
        self._end(data, 26)
        return Commit(flags, commit_lsn, end_lsn, pg_timestamp(ts))

    def _origin(self, data: bytes) -> Origin:
        (lsn,) = _I64(data, 1)
        name, pos = self._string(data, 9)
        self._end(data, pos)
        return Origin(lsn, name)

    def _relation(self, data: bytes) -> Relation:
        xid, pos = self._xid(data)
        (relid,) = _I32(data, pos)
        namespace, pos = self._string(data, pos + 4)
        name, pos = self._string(data, pos)
        identity = chr(data[pos])
        if identity not in "dnfi":
            raise _Malformed(f"unknown replica identity {identity!r}")
        (count,) = _I16(data, pos + 1)
        pos += 3
        columns = []
        for _ in range(count):
            flags = data[pos]
            colname, pos = self._string(data, pos + 1)
            type_oid, typmod = _COLUMN_TAIL(data, pos)
            pos += 8
            columns.append(Column(colname, type_oid, typmod, bool(flags & 1)))
        self._end(data, pos)
        return Relation(relid, namespace, name, identity, columns, xid)

    def _type(self, data: bytes) -> Type:
        xid, pos = self._xid(data)
        (oid,) = _I32(data, pos)
        namespace, pos = self._string(data, pos + 4)
        name, pos = self._string(data, pos)
        self._end(data, pos)
        return Type(oid, namespace, name, xid)

    def _insert(self, data: bytes) -> Insert:
        xid, pos = self._xid(data)
        (relid,) = _I32(data, pos)
        if data[pos + 4] != 78:  # 'N'
            raise _Malformed(f"expected 'N' before the new tuple, got {chr(data[pos + 4])!r}")
        new, pos = self._tuple(data, pos + 5)
        self._end(data, pos)
        return Insert(relid, new, xid)

    def _update(self, data: bytes) -> Update:
        xid, pos = self._xid(data)
        (relid,) = _I32(data, pos)
        pos += 4
        kind = data[pos]
        old = old_kind = None
        if kind in (75, 79):  # 'K' key, 'O' old row
            old_kind = chr(kind)
            old, pos = self._tuple(data, pos + 1)
            kind = data[pos]
        if kind != 78:
            raise _Malformed(f"expected 'N' before the new tuple, got {chr(kind)!r}")
        new, pos = self._tuple(data, pos + 1)
        self._end(data, pos)
        return Update(relid, new, old, old_kind, xid)  # type: ignore[arg-type]

    def _delete(self, data: bytes) -> Delete:
        xid, pos = self._xid(data)
        (relid,) = _I32(data, pos)
        kind = data[pos + 4]
        if kind not in (75, 79):
            raise _Malformed(f"expected 'K' or 'O' before the old tuple, got {chr(kind)!r}")
        old, pos = self._tuple(data, pos + 5)
        self._end(data, pos)
        return Delete(relid, old, chr(kind), xid)  # type: ignore[arg-type]

    def _truncate(self, data: bytes) -> Truncate:
        xid, pos = self._xid(data)
        (count,) = _I32(data, pos)
        options = data[pos + 4]
        pos += 5
        if pos + 4 * count != len(data):
            raise _Malformed(f"{count} relations announced, {len(data) - pos} bytes of ids")
        ids = list(struct.unpack_from(f"!{count}I", data, pos))
        return Truncate(ids, options, xid)

    def _message(self, data: bytes) -> LogicalMessage:
        xid, pos = self._xid(data)
        flags = data[pos]
        (lsn,) = _I64(data, pos + 1)
        prefix, pos = self._string(data, pos + 9)
        (length,) = _S32(data, pos)
        pos += 4
        if length < 0 or pos + length != len(data):
            raise _Malformed(f"content of {length} bytes does not fit the message")
        return LogicalMessage(bool(flags & 1), lsn, prefix, bytes(data[pos:]), xid)

    def _stream_start(self, data: bytes) -> StreamStart:
        (xid,) = _I32(data, 1)
        first = data[5]
        self._end(data, 6)
        self.in_stream = True
        return StreamStart(xid, first == 1)

    def _stream_stop(self, data: bytes) -> StreamStop:
        self._end(data, 1)
        self.in_stream = False
        return StreamStop()

    def _stream_commit(self, data: bytes) -> StreamCommit:
        xid, flags, commit_lsn, end_lsn, ts = _STREAM_COMMIT(data, 1)
        self._end(data, 30)
        return StreamCommit(xid, flags, commit_lsn, end_lsn, pg_timestamp(ts))

    def _stream_abort(self, data: bytes) -> StreamAbort:
        xid, subxid = struct.unpack_from("!II", data, 1)
        if len(data) == 9:
            return StreamAbort(xid, subxid)
        abort_lsn, ts = struct.unpack_from("!Qq", data, 9)
        self._end(data, 25)
        return StreamAbort(xid, subxid, abort_lsn, pg_timestamp(ts))

    def _begin_prepare(self, data: bytes) -> BeginPrepare:
        prepare_lsn, end_lsn, ts, xid = _BEGIN_PREPARE(data, 1)
        gid, pos = self._string(data, 29)
        self._end(data, pos)
        return BeginPrepare(prepare_lsn, end_lsn, pg_timestamp(ts), xid, gid)

    def _prepare_fields(self, data: bytes) -> tuple:
        flags, lsn, end_lsn, ts, xid = _PREPARE(data, 1)
        gid, pos = self._string(data, 30)
        self._end(data, pos)
        return flags, lsn, end_lsn, pg_timestamp(ts), xid, gid

    def _prepare(self, data: bytes) -> Prepare:
        return Prepare(*self._prepare_fields(data))

    def _stream_prepare(self, data: bytes) -> StreamPrepare:
        return StreamPrepare(*self._prepare_fields(data))

    def _commit_prepared(self, data: bytes) -> CommitPrepared:
        return CommitPrepared(*self._prepare_fields(data))

    def _rollback_prepared(self, data: bytes) -> RollbackPrepared:
        flags, prepare_end, rollback_end, prep_ts, rb_ts, xid = _ROLLBACK_PREPARED(data, 1)
        gid, pos = self._string(data, 38)
        self._end(data, pos)
        return RollbackPrepared(
            flags, prepare_end, rollback_end, pg_timestamp(prep_ts), pg_timestamp(rb_ts), xid, gid
        )
