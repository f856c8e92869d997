"""The replication connection: slot commands, START_REPLICATION, frames in, status out.

Built on psycopg 3: the connection is an ``AsyncConnection`` opened with
``replication=database`` (so slot commands run through psycopg's normal
async execute), and the COPY BOTH stream is driven through its libpq layer
(``psycopg.pq.PGconn``) in non-blocking mode, waiting on the socket with the
asyncio loop. Nothing here blocks the event loop.

Invariants: :meth:`read` returns every frame the server sent, in order,
batched as they are available; :meth:`send_status` never blocks on a reader;
a server error or a closed stream raises :class:`ReplicationError`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import pq, sql
from psycopg.conninfo import conninfo_to_dict

from ..errors import ReplicationError, SlotInUseError, redact
from ..lsn import format_lsn, parse_lsn
from ..records import Record
from .frames import standby_status
from .readloop import CONSUME_FAILED, COPY_FAILED, WAIT, read_loop

__all__ = ["ReplicationConnection", "SlotInfo"]

_COPY_BOTH = pq.ExecStatus.COPY_BOTH
# frames read() gathers from the socket without a wait before it returns (the loop turns
# between two reads: the lanes and the acknowledger run then): ~64 kB of W1 rows, ~1 ms
_FRAMES_PER_TURN = 256
_MOST_FRAMES = 1024  # a read returns at most these
_SESSION_OPTIONS = "-c DateStyle=ISO -c IntervalStyle=postgres -c extra_float_digits=3 -c TimeZone=UTC"


def is_retriable(sqlstate: str) -> bool:
    """Whether reconnecting may cure an error with this SQLSTATE.

    Connection problems (class 08), a shutting down or restarting server
    (57P01-57P03), resource shortage (class 53) and a slot still held by a
    dying walsender (55006) pass; a lost slot (55000), a missing publication
    and authentication failures do not.
    """
    return sqlstate[:2] in ("08", "53") or sqlstate in ("57P01", "57P02", "57P03", "55006", "")


@dataclass(slots=True, repr=False, eq=False)
class SlotInfo(Record):
    """The slot a session streams from: its name, where it starts, whether it was made now."""

    name: str
    consistent_point: int
    created: bool


class ReplicationConnection:
    """One walsender connection, from slot creation to the end of the stream."""

    def __init__(self, conn: psycopg.AsyncConnection, secret: str | None = None) -> None:
        self.conn = conn
        self.pgconn = conn.pgconn
        self._secret = secret
        self._loop = asyncio.get_running_loop()
        self._fd = -1
        # the compiled twin of read()'s frame loop (readloop.py), None for the Python loop
        self._read_loop = read_loop(self.pgconn)
        self._send_lock = asyncio.Lock()
        self.streaming = False

    @classmethod
    async def connect(cls, conninfo: str, secret: str | None = None) -> ReplicationConnection:
        try:
            # pgoutput sends names and text values in the client encoding: ask for
            # UTF-8 whatever the database's encoding, which is what the decoder reads.
            # Text values must be in the formats psycopg parses, whatever the
            # database's or role's settings (ALTER DATABASE ... SET DateStyle, ...); in
            # UTC, as walex types timestamptz values (the relay writes their JSON from the text).
            options = conninfo_to_dict(conninfo).get("options") or ""
            conn = await psycopg.AsyncConnection.connect(
                conninfo, replication="database", autocommit=True, client_encoding="UTF8",
                options=f"{options} {_SESSION_OPTIONS}".strip(),
            )
        except psycopg.Error as exc:
            raise ReplicationError(
                f"cannot open a replication connection: {redact(str(exc), secret)}",
                retriable=isinstance(exc, psycopg.OperationalError) and is_retriable(exc.sqlstate or ""),
                answered=exc.sqlstate is not None,  # a refusal has a SQLSTATE, no answer none
            ) from None
        return cls(conn, secret)

    @property
    def server_version(self) -> int:
        return self.conn.info.server_version

    async def create_slot(self, name: str, *, temporary: bool, failover: bool = False) -> SlotInfo:
        """Create a pgoutput slot; a durable slot that exists already is reused."""
        if failover and self.server_version < 170000:
            raise ReplicationError("failover slots need PostgreSQL 17 or later")
        query = sql.SQL("CREATE_REPLICATION_SLOT {} {}LOGICAL pgoutput {}").format(
            sql.Identifier(name),
            sql.SQL("TEMPORARY " if temporary else ""),
            sql.SQL("(SNAPSHOT 'nothing'{})").format(
                sql.SQL(", FAILOVER") if failover else sql.SQL("")
            )
            if self.server_version >= 150000
            else sql.SQL("NOEXPORT_SNAPSHOT"),
        )
        try:
            cur = await self.conn.execute(query)
        except psycopg.errors.DuplicateObject:
            return SlotInfo(name, 0, created=False)
        except psycopg.Error as exc:
            raise ReplicationError(
                f"cannot create replication slot {name!r}: {redact(str(exc), self._secret)}",
                retriable=is_retriable(exc.sqlstate or ""),
            ) from None
        row = await cur.fetchone()
        assert row is not None
        return SlotInfo(name, parse_lsn(row[1]), created=True)

    async def start(self, slot: str, start_lsn: int, options: dict[str, str]) -> None:
        """Send START_REPLICATION and wait until the server is in COPY BOTH; a connection
        lost meanwhile (or that libpq had dropped) raises a retriable ReplicationError, as
        in :meth:`read`."""
        try:
            await self._start(slot, start_lsn, options)
        except psycopg.OperationalError as exc:
            self.streaming = False
            raise ReplicationError(
                f"START_REPLICATION failed: the connection was lost: "
                f"{redact(str(exc), self._secret)}", retriable=True,
            ) from None

    async def _start(self, slot: str, start_lsn: int, options: dict[str, str]) -> None:
        opts = sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(k), sql.Literal(v)) for k, v in options.items()
        )
        query = sql.SQL("START_REPLICATION SLOT {} LOGICAL {} ({})").format(
            sql.Identifier(slot), sql.SQL(format_lsn(start_lsn)), opts
        )
        pgconn = self.pgconn
        pgconn.send_query(query.as_bytes(self.conn))
        await self._flush()
        while True:
            while pgconn.is_busy():
                await self._wait_readable()
                pgconn.consume_input()
            result = pgconn.get_result()
            if result is None:
                raise ReplicationError("START_REPLICATION ended without entering COPY BOTH")
            if result.status == _COPY_BOTH:
                break
            if result.status == pq.ExecStatus.FATAL_ERROR:
                primary = result.error_field(pq.DiagnosticField.MESSAGE_PRIMARY) or b""
                message = redact(primary.decode(errors="replace"), self._secret)
                sqlstate = (result.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode()
                await self._discard_results()  # so the connection can take the next command
                if sqlstate == "55006":
                    raise SlotInUseError(f"replication slot {slot!r}: {message}", retriable=True)
                raise ReplicationError(
                    f"START_REPLICATION failed: {message} (SQLSTATE {sqlstate})",
                    retriable=is_retriable(sqlstate),
                )
        pgconn.nonblocking = 1
        self.streaming = True

    async def read(self) -> list[bytes]:
        """The frames available now; waits for at least one. Beyond libpq's buffer, what
        the socket already holds is read too while fewer than ``_FRAMES_PER_TURN`` came
        (at most 1,024 are returned). A connection libpq finds or already found broken
        (its socket gone: a status update's write failed first, say) raises a retriable
        :class:`ReplicationError`, whichever call sees it."""
        try:
            if self._read_loop is not None:
                return await self._read_compiled(self._read_loop)
            return await self._read_python()
        except psycopg.OperationalError as exc:
            self.streaming = False
            raise ReplicationError(
                f"replication connection lost: {redact(str(exc), self._secret)}",
                retriable=True,
            ) from None

    async def _read_python(self) -> list[bytes]:
        pgconn = self.pgconn
        frames: list[bytes] = []
        tried = -1  # len(frames) when libpq last read the socket without a wait
        while True:
            nbytes, data = pgconn.get_copy_data(1)
            if nbytes > 0:
                frames.append(bytes(data))
                if len(frames) >= _MOST_FRAMES:
                    return frames
                continue
            if nbytes == 0:
                if frames:
                    if tried == len(frames) or len(frames) >= _FRAMES_PER_TURN:
                        return frames  # the socket had no more, or enough for a turn
                    # libpq reads at most its buffer (~16 kB, ~60 W1 rows) at a time:
                    # what the socket holds already is taken now, up to a turn's
                    # worth, not after a turn of the loop through select (and two
                    # epoll_ctl) per 16 kB
                    tried = len(frames)
                    pgconn.consume_input()
                    continue
                await self._wait_readable()
                pgconn.consume_input()
                continue
            self._end_of_stream(nbytes)

    async def _read_compiled(self, loop: Any) -> list[bytes]:
        """:meth:`_read_python` with its frame loop in C (``_readloop.ReadLoop.gather``):
        the same frames and the same errors, psycopg's messages included."""
        pgconn = self.pgconn
        frames: list[bytes] = []
        while True:
            ptr = pgconn.pgconn_ptr
            if ptr is None:  # closed: psycopg's own calls say how (frames is empty here)
                return await self._read_python()
            code = loop.gather(ptr, frames, _FRAMES_PER_TURN, _MOST_FRAMES)
            if code > 0:
                return frames
            if code == WAIT:
                await self._wait_readable()
                pgconn.consume_input()
            elif code == COPY_FAILED:
                raise psycopg.OperationalError(
                    f"receiving copy data failed: {pgconn.get_error_message()}")
            elif code == CONSUME_FAILED:
                raise psycopg.OperationalError(
                    f"consuming input failed: {pgconn.get_error_message()}")
            else:
                self._end_of_stream(code)

    async def _discard_results(self) -> None:
        pgconn = self.pgconn
        while True:
            while pgconn.is_busy():
                await self._wait_readable()
                pgconn.consume_input()
            if pgconn.get_result() is None:
                return

    def _end_of_stream(self, nbytes: int) -> None:
        self.streaming = False
        pgconn = self.pgconn
        message = sqlstate = ""
        try:
            result = pgconn.get_result()
            while result is not None:
                if result.status == pq.ExecStatus.FATAL_ERROR:
                    message = result.error_message.decode(errors="replace").strip()
                    sqlstate = (result.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode()
                result = pgconn.get_result()
        except psycopg.Error:
            pass
        if not message:
            message = pgconn.error_message.decode(errors="replace").strip() or "the server ended the stream"
        raise ReplicationError(
            f"replication stream ended: {redact(message, self._secret)}"
            + (f" (SQLSTATE {sqlstate})" if sqlstate else ""),
            retriable=is_retriable(sqlstate),
        )

    async def send_status(self, write: int, flush: int, apply: int, reply: bool = False) -> None:
        """Send a standby status update (only ``flush`` moves the slot)."""
        async with self._send_lock:
            if not self.streaming:
                return
            try:
                if self.pgconn.put_copy_data(standby_status(write, flush, apply, reply)) != 1:
                    raise ReplicationError(
                        "cannot send a status update: " + self.pgconn.get_error_message().strip(),
                        retriable=True,
                    )
                await self._flush()
            except psycopg.OperationalError as exc:  # libpq's write failed, or had dropped it
                raise ReplicationError(
                    f"cannot send a status update: {redact(str(exc), self._secret)}", retriable=True,
                ) from None

    async def close(self) -> None:
        self.streaming = False
        self._stop_waiting()
        try:
            await self.conn.close()
        except Exception:  # pragma: no cover - closing a broken connection
            pass

    # -- socket waits ----------------------------------------------------

    async def _flush(self) -> None:
        while self.pgconn.flush() == 1:
            fut = self._loop.create_future()
            fd = self.pgconn.socket
            self._loop.add_writer(fd, _resolve, fut)
            try:
                await fut
            finally:
                self._loop.remove_writer(fd)

    async def _wait_readable(self) -> None:
        fd = self.pgconn.socket
        fut = self._loop.create_future()
        self._loop.add_reader(fd, _resolve, fut)
        self._fd = fd
        try:
            await fut
        finally:
            self._loop.remove_reader(fd)
            self._fd = -1

    def _stop_waiting(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
