"""Hand each committed transaction to the handlers and per-event functions.

For one transaction, every handler whose selection is not empty is called
once with its events, and each of its per-event functions once per selected
event; all of these run concurrently (functions bounded by a semaphore) and
:meth:`Dispatcher.dispatch` returns only when every one has finished.
Transactions are dispatched one after the other, so a handler sees a table's
changes in commit order.

Coroutine functions run on the event loop; plain ones on the app's threads
(:mod:`walex.threads`): handlers one at a time on one dedicated thread,
per-event functions on a pool of ``function_concurrency`` threads.

A failing call is retried ``max_retries`` times with exponential backoff
(``retry_backoff`` seconds doubled at each retry up to 60 s, or
``retry_backoff`` itself when larger; only that call: the others already
succeeded). Whatever a call raises is a
failure, ``asyncio.CancelledError`` and any other ``BaseException`` included;
only the cancellation of walex's own task (by ``stop()``) goes through. Then
the error policy decides: ``"stop"`` (the default) raises, ``"skip"`` logs
and counts it, a dead-letter callable receives ``(events, exception)`` and,
if it returns, the events count as handled. Every failure is logged with
the ids of the events concerned. A ``where`` predicate that raises on an
event is such a failure too (not retried): under ``"skip"`` or a dead-letter
callable that event is left out of the handler's list and the rest go on.

A handler registered with ``max_batch`` gets the events of several
transactions per call: :meth:`Dispatcher.dispatch` with ``defer=True`` (the
pipeline's dispatcher loop, while more transactions are queued) keeps its
selected events, making a call whenever ``max_batch`` of them are there, and
:meth:`Dispatcher.flush` calls it with the rest; the caller acknowledges the
transactions it deferred only after ``flush`` returned (:meth:`Dispatcher.kept`
keeps a planned transaction's events without a ``dispatch`` when no call is
due). Without ``defer``
(workers, single transactions) everything is flushed before ``dispatch``
returns.

Invariant: :meth:`Dispatcher.dispatch` either returns after every call
succeeded or was disposed of by the policy, or raises
:class:`~walex.errors.HandlerError`; the caller must not acknowledge a
transaction whose dispatch raised.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from .errors import HandlerError
from .event import Event
from .handlers import Events, Handler
from .threads import Bound, Workers, cut_off_raised
from .transactions import Transaction

__all__ = ["ASYNC", "NOTHING", "OTHER", "PLAIN", "Dispatcher", "Plan"]

RETRY_BACKOFF_CAP = 60.0  # seconds: the longest a retry waits (unless retry_backoff is longer)

log = logging.getLogger("walex.dispatch")

_Runner = Callable[[Callable[[Any], Any], Any], Awaitable[Any]]


async def _call(func: Callable[..., Any], arg: Any, is_async: bool | None, run_plain: _Runner) -> None:
    """Await a coroutine function; run a plain one with ``run_plain`` (a thread)."""
    if is_async is None:
        is_async = inspect.iscoroutinefunction(func)
    if is_async:
        await func(arg)
        return
    result = await run_plain(func, arg)
    if inspect.isawaitable(result):
        await result


def _stopping(exc: BaseException) -> bool:
    """Whether ``exc`` is walex's own task being cancelled, not something a call raised.

    A call that turns that cancellation into KeyboardInterrupt or SystemExit (a
    handler cut off by ``stop()``) has it raised as a HandlerError here: out of a
    task, those two stop the event loop itself, ``stop()`` half done."""
    if isinstance(exc, GeneratorExit):
        return True
    task = asyncio.current_task()
    if task is None or not task.cancelling():
        return False
    cut_off_raised(exc)
    return True


class _BatchFailure:
    """A ``max_batch`` call failed under "stop": the handler, the call's events, what it raised."""

    __slots__ = ("events", "exc", "handler")

    def __init__(self, handler: Handler, events: list[Event], exc: BaseException) -> None:
        self.handler, self.events, self.exc = handler, events, exc


