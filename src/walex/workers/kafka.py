"""Kafka source: ``kafka://host:9092?topic=walex.{schema}.{table}&group=NAME``.

The relay's destination URL, plus ``group`` (the Kafka consumer group,
default ``walex``) and ``start`` (where a group without committed offsets
begins: ``earliest``, the default, the oldest record the topic keeps, or
``latest``). Other parameters are librdkafka settings, as for the
destination (``session.timeout.ms=6000`` makes a dead worker's partitions
move sooner). ``partitions`` is not used: Kafka's own partitions are.

The workers of a group share the topic's partitions through Kafka's group
protocol (a topic template with fields is a pattern subscription:
``^walex\\..+\\..+``; new topics are seen within
``topic.metadata.refresh.interval.ms``, 10 s unless set). A worker hands a
partition's records to its handlers in order, one partition's consecutive
records of one transaction per call, and commits a partition's offset only
past records whose handlers returned (or that the error policy disposed of),
so a record is never counted as done before its handler returned. A record
stored again (a publish the relay could not confirm, produced again: the same
``ce_id``) is left out of the call that has it already, so a call holds each
event once; one that comes in a later call is dropped as handled already.
The commits go out every half second, asynchronously; an offset counts as
committed only once the broker confirmed it (librdkafka's answer, read on the
consumer's thread): one it refused is committed again by the next commit (and
by the one a rebalance or close makes synchronously) and said in a WARNING,
once until a commit succeeds again.

When partitions move (a worker joined, left or died), a worker giving up a
partition first waits for the handler call in hand for it to return,
commits what was done and drops what it had received and not handed out:
the new owner starts after the last committed record, so a partition is
handled by one worker at a time and per-key order holds. The group waits
``max.poll.interval.ms`` (its rebalance timeout, 300 s unless set) for a
worker to give its partitions up: a call that has not returned after a
third of it (60 s at most) is cancelled, as when a partition is lost
(below), nothing of it is committed, and the worker waits as long again for
it to end before it lets the partitions go; only that call is cut off: the
worker stays in the group and goes on with the partitions it holds or is
given next (its records come again, with the same ``event.id``). A plain
handler runs on a thread and cannot be cancelled: as with the other
sources, its lease says lost (``current_lease().check()`` raises
:class:`~walex.workers.LeaseLost`: call it before the effect, or keep the
lease's fencing token with it), and the worker lets the partitions go only
once it returned. A call that still runs when the second wait ends (a plain
handler blocking its thread, an async one that catches ``CancelledError``
or blocks the event loop) ends the worker process, with a CRITICAL log
naming the partitions and the fix and the exit code
:data:`~walex.workers.kafkasession.STUCK_EXIT` (70): nothing else can stop
it, and the group would hand its partitions to another worker while it
runs. A
worker that was killed leaves its partitions to the group after
``session.timeout.ms``; the records it had handled and not committed are
handled again, with the same ``event.id``.

Every request of the worker gives up after ``timeout`` (``socket.timeout.ms``
and ``socket.connection.setup.timeout.ms`` default to it), so a broker that
stops answering without closing its connections is an error too. A broker
error (librdkafka reconnects by itself) makes the worker ask the
brokers for metadata each second until they answer: none for ``timeout``
seconds and the worker reconnects, as for the other sources (a warning,
``/healthz`` ``reconnecting`` until they are back). An error the client hands
over as a record of a topic or partition (the topic does not exist or was
deleted, the broker refuses the read, records it cannot decompress: error 76
UNSUPPORTED_COMPRESSION_TYPE) keeps that partition from being read while it
lasts: one WARNING names the topic, partition, error and fix, and
``/healthz`` answers 503 ``stalled`` with it, until the partition is assigned
again or its records come (an INFO says so).

A worker that learns it lost partitions without giving them up (it missed
its session: the group gave them away already) cancels the call in hand, as
the other sources do (:func:`walex.workers.current_lease`; the lease's
``partition`` is the record's Kafka partition), commits nothing of it and
goes on with its other partitions (librdkafka joins the group again).
``walex worker --declare`` has nothing to create on Kafka: it checks that
the brokers answer and take the login.

The consumer runs on a thread of its own (librdkafka's rebalance callbacks
run there: :mod:`walex.workers.kafkasession`); the event loop only exchanges
records and offsets with it. Each
connection's thread and callbacks carry its session: one that outlives
``close()`` (a broker that does not answer its leaving) touches nothing of
the next connection's partitions, offsets or state.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import Any

from confluent_kafka import Consumer as KafkaClient
from confluent_kafka import KafkaException

from ..destinations.base import DestinationURL, Unavailable
from ..destinations.kafka import OWN, KafkaDestination, client_settings, validate
from ..errors import ConfigError
from .base import Consumer, Delivery, Lane
from .kafkasession import TP, KafkaSession

__all__ = ["KafkaConsumer"]

log = logging.getLogger("walex.workers")

_FIXED = frozenset({"bootstrap.servers", "group.id", "enable.auto.commit",
                    "enable.auto.offset.store", "auto.offset.reset"})

def topic_pattern(text: str) -> str:
    """A topic template as a subscription: the topic itself, or a regular expression."""
    parts = text.replace("{{", "\0").replace("}}", "\1").split("{")
    if len(parts) == 1:
        return text.replace("\0", "{").replace("\1", "}")
    out = ["^"]
    for i, part in enumerate(parts):
        literal = part.split("}", 1)[1] if i else part
        out.append(literal.replace(".", "\\.").replace("\0", "\\{").replace("\1", "\\}"))
        if i + 1 < len(parts):
            out.append(".+")
    return "".join(out) + "$"


class KafkaLane(Lane):
    """Every partition the worker is assigned, handed out one partition's records at a time."""

    def __init__(self, consumer: KafkaConsumer) -> None:
        super().__init__(0)
        self.consumer = consumer
        self.holding: TP | None = None  # the partition of the records handed out, until settled
        self.last: Delivery | None = None  # the last of them
        self.stalls = consumer.stalls  # the consumer's stalls when they were handed out

    def stale(self) -> str | None:
        """The consumer thread stalled (the process frozen?) since the records in hand were
        handed out, or is stalled now, for most of the group's session timeout: the group
        may have given their partition to another worker already."""
        c = self.consumer
        if c.stalls != self.stalls:
            return c.stall_reason
        gap = time.monotonic() - c.ticked
        if gap > c.stale_after and c.thread is not None:
            return (f"the Kafka consumer has not run for {gap:.1f}s (the process frozen?): the "
                    "group may have given the partition to another worker (session.timeout.ms)")
        return None

    def cut_partitions(self, keys: set[TP], reason: str) -> None:
        """Partitions that go to another worker: the call in hand is cut off if it holds one
        of them (:meth:`~walex.workers.base.Lane.cut`); the calls of the others go on."""
        if self.holding in keys:
            self.cut(reason)

    async def receive(self, wait: float) -> list[Delivery]:
        c = self.consumer
        deadline = time.monotonic() + wait
        while True:
            c.check()
            taken = c.take()
            if taken:
                # the lease of the call (walex.workers.current_lease) names its Kafka partition
                self.holding, self.last = taken[0].handle[0], taken[-1]
                self.stalls = c.stalls
                self.partition = self.holding[1]
                return taken
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            c.ready.clear()
            try:
                await asyncio.wait_for(c.ready.wait(), left)
            except TimeoutError:
                pass

    async def ack(self, deliveries: list[Delivery]) -> None:
        if deliveries and deliveries[-1] is self.last:  # all of them handled
            self.holding = None
        self.consumer.settle(deliveries, handled=True)

    async def release(self, deliveries: list[Delivery]) -> None:
        self.holding = None
        self.consumer.settle(deliveries, handled=False)


