"""Pipelining across transactions: a window of unconfirmed transactions per destination.

With ``destination_window`` (or ``window=`` in a destination URL) above 1, the
dispatcher does not wait for a transaction's confirmation before it takes the
next one. It takes every queued batch the window has room for at once
(:meth:`Window.take`): each is encoded once and queued on every destination's
:class:`Lane` (one wake-up per take), and the handlers are called meanwhile.
A lane publishes what is queued on it in order, as one group per publish (up
to its window of transactions and a bound of events and bytes: one round trip
for many one-row transactions), and marks the group's
transactions confirmed when the broker confirmed it durable; what is then
complete is recorded at once (:meth:`Window.settle`).

A batch is *recorded* (``record``: the acknowledgement tracker learns its end
LSN, its bytes leave ``max_pending_bytes``) once the handlers finished it and
every lane confirmed it **and** every batch submitted before it was recorded:
acknowledgement stays in commit order and never passes a transaction a
destination has not confirmed. Batches in a window stay counted in
``max_pending_bytes`` until recorded, so memory is bounded by it whatever the
window. The encoded messages of the batches not recorded are bounded too, by
``Destinations.held_bytes`` (a quarter of ``max_pending_bytes``, which the
events queued and waiting leave to them): a slow
broker holds the dispatcher, and so the handlers and the reader, back once
they reach it, whatever the window (one batch alone may exceed it).

Failures keep today's semantics, per group: a group the broker could not
confirm (:class:`~walex.destinations.base.Unavailable`) is published again,
the same group with the same ids, in order, with backoff, forever, and no
later batch goes out on that lane meanwhile (so a consumer never sees a gap
followed by later events). A permanent refusal of a group of several batches
publishes them again one batch at a time, so that the error policy
(``on_error``: ``"skip"``, a dead-letter callable) settles the refused
transaction only; under ``"stop"`` the refusal, like any error a lane cannot
settle, ends the dispatcher task that runs the lanes (:meth:`Window.running`),
so the app stops unacknowledged.

One connection per destination, one publish in flight per lane: the order
per key holds without any reordering logic. The one exception is a
destination that can hand a group over *ahead*
(:meth:`~walex.destinations.base.Destination.send_ahead`, :attr:`depth` above
1: JetStream's chains, each message naming the one before it, so a group is
stored only if every group before it was stored whole). Its lane is then a
small state machine (:meth:`Lane.run`):

* ONE AT A TIME: the front group is published and confirmed as above (retried,
  refusals settled), until the destination says groups may go ahead
  (``pipelined()``: for NATS, a chain was confirmed and nothing failed since).
* AHEAD (:meth:`Lane._ahead`): groups are handed over without waiting, up to
  ``depth`` in flight, and confirmed strictly in order as their outcomes come.
* DRAINING: once a group failed (a break, a refusal, a timeout, the connection
  lost), or the next one cannot go ahead, nothing more is handed over; every
  group in flight is waited for until its outcome is known (each has a timer).
  Those confirmed in order before the first failure are settled; the rest stay
  queued, and the lane goes back to ONE AT A TIME from the first of them (the
  same ids: JetStream drops what was stored already).

So a publish that is not chained (the only kind that could be stored after a
later one) only ever runs alone, with every group before it confirmed, and
nothing is handed over while it runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from itertools import islice
from typing import TYPE_CHECKING, Any

from .base import Destination, Unavailable
from .encoding import Outgoing, encode_event_reference, encode_sized, fast_path

if TYPE_CHECKING:
    from .fanout import Destinations

__all__ = ["Entry", "Lane", "Window"]

log = logging.getLogger("walex.destinations")


# in memory besides a message's body: its Outgoing tuple and the bytes object (121 bytes)
_PER_MESSAGE = 128


class Entry:
    """One submitted batch: its encoded events and how many parties have yet to finish it
    (the handlers, and each lane it was queued on)."""

    __slots__ = ("outgoing", "pending", "size", "txn")

    def __init__(self, txn: Any, outgoing: list[Outgoing], pending: int, size: int) -> None:
        self.txn = txn
        self.outgoing = outgoing
        self.pending = pending
        self.size = size  # the bodies' bytes and _PER_MESSAGE each


_NONE: list[Outgoing] = []  # the outgoing of a batch without events (never changed)
_UNSCANNED = (0, 0, 0)
_new_entry = object.__new__  # Window.take makes the common Entry without a Python frame


class Lane:
    """The batches queued for one destination, published in order, a group at a time."""

    def __init__(self, window: Window, destination: Destination, size: int) -> None:
        self.window = window
        self.destination = destination
        self.size = size  # most batches queued and unconfirmed
        self.queued: deque[Entry] = deque()  # unconfirmed, in order; the front ones may be in flight
        self._wake = asyncio.Event()
        self.groups = 0  # publishes made (each retry counted once)
        self.overlapped = 0  # groups handed over ahead while another was in flight
        self.fallbacks = 0  # failures of groups handed over ahead (then one at a time again)
        # (events, bytes, batches) of the batches after those in flight that _worth_ahead
        # already looked at, so that each look scans only what was queued since
        self._scanned = _UNSCANNED

    def __len__(self) -> int:
        return len(self.queued)

    def _group(self, skip: int = 0) -> tuple[int, list[Outgoing]]:
        """How many front batches (after the first ``skip``) to publish together, and their
        messages in order: at most the window's, and within the destination's bounds of
        events and bytes (one batch alone may exceed them)."""
        d = self.destination
        most_events, most_bytes, most = d.group_events, d.group_bytes, self.size
        batch: list[Outgoing] = []
        count = size = 0
        for entry in (islice(self.queued, skip, None) if skip else self.queued):
            outgoing = entry.outgoing
            if count and (len(batch) + len(outgoing) > most_events
                          or size + entry.size > most_bytes or count >= most):
                break
            batch += outgoing
            size += entry.size
            count += 1
        return count, batch

    def _worth_ahead(self, skip: int) -> bool:
        """Whether the batches queued after the first ``skip`` are worth a group of their own
        while another is in flight: a quarter of the destination's bound of events or
        bytes, or the window's count of batches. Fewer wait for the one in flight, so
        that they go in one larger group (a publish and a PubAck each cost a write and a
        read: one-row transactions handed over as they come made W2's groups many and
        small, client CPU 30 -> 34 us/row, the broker's 10 -> 12)."""
        d = self.destination
        most_events, most_bytes = d.group_events // 4, d.group_bytes // 4
        events, size, count = self._scanned  # of the first `count` batches after `skip`
        for entry in islice(self.queued, skip + count, None):
            events += len(entry.outgoing)
            size += entry.size
            count += 1
            if events >= most_events or size >= most_bytes or count >= self.size:
                self._scanned = _UNSCANNED  # what follows may change what comes after `skip`
                return True
        self._scanned = (events, size, count)  # still valid while `skip` names the same
        return False  # batches (entries confirmed before them leave `skip` with them)

    async def run(self) -> None:
        """Publish until cancelled; raises what no retry and no error policy settles."""
        window = self.window
        deliver, settle = window.destinations._deliver, window.settle
        destination, queued = self.destination, self.queued
        stats = window.destinations.stats
        ahead = destination.depth > 1 and (stats is None or stats.tracer is None)  # (a span
        # is around one publish)
        while True:
            while not queued:
                self._wake.clear()
                await self._wake.wait()
            if ahead and destination.pipelined():
                await self._ahead()  # back when nothing is in flight and the front group
                # goes one at a time (or nothing is queued)
                if not queued:
                    continue
            count, batch = self._group()  # the front `count` entries (only this lane takes
            self.groups += 1  # them off; the others are appended behind)
            if count == 1:
                entry = queued[0]
                await deliver(destination, entry.outgoing, entry.txn.events)
            elif not await deliver(destination, batch, None, settle=False):
                # refused for good: again one batch at a time, so the error policy
                # settles the refused transaction only (the others carry the same ids);
                # each confirmed one is done at once, so an error policy that stops
                # leaves unacknowledged only the refused transaction and those after it
                for _ in range(count):
                    entry = queued[0]
                    await deliver(destination, entry.outgoing, entry.txn.events)
                    queued.popleft().pending -= 1
                    settle()
                continue
            for _ in range(count):  # confirmed: this lane is done with them
                queued.popleft().pending -= 1
            settle()  # what is complete now is recorded, in order, at once

    async def _ahead(self) -> None:
        """AHEAD, then DRAINING (see the module's docstring): hand groups over while the
        destination allows (up to its ``depth`` in flight), confirm them in order; returns
        once nothing is in flight and the next group is not to go ahead, or after a
        failure, every group in flight having its outcome."""
        window = self.window
        destinations, settle = window.destinations, window.settle
        destination, queued, wake = self.destination, self.queued, self._wake
        depth, display = destination.depth, destination.display
        stats = destinations.stats
        flying: deque[tuple[int, Any, float]] = deque()  # (entries, flight, when handed over)
        taken = 0  # the front entries of `queued` in flight
        self._scanned = _UNSCANNED

        def woken(_answer: Any) -> None:
            wake.set()

        state = _AHEAD
        while True:
            wake.clear()
            while flying and flying[0][1].answer.done():  # outcomes, in order
                count, flight, started = flying.popleft()
                if state is _FAILED:  # its outcome is not looked at: it goes again
                    continue
                failure = destination.landed(flight)
                seconds = time.perf_counter() - started
                if failure is None:  # stored whole: this lane is done with its entries
                    taken -= count
                    for _ in range(count):
                        queued.popleft().pending -= 1
                    settle()
                    if stats is not None:
                        stats.record_publish(display, flight.size, seconds)
                    destinations.failing.pop(display, None)
                    continue
                state = _FAILED
                self.fallbacks += 1
                destinations.retries += 1
                destinations._failed(destination, failure)
                if stats is not None:
                    stats.record_publish(display, flight.size, seconds, ok=False)
                log.debug("destination %s: %s; the %d transactions in flight go again one "
                          "group at a time", display, failure, taken)
            if state is _AHEAD and len(flying) < depth and len(queued) > taken and (
                    not flying or self._worth_ahead(taken)):
                flight = None
                if destination.pipelined():
                    count, batch = self._group(taken)
                    try:
                        flight = await destination.send_ahead(batch)
                    except Unavailable as exc:  # handed over in part at most: a chain
                        destinations._failed(destination, exc)
                        state = _FAILED
                        continue
                if flight is None:  # not to go ahead: it goes one at a time, after
                    state = _DRAINING  # those in flight
                else:
                    flight.answer.add_done_callback(woken)
                    self.groups += 1
                    self.overlapped += bool(flying)
                    flying.append((count, flight, time.perf_counter()))
                    taken += count
                    self._scanned = _UNSCANNED  # those scanned began with this group
                continue
            if not flying and state is not _AHEAD:
                return
            await wake.wait()


# the states of a lane's groups handed over ahead (Lane._ahead); ONE AT A TIME is Lane.run
_AHEAD = "ahead"  # groups handed over while the destination allows, confirmed in order
_DRAINING = "draining"  # nothing more handed over; those in flight confirmed in order
_FAILED = "failed"  # a group failed: nothing more handed over, no outcome looked at


class Window:
    """The lanes of an app's destinations and the batches they have not all confirmed.

    ``record(txns)`` is called with batches, in submission order, once each is
    finished by the handlers and every lane and every earlier batch was recorded.
    """

    def __init__(self, destinations: Destinations, record: Callable[[Any], None]) -> None:
        self.destinations = destinations
        self.record = record
        self.lanes = [Lane(self, d, d.window or destinations.window) for d in destinations.items]
        for lane in self.lanes:
            if lane.size > 1 and hasattr(lane.destination, "grouped"):
                lane.destination.grouped = True  # a webhook: ids that name a request's range
        self.entries: deque[Entry] = deque()  # submitted, not recorded, in order
        self.held = 0  # bytes of the encoded messages of those entries
        self._room = asyncio.Event()
        self._waiting = False
        self.error: BaseException | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def __bool__(self) -> bool:
        return bool(self.entries)

    @property
    def first(self) -> Any:
        """The transaction batch of the oldest entry not recorded (None if none)."""
        return self.entries[0].txn if self.entries else None

    async def _wait_room(self) -> None:
        while self._full():
            self._waiting = True
            self._room.clear()
            await self._room.wait()
            if self.error is not None:
                raise self.error

    async def take(self, items: deque[Any]) -> list[Entry]:
        """Take the batches at the front of ``items`` that the window has room for (at least
        one, once there is room for one) and queue them on every lane at once: one wake-up
        of each lane, not one per batch. The caller hands each entry's batch to the
        handlers, in order, then counts the handlers done (:meth:`finished`); or gives back the entries it did not hand
        to the handlers (:meth:`give_back`)."""
        if self.error is not None:  # a lane ended (its cancel of the caller may have been
            raise self.error  # swallowed by a handler): nothing more is taken
        if self._full():
            await self._wait_room()
        lanes = self.lanes
        room = min([lane.size - len(lane.queued) for lane in lanes])  # >= 1: not full
        most = self.destinations.held_bytes
        partitions = self.destinations.partitions
        parties = 1 + len(lanes)
        fast, unfit = fast_path()  # encode_event, inlined
        new = _new_entry
        taken: list[Entry] = []
        empty = False  # a batch without events taken (the lanes have nothing of it)
        held = self.held
        try:
            while room > 0 and items and (held < most or not taken):
                txn = items[0]
                events = txn.events
                if len(events) == 1:  # a one-change transaction: the common case
                    try:
                        one = fast(events[0], partitions)
                    except unfit:
                        one = encode_event_reference(events[0], partitions)
                    entry = new(Entry)  # Entry(txn, [one], parties, size), without its frame
                    entry.txn, entry.outgoing, entry.pending = txn, [one], parties
                    held += (size := len(one.body) + _PER_MESSAGE)
                    entry.size = size
                    room -= 1
                elif events:
                    outgoing, size = encode_sized(events, partitions)
                    size += _PER_MESSAGE * len(outgoing)
                    entry = Entry(txn, outgoing, parties, size)
                    held += size
                    room -= 1
                else:  # nothing to publish: the handlers alone finish it
                    entry = Entry(txn, _NONE, 1, 0)
                    empty = True
                items.popleft()
                taken.append(entry)
        finally:  # what was taken is in the window, so on the lanes too
            self.held = held
            if taken:
                self.entries.extend(taken)
                sending = [e for e in taken if e.outgoing is not _NONE] if empty else taken
                if sending:
                    for lane in lanes:
                        lane.queued.extend(sending)
                        lane._wake.set()
        return taken

    def give_back(self, taken: list[Entry], items: deque[Any]) -> None:
        """Put the batches of ``taken`` (the last entries taken) back at the front of
        ``items``, out of the window: their handlers were not called (the app is
        stopping). The lanes may still publish them; they are not acknowledged."""
        entries = self.entries
        for entry in reversed(taken):
            done = entries.pop()
            assert done is entry
            self.held -= entry.size
            items.appendleft(entry.txn)
        if self._waiting and not self._full():
            self._waiting = False
            self._room.set()

    def finished(self, entry: Entry) -> None:
        """The handlers finished ``entry``: record what is complete, in order."""
        entry.pending -= 1
        if not entry.pending:
            self.settle()

    def finished_all(self, taken: list[Entry]) -> None:
        """The handlers finished every entry of ``taken`` (none had a call to make): record
        what is complete, in order, once."""
        for entry in taken:
            entry.pending -= 1
        self.settle()

    def settle(self) -> None:
        """Record the complete entries at the front, in order (``record`` once, with their
        batches), and let a submission waiting for room go on if there is room now."""
        entries = self.entries
        if entries and not entries[0].pending:
            done = []
            held, published = self.held, 0
            while entries and not entries[0].pending:
                entry = entries.popleft()
                held -= entry.size
                published += len(entry.outgoing)
                done.append(entry.txn)
            self.held = held
            self.destinations.events_published += published
            self.record(done)
        if self._waiting and not self._full():
            self._waiting = False
            self._room.set()

    def _full(self) -> bool:
        """No room for another batch: a lane's window is full, or the encoded messages held
        reached ``held_bytes`` (with at least one batch held, so that one always goes)."""
        for lane in self.lanes:
            if len(lane.queued) >= lane.size:
                return True
        return self.held_full()

    def held_full(self) -> bool:
        """No room for another batch until batches held are *recorded* (the encoded messages
        held reached ``held_bytes``): a lane's confirmations alone do not make it. A caller
        keeping batches unfinished (``max_batch`` handlers' deferred calls) must finish them
        before waiting for room."""
        return self.held >= self.destinations.held_bytes and bool(self.entries)

    async def drain(self) -> None:
        """Wait until every submitted batch was recorded (at a graceful stop)."""
        while self.entries:
            if self.error is not None:
                raise self.error
            self._waiting = True
            self._room.clear()
            await self._room.wait()

    @asynccontextmanager
    async def running(self, wake: Callable[[], None] | None = None) -> AsyncIterator[None]:
        """Run the lanes while the body (the dispatcher loop) runs. A lane ending with an
        error cancels the body's task, which then raises that error, not the
        cancellation; the lanes end with the body. Should the body go on all the same (a
        handler it awaited swallowed the cancellation), :meth:`take` and :meth:`drain`
        raise the error, and ``wake`` (called then) ends the body's wait for a batch,
        so that it looks at :attr:`error`."""
        owner = asyncio.current_task()
        assert owner is not None
        tasks = []

        def done(task: asyncio.Task[None]) -> None:
            if task.cancelled() or self.error is not None:
                return
            exc = task.exception()
            self.error = exc if exc is not None else RuntimeError(
                f"the publishing lane {task.get_name()} returned")
            owner.cancel()
            self._room.set()  # a wait for room or for the drain raises it
            if wake is not None:
                wake()

        for lane in self.lanes:
            task = asyncio.create_task(lane.run(), name=f"walex-lane-{lane.destination.display}")
            task.add_done_callback(done)
            tasks.append(task)
        try:
            yield
        except asyncio.CancelledError:
            if self.error is not None:
                owner.uncancel()
                raise self.error from None
            raise
        except BaseException as exc:
            if exc is self.error and owner.cancelling():  # raised by take/drain or the
                owner.uncancel()  # loop: the cancel that done() sent was swallowed
            raise
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
