"""Run a WalEx app inside a test and record what its handlers receive.

Usage (inside a coroutine run with ``asyncio.run``)::

    async with collecting(dsn, publication="pub", subscriptions=["t"]) as rec:
        admin.execute("INSERT INTO t VALUES (1)")
        [event] = await rec.wait_for(1)

``collecting`` always registers one ``on_event("all")`` handler of its own,
whose events are :attr:`Recorder.events` (every event of every subscribed
table, in commit and WAL order). Tests add handlers of their own through
:meth:`Recorder.handler`, which returns a plain or a coroutine function that
records each call (label, the list it got) in :attr:`Recorder.calls`.

Every wait has a timeout and fails with what was received so far; if the app
stops with an error meanwhile, that error is raised instead of timing out.
"""

from __future__ import annotations

import asyncio
import time
import itertools
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg

from walex import Event, Events, WalEx

__all__ = ["Call", "Recorder", "collecting", "run", "until"]

_names = itertools.count(1)
STOP_TIMEOUT = 15.0  # seconds WalEx.stop() may take before the test fails


@dataclass(frozen=True)
class Call:
    """One handler call: which handler (its label) and the list it received."""

    label: str
    events: list[Event]
    thread: str  # name of the thread the handler ran in


class Recorder:
    """What the handlers of one app received."""

    def __init__(self) -> None:
        self.events: list[Event] = []  # everything the built-in "all" handler got
        self.calls: list[Call] = []  # every recorded call, including the built-in one
        self.app: WalEx | None = None
        self._lock = threading.Lock()
        self._app_done: asyncio.Task[None] | None = None

    # -- handlers --------------------------------------------------------

    def _record(self, label: str, events: list[Event]) -> None:
        with self._lock:
            self.calls.append(Call(label, list(events), threading.current_thread().name))
            if label == "__all__":
                self.events.extend(events)

    def handler(self, label: str, *, sync: bool = False) -> Callable[[list[Event]], Any]:
        """A handler recording its calls under ``label``; a plain function if ``sync``."""
        if sync:
            def record_sync(events: list[Event]) -> None:
                self._record(label, events)

            return record_sync

        async def record_async(events: list[Event]) -> None:
            self._record(label, events)

        return record_async

    def calls_of(self, label: str) -> list[list[Event]]:
        """The lists received by the handler labelled ``label``, one per call."""
        with self._lock:
            return [c.events for c in self.calls if c.label == label]

    # -- waiting ---------------------------------------------------------

    async def _until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not ready():
            if self._app_done is not None and self._app_done.done():
                self._app_done.result()  # raises the error that stopped the app
                raise AssertionError(f"the app stopped while waiting for {what}")
            if loop.time() > deadline:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what}; received "
                    f"{len(self.events)} events: {[(e.type.value, e.name) for e in self.events]}"
                )
            await asyncio.sleep(0.01)

    async def wait_for(self, n: int, timeout: float = 15) -> list[Event]:
        """Wait until the "all" handler received ``n`` events in total; return those ``n``.

        Fails if more than ``n`` arrived once ``n`` are there (checked right
        away; call :meth:`settle` first to also catch late extra events).
        """
        await self._until(lambda: len(self.events) >= n, timeout, f"{n} events")
        with self._lock:
            assert len(self.events) == n, f"expected {n} events, got {len(self.events)}: {self.events}"
            return list(self.events)

    async def wait_calls(self, label: str, n: int, timeout: float = 15) -> list[list[Event]]:
        """Wait until the handler ``label`` was called ``n`` times; return the lists."""
        await self._until(lambda: len(self.calls_of(label)) >= n, timeout,
                          f"{n} calls of handler {label!r}")
        return self.calls_of(label)

    async def settle(self, seconds: float = 0.3) -> None:
        """Give late (unexpected) events a chance to arrive."""
        await asyncio.sleep(seconds)


@asynccontextmanager
async def collecting(
    dsn: str,
    *,
    publication: str = "pub",
    subscriptions: Iterable[str] = ("*",),
    modules: Iterable[Events] = (),
    recorder: Recorder | None = None,
    **options: Any,
) -> AsyncIterator[Recorder]:
    """Start a WalEx app on ``dsn`` with a recording "all" handler; stop it on exit."""
    rec = recorder or Recorder()
    events = Events()
    events.on_event("all")(rec.handler("__all__"))
    options.setdefault("name", f"walex_test_{next(_names)}")
    app = WalEx(
        dsn, publication=publication, subscriptions=list(subscriptions),
        modules=[events, *modules], **options,
    )
    rec.app = app
    await app.start()
    rec._app_done = asyncio.create_task(app.wait())
    try:
        yield rec
    except BaseException:
        await _stop(app, rec._app_done)
        raise
    await _stop(app, rec._app_done)
    await app.wait()  # like ``async with app``: raises the error that stopped the app


