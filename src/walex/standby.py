"""Active-passive standby: one instance handles, the others wait; never two at once.

With ``standby=True`` (and a durable slot) the instances of an app are
*fenced* by a session-level advisory lock named after the slot
(:class:`Fence`), held on a normal connection of its own by the instance that
streams, for as long as it may handle anything. An instance takes the lock
before it starts streaming; one that finds it held logs once that it is a
standby and tries again every :data:`POLL_INTERVAL` seconds. The lock only
changes hands once its holder has given up handling:

- an active instance whose walsender is lost (ended by
  ``pg_terminate_backend``, a network failure) checks that it still holds the
  lock, then keeps it and reconnects at once, taking its slot back, while it
  goes on handling the batches it received, so a standby cannot start
  meanwhile (the lock is released by ``stop()``, after every task stopped,
  or by the server when the process dies); if the lock is gone too (a server
  restart), then or at the reconnect's check of it, it abandons them;
- the active instance checks its lock every :data:`FENCE_CHECK` seconds; when
  that connection is lost (so the server may give the lock to a standby) it
  abandons at once what it had not acknowledged: the batch in hand is
  cancelled (a plain handler's thread finishes its current call and makes no
  other), the queue is dropped, and the session ends; those changes come again
  from the slot, with the same ids, to whichever instance takes the lock. It
  then takes the lock again, or waits as a standby, once its handlers' thread
  is idle. The session's slot is given up only once the abandoned calls ended
  (an async handler may finish what it does before it lets the cancellation
  through: :func:`calls_ended`), so no other instance streams meanwhile.
  Until then no keepalive moves its acknowledged position (the queue it
  dropped is not done: :meth:`~walex.ack.AckTracker.fence`). walex's
  connections carry TCP keepalives and ``tcp_user_timeout``, and the lock's
  connection asks the server to notice a silent client within about half a
  minute, much later than the holder notices itself.

When the lock is had, the slot is read and streamed from its
``confirmed_flush_lsn``; a slot still held by a walsender (the old holder's,
ending) is waited for (:func:`wait_for_slot`). Nothing is lost: the slot kept
every change the active instance did not acknowledge, and those are delivered
again (at-least-once, same event ids). The takeover is logged and counted
(``walex_takeovers_total``).

Every query of the wait has a timeout (:data:`QUERY_TIMEOUT`): a server that
does not answer (a silent network partition) counts as a lost connection. A
standby that loses its connection (a server restart, a partition) logs it and
reconnects with backoff, ``reconnect_max_attempts`` times in a row before it
fails, as an active instance does.

A stop while standing by is prompt and clean: ``stop()`` (SIGTERM and
SIGINT under ``run()``) ends the wait within moments, whether ``start()`` is
waiting (:func:`stop_waiting`: ``start()`` then raises
:class:`~walex.errors.StoppedError` after closing what it opened) or a
reconnecting session is (its task is cancelled); the wait logs that it
stopped while standing by, and the slot stays with the active instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
import weakref
from typing import TYPE_CHECKING

import psycopg

from .errors import ReplicationError, StoppedError, redact
from .handoff import run_dispatcher
from .lookups import bounded
from .lsn import format_lsn, parse_lsn

if TYPE_CHECKING:
    from .pipeline import Pipeline

__all__ = ["Fence", "abandon", "calls_ended", "fenced_dispatcher", "first_session", "hold", "release",
           "wait_for_slot", "stop_waiting", "took_over", "watch", "POLL_INTERVAL"]

log = logging.getLogger("walex")

POLL_INTERVAL = 0.5
FENCE_CHECK = 1.0  # seconds between two checks of the lock's connection by its holder
QUERY_TIMEOUT = 5.0  # seconds the server has to answer a query of the wait or the fence
# what the server is asked to do for the lock's connection: notice a silent client
# (keepalives: 10 s idle, then 3 probes 5 s apart; 30 s for unanswered data), so a
# partitioned holder's lock is freed, later than the holder notices itself (a few s)
_SERVER_LIVENESS = (("tcp_keepalives_idle", "10"), ("tcp_keepalives_interval", "5"),
                    ("tcp_keepalives_count", "3"), ("tcp_user_timeout", "30000"))


class Fence:
    """The advisory lock that says which instance of an app may handle its slot's changes."""

    def __init__(self, conninfo: str, secret: str | None, slot_name: str) -> None:
        self.conninfo = conninfo
        self.secret = secret
        digest = hashlib.sha256(f"walex standby {slot_name}".encode()).digest()
        self.key = int.from_bytes(digest[:8], "big", signed=True)
        self.conn: psycopg.AsyncConnection | None = None
        self.held = False

    async def _query(self, query: str, params: tuple[object, ...] = ()) -> object:
        try:
            if self.conn is None or self.conn.closed:
                self.held = False  # a new session holds nothing
                async with asyncio.timeout(QUERY_TIMEOUT + 10):  # connect_timeout is 10 s
                    self.conn = await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True)
                version = self.conn.info.server_version
                for name, value in _SERVER_LIVENESS + (
                        (("idle_session_timeout", "0"),) if version >= 140000 else ()):
                    await bounded(self.conn, "SELECT set_config(%s, %s, false)", (name, value),
                                  QUERY_TIMEOUT)
            rows = await bounded(self.conn, query, params, QUERY_TIMEOUT)
        except (psycopg.Error, OSError, TimeoutError) as exc:
            await self.drop()
            raise ReplicationError(f"the standby lock's connection failed: "
                                   f"{redact(str(exc).strip(), self.secret)}", retriable=True) from None
        return rows[0][0] if rows else None

    async def acquire(self) -> bool:
        """Take the lock if it is free (or already ours); whether it is held now."""
        if not self.held:
            self.held = bool(await self._query("SELECT pg_try_advisory_lock(%s)", (self.key,)))
        return self.held

    async def check(self) -> None:
        """The lock is held and its session answers; raises ReplicationError (holding nothing)
        if not."""
        if not self.held:
            raise ReplicationError("the standby lock is not held", retriable=True)
        await self._query("SELECT 1")

    async def release(self) -> None:
        """Give the lock up (closing its connection frees it)."""
        await self.drop()

    async def drop(self) -> None:
        conn, self.conn, self.held = self.conn, None, False
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 5)


