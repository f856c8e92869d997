"""RabbitMQ source: ``amqp://user:pass@host:5672/vhost?exchange=walex&partitions=4``.

The relay's destination URL, plus ``partitions`` (the relay's), ``group``
(default ``walex``), ``prefetch`` (default 100) and ``balance`` (seconds
between looks at how many workers share the group, default 5).

For each partition ``p`` the group has a durable queue
``<exchange>.<group>.<p>`` with ``x-single-active-consumer``, bound to the
exchange with that partition's binding key (the routing key template with
its ``{schema}``, ``{table}`` and ``{type}`` words as ``*`` and
``{partition}`` as ``p``). Every worker consumes every queue, and the broker
delivers a queue's messages to one consumer at a time, in queue order; when
that consumer's connection ends (a worker stopped or killed), the broker
puts its unacknowledged messages back in their places and makes the next
consumer the active one. Each queue has its own channel, with ``prefetch``
unacknowledged messages at most: the worker takes what is there at once,
calls the handlers per transaction (``max_batch`` handlers: once for them
all) and acknowledges the last one with ``multiple=True``, on the channel it
came on. The deliveries come straight off the connection's bytes
(:mod:`walex.workers.amqpdeliveries`: the tag, the ``redelivered`` flag and
the body of each, in order, into the lane's inbox, with no aiormq message,
queue or task per delivery); aiormq still opens, acknowledges and closes,
and an aiormq whose internals that module does not know delivers through
``basic_consume`` as before.

The group is declared up front: :meth:`RabbitMQConsumer.declare`
(``walex worker --declare SOURCE_URL``) declares the exchange as the relay
does and the group's queues, bound. A worker declares neither: a missing
exchange, a missing queue of the group (a group created while the relay
publishes would silently miss what was published before) or a queue for
partition ``partitions`` (the group has more partitions than the worker) is
a :class:`~walex.errors.ConfigError` naming the fix. A queue that exists
without single active consumer is one too, and so is a user the broker refuses
(``ACCESS_REFUSED``): a worker needs configure and write on its group's queues
(it declares and binds them) and read on them and on the exchange; the error
names user, vhost, queue and the ``rabbitmqctl set_permissions`` that fixes it.

Spreading: the broker makes a queue's first consumer the active one, so a
worker started first would hold every partition. Every ``balance`` seconds
a worker counts the group's workers (the consumers of its queues) and, when
it holds more than ``ceil(partitions / workers)`` partitions (those it
received messages from, or subscribed to first), hands the rest over: once
such a partition's lane holds nothing, it closes the queue's channel (the
broker puts what it had prefetched back in place and makes the next worker
in line the active one) and subscribes again, last in line.

When the connection or a channel is closed under it, the worker cancels the
call in hand and acknowledges nothing (:mod:`walex.workers.lease`); the
broker may have handed the messages to another worker already (it notices a
reset connection at once, a silent one after the heartbeat timeout), so the
fencing token is what keeps a stale call's effect out. A queue deleted under
the worker (the broker cancels its consumer, ``Basic.Cancel``, and leaves the
channel open) ends the subscription the same way: the worker reconnects, and
its group's missing queue is the ConfigError that names the fix.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re
from typing import Any

from aio_pika.exceptions import ChannelNotFoundEntity, ChannelPreconditionFailed
from aiormq.exceptions import ChannelAccessRefused  # aio-pika's AMQP layer

from ..destinations.base import DestinationURL, Unavailable
from ..destinations.rabbitmq import RabbitMQDestination, pattern
from ..errors import ConfigError
from . import amqpdeliveries
from .base import Consumer, Delivery, Lane, close_quietly, partition_filter

__all__ = ["RabbitMQConsumer"]

log = logging.getLogger("walex.workers")

_SAC = {"x-single-active-consumer": True}


class _SourceExchange(RabbitMQDestination):
    """The relay's exchange, seen from a worker: it must exist (unless declared)."""

    passive = True
    # the deliveries taken off the connection's bytes (walex.workers.amqpdeliveries)
    connection_class = amqpdeliveries.connection_class() if amqpdeliveries.usable() else None


