"""Active-passive standby: wait for a durable slot another instance holds, then take over.

With ``standby=True`` (and a durable slot), an instance that finds its slot
active for another process does not fail after ``slot_wait_timeout``: it
logs once that it is a standby, polls the slot every
:data:`POLL_INTERVAL` seconds, and when the slot is free (the active
instance stopped or died and its walsender ended) reads the slot's
``confirmed_flush_lsn`` and starts streaming from there. Nothing is lost:
the slot kept every change the active instance did not acknowledge, and
those are delivered again (at-least-once, same event ids). Whichever
instance holds the slot first is active; when two standbys race for a freed
slot, the loser goes on waiting. The takeover is logged and counted
(``walex_takeovers_total``).

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
import logging
import time
import weakref
from typing import TYPE_CHECKING

import psycopg

from .errors import ReplicationError, StoppedError, redact
from .lsn import format_lsn, parse_lsn

if TYPE_CHECKING:
    from .pipeline import Pipeline

__all__ = ["wait_for_slot", "stop_waiting", "took_over", "POLL_INTERVAL"]

log = logging.getLogger("walex")

POLL_INTERVAL = 0.5


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
            rows = await lookups.fetch(
                "SELECT active_pid, confirmed_flush_lsn::text FROM pg_replication_slots "
                "WHERE slot_name = %s", (name,))
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