async def hold(pipeline: Pipeline) -> None:
    """Return holding the pipeline's fence; waits as a standby while another instance holds it.

    Raises :class:`~walex.errors.StoppedError` when :func:`stop_waiting` is
    called meanwhile, a ReplicationError (not retriable) after
    ``reconnect_max_attempts`` failed attempts in a row to reach the server.
    Every query has a deadline (:data:`QUERY_TIMEOUT`); a failed attempt is
    logged with the next try's delay.
    """
    if pipeline.fence is None:
        pipeline.fence = Fence(pipeline.settings.app_conninfo(), pipeline.secret, pipeline.slot_name)
    fence = pipeline.fence
    if fence.held:
        try:
            await fence.check()
            _held_again(pipeline)
            return
        except ReplicationError as exc:
            # the batches received before a lost session are still being handled (the
            # reconnect took the slot back first): without the lock, nothing more is
            abandon(pipeline, str(exc))
            log.warning("walex %r: %s; taking the standby lock of slot %r again",
                        pipeline.settings.name, exc, pipeline.slot_name)
    await calls_ended(pipeline)  # a handler call abandoned with the lock ends first
    stop, ended = _waits[pipeline] = asyncio.Event(), asyncio.Event()
    settings, stats = pipeline.settings, pipeline.stats
    failures = 0
    try:
        while True:
            try:
                if await fence.acquire():
                    _held_again(pipeline)
                    return
                failures = 0
                if not stats.standby:
                    stats.standby = True
                    stats.standby_since = time.monotonic()
                    log.info("walex %r is a standby: replication slot %r is held by another "
                             "instance; taking over when it is free", settings.name,
                             pipeline.slot_name)
                pause = POLL_INTERVAL
            except ReplicationError as exc:
                failures += 1
                if failures > settings.reconnect_max_attempts:
                    raise ReplicationError(
                        f"walex {settings.name!r} gave up waiting for replication slot "
                        f"{pipeline.slot_name!r} after {failures - 1} failed attempts to reach "
                        f"{settings.display_target()}: {exc}", retriable=False) from None
                pause = _backoff(settings.reconnect_backoff_max, failures)
                pause *= random.uniform(0.5, 1.0)
                log.warning("walex %r%s: %s; reconnecting in %.1fs (attempt %d)", settings.name,
                            " (standby)" if stats.standby else "", exc, pause, failures)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)
            if stop.is_set():
                raise _stopped_error(pipeline)
    except (StoppedError, asyncio.CancelledError):
        _stopped(pipeline)
        raise
    finally:
        if _waits.get(pipeline) == (stop, ended):
            del _waits[pipeline]
        ended.set()


