"""The destinations of one app, published to together: :class:`Destinations`.

The contract of :mod:`walex.destinations` for a whole app: each transaction
batch is encoded once (:mod:`walex.destinations.encoding`) and published to
every destination; :meth:`Destinations.publish` returns only when each one
confirmed it durable, a broker that is down retried with backoff forever, a
permanent refusal settled by the app's ``on_error`` policy
(:attr:`Destinations.refused`). Kept apart from the package's scheme table so
that a process that only reads what a relay published (a worker) never
imports the encoders (nor psycopg, which they use).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from ..errors import DestinationError
from ..event import Event
from . import from_url
from .base import Destination, Outgoing, Unavailable, backoff
from .encoding import encode

__all__ = ["Destinations"]

log = logging.getLogger("walex.destinations")


async def _all(calls: Iterable[Awaitable[None]]) -> None:
    """Await every call; the first failure cancels the others and is raised."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    if len(tasks) == 1:
        await tasks[0]
        return
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


class Destinations:
    """The destinations of one app, published to together and retried until durable."""

    def __init__(self, urls: Iterable[str], partitions: int = 1, window: int = 1) -> None:
        self.partitions = partitions
        self.items: list[Destination] = [from_url(url, partitions) for url in urls]
        # unconfirmed transactions per destination (a URL's window= wins); above 1 the
        # dispatcher pipelines through walex.destinations.window
        self.window = window
        # most bytes of encoded messages a window holds unconfirmed (the app sets it from
        # max_pending_bytes); one batch alone may exceed it
        self.held_bytes = 16 * 1024 * 1024
        self.events_published = 0
        self.retries = 0  # publish attempts that failed and were retried
        self.refusals = 0  # batches a destination refused for good, settled by the policy
        self.stats: Any = None  # walex.observe.Stats: publish counts, seconds, spans
        # what a permanent refusal becomes: None raises it (the app stops); the app sets
        # its error policy here (Dispatcher.settle), which raises under "stop"
        self.refused: Callable[[str, Exception, list[Event]], Awaitable[None]] | None = None
        # display -> (since when, why) of each destination that failed its last attempt
        self.failing: dict[str, tuple[float, str]] = {}
        self.unhealthy_after = 30.0  # seconds of failed attempts before /healthz says so

    def __bool__(self) -> bool:
        return bool(self.items)

    @property
    def pipelined(self) -> bool:
        """Whether a destination's window holds more than one transaction."""
        return any((d.window or self.window) > 1 for d in self.items)

    def lanes(self, record: Callable[[Any], None]) -> Any:
        """The :class:`~walex.destinations.window.Window` of these destinations; ``record(txns)``
        is called with the batches every lane and the handlers finished, in order."""
        from .window import Window

        return Window(self, record)

    def __repr__(self) -> str:
        return f"<Destinations {[d.display for d in self.items]}>"

    async def open(self) -> None:
        """Connect each destination; one that is unreachable now is retried when used.

        Misconfiguration no retry cures (wrong credentials, a missing vhost) raises
        :class:`~walex.errors.ConfigError`, every destination closed.
        """
        try:
            await _all(self._open(d) for d in self.items)
        except BaseException:
            await self.close()
            raise

    async def _open(self, destination: Destination) -> None:
        try:
            await destination.open()
        except Unavailable as exc:
            log.warning("destination %s is unreachable: %s; walex keeps trying and "
                        "acknowledges nothing until it is back", destination.display, exc)
            await self._close(destination)

    @staticmethod
    async def _close(destination: Destination) -> None:
        """Close a broken connection; a broker that does not answer cannot hold it up."""
        try:
            await asyncio.wait_for(destination.close(), timeout=5)
        except (Exception, TimeoutError):
            log.debug("closing %s took too long or failed", destination.display)

    async def publish(self, events: list[Event]) -> None:
        """Publish one transaction batch to every destination; returns when all are durable
        (or a refusal was settled by :attr:`refused`)."""
        if not events or not self.items:
            return
        batch = encode(events, self.partitions)
        await _all(self._deliver(d, batch, events) for d in self.items)
        self.events_published += len(batch)

    async def _deliver(self, destination: Destination, batch: list[Outgoing],
                       events: list[Event] | None, settle: bool = True) -> bool:
        """Publish ``batch`` until confirmed (True); a permanent refusal is settled by
        :attr:`refused` (True), or with ``settle=False`` left to the caller (False). A
        :class:`~walex.errors.DestinationError` of ``open()`` is raised whatever the
        policy: it is the destination's, not the batch's."""
        attempt = 0
        limited = 0  # attempts in a row refused the way exc.attempts bounds (a full queue...)
        while True:
            stats = self.stats
            started = time.perf_counter()
            opening = False
            try:
                if not destination.opened:
                    opening = True
                    await destination.open()
                    opening = False
                tracer = stats.tracer if stats is not None else None
                if tracer is None:
                    await destination.publish(batch)
                else:
                    with tracer.publish(destination.scheme, destination.display, len(batch)):
                        await destination.publish(batch)
            except DestinationError as exc:
                self._failed(destination, exc)
                if opening or (settle and self.refused is None):
                    # opening it again failed for good (an exchange or stream made with
                    # other settings meanwhile): the destination's configuration, not a
                    # refusal of this batch, which on_error must not skip: the app stops
                    raise
                if stats is not None:
                    stats.record_publish(destination.display, len(batch),
                                         time.perf_counter() - started, ok=False)
                if not settle:
                    return False  # the lane publishes the group's transactions one at a time
                assert events is not None
                await self._refuse(destination, exc, events)  # raises under "stop"
                return True
            except Unavailable as exc:
                self._failed(destination, exc)
                if stats is not None:
                    stats.record_publish(destination.display, len(batch),
                                         time.perf_counter() - started, ok=False)
                # the bound counts refusals of that kind in a row, not the attempts of an
                # outage before them (one full queue after a long outage is no refusal yet)
                limited = limited + 1 if exc.attempts is not None else 0
                if exc.attempts is not None and limited >= exc.attempts:
                    refusal = DestinationError(
                        f"destination {destination.display}: {exc} (still refused after "
                        f"{limited} attempts in a row)")
                    if settle and self.refused is None:
                        raise refusal from None
                    if not settle:
                        return False  # the lane publishes the group's transactions one at a time
                    assert events is not None
                    await self._refuse(destination, refusal, events)  # raises under "stop"
                    return True
                delay = max(backoff(attempt), min(exc.retry_after or 0.0, 600.0))
                attempt += 1
                self.retries += 1
                log.warning(
                    "destination %s: %s; publishing the batch of %d events (from %s) again in "
                    "%.1fs (attempt %d); nothing is acknowledged to PostgreSQL meanwhile",
                    destination.display, exc, len(batch), batch[0].id, delay, attempt,
                )
                await self._close(destination)
                await asyncio.sleep(delay)
                continue
            if stats is not None:
                stats.record_publish(destination.display, len(batch), time.perf_counter() - started)
            self.failing.pop(destination.display, None)
            if attempt:
                log.warning("destination %s is back: the batch from %s is published after %d "
                            "retries", destination.display, batch[0].id, attempt)
            return True

    async def _refuse(self, destination: Destination, exc: DestinationError,
                      events: list[Event]) -> None:
        """Settle a refusal for good with the app's policy (which raises under "stop")."""
        assert self.refused is not None
        await self.refused(f"destination {destination.display} refused the batch", exc, events)
        self.refusals += 1
        self.failing.pop(destination.display, None)  # settled: the destination goes on

    def _failed(self, destination: Destination, exc: Exception) -> None:
        since, _why = self.failing.get(destination.display, (time.monotonic(), ""))
        self.failing[destination.display] = (since, str(exc))

    def trouble(self) -> str | None:
        """Why the app is unhealthy for its destinations: one has failed every attempt
        for longer than :attr:`unhealthy_after` seconds (None: all deliver)."""
        now = time.monotonic()
        for display, (since, why) in self.failing.items():
            if now - since >= self.unhealthy_after:
                return (f"destination {display} has not delivered for {now - since:.0f}s: {why}; "
                        "nothing is acknowledged to PostgreSQL meanwhile")
        return None

    async def alongside(self, txn: Any, dispatch: Callable[[Any], Awaitable[None]]) -> None:
        """``dispatch(txn)`` to the handlers while the batch is published; returns when both did."""
        if not txn.events:
            await dispatch(txn)
            return
        publishing = asyncio.ensure_future(self.publish(txn.events))
        try:
            await dispatch(txn)
        except BaseException:
            publishing.cancel()
            await asyncio.gather(publishing, return_exceptions=True)
            raise
        await publishing

    async def close(self) -> None:
        await asyncio.gather(*(self._close(d) for d in self.items))
