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
after every handler returned and every destination confirmed it (the app's
:class:`~walex.destinations.fanout.Destinations` is awaited like a handler). A
broker that is down is retried with backoff, forever, logging a warning with
its redacted URL: no event is dropped, nothing is acknowledged early, and
walex resumes when the broker is back. A permanent refusal
(:class:`~walex.errors.DestinationError`: a webhook answering 4xx, a message
the broker will never take) goes to the app's ``on_error`` policy through
``Destinations.refused``: under ``"stop"`` (the default) it stops the app
unacknowledged; under ``"skip"`` or a dead-letter callable that destination's
batch is settled as a failed handler call's would be, and the stream goes on.
A refusal that may pass (a full NATS stream with ``discard=new``) raises
``Unavailable`` with ``attempts``: retried that many times, then settled as a
permanent one. Misconfiguration no retry cures (wrong credentials, a missing
vhost) is a :class:`~walex.errors.ConfigError` from ``open()``: it stops the
app at start or on a reconnect. ``Destinations.trouble()`` tells ``/healthz``
when a destination has failed every attempt for longer than
``unhealthy_after``.

This package holds the scheme table and :func:`from_url`, and imports no
encoder: a worker imports it (and the brokers' modules) to read what a relay
published without loading :mod:`~walex.destinations.encoding` or psycopg.

One module per broker (``nats``, ``rabbitmq``, ``redis``, ``webhook``), each
importing its client only when a URL of its scheme is used; another broker
(Kafka, say) is one more module and one line in :data:`SCHEMES`, the table
:mod:`walex.workers` picks its sources from too.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, NamedTuple

from ..errors import ConfigError
from .base import Destination, DestinationURL

if TYPE_CHECKING:
    from .fanout import Destinations

__all__ = ["Destination", "Destinations", "SCHEMES", "Scheme", "from_url", "check_url", "load_class"]


class Scheme(NamedTuple):
    """The walex modules of one URL scheme, imported only when a URL of it is used (a named
    tuple: a frozen dataclass took ~4M instructions of every relay's and worker's start)."""

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


def __getattr__(name: str) -> Any:
    """``Destinations`` from :mod:`.fanout`, imported when first asked for (PEP 562), so
    that importing a destination module or the workers never loads the encoders."""
    if name == "Destinations":
        from .fanout import Destinations

        globals()[name] = Destinations  # the next access is a plain module attribute
        return Destinations
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