async def _stop(app: WalEx, app_done: asyncio.Task[None], timeout: float = STOP_TIMEOUT) -> None:
    """``app.stop()``, but a stop that hangs fails the test instead of blocking it."""
    app_done.cancel()
    await asyncio.gather(app_done, return_exceptions=True)
    stopper = asyncio.ensure_future(app.stop())
    done, _ = await asyncio.wait([stopper], timeout=timeout)
    if done:
        stopper.result()
        return
    stacks = "\n".join(_describe(t) for t in asyncio.all_tasks() if t is not asyncio.current_task())
    # Clean up so the next test starts afresh: cancel the app's tasks again.
    prefix = f"walex-{app.settings.name}-"
    for task in asyncio.all_tasks():
        if task.get_name().startswith(prefix):
            task.cancel()
    await asyncio.wait([stopper], timeout=5)
    raise AssertionError(f"WalEx.stop() did not return within {timeout}s; tasks:\n{stacks}")


def run(coro: Any, timeout: float = 60) -> Any:
    """``asyncio.run`` with an overall timeout, so a hang fails the test."""

    async def bounded() -> Any:
        task = asyncio.ensure_future(coro)
        done, _ = await asyncio.wait([task], timeout=timeout)
        if not done:
            stacks = "\n".join(_describe(t) for t in asyncio.all_tasks() if t is not asyncio.current_task())
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise AssertionError(f"test coroutine still running after {timeout}s; tasks:\n{stacks}")
        return task.result()

    return asyncio.run(bounded())


def _describe(task: asyncio.Task[Any]) -> str:
    """The task and where each coroutine of its await chain is suspended."""
    lines = [repr(task)]
    coro: Any = task.get_coro()
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            lines.append(f"  {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return "\n".join(lines)


async def until(predicate: Callable[[], bool], what: str, timeout: float = 15) -> None:
    """Wait until ``predicate()`` is true; fail after ``timeout`` seconds naming ``what``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


async def queue_up(admin: Any, app: Any, calls: Any, rows: int) -> None:
    """Commit ``rows`` one-row transactions on table ``item``, all but the first while the
    first handler call waits (``calls.started`` is set by it), until all are received and
    queued behind it."""
    admin.execute("INSERT INTO item VALUES (1)")
    await until(calls.started.is_set, "the first call")
    for i in range(2, rows + 1):
        admin.execute("INSERT INTO item VALUES (%s)", [i])
    end = int(admin.execute("SELECT pg_current_wal_lsn() - '0/0'").fetchone()[0])
    await until(lambda: app.ack.received >= end, "every transaction received")
    await until(lambda: app.pipeline.queue.qsize() >= rows - 1, "the transactions queued")


async def release_a_full_queue(admin: Any, app: Any, batches: Any, insert: str, rows: int,
                               queued: int) -> None:
    """Row 1, then rows 2..``rows`` one transaction each (``insert`` takes the id) while
    the first handler call waits (``batches.started``), until ``queued`` transactions wait
    in the queue; then let the calls go (``batches.go``) and wait until every transaction
    was handled and the last call's last one acknowledged (``batches.calls``: rows, commit
    LSNs, acknowledged position)."""
    admin.execute(insert, [1])
    await until(batches.started.is_set, "the first call")
    for i in range(2, rows + 1):
        admin.execute(insert, [i])
    await until(lambda: app.pipeline.queue.qsize() >= queued, "the queue full")
    batches.go.set()
    await until(lambda: app.transactions_handled == rows, f"{rows} transactions handled")
    last = batches.calls[-1][1][-1]
    await until(lambda: app.ack.flushed > last, "the last one acknowledged")


@contextmanager
def standby_of(primary: Any) -> Iterator[str]:
    """A hot standby of the walex.embedded Cluster ``primary``: its DSN while the block runs.

    On PostgreSQL 16+ the primary logs a standby snapshot every 0.3 s meanwhile: a logical
    slot made on the standby waits for one to be replayed.
    """
    from walex.embedded import free_port

    base = primary.datadir.parent
    datadir, port = base / "standby", free_port()
    primary._run("pg_basebackup", "-D", str(datadir), "-h", primary.host,
                 "-p", str(primary.port), "-U", "postgres", "-R", "-X", "stream")
    with open(datadir / "postgresql.auto.conf", "a") as fh:
        fh.write(f"port = {port}\nhot_standby = on\n")
    primary._run("pg_ctl", "-D", str(datadir), "-w", "-t", "60", "-l",
                 str(base / "standby.log"), "start")
    done = threading.Event()

    def snapshots() -> None:
        with psycopg.connect(primary.dsn("postgres"), autocommit=True) as conn:
            while not done.wait(0.3):
                conn.execute("SELECT pg_log_standby_snapshot()")

    if primary.major_version >= 16:
        threading.Thread(target=snapshots, daemon=True).start()
    try:
        yield f"postgresql://postgres@{primary.host}:{port}/postgres"
    finally:
        done.set()
        primary._run("pg_ctl", "-D", str(datadir), "-w", "-m", "fast", "stop")
