"""From the reader to the handlers: the queue of committed batches and the dispatcher loop.

The reader puts each committed batch on a :class:`BatchQueue`; the
dispatcher (:func:`run_dispatcher`) takes them in order, has the
:class:`~walex.dispatch.Dispatcher` hand them to the handlers, and records
each one handled with the :class:`~walex.ack.AckTracker`. The costs that do
not depend on a batch's size are paid per wake-up, not per transaction:

- the queue is a deque with two wake-ups: the dispatcher is woken only when
  it waits on an empty queue, and it then takes every batch queued before it
  waits again; the reader, waiting for room, is woken only once the queue fell
  to half its length limit and under the byte budget;
- consecutive transactions that each go to exactly one plain (non-async)
  handler are handed to the handlers' thread as one run of calls
  (:func:`walex.runs.hand_run`, :meth:`walex.threads.Workers.run_handlers`):
  one thread switch and one loop wake-up per run. The run stops at the first
  call that fails (the calls before it count as handled, the failing one goes
  through the error policy as any failed call, the later ones are called
  afterwards, or never if the policy stops the app) and before any further
  call once ``stop()`` set ``closing``.

With a ``max_batch`` handler (:mod:`walex.dispatch`), the batches taken while
more are queued are deferred: recorded handled once every call holding their
events returned. While it defers, a reader waiting for room is let in (the
deferred batches are in hand, no longer queued), so a call can hold up to
``max_batch`` single-event transactions however short the queue; nothing
waits otherwise: with nothing queued and the reader not held up, the call is
made at once.

With destinations whose window is above 1 (:mod:`walex.destinations.window`),
the dispatcher loops of :mod:`walex.windowed` take every queued batch the
window has room for at once and queue them on the destinations' lanes
together; the handlers get them as above: runs of plain calls (a failing
call, ``closing``: the same rules; the batches taken whose calls were not
made go back to the queue), and a ``max_batch`` handler the events of every
batch taken or queued in one call (deferring by the same rules; the kept
events are handed over before the loop waits for room that only recording
the deferred batches would make). The window records them handled, in order,
once every destination confirmed them too (a group at a time), so the
dispatcher does not wait for a confirmation. Taken batches are no longer
queued, so the reader may queue more meanwhile; they stay counted in
``max_pending_bytes`` until recorded.

Runs of plain calls and async calls awaited in the loop serve apps without a
``max_batch`` handler and without tracing: without destinations (metrics
alone count through the hooks ``Stats.reached``/``Stats.counted``), or with
a destination window and no metrics either; the others dispatch one batch at
a time through the observer's wrapper (and, with a window of 1, the
destinations).

Invariants (those of :mod:`walex.pipeline`): a batch is recorded handled only
after every handler (and destination) finished it, in queue order; the batches
queued or in hand hold at most ``max_pending_transactions`` entries (plus the
read batches of a backfill; plus, deferred for a ``max_batch`` handler, up to
the larger of that and ``max_batch``; plus, with a destination window, the
batches waiting for their confirmations) and about ``max_pending_bytes``; once
``closing`` is set no call starts but the one in hand (and, for a ``max_batch``
handler, the call holding the events of the batches in hand), and a window's
batches are given ``shutdown_grace`` to be confirmed.
"""

from __future__ import annotations

import asyncio
from collections import deque
from functools import partial
from typing import Any

from . import failpoints
from .dispatch import ASYNC, NOTHING, PLAIN, _stopping
from .logs import TRANSACTION
from .runs import RUN, hand_run, recover_call
from .transactions import Transaction
from .windowed import run_batching_windowed, run_windowed

__all__ = ["BatchQueue", "run_dispatcher"]

