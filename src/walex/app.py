"""``WalEx``: the public face of one CDC app and its lifecycle.

An app is configured once (:mod:`walex.config`), resolves its handler
modules (:mod:`walex.modules`) and runs a :class:`~walex.pipeline.Pipeline`
while started. Apps are registered by ``name`` so several can run side by
side in one process (each with its own slot) and be addressed by name for
runtime configuration (:mod:`walex.configs`).

Invariants: when :meth:`WalEx.start` returns the slot exists and streaming
has begun, so every change committed afterwards is delivered; :meth:`stop`
lets the batch in hand finish (within ``shutdown_grace``, else cancels it and
logs so), sends its acknowledgement, starts no batch queued after it and
disconnects; a failure in any task stops the app without acknowledging the
transaction in hand and is raised by :meth:`wait` and :meth:`run`, and so is
an internal task that ends in any other way than by :meth:`stop`.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import gc
import hashlib
import logging
import secrets
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any

from .config import WalExSettings, load_settings
from .conntext import format_target
from .configs import RuntimeConfig
from .dispatch import Dispatcher
from . import gcpolicy
from .errors import ConfigError, StoppedError, WalExError
from .handlers import Handler
from .lifecycle import Lifecycle
from .lsn import format_lsn
from .modules import resolve_modules
from .observe import Observer
from .pgoutput.messages import Message
from .pipeline import Pipeline
from .threads import INTERRUPTED
from .standby import first_session, release, stop_waiting, watch
from .subscriptions import check_subscriptions, unreachable

if TYPE_CHECKING:
    from .destinations.fanout import Destinations

__all__ = ["WalEx", "get_app"]

log = logging.getLogger("walex")

_running: weakref.WeakValueDictionary[str, WalEx] = weakref.WeakValueDictionary()
# the app whose internal tasks run the current code (its handlers, functions, middleware):
# its stop() cannot wait there for the call in hand, which awaits it
_inside: contextvars.ContextVar[WalEx | None] = contextvars.ContextVar("walex_inside", default=None)


def get_app(name: str) -> WalEx:
    """The started app called ``name``."""
    try:
        return _running[name]
    except KeyError:
        raise ConfigError(
            f"no walex app named {name!r} is running (running: {sorted(_running) or 'none'})"
        ) from None


class NoDestinations:
    """The destinations of an app that publishes nowhere: nothing to open, publish or close."""

    items: list[Any] = []
    partitions = 1
    events_published = 0
    retries = 0
    stats: Any = None

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "<Destinations []>"

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass


class WalEx(Lifecycle):
    """Stream the changes of a publication into handler modules.

    Options are those of :class:`~walex.config.WalExSettings`; a bad option
    raises :class:`~walex.errors.ConfigError` listing every problem.
    ``wait()``, ``async with`` and ``run()`` come from
    :class:`~walex.lifecycle.Lifecycle`.
    """

    def __init__(self, url: str | None = None, **options: Any) -> None:
        if url is not None:
            options["url"] = url
        self.settings: WalExSettings = load_settings(**options)
        s = self.settings
        self.modules = resolve_modules(s.modules, s.name, s.subscriptions)
        self.slot_name = s.slot_name or self._default_slot_name()
        self.dispatcher = Dispatcher(
            self.modules, function_concurrency=s.function_concurrency, on_error=s.on_error,
            max_retries=s.max_retries, retry_backoff=s.retry_backoff, name=s.name,
        )
        self.config = RuntimeConfig(self)
        self.pipeline = Pipeline(s, self.slot_name, self.dispatcher, self)
        self.destinations: Destinations | NoDestinations = NoDestinations()
        if s.destinations:  # walex.destinations (and its encoders) only for an app that publishes
            from .destinations.fanout import Destinations

            self.destinations = Destinations(s.destination_urls(), s.partitions,
                                             s.destination_window)
            # the encoded messages a window holds unconfirmed: a quarter of the budget,
            # taken off what the events queued or in hand may hold
            held = self.destinations.held_bytes = max(1, int(s.max_pending_bytes) // 4)
            queue = self.pipeline.queue
            queue.max_bytes = max(1, queue.max_bytes - held)
            # a permanent refusal follows on_error, as a failed handler call
            self.destinations.refused = self.dispatcher.settle
        self.pipeline.destinations = self.destinations
        self.destinations.stats = self.pipeline.stats  # publish counts and latencies
        self.observer = Observer(self)  # metrics, health, lag guard, tracing (walex.observe)
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()
        self._stopping = False
        self._starting = False  # start() is under way (connecting, or waiting for the slot)
        self._gc_held = 0  # the gc_threshold this app holds while it streams (walex.gcpolicy)
        self._error: BaseException | None = None
        self._deferred: deque[Message] = deque()
        self._deferred_task: asyncio.Task[None] | None = None
        self._stop_task: asyncio.Task[None] | None = None  # stop()'s work (_halt)
        self._halting = False  # _halt began (the batch in hand is the last one)
        self._ack_held: int | None = None  # the ack position when stop() cut a call off
        self._interrupted: list[BaseException] = []  # what calls cut off raised (INTERRUPTED)
        self._stop_waiters = 0  # stop() calls awaiting _stop_task
        self._stuck: list[asyncio.Task[None]] = []  # tasks the last stop() could not end
        self._unreachable: dict[int, Handler] = {}  # handlers warned about as unable to fire

    def __repr__(self) -> str:
        return f"<WalEx {self.settings.name!r} {self.target} slot={self.slot_name!r}>"

    @property
    def target(self) -> str:
        """``user@host:port/db`` of the database: the connection's own once connected."""
        conn = self.pipeline.connection
        if conn is not None:
            info = conn.info
            return format_target(info.user, info.host, info.port, info.dbname)
        return self.settings.display_target()

    def _default_slot_name(self) -> str:
        name = self.settings.name
        base = "".join(c if c.isascii() and c.isalnum() else "_" for c in name.lower())[:40]
        if base != name:  # keep names that differ only in case or punctuation apart
            base = f"{base}_{hashlib.sha1(name.encode()).hexdigest()[:6]}"
        if self.settings.durable_slot:
            return f"{base}_walex"
        return f"{base}_walex_{secrets.token_hex(4)}"

    @property
    def ack(self) -> Any:
        return self.pipeline.ack

    @property
    def gaps(self) -> list[str]:
        """Descriptions of changes a temporary or lost slot could not deliver."""
        return self.pipeline.gaps

    @property
    def transactions_handled(self) -> int:
        return self.pipeline.transactions_handled

    # -- lifecycle -------------------------------------------------------

    async def start(self) -> None:
        """Check the setup, create the slot, start streaming; returns once streaming."""
        name = self.settings.name
        other = _running.get(name)
        if other is not None and other is not self:
            raise ConfigError(
                f"a walex app named {name!r} is already running in this process; "
                "give each app its own name"
            )
        if self._starting:
            raise ConfigError(f"walex app {name!r} is already starting (start() is under way)")
        self._began = True
        self._starting = True  # /livez: alive while it connects and waits for its slot
        try:
            halting = self._stop_task
            if halting is not None and not halting.done():  # its caller cancelled: it goes on
                await asyncio.wait([halting])  # and would close what this start opens
            if self._tasks:
                raise ConfigError(f"walex app {name!r} is already started")
            self._stopped.clear()
            self._stopping = self._halting = False
            self._error = None
            await self._wait_cut_off()
            self.pipeline.closing = False
            await self._open()
            if self._stopping:  # stop() came while it opened: stop() closes what it opened
                raise StoppedError(f"walex app {name!r} was stopped while start() opened its "
                                   "session")
        finally:
            self._starting = False
        _running[name] = self
        p = self.pipeline
        inside = contextvars.copy_context()  # the tasks' own: stop() knows its calls by it
        inside.run(_inside.set, self)
        self._interrupted = []
        inside.run(INTERRUPTED.set, self._interrupted)  # see walex.threads.cut_off_raised

        def spawn(coro: Any, role: str) -> asyncio.Task[None]:
            return asyncio.create_task(coro, name=f"walex-{name}-{role}", context=inside)

        self._tasks = [spawn(p.run_reader(), "reader"), spawn(p.run_dispatcher(), "dispatcher"),
                       spawn(p.run_acknowledger(), "ack")]
        if self.settings.heartbeat_interval:
            self._tasks.append(spawn(p.run_heartbeat(), "heartbeat"))
        if p.fence is not None:  # standby=True: handle only while holding the lock
            self._tasks.append(spawn(watch(p), "fence"))
        self._tasks.append(spawn(p.backfill.run(), "backfill"))
        for task in self._tasks:
            task.add_done_callback(self._task_done)
        self.observer.streaming()
        self._unreachable = {}
        self._warn_unreachable(p.preflight.published if p.preflight else None)
        self._gc_held = self.settings.gc_threshold
        gcpolicy.hold(self._gc_held)  # fewer full collections while rows stream
        if self.settings.gc_freeze:
            gc.freeze()  # what lives now (modules, settings, connections) is never garbage
        s = self.settings
        log.info(
            "walex %r streaming publication %r from %s via %s slot %r",
            name, s.publication, self.target,
            "durable" if s.durable_slot else "temporary", self.slot_name,
        )

    async def _wait_cut_off(self) -> None:
        """Before a start, wait for the calls the last stop() cut off that still run (a plain
        one on its thread, an async one ignoring its cancellation): the new calls would run
        beside them, the transaction they had in hand (not acknowledged, so delivered again)
        handled twice at once, and an old dispatcher loop could take batches again."""
        def left() -> list[str]:
            return ([t.get_name() for t in self._stuck if not t.done()]
                    or self.dispatcher.workers.lingering())

        running = left()
        if not running:
            return
        log.warning("walex %r: start() waits for handler calls cut off by the last stop() to "
                    "return (%s), so that none runs beside the new ones", self.settings.name,
                    ", ".join(running))
        while left() and not self._stopping:  # a stop() meanwhile ends the wait (and start)
            await asyncio.sleep(0.05)
        if self._stopping:
            raise StoppedError(f"walex app {self.settings.name!r} was stopped while start() "
                               "waited for the calls the last stop() cut off")
        # the done callbacks of a stuck task that ended just now run first (_task_done must
        # still find it among the stuck: else its end would stop the app being started;
        # seen in the suite, the poll and the task's end in one turn of the loop)
        await asyncio.sleep(0)
        self._stuck = []
        self._hold_ack()  # a stuck call that returned since recorded its transaction

    async def _open(self) -> None:
        """start()'s connections: the endpoint, the destinations, the first session."""
        await self.observer.start()  # before the slot: a standby answers /healthz too
        try:
            await self.destinations.open()
        except BaseException:
            await self.observer.stop()
            raise
        try:
            await first_session(self.pipeline)  # a standby retries what a reconnect cures
        except BaseException:
            await release(self.pipeline)
            await self.destinations.close()
            await self.observer.stop()
            raise

    async def stop(self) -> None:
        """Finish the batch in hand, acknowledge it, and disconnect.

        The batch being handled gets ``shutdown_grace`` seconds to finish; then
        its calls are cancelled (a plain function's thread cannot be stopped: it
        runs on until the function returns) and the log says so. Batches
        received but not started are not handled: a durable slot delivers them
        again at the next start.

        Called by the app's own handlers, functions or message middleware (or a
        task they started: it shares their context), it starts the stop and
        returns once the stop began (the stop waits for the call in hand, so
        the call cannot wait for the stop): the call goes on, and its
        transaction is acknowledged if it returns within the grace; a message
        middleware's reading is cancelled. A caller cancelled while awaiting
        stop() leaves it going on to its end.
        """
        if not self._stopping:
            self._stopping = True
            outside = contextvars.copy_context()  # not one of its tasks (see _inside)
            outside.run(_inside.set, None)
            halting = self._stop_task = asyncio.get_running_loop().create_task(
                self._halt(), name=f"walex-{self.settings.name}-stop", context=outside)
            halting.add_done_callback(self._stop_done)
        halting = self._stop_task
        assert halting is not None  # made with _stopping set
        if halting.done():  # stopped already (a failure of that stop was raised to its callers)
            return
        if _inside.get() is self:
            while not (self._halting or halting.done()):
                await asyncio.sleep(0)  # until the stop began: no batch starts after this one
            return
        # shielded: a caller cancelled (a timeout, a second Ctrl-C) leaves the stop going on
        self._stop_waiters += 1
        try:
            await asyncio.shield(halting)
        finally:
            self._stop_waiters -= 1

    async def _halt(self) -> None:
        """:meth:`stop`'s work, in a task of its own."""
        self._halting = True
        cut_off = False
        try:
            if not self._tasks:  # start() may be waiting as a standby: it raises StoppedError
                await stop_waiting(self.pipeline)
                while self._starting:  # or opening its session: it raises StoppedError then,
                    await asyncio.sleep(0.01)  # and what it opened is closed below
            if self._tasks:
                reader, dispatcher = self._tasks[0], self._tasks[1]
                reader.cancel()
                pipeline = self.pipeline
                pipeline.closing = True  # the dispatcher takes no batch after the one in hand
                pipeline.queue.interrupt()  # nor waits for one (a window may wait to drain)
                if pipeline.busy and not dispatcher.done():
                    await asyncio.wait([dispatcher], timeout=self.settings.shutdown_grace)
                    if not dispatcher.done():
                        cut_off = True
                        self._log_cut_off(pipeline.in_hand, bool(pipeline.window))
                        # what is acknowledged: not the call cut off, even if it returns
                        # (ignoring its cancellation) and its loop records it handled
                        self._ack_held = pipeline.ack.flushed
                for task in self._tasks:
                    task.cancel()
                _, stuck = await asyncio.wait(self._tasks, timeout=10)
                for task in stuck:
                    log.error("walex %r: task %s did not stop within 10s", self.settings.name,
                              task.get_name())
                self._stuck = list(stuck)
                self._hold_ack()
                if self._interrupted and self._error is None:  # wait() raises it
                    self._error = self._interrupted[0]
                self._tasks = []
                repl = self.pipeline.repl
                if repl is not None and repl.streaming:
                    try:
                        await self.pipeline.ack.send(repl)
                    except WalExError as exc:
                        log.warning("final acknowledgement not sent: %s", exc)
            if self._deferred_task is not None:
                self._deferred_task.cancel()
            self.pipeline.note_stop(self._error)
            left = self.pipeline.discard_unhandled()
            if left and self.settings.durable_slot:
                log.info("walex %r stopped with %d received batches not handled; the slot "
                         "delivers them again", self.settings.name, left)
            self.dispatcher.close(wait=not cut_off)
            await self.pipeline.close_session()
            # open (streamed) transactions: their spill files, unlinked, take disk until closed
            self.pipeline.assembler.reset()
            await release(self.pipeline)  # nothing is handled any more: a standby may go
            await self.destinations.close()
        finally:
            gcpolicy.release(self._gc_held)
            self._gc_held = 0
            await self.observer.stop()
            if _running.get(self.settings.name) is self:
                del _running[self.settings.name]
            self._stopped.set()

    def _hold_ack(self) -> None:
        """Take back what a call cut off by stop() had recorded handled after its cut-off
        (its loop went on when it ignored its cancellation): it is not acknowledged."""
        held = self._ack_held
        if held is None:
            return
        ack = self.pipeline.ack
        if ack.flushed > held:
            ack.flushed = held
        ack.after_flight = 0  # a keepalive's end past it would be acknowledged as idle
        if not self._stuck:
            self._ack_held = None

    def _stop_done(self, task: asyncio.Task[None]) -> None:
        """stop()'s work ended: an error of it no stop() call awaits (the caller cancelled,
        or one of the app's own calls) is logged."""
        if task.cancelled() or task.exception() is None or self._stop_waiters:
            return
        log.error("walex %r: stop() failed: %r", self.settings.name, task.exception(),
                  exc_info=task.exception())

    def _log_cut_off(self, txn: Any, windowed: bool = False) -> None:
        """Say that the batch in hand (or the oldest a destination has not confirmed) did not
        finish within the grace and is cancelled."""
        s = self.settings
        fate = ("a durable slot delivers it again at the next start" if s.durable_slot
                else "it is lost with the temporary slot")
        what = "handler call or destination publish" if windowed else "handler call"
        (log.warning if s.durable_slot else log.error)(
            "walex %r: %s cut off after shutdown_grace=%gs; the transaction committed at "
            "%s was not acknowledged (%s)", s.name, what, s.shutdown_grace,
            format_lsn(txn.commit_lsn), fate,
        )

    def _task_done(self, task: asyncio.Task[None], may_return: bool = False) -> None:
        """An internal task ended: unless :meth:`stop` ended it, the app stops with an error."""
        error: BaseException
        if task in self._stuck:  # cut off by the last stop(), which said so
            return
        if task.cancelled():
            if self._stopping:
                return
            error = WalExError(
                f"walex {self.settings.name!r}: internal task {task.get_name()} cancelled, "
                "not by stop(); the app stopped"
            )
        else:
            exc = task.exception()
            if exc is None:
                if self._stopping or may_return:
                    return
                error = WalExError(
                    f"walex {self.settings.name!r}: internal task {task.get_name()} returned "
                    "while the app was running; the app stopped"
                )
            else:
                error = exc
        if self._error is None:
            self._error = error
            log.error("walex %r stopped: %s", self.settings.name, error)
        if not self._stopping:
            asyncio.get_running_loop().create_task(self.stop())

    def _run_options(self) -> tuple[str | None, str | None]:
        return self.settings.loop, self.settings.secret()

    async def backfill(self, table: str, where: str | None = None) -> Any:
        """Deliver the existing rows of ``table`` (those matching the SQL condition
        ``where``) as ``read`` events, interleaved with the stream; returns the
        finished :class:`~walex.backfill.Job` once every one was handled (a handler
        awaiting it would wait for itself: start it as a task there)."""
        if not self._tasks or self._stopping:
            raise ConfigError(f"walex app {self.settings.name!r} is not running; start it "
                              "before asking for a backfill")
        return await self.pipeline.backfill.request(table, where)

    async def cancel_backfill(self, table: str) -> Any:
        """Cancel the pending or running backfill of ``table``: a running one stops before
        its next chunk (the rows already delivered stay delivered) and ``backfill()``
        awaiting it raises :class:`~walex.errors.BackfillCancelledError`. Returns the
        cancelled :class:`~walex.backfill.Job` once it stopped, ``None`` when no backfill
        of the table was under way."""
        if not self._tasks or self._stopping:
            raise ConfigError(f"walex app {self.settings.name!r} is not running; start it "
                              "before cancelling a backfill (or use walex backfill --cancel)")
        return await self.pipeline.backfill.cancel(table)

    # -- message middleware ----------------------------------------------

    async def process_message(self, message: Message) -> None:
        """Hand on a message a ``message_middleware`` received (in stream order, once)."""
        await self.pipeline.process(message, from_middleware=True)

    def process_message_nowait(self, message: Message) -> None:
        """Like :meth:`process_message`, from synchronous code; keeps the order."""
        self._deferred.append(message)
        if self._deferred_task is None or self._deferred_task.done():
            self._deferred_task = asyncio.get_running_loop().create_task(
                self._drain_deferred(), name=f"walex-{self.settings.name}-middleware"
            )
            self._deferred_task.add_done_callback(functools.partial(self._task_done, may_return=True))

    async def _drain_deferred(self) -> None:
        while self._deferred:
            await self.pipeline.process(self._deferred.popleft(), from_middleware=True)

    # -- runtime configuration (see walex.configs) -------------------------

    def _apply_settings(self, settings: WalExSettings) -> None:
        """Take new settings: subscriptions and modules apply from the next transaction.

        While running, an added subscription is checked against the database
        first, as start() checks it: a SetupError leaves the old settings.
        """
        modules = resolve_modules(settings.modules, settings.name, settings.subscriptions)
        added = [spec for spec in settings.subscriptions if spec not in self.settings.subscriptions]
        if self._tasks and added:
            check_subscriptions(settings, added)
        self.settings = settings
        self.modules = modules
        self.dispatcher.change_modules(modules)  # from the next transaction
        self.pipeline.settings = settings
        self.pipeline.secret = settings.secret()
        self.pipeline.set_subscriptions(settings.subscriptions)
        if self._tasks:
            self._warn_unreachable(None)

    def _warn_unreachable(self, published: set[tuple[str, str]] | None) -> None:
        """Warn once about each handler that cannot fire (until it can again)."""
        handlers = [h for module in self.modules for h in module.handlers]
        found = unreachable(handlers, self.settings.subscriptions, published)
        for handler, message in found:
            if id(handler) not in self._unreachable:
                log.warning("walex %r: %s", self.settings.name, message)
        self._unreachable = {id(h): h for h, _ in found}
