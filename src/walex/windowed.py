"""The dispatcher loops with a destination window (:mod:`walex.destinations.window`).

:func:`walex.handoff.run_dispatcher` runs one of these when a destination's
window is above 1. Each takes every queued batch the window has room for at
once (:meth:`Window.take`: published together from then on), then hands them
to the handlers in order:

- :func:`run_windowed`: with no handler at all (a relay alone), the batches
  taken are done for the handlers at once (:meth:`Window.finished_all`);
  otherwise consecutive batches that no handler wants (a plan of nothing to
  call: :meth:`~walex.dispatch.Dispatcher.plan` knows a table no handler takes
  without asking the handlers again) are done together the same way, without
  the log context; consecutive batches that each go to exactly one plain
  handler (or to none) as one run of calls (:func:`walex.runs.hand_run`), the
  others one after the other (async calls awaited in the loop, or through the
  observer's wrapper);
- :func:`run_batching_windowed` (a ``max_batch`` handler): the handlers'
  events are kept across the batches taken and not handed over yet, or
  queued, as without a window, and handed over
  (:meth:`~walex.dispatch.Dispatcher.flush`) before waiting for room that only
  the deferred batches' recording would make.

Contracts (those of :mod:`walex.handoff`): the handlers count a batch done
(``entry.pending``) once every call holding its events returned, or the error
policy settled the failing one; the window records it handled once every
destination confirmed it too and every earlier batch was recorded. A failing
call under ``"stop"`` raises :class:`~walex.errors.HandlerError` with that
batch (and those deferred with it) not counted done, so never recorded. Once
``closing`` is set no call starts but the one in hand; the batches taken whose
handlers were not called go back to the queue, unacknowledged
(:meth:`Window.give_back`).
"""

from __future__ import annotations

import asyncio
from functools import partial
from itertools import islice
from operator import attrgetter
from typing import Any

from .dispatch import ASYNC, NOTHING, PLAIN, _stopping
from .logs import TRANSACTION
from .runs import RUN, hand_run, recover_call

__all__ = ["run_batching_windowed", "run_windowed"]

_txn = attrgetter("txn")  # a window entry's batch


async def run_windowed(p: Any, window: Any) -> None:
    """:func:`walex.handoff.run_dispatcher` with a window: the batches queued are taken at
    once, as many as the window has room for, queued on the destinations' lanes together
    (:meth:`Window.take`) and handed to the handlers in order: consecutive ones that each
    go to one plain handler (or to none) as one run (:func:`walex.runs.hand_run`), the
    others one after the other. The window records each batch once the handlers and
    every destination finished it and every earlier batch was recorded, so the next
    batch does not wait for a confirmation. Once ``closing`` is set, the batches taken
    whose handlers were not called yet go back to the queue, unacknowledged."""
    queue, dispatcher = p.queue, p.dispatcher
    items = queue.items
    observer = p.observer
    # planned here (runs of plain calls, async calls awaited directly) unless an observer
    # wraps each dispatch
    dispatch = None if observer is None else observer(dispatcher.dispatch)
    plan, recover, unwanted = dispatcher.plan, dispatcher.recover, dispatcher.unwanted
    slot, context = p.slot_name, TRANSACTION
    take, finished, finished_all = window.take, window.finished, window.finished_all
    has_handlers = dispatcher.has_handlers

    def stopping() -> bool:  # read by the handlers' thread between the calls of a run
        return p.closing or p.abandoning

    while not p.closing:
        if not items:
            if window.error is not None:  # a lane ended, its cancel swallowed by a handler
                raise window.error  # (it wakes this wait: Window.running's wake)
            await queue.wait_ready()
            continue
        p.in_hand = window.first  # take may wait for room (a destination down): stop()
        taken = await take(items)  # names the oldest unrecorded batch if it cuts that off
        p.in_hand = None  # published from now on, while the handlers run
        if queue._reader_waits:  # taken, no longer queued (their bytes still count until
            queue.room_made()  # recorded): the reader may queue more meanwhile
        if dispatch is None and not has_handlers():  # a relay alone: no call to make, so
            if p.closing:  # the handlers are done with every batch taken at once, as
                window.give_back(taken, items)  # with a plan of nothing to call (no plan,
            else:  # no context, no call per batch); at a stop they go back, as below
                finished_all(taken)
            continue
        count = len(taken)
        plans: list[Any] = [None] * count  # of taken[0], ... once made (filters run once)
        index = 0
        while index < count:
            if p.closing:  # stop(): no call starts but the one in hand
                window.give_back(taken[index:], items)
                break
            entry = taken[index]
            txn = entry.txn
            if dispatch is None:
                todo = plans[index]
                if todo is None:
                    todo = plan(txn)
                kind = todo[0]
                if kind == NOTHING:  # no call: this one and the next ones that no
                    end = index + 1  # handler wants (no filter to run, no call, no await)
                    if end < count:  # are done for the handlers together, without a
                        end += unwanted(map(_txn, islice(taken, end, None)))  # plan each,
                    if end == index + 1:  # the log context or a settle each
                        finished(entry)
                    else:
                        finished_all(taken if end - index == count else taken[index:end])
                    index = end
                    continue
                if kind == PLAIN:  # a run of plain calls: one hand-off to their thread
                    plans[index] = todo
                    end, most = index + 1, min(count, index + RUN)
                    while end < most:
                        ahead = plans[end]
                        if ahead is None:
                            ahead = plans[end] = plan(taken[end].txn)
                        ahead_kind = ahead[0]
                        if ahead_kind != PLAIN and ahead_kind != NOTHING:
                            break
                        end += 1
                    txns = [e.txn for e in taken[index:end]]
                    done, failure = await hand_run(p, txns, plans[index:end], stopping)
                    for i in range(index, index + done):  # the handlers finished them
                        finished(taken[i])  # recorded, in order, once every lane had too
                    index += done
                    if failure is not None:  # call `done` failed: the error policy decides
                        await recover_call(p, txns[done], plans[index], failure)  # "stop": raises
                        finished(taken[index])
                        index += 1
                    p.in_hand = None
                    continue  # stopped short: closing (the rest given back), or the fence lost
            p.in_hand = txn
            token = context.set((slot, txn.commit_lsn, txn.xid))  # log lines carry them
            try:
                if dispatch is not None:
                    await dispatch(txn)  # raises HandlerError under "stop": unrecorded
                else:  # kind: that of todo, planned above
                    if kind == ASYNC:  # one coroutine function: awaited right here
                        try:
                            await todo[1](todo[2])
                        except BaseException as exc:
                            if _stopping(exc):
                                raise
                            await recover(txn, todo, exc)  # raises HandlerError under "stop"
                    else:
                        await dispatcher.dispatch(txn, todo)
            finally:
                context.reset(token)
            finished(entry)  # recorded with those before it once every lane had too
            index += 1
        p.in_hand = None


