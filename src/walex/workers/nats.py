"""NATS JetStream source: ``nats://host:4222?stream=WALEX&partitions=4``.

The relay's destination URL, plus ``partitions`` (the relay's), ``group``
(default ``walex``), ``ack_wait`` (seconds, default 30) and ``prefetch``
(messages a partition lets out at once, default 1; 1 to 10,000).

``prefetch=1`` (the default) is what follows. With ``prefetch=N`` > 1 the
consumers have ``max_ack_pending=N`` and a lane takes batches of up to N
messages (:class:`~walex.workers.natsbatch.BatchLane`): the server no longer
keeps one worker per partition then, so a worker pulls a partition only while
it holds the partition's lease in the JetStream key-value bucket
``walex_leases_<group>`` (:mod:`walex.workers.natslease`; the workers share
the partitions out between them), and handles nothing of it until every
message pending on the consumer is its own. The workers of a group share one
prefetch: an existing consumer whose ``max_ack_pending`` is not the worker's
prefetch is a :class:`~walex.errors.ConfigError` naming the fix (stop the
workers, then ``walex worker --declare`` with the new prefetch updates the
consumers).

For each partition ``p`` the worker uses a durable pull consumer named
``<group>_<p>`` on the stream, filtered on that partition's subjects (the
subject template with its ``{schema}``, ``{table}`` and ``{type}`` tokens
as ``*`` and ``{partition}`` as ``p``) and created with
``max_ack_pending=1``: the server lets one message of the partition be
unacknowledged at a time, whichever worker fetched it, and hands out the
next one, to any worker, only once that one is acknowledged. So the
partition's messages are handled one after the other, in stream order, by
however many workers; a handler receives one event per call. The
acknowledgement asks for the next message too (JetStream's ``+NXT``, one
request of ``batch`` 1 expiring after the worker's poll), so a partition
with messages waiting costs one message to the server per event, not an
acknowledgement and a fetch request; a worker that stops gives back at once
what came for such a request and was not handled. The lanes take their
messages straight from nats-py's parser, or from the socket's chunks before
nats-py's read loop wakes (:mod:`walex.workers.natstap`), and write their
acknowledgements to the transport (:mod:`walex.workers.natsdirect`): at once
when no other lane woken by a message is still to answer, else with theirs in
one write; the subscriptions' queues and ``fetch`` are the fallback for a
nats-py walex did not check.

A message that is not acknowledged within ``ack_wait`` seconds is delivered
again: that is how the message a killed worker held goes to another worker
(after ``ack_wait``). While it holds a message, a worker tells the server it
is still working on it every ``ack_wait / 3`` seconds and has the server
confirm it (a flush), so a slow handler keeps its message. The worker's
lease ends ``ack_wait / 4`` before the server could hand the message out
again (``ack_wait`` after the fetch or the last confirmed report): then the
call is cancelled, its message neither acknowledged nor given back, and the
worker reconnects (:mod:`walex.workers.lease`). So a worker whose connection
went silent stops its call before another worker starts the message. A
message given back (a worker stopping) is negatively acknowledged and goes
out again at once.

The consumers are created when missing (deliver policy ``all``: a new
group starts with the oldest message the stream keeps); an existing one
whose filter or ``max_ack_pending`` differ is an error naming it, since it
could not keep the order (``--declare`` updates a ``max_ack_pending`` to the
URL's prefetch). The stream is the relay's: a worker never creates
it (a missing or mistyped stream is a :class:`~walex.errors.ConfigError`,
naming the stream that holds the subjects if there is one), and checks it at
start, then every ``recheck_every`` seconds while partition 0 is idle: its
subjects must hold the worker's filters, and its newest message must have
been published with the worker's ``partitions`` to a subject a filter takes,
else the worker stops with a ``ConfigError`` rather than idle for ever. Each
lane looks at its consumer every ``recheck_every`` seconds too, busy or idle
(:meth:`NatsConsumer.look`): deleted (its requests would go unanswered for
ever), or its filter or ``max_ack_pending`` edited by hand (the order would be
lost), the worker stops with a ``ConfigError``; its ``ack_wait`` edited, the
worker reconnects to keep the new one (shortened: the call in hand cut off
first).
:meth:`NatsConsumer.declare` (``walex worker --declare``) creates the
stream as the relay does, and the group's consumers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from ..destinations.base import DestinationURL, Unavailable
from ..errors import ConfigError
from .base import Consumer, Lane, close_quietly, partition_filter
from .natsbatch import BatchLane
from .natsbox import guard_pongs
from .natsdirect import Inboxes
from .natslane import NatsLane
from .natslease import Leases, bucket_name, open_bucket, reraise_cancel
from .natsstream import _SourceStream, refuse, verify

__all__ = ["NatsConsumer"]

log = logging.getLogger("walex.workers")


class NatsConsumer(Consumer):
    scheme = "nats"
    destination_class = _SourceStream
    accepted = ("ack_wait", "prefetch")
    max_prefetch = 10_000
    destination: _SourceStream
    recheck_every = 30.0  # seconds between looks at the stream while partition 0 is idle
    direct = True  # the lanes' messages straight from the parser (walex.workers.natsdirect)
    tap = True  # and from the socket's chunks while the read loop is idle (walex.workers.natstap)

    def trouble(self) -> str | None:
        return None if self.leases is None else self.leases.trouble()

    def take_options(self, url: DestinationURL) -> None:
        self.ack_wait = url.take_float("ack_wait", 30.0, minimum=0.1)
        self.prefetch = url.take_int("prefetch", 1, minimum=1) or 1
        if self.prefetch > self.max_prefetch:
            raise ConfigError(f"worker source {url.display}: prefetch must be at most "
                              f"{self.max_prefetch} (messages held per partition), got "
                              f"{self.prefetch}")

    def __init__(self, url: DestinationURL) -> None:
        super().__init__(url)
        self.stream = self.destination.stream
        self.template = self.destination.subject.text
        self.filters = [partition_filter(self.template, p, self.partitions, url.display, "subject")
                        for p in range(self.partitions)]
        self.lanes: list[NatsLane | BatchLane] = []
        self.leases: Leases | None = None  # prefetch > 1: the partitions' leases (trouble())
        self.declaring = False
        self.inboxes: Inboxes | None = None  # the direct way's hook, while it is set
        self.checked = 0.0  # when the stream was last compared with this worker's setup
        self.since: Any = None  # when the oldest of the group's consumers was made (server's)
        self.made = False  # this open() made one of the group's consumers (natslease.FIRST)

    def check(self) -> None:
        """Raise :class:`Unavailable` when the connection is gone."""
        nc = self.destination.nc
        if nc is None or not nc.is_connected:
            raise Unavailable("the connection to NATS was lost")

    async def declare(self) -> None:
        """Create the stream (as the relay does) and the group's consumers when missing."""
        self.destination.create = self.declaring = True
        try:
            await self.open()
        finally:
            self.destination.create = self.declaring = False
            await self.close()

    async def open(self) -> list[Lane]:
        try:
            await self.destination.open()  # connects; the stream must exist
            guard_pongs(self.destination.nc)  # a late PONG must not end its read loop
            js = self.destination.js
            await self.verify()
            self.lanes = []
            self.since = None
            self.made = False
            for p, subject in enumerate(self.filters):
                name = f"{self.group}_{p}"
                ack_wait = await self._ensure_consumer(js, name, subject)
                psub = await js.pull_subscribe_bind(durable=name, stream=self.stream)
                self.lanes.append(NatsLane(p, self, psub, ack_wait) if self.prefetch == 1 else
                                  BatchLane(p, self, psub, ack_wait, self.prefetch, name))
            if self.direct:
                self._hook()
            if self.prefetch > 1 and self.declaring:  # the group's lease bucket, made now
                await open_bucket(js, bucket_name(self.group),
                                  max(lane.ack_wait for lane in self.lanes), first=self.made)
            elif self.prefetch > 1:
                await self._lease()
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

    def _hook(self) -> None:
        """Take the lanes' messages straight from the parser, when the client allows it."""
        nc = self.destination.nc
        lanes = {getattr(getattr(lane.psub, "_sub", None), "_id", None): lane
                 for lane in self.lanes}
        if None in lanes or len(lanes) != len(self.lanes) or \
                not all(isinstance(getattr(lane.psub, "_nms", None), str) for lane in self.lanes):
            return
        inboxes = Inboxes.install(nc, {sid: lane.arrive for sid, lane in lanes.items()},
                                  taps=self.tap)
        if inboxes is None:
            log.debug("the worker's messages go through nats-py's subscriptions (a nats-py "
                      "walex did not check)")
            return
        self.inboxes = inboxes
        for lane in self.lanes:
            lane.direct = inboxes

    async def _lease(self) -> None:
        """prefetch > 1: the lanes pull only while this worker holds their partition's lease
        (:mod:`walex.workers.natslease`); the lease lasts the consumers' ack_wait."""
        lanes: list[BatchLane] = self.lanes  # type: ignore[assignment]
        self.leases = Leases(
            self.destination.nc, self.group, self.stream, self.partitions,
            max(lane.ack_wait for lane in lanes),
            granted=lambda p: lanes[p].grant(), lost=lambda p, why: lanes[p].lose(why),
            shed=lambda p: lanes[p].shed(), name=f"{socket.gethostname()}-{os.getpid()}",
            scrub=self.url.scrub, since=self.since, first=self.made)
        for lane in lanes:
            lane.leases = self.leases
        await self.leases.open()

    async def verify(self) -> None:
        """Raise :class:`ConfigError` when the stream cannot feed this worker
        (:func:`~walex.workers.natsstream.verify`)."""
        self.checked = time.monotonic()
        await verify(self.destination, self.filters, self.partitions, self.display,
                     self.template)

    async def recheck(self, partition: int) -> None:
        """Look at the stream again, now and then while partition 0 is idle."""
        if partition != 0 or time.monotonic() - self.checked < self.recheck_every:
            return
        try:
            await self.verify()
        except ConfigError:
            raise
        except Exception as exc:  # no answer now: the next look tells
            self.checked = time.monotonic()
            log.debug("looking at stream %r: %r", self.stream, exc)

    async def look(self, lane: NatsLane | BatchLane) -> None:
        """Every ``recheck_every`` seconds per lane, busy or idle: its consumer must still be
        as the worker found it. Deleted (its requests go unanswered: the lane would idle for
        ever), or its filter or ``max_ack_pending`` edited (the order is not kept): a
        :class:`ConfigError`; its ``ack_wait`` edited: the call in hand is cut off (shorter:
        the server may have handed its messages out again) and the worker reconnects, to
        keep the new one."""
        lane.looked = time.monotonic()
        name = f"{self.group}_{lane.partition}"
        try:
            info = await self.destination.js.consumer_info(
                self.stream, name, timeout=max(min(lane.ack_wait / 3, 5.0), 0.5))
        except NotFoundError:
            await self.verify()  # the stream itself deleted: says so
            raise ConfigError(
                f"worker source {self.display}: the consumer {name!r} of stream {self.stream!r} "
                f"was deleted while the worker ran (partition {lane.partition} would never be "
                f"handled). A new one starts with the oldest message the stream keeps (those "
                f"are handled again): stop the group's workers, run 'walex worker --declare "
                f"SOURCE_URL', then start them") from None
        except Exception as exc:  # no answer now: the next look tells
            reraise_cancel()
            log.debug("looking at consumer %r: %r", name, exc)
            return
        refuse(self.display, self.stream, name, info.config, self.filters[lane.partition],
               self.prefetch)
        ack_wait = info.config.ack_wait
        if ack_wait and abs(ack_wait - lane.ack_wait) > 1e-3:
            reason = (f"the consumer {name!r} of stream {self.stream!r} has ack_wait={ack_wait:g}s "
                      f"now, not {lane.ack_wait:g}s (edited while the worker ran)")
            if ack_wait < lane.ack_wait:
                lane.revoke(reason)
            raise Unavailable(f"partition {lane.partition}: {reason}; reconnecting to keep it")

    async def _ensure_consumer(self, js: Any, name: str, subject: str) -> float:
        """Create the partition's durable consumer, or check the existing one; its ack_wait."""
        try:
            info = await js.consumer_info(self.stream, name)
        except NotFoundError:
            config = ConsumerConfig(
                durable_name=name, filter_subject=subject, ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL, max_ack_pending=self.prefetch, ack_wait=self.ack_wait,
                max_deliver=-1,
            )
            try:
                info = await js.add_consumer(self.stream, config)
                self.made = True
            except Exception:  # another worker created it meanwhile, maybe otherwise
                info = await js.consumer_info(self.stream, name)
        created = getattr(info, "created", None)
        if created is not None and (self.since is None or created < self.since):
            self.since = created
        config = info.config
        if config.max_ack_pending != self.prefetch and self.declaring:
            # walex worker --declare: the group's prefetch is this one's (its filter and
            # acknowledgements must be right already)
            refuse(self.display, self.stream, name, config, subject, config.max_ack_pending)
            info = await js.add_consumer(self.stream, config.evolve(max_ack_pending=self.prefetch))
            log.info("consumer %r: max_ack_pending %s -> %d", name, config.max_ack_pending,
                     self.prefetch)
            return float(info.config.ack_wait or self.ack_wait)
        refuse(self.display, self.stream, name, config, subject, self.prefetch)
        if config.ack_wait and abs(config.ack_wait - self.ack_wait) > 1e-3:
            log.warning("consumer %r has ack_wait=%gs (not %gs): a killed worker's message "
                        "goes to another after %gs", name, config.ack_wait, self.ack_wait,
                        config.ack_wait)
        return float(config.ack_wait or self.ack_wait)

    async def close(self) -> None:
        lanes, self.lanes = self.lanes, []
        leases, self.leases = self.leases, None
        if leases is not None:
            await leases.stop()  # no lease taken meanwhile; the lanes give theirs back
        results = await asyncio.gather(*(lane.release_held() for lane in lanes),
                                       return_exceptions=True)
        for lane, result in zip(lanes, results):
            if isinstance(result, Exception):  # they come back after ack_wait instead
                log.warning("worker: giving back the messages held for partition %s failed: %r;"
                            " the server delivers them again after ack_wait", lane.partition, result)
            elif isinstance(result, BaseException):
                raise result
        if leases is not None:
            await leases.close()
        inboxes, self.inboxes = self.inboxes, None
        if inboxes is not None:
            inboxes.release()
        await close_quietly(self.destination)
