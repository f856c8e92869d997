"""What a NATS worker's lanes share: the messages of their pull subscription, and the wait for them.

:class:`BoxLane` holds a partition's pull subscription and its inbox, and the
messages the direct way (:mod:`walex.workers.natsdirect`) hands over
(:meth:`BoxLane.arrive` appends them to ``box`` and wakes the lane's waiter);
one timer per lane ends its waits. :class:`~walex.workers.nats.NatsLane`
(one message at a time) and :class:`~walex.workers.natsbatch.BatchLane`
(batches under a lease) build on it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

from .base import Lane
from .natsdirect import Inboxes, Raw

__all__ = ["BoxLane", "guard_pongs", "is_status"]


class BoxLane(Lane):
    """A NATS lane's subscription and the messages that arrived for it."""

    def __init__(self, partition: int, consumer: Any, psub: Any, ack_wait: float) -> None:
        super().__init__(partition)
        self.consumer = consumer
        self.psub = psub
        self.ack_wait = ack_wait
        self.every = max(ack_wait / 3, 0.05)
        self.margin = ack_wait / 4  # the lease ends this long before the server's deadline
        self.wait = 1.0  # the worker's poll: how long a request waits on the server
        self.looked = time.monotonic()  # when its consumer was last looked at (NatsConsumer.look)
        # the pull subscription's inbox (what fetch() asks the server to deliver to)
        self.inbox: str | None = getattr(psub, "_deliver", None)
        self.inbox_bytes = (self.inbox or "").encode()
        # the direct way (walex.workers.natsdirect): the messages the parser handed over
        self.direct: Inboxes | None = None
        self.box: deque[Raw] = deque()
        self.waiter: asyncio.Future[None] | None = None  # woken by arrive() or the alarm
        self.woken = False  # by arrive(), counted in the direct way's awake until _settle()
        self.deadline = 0.0  # when the wait in hand ends
        self._alarm: asyncio.TimerHandle | None = None  # ends waits; re-armed when it rings
        self._alarm_at = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None  # see _running

    def arrive(self, raw: Raw) -> None:
        """A message of this lane's subscription, from the parser (the direct way)."""
        self.box.append(raw)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
            if not self.woken and self.direct is not None:
                self.woken = True
                self.direct.awake += 1

    def _settle(self) -> None:
        """The lane woken by :meth:`arrive` answered (or waits again): no longer awake."""
        if self.woken:
            self.woken = False
            if self.direct is not None:
                self.direct.awake -= 1


    def _running(self) -> asyncio.AbstractEventLoop:
        """The lane's event loop, looked up once: on Python 3.11 ``get_running_loop`` asks
        the OS for the process id each call (a system call per message)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def _waiter(self, timeout: float) -> asyncio.Future[None]:
        """The future :meth:`arrive` or ``timeout`` seconds end (the caller awaits it, then
        sets ``waiter`` to None). One timer serves the lane's waits: it is re-armed when it
        rings before the wait in hand ends, not per wait."""
        if self.woken:
            self._settle()
        loop = self._loop or self._running()
        deadline = self.deadline = time.monotonic() + timeout
        if self._alarm is None or self._alarm_at > deadline + 0.001:
            if self._alarm is not None:
                self._alarm.cancel()
            self._alarm_at = deadline
            self._alarm = loop.call_later(timeout, self._ring)
        waiter = self.waiter = loop.create_future()
        return waiter

    def _ring(self) -> None:
        self._alarm = None
        waiter = self.waiter
        if waiter is None or waiter.done():
            return  # no wait in hand: the next one arms it again
        left = self.deadline - time.monotonic()
        if left <= 0.001:
            waiter.set_result(None)
        else:
            self._alarm_at = self.deadline
            self._alarm = self._running().call_later(left, self._ring)



def is_status(msg: Any) -> bool:
    """A JetStream status message (no messages, request expired, heartbeat), not a message."""
    return not msg.data and bool(msg.header) and "Status" in msg.header


def guard_pongs(nc: Any) -> None:
    """Keep ``nc``'s read loop alive past a PONG whose flush gave up.

    nats-py resolves the oldest waiting PONG future per PONG; a ``flush`` that
    timed out cancelled its future but left it in line, so when that PONG comes
    after all (a path that held the bytes back, then let them through),
    ``set_result`` raises InvalidStateError in the read loop, which ends it: the
    connection still says connected and never reads again (every request, lease
    round and fetch then times out). The future in line for the PONG is still
    the one taken, in order (a later flush is never confirmed by an earlier
    PONG); a cancelled one is only skipped. A client without these internals is
    left as it is."""
    original = getattr(nc, "_process_pong", None)
    if original is None or not isinstance(getattr(nc, "_pongs", None), list) or \
            getattr(original, "_walex_guarded", False):
        return

    async def process_pong() -> None:
        pongs = nc._pongs
        if pongs and pongs[0].done():  # its flush gave up: nothing to tell it
            pongs.pop(0)
            nc._pongs_received += 1
            nc._pings_outstanding = 0
            return
        await original()

    process_pong._walex_guarded = True  # type: ignore[attr-defined]
    nc._process_pong = process_pong