# the waits in progress: pipeline -> (set to stop it, set once it has ended)
_waits: weakref.WeakKeyDictionary[Pipeline, tuple[asyncio.Event, asyncio.Event]] = \
    weakref.WeakKeyDictionary()


async def wait_for_slot(pipeline: Pipeline) -> int:
    """Wait until the slot is free; the LSN to start from (its ``confirmed_flush_lsn``).

    Raises :class:`~walex.errors.StoppedError` when :func:`stop_waiting` is
    called meanwhile.
    """
    lookups, stats, name = pipeline.lookups, pipeline.stats, pipeline.slot_name
    if not stats.standby:
        stats.standby = True
        stats.standby_since = time.monotonic()
        log.info("walex %r is a standby: replication slot %r is held by another instance; "
                 "taking over when it is free", pipeline.settings.name, name)
    stop, ended = _waits[pipeline] = asyncio.Event(), asyncio.Event()
    try:
        while True:
            rows = await lookups.fetch(  # bounded as the fence's queries and connect are
                "SELECT active_pid, confirmed_flush_lsn::text FROM pg_replication_slots "
                "WHERE slot_name = %s", (name,), timeout=QUERY_TIMEOUT,
                budget=QUERY_TIMEOUT + 10)
            row = rows[0] if rows else None
            if row is None or row[0] is None:
                confirmed = parse_lsn(row[1]) if row and row[1] else 0
                ack = pipeline.ack
                if confirmed > ack.flushed:
                    ack.flushed = ack.received = confirmed
                return max(confirmed, ack.flushed)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), POLL_INTERVAL)
            if stop.is_set():
                raise _stopped_error(pipeline)
    except (psycopg.Error, ReplicationError) as exc:
        if stop.is_set():  # the connection went with the stop: not a failure
            _stopped(pipeline)
            raise _stopped_error(pipeline) from None
        if isinstance(exc, ReplicationError):
            raise
        raise ReplicationError(
            f"standby lost its connection while waiting for slot {name!r}: "
            f"{redact(str(exc), pipeline.secret)}", retriable=True) from None
    except (StoppedError, asyncio.CancelledError):
        _stopped(pipeline)
        raise
    finally:
        if _waits.get(pipeline) == (stop, ended):
            del _waits[pipeline]
        ended.set()


async def first_session(pipeline: Pipeline) -> None:
    """The first session of ``start()``; a standby retries what a reconnect cures.

    A standby that has never streamed waits and retries as an active instance
    reconnects: with backoff, ``reconnect_max_attempts`` times in a row (a
    server restart while it waits is no reason to exit).
    """
    settings, attempts = pipeline.settings, 0
    while True:
        try:
            await pipeline.open_session()
            return
        except ReplicationError as exc:
            attempts += 1
            if (pipeline.fence is None or not exc.retriable
                    or attempts > settings.reconnect_max_attempts):
                raise
            backoff = _backoff(settings.reconnect_backoff_max, attempts)
            backoff *= random.uniform(0.5, 1.0)
            log.warning("walex %r (standby): %s; retrying in %.1fs (attempt %d)",
                        settings.name, exc, backoff, attempts)
            await asyncio.sleep(backoff)


async def watch(pipeline: Pipeline) -> None:
    """Check the fence's connection every FENCE_CHECK s while it is held; abandon if lost."""
    fence = pipeline.fence
    assert fence is not None
    while True:
        await asyncio.sleep(FENCE_CHECK)
        if not fence.held or pipeline.abandoning:
            continue
        try:
            await fence.check()
        except ReplicationError as exc:
            abandon(pipeline, str(exc))


async def release(pipeline: Pipeline) -> None:
    """At stop, once nothing is handled any more: give the fence up, so a standby may go."""
    if pipeline.fence is not None:
        await pipeline.fence.release()


