"""Apache Kafka: ``kafka://host:9092[,host:9092]?topic=walex.{schema}.{table}``.

Each event is one record of the topic its template gives, with the row's
partition key (the CloudEvent's ``partitionkey``: ``schema.table/<key>``) as
the record key, so one row always lands in one partition, in order; the value
is the CloudEvents JSON document of the other destinations (structured
mode, ``content-type: application/cloudevents+json; charset=UTF-8``), and the
headers carry the CloudEvents Kafka binding's ``ce_specversion``, ``ce_id``,
``ce_source``, ``ce_type``, ``ce_time`` and ``ce_subject`` too, so a
consumer can route without parsing the value.

The producer is librdkafka's (``confluent-kafka``), idempotent with
``acks=all``: a batch counts as durable when the broker confirmed every
record of it to the producer (its delivery report). Records are produced
all at once and their reports awaited without blocking the event loop (a
thread of this destination serves them); a report that says the broker
could not take a record now, or none within ``timeout`` seconds, fails the
batch (:class:`~walex.destinations.base.Unavailable`): the producer is
closed, what it still held dropped, and the whole batch is published again
on a new producer, so a record may be stored twice (a consumer drops it by
``ce_id``) and none is lost. A record the broker refuses for good (too
large, unknown topic with auto-creation off, not authorized, invalid topic
name) is a :class:`~walex.errors.DestinationError`, which the app's
``on_error`` settles. A login the broker refuses is a
:class:`~walex.errors.ConfigError` (retrying cannot cure it).

Parameters: ``topic`` (default ``walex.{schema}.{table}``), ``tombstones``
(``true``: after a delete, a record with the same key and no value, for
compacted topics; default false), ``timeout`` (seconds to wait for the
brokers and for the reports of a batch, default 30). Every other parameter
is a librdkafka setting, passed as it is (``linger.ms=5``,
``security.protocol=SASL_SSL``, ``sasl.mechanism=SCRAM-SHA-256``,
``sasl.username=...``, ``sasl.password=...``); a user and password in the
URL are ``sasl.username`` and ``sasl.password``. Values of settings named
like a secret (``*password*``, ``*secret*``, ``*.pem``) never appear in a
log line or an error. walex sets ``bootstrap.servers`` (the URL's hosts),
``enable.idempotence=true``, ``acks=all`` and ``partitioner=murmur2_random``
(the Java client's, so other producers' records of one key share the
partition); the first three cannot be changed. Topics are not created:
the broker's auto-creation does it, or create them beforehand with the
partitions you want.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import orjson
from confluent_kafka import KafkaError, KafkaException, Producer

from ..errors import ConfigError, DestinationError
from .base import Destination, DestinationURL, Template, Unavailable
from .encoding import Outgoing

__all__ = ["KafkaDestination", "client_settings", "validate", "AUTHENTICATION", "OWN", "PERMANENT"]

log = logging.getLogger("walex.destinations")

CONTENT_TYPE = b"application/cloudevents+json; charset=UTF-8"
OWN = ("topic", "tombstones", "timeout")  # walex's parameters; the others are librdkafka's
_FIXED = frozenset({"bootstrap.servers", "enable.idempotence", "acks", "request.required.acks"})

# delivery errors retrying cannot cure: the batch goes to on_error
PERMANENT = frozenset(getattr(KafkaError, name) for name in (
    "MSG_SIZE_TOO_LARGE", "RECORD_LIST_TOO_LARGE", "INVALID_RECORD", "INVALID_MSG_SIZE",
    "TOPIC_AUTHORIZATION_FAILED", "CLUSTER_AUTHORIZATION_FAILED", "_UNKNOWN_TOPIC",
    "UNKNOWN_TOPIC_OR_PART", "TOPIC_EXCEPTION", "_INVALID_ARG", "POLICY_VIOLATION",
    "INVALID_REQUIRED_ACKS",
) if hasattr(KafkaError, name))
_TOO_LARGE = frozenset(getattr(KafkaError, n) for n in (
    "MSG_SIZE_TOO_LARGE", "RECORD_LIST_TOO_LARGE", "INVALID_MSG_SIZE") if hasattr(KafkaError, n))
_NO_TOPIC = frozenset({KafkaError._UNKNOWN_TOPIC, KafkaError.UNKNOWN_TOPIC_OR_PART})
_NOT_ALLOWED = frozenset({KafkaError.TOPIC_AUTHORIZATION_FAILED,
                          KafkaError.CLUSTER_AUTHORIZATION_FAILED})
AUTHENTICATION = frozenset({KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED})


class _Quiet:
    """librdkafka's log lines at debug level: what matters is raised, with the URL's secrets out."""

    def __init__(self, url: DestinationURL) -> None:
        self.url = url

    def log(self, level: int, fmt: str, *args: Any) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("librdkafka: %s", self.url.scrub(fmt % args if args else fmt))


def client_settings(url: DestinationURL, what: str, keep: tuple[str, ...] = (),
                    fixed: frozenset[str] = _FIXED) -> dict[str, Any]:
    """The librdkafka settings a URL gives: its hosts, SASL user and the parameters left
    (but ``keep``); a setting of ``fixed`` is walex's own, an error naming it."""
    servers = url.servers or "127.0.0.1:9092"
    settings: dict[str, Any] = {"bootstrap.servers": servers, "logger": _Quiet(url)}
    if url.username is not None:
        settings["sasl.username"] = url.username
        settings["sasl.password"] = url.password or ""
    for name in list(url.params):
        if name in keep:
            continue
        if name in fixed:
            raise ConfigError(f"{what} {url.display}: {name} is set by walex (the URL's hosts, an "
                              "idempotent producer with acks=all, the worker's group and offsets); "
                              "remove it")
        settings[name] = url.params.pop(name)
    return settings