class BatchQueue:
    """Committed batches in commit order, bounded by count (``limit``) and bytes (``max_bytes``).

    ``bytes`` counts the batches queued *or in hand* (their
    :attr:`Transaction.size`): the dispatcher gives them back with
    :meth:`release` once handled.
    """

    def __init__(self, limit: int, max_bytes: int) -> None:
        self.items: deque[Transaction] = deque()
        self.limit = limit
        self.max_bytes = max_bytes
        self.bytes = 0
        self._ready = asyncio.Event()  # the dispatcher waits on it, the queue being empty
        self._room = asyncio.Event()  # the reader waits on it, the queue being full
        self._dispatcher_waits = False
        self._reader_waits = False
        self.interrupted = False

    def qsize(self) -> int:
        return len(self.items)

    def empty(self) -> bool:
        return not self.items

    def full(self) -> bool:
        return len(self.items) >= self.limit

    def put_nowait(self, txn: Transaction, counted: bool = True) -> None:
        self.items.append(txn)
        if counted:
            self.bytes += txn.size
        self.wake()

    def wake(self) -> None:
        """Wake the dispatcher if it waits for a batch (the reader appends to ``items``
        itself, then calls this once)."""
        if self._dispatcher_waits and self.items:
            self._dispatcher_waits = False
            self._ready.set()

    async def put(self, txn: Transaction, counted: bool = True) -> None:
        """Queue ``txn`` once there is room: fewer than ``limit`` queued and, when
        ``counted``, the bytes queued or in hand within ``max_bytes``.

        Checked before the batch is added, not after: a batch wider than the
        whole budget is queued once the others were handled, never held forever.
        """
        while len(self.items) >= self.limit or (counted and self.bytes > self.max_bytes):
            self.wake()  # what is queued goes first
            self._reader_waits = True
            self._room.clear()
            await self._room.wait()
        self.put_nowait(txn, counted)

    async def wait_ready(self) -> None:
        """Wait until something is queued, or :meth:`interrupt` was called."""
        while not self.items:
            self._dispatcher_waits = True
            self._ready.clear()
            await self._ready.wait()
            if self.interrupted:
                self.interrupted = False
                return

    def interrupt(self) -> None:
        """Make a waiting :meth:`wait_ready` return (``stop()`` set ``closing``)."""
        if self._dispatcher_waits:
            self.interrupted = True
            self._dispatcher_waits = False
            self._ready.set()

    def release(self, size: int) -> None:
        """A batch taken off the queue was handled: its bytes leave the budget."""
        self.bytes -= size
        if self._reader_waits:
            self.room_made()

    def room_made(self) -> None:
        """Wake the reader waiting for room once the queue fell to half its limit and
        within the byte budget (not at every batch handled)."""
        if self._reader_waits and len(self.items) <= self.limit // 2 and self.bytes <= self.max_bytes:
            self._reader_waits = False
            self._room.set()

    def clear(self) -> int:
        """Forget every batch (at stop); how many were queued."""
        count = len(self.items)
        self.items.clear()
        self.bytes = 0
        self._reader_waits = False
        self._room.set()
        return count


