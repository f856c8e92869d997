"""Hand each committed transaction to the handlers and per-event functions.

For one transaction, every handler whose selection is not empty is called
once with its events, and each of its per-event functions once per selected
event; all of these run concurrently (functions bounded by a semaphore) and
:meth:`Dispatcher.dispatch` returns only when every one has finished.
Transactions are dispatched one after the other, so a handler sees a table's
changes in commit order.

Invariant: :meth:`Dispatcher.dispatch` either returns after every call
succeeded, or raises :class:`~walex.errors.HandlerError`; the caller must not
acknowledge a transaction whose dispatch raised.
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
from .transactions import Transaction

__all__ = ["Dispatcher"]

log = logging.getLogger("walex.dispatch")


async def _call(func: Callable[..., Any], arg: Any) -> None:
    if inspect.iscoroutinefunction(func):
        await func(arg)
        return
    result = await asyncio.to_thread(func, arg)
    if inspect.isawaitable(result):
        await result


class Dispatcher:
    """Routes transactions to the handlers of a set of :class:`Events` modules."""

    def __init__(self, modules: Iterable[Events] = (), function_concurrency: int = 16) -> None:
        self.handlers: list[Handler] = [h for module in modules for h in module.handlers]
        self._functions = asyncio.Semaphore(function_concurrency)

    def set_modules(self, modules: Iterable[Events]) -> None:
        """Replace the handlers; takes effect from the next transaction."""
        self.handlers = [h for module in modules for h in module.handlers]

    async def dispatch(self, txn: Transaction) -> None:
        if not txn.events:
            return
        calls: list[Awaitable[None]] = []
        labels: list[str] = []
        for handler in self.handlers:
            events = handler.select(txn.events)
            if not events:
                continue
            calls.append(_call(handler.callback, events))
            labels.append(f"handler {handler.name}")
            for func in handler.functions:
                for event in events:
                    calls.append(self._function(func, event))
                    labels.append(f"function {getattr(func, '__qualname__', func)} for event {event.id}")
        if not calls:
            return
        results = await asyncio.gather(*calls, return_exceptions=True)
        failures = [(label, r) for label, r in zip(labels, results) if isinstance(r, BaseException)]
        if failures:
            for label, exc in failures:
                log.error("%s failed on transaction %s: %r", label, txn.xid, exc, exc_info=exc)
            label, exc = failures[0]
            raise HandlerError(
                f"{label} raised {exc!r} on the transaction committed at "
                f"{txn.events[0].lsn}; it was not acknowledged"
            ) from exc

    async def _function(self, func: Callable[[Event], Any], event: Event) -> None:
        async with self._functions:
            await _call(func, event)
