"""Workers: the handlers of an app, on many processes, fed by what a relay published.

A relay (``walex run`` with ``destinations`` and ``partitions``) publishes
every change to a broker; :class:`Worker` processes (``walex worker
SOURCE_URL package.module:obj``) consume it and call the same
:class:`~walex.Events` handlers with the same :class:`~walex.Event` objects
(:mod:`walex.destinations.decoding` types the values back).

The contract every source keeps (:mod:`walex.workers.base`):

- a partition's messages are handled in the order they were published, by
  one worker at a time, through the broker's own mechanism (a JetStream
  durable consumer per partition with ``max_ack_pending=1``; a RabbitMQ
  queue per partition with single active consumer), never a lock of ours;
  except a NATS source with ``prefetch`` > 1 (batches of up to ``prefetch``
  messages per partition): there a worker pulls and handles a partition only
  while it holds the partition's lease in a JetStream key-value bucket, which
  ends on this worker's side before the server can give it to another
  (:mod:`walex.workers.natslease`, :mod:`walex.workers.natsbatch`);
- a message is acknowledged to the broker only after the handlers it went
  to returned (or the error policy disposed of it), the messages received
  together once after the last call; what a worker received and did not
  acknowledge goes to another worker when it stops or dies;
- a call holds its partition's lease (:mod:`walex.workers.lease`): when the
  worker learns the broker may hand the partition to another worker (JetStream:
  before ``ack_wait`` runs out without a confirmed progress report; RabbitMQ:
  the connection or channel closed), the call is cancelled and nothing is
  acknowledged; :func:`current_lease` gives a call its fencing token;
- a worker creates no stream or exchange and checks at start that what the
  broker holds can feed it (the relay's partitions and subjects); a RabbitMQ
  group is declared up front (:func:`declare`, ``walex worker --declare``);
- so delivery is at-least-once: a worker killed after its handler returned
  and before the acknowledgement reached the broker leaves that event to be
  handled again, with the same ``event.id``. A worker drops an event it
  handled itself among its last 50,000 (a relay's replay, a redelivery after
  a reconnect).

What a handler receives: a list of events of one transaction and one
partition, in order, filtered like in-process (table, types,
``unwatched_records``, ``where`` ...): the consecutive messages of one
transaction that the broker has delivered at once (NATS: one message per
call, as ``max_ack_pending=1`` lets one out at a time, or up to ``prefetch``
with the URL's ``prefetch``; RabbitMQ: up to ``prefetch``); a ``max_batch``
handler gets the consecutive transactions received together in calls of at
most ``max_batch`` (with ``concurrency`` 1: the dispatcher keeps their
events between calls). A transaction's rows in other partitions go to other
calls, maybe on other workers. The error policy is the app's:
``max_retries`` with backoff, then ``"stop"`` (the worker stops with the
error and its messages go back to the broker, so another worker tries them),
``"skip"`` or a dead-letter callable (the message is acknowledged after it
returned). A message that is not a walex event is such a failure too.

Calls run one at a time per worker by default (``concurrency``), so a
handler written for an in-process app, which never runs twice at once, runs
unchanged; scale out with processes. With a ``max_batch`` handler they always
run one at a time (the events such a handler keeps between calls belong to
one lane's acknowledgement). Redis Streams is a destination only:
a consumer group hands entries to whichever consumer asks, and the entries
a dead consumer held are claimed by another while newer entries of the same
rows are being handled, so per-row order cannot be kept.

``metrics_port`` (and ``metrics_host``) serve the worker's Prometheus
metrics, ``/healthz`` and ``/livez`` as an app's do (:mod:`walex.observe.workers`;
needs ``walex[metrics]``).

This module holds the worker's configuration and lifecycle (connect,
reconnect, stop); the lanes' loop and each call's steps, up to the
acknowledgement, are :mod:`walex.workers.calls`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .. import gcpolicy
from ..destinations import SCHEMES, load_class
from ..destinations.base import DestinationURL, Unavailable, backoff
from ..destinations.decoding import Decoder
from ..dispatch import Dispatcher
from ..errors import ConfigError
from ..lifecycle import Lifecycle, check_loop
from ..modules import import_object, resolve_modules
from ..observe import require_extra
from ..observe.workers import WorkerObserver, WorkerStats
from .base import Consumer, Lane
from .calls import Calls
from .gate import Gate
from .lease import Lease, LeaseLost, current_lease

__all__ = ["Lease", "LeaseLost", "Worker", "consumer_from_url", "current_lease", "declare"]

log = logging.getLogger("walex.workers")

# why the schemes without a consumer (walex.destinations.SCHEMES) cannot be sources
_NOT_A_SOURCE = {
    "redis": "Redis Streams is supported as a destination only: a consumer group hands each "
             "entry to whichever consumer reads next, and the entries a stopped or killed consumer "
             "held are claimed (XAUTOCLAIM) by another while newer entries of the same rows are "
             "handled elsewhere, so per-row order cannot be kept. Read the stream with one "
             "consumer (XREAD), or publish to NATS JetStream (nats://) or RabbitMQ (amqp://) "
             "for workers",
    "http": "a webhook is a destination only: it pushes to your endpoint; give workers a "
            "NATS JetStream (nats://) or RabbitMQ (amqp://) URL",
}
_NOT_A_SOURCE["rediss"] = _NOT_A_SOURCE["redis"]
_NOT_A_SOURCE["https"] = _NOT_A_SOURCE["http"]


def consumer_from_url(url: str) -> Consumer:
    """The source a URL names, picked by its scheme; nothing is connected yet."""
    parsed = DestinationURL(url)
    scheme = SCHEMES.get(parsed.scheme)
    if scheme is None:
        raise ConfigError(f"worker source {parsed.display}: unknown scheme {parsed.scheme!r}; use "
                          "nats:// (JetStream), amqp:// (RabbitMQ) or kafka://")
    if scheme.consumer is None:
        reason = _NOT_A_SOURCE.get(parsed.scheme, "it is a destination only; use nats:// "
                                                  "(JetStream) or amqp:// (RabbitMQ)")
        raise ConfigError(f"worker source {parsed.display}: {reason}")
    cls = load_class(__name__, scheme, scheme.consumer, f"worker source {parsed.display}")
    consumer: Consumer = cls(parsed)
    return consumer


async def declare(source_url: str) -> None:
    """Declare a worker group on the broker before the relay publishes (or before its
    workers start): the stream or exchange as the relay creates it, and the group's
    consumers (JetStream) or queues (RabbitMQ, where a group must be declared: a worker
    does not create its group's queues, see the module's doc)."""
    await consumer_from_url(source_url).declare()


def _policy(on_error: Any) -> Any:
    if on_error in ("stop", "skip") or callable(on_error):
        return on_error
    if isinstance(on_error, str) and ":" in on_error:
        found = import_object(on_error)
        if callable(found):
            return found
    raise ConfigError(f"on_error must be 'stop', 'skip' or a dead-letter callable(events, "
                      f"exception) (or its import string 'package.module:function'), got {on_error!r}")


class Worker(Calls, Lifecycle):
    """Handle what a relay published to ``source_url`` with the handlers of ``modules``.

    ``modules``: :class:`~walex.Events` objects or import strings, as for
    :class:`~walex.WalEx`; :meth:`for_app` takes an app's modules and error
    policy. ``types``: see :class:`~walex.destinations.decoding.Decoder`.
    ``loop``: the event loop :meth:`run` creates, as the app option of that
    name (:mod:`walex.lifecycle`); ``None`` takes ``WALEX_LOOP``, else ``"auto"``.
    ``metrics_port``, ``metrics_host``: serve ``/metrics``, ``/healthz`` and
    ``/livez`` (:mod:`walex.observe.workers`; needs ``walex[metrics]``; ``0``
    picks a free port, ``worker.observer.port``).
    ``gc_threshold``: the cyclic GC's generation-0 threshold is at least this while the
    worker runs, as an app's setting of that name (:mod:`walex.gcpolicy`; ``0`` leaves
    the GC alone): each event's objects are then mostly freed before a young collection
    walks them.
    ``wait()``, ``async with`` and ``run()`` come from
    :class:`~walex.lifecycle.Lifecycle`.
    """

    poll = 1.0  # seconds a lane waits for messages before it looks at stop()
    remember = 50_000  # ids of the last events handled, to drop what comes again
    ack_interval = 10.0  # seconds: within a batch of slow calls, acknowledge what is handled

    def __init__(
        self,
        source_url: str,
        modules: Iterable[Any] = (),
        *,
        name: str = "walex-worker",
        on_error: Any = "stop",
        max_retries: int = 3,
        retry_backoff: float = 0.5,
        function_concurrency: int = 16,
        concurrency: int = 1,
        shutdown_grace: float = 30.0,
        types: Mapping[str, Callable[[Any], Any]] | None = None,
        loop: str | None = None,
        metrics_port: int | None = None,
        metrics_host: str = "0.0.0.0",
        gc_threshold: int = 100_000,
    ) -> None:
        for option, value, minimum in (("max_retries", max_retries, 0), ("concurrency", concurrency, 1),
                                       ("function_concurrency", function_concurrency, 1),
                                       ("gc_threshold", gc_threshold, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ConfigError(f"{option} must be an integer >= {minimum}, got {value!r}")
        for option, number in (("retry_backoff", retry_backoff), ("shutdown_grace", shutdown_grace)):
            if not isinstance(number, (int, float)) or number < 0:
                raise ConfigError(f"{option} must be a number >= 0, got {number!r}")
        if metrics_port is not None:
            if not isinstance(metrics_port, int) or isinstance(metrics_port, bool) or \
                    not 0 <= metrics_port <= 65535:
                raise ConfigError(f"metrics_port must be a port number from 0 to 65535, "
                                  f"got {metrics_port!r}")
            require_extra("metrics_port")
        self.name = name
        self.loop = check_loop(loop)  # run()'s event loop: None takes WALEX_LOOP, else "auto"
        self.consumer = consumer_from_url(source_url)
        self.modules = resolve_modules(modules, name, ())
        if not any(module.handlers for module in self.modules):
            raise ConfigError(f"worker {name!r} has no handler: give modules with handlers "
                              "(walex.Events) or an app that has them")
        self.dispatcher = Dispatcher(
            self.modules, function_concurrency=function_concurrency, on_error=_policy(on_error),
            max_retries=max_retries, retry_backoff=retry_backoff, name=name,
        )
        self.decoder = Decoder(types)
        self.concurrency = concurrency
        self.shutdown_grace = shutdown_grace
        self.gc_threshold = gc_threshold
        self._gc_held = 0  # the gc_threshold held while running (walex.gcpolicy)
        # how many calls run at once. One with a max_batch handler: the dispatcher keeps such
        # a handler's events that do not fill a call until the end of the dispatch, so
        # another lane's call at once would take them into its own and this one's messages
        # be acknowledged before that call returned
        if self.dispatcher.batching and concurrency > 1:
            log.warning("worker %r: concurrency=%d, and a handler has max_batch: its calls run "
                        "one at a time (a max_batch handler's kept events go to one lane's "
                        "acknowledgement only)", name, concurrency)
        self._slots = Gate(1 if self.dispatcher.batching else concurrency)
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()  # (db, id) handled here
        self._task: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self._closing = False
        self._error: BaseException | None = None
        self.events_handled = 0
        self.duplicates = 0  # events dropped as already handled by this worker
        self.redeliveries = 0  # messages the broker delivered again
        self.reconnects = 0  # connections to the broker lost and opened again
        self.undecodable = 0  # messages that were not walex events
        self.fenced = 0  # calls cut off (not acknowledged) as the worker lost their partition
        self.connected = False  # consuming: connected, the partitions subscribed
        self.stats: WorkerStats | None = WorkerStats() if metrics_port is not None else None
        self.observer = WorkerObserver(self, metrics_port, metrics_host)

    @classmethod
    def for_app(cls, source_url: str, app: Any, **options: Any) -> Worker:
        """A worker with the handler modules and error policy of a :class:`~walex.WalEx`."""
        s = app.settings
        values: dict[str, Any] = {
            "name": s.name, "on_error": s.on_error, "max_retries": s.max_retries,
            "retry_backoff": s.retry_backoff, "function_concurrency": s.function_concurrency,
            "shutdown_grace": s.shutdown_grace, "loop": s.loop, "gc_threshold": s.gc_threshold,
        }
        values.update(options)
        return cls(source_url, app.modules, **values)

    def __repr__(self) -> str:
        return f"<Worker {self.name!r} {self.consumer.display} group={self.consumer.group!r}>"

    @property
    def secrets(self) -> list[str]:
        """What log output must not show (the source URL's password)."""
        return list(self.consumer.url.secrets)

    # -- lifecycle -------------------------------------------------------

    async def start(self) -> None:
        """Connect and start handling; a broker that cannot be reached is retried meanwhile.

        Raises :class:`~walex.errors.ConfigError` when what exists on the
        broker cannot keep the order (a consumer or queue set up otherwise) or
        cannot feed this worker (no stream or exchange, a RabbitMQ group not
        declared, the relay's partitions not the worker's).
        """
        if self._task is not None:
            raise ConfigError(f"worker {self.name!r} is already started")
        self._closing = False
        self._began = True
        self._error = None
        self._stopped.clear()
        lanes: list[Lane] | None = None
        self._gc_held = self.gc_threshold
        gcpolicy.hold(self._gc_held)  # fewer young collections while events stream
        try:
            await self.observer.start()  # before connecting: /livez answers meanwhile
            lanes = await self.consumer.open()
        except Unavailable as exc:
            log.warning("worker %r: %s is unreachable (%s); trying again", self.name,
                        self.consumer.display, exc)
        except BaseException:
            gcpolicy.release(self._gc_held)
            self._gc_held = 0
            self._stopped.set()  # never started: wait() does not hang
            await self.observer.stop()
            raise
        self._task = asyncio.create_task(self._run(lanes), name=f"walex-worker-{self.name}")
        self._task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None and self._error is None:
            self._error = task.exception()
            log.error("worker %r stopped: %s", self.name, self._error)
        if not self._closing:
            asyncio.get_running_loop().create_task(self.stop())

    async def _run(self, lanes: list[Lane] | None) -> None:
        """Run the lanes; reconnect when the connection is lost, until stop()."""
        attempt = 0
        while not self._closing:
            if lanes is None:
                try:
                    lanes = await self.consumer.open()
                except Unavailable as exc:
                    delay = backoff(attempt)
                    attempt += 1
                    log.warning("worker %r: %s is unreachable (%s); trying again in %.1fs",
                                self.name, self.consumer.display, exc, delay)
                    await asyncio.sleep(delay)
                    continue
                if attempt:
                    log.warning("worker %r: %s is back", self.name, self.consumer.display)
                attempt = 0
            tasks = [asyncio.create_task(self._lane(lane), name=f"walex-worker-{self.name}-p{lane.partition}")
                     for lane in lanes]
            self.connected = True
            try:
                await asyncio.gather(*tasks)
            except Unavailable as exc:
                self.reconnects += 1
                log.warning("worker %r: lost %s (%s); reconnecting; what was not acknowledged "
                            "is delivered again", self.name, self.consumer.display, exc)
            finally:
                self.connected = False
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await self.consumer.close()
            lanes = None

    async def stop(self) -> None:
        """Finish the calls in hand (within ``shutdown_grace``), give back the rest, disconnect."""
        if self._closing:
            await self._stopped.wait()
            return
        self._closing = True
        try:
            task = self._task
            if task is not None and not task.done():
                await asyncio.wait([task], timeout=self.shutdown_grace + self.poll + 1)
                if not task.done():
                    log.warning("worker %r: a handler call was cut off after shutdown_grace=%gs; "
                                "its messages go back to the broker", self.name, self.shutdown_grace)
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            await self.consumer.close()
            self.dispatcher.close(wait=task is None or not task.cancelled())
        finally:
            self._task = None
            gcpolicy.release(self._gc_held)
            self._gc_held = 0
            await self.observer.stop()
            self._stopped.set()

    def _run_options(self) -> tuple[str | None, str | None]:
        return self.loop, self.secrets[0] if self.secrets else None
