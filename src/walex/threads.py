"""Where an app's plain (non-async) code runs: threads of its own, never the event loop.

The event loop owns the socket, the decoder and the acknowledgement, so
blocking code runs elsewhere:

- an app's plain handlers (and a plain dead-letter handler) run one at a
  time, in the order they are called, on one dedicated thread named
  ``walex-<app>-handlers_0``: a thread-bound resource a handler makes on its
  first call (a sqlite3 connection, a client that is not thread-safe) keeps
  working in every later call; the calls of consecutive transactions come as
  one run (:meth:`Workers.run_handlers`), one hand-off for all of them;
- plain per-event functions run on a pool of ``function_concurrency``
  threads named ``walex-<app>-functions_<n>``.

Threads start on first use. :meth:`Workers.close` ends them when the app
stops; a restarted app starts new ones. The caller's context variables are
copied into each call, as :func:`asyncio.to_thread` does.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .errors import HandlerError

__all__ = ["INTERRUPTED", "Bound", "Workers", "cut_off_raised"]

# the list, in an app's tasks' context, of what its calls raised as stop() cancelled them
INTERRUPTED: contextvars.ContextVar[list[BaseException] | None] = contextvars.ContextVar(
    "walex_interrupted", default=None)


def cut_off_raised(exc: BaseException) -> None:
    """A call raised ``exc`` as walex's own task was cancelled (cut off by ``stop()``):
    KeyboardInterrupt or SystemExit is raised as a HandlerError, noted for the app's
    ``wait()`` (out of a task, those two stop the event loop itself, the stop half done;
    a per-event function's would otherwise be lost with its cancelled gather)."""
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        error = HandlerError(f"a handler call raised {exc!r} when stop() cancelled it (cut off "
                             "after shutdown_grace); its transaction was not acknowledged")
        noted = INTERRUPTED.get()
        if noted is not None:
            noted.append(error)
        raise error from exc


class Workers:
    """The handler thread and the function pool of one app."""

    def __init__(self, name: str, function_threads: int) -> None:
        self.name = name
        self.function_threads = function_threads  # may change while running: see run_function
        self._handlers: ThreadPoolExecutor | None = None
        self._functions: ThreadPoolExecutor | None = None
        self._functions_size = 0

    async def run_handler(self, func: Callable[[Any], Any], arg: Any) -> Any:
        """``func(arg)`` on the app's handler thread, after the calls queued before it."""
        pool = self._handlers
        if pool is None:
            pool = self._handlers = ThreadPoolExecutor(1, thread_name_prefix=f"walex-{self.name}-handlers")
        return await _run(pool, func, arg)

    async def idle(self) -> None:
        """Return once the calls on the handler thread so far have ended (a cancelled
        handler call keeps its thread until it returns)."""
        if self._handlers is not None:
            await asyncio.get_running_loop().run_in_executor(self._handlers, _nothing)

    async def run_handlers(
        self, calls: list[tuple[Any, Any, Any]], var: contextvars.ContextVar[Any],
        stopping: Callable[[], bool],
    ) -> tuple[int, BaseException | None]:
        """A run of calls ``func(arg)``, for each ``(func, arg, value)`` with ``var`` set to
        ``value`` (``func`` None: nothing to call), on the handler thread with one hand-off.

        Returns how many calls finished, and what the next one raised, if it did
        (the calls after it are not made). Stops before a call once ``stopping()``
        is true (the first call is always made). A plain handler that returns an
        awaitable has it awaited here, on the loop, and the run stops after it.
        """
        pool = self._handlers
        if pool is None:
            pool = self._handlers = ThreadPoolExecutor(1, thread_name_prefix=f"walex-{self.name}-handlers")
        loop = asyncio.get_running_loop()
        done, failure, pending = await loop.run_in_executor(
            pool, _run_calls, contextvars.copy_context(), calls, var, stopping
        )
        if pending is not None:  # an awaitable returned by call `done`: awaited on the loop
            try:
                await pending
            except BaseException as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    cut_off_raised(exc)
                    raise
                return done, exc
            done += 1
        return done, failure

    async def run_function(self, func: Callable[[Any], Any], arg: Any) -> Any:
        """``func(arg)`` on a thread of the function pool."""
        pool = self._functions
        if pool is None or self._functions_size != self.function_threads:
            if pool is not None:  # resized: calls already running finish on the old threads
                pool.shutdown(wait=False)
            size = self._functions_size = self.function_threads
            pool = self._functions = ThreadPoolExecutor(
                size, thread_name_prefix=f"walex-{self.name}-functions"
            )
        return await _run(pool, func, arg)

    def close(self, wait: bool = True) -> None:
        """End the threads; calls not started are dropped.

        With ``wait`` the threads are joined (quick when no call is running);
        without, a call still running (one cut off by the shutdown grace)
        finishes on its thread, which then ends.
        """
        pools = [p for p in (self._handlers, self._functions) if p is not None]
        self._handlers = self._functions = None
        for pool in pools:
            pool.shutdown(wait=wait, cancel_futures=True)

    def lingering(self) -> list[str]:
        """The names of this app's threads still alive after :meth:`close` (a call cut
        off runs on until it returns); asked before new threads start."""
        prefixes = (f"walex-{self.name}-handlers_", f"walex-{self.name}-functions_")
        return [t.name for t in threading.enumerate() if t.name.startswith(prefixes)]


class Bound:
    """At most ``limit`` holders at once (``async with``), in the order they came, like a
    semaphore whose limit may change while it is held (``function_concurrency`` at run
    time): the calls already in count against the new limit, so a lower one lets no
    other in until enough have left, and a higher one lets waiting ones in at once."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self.held = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None  # the waiters', once one waited

    @property
    def limit(self) -> int:
        return self._limit

    @limit.setter
    def limit(self, limit: int) -> None:
        """Set from any thread (a plain handler may change function_concurrency)."""
        self._limit = limit
        loop = self._loop
        if loop is None or not self._waiters:
            return
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is loop:
            self._wake()
        else:  # the waiters' futures belong to their loop
            loop.call_soon_threadsafe(self._wake)

    async def __aenter__(self) -> None:
        if self.held < self._limit and not self._waiters:
            self.held += 1
            return
        loop = self._loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiters.append(waiter)
        try:
            while True:
                await waiter
                if self.held < self._limit:
                    break
                waiter = loop.create_future()  # another came in first: wait again, first
                self._waiters.appendleft(waiter)
        except BaseException:
            if not waiter.done() or waiter.cancelled():
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            else:  # woken, then cancelled: the room it was woken for goes to the next
                self._wake()
            raise
        self.held += 1
        self._wake()  # room for more (a raised limit): the next one too

    async def __aexit__(self, *exc_info: object) -> None:
        self.held -= 1
        self._wake()

    def _wake(self) -> None:
        waiters = self._waiters
        while waiters and self.held < self._limit:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


def _run_calls(
    base: contextvars.Context, calls: list[tuple[Any, Any, Any]], var: contextvars.ContextVar[Any],
    stopping: Callable[[], bool],
) -> tuple[int, BaseException | None, Any]:
    """On the handler thread: the calls of a run, each in its own copy of the caller's context."""
    for i, (func, arg, value) in enumerate(calls):
        if i and stopping():
            return i, None, None
        if func is None:
            continue
        context = base.copy()
        context.run(var.set, value)
        try:
            result = context.run(func, arg)
        except BaseException as exc:  # the loop applies the error policy
            return i, exc, None
        if result is not None and inspect.isawaitable(result):
            return i, None, result
    return len(calls), None, None


def _run(pool: ThreadPoolExecutor, func: Callable[[Any], Any], arg: Any) -> asyncio.Future[Any]:
    loop = asyncio.get_running_loop()
    return loop.run_in_executor(pool, contextvars.copy_context().run, func, arg)


def _nothing() -> None:
    pass
