"""NATS JetStream source: ``nats://host:4222?stream=WALEX&partitions=4``.

The relay's destination URL, plus ``partitions`` (the relay's), ``group``
(default ``walex``) and ``ack_wait`` (seconds, default 30).

For each partition ``p`` the worker uses a durable pull consumer named
``<group>_<p>`` on the stream, filtered on that partition's subjects (the
subject template with its ``{schema}``, ``{table}`` and ``{type}`` tokens
as ``*`` and ``{partition}`` as ``p``) and created with
``max_ack_pending=1``: the server lets one message of the partition be
unacknowledged at a time, whichever worker fetched it, and hands out the
next one, to any worker, only once that one is acknowledged. So the
partition's messages are handled one after the other, in stream order, by
however many workers; a handler receives one event per call.

A message that is not acknowledged within ``ack_wait`` seconds is delivered
again: that is how the message a killed worker held goes to another worker
(after ``ack_wait``). While it holds a message, a worker tells the server it
is still working on it every ``ack_wait / 3`` seconds, so a slow handler
keeps its message. A message given back (a worker stopping) is
negatively acknowledged and goes out again at once.

The consumers are created when missing (deliver policy ``all``: a new
group starts with the oldest message the stream keeps); an existing one
whose filter or ``max_ack_pending`` differ is an error naming it, since it
could not keep the order. The stream is created like the destination does,
so workers may start before the relay.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from ..destinations.base import DestinationURL, Unavailable
from ..destinations.nats import NatsDestination
from ..errors import ConfigError
from .base import Consumer, Delivery, Lane, close_quietly, partition_filter

__all__ = ["NatsConsumer"]

log = logging.getLogger("walex.workers")


class NatsLane(Lane):
    def __init__(self, partition: int, consumer: NatsConsumer, psub: Any, ack_wait: float) -> None:
        super().__init__(partition)
        self.consumer = consumer
        self.psub = psub
        self.every = max(ack_wait / 3, 0.05)
        self.held: dict[int, tuple[Any, asyncio.Task[None]]] = {}

    async def receive(self, wait: float) -> list[Delivery]:
        self.consumer.check()
        try:
            [msg] = await self.psub.fetch(1, timeout=wait)
        except TimeoutError:  # nothing within wait (nats' errors subclass it)
            self.consumer.check()
            return []
        except Exception as exc:
            raise self.consumer.destination.unavailable("fetching failed", exc) from None
        self.held[id(msg)] = (msg, asyncio.create_task(self._progress(msg)))
        meta = msg.metadata
        return [Delivery(msg.data, msg, redelivered=meta.num_delivered > 1, pending=meta.num_pending)]

    async def _progress(self, msg: Any) -> None:
        """Reset the server's ack_wait timer while the message is held."""
        while True:
            await asyncio.sleep(self.every)
            try:
                await msg.in_progress()
            except Exception as exc:  # the connection is gone: the message is redelivered
                log.debug("progress of a held message not sent: %r", exc)
                return

    def _drop(self, msg: Any) -> None:
        _, task = self.held.pop(id(msg), (None, None))
        if task is not None:
            task.cancel()

    async def ack(self, deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            self._drop(delivery.handle)
            try:
                await delivery.handle.ack()
            except Exception as exc:
                raise self.consumer.destination.unavailable("acknowledging failed", exc) from None

    async def release(self, deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            self._drop(delivery.handle)
            try:
                await delivery.handle.nak()
            except Exception as exc:  # not connected: the server redelivers after ack_wait
                log.debug("giving a message back failed: %r", exc)

    async def release_held(self) -> None:
        await self.release([Delivery(b"", msg) for msg, _task in list(self.held.values())])


class NatsConsumer(Consumer):
    scheme = "nats"
    destination_class = NatsDestination
    accepted = ("ack_wait",)
    destination: NatsDestination

    def take_options(self, url: DestinationURL) -> None:
        self.ack_wait = url.take_float("ack_wait", 30.0, minimum=0.1)

    def __init__(self, url: DestinationURL) -> None:
        super().__init__(url)
        self.stream = self.destination.stream
        template = self.destination.subject.text
        self.filters = [partition_filter(template, p, self.partitions, url.display, "subject")
                        for p in range(self.partitions)]
        self.lanes: list[NatsLane] = []

    def check(self) -> None:
        """Raise :class:`Unavailable` when the connection is gone."""
        nc = self.destination.nc
        if nc is None or not nc.is_connected:
            raise Unavailable("the connection to NATS was lost")

    async def open(self) -> list[Lane]:
        await self.destination.open()  # connects; creates the stream when missing
        js = self.destination.js
        try:
            self.lanes = []
            for p, subject in enumerate(self.filters):
                name = f"{self.group}_{p}"
                ack_wait = await self._ensure_consumer(js, name, subject)
                psub = await js.pull_subscribe_bind(durable=name, stream=self.stream)
                self.lanes.append(NatsLane(p, self, psub, ack_wait))
        except Unavailable:
            await self.close()
            raise
        except ConfigError:
            await self.close()
            raise
        except Exception as exc:
            await self.close()
            raise self.destination.unavailable("subscribing failed", exc) from None
        log.info("worker group %r consumes %d partition(s) of stream %r on %s",
                 self.group, self.partitions, self.stream, self.display)
        return list(self.lanes)

    async def _ensure_consumer(self, js: Any, name: str, subject: str) -> float:
        """Create the partition's durable consumer, or check the existing one; its ack_wait."""
        try:
            info = await js.consumer_info(self.stream, name)
        except NotFoundError:
            config = ConsumerConfig(
                durable_name=name, filter_subject=subject, ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL, max_ack_pending=1, ack_wait=self.ack_wait,
                max_deliver=-1,
            )
            try:
                info = await js.add_consumer(self.stream, config)
            except Exception:  # another worker created it meanwhile, maybe otherwise
                info = await js.consumer_info(self.stream, name)
        config = info.config
        if config.max_ack_pending != 1 or config.filter_subject != subject or \
                config.ack_policy != AckPolicy.EXPLICIT:
            raise ConfigError(
                f"worker source {self.display}: the consumer {name!r} of stream {self.stream!r} "
                f"exists with filter_subject={config.filter_subject!r}, max_ack_pending="
                f"{config.max_ack_pending}, ack_policy={config.ack_policy}; a worker needs "
                f"{subject!r}, 1 and explicit to keep the order. Delete it (nats consumer rm "
                f"{self.stream} {name}) or use another group="
            )
        if config.ack_wait and abs(config.ack_wait - self.ack_wait) > 1e-3:
            log.warning("consumer %r has ack_wait=%gs (not %gs): a killed worker's message "
                        "goes to another after %gs", name, config.ack_wait, self.ack_wait,
                        config.ack_wait)
        return float(config.ack_wait or self.ack_wait)

    async def close(self) -> None:
        lanes, self.lanes = self.lanes, []
        for lane in lanes:
            await lane.release_held()
        await close_quietly(self.destination)
