"""Sessions: opening one walsender connection to streaming, closing it, and what a stop loses.

A *session* is one replication connection of a :class:`~walex.pipeline.Pipeline`,
from the checks to the end of its stream. This module holds what happens at its
ends; the pipeline holds the tasks that run while it streams and decides when to
open the next one (reconnects with backoff, :meth:`Pipeline.run_reader`).

Contract:
- :func:`open_session` takes the standby lock first when ``standby`` is set,
  connects, runs the checks (:func:`walex.checks.preflight`) in one round trip,
  creates or reuses the slot and starts streaming at the acknowledged position
  (never below what the slot confirmed); on any failure the session is closed
  again and the error raised: a :class:`~walex.errors.SetupError` on the first
  session, a retriable :class:`~walex.errors.ReplicationError` on later ones
  (what a reconnect can cure);
- a refused replication connection is diagnosed over a normal one, so the
  error names the setup problem (role, ``wal_level``, publication);
- a slot another walsender still holds is waited for, at least the server's
  ``wal_sender_timeout`` after a lost connection, or handed to
  :func:`walex.standby.wait_for_slot` with ``standby=True``; so is the last
  session's temporary slot, which its walsender drops when it ends (then a new
  one is made);
- a temporary slot made again after a lost connection, and a stop with changes
  unhandled, records the changes it lost in :attr:`Pipeline.gaps`
  (:func:`note_stop`, :func:`walex.slots.temporary_gap`);
- a durable slot found invalidated, or missing after a session streamed from it
  (dropped by hand; a start makes a missing one), is a
  :class:`~walex.errors.SlotLostError`, or with ``recreate_lost_slot`` made
  again and the gap recorded;
- the checks must be answered within :data:`~walex.checks.CHECK_TIMEOUT` and
  START_REPLICATION within :data:`START_TIMEOUT`, else the session counts as
  lost (a silent network); creating a slot has no deadline, as the server waits
  for the transactions running then to end;
- :func:`close_session` closes the replication and the lookup connections and
  never raises; after the standby lock was lost it first waits for the handler
  calls abandoned with it (:func:`walex.standby.calls_ended`), as the slot it
  holds keeps the other instances from streaming.

It reads and sets the pipeline's session state (``repl``, ``preflight``,
``sessions``, ``silence_limit``, ``ack``'s positions, ``gaps``) and imports
nothing of :mod:`walex.pipeline` at run time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import psycopg

from . import standby
from .checks import CHECK_TIMEOUT, preflight
from .errors import ReplicationError, SetupError, SlotInUseError, SlotLostError, redact
from .lookups import within
from .lsn import format_lsn, parse_lsn
from .replication.stream import ReplicationConnection
from .slots import slot_create_blocked, slot_in_use, temporary_gap

if TYPE_CHECKING:
    from .pipeline import Pipeline

__all__ = ["open_session", "close_session", "note_stop"]

log = logging.getLogger("walex")

START_TIMEOUT = 60.0  # seconds the server has to answer START_REPLICATION
LOOKUP_BUDGET_MIN = 5.0  # seconds a lookup of a session may take at least, attempts included


async def open_session(pipeline: Pipeline) -> None:
    """Connect, check, create or reuse the slot, and start streaming.

    One connection before streaming: the replication connection runs the
    checks (one round trip, :func:`~walex.checks.preflight`), the slot
    commands and START_REPLICATION. The normal connection (type lookups,
    heartbeats, the rare statements a walsender cannot run) is opened on
    first use by :attr:`lookups`.
    """
    s = pipeline.settings
    conninfo = s.app_conninfo()
    first = pipeline.sessions == 0
    pipeline.lookups.use(None, conninfo, pipeline.secret)
    try:
        if s.standby or pipeline.fence is not None:  # one instance at a time: the lock first
            await standby.hold(pipeline)
        try:
            pipeline.repl = await ReplicationConnection.connect(conninfo, pipeline.secret)
        except ReplicationError as exc:
            # a reconnect diagnoses only a server's refusal: an unreachable one would make a
            # second connection wait out its connect timeout too
            if first or exc.answered:
                await _diagnose(pipeline, conninfo, first)
            raise
        try:
            conn = pipeline.repl.conn
            pipeline.preflight = await within(conn, preflight(
                conn, s.publication, s.subscriptions,
                slot=pipeline.slot_name if s.durable_slot else None,
                store=pipeline.backfill.store.regclass(), walsender=True,
            ), CHECK_TIMEOUT)
        except psycopg.OperationalError as exc:
            if first:
                raise SetupError(f"checking {s.display_target()} failed: "
                                 f"{redact(str(exc), pipeline.secret)}") from None
            raise ReplicationError(f"checking the server failed: {redact(str(exc), pipeline.secret)}",
                                   retriable=True) from None
        pipeline.silence_limit = _silence_limit(pipeline, pipeline.preflight.wal_sender_timeout)
        # the reader waiting on a lookup reads nothing: a silent network must end the
        # lookup about as soon as it would end a read
        pipeline.lookups.budget = max(LOOKUP_BUDGET_MIN, pipeline.silence_limit)
        pipeline.backfill.store_known = pipeline.preflight.store_exists
        pipeline.catalog.forget()  # every table's Relation message comes again
        pipeline.relations.db = pipeline.preflight.database
        pipeline.assembler.reset()
        start = await _prepare_slot(pipeline, first)
        pipeline.after_stop = False
        await _start_replication(pipeline, start)
    except BaseException:
        await close_session(pipeline)
        raise
    pipeline.sessions += 1


async def _diagnose(pipeline: Pipeline, conninfo: str, first: bool) -> None:
    """The replication connection was refused: say why as precisely as a normal one can.

    Raises the error of a normal connection to the same server, or the
    setup problem its checks find (a role without REPLICATION, wal_level,
    the publication); returns when neither explains it.
    """
    s = pipeline.settings
    try:
        conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
    except psycopg.Error as exc:
        message = f"cannot connect to {s.display_target()}: {redact(str(exc), pipeline.secret)}"
        if first:
            raise SetupError(message) from None
        raise ReplicationError(message, retriable=True) from None
    try:
        await within(conn, preflight(conn, s.publication, s.subscriptions), CHECK_TIMEOUT)
    except psycopg.Error:
        pass  # the replication connection's own error says more
    finally:
        await conn.close()


def _silence_limit(pipeline: Pipeline, wal_sender_timeout: float) -> float:
    """How long the server may stay silent before the connection counts as dead.

    A walsender busy decoding a large transaction that publishes nothing
    sends no frame and answers no reply request until half its
    ``wal_sender_timeout`` passed, so silence shorter than that is no sign
    of a dead server.
    """
    timeout = wal_sender_timeout
    if timeout <= 0:
        timeout = 120.0  # the server never times out: allow a long silence
    pipeline.wal_sender_timeout = timeout
    return max(2 * pipeline.settings.status_interval, timeout + pipeline.settings.status_interval)


async def _prepare_slot(pipeline: Pipeline, first: bool) -> int:
    """The LSN to start from; creates the slot when needed."""
    s, repl = pipeline.settings, pipeline.repl
    assert repl is not None and pipeline.preflight is not None
    vanished = None  # the durable slot this app streamed from was dropped meanwhile
    if s.durable_slot:
        row = pipeline.preflight.slot  # read with the checks
        if row is not None and row[0] == "lost":
            await _slot_lost(pipeline, row[1])
            row = None
        elif row is None and not first and not pipeline.after_stop:
            vanished = _slot_vanished(pipeline)
        if row is not None:
            confirmed = parse_lsn(row[1]) if row[1] else 0
            if confirmed > pipeline.ack.flushed:
                pipeline.ack.flushed = pipeline.ack.received = confirmed
            return confirmed
    lost_from = None if first or pipeline.after_stop else pipeline.ack.flushed  # a stop reported its own
    if first and s.snapshot == "initial":  # the requests are stored before the slot exists
        await pipeline.backfill.initial(await pipeline.lookups.connection())
    # a temporary slot of this name is the last session's: its walsender has not ended yet
    # (busy decoding, it notices the lost client late) and drops the slot when it does:
    # waited for as a slot in use is (_start_replication), then made anew
    deadline = time.monotonic() + max(s.slot_wait_timeout, pipeline.wal_sender_timeout + 10)
    delay = 0.1
    while True:
        try:
            async with asyncio.timeout(s.slot_create_timeout):  # psycopg cancels it on the server
                slot = await repl.create_slot(pipeline.slot_name, temporary=not s.durable_slot,
                                              failover=s.failover)
        except TimeoutError:
            raise ReplicationError(await slot_create_blocked(
                pipeline.lookups, pipeline.slot_name, s.slot_create_timeout)) from None
        if slot.created or s.durable_slot:
            break
        if time.monotonic() >= deadline:
            raise ReplicationError(
                f"temporary replication slot {pipeline.slot_name!r} is still held by the "
                "previous session's walsender, which drops it when it ends", retriable=True)
        log.warning("temporary replication slot %r is still held by the previous session's "
                    "walsender; trying again in %.1fs", pipeline.slot_name, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)
    if slot.created:
        log.info("created %s replication slot %r at %s",
                 "durable" if s.durable_slot else "temporary",
                 pipeline.slot_name, format_lsn(slot.consistent_point))
    if not s.durable_slot and lost_from is not None:
        temporary_gap(pipeline, lost_from, slot.consistent_point)
    if vanished is not None:
        gap = (f"{vanished}; made again at {format_lsn(slot.consistent_point)} as "
               "recreate_lost_slot=True: the changes committed before that are never delivered")
        log.error(gap)
        pipeline.gaps.append(gap)
    start = slot.consistent_point
    if start > pipeline.ack.flushed:
        pipeline.ack.flushed = pipeline.ack.received = start
    return start


def _slot_vanished(pipeline: Pipeline) -> str:
    """The durable slot a session of this app streamed from no longer exists (dropped by
    hand, or by another program): raises SlotLostError, or with ``recreate_lost_slot``
    returns what is lost (the gap is recorded once the new slot's start is known)."""
    message = (
        f"durable replication slot {pipeline.slot_name!r} no longer exists: it was dropped "
        f"since walex streamed from it (or the server was replaced by one without it, a "
        f"failover before the slot was synchronised), so the changes committed after "
        f"{format_lsn(pipeline.ack.flushed)} (the position walex acknowledged last) are lost "
        "to walex"
    )
    if not pipeline.settings.recreate_lost_slot:
        raise SlotLostError(
            message + ". Fix: find what dropped it (no other program may drop or use a walex "
            "app's slot), then resynchronise what was missed; pass recreate_lost_slot=True to "
            "make the slot again at the server's current position instead (the gap is reported)."
        )
    return message


async def _slot_lost(pipeline: Pipeline, confirmed: str | None) -> None:
    message = (
        f"replication slot {pipeline.slot_name!r} was invalidated (wal_status = 'lost'): "
        f"PostgreSQL removed WAL it still needed, so changes committed after "
        f"{confirmed or 'its last confirmed position'} are lost to walex. "
        "Raise max_slot_wal_keep_size to prevent this"
    )
    if not pipeline.settings.recreate_lost_slot:
        raise SlotLostError(
            message + "; pass recreate_lost_slot=True to drop and recreate the slot "
            "(and resynchronise what was missed)."
        )
    log.error("%s; recreating it as recreate_lost_slot=True", message)
    pipeline.gaps.append(message)
    # bounded as every lookup (a silent network counts as a lost session), and idempotent:
    # a retry after an answer lost on the way finds the slot gone and drops nothing
    await pipeline.lookups.fetch(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
        "WHERE slot_name = %s", (pipeline.slot_name,), timeout=CHECK_TIMEOUT)


async def _start_replication(pipeline: Pipeline, start: int) -> None:
    s, repl = pipeline.settings, pipeline.repl
    assert repl is not None
    options = {
        "proto_version": "2" if s.streaming else "1",
        "publication_names": '"' + s.publication.replace('"', '""') + '"',
    }
    if s.streaming:
        options["streaming"] = "on"
    assert pipeline.preflight is not None
    options.update(pipeline.backfill.stream_options(pipeline.preflight.server_version))
    # After a network failure the old walsender holds the slot until its
    # wal_sender_timeout notices the dead connection: wait at least that long.
    wait = s.slot_wait_timeout if pipeline.sessions == 0 else max(
        s.slot_wait_timeout, pipeline.wal_sender_timeout + 10
    )
    deadline = time.monotonic() + wait
    delay = 0.1
    while True:
        try:
            async with asyncio.timeout(START_TIMEOUT):
                await repl.start(pipeline.slot_name, start, options)
            break
        except TimeoutError:
            raise ReplicationError(
                f"START_REPLICATION was not answered within {START_TIMEOUT:g}s",
                retriable=True) from None
        except SlotInUseError:
            if s.standby:
                start = await standby.wait_for_slot(pipeline)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SlotInUseError(await slot_in_use(pipeline.lookups, pipeline.slot_name, wait)) from None
            pause = min(delay, remaining)  # the last try comes at the deadline
            log.warning("replication slot %r is in use; retrying in %.1fs", pipeline.slot_name, pause)
            await asyncio.sleep(pause)
            delay = min(delay * 2, 5.0)
    standby.took_over(pipeline, start)
    log.debug("START_REPLICATION %s at %s", pipeline.slot_name, format_lsn(start))


def note_stop(pipeline: Pipeline, failure: BaseException | None) -> None:
    """At stop: a temporary slot goes with the connection; report what it takes along.

    Nothing is lost when the app stops with nothing in hand (only what is
    committed while it is stopped is never seen, as the next start makes a
    new temporary slot). Stopping after a failure, with changes received
    but not handled, or while reconnecting loses everything committed
    after the acknowledged position: that is a gap.
    """
    if pipeline.sessions == 0:
        return
    pipeline.after_stop = True  # a durable slot missing at the next start is made anew
    if pipeline.settings.durable_slot:
        return
    repl = pipeline.repl
    if failure is not None:
        why = "stopped after a failure"
    elif not pipeline.idle:
        why = "stopped with changes received but not handled"
    elif repl is None or not repl.streaming:
        why = "stopped while reconnecting"
    else:
        return
    gap = (
        f"walex app {pipeline.settings.name!r} {why}, and its temporary slot {pipeline.slot_name!r} "
        f"is dropped with the connection: the changes committed after "
        f"{format_lsn(pipeline.ack.flushed)} (those not handled included) are never delivered, "
        "not even by a restart, which makes a new slot at the server's current position. "
        + pipeline.gap_advice
    )
    log.error(gap)
    pipeline.gaps.append(gap)


async def close_session(pipeline: Pipeline) -> None:
    if pipeline.abandoning and not pipeline.closing and pipeline.repl is not None:
        # the standby lock was lost: the slot stays ours until the calls abandoned ended
        await standby.calls_ended(pipeline)
    if pipeline.repl is not None:
        try:
            await pipeline.repl.close()
        except Exception:  # pragma: no cover - closing a broken connection
            pass
    pipeline.repl = None
    await pipeline.lookups.close()
    pipeline.lookups.use(None, None, None)