class _Inbox:
    """One subscription's deliveries not yet received, and the lane waiting for them."""

    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        self.items: list[Delivery] = []
        self.waiter: asyncio.Future[None] | None = None

    def put(self, delivery: Delivery) -> None:
        self.items.append(delivery)
        self.wake()

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class RabbitMQLane(Lane):
    def __init__(self, partition: int, consumer: RabbitMQConsumer) -> None:
        super().__init__(partition)
        self.consumer = consumer
        self.channel: Any = None
        self.inbox = _Inbox()
        self.shed = False  # give the partition to the next worker in line when idle
        self.closing = False  # this worker closes the channel: not a loss
        self._taking: tuple[Any, int, Any] | None = None  # (split reader, channel, sink)
        self._consuming: tuple[Any, str] | None = None  # (aiormq channel, consumer tag)

    async def subscribe(self, consume: bool = True) -> int:
        """Open a channel and consume the partition's queue; the consumers there before."""
        try:
            return await self._subscribe(consume)
        except ChannelAccessRefused as exc:
            raise self.consumer.no_permission(self.consumer.queues[self.partition],
                                              exc) from None

    async def _subscribe(self, consume: bool) -> int:
        consumer, dest = self.consumer, self.consumer.destination
        inbox = self.inbox = _Inbox()
        self.closing = False
        self._consuming = None
        channel = self.channel = await dest.connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=consumer.prefetch)
        name = consumer.queues[self.partition]
        try:
            queue = await channel.declare_queue(name, durable=True, arguments=_SAC)
        except ChannelPreconditionFailed as exc:
            raise ConfigError(
                f"worker source {consumer.display}: queue {name!r} exists with other "
                f"settings ({dest.describe(exc)}); a worker needs a durable queue with "
                "x-single-active-consumer to keep the order: delete it or use another group="
            ) from None
        before = int(queue.declaration_result.consumer_count or 0)
        await queue.bind(dest.exchange_name, routing_key=consumer.bindings[self.partition])

        def on_close(*_args: Any) -> None:
            self._stop_taking()
            if not (self.closing and self.channel is channel) and not consumer.stopping:
                self.revoke("the channel to RabbitMQ was closed: the broker gives the "
                            "partition's unacknowledged messages to another worker")

        channel.close_callbacks.add(on_close)
        if consume:
            underlay = await channel.get_underlay_channel()
            active, partition = consumer.active, self.partition

            def take(tag: int, redelivered: bool, body: bytes) -> None:
                # the broker made this worker the queue's active consumer
                active.add(partition)
                inbox.put(Delivery(body, (underlay, tag), redelivered))

            async def deliver(message: Any) -> None:  # aiormq's own message: no wrapper made
                if self.channel is channel:  # not a late one of a channel handed over
                    take(message.delivery.delivery_tag, bool(message.delivery.redelivered),
                         message.body)

            split = getattr(dest.connection, "split", None)  # walex.workers.amqpdeliveries
            if split is not None:  # the deliveries straight from the connection's bytes
                self._taking = (split, underlay.number, take)
                split.register(underlay.number, take)
            def on_cancel(frame: Any) -> None:  # the queue deleted under the consumer
                if self.channel is channel and not consumer.stopping:
                    self._stop_taking()
                    self.revoke(f"the broker cancelled the subscription to queue {name!r} "
                                "(deleted?)")
                    inbox.wake()

            cancels = getattr(underlay, "on_consumer_cancel_callbacks", None)
            if cancels is not None:  # (aiormq 7)
                cancels.add(on_cancel)
            ok = await underlay.basic_consume(name, deliver, no_ack=False)
            self._consuming = (underlay, ok.consumer_tag)
        return before

    def _stop_taking(self) -> None:
        if self._taking is not None:
            split, number, take = self._taking
            self._taking = None
            split.unregister(number, take)

    def check(self) -> None:
        if self.channel.is_closed or self.consumer.lost:
            raise Unavailable("the channel to RabbitMQ was closed")
        consuming = self._consuming
        if consuming is not None and consuming[1] not in consuming[0].consumers:
            # the broker sent Basic.Cancel: nothing more comes on this subscription
            raise Unavailable(f"the broker cancelled the subscription to queue "
                              f"{self.consumer.queues[self.partition]!r} (was it deleted?)")

    async def receive(self, wait: float) -> list[Delivery]:
        self.check()
        if self.shed:
            await self._hand_over()
        inbox = self.inbox
        if not inbox.items:
            waiter = inbox.waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(waiter, wait)
            except TimeoutError:
                self.check()
                return []
            finally:
                inbox.waiter = None
            if not inbox.items:  # woken with nothing: the subscription ended
                self.check()
        items, inbox.items = inbox.items, []
        return items

    async def _hand_over(self) -> None:
        """Nothing in hand: close the channel (the broker puts what it prefetched back in
        place and makes the next worker in line the active one) and queue up again, last."""
        self.shed = False
        self.consumer.active.discard(self.partition)
        await self._close_channel()
        try:
            before = await asyncio.wait_for(self.subscribe(), self.consumer.destination.timeout)
        except ConfigError:
            raise
        except Exception as exc:
            raise self.consumer.destination.unavailable("subscribing again failed", exc) from None
        if not before:  # nobody else there: still this worker's
            self.consumer.active.add(self.partition)
        log.info("worker group %r: partition %d handed over to the next worker in line",
                 self.consumer.group, self.partition)

    async def _close_channel(self) -> None:
        self.closing = True
        self._stop_taking()  # what still comes on it is dropped: the broker puts it back
        try:
            await asyncio.wait_for(self.channel.close(), self.consumer.destination.timeout)
        except Exception as exc:
            log.debug("closing the channel of partition %d: %r", self.partition, exc)

    async def ack(self, deliveries: list[Delivery]) -> None:
        try:
            channel, tag = deliveries[-1].handle  # every one before it too, in one frame
            await channel.basic_ack(tag, multiple=True)
        except Exception as exc:
            raise self.consumer.destination.unavailable("acknowledging failed", exc) from None

    async def release(self, deliveries: list[Delivery]) -> None:
        """Close the channel: the broker puts back every unacknowledged message of the
        queue in its place (a negative acknowledgement of some would let the messages
        still in the buffer overtake them)."""
        await self._close_channel()