async def run_dispatcher(p: Any) -> None:
    """Dispatch the queued batches of pipeline ``p`` in order; returns when ``closing``,
    after the batch (or run of plain calls) in hand."""
    queue, dispatcher, ack = p.queue, p.dispatcher, p.ack
    dispatcher.refresh()  # handlers registered after the app was made count
    destinations = p.destinations
    if destinations and destinations.pipelined:  # a window of unconfirmed transactions
        window = p.window = destinations.lanes(partial(_recorded, p, queue, ack))
        async with window.running(queue.interrupt):
            if dispatcher.batching:
                await run_batching_windowed(p, window)
            else:
                await run_windowed(p, window)
            if window:  # closing: the batches published wait for their confirmations
                p.in_hand = window.first
                await window.drain()
                p.in_hand = None
        return
    if dispatcher.batching:  # a max_batch handler: the loop of its own below
        await _run_batching(p)
        return
    items = queue.items
    p.reached_ahead = 0
    dispatch = dispatcher.dispatch
    observer = p.observer
    if observer is not None:
        dispatch = observer(dispatch)  # metrics / tracing per batch
    slot, context = p.slot_name, TRANSACTION
    destinations = p.destinations if p.destinations else None
    # planned here (runs of plain calls, async calls awaited directly) only where a
    # batch is nothing but its handler calls; metrics without tracing count through
    # hooks (counting), so they keep the runs
    counting = p.counting
    direct = (observer is None or counting is not None) and destinations is None
    plan = dispatcher.plan

    def stopping() -> bool:  # read by the handlers' thread between the calls of a run
        return p.closing or p.abandoning  # stop(), or the standby lock lost (walex.standby)

    ahead: list[Any] = []  # plans of items[0], items[1], ... made by a run (filters run once)
    while not p.closing:
        if not items:
            await queue.wait_ready()
            continue
        txn = items[0]
        todo = ahead[0] if ahead else plan(txn) if direct else None
        if todo is not None and todo[0] == PLAIN:
            if not ahead:
                ahead.append(todo)
            await _plain_run(p, ahead, stopping)
            continue
        items.popleft()
        if ahead:
            del ahead[0]
        p.in_hand = txn
        token = context.set((slot, txn.commit_lsn, txn.xid))  # log lines carry them
        if counting is not None and todo is not None:
            if p.reached_ahead:  # reached when a plain run that stopped short took it
                p.reached_ahead -= 1
            else:
                counting.reached(txn)
        try:
            if todo is None:
                if destinations is None:
                    await dispatch(txn)
                else:  # published while the handlers run; both must finish
                    await destinations.alongside(txn, dispatch)
            elif todo[0] == ASYNC:  # one coroutine function: awaited right here
                try:
                    await todo[1](todo[2])
                except BaseException as exc:
                    if _stopping(exc):
                        raise
                    await dispatcher.recover(txn, todo, exc)  # raises HandlerError under "stop"
            elif todo[0] != NOTHING:
                await dispatcher.dispatch(txn, todo)
        finally:
            context.reset(token)
        if counting is not None and todo is not None:
            counting.counted(txn)
        if failpoints.ACTIVE:
            failpoints.hit("after_dispatch")
        p.events_handled += len(txn.events)
        if txn.last:
            if txn.end_lsn > ack.flushed:  # ack.handled(txn.end_lsn)
                ack.flushed = txn.end_lsn
            p.transactions_handled += 1
        queue.bytes -= txn.size  # queue.release(txn.size)
        if queue._reader_waits:
            queue.room_made()
        p.in_hand = None


async def _run_batching(p: Any) -> None:
    """:func:`run_dispatcher` when a handler has ``max_batch``: while more batches are
    queued, the ``max_batch`` handlers' events are kept (``dispatch(defer=True)``) and
    the batches deferred; those are recorded handled, in order, once
    :meth:`~walex.dispatch.Dispatcher.flush` returned. Chosen at start: with no
    ``max_batch`` handler then, one added by a runtime reconfiguration gets one call
    per transaction until the next start."""
    queue, dispatcher, ack = p.queue, p.dispatcher, p.ack
    items = queue.items
    deferred: list[Any] = []
    # most batches deferred at once: enough for a call of max_batch single-event
    # transactions, however short the queue (the byte budget bounds their memory)
    hold = max(queue.limit, dispatcher.max_batch)
    dispatcher.drop_pending()  # a new session: whatever was kept is delivered again
    dispatch: Any = partial(dispatcher.dispatch, defer=True)
    observer = p.observer
    if observer is not None:
        dispatch = observer(dispatch)  # metrics / tracing per batch
    slot, context = p.slot_name, TRANSACTION
    destinations = p.destinations if p.destinations else None
    # without observer and destinations: planned here, events kept without a dispatch
    direct = observer is None and destinations is None
    plan, kept, dispatch_one = dispatcher.plan, dispatcher.kept, dispatcher.dispatch
    while not p.closing:
        if not items:
            await queue.wait_ready()
            continue
        txn = items.popleft()
        p.in_hand = txn
        token = context.set((slot, txn.commit_lsn, txn.xid))  # log lines carry them
        try:
            if direct:
                todo = plan(txn)
                if not kept(todo):
                    await dispatch_one(txn, todo, True)
            elif destinations is None:
                await dispatch(txn)
            else:  # published while the handlers run; both must finish
                await destinations.alongside(txn, dispatch)
        finally:
            context.reset(token)
        deferred.append(txn)
        if dispatcher.pending:  # events kept for a later call
            if not items and queue._reader_waits and len(deferred) < hold and not p.closing:
                # the reader holds a batch and waits for room: the deferred batches are
                # in hand, not queued, so let it queue more (the byte budget still
                # counts them) before the call is made
                queue.room_made()
                if not queue._reader_waits:
                    await asyncio.sleep(0)
            if items and len(deferred) < hold and not p.closing:
                continue  # more queued: the kept events may share a call with theirs
            token = context.set((slot, txn.commit_lsn, txn.xid))
            try:
                await dispatcher.flush()  # raises HandlerError under "stop": none acknowledged
            finally:
                context.reset(token)
        for done in deferred:  # every call holding their events returned (no await in
            _handled(p, queue, ack, done)  # between: the reader runs once they all are)
        deferred.clear()
        p.in_hand = None


