"""RabbitMQ (AMQP 0-9-1): ``amqp://user:pass@host:port/vhost?exchange=walex&routing_key={schema}.{table}.{type}``.

Each event is a persistent message (``delivery_mode`` 2) with
``message_id`` = ``event.id`` and ``content_type``
``application/cloudevents+json``, published to the exchange with the
routing key its template gives, on a channel in publisher-confirm mode; it
counts as durable when the broker confirmed it (for a durable queue, once
the queue has it on disk). Messages are published with the ``mandatory``
flag: a message no queue is bound for is returned by the broker and walex
keeps publishing it again (logging a warning) until a binding takes it,
rather than lose it; ``mandatory=false`` lets such messages go. A batch's
messages go out in order as walex's own frames, written in a few writes and
confirmed as one (:mod:`walex.destinations.amqpframes`; about a tenth of the
CPU of aiormq's ``basic_publish`` per message), or, with an aiormq whose
internals that module does not know, one ``basic_publish`` each; either way
the batch counts as published once the broker confirmed every message.

Permissions: the URL's user needs ``configure`` on the exchange to declare it
and ``write`` to publish to it. A user without ``configure`` uses an exchange
that exists as it is (declared beforehand); one that does not exist is a
:class:`~walex.errors.ConfigError` at open, naming user, vhost, exchange and
the ``rabbitmqctl set_permissions`` that fixes it. A publish the broker
refuses (``ACCESS_REFUSED``: no ``write``) is a permanent refusal
(:class:`~walex.errors.DestinationError`, settled by ``on_error``), never
retried; so is a message over the broker's ``max_message_size`` (the broker
closes the channel with ``PRECONDITION_FAILED``) and a routing key over 255
bytes (a long ``routing_key`` template). Messages the broker nacks (a
full queue with ``x-overflow`` ``reject-publish``) are published again
``full_attempts`` times (8) in a row, then that is a refusal too.

walex declares the exchange (durable, of ``exchange_type``, default
``topic``) when missing; ``exchange=`` (empty) is the default exchange,
where the routing key is a queue name. Binding queues is the consumers'
business. A schema or table name's ``.`` becomes ``_`` in a routing key, so
the key's words stay ``schema``, ``table``, ``type``. Parameters:
``exchange`` (default ``walex``), ``routing_key`` (default
``{schema}.{table}.{type}``, and ``{schema}.{table}.{type}.{partition}`` when
the app has ``partitions`` > 1, so workers can bind a queue per partition),
``exchange_type``, ``mandatory``, ``timeout``
(seconds, default 10). ``amqps://`` uses TLS; the vhost is the path
(``/`` when absent; ``%2F`` spells a vhost named ``/``).
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any
from urllib.parse import unquote

import aio_pika
from aio_pika.exceptions import (
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
    DeliveryError,
    InvalidFrameError,
    ProbableAuthenticationError,
)
from aiormq.exceptions import ChannelAccessRefused  # aio-pika's AMQP layer
from pamqp.commands import Basic  # aio-pika builds on aiormq and pamqp

from ..errors import ConfigError, DestinationError
from . import amqpframes
from .base import Destination, DestinationURL, Outgoing, Template, Unavailable

__all__ = ["RabbitMQDestination"]

log = logging.getLogger("walex.destinations")

_EXCHANGE_TYPES = {t.value: t for t in aio_pika.ExchangeType}


class _TooLong(Exception):
    """A routing key longer than an AMQP short string (255 bytes)."""


def _returned_id(failure: BaseException) -> str | None:
    """The message id of a message the broker returned (``PublishError``), else None."""
    if isinstance(failure, DeliveryError) and type(failure.frame).__name__ == "Return":
        message = failure.message
        return getattr(getattr(getattr(message, "header", None), "properties", None),
                       "message_id", None)
    return None


def _nacked(failure: BaseException) -> bool:
    """Whether the broker refused the message with a ``Basic.Nack``."""
    return isinstance(failure, DeliveryError) and type(failure.frame).__name__ == "Nack"


# the reason of the channel's close when a message is over the broker's max_message_size
_MAX_SIZE = re.compile(r"larger than configured max size (\d+)")


def _word(name: str) -> str:
    return name.replace(".", "_")


def pattern(*names: str) -> str:
    """A rabbitmqctl permission pattern matching exactly ``names``."""
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


class RabbitMQDestination(Destination):
    scheme = "amqp"
    extra = "rabbitmq"
    accepted = ("exchange", "routing_key", "exchange_type", "mandatory", "timeout")

    def __init__(self, url: DestinationURL, partitions: int = 1) -> None:
        super().__init__(url, partitions)
        self.exchange_name = url.take("exchange", "walex") or ""
        default = "{schema}.{table}.{type}" + (".{partition}" if partitions > 1 else "")
        self.routing_key = Template(url.take("routing_key") or default,
                                    "routing_key", url.display, _word)
        kind = url.take("exchange_type", "topic") or "topic"
        if kind not in _EXCHANGE_TYPES:
            raise ConfigError(f"destination {url.display}: exchange_type must be one of "
                              f"{', '.join(_EXCHANGE_TYPES)}, got {kind!r}")
        self.exchange_type = _EXCHANGE_TYPES[kind]
        self.mandatory = url.take_bool("mandatory", True)
        self.timeout = url.take_float("timeout", 10.0, minimum=0.01)
        url.no_more_params(self.accepted)
        self.vhost = unquote(url.path[1:]) if len(url.path) > 1 else "/"
        self.connection: Any = None
        self.exchange: Any = None
        self.underlay: Any = None  # the aiormq channel under the exchange
        # whether batches go out through walex's frames (walex.destinations.amqpframes)
        self.framed = False
        self._methods: dict[tuple, bytes] = {}  # Basic.Publish frames by routing key fields
        self._number = -1  # the channel number they were made for

    passive = False  # a worker's: the exchange must exist (the relay declares it)
    connection_class: Any = None  # aio-pika's Connection, or a worker's (walex.workers.rabbitmq)

    async def open(self) -> None:
        url = self.url
        try:
            self.connection = await aio_pika.connect(
                host=url.host or "127.0.0.1", port=url.port or (5671 if url.scheme == "amqps" else 5672),
                login=url.username if url.username is not None else "guest",
                password=url.password if url.password is not None else "guest",
                virtualhost=self.vhost, ssl=url.scheme == "amqps", timeout=self.timeout,
                client_properties={"connection_name": "walex"},
                **({"connection_class": self.connection_class} if self.connection_class else {}),
            )
            channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
            if self.exchange_name:
                try:
                    self.exchange = await channel.declare_exchange(
                        self.exchange_name, self.exchange_type, durable=True,
                        timeout=self.timeout, passive=self.passive,
                    )
                except ChannelAccessRefused as exc:
                    if self.passive:
                        raise
                    # no configure permission: an exchange that exists is used as it is
                    channel = await self.connection.channel(publisher_confirms=True,
                                                            on_return_raises=True)
                    try:
                        self.exchange = await channel.declare_exchange(
                            self.exchange_name, passive=True, timeout=self.timeout)
                    except ChannelNotFoundEntity:
                        raise self.no_permission(
                            f"may not declare the exchange {self.exchange_name!r}, which does "
                            f"not exist ({self.describe(exc)})",
                            "or declare the exchange "
                            f"beforehand (durable, type {self.exchange_type.value}); then the "
                            "user needs write only",
                        ) from None
            else:
                self.exchange = channel.default_exchange
            self.underlay = await channel.get_underlay_channel()
            self.framed = amqpframes.usable(self.underlay)
        except ConfigError:
            await self.close()
            raise
        except ChannelAccessRefused as exc:
            await self.close()
            raise self.no_permission(f"was refused access ({self.describe(exc)})") from None
        except ChannelPreconditionFailed as exc:
            await self.close()
            raise DestinationError(
                f"destination {self.display}: exchange {self.exchange_name!r} exists with other "
                f"settings ({self.describe(exc)}); use its exchange_type or another exchange"
            ) from None
        except ChannelNotFoundEntity:
            await self.close()
            raise ConfigError(
                f"worker source {self.display}: exchange {self.exchange_name!r} does not exist, "
                "and a worker does not declare it: start the relay first (it declares the "
                "exchange), or declare it with 'walex worker --declare SOURCE_URL'"
            ) from None
        except ProbableAuthenticationError as exc:
            await self.close()
            user = url.username if url.username is not None else "guest"
            raise self.misconfigured(
                f"RabbitMQ refused the login of user {user!r} ({self.describe(exc)})",
                "put a user and password the broker accepts in the URL: "
                "amqp://USER:PASSWORD@host:5672/vhost",
            ) from None
        except InvalidFrameError as exc:
            await self.close()
            if "Connection.Close" not in str(exc):
                raise self.unavailable("cannot connect", exc) from None
            # the broker closes the connection instead of opening the vhost (NOT_ALLOWED)
            user = url.username if url.username is not None else "guest"
            raise self.misconfigured(
                f"RabbitMQ refused to open the vhost {self.vhost!r}: it does not exist, or "
                f"user {user!r} has no permissions on it",
                f"create it and grant access (rabbitmqctl add_vhost {self.vhost}; rabbitmqctl "
                f"set_permissions -p {self.vhost} {user} '.*' '.*' '.*'), or name an existing "
                "vhost as the URL's path (amqp://host:5672/VHOST; %2F for '/')",
            ) from None
        except Exception as exc:
            await self.close()
            raise self.unavailable("cannot connect", exc) from None
        self.opened = True

    @property
    def user(self) -> str:
        return self.url.username if self.url.username is not None else "guest"

    def grant(self, configure: str, write: str, read: str) -> str:
        """The ``rabbitmqctl set_permissions`` line giving the URL's user these patterns;
        ``{x}`` in one stands for the pattern of the exchange alone."""
        x = pattern(self.exchange_name or "amq.default")
        return (f"rabbitmqctl set_permissions -p {self.vhost} {self.user} "
                + " ".join(f"'{p.replace('{x}', x)}'" for p in (configure, write, read))
                + "; set_permissions replaces the user's permissions on the vhost, so add "
                "the patterns it has already")

    def no_permission(self, problem: str, more: str = "") -> ConfigError:
        """A :class:`~walex.errors.ConfigError`: the user may not use the exchange (a
        relay declares it and publishes: configure and write; a worker reads it)."""
        needs, grant = (("read", self.grant("", "", "{x}")) if self.passive else
                        ("configure and write", self.grant("{x}", "{x}", "")))
        return self.misconfigured(
            f"RabbitMQ user {self.user!r} {problem}: it needs {needs} permission on the "
            f"exchange {self.exchange_name or 'amq.default'!r} in vhost {self.vhost!r}",
            f"grant it ({grant}){', ' + more if more else ''}",
        )

    async def publish(self, batch: list[Outgoing]) -> None:
        channel = self.underlay
        if channel is None or channel.is_closed:
            raise Unavailable("not connected")
        built = self._frames(batch, channel) if self.framed else None
        if built is None:
            failures = await self._publish_each(channel, batch)
        else:
            chunks, ids = built
            try:
                async with asyncio.timeout(self.timeout):
                    failures = await amqpframes.publish(
                        channel, chunks, ids if self.mandatory else None, Basic.Ack)
            except Exception as exc:  # the channel closed (a refusal, a cut), a timeout
                failures = [exc]
        if failures:
            await self._failed(batch, failures)

    def _frames(self, batch: list[Outgoing], channel: Any) -> tuple[list, list[str]] | None:
        """The batch's frames for :func:`~walex.destinations.amqpframes.publish` and its
        message ids; None when an id or a routing key is too long for a short string (then
        each message goes through ``basic_publish``, which says so)."""
        if channel.number != self._number:
            self._methods.clear()
            self._number = channel.number
        ids = [item.id for item in batch]
        encoded = [i.encode() for i in ids]
        if encoded and max(map(len, encoded)) > 255:
            return None
        try:
            chunks = amqpframes.frames(batch, encoded, channel.number, self._method,
                                       channel.max_content_size)
        except _TooLong:
            return None
        return chunks, ids

    def _method(self, item: Outgoing) -> bytes:
        """The item's ``Basic.Publish`` frame, kept per (schema, table, type, partition)."""
        key = item[1:5]
        frame = self._methods.get(key)
        if frame is None:
            routing_key = self.routing_key.render(item).encode()
            if len(routing_key) > 255:
                raise _TooLong
            if len(self._methods) > 10_000:
                self._methods.clear()
            frame = self._methods[key] = amqpframes.method_frame(
                self._number, self.exchange_name.encode(), routing_key, self.mandatory)
        return frame

    async def _publish_each(self, channel: Any, batch: list[Outgoing]) -> list[BaseException]:
        """aiormq's own path: a ``basic_publish`` task per message."""
        render, mandatory, timeout = self.routing_key.render, self.mandatory, self.timeout
        name, properties = self.exchange_name, Basic.Properties
        keys = [render(item) for item in batch]
        for item, key in zip(batch, keys):  # the same at every attempt: a refusal
            if len(key.encode()) > 255:
                raise DestinationError(
                    f"destination {self.display}: the routing key of event {item.id} "
                    f"({item.schema}.{item.table}) is {len(key.encode())} bytes, over AMQP's 255: "
                    "shorten the routing_key template"
                )
        # Started in order, the publishes take the channel's lock in order, so the
        # broker receives the batch in order; without waiting for each write to
        # drain (wait=False) the frames of many messages go out in one write.
        confirms = [
            asyncio.ensure_future(channel.basic_publish(
                item.body, exchange=name, routing_key=key, mandatory=mandatory,
                timeout=timeout, wait=False,
                properties=properties(delivery_mode=2, message_id=item.id,
                                      content_type=amqpframes.CONTENT_TYPE),
            ))
            for item, key in zip(batch, keys)
        ]
        results = await asyncio.gather(*confirms, return_exceptions=True)
        return [result for result in results if isinstance(result, BaseException)]

    async def _failed(self, batch: list[Outgoing], failures: list[BaseException]) -> None:
        """Raise what the batch's failed publishes mean (the same whichever path)."""
        for failure in failures:
            if isinstance(failure, ChannelAccessRefused):
                await self.close()  # the broker closed the channel: a new one next time
                raise DestinationError(
                    f"destination {self.display}: RabbitMQ refused user {self.user!r} to "
                    f"publish to the exchange {self.exchange_name or 'amq.default'!r} in vhost "
                    f"{self.vhost!r} ({self.describe(failure)}): it needs write permission "
                    f"there; grant it ({self.grant('^$', '{x}', '')})"
                )
            if isinstance(failure, ChannelPreconditionFailed):
                size = _MAX_SIZE.search(str(failure))
                if size is not None:  # the broker closed the channel: a new one next time
                    await self.close()
                    raise self._too_large(batch, int(size.group(1)), failure)
        nacked = sum(1 for f in failures if _nacked(f))
        if nacked:
            raise Unavailable(
                f"RabbitMQ refused {nacked} of the batch's {len(batch)} messages (from event "
                f"{batch[0].id}) with a Basic.Nack: a queue they are routed to is full and "
                "refuses new messages (x-max-length or x-max-length-bytes with x-overflow "
                "reject-publish), or the broker could not store them; let the queue's consumers "
                "catch up, raise its limits or let it drop old messages (x-overflow drop-head)",
                attempts=self.full_attempts,
            )
        returned = {_returned_id(f) for f in failures} - {None}
        for item in batch if returned else ():
            if item.id in returned:
                raise Unavailable(
                    f"the broker returned event {item.id} as unroutable (routing key "
                    f"{self.routing_key.render(item)!r}): bind a queue for it, or add "
                    "mandatory=false to let such events go"
                )
        for failure in failures:
            if isinstance(failure, asyncio.CancelledError):
                raise self.unavailable("a publish was cancelled", failure)
        if all(isinstance(failure, TimeoutError) for failure in failures):
            raise Unavailable(
                f"RabbitMQ did not confirm the batch within timeout={self.timeout:g}s: the "
                "connection went silent, or the broker blocks publishers (a memory or disk "
                "alarm: see rabbitmqctl status); the batch is published again"
            )
        raise self.unavailable("the batch was not confirmed", failures[0])

    def _too_large(self, batch: list[Outgoing], limit: int, exc: BaseException) -> DestinationError:
        """The broker closed the channel on a message over its ``max_message_size``."""
        over = [item for item in batch if len(item.body) > limit]
        what = (f"event {over[0].id} ({over[0].schema}.{over[0].table}) is {len(over[0].body)} "
                "bytes" if over else "a message of the batch is")
        return DestinationError(
            f"destination {self.display}: {what}, over the broker's max_message_size of {limit} "
            f"bytes ({self.describe(exc)}); raise max_message_size in rabbitmq.conf, or leave "
            "the large column out of the publication"
        )

    async def close(self) -> None:
        connection, self.connection, self.exchange = self.connection, None, None
        self.underlay = None
        self.opened = False
        if connection is not None:
            try:
                await connection.close()
            except Exception as exc:  # closing a broken connection
                log.debug("closing AMQP connection to %s: %s", self.display, self.describe(exc))
