"""A worker's calls: the deliveries of a lane, handed to the handlers and acknowledged.

Contract: :class:`Calls` is the part of :class:`~walex.workers.Worker` that
runs in each lane's task (:meth:`Calls._lane`): it receives a lane's
deliveries, types them into events (:mod:`walex.destinations.decoding`),
groups one transaction's consecutive events per call (with ``max_batch``
handlers and ``concurrency`` 1, the consecutive transactions received
together), drops events this worker handled already, and calls the
dispatcher under the partition's :class:`~walex.workers.lease.Lease`
(within the worker's ``concurrency`` slots, :mod:`walex.workers.gate`).

- A delivery is acknowledged (:meth:`~walex.workers.base.Lane.ack`) only
  after the call that had it returned, or the error policy disposed of it;
  one that was not is given back (:meth:`~walex.workers.base.Lane.release`)
  when the call fails, the worker stops or the lane is revoked.
- A lane revoked during a call (the worker lost the partition) cancels the
  call; its deliveries are not acknowledged and :class:`Unavailable` is
  raised (the worker reconnects); the worker's own cancellation goes on.
  A call cut off alone (:meth:`~walex.workers.base.Lane.cut`: a Kafka
  partition moved, a NATS batch lane's lease lost) is cancelled the same way
  and its deliveries given back, and the lane goes on (with its other
  partitions, or waiting to hold its own again), without reconnecting; so do
  deliveries whose partition was lost after they were handed out and before
  their call (:meth:`~walex.workers.base.Lane.gone`): never called.
- A message that is not a walex event is a failure under the error policy;
  one published with other partitions than this worker's is a
  :class:`~walex.errors.ConfigError` (the worker stops).

It imports nothing of :mod:`walex.workers` itself; the worker provides the
attributes annotated on the class.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

from ..destinations.base import Unavailable
from ..destinations.decoding import Decoder
from ..dispatch import Dispatcher
from ..errors import ConfigError, DecodeError, HandlerError
from ..event import Event
from ..observe.workers import WorkerStats
from ..transactions import Transaction
from .base import CallCut, Consumer, Delivery, Lane
from .gate import Gate
from .lease import _CURRENT, Lease

__all__ = ["CallCut", "Calls"]

log = logging.getLogger("walex.workers")


class Calls:
    """The lanes' loop and calls of a worker (see the module's doc)."""

    # provided by the worker (walex.workers.Worker)
    name: str
    poll: float
    remember: int
    ack_interval: float
    consumer: Consumer
    dispatcher: Dispatcher
    decoder: Decoder
    concurrency: int
    stats: WorkerStats | None
    _slots: Gate
    _seen: OrderedDict[tuple[str, str], None]
    _closing: bool
    events_handled: int
    duplicates: int
    redeliveries: int
    undecodable: int
    fenced: int

    async def _lane(self, lane: Lane) -> None:
        # the lane's task, looked up once: on Python 3.11 each lookup asks the OS for the pid
        lane.task = asyncio.current_task()
        while not self._closing:
            deliveries = await lane.receive(self.poll)
            try:
                if len(deliveries) == 1 and self.stats is None:  # a NATS lane's every call
                    await self._handle_one(lane, deliveries)
                elif deliveries:
                    await self._handle(lane, deliveries)
            except CallCut:  # given back, not acknowledged: the lane goes on
                pass

    async def _handle(self, lane: Lane, deliveries: list[Delivery]) -> None:
        """Handle the deliveries in order, a transaction's consecutive events per call."""
        if self.stats is not None and deliveries[-1].pending is not None:
            self.stats.pending[lane.partition] = deliveries[-1].pending
        if len(deliveries) == 1:  # a NATS lane's every time: the same steps, fewer of them
            await self._handle_one(lane, deliveries)
            return
        items: list[tuple[Delivery, Event | None, DecodeError | None]] = []
        for delivery in deliveries:
            try:
                event = self._event(delivery)
            except DecodeError as exc:
                items.append((delivery, None, exc))
            except ConfigError:
                await lane.release(deliveries)
                raise
            else:
                items.append((delivery, event, None))
        # The messages are acknowledged once, after the last call of the batch (one
        # acknowledgement where the broker takes cumulative ones): deliveries[:done] are
        # handled or disposed of, deliveries[:acked] acknowledged.
        acked = done = 0
        across = self.dispatcher.batching and self.concurrency == 1  # kept events: one call at a time
        since = time.monotonic()  # of the oldest unacknowledged message (a broker may time it out)
        while done < len(items):
            if self._closing:
                await self._ack_handled(lane, deliveries[acked:done])
                await lane.release(deliveries[done:])
                return
            delivery, event, error = items[done]
            if event is None:
                if self.dispatcher.on_error == "stop":
                    await self._ack_handled(lane, deliveries[acked:done])
                    acked = done
                await self._undecodable(lane, deliveries[done:], error)
                done += 1
                continue
            # one call per transaction; with max_batch handlers, one for the consecutive
            # transactions received together (the dispatcher calls the others per transaction)
            groups: list[list[Event]] = []
            j = done
            n = len(items)
            while j < n and items[j][1] is not None and (j == done or across):
                first = items[j][1].id  # type: ignore[union-attr]
                commit = first.partition("-")[0]
                prefix = commit + "-"  # an id is "<commit>-<position>"
                k = j + 1
                while k < n:
                    later = items[k][1]
                    if later is None or not (later.id.startswith(prefix) or later.id == commit):
                        break
                    k += 1
                groups.append([e for _, e, _ in items[j:k]])  # type: ignore[misc]
                j = k
            try:
                await self._call(lane, groups, deliveries[done:j])
            except BaseException:
                await self._ack_handled(lane, deliveries[acked:done])
                await lane.release(deliveries[done:])
                raise
            done = j
            if done < len(items) and time.monotonic() - since > self.ack_interval:
                await lane.ack(deliveries[acked:done])  # slow calls: do not hold them for long
                acked, since = done, time.monotonic()
        await lane.ack(deliveries[acked:])

    def _event(self, delivery: Delivery) -> Event:
        """The event of a delivery (counted if redelivered); DecodeError when it is not a
        walex event, ConfigError (the caller gives the deliveries back) when it was
        published with other partitions than this worker's."""
        if delivery.redelivered:
            self.redeliveries += 1
        doc = self.decoder.document(delivery.body)
        theirs, mine = doc.get("walexpartitions"), self.consumer.partitions
        if mine > 1 and isinstance(theirs, int) and theirs != mine:
            raise ConfigError(
                f"worker {self.name!r}: message {doc.get('id')} was published with "
                f"partitions={theirs}, and this worker has partitions={mine}: its source URL "
                f"must say the relay's partitions (&partitions={theirs}), or some partitions "
                "are never handled"
            )
        return self.decoder.decode(doc)

    async def _handle_one(self, lane: Lane, deliveries: list[Delivery]) -> None:
        """:meth:`_handle` of a single delivery: its steps without the grouping."""
        try:
            event = self._event(deliveries[0])
        except ConfigError:
            await lane.release(deliveries)
            raise
        except DecodeError as exc:
            if self._closing:
                await lane.release(deliveries)
                return
            await self._undecodable(lane, deliveries, exc)
            await lane.ack(deliveries)
            return
        if self._closing:
            await lane.release(deliveries)
            return
        try:
            await self._call(lane, [[event]], deliveries)
        except BaseException:
            await lane.release(deliveries)
            raise
        await lane.ack(deliveries)

    async def _ack_handled(self, lane: Lane, handled: list[Delivery]) -> None:
        """Before giving the rest back: acknowledge what was handled, if the lane is still
        this worker's (else, or failing, it comes again: at-least-once)."""
        if not handled or lane.revoked.is_set():
            return
        try:
            await lane.ack(handled)
        except Exception as exc:
            log.debug("worker %r: acknowledging the handled messages before giving the rest "
                      "back failed: %r", self.name, exc)

    async def _call(self, lane: Lane, groups: list[list[Event]], deliveries: list[Delivery]) -> None:
        """Dispatch the transactions ``groups`` under the partition's lease: the call is
        cancelled when the lane is revoked (this worker lost the partition), and then
        nothing is acknowledged."""
        events = groups[0] if len(groups) == 1 else [e for group in groups for e in group]
        last = deliveries[-1]
        redelivered = last.redelivered if len(deliveries) == 1 else \
            any(d.redelivered for d in deliveries)
        lease = Lease(lane.partition, events[-1].id, redelivered, last.attempt, last.sequence, lane)
        if lane.revoked.is_set():
            raise Unavailable(f"partition {lane.partition}: {lane.reason}")
        gone = lane.gone() if lane.alone else None
        if gone is not None:  # the partition alone was lost since they were handed out
            self.fenced += 1
            log.warning("worker %r: partition %d lost (%s) before the call with events %s..%s: "
                        "not called, nothing acknowledged; the worker goes on with its other "
                        "partitions", self.name, lane.partition, gone, events[0].id, events[-1].id)
            raise CallCut(gone)
        # The call runs in the lane's own task (no task of its own per call): revoke()
        # cancels that task, only while lane.call names it, i.e. within the await below
        # (it is called from other tasks and callbacks, so the cancellation lands there).
        task = lane.task if lane.task is not None else asyncio.current_task()
        assert task is not None
        failure: BaseException | None = None
        token = _CURRENT.set(lease)
        lane.call = task
        lane.lease = lease
        try:
            await self._dispatch(lane.partition, groups)
        except BaseException as exc:  # decided below: the partition may be lost
            failure = exc
        finally:
            lane.call = lane.lease = None
            _CURRENT.reset(token)
        if lease.cut or lane.revoked.is_set():
            cut, revoked = lease.cancelled, lane.revoked.is_set()
            # Lane.cut() and revoke() each cancelled this task once, during the call: those
            # requests are taken back, and the call's own outcome does not count; the
            # worker's own cancellation (stop) goes on
            left = 0
            for _ in range(cut + revoked):
                left = task.uncancel()
            if left > 0:
                raise failure if isinstance(failure, asyncio.CancelledError) else \
                    asyncio.CancelledError()
            self.fenced += 1
            if not revoked:  # this call alone: its messages given back, the lane goes on
                log.warning("worker %r: partition %d lost (%s) during the call with events "
                            "%s..%s: cut off, nothing acknowledged; the worker goes on with its "
                            "other partitions", self.name, lane.partition, lease.cut,
                            events[0].id, events[-1].id)
                await self._thread_done(lane.partition)
                raise CallCut(lease.cut)
            log.warning("worker %r: partition %d lost (%s) during the call with events %s..%s: "
                        "cut off, nothing acknowledged", self.name, lane.partition, lane.reason,
                        events[0].id, events[-1].id)
            raise Unavailable(f"partition {lane.partition}: {lane.reason}; the call with events "
                              f"{events[0].id}..{events[-1].id} was cancelled or its end not "
                              "acknowledged")
        if failure is not None:
            if isinstance(failure, asyncio.CancelledError):
                # the worker cut the call off (stop() past shutdown_grace, a reconnect): its
                # messages go back to the broker, so a call that runs on (a plain handler, on
                # its thread) must find its lease lost
                lease.cut = ("this worker cut the call off (stopping or reconnecting): the "
                             "broker hands the partition to another worker")
            raise failure

    async def _thread_done(self, partition: int) -> None:
        """After a call cut off alone: a plain handler of it may still run on the handler
        thread (it cannot be cancelled); the lane gives the partition up only once it
        returned, so no other worker handles the partition while it runs (a Kafka worker
        whose call outlives its revoke limit ends the process instead:
        :mod:`walex.workers.kafkasession`)."""
        idle = asyncio.ensure_future(self.dispatcher.workers.idle())
        done, _ = await asyncio.wait({idle}, timeout=0.05)
        if not done:
            log.warning("worker %r: a plain handler call cut off for partition %d still runs "
                        "on its thread; the partition is given up once it returns (check "
                        "walex.workers.current_lease() in the handler to return sooner)",
                        self.name, partition)
        await idle

    async def _dispatch(self, partition: int, groups: list[list[Event]]) -> None:
        """Call the handlers with each transaction of ``groups``, in order; with several,
        ``max_batch`` handlers get their events in as few calls as their size allows."""
        seen = self._seen
        fresh_groups = []
        keys = []  # of the fresh events, in order: remembered once they are handled
        for events in groups:
            fresh = []
            for event in events:
                key = (event.source.db, event.id)
                if key in seen:
                    self.duplicates += 1
                    log.debug("worker %r: event %s was handled here already; dropped", self.name,
                              event.id)
                    continue
                fresh.append(event)
                keys.append(key)
            if fresh:
                fresh_groups.append(fresh)
        if not fresh_groups:
            return
        defer = len(fresh_groups) > 1
        dispatcher = self.dispatcher
        stats = self.stats
        slots = self._slots
        if not slots.enter_now():
            await slots.enter()
        try:
            started, clock = (time.time(), time.perf_counter()) if stats is not None else (0.0, 0.0)
            try:
                for fresh in fresh_groups:
                    first = fresh[0]
                    await dispatcher.dispatch(
                        Transaction(xid=0, commit_lsn=int(first.id.partition("-")[0], 16),
                                    end_lsn=0, commit_time=first.timestamp, events=fresh),
                        defer=defer)
                if defer and dispatcher.pending:
                    await dispatcher.flush()
            except BaseException:
                dispatcher.drop_pending()  # not acknowledged: they come again
                raise
            handled = fresh_groups[0] if not defer else [e for g in fresh_groups for e in g]
            if stats is not None:
                stats.handled(partition, handled, started, time.perf_counter() - clock)
        finally:
            slots.leave()
        for key in keys:
            seen[key] = None
        while len(seen) > self.remember:
            seen.popitem(last=False)
        self.events_handled += len(handled)

    async def _undecodable(self, lane: Lane, rest: list[Delivery], error: DecodeError | None) -> None:
        """A message that is not a walex event: a failure under the error policy."""
        policy = self.dispatcher.on_error
        if policy == "stop":
            await lane.release(rest)
            raise HandlerError(f"worker {self.name!r}: {error} (partition {lane.partition}); "
                               "it was not acknowledged")
        log.error("worker %r: %s (partition %d); skipped (acknowledged with the batch)",
                  self.name, error, lane.partition)
        self.dispatcher.failures += 1
        self.undecodable += 1