async def _plain_run(p: Any, ahead: list[Any], stopping: Any) -> None:
    """Hand the queued transactions that each go to one plain handler (or to none) to the
    handlers' thread at once (:func:`walex.runs.hand_run`); record the handled ones; the failing one
    goes through the error policy. ``ahead`` holds the plans of the first queued items (at
    least one)."""
    queue, dispatcher, ack = p.queue, p.dispatcher, p.ack
    items = queue.items
    plan = dispatcher.plan
    limit = min(len(items), RUN)
    count = 0
    while count < limit:  # the queued transactions up to the first that is not a plain call
        if count == len(ahead):
            ahead.append(plan(items[count]))
        kind = ahead[count][0]
        if kind != PLAIN and kind != NOTHING:
            break
        count += 1
    counting = p.counting
    if counting is not None:  # latencies at the hand-off, once per batch: a run cut short by
        # a failure leaves the rest at the front of the queue, reached already
        for i in range(p.reached_ahead, count):
            counting.reached(items[i])
        p.reached_ahead = max(p.reached_ahead, count)
    done, failure = await hand_run(p, items, ahead[:count], stopping)
    for _ in range(done):  # handled: recorded in order (written out twice, not a closure:
        txn = items.popleft()  # a call per transaction costs ~1% on one-row transactions)
        del ahead[0]
        if counting is not None:
            p.reached_ahead -= 1
            counting.counted(txn)
        _handled(p, queue, ack, txn)
    if failure is not None:  # the call `done` failed: the error policy decides
        txn = items[0]
        await recover_call(p, txn, ahead[0], failure)  # raises HandlerError under "stop"
        items.popleft()
        del ahead[0]
        if counting is not None:
            p.reached_ahead -= 1
            counting.counted(txn)
        _handled(p, queue, ack, txn)
    p.in_hand = None


def _handled(p: Any, queue: BatchQueue, ack: Any, txn: Transaction, release: bool = True) -> None:
    """Record a batch handled (by every call of a run before it, and its own)."""
    if failpoints.ACTIVE:
        failpoints.hit("after_dispatch")
    p.events_handled += len(txn.events)
    if txn.last:
        ack.handled(txn.end_lsn)
        p.transactions_handled += 1
    if release:
        queue.release(txn.size)


def _recorded(p: Any, queue: BatchQueue, ack: Any, txns: list[Transaction]) -> None:
    """Record batches handled, in order (a window's, once every destination confirmed them):
    the acknowledgement position, the counters and the byte budget once for them all.

    A confirmation that comes after the window was discarded (``p.window`` None: a standby
    that lost its lock dropped everything before its lanes were cancelled) takes no bytes
    off: ``queue.clear()`` took them all already, and the budget would stay loosened."""
    release = p.window is not None
    if failpoints.ACTIVE:  # the failpoint sees each batch recorded, one at a time
        for txn in txns:
            _handled(p, queue, ack, txn, release)
        return
    events = transactions = size = 0
    end = 0
    for txn in txns:
        events += len(txn.events)
        size += txn.size
        if txn.last:
            end = txn.end_lsn
            transactions += 1
    p.events_handled += events
    p.transactions_handled += transactions
    if end:
        ack.handled(end)
    if release:
        queue.release(size)