def _label(handler: Handler, func: Callable[..., Any] | None = None, event: Event | None = None) -> str:
    if func is None:
        return f"handler {handler.name}"
    return f"function {getattr(func, '__qualname__', repr(func))} for event {event.id if event else '?'}"


# What Dispatcher.plan gives for a transaction: a tuple
# (kind, callback, events, selections, broken), ``selections`` the (handler, events)
# pairs to call, ``broken`` the (handler, [(event, exception)]) of filters that raised;
# for a single call (kind PLAIN or ASYNC: one handler, no per-event functions, no
# filter raised) ``callback(events)`` is that call.
NOTHING, PLAIN, ASYNC, OTHER = 0, 1, 2, 3
Plan = tuple[int, Any, Any, Any, Any]
_NO_CALLS: list[list[Event]] = []  # _keep's answer when nothing is due (never changed)
_NOTHING: Plan = (NOTHING, None, None, (), ())
_KINDS = 4096  # most (type, schema, table) answers Dispatcher.plan keeps


class Dispatcher:
    """Routes transactions to the handlers of a set of :class:`Events` modules."""

    def __init__(
        self,
        modules: Iterable[Events] = (),
        function_concurrency: int = 16,
        on_error: Any = "stop",
        max_retries: int = 0,
        retry_backoff: float = 0.5,
        name: str = "walex",
    ) -> None:
        self.workers = Workers(name, function_concurrency)
        self._functions = Bound(function_concurrency)  # the calls of per-event functions
        # max_batch handlers' events not yet handed over, by id(handler) (handlers are unhashable)
        self._pending: dict[int, tuple[Handler, list[Event]]] = {}
        # the commit LSN of the transaction whose later batches are still to be planned
        # (0: none; a backfill's read batches, never "last", carry their watermark's)
        self._open = 0
        self._modules_due: list[Events] | None = None  # change_modules: at the next transaction
        self._watch = False  # either of them set: plan() tracks the batches (_track)
        self.set_modules(modules)
        self.failures = 0  # calls that failed after every retry (skipped or dead-lettered)
        self.retries = 0
        self.errors = 0  # calls that raised, each try counted (walex_handler_errors_total)
        self.configure(on_error, max_retries, retry_backoff, function_concurrency)

    def configure(
        self, on_error: Any, max_retries: int, retry_backoff: float, function_concurrency: int
    ) -> None:
        """Set the error policy and the function bound. The bound holds at once, for the
        calls running too (a new semaphore let the calls waiting on the old one in
        beside those taking the new one: more than either bound at once)."""
        self.on_error = on_error
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.function_concurrency = function_concurrency
        self._functions.limit = function_concurrency
        self.workers.function_threads = function_concurrency

    def close(self, wait: bool = True) -> None:
        """End the threads of plain handlers and functions (see :meth:`Workers.close`)."""
        self.workers.close(wait)

    def set_modules(self, modules: Iterable[Events]) -> None:
        """Replace the handler modules at once (nothing is dispatched)."""
        self._modules_due = None
        self._watch = bool(self._open)
        self._modules = list(modules)
        self._refresh()

    def change_modules(self, modules: Iterable[Events]) -> None:
        """Replace the handler modules from the next transaction: while one is half
        planned (its later batches to come), once it ends, so that each transaction
        goes whole to one set of handlers."""
        if self._open:  # the next batch planned may continue that transaction
            self._modules_due = list(modules)
            self._watch = True
        else:
            self.set_modules(modules)

    def refresh(self) -> None:
        """Take in the handlers registered in the modules since (:meth:`plan` does it too)."""
        if list(map(len, self._lists)) != self._sizes:
            self._refresh()

    def _refresh(self) -> None:
        self._lists = [module.handlers for module in self._modules]
        self._sizes = [len(handlers) for handlers in self._lists]
        self.handlers: list[Handler] = [h for module in self._modules for h in module.handlers]
        # the largest max_batch (0: no handler batches across transactions)
        self.max_batch = max((h.max_batch for h in self.handlers), default=0)
        self.batching = self.max_batch > 0
        # (type, schema, table) -> the handlers that concern such an event, in order
        # (:meth:`Handler.concerns` looks at nothing else; filters aside), found once per
        # handler set: plan() asks no handler about a table none takes, and unwanted()
        self._kinds: dict[tuple[Any, str, str], tuple[Handler, ...]] = {}

    def _concerned(self, event: Event) -> tuple[Handler, ...]:
        """The handlers that concern an event of this one's type, schema and table, kept
        for :meth:`plan` and :meth:`unwanted` until the handlers change."""
        kinds = self._kinds
        if len(kinds) >= _KINDS:  # bounded however many tables come and go
            kinds.clear()
        source = event.source
        found = kinds[(event.type, source.schema, source.table)] = tuple(
            handler for handler in self.handlers if handler.concerns(event))
        return found

    def unwanted(self, txns: Iterable[Transaction]) -> int:
        """How many of ``txns``, from the first, no handler wants, told without planning
        them: each of their events is of a type and table no handler concerns (so
        :meth:`plan` would run no filter and give a plan of nothing to call). Handlers
        registered since the last look count."""
        if list(map(len, self._lists)) != self._sizes:
            self._refresh()
        if self._modules_due is not None:
            return 0  # each batch planned, so the new modules come in between transactions
        kinds = self._kinds
        count = 0
        last_source = last_type = None  # of the last event found unwanted (one shared
        for txn in txns:  # Source per table: most events are of the same one and type)
            for event in txn.events:
                source = event.source
                if source is last_source and event.type is last_type:
                    continue
                concerned = kinds.get((event.type, source.schema, source.table))
                if concerned is None:
                    concerned = self._concerned(event)
                if concerned:
                    return count
                last_source, last_type = source, event.type
            count += 1
            if not txn.last or self._watch:  # as plan() tracks it
                self._track(txn)
        return count

    def _track(self, txn: Transaction) -> None:
        """Note the transaction planned is open (batches of it to come) or closed; take
        the modules change_modules left due once a batch of another one is planned."""
        due = self._modules_due
        if due is not None and self._open != txn.commit_lsn:
            self._open = 0
            self.set_modules(due)
        self._open = 0 if txn.last else txn.commit_lsn
        self._watch = bool(self._open) or self._modules_due is not None

    def has_handlers(self) -> bool:
        """Whether any handler is registered (those registered since the last look count)."""
        if list(map(len, self._lists)) != self._sizes:
            self._refresh()
        return bool(self.handlers) or self._modules_due is not None

    @property
    def pending(self) -> bool:
        """Whether ``max_batch`` handlers hold events of deferred transactions not yet handed over."""
        return bool(self._pending)

    def drop_pending(self) -> int:
        """Forget the events kept for ``max_batch`` handlers (their transactions were not
        acknowledged and will be delivered again); how many."""
        count = sum(len(kept) for _, kept in self._pending.values())
        self._pending = {}
        self._open = 0  # what was half planned is delivered again from its start
        self._watch = False
        if self._modules_due is not None:
            self.set_modules(self._modules_due)
        return count

    def _select(self, handler: Handler, events: list[Event]) -> tuple[list[Event], list[Any]]:
        """The handler's events, and the (event, exception) pairs whose filter raised."""
        selected: list[Event] = []
        broken: list[Any] = []
        concerns = handler.concerns
        passes = handler.passes if handler.filters else None
        for event in events:
            if not concerns(event):
                continue
            if passes is not None:
                try:
                    if not passes(event):
                        continue
                except BaseException as exc:  # a filter runs on the loop: no cancellation here
                    broken.append((event, exc))
                    continue
            selected.append(event)
        return selected, broken

    async def _filter_failed(self, handler: Handler, broken: list[Any]) -> None:
        """A filter raised on these events: the policy decides (not retried)."""
        for event, exc in broken:
            label = f"a filter of handler {handler.name} on event {event.id}"
            if self.on_error == "stop":
                log.error("%s raised %r", label, exc, exc_info=exc)
                raise HandlerError(
                    f"{label} raised {exc!r} on the transaction committed at "
                    f"{event.lsn}; it was not acknowledged"
                ) from exc
            await self._dispose(f"{label} raised", exc, [event])

    def plan(self, txn: Transaction) -> Plan:
        """Which handlers get which events of ``txn`` (see :data:`Plan`); every filter runs
        here, once, before any call is made."""
        if not txn.last or self._watch:  # a batch of a transaction split in several, or
            self._track(txn)  # one after it: change_modules waits for their end
        events = txn.events
        if not events:
            return _NOTHING
        if list(map(len, self._lists)) != self._sizes:
            self._refresh()  # a handler was registered after the app was created
        kinds = self._kinds
        if len(events) == 1:  # a transaction of one change: the common case
            one = events[0]
            source = one.source
            concerned = kinds.get((one.type, source.schema, source.table))
            if concerned is None:
                concerned = self._concerned(one)
            if not concerned:
                return _NOTHING  # no handler concerns it: no filter to run, no call
            if len(concerned) == 1:
                handler = concerned[0]
                if not handler.filters and handler.single:  # one call of that one event
                    selected = [one]
                    return (ASYNC if handler.is_async else PLAIN, handler.callback, selected,
                            [(handler, selected)], ())
        else:
            for event in events:  # is every event of a kind no handler concerns?
                source = event.source
                concerned = kinds.get((event.type, source.schema, source.table))
                if concerned is None:
                    concerned = self._concerned(event)
                if concerned:
                    break
            else:
                return _NOTHING
            concerned = self.handlers
        selections = []
        broken_filters = None
        one = events[0] if len(events) == 1 else None
        for handler in concerned:  # those concerned by the one event, or every handler
            if handler.filters:
                selected, broken = self._select(handler, events)
                if broken:
                    if broken_filters is None:
                        broken_filters = []
                    broken_filters.append((handler, broken))
            elif one is not None:  # a transaction of one change, that concerns the handler
                selected = [one]
            elif handler.takes_all:  # on_event("all"): no test per event
                selected = events[:]
            else:
                concerns = handler.concerns
                selected = [event for event in events if concerns(event)]
            if selected:
                selections.append((handler, selected))
        if broken_filters is not None:
            return (OTHER, None, None, selections, broken_filters)
        if not selections:
            return _NOTHING
        if len(selections) == 1:
            handler, selected = selections[0]
            if handler.single:  # no functions, no max_batch
                return (ASYNC if handler.is_async else PLAIN, handler.callback, selected, selections, ())
        return (OTHER, None, None, selections, ())

    async def dispatch(self, txn: Transaction, plan: Plan | None = None, defer: bool = False) -> None:
        """Call the handlers (and functions) of ``txn``, planned by :meth:`plan` if not given.

        ``defer``: ``max_batch`` handlers may keep events for a later call (see :meth:`flush`).
        """
        if plan is None:
            plan = self.plan(txn)
        kind, callback, selected, selections, broken_filters = plan
        for handler, broken in broken_filters:
            await self._filter_failed(handler, broken)
        if kind == ASYNC:  # the common case: one call, awaited directly
            try:
                await callback(selected)
            except BaseException as exc:
                if _stopping(exc):
                    raise
                await self.recover(txn, plan, exc)
            return
        if kind == PLAIN:
            handler = selections[0][0]
            failure = await self._guarded(handler, None, None, callback, False, selected)
            if failure is not None:
                self._raise([(_label(handler), failure)], txn)
            return
        if not selections:
            if not defer and self._pending:
                await self.flush()
            return
        calls: list[Awaitable[Any]] = []
        owners: list[tuple[Handler, Any, Event | None]] = []
        for handler, selected in selections:
            if handler.max_batch:
                chunks = self._keep(handler, selected)
                if chunks:
                    calls.append(self._guarded_chunks(handler, chunks))
                    owners.append((handler, None, None))
                continue
            calls.append(self._guarded(handler, None, None, handler.callback, handler.is_async, selected))
            owners.append((handler, None, None))
            for func in handler.functions:
                for event in selected:
                    calls.append(self._guarded(handler, func, event, self._function, True, (func, event)))
                    owners.append((handler, func, event))
        if not calls:  # max_batch handlers only, their events kept
            if not defer and self._pending:
                await self.flush()
            return
        results = await asyncio.gather(*calls, return_exceptions=True)
        failures = [(_label(*owner), r) for owner, r in zip(owners, results) if r is not None]
        if failures:
            batch = next((r for r in results if isinstance(r, _BatchFailure)), None)
            if batch is not None:  # name the whole call, not only this transaction
                for label, exc in failures:
                    if exc is not batch:
                        log.error("%s failed on transaction %s: %r", label, txn.xid, exc, exc_info=exc)
                self._raise_batch([batch])
            self._raise(failures, txn)
        if not defer and self._pending:
            await self.flush()

    def kept(self, plan: Plan) -> bool:
        """The batching loop's fast path: when every call of ``plan`` goes to a ``max_batch``
        handler with room for its events, keep them (no call is due) and say True; else
        do nothing and say False (:meth:`dispatch` it)."""
        kind, _, _, selections, broken = plan
        if kind != OTHER or broken:
            return kind == NOTHING
        pending = self._pending
        for handler, selected in selections:
            size = handler.max_batch
            entry = pending.get(id(handler))
            if not size or len(selected) + (0 if entry is None else len(entry[1])) >= size:
                return False
        for handler, selected in selections:
            self._keep(handler, selected)  # room for them all: no call due
        return True

    def _keep(self, handler: Handler, selected: list[Event]) -> list[list[Event]]:
        """Add ``selected`` to the handler's kept events; the calls of ``max_batch`` due now.

        A transaction's events share a call unless they alone are more than ``max_batch``:
        kept events with which they would not fit go first, on their own."""
        size = handler.max_batch
        key = id(handler)
        entry = self._pending.get(key)
        if entry is not None:
            kept = entry[1]
            if len(kept) + len(selected) <= size:  # the common case: kept in place
                kept += selected
                if len(kept) < size:
                    return _NO_CALLS
                del self._pending[key]
                return [kept]
            chunks = [kept]  # what fits no more goes first, in WAL order
        else:
            chunks = []
        count, start = len(selected), 0
        while count - start >= size:
            chunks.append(selected[start:start + size])
            start += size
        if start < count:
            self._pending[key] = (handler, selected[start:])  # a list of its own
        elif entry is not None:
            del self._pending[key]
        return chunks

    async def flush(self) -> None:
        """Hand the kept events to their ``max_batch`` handlers; raises HandlerError under
        "stop" (the deferred transactions must then not be acknowledged)."""
        pending, self._pending = list(self._pending.values()), {}
        if not pending:
            return
        results = await asyncio.gather(
            *(self._guarded_chunks(h, [kept]) for h, kept in pending), return_exceptions=True)
        failures = [r if isinstance(r, _BatchFailure) else _BatchFailure(h, kept, r)
                    for (h, kept), r in zip(pending, results) if r is not None]
        if failures:
            self._raise_batch(failures)

    @staticmethod
    def _raise_batch(failures: list[_BatchFailure]) -> None:
        for f in failures:
            log.error("%s failed on a batch of %d events: %r", _label(f.handler),
                      len(f.events), f.exc, exc_info=f.exc)
        f = failures[0]
        events = f.events
        raise HandlerError(
            f"{_label(f.handler)} raised {f.exc!r} on a batch of {len(events)} events "
            f"({events[0].id} to {events[-1].id}); their transactions were not acknowledged"
        ) from f.exc

    async def _guarded_chunks(self, handler: Handler, chunks: list[list[Event]]) -> _BatchFailure | None:
        """The calls of a ``max_batch`` handler, one after the other; stops at a failure."""
        for chunk in chunks:
            failure = await self._guarded(handler, None, None, handler.callback, handler.is_async, chunk)
            if failure is not None:
                return _BatchFailure(handler, chunk, failure)
        return None

    async def recover(self, txn: Transaction, plan: Plan, exc: BaseException) -> None:
        """The single call of ``plan`` (kind PLAIN or ASYNC), made already, raised ``exc``:
        retries and the error policy, as for any failed call; raises HandlerError under "stop"."""
        kind, callback, selected, selections, _ = plan
        handler = selections[0][0]
        failure = await self._guarded(handler, None, None, callback, kind == ASYNC, selected, exc)
        if failure is not None:
            self._raise([(_label(handler), failure)], txn)

    @staticmethod
    def _raise(failures: list[tuple[str, BaseException]], txn: Transaction) -> None:
        for label, exc in failures:
            log.error("%s failed on transaction %s: %r", label, txn.xid, exc, exc_info=exc)
        label, exc = failures[0]
        raise HandlerError(
            f"{label} raised {exc!r} on the transaction committed at "
            f"{txn.events[0].lsn}; it was not acknowledged"
        ) from exc

    async def _function(self, call: tuple[Callable[[Event], Any], Event]) -> None:
        func, event = call
        async with self._functions:
            await _call(func, event, None, self.workers.run_function)

    async def _guarded(
        self, handler: Handler, func: Any, event: Event | None,
        target: Callable[..., Any], is_async: bool, arg: Any, first: BaseException | None = None,
    ) -> BaseException | None:
        """Call with retries, then apply the error policy; returns the failure under "stop".

        ``first``: what the first call, made already, raised. Raises only the
        cancellation of walex's own task.
        """
        attempt = 0
        while True:
            try:
                if first is not None:
                    exc, first = first, None
                    raise exc
                await _call(target, arg, is_async, self.workers.run_handler)
                return None
            except BaseException as exc:
                if _stopping(exc):
                    raise
                self.errors += 1
                label = _label(handler, func, event)
                if attempt < self.max_retries:
                    # doubling up to RETRY_BACKOFF_CAP (2**attempt as a float would overflow
                    # past 1023 retries): a retry waits minutes at most, not days
                    delay = min(self.retry_backoff * 2 ** min(attempt, 64),
                                max(RETRY_BACKOFF_CAP, self.retry_backoff))
                    attempt += 1
                    self.retries += 1
                    log.warning("%s raised %r; retry %d/%d in %.2fs",
                                label, exc, attempt, self.max_retries, delay)
                    await asyncio.sleep(delay)
                    continue
                if self.on_error == "stop":
                    return exc
                events = [event] if event is not None else arg
                try:
                    await self._dispose(f"{label} failed after {attempt} retries", exc, events)
                except BaseException as error:  # the dead-letter handler failed
                    if _stopping(error):
                        raise
                    return error
                return None

    async def settle(self, what: str, exc: Exception, events: list[Event]) -> None:
        """A failure outside the handlers (a destination's permanent refusal) under the error
        policy: raises ``exc`` under "stop"; otherwise skipped or dead-lettered as a failed
        call's events would be (a dead-letter handler that raises raises here)."""
        if self.on_error == "stop":
            raise exc
        await self._dispose(what, exc, events)

    async def _dispose(self, what: str, exc: BaseException, events: list[Event]) -> None:
        """Apply the "skip" or the dead-letter policy to events whose handling failed."""
        self.failures += 1
        ids = ", ".join(e.id for e in events)
        if self.on_error == "skip":
            log.error("%s, skipped events %s: %r", what, ids, exc, exc_info=exc)
            return
        log.error("%s; events %s go to the dead letter handler", what, ids)
        dead_letter = self.on_error
        await _call(lambda evs: dead_letter(evs, exc), events,
                    inspect.iscoroutinefunction(dead_letter), self.workers.run_handler)