class KafkaConsumer(KafkaSession, Consumer):
    scheme = "kafka"
    destination_class = KafkaDestination
    accepted = ("start",)
    destination: KafkaDestination

    def take_options(self, url: DestinationURL) -> None:
        start = url.take("start", "earliest")
        if start not in ("earliest", "latest"):
            raise ConfigError(f"worker source {url.display}: start must be earliest or latest, "
                              f"got {start!r}")
        self.start = start
        self.client_settings = client_settings(url, "worker source", keep=OWN,
                                               fixed=_FIXED | {"acks", "enable.idempotence"})

    def __init__(self, url: DestinationURL) -> None:
        super().__init__(url)
        self.subscription = topic_pattern(self.destination.topic.text)
        self.timeout = self.destination.timeout
        settings = self.client_settings
        settings.update({"group.id": self.group, "enable.auto.commit": False,
                         "enable.auto.offset.store": False, "auto.offset.reset": self.start})
        if self.subscription.startswith("^"):
            settings.setdefault("topic.metadata.refresh.interval.ms", 10_000)
        # a broker that stops answering without closing the connection: every request (and
        # connection attempt) of the worker gives up after walex's timeout, unless set (a
        # consumer's requests need fetch.wait.max.ms + 1 s at least)
        wait_ms = int(float(settings.get("fetch.wait.max.ms", 500)))
        settings.setdefault("socket.timeout.ms", max(int(self.timeout * 1000), wait_ms + 1000))
        settings.setdefault("socket.connection.setup.timeout.ms", max(int(self.timeout * 1000), 1000))
        validate(KafkaClient, settings, "worker source", url)
        # the group waits max.poll.interval.ms (its rebalance timeout) for a worker to give up
        # its partitions: a call in hand is waited for a third of it (60 s at most), then
        # cancelled and waited for as long again, so it ends before they can move
        poll = float(settings.get("max.poll.interval.ms", 300_000)) / 1000
        self.revoke_limit = max(0.5, min(60.0, poll / 3))
        # the group gives a member's partitions away after session.timeout.ms without its
        # heartbeats: a consumer thread stalled (the process frozen) for most of it may have
        # lost them unknowingly. Heartbeats go every heartbeat.interval.ms, so one stalled
        # for less than the session less an interval kept them
        session = float(settings.get("session.timeout.ms", 45_000)) / 1000
        heartbeat = float(settings.get("heartbeat.interval.ms", 3_000)) / 1000
        self.stale_after = max(0.5, min(0.75 * session, session - heartbeat - 0.5))
        self.ticked = time.monotonic()  # the consumer thread's last turn
        self.stalls = 0  # stalls the consumer thread saw (each cuts the call in hand)
        self.stall_reason = ""
        self.client: Any = None
        self.ready = asyncio.Event()
        self.lock = threading.Condition()
        self.lane: KafkaLane | None = None
        self.copies = 0  # records left out of a call that had their ce_id already
        # the consumer thread (and client callbacks) of the session that made them: a thread
        # that outlived close() touches no state of a later session
        self.session = object()
        self._reset()

    def _reset(self) -> None:
        self.assigned: set[TP] = set()
        self.buffers: dict[TP, deque[Any]] = {}
        self.busy: dict[TP, int] = {}  # records handed out, not yet acknowledged or released
        self.done: dict[TP, int] = {}  # next offset to commit, past handled records
        self.committed: dict[TP, int] = {}  # confirmed by the broker
        self.sent: dict[TP, int] = {}  # committed asynchronously, not answered yet
        self.commit_failing = False  # a commit failed, none succeeded since (said once)
        self.rewind: dict[TP, int] = {}  # released records: read again from here
        self.failed: Exception | None = None
        self.closing = False
        self.last_error: str | None = None
        # topic or partition errors the client handed over as records, not cleared yet:
        # (code, text, since when)
        self.partition_errors: dict[TP, tuple[int, str, float]] = {}
        self.auth_error: str | None = None
        self.trouble_since: float | None = None  # the client's first error not yet cleared
        self.next_probe = 0.0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.stopping = threading.Event()

    # -- the loop's side -------------------------------------------------

    def check(self) -> None:
        if self.failed is not None:
            raise self.failed

    def take(self) -> list[Delivery]:
        """The next transaction's buffered records of one partition (the one waiting longest),
        now handed out."""
        with self.lock:
            for tp, buffer in self.buffers.items():
                if not buffer or tp not in self.assigned or self.busy.get(tp):
                    continue
                while buffer and buffer[0].value() is None:  # a tombstone: nothing to handle
                    self.done[tp] = buffer.popleft().offset() + 1
                # one transaction's records: the call in hand is all a rebalance waits for.
                # A record whose ce_id (and ce_source) the call has already is a copy (a
                # publish the relay could not confirm, produced again): left out, its
                # offset covered by the call's last delivery: each event once per call
                messages = []
                commit = None
                ids: set[bytes] = set()
                last = -1  # the offset of the last record taken, a copy left out included
                while buffer and buffer[0].value() is not None:
                    this_id = _id_of(buffer[0])
                    this = this_id.partition(b"-")[0] if this_id is not None else None
                    if messages and (this is None or this != commit):
                        break
                    commit = this
                    message = buffer.popleft()
                    last = message.offset()
                    if this_id is not None:
                        if this_id in ids:
                            self.copies += 1
                            continue
                        ids.add(this_id)
                    messages.append(message)
                if messages:
                    self.busy[tp] = len(messages)
                    # the next call looks at the other partitions first
                    self.buffers[tp] = self.buffers.pop(tp)
                    taken = [Delivery(m.value(), (tp, m.offset())) for m in messages]
                    taken[-1].handle = (tp, last)  # acknowledged: read on after the copies
                    return taken
        return []

    def settle(self, deliveries: list[Delivery], handled: bool) -> None:
        if not deliveries:
            return
        tp, first = deliveries[0].handle
        last = deliveries[-1].handle[1]
        with self.lock:
            self.busy[tp] = max(0, self.busy.get(tp, 0) - len(deliveries))
            if tp in self.assigned:
                if handled:
                    self.done[tp] = max(self.done.get(tp, 0), last + 1)
                else:  # read again from the first one given back; what followed is dropped
                    self.rewind[tp] = first
                    self.busy[tp] = 0
                    self.buffers.get(tp, deque()).clear()
            self.lock.notify_all()

    def _new_session(self) -> tuple[object, dict[str, Any]]:
        """A new session's token, the state reset (under the lock: a consumer thread of an
        earlier session, still running, leaves it be), and client settings reporting to it."""
        with self.lock:
            token = self.session = object()
            self._reset()
        return token, dict(self.client_settings, error_cb=lambda err: self._on_error(err, token),
                           on_commit=lambda err, parts: self._on_commit(err, parts, token))

    async def open(self) -> list[Lane]:
        token, settings = self._new_session()
        self.loop = asyncio.get_running_loop()
        self.ready = asyncio.Event()
        try:
            client = KafkaClient(settings)
        except (KafkaException, ValueError, TypeError) as exc:
            raise ConfigError(f"worker source {self.display}: the Kafka client refused its "
                              f"settings: {self.destination.describe(exc)}") from None
        self.client = client
        try:
            await self._check(client)
        except BaseException:
            await asyncio.to_thread(client.close)
            self.client = None
            raise
        self.trouble_since = None  # the brokers answered
        self.ticked = time.monotonic()
        self.thread = threading.Thread(target=self._serve, args=(client, token, self.stopping),
                                       daemon=True,
                                       name=f"walex-kafka-{self.group}")
        self.thread.start()
        self.lane = KafkaLane(self)
        log.info("worker group %r consumes %s on %s", self.group, self.subscription, self.display)
        return [self.lane]

    def _ask(self, client: Any) -> None:
        """Metadata from a broker within ``timeout``; serves the client's error reports meanwhile
        (a refused login shows there), as nothing else polls the client yet."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                client.list_topics(timeout=min(1.0, max(0.1, deadline - time.monotonic())))
                return
            except KafkaException:
                client.poll(0)  # no subscription yet: only serves error_cb
                if self.auth_error is not None or time.monotonic() >= deadline:
                    raise

    async def _check(self, client: Any) -> None:
        try:
            await asyncio.wait_for(asyncio.to_thread(self._ask, client), timeout=self.timeout + 5)
        except (KafkaException, TimeoutError) as exc:
            if self.auth_error is not None:
                raise self._refused_login() from None
            detail = self.last_error or self.destination.describe(exc)
            raise Unavailable(f"no Kafka broker of {self.url.servers} answered within "
                              f"{self.timeout:g}s: {self.url.scrub(detail)}") from None
        if self.auth_error is not None:
            raise self._refused_login()

    def _refused_login(self) -> ConfigError:
        return self.destination.misconfigured(
            f"the Kafka broker refused the login ({self.auth_error or ''})",
            "check security.protocol, sasl.mechanism, sasl.username and sasl.password",
        )

    async def declare(self) -> None:
        """A Kafka group needs nothing declared (a group without committed offsets starts at
        ``start``); this checks that the brokers answer and take the login, then disconnects."""
        client = KafkaClient(self._new_session()[1])
        try:
            await self._check(client)
        finally:
            await asyncio.to_thread(client.close)
        log.info("worker group %r on %s: nothing to declare on Kafka (the group starts at %s)",
                 self.group, self.display, self.start)

    async def close(self) -> None:
        thread, self.thread = self.thread, None
        self.closing = True
        self.stopping.set()
        with self.lock:
            self.lock.notify_all()
        if thread is not None:
            await asyncio.to_thread(thread.join, self.timeout + 30)
            if thread.is_alive():
                log.warning("worker group %r: the Kafka consumer did not close in time", self.group)
        self.client = None
        self.lane = None


    def trouble(self) -> str | None:
        """A topic or partition the client reports an error for (not read meanwhile)."""
        return self.partition_trouble()

    def info(self) -> dict[str, Any]:
        return {"url": self.display, "group": self.group, "topics": self.subscription}


def _id_of(message: Any) -> bytes | None:
    """The record's ``ce_id`` header (``<commit>-<n>``), if it has one, followed by its
    ``ce_source`` (``-/<db>/<schema>/<table>``: the ids of two databases may meet)."""
    found = source = None
    for name, value in message.headers() or ():
        if name == "ce_id" and value:
            found = bytes(value)
        elif name == "ce_source" and value:
            source = bytes(value)
    if found is None or source is None:
        return found
    return found + b"-" + source
