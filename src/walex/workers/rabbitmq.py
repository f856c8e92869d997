"""RabbitMQ source: ``amqp://user:pass@host:5672/vhost?exchange=walex&partitions=4``.

The relay's destination URL, plus ``partitions`` (the relay's), ``group``
(default ``walex``) and ``prefetch`` (default 100).

For each partition ``p`` the worker declares a durable queue
``<exchange>.<group>.<p>`` with ``x-single-active-consumer``, bound to the
exchange with that partition's binding key (the routing key template with
its ``{schema}``, ``{table}`` and ``{type}`` words as ``*`` and
``{partition}`` as ``p``). Every worker consumes every queue, and the broker
delivers a queue's messages to one consumer at a time, in queue order; when
that consumer's connection ends (a worker stopped or killed), the broker
puts its unacknowledged messages back in their places and makes another
consumer the active one. Each queue has its own channel, with ``prefetch``
unacknowledged messages at most: a handler call receives the consecutive
events of one transaction that are there (``prefetch`` at most).

The exchange is declared like the destination does (so workers may start
before the relay, and the relay's ``mandatory`` messages find their queues);
it must be a ``topic`` exchange, or ``direct`` when the routing key template
has no other field than ``{partition}``. A queue that exists without single
active consumer is an error naming it.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

from aio_pika.exceptions import ChannelPreconditionFailed

from ..destinations.base import DestinationURL, Unavailable
from ..destinations.rabbitmq import RabbitMQDestination
from ..errors import ConfigError
from .base import Consumer, Delivery, Lane, close_quietly, partition_filter

__all__ = ["RabbitMQConsumer"]

log = logging.getLogger("walex.workers")


class RabbitMQLane(Lane):
    def __init__(self, partition: int, consumer: RabbitMQConsumer, channel: Any) -> None:
        super().__init__(partition)
        self.consumer = consumer
        self.channel = channel
        self.buffer: asyncio.Queue[Any] = asyncio.Queue()

    async def deliver(self, message: Any) -> None:
        self.buffer.put_nowait(message)

    def check(self) -> None:
        if self.channel.is_closed or self.consumer.lost:
            raise Unavailable("the channel to RabbitMQ was closed")

    async def receive(self, wait: float) -> list[Delivery]:
        self.check()
        try:
            first = await asyncio.wait_for(self.buffer.get(), wait)
        except TimeoutError:
            self.check()
            return []
        messages = [first]
        while not self.buffer.empty():
            messages.append(self.buffer.get_nowait())
        return [Delivery(m.body, m, redelivered=bool(m.redelivered)) for m in messages]

    async def ack(self, deliveries: list[Delivery]) -> None:
        try:
            await deliveries[-1].handle.ack(multiple=True)
        except Exception as exc:
            raise self.consumer.destination.unavailable("acknowledging failed", exc) from None

    async def release(self, deliveries: list[Delivery]) -> None:
        """Close the channel: the broker puts back every unacknowledged message of the
        queue in its place (a negative acknowledgement of some would let the messages
        still in the buffer overtake them)."""
        try:
            await self.channel.close()
        except Exception as exc:
            log.debug("closing the channel of partition %d: %r", self.partition, exc)


class RabbitMQConsumer(Consumer):
    scheme = "amqp"
    destination_class = RabbitMQDestination
    accepted = ("prefetch",)
    destination: RabbitMQDestination

    def take_options(self, url: DestinationURL) -> None:
        self.prefetch = url.take_int("prefetch", 100, minimum=1) or 100

    def __init__(self, url: DestinationURL) -> None:
        super().__init__(url)
        dest = self.destination
        if not dest.exchange_name:
            raise ConfigError(f"worker source {url.display}: workers need a named exchange "
                              "(exchange=walex), not the default exchange")
        template = dest.routing_key.text
        self.bindings = [partition_filter(template, p, self.partitions, url.display, "routing_key")
                         for p in range(self.partitions)]
        kind = dest.exchange_type.value
        wild = any("*" in key.split(".") for key in self.bindings)
        if kind != "topic" and (kind != "direct" or wild):
            raise ConfigError(
                f"worker source {url.display}: a worker binds each partition's queue with "
                f"{self.bindings[0]!r}, which needs a topic exchange (exchange_type=topic, the "
                f"default), not {kind}"
            )
        self.queues = [f"{dest.exchange_name}.{self.group}.{p}" for p in range(self.partitions)]
        self.lanes: list[RabbitMQLane] = []
        self.lost = False

    async def open(self) -> list[Lane]:
        dest = self.destination
        await dest.open()  # connects; declares the exchange when missing
        self.lost = False

        def on_close(*_args: Any) -> None:
            self.lost = True

        dest.connection.close_callbacks.add(on_close)
        lanes: dict[int, RabbitMQLane] = {}
        # The broker makes a queue's first consumer its active one: subscribing from a
        # random partition on spreads the partitions over workers started together.
        offset = random.randrange(self.partitions)
        order = [(p + offset) % self.partitions for p in range(self.partitions)]
        try:
            for p in order:
                queue_name, binding = self.queues[p], self.bindings[p]
                channel = await dest.connection.channel(publisher_confirms=False)
                await channel.set_qos(prefetch_count=self.prefetch)
                try:
                    queue = await channel.declare_queue(
                        queue_name, durable=True, arguments={"x-single-active-consumer": True},
                    )
                except ChannelPreconditionFailed as exc:
                    raise ConfigError(
                        f"worker source {self.display}: queue {queue_name!r} exists with other "
                        f"settings ({dest.describe(exc)}); a worker needs a durable queue with "
                        "x-single-active-consumer to keep the order: delete it or use another "
                        "group="
                    ) from None
                await queue.bind(dest.exchange_name, routing_key=binding)
                lane = lanes[p] = RabbitMQLane(p, self, channel)
                await queue.consume(lane.deliver, no_ack=False)
        except (ConfigError, Unavailable):
            await self.close()
            raise
        except Exception as exc:
            await self.close()
            raise dest.unavailable("subscribing failed", exc) from None
        self.lanes = [lanes[p] for p in range(self.partitions)]
        log.info("worker group %r consumes %d partition queue(s) %s... on %s",
                 self.group, self.partitions, self.queues[0], self.display)
        return list(self.lanes)

    async def close(self) -> None:
        self.lanes = []
        await close_quietly(self.destination)  # unacknowledged messages go back to their queues