async def calls_ended(pipeline: Pipeline) -> None:
    """Return once the handler calls abandoned with the fence have ended: the cancelled
    dispatcher task (an async handler may finish what it does before it lets the
    cancellation through) and the call on the handlers' thread. Until then the session
    keeps its slot, so no other instance streams (:func:`walex.session.close_session`)."""
    task = pipeline.dispatching  # cancelled by abandon(); a running one is not waited for
    if pipeline.abandoning and task is not None and not task.done():
        log.info("walex %r: waiting for the handler call it abandoned to end before it gives "
                 "up replication slot %r", pipeline.settings.name, pipeline.slot_name)
        await asyncio.wait({task})
    await pipeline.dispatcher.workers.idle()


def abandon(pipeline: Pipeline, reason: str) -> None:
    """The fence was lost: stop handling at once; what is not acknowledged comes again.

    The batch in hand is cancelled (a plain handler's thread ends its current
    call and makes no other), the queue is dropped and the reader ends the
    session (once the handlers' thread is idle); the next session takes the
    fence again first.
    """
    if pipeline.abandoning:
        return
    pipeline.abandoning = True
    pipeline.ack.fence()  # dropped is not done: no keepalive may acknowledge past it
    log.error("walex %r lost its standby lock on slot %r (%s): stopping all handling at once; "
              "the changes not acknowledged (after %s) are delivered again to the instance "
              "that holds the slot next", pipeline.settings.name, pipeline.slot_name, reason,
              format_lsn(max(pipeline.ack.last_sent, 0)))
    if pipeline.dispatching is not None:
        pipeline.dispatching.cancel()
    pipeline.discard_unhandled()


async def fenced_dispatcher(pipeline: Pipeline) -> None:
    """:func:`walex.handoff.run_dispatcher` as a task of its own, which :func:`abandon`
    cancels; it starts again once the fence is held again."""
    loop = asyncio.get_running_loop()
    while True:
        inner = pipeline.dispatching = loop.create_task(
            run_dispatcher(pipeline), name=f"walex-{pipeline.settings.name}-dispatch")
        try:
            await inner
            return
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if (me is not None and me.cancelling()) or not pipeline.abandoning:
                inner.cancel()
                raise
        finally:
            pipeline.dispatching = None
        while pipeline.abandoning:  # until the next session holds the fence
            await asyncio.sleep(0.05)


def _backoff(most: float, failures: int) -> float:
    """The pause after ``failures`` failed attempts in a row, before jitter: doubling from
    0.2 s up to ``most`` (the exponent capped: 2**1024 as a float raises OverflowError)."""
    return min(most, 0.2 * 2 ** min(failures - 1, 64))


def _held_again(pipeline: Pipeline) -> None:
    """The fence is held (again): handle, and acknowledge from the next session's frames."""
    pipeline.abandoning = False
    pipeline.ack.unfence()


def _stopped_error(pipeline: Pipeline) -> StoppedError:
    return StoppedError(f"walex {pipeline.settings.name!r} was stopped while standing by for "
                        f"replication slot {pipeline.slot_name!r}; it never streamed")


def _stopped(pipeline: Pipeline) -> None:
    """The wait ends with the app: say so, and no longer count as a standby."""
    stats = pipeline.stats
    if not stats.standby:
        return
    stats.standby = False
    log.info("walex %r stopped while standing by for replication slot %r (after %.1fs); "
             "the instance holding it keeps it", pipeline.settings.name, pipeline.slot_name,
             time.monotonic() - stats.standby_since)


async def stop_waiting(pipeline: Pipeline) -> bool:
    """End the wait in progress, if any (it raises StoppedError); True once it has ended."""
    wait = _waits.get(pipeline)
    if wait is None:
        return False
    stop, ended = wait
    stop.set()
    await ended.wait()
    return True


def took_over(pipeline: Pipeline, start: int) -> None:
    """Streaming began after waiting as a standby: log and count the takeover."""
    stats = pipeline.stats
    if not stats.standby:
        return
    stats.standby = False
    stats.takeovers += 1
    waited = time.monotonic() - stats.standby_since
    log.warning("walex %r took over replication slot %r at %s after %.1fs as a standby",
                pipeline.settings.name, pipeline.slot_name, format_lsn(start), waited)
