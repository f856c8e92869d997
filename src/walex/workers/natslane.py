"""One partition's lane of a NATS worker with ``prefetch=1`` (:mod:`walex.workers.nats`).

Contract: :class:`NatsLane` holds one message of its partition at a time (the
consumer's ``max_ack_pending=1``): :meth:`NatsLane.receive` returns it (taken
from the direct way's box, :mod:`walex.workers.natsdirect`, else from nats-py's
subscription), keeps it with confirmed progress reports every ``ack_wait / 3``
and revokes the lane ``ack_wait / 4`` before the server may hand it out again;
:meth:`NatsLane.ack` acknowledges and asks for the next message in one
(``+NXT``); :meth:`NatsLane.release` gives messages back (``-NAK``), unless the
lane was revoked; :meth:`NatsLane.release_held` gives back all it holds on
closing. Of its consumer (:class:`~walex.workers.nats.NatsConsumer`, not
imported here) it uses ``check()``, ``look(lane)``, ``recheck(partition)``,
``recheck_every`` and ``destination.nc``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from .base import Delivery
from .natsbox import BoxLane, is_status
from .natsdirect import Raw, acked_fields

__all__ = ["NatsLane"]

log = logging.getLogger("walex.workers")

_TEMPORARY = ("404", "408", "409")  # a fetch that ends so is as one that timed out (nats-py's)
# the answers to a held message, and nats-py's Msg methods that send them
_ANSWERS = {b"+WPI": "in_progress", b"+ACK": "ack", b"-NAK": "nak"}


class NatsLane(BoxLane):
    """One message at a time (``max_ack_pending=1``), see the module's doc and
    :mod:`walex.workers.nats`'s."""

    def __init__(self, partition: int, consumer: Any, psub: Any, ack_wait: float) -> None:
        super().__init__(partition, consumer, psub, ack_wait)
        # held messages: since when, and the task keeping it (None until ack_wait / 3 passed)
        self.held: dict[int, tuple[Any, float, asyncio.Task[None] | None]] = {}
        self._keeper: asyncio.TimerHandle | None = None  # starts the keeping when it is due
        self._keeper_at = 0.0
        self.asked: float | None = None  # when the previous fetch went out
        self.following: float | None = None  # when an acknowledgement asked for the next one
        self._requests: tuple[float, bytes, bytes] | None = None  # see _next_request
        self.status: str | None = None  # the last JetStream status a request was answered with

    async def receive(self, wait: float) -> list[Delivery]:
        self.consumer.check()
        self.wait = wait
        now = time.monotonic()
        if now - self.looked >= self.consumer.recheck_every:
            await self.consumer.look(self)
        if self.following is not None and now - self.following > 2 * self.wait + 1:
            self.following = None  # its request expired and no word of it came: fetch again
        try:
            msg = None
            if self.following is None and self.direct is not None:
                # a message already waiting came for an earlier request, maybe delivered then
                asked = self.asked if self.asked is not None and self.box else now
                self.asked = now
                msg = self._waiting()
                if msg is None:  # fetch(1), as nats-py asks for it
                    request = b'{"batch":1,"expires":%d}' % (int(wait * 1e9) - 100_000)
                    await self.consumer.destination.nc.publish(self.psub._nms, request,
                                                               reply=self.inbox)
                    self.following = now
            if msg is None and self.following is not None:  # a request for it is out (the
                # acknowledgement's +NXT, or the fetch just above)
                box = self.box
                if self.direct is not None and not box:  # wait here (no coroutine of its own)
                    waiter = self._waiter(wait)
                    try:
                        await waiter
                    finally:
                        self.waiter = None
                if self.direct is not None and box and box[0].data:  # a message, not a status
                    msg = box.popleft()
                    self.status = None
                else:  # statuses, or nothing yet: the rest of wait
                    msg = await self._following(max(now + wait - time.monotonic(), 0.001))
                if msg is None:  # its request expired without one: as a fetch that timed out
                    if self.direct is not None and self.status is not None and \
                            self.status not in _TEMPORARY:
                        raise RuntimeError(f"JetStream answered the request with status "
                                           f"{self.status}")
                    raise TimeoutError
                asked = self.following
                self.following = None
            elif msg is None:
                # A message already waiting came for an earlier request, maybe delivered then.
                asked = self.asked if self.asked is not None and \
                    getattr(self.psub, "pending_msgs", 0) else now
                self.asked = now
                [msg] = await self.psub.fetch(1, timeout=wait)
        except TimeoutError:  # nothing within wait (nats' errors subclass it)
            self.consumer.check()
            await self.consumer.recheck(self.partition)
            return []
        except Exception as exc:
            raise self.consumer.destination.unavailable("fetching failed", exc) from None
        self._hold(msg, asked)
        delivered, sequence, pending = msg.acked_as() if type(msg) is Raw else _acked_as(msg)
        return [Delivery(msg.data, msg, redelivered=delivered > 1, pending=pending,
                         attempt=delivered, sequence=sequence)]

    def _waiting(self) -> Raw | None:
        """The first message of the box (the statuses before it dropped: they answered
        earlier requests), or None."""
        box = self.box
        while box:
            raw = box.popleft()
            if raw.status is None:
                return raw
        return None

    async def _following(self, wait: float) -> Any:
        """The message the last acknowledgement asked for (``+NXT``), or None: its request
        expired without one (then the next receive asks with a fetch)."""
        deadline = time.monotonic() + wait
        self.status = None
        box = self.box
        while True:
            if self.direct is not None:  # the direct way: the box, no coroutine of its own
                if not box:
                    waiter = self._waiter(max(deadline - time.monotonic(), 0.001))
                    try:
                        await waiter
                    finally:
                        self.waiter = None
                    if not box:
                        return None
                msg = box.popleft()
            else:
                try:
                    msg = await self._next(max(deadline - time.monotonic(), 0.001))
                except TimeoutError:
                    return None
            if type(msg) is Raw:
                if msg.data:  # a message (a status has no body)
                    return msg
                status = msg.status
                if status is None:
                    return msg
            elif not is_status(msg):
                return msg
            else:
                status = msg.header.get("Status")
            if status != "100":  # 408: the request expired (else: the same)
                self.status = status
                self.following = None
                return None

    async def _next(self, timeout: float) -> Any:
        """The next message of the subscription, as its ``next_msg()`` gives it (the same
        queue and bookkeeping), without the task, timeout task and uuid that costs per
        message: one already queued is taken at once; TimeoutError after ``timeout``. (The
        direct way takes the box's instead, in :meth:`_following`.)"""
        sub = self.psub._sub
        queue = sub._pending_queue
        if queue.empty():
            async with asyncio.timeout(timeout):
                msg = await queue.get()
        else:
            msg = queue.get_nowait()
        sub._pending_size -= len(msg.data)
        queue.task_done()
        return msg

    def _hold(self, msg: Any, since: float) -> None:
        """Keep the message from ``ack_wait / 3`` after ``since`` on (a call that ends
        sooner costs neither a task nor a timer of its own: one timer of the lane, re-armed
        when it finds a held message not due yet, starts the keeping)."""
        self.held[id(msg)] = (msg, since, None)
        due = since + self.every
        if self._keeper is None or self._keeper_at > due:
            if self._keeper is not None:
                self._keeper.cancel()
            self._keeper_at = due
            self._keeper = self._running().call_later(
                max(due - time.monotonic(), 0.0), self._keep_due)

    def _keep_due(self) -> None:
        """Start keeping the held messages that are due; the timer again for the others."""
        self._keeper = None
        now = time.monotonic()
        due = None
        for key, (msg, since, task) in list(self.held.items()):
            if task is not None:
                continue
            if since + self.every <= now + 0.001:
                self.held[key] = (msg, since, asyncio.create_task(self._keep(msg, since)))
            elif due is None or since + self.every < due:
                due = since + self.every
        if due is not None:
            self._keeper_at = due
            self._keeper = self._running().call_later(due - now, self._keep_due)

    async def _keep(self, msg: Any, since: float) -> None:
        """Hold the message: report progress every ``ack_wait / 3`` and have the server
        confirm it (a flush); revoke the lane ``ack_wait / 4`` before the server may give
        the message to another worker, i.e. ``ack_wait`` after the last confirmed report
        (or the fetch), so this worker stops the call before another starts it."""
        deadline = since + self.ack_wait - self.margin
        following = since + self.every
        while True:
            now = time.monotonic()
            if now >= deadline:
                self.revoke(f"no progress report confirmed by NATS within ack_wait="
                            f"{self.ack_wait:g}s: the server gives the message to another worker")
                return
            if now < following:
                await asyncio.sleep(min(following, deadline) - now)
                continue
            sent = time.monotonic()
            following = sent + self.every
            nc = self.consumer.destination.nc
            try:
                await self._answer(msg, b"+WPI")
                await nc.flush(timeout=max(deadline - sent, 0.01))
            except Exception as exc:  # not confirmed: the deadline stays
                log.debug("progress of a held message not confirmed: %r", exc)
                continue
            deadline = sent + self.ack_wait - self.margin

    async def _answer(self, msg: Any, body: bytes) -> None:
        """Answer a held message (``+WPI``, ``+ACK``, ``-NAK``): through the direct way for
        its messages, else as nats-py's ``in_progress()``, ``ack()``, ``nak()``."""
        if type(msg) is Raw and self.direct is not None:
            await self.direct.reply(msg, body)
        else:
            await getattr(msg, _ANSWERS[body])()

    def _drop(self, msg: Any) -> None:
        held = self.held.pop(id(msg), None)
        if held is not None and held[2] is not None:
            held[2].cancel()

    def _next_request(self) -> tuple[bytes, bytes]:
        """The ``+NXT`` body for the worker's poll, and what follows the reply subject in
        its ``PUB`` command (made again only when the poll changes)."""
        made = self._requests
        if made is None or made[0] != self.wait:
            request = b'+NXT {"batch":1,"expires":%d}' % int(self.wait * 1e9)
            made = self._requests = (self.wait, request, b" %b %d\r\n%b\r\n" % (
                self.inbox_bytes, len(request), request))
        return made[1], made[2]

    async def ack(self, deliveries: list[Delivery]) -> None:
        """Acknowledge; the last one with ``+NXT`` (JetStream's acknowledge-and-ask-for-the-
        next), so the next message is delivered as soon as the server took the
        acknowledgement, without a fetch request of its own."""
        last = len(deliveries) - 1
        for i, delivery in enumerate(deliveries):
            msg = delivery.handle
            self._drop(msg)
            try:
                if i == last and self.inbox is not None and msg.reply and \
                        self.following is None and not self.revoked.is_set():
                    request, rest = self._next_request()
                    self.following = time.monotonic()
                    if type(msg) is Raw and self.direct is not None:
                        if self.woken:
                            self._settle()
                        self.direct.queue(b"PUB " + msg.reply + rest, len(request))
                    else:
                        await self.consumer.destination.nc.publish(msg.reply, request,
                                                                   reply=self.inbox)
                        msg._ackd = True
                else:
                    await self._answer(msg, b"+ACK")
            except Exception as exc:
                raise self.consumer.destination.unavailable("acknowledging failed", exc) from None

    async def release(self, deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            self._drop(delivery.handle)
            if self.revoked.is_set():  # another worker may hold it now: a late nak would
                continue               # let it out a second time; ack_wait gives it back
            try:
                await self._answer(delivery.handle, b"-NAK")
            except Exception as exc:  # not connected: the server redelivers after ack_wait
                log.debug("giving a message back failed: %r", exc)

    async def release_held(self) -> None:
        """Give back what this lane holds, and what came for its requests and was not
        taken yet (a message the last acknowledgement asked for): at once, not after
        ``ack_wait``."""
        held = [Delivery(b"", msg) for msg, _since, _task in list(self.held.values())]
        if self.following is not None and self.consumer.destination.nc is not None and \
                self.consumer.destination.nc.is_connected:
            # the request of the last acknowledgement is served (or expires) within wait
            left = self.following + self.wait + 0.5 - time.monotonic()
            msg = await self._following(left) if left > 0 else None
            if msg is not None:
                held.append(Delivery(b"", msg))
            self.following = None
        while (msg := self._waiting()) is not None:  # the direct way's box
            held.append(Delivery(b"", msg))
        queue = getattr(getattr(self.psub, "_sub", None), "_pending_queue", None)
        while queue is not None and not queue.empty():
            msg = queue.get_nowait()
            if not is_status(msg):
                held.append(Delivery(b"", msg))
        await self.release(held)


def _acked_as(msg: Any) -> tuple[int, int, int]:
    """Deliveries so far, stream sequence and messages pending after it, of a nats-py
    message (:func:`~walex.workers.natsdirect.acked_fields`, else its metadata)."""
    fields = acked_fields(msg.reply or "")
    if fields is not None:
        return fields
    meta = msg.metadata
    return meta.num_delivered, meta.sequence.stream, meta.num_pending
