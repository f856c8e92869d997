"""Apache Kafka: ``kafka://host:9092[,host:9092]?topic=walex.{schema}.{table}``.

Each event is one record of the topic its template gives, with the row's
partition key (the CloudEvent's ``partitionkey``: ``schema.table/<key>``) as
the record key, so one row always lands in one partition, in order; the value
is the CloudEvents JSON document of the other destinations (structured
mode, ``content-type: application/cloudevents+json; charset=UTF-8``), and the
headers carry the CloudEvents Kafka binding's ``ce_specversion``, ``ce_id``,
``ce_source``, ``ce_type``, ``ce_time`` and ``ce_subject`` too, so a
consumer can route without parsing the value (``ce_headers=false``: not).

The producer is librdkafka's (``confluent-kafka``), idempotent with
``acks=all``: a batch counts as durable when the broker confirmed every
record of it to the producer (its delivery report). Records are produced
all at once; while many of them are unconfirmed, their reports are served
from the event loop (a thread of its own would take the GIL from the loop
for each record's report), and the last few (a small group's all) are
waited for by a flush on a thread of the destination's own while the event
loop goes on: a flush sends what the producer holds at once, without waiting
``linger.ms``, and returns as soon as the last record was confirmed (no
polling cadence), so a group of one-row transactions costs one round trip to
the broker. The client calls back only for a record that
failed (``delivery.report.only.error``), so a record that left the producer
without such a report was confirmed. A report that says the
broker could not take a record now, or no end within ``timeout`` seconds
(librdkafka itself never gives up on a record: ``message.timeout.ms=0``),
fails the batch (:class:`~walex.destinations.base.Unavailable`): the producer is
closed, what it still held dropped, and the whole batch is published again
on a new producer, so a record may be stored twice (a consumer drops it by
``ce_id``) and none is lost. A record the broker refuses for good (too
large, unknown topic with auto-creation off, not authorized, invalid topic
name) is a :class:`~walex.errors.DestinationError`, which the app's
``on_error`` settles; so is a record over the producer's queue
(``queue.buffering.max.kbytes``: walex makes it hold two groups and the largest
record ``message.max.bytes`` allows; a smaller one given in the URL could never
take it). A login the broker refuses is a
:class:`~walex.errors.ConfigError` (retrying cannot cure it).

Parameters: ``topic`` (default ``walex.{schema}.{table}``), ``tombstones``
(``true``: after a delete, a record with the same key and no value, for
compacted topics; default false), ``timeout`` (seconds to wait for the
brokers and for the reports of a batch, default 30), ``ce_headers`` (``false``:
the ``content-type`` header alone, the attributes in the value only; the six
``ce_*`` headers cost the client about half of what a record costs it, see
``bench/PROFILE.md``; a Kafka worker, which groups a transaction's records by
``ce_id``, then hands each record to a call of its own; default true). Every other parameter
is a librdkafka setting, passed as it is (``linger.ms=5``,
``security.protocol=SASL_SSL``, ``sasl.mechanism=SCRAM-SHA-256``,
``sasl.username=...``, ``sasl.password=...``); a user and password in the
URL are ``sasl.username`` and ``sasl.password``. Values of settings named
like a secret (``*password*``, ``*secret*``, ``*.pem``) never appear in a
log line or an error. walex sets ``bootstrap.servers`` (the URL's hosts),
``enable.idempotence=true``, ``acks=all``, ``delivery.report.only.error=true``,
``message.timeout.ms=0`` (``timeout`` instead; ``delivery.timeout.ms`` too, and
``retries``: a record given up after its retries would let the later ones of its
partition be stored past it) and
``partitioner=murmur2_random`` (the Java client's, so other producers' records of one
key share the partition) and ``enable.gapless.guarantee=true`` (below); all but the
partitioner cannot be changed. Topics are not created:
the broker's auto-creation does it, or create them beforehand with the
partitions you want.

Groups ahead (:attr:`KafkaDestination.depth` 2, :mod:`walex.destinations.window`): once
a publish was confirmed, a window's lane hands the next group over while the one
before awaits its reports (:meth:`KafkaDestination.send_ahead`), so that the broker
and librdkafka's thread always have records (:mod:`walex.destinations.kflights`).
A group's end is told without a report into Python per record: each group's records
carry a callback of its own (the failed-record one above), which the client holds a
reference to until the record's report was served, so the group is done when the
callback's reference count is back to what the group holds itself; it is confirmed
when no record of it failed. The order per key holds across groups: per partition an
idempotent producer stores a record only after every earlier one (sequence numbers;
``message.timeout.ms=0``: none is dropped by a timeout), and a record the broker
refuses for good would let librdkafka renumber the later ones past the gap (an epoch
bump): ``enable.gapless.guarantee`` makes that a fatal error instead (nothing past
the gap is stored; the refused record's report still names its error, which the
publish again, alone on a new producer, settles through ``on_error``). Any failure
(a record's, a group's deadline, a fatal error) makes the lane publish again from
the first group not confirmed, one group at a time, with the same ids; a deadline
passed closes the producer first (what it still held dropped).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from confluent_kafka import KafkaException, Producer

from ..errors import ConfigError, DestinationError
from ..event import EventType
from . import kflights, krecords
from .base import Destination, DestinationURL, Outgoing, Template, Unavailable
from .kafkaconf import (AUTHENTICATION, FIXED, GAPLESS, NO_TOPIC, NOT_ALLOWED, OWN, OWN_TIMEOUTS,
                        PERMANENT, RETRIES, TOO_LARGE, client_settings, validate)
from .krecords import CONTENT_TYPE

__all__ = ["CONTENT_TYPE", "KafkaDestination", "client_settings", "validate", "AUTHENTICATION",
           "OWN", "PERMANENT"]

log = logging.getLogger("walex.destinations")

_TYPE_HEADERS = {kind.value: ("ce_type", f"walex.{kind.value}".encode()) for kind in EventType}
_IDLE_POLL = 0.25  # seconds between two services of the producer while no batch is published
_FLUSH_SLICE = 0.5  # longest flush call: a publish cancelled meanwhile frees its thread by then
_FLUSH_AT = 256  # records left unconfirmed in a publish from which its thread flushes the rest
class KafkaDestination(Destination):
    scheme = "kafka"
    extra = "kafka"
    accepted = OWN

    def __init__(self, url: DestinationURL, partitions: int = 1) -> None:
        super().__init__(url, partitions)
        self.topic = Template(url.take("topic") or "walex.{schema}.{table}", "topic", url.display)
        self.tombstones = url.take_bool("tombstones", False)
        self.ce_headers = url.take_bool("ce_headers", True)
        self.timeout = url.take_float("timeout", 30.0, minimum=0.1)
        self.settings = client_settings(url, "destination",
                                        fixed=FIXED | OWN_TIMEOUTS | RETRIES
                                        | {"delivery.report.only.error", GAPLESS})
        self.settings.setdefault("partitioner", "murmur2_random")
        # librdkafka's own copy of what is in flight: one publish (a group, or one batch);
        # its default of 1 GiB is no bound (a full queue makes produce() wait for reports).
        # The largest record message.max.bytes lets through must fit in it (else the queue
        # is full for it even empty, for ever)
        try:
            most = int(self.settings.get("message.max.bytes", 1_000_000))
        except (TypeError, ValueError):  # librdkafka's check below says what is wrong
            most = 0
        self.settings.setdefault("queue.buffering.max.kbytes",
                                 max(2 * self.group_bytes, 2 * most) // 1024)
        self.settings.update({
            "enable.idempotence": True, "acks": "all",
            # librdkafka never gives up on a record by itself: a record it dropped after
            # message.timeout.ms while the broker was away leaves a gap that the records
            # behind it, sent once the broker is back, pass (an epoch bump renumbers them),
            # and the batch published again would put the dropped one after them. walex's
            # timeout fails the publish instead, closes the producer (what it held dropped)
            # and publishes the batch again on a new one, from its first record
            "message.timeout.ms": 0,
            # the client calls back into Python only for a failed record; a success is a
            # record that left the producer without one (see publish)
            "delivery.report.only.error": True,
            # a record refused for good stops the producer (a fatal error) instead of letting
            # the later records of its partition be stored past it (see the docstring)
            GAPLESS: True,
        })
        validate(Producer, self.settings, "destination", url)
        self.producer: Any = None
        self._server: asyncio.Task[None] | None = None  # serves the producer between publishes
        self._flusher: ThreadPoolExecutor | None = None  # waits for the last reports of a publish
        self._publishing = asyncio.Lock()
        self._sources: dict[str, tuple[str, bytes]] = {}  # the ce_source header of each source
        self._records = krecords.records()  # the records loop: compiled, or its pure twin
        self._fatal: str | None = None  # the producer cannot go on: a new one is needed
        self._last_error: str | None = None
        self._auth_error: str | None = None
        self._flights: deque[kflights.Flight] = deque()  # groups handed over ahead, in order
        self._watcher: asyncio.Task[None] | None = None  # serves their reports
        self._steady = False  # a group was confirmed on this producer, none failed since
        self._broken: str | None = None  # a group ahead timed out: a new producer is needed
        self.ahead = 0  # groups handed over ahead (send_ahead)
        self._polls = 0  # services of the reports on the loop (_poll)
        # the client holds a reference to a record's callback until its report was served
        # (checked at each group produced without a service meanwhile): a group's end told
        self._countable = True

    # -- connection ------------------------------------------------------

    async def open(self) -> None:
        self._fatal = self._last_error = self._auth_error = self._broken = None
        self._steady = False
        settings = dict(self.settings, error_cb=self._on_error)
        try:
            producer = Producer(settings)
        except (KafkaException, ValueError, TypeError) as exc:
            raise ConfigError(f"destination {self.display}: the Kafka client refused its settings: "
                              f"{self.describe(exc)}") from None
        self.producer = producer
        self._server = asyncio.create_task(self._serve(producer), name="walex-kafka-producer")
        try:
            await self._check(producer)
        except BaseException:
            await self.close()
            raise
        self.opened = True

    async def _check(self, producer: Any) -> None:
        """Ask the brokers for their metadata: an unreachable cluster or refused login shows now."""
        try:
            await asyncio.wait_for(asyncio.to_thread(producer.list_topics, timeout=self.timeout),
                                   timeout=self.timeout + 5)
        except (KafkaException, TimeoutError) as exc:
            self._poll(producer)  # the errors the brokers' answers left
            if self._auth_error is not None:
                raise self.refused_login() from None
            detail = self._last_error or self.describe(exc)
            raise Unavailable(f"no Kafka broker of {self.url.servers} answered within "
                              f"{self.timeout:g}s: {self.url.scrub(detail)}") from None
        self._poll(producer)
        if self._auth_error is not None:
            raise self.refused_login()

    def refused_login(self) -> ConfigError:
        return self.misconfigured(
            f"the Kafka broker refused the login ({self._auth_error or ''})",
            "check security.protocol, sasl.mechanism, sasl.username and sasl.password "
            "(kafka://USER:PASSWORD@host:9092?security.protocol=SASL_SSL&sasl.mechanism=...)",
        )

    async def _serve(self, producer: Any) -> None:
        """Between publishes, serve the producer's errors and log lines (a publish serves
        its own delivery reports), so that they neither pile up nor go unseen."""
        while True:
            await asyncio.sleep(_IDLE_POLL)
            self._poll(producer)

    def _poll(self, producer: Any) -> None:
        """Run the producer's callbacks that are due, here in the event loop's thread (a
        thread of its own would fight the event loop for the GIL at each callback)."""
        self._polls += 1
        try:
            producer.poll(0)
        except Exception as exc:  # a callback's bug must not end the relay
            log.error("destination %s: serving delivery reports: %s", self.display,
                      self.describe(exc))

    def _on_error(self, err: Any) -> None:
        text = self.url.scrub(str(err.str()))
        self._last_error = text
        if err.code() in AUTHENTICATION:
            self._auth_error = text
        if err.fatal():
            self._fatal = text
        log.debug("destination %s: %s", self.display, text)

    async def close(self) -> None:
        producer, self.producer = self.producer, None
        server, self._server = self._server, None
        self.opened = False
        if server is not None:
            server.cancel()
        self._land_all(Unavailable("the producer was closed"))
        flusher, self._flusher = self._flusher, None
        if flusher is not None:  # a flush still running ends within its slice
            flusher.shutdown(wait=False)
        if producer is None:
            return

        def shut() -> None:
            try:  # records not yet confirmed are dropped: their batch is published again
                producer.purge(in_queue=True, in_flight=True)
                producer.flush(1)
            except Exception as exc:
                log.debug("closing the producer of %s: %s", self.display, self.describe(exc))

        try:
            await asyncio.wait_for(asyncio.to_thread(shut), timeout=10)
        except TimeoutError:
            log.debug("closing the producer of %s took too long", self.display)

    # -- publishing ------------------------------------------------------

    async def publish(self, batch: list[Outgoing]) -> None:
        """Produce every record of the batch, then serve delivery reports until the producer
        holds none: the batch is confirmed when each of its records left the producer
        without a failed report (see :class:`~walex.destinations.kflights.Failures`)."""
        async with self._publishing:  # one batch at a time: the producer holds no other's
            producer = self.producer
            if producer is None or self._fatal is not None or self._broken is not None:
                raise Unavailable(f"the producer failed: {self._fatal or self._broken}"
                                  if self._fatal or self._broken else "not connected")
            failures = kflights.Failures(self.classify)
            deadline = asyncio.get_running_loop().time() + self.timeout + 5
            count = await self._produce_all(producer, batch, failures.delivered, deadline)
            await self._confirmed(producer, count, deadline, failures)
            if failures.error is not None:
                self._steady = False
                raise failures.error
            self._steady = True

    # -- groups ahead (walex.destinations.window) -----------------------------

    depth = 2

    def pipelined(self) -> bool:
        """Whether a group may be handed over ahead now: a producer that confirmed a group
        and has had no failure since (after one, groups go one at a time until one is
        confirmed again)."""
        return (self._steady and self._countable and self.producer is not None
                and self._fatal is None and self._broken is None)

    async def send_ahead(self, batch: list[Outgoing]) -> kflights.Flight | None:
        """Produce ``batch``'s records while the groups handed over before await their
        reports; its outcome is :meth:`landed`'s once the flight's ``answer`` is done
        (:func:`~walex.destinations.kflights.watch`, within the timeout). None, having
        produced nothing, when groups may not go ahead now (:meth:`pipelined`)."""
        async with self._publishing:
            producer = self.producer
            if not self.pipelined():
                return None
            loop = asyncio.get_running_loop()
            flight = kflights.Flight(kflights.Failures(self.classify), loop.create_future(),
                                     loop.time() + self.timeout + 5, len(batch))
            polls = self._polls
            try:
                flight.count = await self._produce_all(producer, batch, flight.callback,
                                                       flight.deadline)
            except (Unavailable, DestinationError) as exc:  # a record refused at once, the
                # queue full too long: what went is in the producer, unconfirmed, and the
                # lane publishes the group again one at a time (where a refusal is settled)
                self._steady = False
                raise Unavailable(f"a group handed over ahead failed: {exc}") from None
            if polls == self._polls and flight.outstanding() != flight.count:
                # no report was served meanwhile, yet the references do not count the
                # records: this client does not hold one per record. The group's end is
                # then an empty producer, and no group goes ahead any more
                flight.counted = self._countable = False
                log.warning("destination %s: the Kafka client does not hold a delivery "
                            "callback per record (%d references for %d records); groups "
                            "are no longer handed over ahead", self.display,
                            flight.outstanding(), flight.count)
            self.ahead += 1
            if self._flights and log.isEnabledFor(logging.DEBUG):
                log.debug("destination %s: a group of %d records handed over ahead, %d in "
                          "flight", self.display, flight.count, len(self._flights))
            self._flights.append(flight)
            if self._watcher is None or self._watcher.done():
                self._watcher = asyncio.create_task(
                    kflights.watch(producer, self._flights, self._poll, self._failure,
                                   self.timeout), name="walex-kafka-flights")
            return flight

    def _failure(self) -> str | None:
        if self._fatal is not None:
            return self._fatal
        return None if self.producer is not None else "the producer was closed"

    def landed(self, flight: kflights.Flight) -> Exception | None:
        """A flight's outcome, asked in the order they were handed over: None when every
        record of it was reported and none failed; otherwise why not (a record's failure,
        a refusal for good first; the deadline; the producer's failure), and groups go one
        at a time again. A deadline passed makes the next publish close the producer (what
        it still holds is dropped) and publish on a new one."""
        outcome = flight.answer.result()
        if outcome is None:
            outcome = flight.failures.error
            if outcome is None:
                return None
        self._steady = False
        if isinstance(outcome, Unavailable) and flight.failures.error is None \
                and self._fatal is None and self._broken is None:
            self._broken = str(outcome)  # records of it may still be in the producer
        return flight.failures.error or outcome

    def _land_all(self, outcome: Exception) -> None:
        """Every flight fails with ``outcome`` (the producer closed)."""
        flights = self._flights
        while flights:
            flight = flights.popleft()
            if not flight.answer.done():
                flight.answer.set_result(outcome)
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()

    async def _produce_all(self, producer: Any, batch: list[Outgoing], failed: Any,
                           deadline: float) -> int:
        """Produce the batch's records (tombstones included); returns how many.

        The hot loop of the relay is :mod:`~walex.destinations.krecords`' (compiled when
        built): it stops at a record the producer's queue has no room for, produced here
        once there is (:meth:`_produce_later`), and goes on after it."""
        produce, records = producer.produce, self._records
        topic = self.topic.prefix if self.topic.constant else None
        render, tombstones, sources = self.topic.render, self.tombstones, self._sources
        count, start, end = 0, 0, len(batch)
        while True:
            done, stop, where, headers, tombstone = records(
                produce, batch, start, topic, render, failed, sources, _TYPE_HEADERS,
                tombstones, self.refused, self.ce_headers)
            count += done
            if stop >= end:
                return count
            item = batch[stop]
            if not tombstone:  # the item's record met a full queue
                await self._produce_later(producer, where, item.body, item.key, headers, failed,
                                          deadline)
                count += 1
            if tombstones and item.type == "delete":  # its tombstone (the one that met it)
                if tombstone or not self._put(producer, where, None, item.key, None, failed):
                    await self._produce_later(producer, where, None, item.key, None, failed,
                                              deadline)
                count += 1
            start = stop + 1

    def _put(self, producer: Any, topic: str, value: bytes | None, key: str, headers: Any,
             failed: Any) -> bool:
        """Produce one record (``value`` None: a tombstone); False when the producer's queue
        is full (:meth:`_produce_later`); a record the client refuses at once raises
        (:meth:`refused`)."""
        try:
            producer.produce(topic, value, key, -1, failed, None, 0, headers)
        except BufferError:
            return False
        except KafkaException as exc:
            raise self.refused(topic, exc) from None
        return True

    def refused(self, topic: str, exc: KafkaException) -> Exception:
        """What a record the client refused at once is: a refusal for good (:meth:`refusal`,
        with the fix) or :class:`~walex.destinations.base.Unavailable`."""
        err = exc.args[0]
        if err.code() in PERMANENT:
            return self.refusal(topic, err)
        return self.unavailable("producing failed", exc)

    async def _produce_later(self, producer: Any, topic: str, value: bytes | None, key: str,
                             headers: Any, failed: Any, deadline: float) -> None:
        """The producer's queue is full: serve reports to free it, then produce."""
        loop = asyncio.get_running_loop()
        while True:
            self._poll(producer)
            self._still_usable(producer, loop, deadline,
                               f"the producer's queue stayed full for {self.timeout:g}s")
            await asyncio.sleep(0.005)
            if self._put(producer, topic, value, key, headers, failed):
                return
            if not len(producer):  # no room in an empty queue: the record alone is over its bound
                raise self.over_queue(topic, len(value or b"") + len(key.encode()))

    def over_queue(self, topic: str, size: int) -> DestinationError:
        kbytes = self.settings["queue.buffering.max.kbytes"]
        return DestinationError(
            f"destination {self.display}: topic {topic!r} refused a record for good: the record "
            f"({size} bytes) is over the producer's queue (queue.buffering.max.kbytes={kbytes}). "
            "Fix: raise queue.buffering.max.kbytes (a URL parameter) above the largest record, "
            "or lower message.max.bytes so that such a record is refused as too large")

    def _still_usable(self, producer: Any, loop: asyncio.AbstractEventLoop, deadline: float,
                      timed_out: str) -> None:
        if self.producer is not producer:
            raise Unavailable("the producer was closed")
        if self._fatal is not None:
            raise Unavailable(f"the producer failed: {self._fatal}")
        if loop.time() >= deadline:
            raise Unavailable(timed_out)

    async def _confirmed(self, producer: Any, count: int, deadline: float,
                         failures: kflights.Failures) -> None:
        """Wait until the producer holds no record (its count includes those whose report
        is not served yet), checking between two waits.

        The client takes the GIL for each record's report, whatever the callback (even
        none). While many records are unconfirmed (more than :data:`_FLUSH_AT`: a large
        group), their reports are served here, in the event loop's thread, pausing
        :data:`~walex.destinations.kflights.FIRST_PAUSE` at first and doubling up to
        :data:`~walex.destinations.kflights.LONGEST_PAUSE`: served on another thread, they
        would fight the event loop, busy reading and encoding the next records, for the
        GIL at each record. The last ones (or a small group's) are
        waited for with librdkafka's flush on the destination's thread, in slices of at
        most :data:`_FLUSH_SLICE`: it sends what the producer holds at once (``linger.ms``
        does not apply) and is woken when the last record was confirmed, so a group of
        one-row transactions costs one round trip, no polling cadence. The callbacks it
        runs there only record (:class:`~walex.destinations.kflights.Failures`,
        :meth:`_on_error`): the loop reads
        them once the flush returned.

        A fatal error (``enable.gapless.guarantee``: a record refused for good) is told
        after the reports of what was in flight: the refused record's names the refusal,
        which the publish raises rather than the producer's failure (its report may come
        after the error, and after those of the records the fatal error dropped)."""
        loop = asyncio.get_running_loop()
        pause = kflights.FIRST_PAUSE
        fatal_until = None  # when a fatal error was seen: the last wait for the reports
        while True:
            left = len(producer)
            if not left:
                return
            if self._fatal is not None and self.producer is producer:
                if fatal_until is None:
                    fatal_until = min(loop.time() + 2.0, deadline)
                if failures.refused is not None:
                    raise failures.refused
                if loop.time() < fatal_until:
                    await asyncio.sleep(0.01)
                    self._poll(producer)
                    continue
            self._still_usable(producer, loop, deadline,
                               f"{min(left, count)} of {count} records were not confirmed "
                               f"within {self.timeout:g}s")
            if left > _FLUSH_AT:
                await asyncio.sleep(pause)
                pause = min(pause * 2, kflights.LONGEST_PAUSE)
                self._poll(producer)
                continue
            flusher = self._flusher
            if flusher is None:
                flusher = self._flusher = ThreadPoolExecutor(
                    1, thread_name_prefix="walex-kafka-flush")
            wait = min(_FLUSH_SLICE, max(deadline - loop.time(), 0.001))
            try:
                await loop.run_in_executor(flusher, producer.flush, wait)
            except Exception as exc:  # a callback's bug must not end the relay
                log.error("destination %s: serving delivery reports: %s", self.display,
                          self.describe(exc))

    def refusal(self, topic: str, err: Any) -> DestinationError:
        return DestinationError(f"destination {self.display}: topic {topic!r} refused a record for "
                                f"good: {self.url.scrub(str(err.str()))} ({err.name()}). Fix: "
                                f"{self.fix(topic, err.code())}")

    def fix(self, topic: str, code: int) -> str:
        """What makes the broker take such a record (a refusal's fix)."""
        if code in TOO_LARGE:
            limit = self.settings.get("message.max.bytes", 1_000_000)
            return (f"the record is over the producer's message.max.bytes ({limit}; a URL "
                    "parameter) or the broker's limit (message.max.bytes, or the topic's "
                    f"max.message.bytes: kafka-configs.sh --alter --entity-type topics "
                    f"--entity-name {topic} --add-config max.message.bytes=BYTES): raise them, "
                    "or keep such rows out of the destination")
        if code in NO_TOPIC:
            return (f"create topic {topic!r} on the broker (kafka-topics.sh --create --topic "
                    f"{topic}), or turn the broker's auto.create.topics.enable on (a topic "
                    "template makes one topic per table: create each)")
        if code in NOT_ALLOWED:
            user = self.url.username or "the URL's user"
            if user in self.url.secrets:  # a password that is the user name too
                user = "the URL's user"
            return (f"grant {user} WRITE on topic {topic!r} (kafka-acls.sh --add "
                    f"--allow-principal User:{user} --operation Write --topic {topic}); "
                    "an idempotent producer needs IDEMPOTENT_WRITE on the cluster on brokers "
                    "before Kafka 3.0")
        return "see the broker's reason above; retrying cannot help, so on_error settles it"

    def classify(self, err: Any, topic: str) -> Exception:
        if err.code() in PERMANENT:
            return self.refusal(topic, err)
        return Unavailable(f"a record for topic {topic!r} was not stored: "
                           f"{self.url.scrub(str(err.str()))}")

    def info(self) -> dict[str, Any]:
        return {"url": self.display, "topic": self.topic.text}

