"""The acknowledgement rule: what walex tells PostgreSQL it may forget.

``flushed`` is the end LSN of the last transaction every handler finished
(or, when nothing at all is in flight, the WAL end of the latest keepalive,
so an idle or filtered slot does not hold WAL; a keepalive that came while
something was in flight, with no change after it, counts once that is done:
``after_flight``). It only ever grows, and while :attr:`AckTracker.fenced` (the
standby lock was lost, :func:`walex.standby.abandon`: what was received is
dropped unhandled) only a handled transaction moves it, never a keepalive.
Status
updates carry it as ``flush`` (the only field that moves the slot's
``confirmed_flush_lsn``); they are sent on a timer well inside
``wal_sender_timeout``, at once when the server asks, and at shutdown, from
their own task, so a slow handler cannot delay them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

from .lsn import format_lsn

__all__ = ["AckTracker"]

log = logging.getLogger("walex.ack")


class _StatusSink(Protocol):
    async def send_status(self, write: int, flush: int, apply: int, reply: bool = False) -> None: ...


class AckTracker:
    """Holds the flush position and sends it to the server."""

    def __init__(self, start_lsn: int = 0, interval: float = 10.0) -> None:
        self.flushed = start_lsn
        self.received = start_lsn
        self.interval = interval
        self.last_sent = -1
        # the WAL end of a keepalive received while changes were in flight and followed by
        # no change (0: none): everything below it is done once they are (see settled)
        self.after_flight = 0
        self.quiet: Callable[[], bool] | None = None  # whether nothing is in flight now
        # the standby lock was lost: what was in flight is dropped, not done, so "nothing in
        # flight" says nothing about the WAL before a keepalive (fence() / unfence())
        self.fenced = False
        self._wake = asyncio.Event()

    def handled(self, end_lsn: int) -> None:
        """A transaction ending at ``end_lsn`` was finished by every handler."""
        if end_lsn > self.flushed:
            self.flushed = end_lsn

    def idle_at(self, wal_end: int) -> None:
        """Nothing is in flight and the server has sent everything up to ``wal_end``."""
        if wal_end > self.flushed and not self.fenced:
            self.flushed = wal_end

    def fence(self) -> None:
        """The changes in flight are dropped unhandled (the standby lock was lost): no
        keepalive moves ``flushed`` until :meth:`unfence`."""
        self.fenced = True
        self.after_flight = 0

    def unfence(self) -> None:
        """The lock is held again and a new session starts: keepalives count again (none
        of the abandoned session's)."""
        self.fenced = False
        self.after_flight = 0

    def settled(self) -> int:
        """``flushed``, moved to ``after_flight`` once nothing is in flight any more."""
        if self.after_flight and not self.fenced and self.quiet is not None and self.quiet():
            self.idle_at(self.after_flight)
            self.after_flight = 0
        return self.flushed

    def saw(self, wal_end: int) -> None:
        if wal_end > self.received:
            self.received = wal_end

    def request(self) -> None:
        """Send a status update now (the server asked, or a transaction finished)."""
        self._wake.set()

    async def send(self, sink: _StatusSink, reply: bool = False) -> None:
        flushed = self.settled()
        await sink.send_status(max(self.received, flushed), flushed, flushed, reply)
        if flushed != self.last_sent:
            log.debug("acknowledged flush=%s", format_lsn(flushed))
        self.last_sent = flushed

    async def run(self, sink: _StatusSink) -> None:
        """Send status updates every ``interval`` seconds and whenever requested."""
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except TimeoutError:
                pass
            self._wake.clear()
            await self.send(sink)
