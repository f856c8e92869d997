"""A normal (non-replication) connection opened on demand and reopened when lost.

walex needs ordinary SQL while it streams: ``pg_type`` lookups for types it
meets, heartbeats, the few statements a walsender connection cannot run. No
connection is opened before one is needed. The server may close that connection at any moment
(``idle_session_timeout``, ``pg_terminate_backend``, a restart) while the
replication connection lives on. :class:`LookupConnection` runs each query on
its connection, opening one first when it has none; when the connection is
lost (``psycopg.OperationalError``) it opens a new one and runs the query
again, a few times with backoff. Only if that keeps failing does it raise a
retriable :class:`~walex.errors.ReplicationError`, so the pipeline reconnects
as for any lost connection. A query the server does not answer within
``timeout`` seconds (a network partition leaves a connection silent, not
closed) counts as a lost connection: :func:`bounded` drops it at once
(:func:`within` does so for any work on a connection, and a
:class:`DeadlineConnection` for each of its exchanges with the server).
``budget``, when set, bounds a whole :meth:`LookupConnection.fetch`, its
connects, attempts and pauses included: the replication session sets it to its
silence bound, as the reader waiting on a lookup cannot notice a silent
server meanwhile.

Invariant: queries sent through it are read-only or safe to repeat (a query
may run twice when the connection broke after the server ran it). Error
messages never contain the password.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, TypeVar

import psycopg

from .errors import ReplicationError, redact

__all__ = ["DeadlineConnection", "LookupConnection", "bounded", "within"]

log = logging.getLogger("walex")

T = TypeVar("T")


async def bounded(conn: psycopg.AsyncConnection, query: Any, params: Any, timeout: float) -> list[tuple[Any, ...]]:
    """The rows of ``query`` on ``conn``, or ``psycopg.OperationalError`` after ``timeout`` s.

    A server that does not answer in time is treated as gone: the connection
    is closed on the spot (no cancel request, which a silent network would
    hold up too), so the caller opens a new one.
    """
    async def fetch() -> list[tuple[Any, ...]]:
        async with conn.cursor() as cur:
            await cur.execute(query, params)
            return await cur.fetchall() if cur.description is not None else []

    return await within(conn, fetch(), timeout)


async def within(conn: psycopg.AsyncConnection, work: Awaitable[T], timeout: float,
                 setting: str | None = None) -> T:
    """``await work`` (which talks over ``conn``), or ``psycopg.OperationalError`` after
    ``timeout`` s, ``conn`` then closed on the spot (as :func:`bounded` does)."""
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        conn.pgconn.finish()  # the socket is closed: the query's wait ends with the task
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise psycopg.OperationalError(f"the server did not answer within {timeout:g}s"
                                       + (f" ({setting})" if setting else ""))
    return task.result()


class DeadlineConnection(psycopg.AsyncConnection):  # type: ignore[type-arg]
    """A connection on which every exchange with the server has a deadline.

    Each round trip (a query sent and its results read, a commit, a fetch)
    must complete within :attr:`deadline` seconds, else the connection is
    closed on the spot and ``psycopg.OperationalError`` raised, as by
    :func:`bounded`: a network gone silent without closing (which TCP
    keepalives do not notice when something on the way still answers them)
    costs one deadline, not a hang. ``None`` leaves the exchanges unbounded.
    Opening the connection is bounded by ``connect_timeout`` (in walex's
    connection strings).
    """

    deadline: float | None = None
    setting: str | None = None  # the setting that gives the deadline, named in the error

    async def wait(self, gen: Any, *args: Any, **kwargs: Any) -> Any:
        deadline = self.deadline
        if deadline is None or kwargs.get("timeout") is not None or len(args) > 1:
            return await super().wait(gen, *args, **kwargs)
        return await within(self, super().wait(gen, *args, **kwargs), deadline, self.setting)


class LookupConnection:
    """Runs queries on a connection to ``conninfo``, reopening it when it was lost."""

    def __init__(
        self, conninfo: str | None = None, secret: str | None = None, *,
        attempts: int = 4, backoff: float = 0.2, timeout: float = 30.0,
        purpose: str = "type lookups and heartbeats",
    ) -> None:
        self.conninfo = conninfo
        self.secret = secret
        self.attempts = attempts
        self.backoff = backoff
        self.timeout = timeout  # seconds a query may take before the connection counts as lost
        self.purpose = purpose  # what the connection is for, in its messages
        self.budget: float | None = None  # seconds a whole fetch may take, attempts included
        self.conn: psycopg.AsyncConnection | None = None

    def use(self, conn: psycopg.AsyncConnection | None, conninfo: str | None, secret: str | None) -> None:
        """Start from an open connection (or none) to ``conninfo``."""
        self.conn, self.conninfo, self.secret = conn, conninfo, secret

    @property
    def ready(self) -> bool:
        """Whether there is a connection, or what it takes to open one."""
        return self.conn is not None or self.conninfo is not None

    async def fetch(self, query: str, params: Any = None, *, timeout: float | None = None,
                    budget: float | None = None) -> list[tuple[Any, ...]]:
        """The rows of ``query``; reconnects and retries if the connection is lost.
        ``timeout`` and ``budget`` replace :attr:`timeout` and :attr:`budget` for this call."""
        if not self.ready:
            raise ReplicationError("no connection for type lookups: not connected", retriable=True)
        delay = self.backoff
        loop = asyncio.get_running_loop()
        budget = self.budget if budget is None else budget
        deadline = None if budget is None else loop.time() + budget
        per_query = self.timeout if timeout is None else timeout
        for attempt in range(1, self.attempts + 1):
            timeout = per_query
            if deadline is not None:
                timeout = min(timeout, deadline - loop.time())
            try:
                conn = self.conn
                if conn is None or conn.closed:
                    try:
                        async with asyncio.timeout(timeout):
                            conn = self.conn = await self._connect()
                    except TimeoutError:
                        raise psycopg.OperationalError(
                            f"connecting did not finish within {timeout:.3g}s") from None
                return await bounded(conn, query, params, max(timeout, 0.001))
            except psycopg.OperationalError as exc:
                await self.close()
                reason = redact(str(exc).strip(), self.secret)
                out = deadline is not None and loop.time() + delay >= deadline
                if attempt == self.attempts or out:
                    within_budget = f" within {budget:g}s" if out else ""
                    raise ReplicationError(
                        f"the connection for {self.purpose} was lost and could not "
                        f"be reopened ({attempt} attempts{within_budget}): {reason}",
                        retriable=True,
                    ) from None
                log.info("connection for %s lost (%s); reopening it", self.purpose, reason)
                await asyncio.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover

    async def connection(self) -> psycopg.AsyncConnection:
        """The open connection, opened now if there is none (for statements not to repeat)."""
        if self.conn is None or self.conn.closed:
            try:
                self.conn = await self._connect()
            except psycopg.OperationalError as exc:
                raise ReplicationError(
                    f"cannot open a normal connection: {redact(str(exc).strip(), self.secret)}",
                    retriable=True,
                ) from None
        return self.conn

    async def _connect(self) -> psycopg.AsyncConnection:
        if self.conninfo is None:
            raise psycopg.OperationalError("the connection was closed")
        return await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True)

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                await conn.close()
            except Exception:  # pragma: no cover - closing a broken connection
                pass