def validate(client: Any, settings: dict[str, Any], what: str, url: DestinationURL) -> None:
    """Let librdkafka check the settings now (a client without brokers connects nowhere):
    a misspelt or invalid setting is a :class:`~walex.errors.ConfigError` when the URL is given."""
    offline = {k: v for k, v in settings.items() if k != "bootstrap.servers"}
    try:
        made = client(offline)
    except (KafkaException, ValueError, TypeError) as exc:
        raise ConfigError(f"{what} {url.display}: the Kafka client refused its settings: "
                          f"{url.scrub(str(exc.args[0].str() if isinstance(exc, KafkaException) else exc))}"
                          ) from None
    if hasattr(made, "close"):
        made.close()


class KafkaDestination(Destination):
    scheme = "kafka"
    extra = "kafka"
    accepted = OWN

    def __init__(self, url: DestinationURL, partitions: int = 1) -> None:
        super().__init__(url, partitions)
        self.topic = Template(url.take("topic") or "walex.{schema}.{table}", "topic", url.display)
        self.tombstones = url.take_bool("tombstones", False)
        self.timeout = url.take_float("timeout", 30.0, minimum=0.1)
        self.settings = client_settings(url, "destination")
        self.settings.setdefault("partitioner", "murmur2_random")
        # librdkafka's own copy of what is in flight: one publish (a group, or one batch);
        # its default of 1 GiB is no bound (a full queue makes produce() wait for reports)
        self.settings.setdefault("queue.buffering.max.kbytes", 2 * self.group_bytes // 1024)
        self.settings.update({
            "enable.idempotence": True, "acks": "all",
            # librdkafka gives up on a record when walex would: the batch is published again
            "message.timeout.ms": int(self.timeout * 1000),
        })
        validate(Producer, self.settings, "destination", url)
        self.producer: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._pending: set[_Batch] = set()
        self._fatal: str | None = None  # the producer cannot go on: a new one is needed
        self._last_error: str | None = None
        self._auth_error: str | None = None

    # -- connection ------------------------------------------------------

    async def open(self) -> None:
        self._stop = threading.Event()
        self._fatal = self._last_error = self._auth_error = None
        settings = dict(self.settings, error_cb=self._on_error)
        try:
            producer = Producer(settings)
        except (KafkaException, ValueError, TypeError) as exc:
            raise ConfigError(f"destination {self.display}: the Kafka client refused its settings: "
                              f"{self.describe(exc)}") from None
        self.producer = producer
        self._thread = threading.Thread(target=self._serve, args=(producer, self._stop),
                                        name="walex-kafka-producer", daemon=True)
        self._thread.start()
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
            if self._auth_error is not None:
                raise self.refused_login() from None
            detail = self._last_error or self.describe(exc)
            raise Unavailable(f"no Kafka broker of {self.url.servers} answered within "
                              f"{self.timeout:g}s: {self.url.scrub(detail)}") from None
        if self._auth_error is not None:
            raise self.refused_login()

    def refused_login(self) -> ConfigError:
        return self.misconfigured(
            f"the Kafka broker refused the login ({self._auth_error or ''})",
            "check security.protocol, sasl.mechanism, sasl.username and sasl.password "
            "(kafka://USER:PASSWORD@host:9092?security.protocol=SASL_SSL&sasl.mechanism=...)",
        )

    def _serve(self, producer: Any, stop: threading.Event) -> None:
        """The producer's thread: serves delivery reports and errors until close()."""
        while not stop.is_set():
            try:
                producer.poll(0.1)
            except Exception as exc:  # a callback's bug must not end the thread
                log.error("destination %s: serving delivery reports: %s", self.display,
                          self.describe(exc))

    def _on_error(self, err: Any) -> None:
        text = self.url.scrub(str(err.str()))
        self._last_error = text
        if err.code() in AUTHENTICATION:
            self._auth_error = text
        if err.fatal():
            self._fatal = text
            for batch in list(self._pending):
                batch.fail(Unavailable(f"the producer failed: {text}"))
        log.debug("destination %s: %s", self.display, text)

    async def close(self) -> None:
        producer, self.producer = self.producer, None
        thread, self._thread = self._thread, None
        self.opened = False
        self._stop.set()
        for batch in list(self._pending):
            batch.fail(Unavailable("the producer was closed"))
        if producer is None:
            return

        def shut() -> None:
            if thread is not None:
                thread.join(5)
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
        producer = self.producer
        if producer is None or self._fatal is not None:
            raise Unavailable(f"the producer failed: {self._fatal}" if self._fatal else "not connected")
        loop = asyncio.get_running_loop()
        waiting = _Batch(loop, self._pending, self.classify)
        render = self.topic.render
        try:
            for item in batch:
                doc = orjson.loads(item.body)
                key = doc["partitionkey"].encode()
                headers = [
                    ("ce_specversion", b"1.0"), ("ce_id", item.id.encode()),
                    ("ce_source", doc["source"].encode()), ("ce_type", doc["type"].encode()),
                    ("ce_time", doc["time"].encode()), ("content-type", CONTENT_TYPE),
                ]
                subject = doc.get("subject")
                if subject is not None:
                    headers.append(("ce_subject", subject.encode()))
                topic = render(item)
                await self._produce(producer, waiting, topic, key, item.body, headers)
                if self.tombstones and item.type == "delete":
                    await self._produce(producer, waiting, topic, key, None, None)
        except (Unavailable, DestinationError):
            waiting.fail(None)
            raise
        waiting.sealed()
        try:
            await asyncio.wait_for(asyncio.shield(waiting.future), timeout=self.timeout + 5)
        except TimeoutError:
            waiting.fail(None)
            raise Unavailable(f"{waiting.left} of {waiting.count} records were not confirmed "
                              f"within {self.timeout:g}s") from None
        error = waiting.future.result()
        if error is not None:
            raise error

    async def _produce(self, producer: Any, waiting: _Batch, topic: str, key: bytes,
                       value: bytes | None, headers: Any) -> None:
        waiting.count += 1
        while True:
            try:
                producer.produce(topic, value, key, headers=headers, on_delivery=waiting.delivered)
                return
            except BufferError:  # the producer's queue is full: wait for reports to free it
                if waiting.future.done():
                    break
                await asyncio.sleep(0.01)
            except KafkaException as exc:
                waiting.count -= 1
                err = exc.args[0]
                if err.code() in PERMANENT:
                    raise self.refusal(topic, err) from None
                raise self.unavailable("producing failed", exc) from None
        waiting.count -= 1
        raise waiting.future.result() or Unavailable("the batch failed")

    def refusal(self, topic: str, err: Any) -> DestinationError:
        return DestinationError(f"destination {self.display}: topic {topic!r} refused a record for "
                                f"good: {self.url.scrub(str(err.str()))} ({err.name()}). Fix: "
                                f"{self.fix(topic, err.code())}")

    def fix(self, topic: str, code: int) -> str:
        """What makes the broker take such a record (a refusal's fix)."""
        if code in _TOO_LARGE:
            limit = self.settings.get("message.max.bytes", 1_000_000)
            return (f"the record is over the producer's message.max.bytes ({limit}; a URL "
                    "parameter) or the broker's limit (message.max.bytes, or the topic's "
                    f"max.message.bytes: kafka-configs.sh --alter --entity-type topics "
                    f"--entity-name {topic} --add-config max.message.bytes=BYTES): raise them, "
                    "or keep such rows out of the destination")
        if code in _NO_TOPIC:
            return (f"create topic {topic!r} on the broker (kafka-topics.sh --create --topic "
                    f"{topic}), or turn the broker's auto.create.topics.enable on (a topic "
                    "template makes one topic per table: create each)")
        if code in _NOT_ALLOWED:
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


class _Batch:
    """The delivery reports of one batch, counted in the producer's thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pending: set[_Batch],
                 classify: Any) -> None:
        self.loop = loop
        self.classify = classify
        self.future: asyncio.Future[Exception | None] = loop.create_future()
        self.count = 0
        self.reported = 0
        self.error: Exception | None = None
        self.done = False
        self.is_sealed = False
        self.lock = threading.Lock()
        self.pending = pending
        pending.add(self)

    @property
    def left(self) -> int:
        return self.count - self.reported

    def delivered(self, err: Any, msg: Any) -> None:  # the producer's thread
        with self.lock:
            self.reported += 1
            if err is not None and self.error is None:
                owner = msg.topic() if msg is not None else "?"
                self.error = self.classify(err, owner)
            finished = self.is_sealed and self.reported >= self.count
        if finished:
            self._finish(self.error)

    def sealed(self) -> None:  # every record produced
        with self.lock:
            self.is_sealed = True
            finished = self.reported >= self.count
        if finished:
            self._finish(self.error)

    def fail(self, error: Exception | None) -> None:
        self._finish(error or Unavailable("the batch was abandoned"))

    def _finish(self, error: Exception | None) -> None:
        with self.lock:
            if self.done:
                return
            self.done = True
        self.pending.discard(self)

        def settle() -> None:
            if not self.future.done():
                self.future.set_result(error)

        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is closed
            pass
