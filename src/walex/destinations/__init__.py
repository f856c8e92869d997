"""Destinations: the changes of each transaction published to brokers and webhooks.

An app given ``destinations=[url, ...]`` publishes every event of every
subscribed table to each of them, as a CloudEvents 1.0 JSON document
(:mod:`walex.destinations.encoding`), alongside its handlers. The events of a
table no handler takes come as :class:`~walex.rawevent.RawEvent` s, rows as
PostgreSQL sent them, and their documents are written from that text
(:mod:`walex.destinations.direct`): the same bytes as from typed rows.

The contract every destination keeps (:class:`~walex.destinations.base.Destination`):

- ``open()`` connects, creating what it needs when missing (a JetStream
  stream, an exchange);
- ``publish(batch)`` sends the encoded events of one transaction batch in
  order and returns only when the broker confirmed every one durable
  (JetStream PubAck, AMQP publisher confirm, the reply to ``XADD``, a 2xx
  answer); if it cannot tell, it raises and the whole batch is published
  again, so delivery is at-least-once;
- ``close()`` releases the connection.

Events are published in commit order, one transaction batch after the other,
so each destination receives a table's (with ``partitions``, a partition's)
changes in order. With a window above 1 (``destination_window``, ``window=``
in a URL) the next batches are published before the previous ones are
confirmed, in order, by one lane per destination
(:mod:`walex.destinations.window`); the acknowledgement still waits. A replay after a crash carries the same ``event.id``, which
the brokers that can deduplicate are given as the message id (NATS
``Nats-Msg-Id``, AMQP ``message_id``, ``webhook-id``); a consumer drops what
is left by id.

The acknowledgement rule: a transaction is acknowledged to PostgreSQL only
after every handler returned and every destination confirmed it
(:class:`Destinations` is awaited like a handler). A broker that is down is
retried with backoff, forever, logging a warning with its redacted URL: no
event is dropped, nothing is acknowledged early, and walex resumes when the
broker is back. A permanent refusal (:class:`~walex.errors.DestinationError`:
a webhook answering 4xx, a message the broker will never take) goes to the
app's ``on_error`` policy through :attr:`Destinations.refused`: under
``"stop"`` (the default) it stops the app unacknowledged; under ``"skip"`` or
a dead-letter callable that destination's batch is settled as a failed
handler call's would be, and the stream goes on. A refusal that may pass
(a full NATS stream with ``discard=new``) raises ``Unavailable`` with
``attempts``: retried that many times, then settled as a permanent one.
Misconfiguration no retry cures (wrong credentials, a missing vhost) is a
:class:`~walex.errors.ConfigError` from ``open()``: it stops the app at start
or on a reconnect. :meth:`Destinations.trouble` tells ``/healthz`` when a
destination has failed every attempt for longer than ``unhealthy_after``.

One module per broker (``nats``, ``rabbitmq``, ``redis``, ``webhook``), each
importing its client only when a URL of its scheme is used; another broker
(Kafka, say) is one more module and one line in :data:`SCHEMES`, the table
:mod:`walex.workers` picks its sources from too.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, DestinationError
from ..event import Event
from .base import Destination, DestinationURL, Unavailable, backoff
from .encoding import Outgoing, encode

__all__ = ["Destination", "Destinations", "SCHEMES", "Scheme", "from_url", "check_url", "load_class"]

log = logging.getLogger("walex.destinations")


@dataclass(frozen=True, slots=True)
class Scheme:
    """The walex modules of one URL scheme, imported only when a URL of it is used."""

    module: str  # walex.destinations.<module>, and walex.workers.<module> for a source
    destination: str  # its Destination class
    consumer: str | None  # its worker Consumer class (walex.workers); None: a destination only
    extra: str  # the pip extra installing the client
    client: str  # the client package


_NATS = Scheme("nats", "NatsDestination", "NatsConsumer", "nats", "nats-py")
_RABBITMQ = Scheme("rabbitmq", "RabbitMQDestination", "RabbitMQConsumer", "rabbitmq", "aio-pika")
_REDIS = Scheme("redis", "RedisDestination", None, "redis", "redis")
_WEBHOOK = Scheme("webhook", "WebhookDestination", None, "webhooks", "httpx")

# the one table of schemes, for destinations and worker sources
SCHEMES: dict[str, Scheme] = {
    "nats": _NATS, "tls": _NATS, "amqp": _RABBITMQ, "amqps": _RABBITMQ,
    "redis": _REDIS, "rediss": _REDIS, "http": _WEBHOOK, "https": _WEBHOOK,
    "kafka": Scheme("kafka", "KafkaDestination", "KafkaConsumer", "kafka", "confluent-kafka"),
}


def load_class(package: str, scheme: Scheme, name: str, what: str) -> Any:
    """The class ``name`` of ``package``'s module for ``scheme``, its client imported now.

    A client that is not installed is a :class:`~walex.errors.ConfigError`
    naming the pip extra; ``what`` says what needs it (``destination URL``).
    """
    try:
        module = importlib.import_module(f"{package}.{scheme.module}")
    except ModuleNotFoundError as exc:
        if exc.name and not exc.name.startswith("walex"):
            raise ConfigError(f"{what} needs the {scheme.client} client, which is not installed: "
                              f"pip install 'walex[{scheme.extra}]'") from None
        raise
    return getattr(module, name)


def from_url(url: str, partitions: int = 1) -> Destination:
    """The destination a URL names, picked by its scheme; nothing is connected yet.

    ``window=N`` in any URL is the destination's window of unconfirmed
    transactions (:mod:`walex.destinations.window`), taken out before the
    broker's module reads its parameters."""
    parsed = DestinationURL(url)
    window = parsed.take_int("window", None, minimum=1)
    scheme = SCHEMES.get(parsed.scheme)
    if scheme is None:
        raise ConfigError(
            f"destination {parsed.display}: unknown scheme {parsed.scheme!r}; use nats://, "
            "amqp:// (RabbitMQ), redis://, https:// (webhooks) or kafka://"
        )
    cls = load_class(__name__, scheme, scheme.destination, f"destination {parsed.display}")
    destination: Destination = cls(parsed, partitions)
    destination.window = window
    return destination


