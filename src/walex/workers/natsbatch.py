"""A NATS worker's partition lane with ``prefetch`` > 1: batches, fenced by a lease.

The partition's durable consumer has ``max_ack_pending = prefetch``: the
server lets up to ``prefetch`` messages out unacknowledged, to whichever
client asks. Only the worker holding the partition's lease
(:mod:`walex.workers.natslease`) asks:

- **holding**: the lane keeps one pull request out (``batch`` = ``prefetch``
  minus what it holds, ``expires`` ending before the lease does) and returns
  what arrived as soon as there is something, sorted by stream sequence (a
  duplicate sequence, a message delivered again while held, kept once); what
  arrives while a call runs is held for the next one. :meth:`BatchLane.ack`
  writes an explicit ``+ACK`` per message in one write, only while the lease
  is valid (else nothing is acknowledged and the partition is given up);
  :meth:`BatchLane.release` gives messages back with ``-NAK`` (only while
  valid). Every ``ack_wait / 3`` the held messages get ``+WPI`` in one write,
  confirmed by a flush;
- **taking a partition (seniority)**: a former holder (stopped, frozen, cut
  off) may still have messages pending on the server; they come back as
  redeliveries after ``ack_wait``, first and in stream order, to whoever pulls,
  i.e. this lane. The lane pulls and holds (keeping its messages with
  ``+WPI``) and handles nothing until ``CONSUMER.INFO`` says the consumer's
  ``num_ack_pending`` equals the number of messages it holds that were
  delivered up to the info's ``delivered.consumer_seq``: then every pending
  message is its own. Pending below that (a former holder acknowledged late):
  it gives back everything it holds and starts over. From then on every
  delivery's consumer sequence (the ``<dseq>`` of its reply subject
  ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>``,
  dense across all clients) must follow the last one it saw: a gap means a
  delivery went to someone else (a former holder's request the server served
  late), so the lane gives back what it holds beyond the call in hand and
  waits for seniority again;
- **the lease lost** (a renewal refused, or not confirmed in time, or the
  bucket deleted): that partition alone is given up. The call in hand for it
  is cut off (:meth:`~walex.workers.base.Lane.cut`: cancelled, nothing
  acknowledged, its lease says lost), what the lane holds is forgotten
  unanswered (the server delivers it again after ``ack_wait``; a ``-NAK``
  from a worker that may no longer hold the partition could let a message out
  twice), messages handed out and not yet in a call are not called
  (:meth:`gone`), and the lane waits to take the lease again; the worker stays
  connected and its other partitions' calls go on (before, the lane was
  revoked and the whole worker reconnected, cutting every partition's work);
- **asked to give the partition back** (more leases than its share): after the
  call in hand, the lane lets its pull request end, gives back what it holds
  (``-NAK``) and deletes the lease (:meth:`~walex.workers.natslease.Leases.release`).

Limits: the seniority check compares counts, once per lease taken. A former
holder's acknowledgement written before its lease ended but reaching the server
more than the lease's margin (``ttl / 4``) later, after this lane counted, can
make the counts agree while one of that holder's messages is still pending (when
it also acknowledged one this lane holds again): that message would then come
back after newer ones. The consumer sequences catch a late delivery, not a late
acknowledgement; a connection that holds written bytes back that long (a proxy,
a frozen network path) is what it takes.

The lane takes its messages as :class:`~walex.workers.nats.NatsLane` does
(:mod:`walex.workers.natsbox`: the direct way of :mod:`walex.workers.natsdirect`, else the subscription's queue).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from nats.aio.msg import Msg

from ..destinations.base import Unavailable
from .base import CallCut, Delivery
from .natsbox import BoxLane, is_status
from .natsdirect import Raw
from .natslease import reraise_cancel

__all__ = ["BatchLane"]

log = logging.getLogger("walex.workers")

IDLE, SENIOR, READY = "idle", "senior", "ready"


def message_fields(msg: Any) -> tuple[int, int, int, int]:
    """Deliveries so far, stream sequence, consumer sequence and messages pending after it."""
    reply = msg.reply if type(msg) is Raw else (msg.reply or "").encode()
    tokens = reply.split(b".")
    if len(tokens) == 9 and tokens[0] == b"$JS" and tokens[1] == b"ACK":
        return int(tokens[4]), int(tokens[5]), int(tokens[6]), int(tokens[8])
    meta = Msg(_client=None, reply=reply.decode(), data=b"").metadata  # type: ignore[arg-type]
    return (meta.num_delivered, meta.sequence.stream, meta.sequence.consumer,
            meta.num_pending)


def pub_frames(replies: list[bytes], body: bytes) -> bytes:
    """``PUB <reply> <n>\r\n<body>\r\n`` for each reply subject, in order, in one join
    (not a frame object per message); TypeError when a reply is not bytes."""
    tail = b" %d\r\n%b\r\n" % (len(body), body)
    return b"PUB " + (tail + b"PUB ").join(replies) + tail


class BatchLane(BoxLane):
    """One partition's messages in batches, while this worker holds its lease."""

    check_every = 0.25  # seconds between CONSUMER.INFO requests while taking a partition
    alone = True  # a lost lease gives up this partition alone (gone())

    def __init__(self, partition: int, consumer: Any, psub: Any, ack_wait: float,
                 prefetch: int, durable: str) -> None:
        super().__init__(partition, consumer, psub, ack_wait)
        self.prefetch = prefetch
        self.durable = durable
        self.leases: Any = None  # the consumer's Leases, set before the lane runs
        self.state = IDLE
        self.granted = asyncio.Event()  # a lease was taken for this partition
        self.shedding = False
        # held messages by stream sequence: (message, deliveries, consumer sequence)
        self.mine: dict[int, tuple[Any, int, int]] = {}
        self.given: set[int] = set()  # the stream sequences of the call in hand
        self.next_dseq: int | None = None  # READY: the consumer sequence due next
        self.checked = 0.0  # when the last CONSUMER.INFO went out
        self.request_until = 0.0  # local time the pull request in hand expires (0: none out)
        self.requested = 0  # messages it may still bring
        self._keeper_task: asyncio.Task[None] | None = None
        self.gaps = 0  # deliveries seen to go elsewhere after seniority (for the curious)
        self.lost: str | None = None  # why the lease of what was handed out last was lost
        self.losses = 0  # leases lost (the partition given up alone)

    # -- lease events (from Leases) ------------------------------------------

    def grant(self) -> None:
        self.granted.set()

    def shed(self) -> None:
        self.shedding = True

    def lose(self, reason: str) -> None:
        """The lease is lost: this partition alone is given up (see the module's doc)."""
        self.losses += 1
        self.lost = reason
        self.state = IDLE
        self.shedding = False
        self.next_dseq = None
        self._forget()
        self.cut(reason)  # the call in hand, if any: cancelled, nothing acknowledged

    def gone(self) -> str | None:
        if self.lost is None and self.leases is not None and not self.leases.valid(self.partition):
            # its validity ran out and the timer that says so has not run yet
            self.lose("its lease ended (not renewed in time)")
        return self.lost

    def _forget(self) -> None:
        """Drop, unanswered, what the lane holds and what came for its requests: the
        server delivers them again after ``ack_wait`` (the partition may be another's)."""
        self.mine.clear()
        self.given.clear()
        self.box.clear()
        self.requested = 0
        self.request_until = 0.0
        sub = getattr(self.psub, "_sub", None)
        queue = getattr(sub, "_pending_queue", None)
        while queue is not None and not queue.empty():
            msg = queue.get_nowait()
            sub._pending_size -= len(msg.data)
            queue.task_done()

    # -- receiving -----------------------------------------------------------

    async def receive(self, wait: float) -> list[Delivery]:
        self.consumer.check()
        self.wait = wait
        p = self.partition
        if self.revoked.is_set():
            raise Unavailable(f"partition {p}: {self.reason}")
        if time.monotonic() - self.looked >= self.consumer.recheck_every:
            await self.consumer.look(self)
        leases = self.leases
        if self.state == IDLE:
            if not leases.valid(p):
                try:
                    await asyncio.wait_for(self.granted.wait(), wait)
                except TimeoutError:
                    pass
                return []
            self.granted.clear()
            self._forget()  # what came for an earlier lease's requests
            self._begin()
        if self.shedding:
            await self._give_up()
            return []
        try:
            self._take()
            if self.state == READY and self._fresh():
                return self._deliveries()
            await self._request()
            deadline = time.monotonic() + (min(wait, self.check_every)
                                           if self.state == SENIOR else wait)
            await self._gather(deadline)
            self._take()
            if self.state == SENIOR and time.monotonic() - self.checked >= self.check_every:
                await self._seniority()
        except Unavailable:
            raise
        except Exception as exc:
            reraise_cancel()
            raise self.consumer.destination.unavailable("fetching failed", exc) from None
        if self.state == READY and self._fresh():
            return self._deliveries()
        if self.state == READY:
            await self.consumer.recheck(p)
        return []

    def _begin(self) -> None:
        """The lease was just taken: hold, and handle nothing until seniority."""
        self.state = SENIOR
        self.shedding = False
        self.next_dseq = None
        self.checked = 0.0
        if self._keeper_task is None or self._keeper_task.done():
            self._keeper_task = self._running().create_task(self._keep_held())
        log.debug("partition %d: lease taken; waiting for the former holder's messages", self.partition)

    def _fresh(self) -> bool:
        return len(self.mine) > len(self.given)

    def _deliveries(self) -> list[Delivery]:
        mine, given = self.mine, self.given
        fresh = sorted(mine) if not given else sorted(s for s in mine if s not in given)
        given.update(fresh)
        self.lost = None  # handed out under the lease held now
        out = []
        append = out.append
        for sseq in fresh:
            msg, delivered, _dseq = mine[sseq]
            append(Delivery(msg.data, msg, delivered > 1, None, delivered, sseq))
        return out

    def _take(self) -> None:
        """Move what arrived into ``mine`` (statuses end the request in hand)."""
        box = self.box
        if box:  # the direct way: Raw messages
            arrived = self._arrived
            popleft = box.popleft
            while box:
                raw = popleft()
                if not raw.data and raw.status is not None:
                    self._status(raw.status)
                else:
                    arrived(raw)
        queue = None if self.direct is not None else self.psub._sub._pending_queue
        while True:
            if box:
                msg = box.popleft()
            elif queue is not None and not queue.empty():
                msg = queue.get_nowait()
                self.psub._sub._pending_size -= len(msg.data)
                queue.task_done()
            else:
                return
            if type(msg) is Raw:
                if not msg.data and msg.status is not None:
                    self._status(msg.status)
                    continue
            elif is_status(msg):
                self._status(msg.header.get("Status"))
                continue
            self._arrived(msg)

    def _status(self, status: str | None) -> None:
        if status != "100":  # 408 expired, 404 nothing (no wait), 409 the request ended
            self.requested = 0
            self.request_until = 0.0

    def _arrived(self, msg: Any) -> None:
        tokens = msg.reply.split(b".") if type(msg) is Raw else ()
        if len(tokens) == 9 and tokens[0] == b"$JS" and tokens[1] == b"ACK":
            delivered, sseq, dseq = int(tokens[4]), int(tokens[5]), int(tokens[6])
        else:  # nats-py's Msg, or a reply subject of another form
            delivered, sseq, dseq, _pending = message_fields(msg)
        self.requested -= 1
        if self.requested <= 0:  # the request in hand is served in full
            self.requested = 0
            self.request_until = 0.0
        if self.state == READY:
            if self.next_dseq is not None and dseq != self.next_dseq:
                self._gap(dseq)
            else:
                self.next_dseq = dseq + 1
        if self.state == IDLE:  # for a request of a lease already given back
            self._write([msg], b"-NAK")
            return
        old = self.mine.get(sseq)
        if old is None or old[2] < dseq:
            self.mine[sseq] = (msg, delivered, dseq)

    def _gap(self, dseq: int) -> None:
        """A delivery went to someone else: give back what is not in the call in hand
        (this message included, once it is in ``mine``) and take the partition again."""
        self.gaps += 1
        log.warning("partition %d: consumer sequence %d came after %d: a delivery went to "
                    "another client; waiting until every pending message is this worker's",
                    self.partition, dseq, (self.next_dseq or 0) - 1)
        self.state = SENIOR
        self.next_dseq = None
        self.checked = 0.0
        self._give_back_fresh()

    def _give_back_fresh(self) -> None:
        fresh = [s for s in self.mine if s not in self.given]
        self._write([self.mine.pop(s)[0] for s in fresh], b"-NAK")

    async def _request(self) -> None:
        """Keep one pull request out, ending before the lease does."""
        now = time.monotonic()
        if self.request_until and now < self.request_until + 1.0:
            return  # one is out (or its end is not known yet)
        want = self.prefetch - len(self.mine)
        left = self.leases.remaining(self.partition) - 0.05
        expires = min(self.wait, left)
        if want <= 0 or expires < 0.05:
            return
        self.requested = want
        self.request_until = now + expires
        request = b'{"batch":%d,"expires":%d}' % (want, int(expires * 1e9))
        await self.consumer.destination.nc.publish(self.psub._nms, request, reply=self.inbox)

    async def _gather(self, deadline: float) -> None:
        """Wait until something arrived or ``deadline``."""
        if self.direct is not None:
            if not self.box:
                waiter = self._waiter(max(deadline - time.monotonic(), 0.001))
                try:
                    await waiter
                finally:
                    self.waiter = None
            self._settle()
            return
        queue = self.psub._sub._pending_queue
        if queue.empty():
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.001)):
                    msg = await queue.get()
            except TimeoutError:
                return
            queue.put_nowait(msg)  # _take reads it with the rest, in order
            queue.task_done()

    async def _seniority(self) -> None:
        """Handle nothing until every message pending on the consumer is this lane's."""
        self.checked = time.monotonic()
        js = self.consumer.destination.js
        info = await js.consumer_info(self.consumer.stream, self.durable,
                                      timeout=max(min(self.ack_wait / 3, 5.0), 0.5))
        if self.state != SENIOR:  # the lease was lost meanwhile
            return
        self._take()
        upto = info.delivered.consumer_seq if info.delivered is not None else 0
        pending = info.num_ack_pending or 0
        counted = [d for _m, _n, d in self.mine.values() if d <= upto]
        if pending < len(counted):  # a former holder acknowledged late: from the start
            log.info("partition %d: %d messages pending, %d held: giving them back", self.partition,
                     pending, len(counted))
            self._write([m for m, _n, _d in self.mine.values()], b"-NAK")
            self.mine.clear()
            self.given.clear()
            return
        if pending > len(counted):
            return  # a former holder's messages are still pending: they come back later
        later = sorted(d for _m, _n, d in self.mine.values() if d > upto)
        if later != list(range(upto + 1, upto + 1 + len(later))):
            return  # something was delivered elsewhere since: look again
        self.next_dseq = (later[-1] if later else upto) + 1
        self.state = READY
        log.debug("partition %d: every pending message is this worker's (%d)", self.partition,
                  len(self.mine))

    async def _give_up(self) -> None:
        """Give the partition back: let the request end, give back what is held, release."""
        end = self.request_until + 1.0
        while self.request_until and time.monotonic() < end:
            await self._gather(end)
            self._take()
        self._take()
        if self.leases.valid(self.partition):
            self._write([m for m, _n, _d in self.mine.values()], b"-NAK")
            try:
                await self.consumer.destination.nc.flush(timeout=2)
            except Exception as exc:
                reraise_cancel()
                log.debug("flushing before giving partition %d back: %r", self.partition, exc)
        self.mine.clear()
        self.given.clear()
        self.state = IDLE
        self.shedding = False
        await self.leases.release(self.partition)

    # -- answers -------------------------------------------------------------

    def _write(self, msgs: list[Any], body: bytes) -> None:
        """Answer messages with one write (the direct way), else through nats-py's publish
        (buffered by its flusher, not flushed per message)."""
        if not msgs:
            return
        direct = self.direct
        if direct is not None:
            try:  # a str reply (nats-py's Msg) fails: those go through publish below
                frames = pub_frames([m.reply for m in msgs], body)
            except TypeError:
                pass
            else:
                direct.send_many([frames], len(body), len(msgs))
                return
        nc = self.consumer.destination.nc
        for m in msgs:
            reply = m.reply.decode() if type(m) is Raw else m.reply
            task = self._running().create_task(nc.publish(reply, body))
            task.add_done_callback(_quiet)

    def _holding(self) -> bool:
        return not self.revoked.is_set() and self.leases is not None and \
            self.leases.valid(self.partition)

    async def ack(self, deliveries: list[Delivery]) -> None:
        if self.revoked.is_set():
            raise Unavailable(f"partition {self.partition}: {self.reason}; nothing acknowledged")
        if self.gone() is not None:
            # the partition alone is lost: nothing acknowledged, the lane goes on
            for delivery in deliveries:
                self.given.discard(delivery.sequence)  # type: ignore[arg-type]
                self.mine.pop(delivery.sequence, None)  # type: ignore[arg-type]
            reason = self.lost
            log.warning("partition %d: %s; the handled messages %s..%s were not acknowledged "
                        "(they are delivered again)", self.partition, reason,
                        deliveries[0].sequence if deliveries else "-",
                        deliveries[-1].sequence if deliveries else "-")
            raise CallCut(f"partition {self.partition}: {reason}; nothing acknowledged")
        msgs = []
        append = msgs.append
        given, pop = self.given, self.mine.pop
        for delivery in deliveries:
            sseq = delivery.sequence
            given.discard(sseq)
            held = pop(sseq, None)  # type: ignore[arg-type]
            append(delivery.handle if held is None else held[0])  # the latest delivery's reply
        try:
            self._write(msgs, b"+ACK")
        except Exception as exc:
            raise self.consumer.destination.unavailable("acknowledging failed", exc) from None

    async def release(self, deliveries: list[Delivery]) -> None:
        msgs = []
        for delivery in deliveries:
            self.given.discard(delivery.sequence)
            held = self.mine.pop(delivery.sequence, None)  # type: ignore[arg-type]
            msgs.append(held[0] if held is not None else delivery.handle)
        if not self._holding():  # another worker may hold it: its ack_wait gives them back
            return
        try:
            self._write(msgs, b"-NAK")
        except Exception as exc:  # the server redelivers after ack_wait
            log.debug("giving messages back failed: %r", exc)

    async def _keep_held(self) -> None:
        """``+WPI`` for every held message every ``ack_wait / 3``, one write, confirmed by
        a flush; only while the lease is valid."""
        nc = self.consumer.destination.nc
        while not self.revoked.is_set():
            reraise_cancel()  # nats-py may have taken a cancellation in for itself
            await asyncio.sleep(self.every)
            if not self.mine or not self._holding():
                continue
            try:
                self._write([m for m, _n, _d in self.mine.values()], b"+WPI")
                await nc.flush(timeout=max(self.every, 0.05))
            except Exception as exc:  # not confirmed: the server may deliver them again
                reraise_cancel()  # nats-py turns a cancelled flush into a timeout
                log.debug("progress of held messages not confirmed: %r", exc)

    async def release_held(self) -> None:
        """Closing: stop keeping, let the pull request end, give back what is held, and
        give the lease back."""
        task, self._keeper_task = self._keeper_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        nc = self.consumer.destination.nc
        if self.state != IDLE and nc is not None and nc.is_connected and self._holding():
            self.given.clear()
            await self._give_up()
        elif self.leases is not None:
            await self.leases.release(self.partition)
        self.state = IDLE


def _quiet(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("answering a held message failed: %r", task.exception())