class RabbitMQConsumer(Consumer):
    scheme = "amqp"
    destination_class = _SourceExchange
    accepted = ("prefetch", "balance")
    destination: _SourceExchange

    def take_options(self, url: DestinationURL) -> None:
        self.prefetch = url.take_int("prefetch", 100, minimum=1) or 100
        self.balance = url.take_float("balance", 5.0, minimum=0.1)

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
        self.stopping = False  # close() closes the connection: not a loss
        self.active: set[int] = set()  # partitions the broker made this worker the consumer of
        self._balancer: asyncio.Task[None] | None = None

    def no_permission(self, queue: str, exc: BaseException) -> ConfigError:
        """The broker refused the user access to a queue of the group (or to the exchange)."""
        dest = self.destination
        group = f"{dest.exchange_name}.{self.group}."
        queues = "^" + re.escape(group)
        return dest.misconfigured(
            f"RabbitMQ user {dest.user!r} was refused access to queue {queue!r} of group "
            f"{self.group!r} (exchange {dest.exchange_name!r}) in vhost {dest.vhost!r} "
            f"({dest.describe(exc)}): a worker needs configure and write permission on its "
            "group's queues (it declares and binds them) and read on them and on the exchange",
            "grant it (" + dest.grant(queues, queues, f"{queues}|{pattern(dest.exchange_name)}")
            + ")",
        )

    async def declare(self) -> None:
        """Declare the exchange (as the relay does) and the group's queues, bound."""
        self.destination.passive = False
        try:
            await self.destination.open()
            timeout = self.destination.timeout
            for lane in [RabbitMQLane(p, self) for p in range(self.partitions)]:
                await asyncio.wait_for(lane.subscribe(consume=False), timeout)
                await lane._close_channel()
            await asyncio.wait_for(self._check_more(), timeout)
            log.info("declared the exchange %r and the queues %s... of group %r on %s",
                     self.destination.exchange_name, self.queues[0], self.group, self.display)
        finally:
            self.destination.passive = True
            await self.close()

    async def _exists(self, channel: Any, name: str) -> tuple[Any, bool]:
        """``(channel, exists)``; a missing queue closes the channel: a new one then."""
        try:
            await channel.declare_queue(name, passive=True)
            return channel, True
        except ChannelNotFoundEntity:
            return await self.destination.connection.channel(publisher_confirms=False), False

    async def _check_more(self) -> None:
        """A queue for partition ``partitions`` means the group has more partitions."""
        channel = await self.destination.connection.channel(publisher_confirms=False)
        channel, more = await self._exists(channel, f"{self.destination.exchange_name}."
                                                    f"{self.group}.{self.partitions}")
        await channel.close()
        if more:
            raise ConfigError(
                f"worker source {self.display}: group {self.group!r} has a queue for partition "
                f"{self.partitions} too, so it was declared with more partitions than this "
                f"worker's partitions={self.partitions}: give the worker the relay's partitions "
                "(or delete the group's extra queues if the relay now has fewer)"
            )

    async def _check_group(self) -> None:
        """The group's queues must exist: a group created now would silently start
        mid-stream, without what the relay published before."""
        channel = await self.destination.connection.channel(publisher_confirms=False)
        for p, name in enumerate(self.queues):
            channel, exists = await self._exists(channel, name)
            if not exists:
                await channel.close()
                hint = (f" (its queues stop at partition {p - 1}: was it declared with "
                        f"partitions={p}? the worker's partitions must be the relay's)") if p else ""
                raise ConfigError(
                    f"worker source {self.display}: queue {name!r} of group {self.group!r} does "
                    f"not exist{hint}. A worker does not create its group's queues, as a group "
                    "created while the relay publishes would miss what was published before: "
                    "declare the group before the relay publishes ('walex worker --declare "
                    "SOURCE_URL', or walex.workers.declare(url)); declared later, it receives "
                    "what is published from then on"
                )
        await channel.close()
        await self._check_more()

    async def open(self) -> list[Lane]:
        dest = self.destination
        self.lost = False
        self.stopping = False
        self.active = set()
        try:
            await dest.open()  # connects; the exchange must exist
            self.lost = False
            lanes = [RabbitMQLane(p, self) for p in range(self.partitions)]

            def on_close(*_args: Any) -> None:
                self.lost = True
                for lane in lanes if not self.stopping else ():
                    lane.revoke("the connection to RabbitMQ was lost: the broker gives the "
                                "partition's unacknowledged messages to another worker")

            dest.connection.close_callbacks.add(on_close)
            await asyncio.wait_for(self._check_group(), dest.timeout * 2)
            # The broker makes a queue's first consumer its active one: subscribing from a
            # random partition on spreads the partitions over workers started together;
            # the balancer spreads them over workers started one after the other.
            offset = random.randrange(self.partitions)
            for p in [(p + offset) % self.partitions for p in range(self.partitions)]:
                if not await asyncio.wait_for(lanes[p].subscribe(), dest.timeout):
                    self.active.add(p)
        except (ConfigError, Unavailable):
            await self.close()
            raise
        except ChannelAccessRefused as exc:  # looking at the group's queues
            await self.close()
            raise self.no_permission(self.queues[0], exc) from None
        except Exception as exc:
            await self.close()
            raise dest.unavailable("subscribing failed", exc) from None
        self.lanes = lanes
        self._balancer = asyncio.create_task(self._balance(), name="walex-worker-balance")
        log.info("worker group %r consumes %d partition queue(s) %s... on %s",
                 self.group, self.partitions, self.queues[0], self.display)
        return list(self.lanes)

    async def _balance(self) -> None:
        """Every ``balance`` seconds: with W workers on the queues, hold at most
        ceil(partitions / W); hand the rest over (each lane when idle)."""
        while True:
            await asyncio.sleep(self.balance)
            try:
                self._shed(await asyncio.wait_for(self._workers(), self.destination.timeout * 2))
            except Exception as exc:  # the lanes notice a lost connection
                log.debug("counting the workers of group %r: %r", self.group, exc)

    def _shed(self, workers: int) -> None:
        """Mark the partitions beyond this worker's share to be handed over."""
        share = math.ceil(self.partitions / max(workers, 1))
        held = sorted(p for p in self.active if not self.lanes[p].shed)
        extra = len(held) - share
        if extra > 0:
            for p in random.sample(held, extra):
                self.lanes[p].shed = True
            log.info("worker group %r: %d worker(s), this one holds %d of %d partitions; "
                     "handing %d over", self.group, workers, len(held), self.partitions, extra)

    async def _workers(self) -> int:
        """The consumers of the group's queues (every worker consumes every queue)."""
        channel = await self.destination.connection.channel(publisher_confirms=False)
        try:
            counts = []
            for name in self.queues:
                queue = await asyncio.wait_for(channel.declare_queue(name, passive=True),
                                               self.destination.timeout)
                counts.append(int(queue.declaration_result.consumer_count or 0))
            return max(counts)
        finally:
            await channel.close()

    async def close(self) -> None:
        balancer, self._balancer = self._balancer, None
        if balancer is not None:
            balancer.cancel()
            await asyncio.gather(balancer, return_exceptions=True)
        self.lanes = []
        self.stopping = True
        await close_quietly(self.destination)  # unacknowledged messages go back to their queues