def check_url(url: str) -> None:
    """Raise :class:`~walex.errors.ConfigError` if ``url`` is not a usable destination."""
    from_url(url)


async def _all(calls: Iterable[Awaitable[None]]) -> None:
    """Await every call; the first failure cancels the others and is raised."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    if len(tasks) == 1:
        await tasks[0]
        return
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


class Destinations:
    """The destinations of one app, published to together and retried until durable."""

    def __init__(self, urls: Iterable[str], partitions: int = 1, window: int = 1) -> None:
        self.partitions = partitions
        self.items: list[Destination] = [from_url(url, partitions) for url in urls]
        # unconfirmed transactions per destination (a URL's window= wins); above 1 the
        # dispatcher pipelines through walex.destinations.window
        self.window = window
        # most bytes of encoded messages a window holds unconfirmed (the app sets it from
        # max_pending_bytes); one batch alone may exceed it
        self.held_bytes = 16 * 1024 * 1024
        self.events_published = 0
        self.retries = 0  # publish attempts that failed and were retried
        self.refusals = 0  # batches a destination refused for good, settled by the policy
        self.stats: Any = None  # walex.observe.Stats: publish counts, seconds, spans
        # what a permanent refusal becomes: None raises it (the app stops); the app sets
        # its error policy here (Dispatcher.settle), which raises under "stop"
        self.refused: Callable[[str, Exception, list[Event]], Awaitable[None]] | None = None
        # display -> (since when, why) of each destination that failed its last attempt
        self.failing: dict[str, tuple[float, str]] = {}
        self.unhealthy_after = 30.0  # seconds of failed attempts before /healthz says so

    def __bool__(self) -> bool:
        return bool(self.items)

    @property
    def pipelined(self) -> bool:
        """Whether a destination's window holds more than one transaction."""
        return any((d.window or self.window) > 1 for d in self.items)

    def lanes(self, record: Callable[[Any], None]) -> Any:
        """The :class:`~walex.destinations.window.Window` of these destinations; ``record(txns)``
        is called with the batches every lane and the handlers finished, in order."""
        from .window import Window

        return Window(self, record)

    def __repr__(self) -> str:
        return f"<Destinations {[d.display for d in self.items]}>"

    async def open(self) -> None:
        """Connect each destination; one that is unreachable now is retried when used.

        Misconfiguration no retry cures (wrong credentials, a missing vhost) raises
        :class:`~walex.errors.ConfigError`, every destination closed.
        """
        try:
            await _all(self._open(d) for d in self.items)
        except BaseException:
            await self.close()
            raise

    async def _open(self, destination: Destination) -> None:
        try:
            await destination.open()
        except Unavailable as exc:
            log.warning("destination %s is unreachable: %s; walex keeps trying and "
                        "acknowledges nothing until it is back", destination.display, exc)
            await self._close(destination)

    @staticmethod
    async def _close(destination: Destination) -> None:
        """Close a broken connection; a broker that does not answer cannot hold it up."""
        try:
            await asyncio.wait_for(destination.close(), timeout=5)
        except (Exception, TimeoutError):
            log.debug("closing %s took too long or failed", destination.display)

    async def publish(self, events: list[Event]) -> None:
        """Publish one transaction batch to every destination; returns when all are durable
        (or a refusal was settled by :attr:`refused`)."""
        if not events or not self.items:
            return
        batch = encode(events, self.partitions)
        await _all(self._deliver(d, batch, events) for d in self.items)
        self.events_published += len(batch)

    async def _deliver(self, destination: Destination, batch: list[Outgoing],
                       events: list[Event] | None, settle: bool = True) -> bool:
        """Publish ``batch`` until confirmed (True); a permanent refusal is settled by
        :attr:`refused` (True), or with ``settle=False`` left to the caller (False)."""
        attempt = 0
        while True:
            stats = self.stats
            started = time.perf_counter()
            try:
                if not destination.opened:
                    await destination.open()
                tracer = stats.tracer if stats is not None else None
                if tracer is None:
                    await destination.publish(batch)
                else:
                    with tracer.publish(destination.scheme, destination.display, len(batch)):
                        await destination.publish(batch)
            except DestinationError as exc:
                self._failed(destination, exc)
                if settle and self.refused is None:
                    raise
                if stats is not None:
                    stats.record_publish(destination.display, len(batch),
                                         time.perf_counter() - started, ok=False)
                if not settle:
                    return False  # the lane publishes the group's transactions one at a time
                assert events is not None
                await self._refuse(destination, exc, events)  # raises under "stop"
                return True
            except Unavailable as exc:
                self._failed(destination, exc)
                if stats is not None:
                    stats.record_publish(destination.display, len(batch),
                                         time.perf_counter() - started, ok=False)
                if exc.attempts is not None and attempt + 1 >= exc.attempts:
                    refusal = DestinationError(
                        f"destination {destination.display}: {exc} (still refused after "
                        f"{attempt + 1} attempts)")
                    if settle and self.refused is None:
                        raise refusal from None
                    if not settle:
                        return False  # the lane publishes the group's transactions one at a time
                    assert events is not None
                    await self._refuse(destination, refusal, events)  # raises under "stop"
                    return True
                delay = max(backoff(attempt), min(exc.retry_after or 0.0, 600.0))
                attempt += 1
                self.retries += 1
                log.warning(
                    "destination %s: %s; publishing the batch of %d events (from %s) again in "
                    "%.1fs (attempt %d); nothing is acknowledged to PostgreSQL meanwhile",
                    destination.display, exc, len(batch), batch[0].id, delay, attempt,
                )
                await self._close(destination)
                await asyncio.sleep(delay)
                continue
            if stats is not None:
                stats.record_publish(destination.display, len(batch), time.perf_counter() - started)
            self.failing.pop(destination.display, None)
            if attempt:
                log.warning("destination %s is back: the batch from %s is published after %d "
                            "retries", destination.display, batch[0].id, attempt)
            return True

    async def _refuse(self, destination: Destination, exc: DestinationError,
                      events: list[Event]) -> None:
        """Settle a refusal for good with the app's policy (which raises under "stop")."""
        assert self.refused is not None
        await self.refused(f"destination {destination.display} refused the batch", exc, events)
        self.refusals += 1
        self.failing.pop(destination.display, None)  # settled: the destination goes on

    def _failed(self, destination: Destination, exc: Exception) -> None:
        since, _why = self.failing.get(destination.display, (time.monotonic(), ""))
        self.failing[destination.display] = (since, str(exc))

    def trouble(self) -> str | None:
        """Why the app is unhealthy for its destinations: one has failed every attempt
        for longer than :attr:`unhealthy_after` seconds (None: all deliver)."""
        now = time.monotonic()
        for display, (since, why) in self.failing.items():
            if now - since >= self.unhealthy_after:
                return (f"destination {display} has not delivered for {now - since:.0f}s: {why}; "
                        "nothing is acknowledged to PostgreSQL meanwhile")
        return None

    async def alongside(self, txn: Any, dispatch: Callable[[Any], Awaitable[None]]) -> None:
        """``dispatch(txn)`` to the handlers while the batch is published; returns when both did."""
        if not txn.events:
            await dispatch(txn)
            return
        publishing = asyncio.ensure_future(self.publish(txn.events))
        try:
            await dispatch(txn)
        except BaseException:
            publishing.cancel()
            await asyncio.gather(publishing, return_exceptions=True)
            raise
        await publishing

    async def close(self) -> None:
        await asyncio.gather(*(self._close(d) for d in self.items))