async def run_batching_windowed(p: Any, window: Any) -> None:
    """:func:`walex.handoff._run_batching` with a window: the queued batches are taken as
    :func:`run_windowed` takes them (published together from then on), and the
    ``max_batch`` handlers' events are kept while more batches are taken and not handed to
    the handlers yet, or queued (the same rules as without a window: at most ``hold``
    batches deferred, the waiting reader let in). The kept events are handed over
    (:meth:`~walex.dispatch.Dispatcher.flush`) before the loop waits for the window's
    room held by the encoded messages of unrecorded batches (``held_bytes``): the
    deferred batches are among them and are recorded only once their calls returned.
    The window records the deferred batches once those calls returned and every
    destination confirmed them."""
    queue, dispatcher = p.queue, p.dispatcher
    items = queue.items
    deferred: list[Any] = []  # the window's entries of the deferred batches
    hold = max(queue.limit, dispatcher.max_batch)  # as without a window
    dispatcher.drop_pending()  # a new session: whatever was kept is delivered again
    dispatch: Any = partial(dispatcher.dispatch, defer=True)
    observer = p.observer
    direct = observer is None  # planned here, events kept without a dispatch
    if observer is not None:
        dispatch = observer(dispatch)  # metrics / tracing per batch
    slot, context = p.slot_name, TRANSACTION
    plan, kept, dispatch_one = dispatcher.plan, dispatcher.kept, dispatcher.dispatch
    take, finished = window.take, window.finished
    let_in = False  # the reader was woken to queue more and has not run since
    while not p.closing:
        if not items:
            if window.error is not None:  # a lane ended, its cancel swallowed by a handler
                raise window.error  # (it wakes this wait: Window.running's wake)
            await queue.wait_ready()
            continue
        if deferred and window.held_full():  # take would wait for room that only the
            await _flush(p, deferred, finished)  # deferred batches' calls can make
            continue
        p.in_hand = window.first  # take may wait for room (a destination down): stop()
        taken = await take(items)  # names the oldest unrecorded batch if it cuts that off
        p.in_hand = None  # published from now on, while the handlers run
        if queue._reader_waits:  # taken, no longer queued: the reader may queue more
            queue.room_made()
            let_in = not queue._reader_waits  # woken, it runs at the loop's next turn
        count = len(taken)
        for index in range(count):
            if p.closing:  # stop(): no call starts but the one in hand (nothing deferred:
                window.give_back(taken[index:], items)  # a batch deferred is flushed once
                break  # closing is set, before the next one)
            entry = taken[index]
            txn = entry.txn
            p.in_hand = txn
            token = context.set((slot, txn.commit_lsn, txn.xid))  # log lines carry them
            try:
                if direct:
                    todo = plan(txn)
                    if not kept(todo):
                        await dispatch_one(txn, todo, True)
                else:
                    await dispatch(txn)
            finally:
                context.reset(token)
            deferred.append(entry)
            if dispatcher.pending:  # events kept for a later call
                if len(deferred) < hold and not p.closing:
                    if index + 1 < count:
                        continue  # taken, in hand: their events may share the call
                    if not items:  # let the reader in, as without a window
                        if queue._reader_waits:
                            queue.room_made()
                            let_in = let_in or not queue._reader_waits
                        if let_in:  # woken since the loop last yielded: it queues first
                            let_in = False
                            await asyncio.sleep(0)
                    if items and not p.closing:
                        continue  # more queued: taken next (flushed first if no room)
                await _flush(p, deferred, finished)
                continue
            for done in deferred:  # nothing kept: every call holding their events returned
                finished(done)
            deferred.clear()
        p.in_hand = None
    if deferred:  # closing came while take waited for room: the batches deferred are in
        await _flush(p, deferred, finished)  # hand, so the call holding their events is
        p.in_hand = None  # made, as without a window


async def _flush(p: Any, deferred: list[Any], finished: Any) -> None:
    """Hand the kept events to their ``max_batch`` handlers, then count the handlers done
    with the ``deferred`` entries (the window records them once confirmed); raises
    HandlerError under "stop", none of them counted."""
    txn = deferred[-1].txn
    p.in_hand = txn
    token = TRANSACTION.set((p.slot_name, txn.commit_lsn, txn.xid))
    try:
        await p.dispatcher.flush()
    finally:
        TRANSACTION.reset(token)
    for done in deferred:
        finished(done)
    deferred.clear()
