"""What a handler call holds: its partition's lease, and the fencing token to check.

A broker hands a partition's messages to one worker at a time, but it takes
the partition back on its own: JetStream when ``ack_wait`` passes without
word from the worker, RabbitMQ when the worker's connection ends. A worker
whose connection is cut may still be running a handler call when another
worker already handles the same messages, and newer ones. So:

- the worker cancels a call as soon as it knows it lost the partition
  (JetStream: before the server's ``ack_wait`` runs out without a confirmed
  progress report, see :mod:`walex.workers.nats`; RabbitMQ: when the
  connection or channel is closed), and does not acknowledge its messages;
  a lease says lost too as soon as the worker may have lost the partition
  without being told yet (a Kafka worker whose process was frozen for most
  of the group's session timeout: ``Lane.stale()``);
  a call the worker cuts off itself (``stop()`` past ``shutdown_grace``, a
  reconnect) has its lease lost too, as its messages go back to the broker;
- during a call, :func:`current_lease` returns its :class:`Lease`: ``lost``
  tells whether the worker already knows it lost the partition, ``check()``
  raises :class:`LeaseLost` then (a plain handler, which runs on a thread
  and cannot be cancelled, should call it before its effect);
- ``lease.token`` is the fencing token: the id of the call's last event.
  Event ids only grow along a partition (commit LSN, then position), so a
  store that keeps, per row or per partition, the last token it applied and
  refuses a write whose token is not greater (in the same transaction as the
  write: ``UPDATE ... WHERE last_id < %(token)s``) never lets a stale call,
  which the worker could not stop in time, overwrite what a newer one wrote.
  That is the guarantee that holds across a network partition; the
  cancellation only narrows the window.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Any

from ..errors import WalExError

__all__ = ["Lease", "LeaseLost", "current_lease"]


class LeaseLost(WalExError):
    """This worker no longer holds the partition of the call: do not apply its effect."""


@dataclass(eq=False)
class Lease:
    """The partition a handler call holds, and how it came to hold it."""

    partition: int
    token: str  # the id of the call's last event: grows along the partition
    redelivered: bool = False  # the broker delivered some of the call's messages before
    attempt: int | None = None  # JetStream: deliveries of the message so far (1 = first)
    sequence: int | None = None  # JetStream: the message's stream sequence
    lane: Any = field(default=None, repr=False)  # the worker's lane of the partition
    cut: str = field(default="", repr=False)  # why this call alone lost it (Lane.cut), if it did
    cancelled: bool = field(default=False, repr=False)  # Lane.cut cancelled the call's task

    @property
    def lost(self) -> bool:
        """Whether this worker knows it no longer holds the partition (or may not: a lane
        that was stalled longer than the broker waits for it, ``Lane.stale()``; once said
        lost, a lease stays lost and the call's messages go back)."""
        if self.cut:
            return True
        lane = self.lane
        if lane is None:
            return False
        if lane.revoked.is_set():
            return True
        stale = lane.stale()
        if stale is not None:
            self.cut = stale
            return True
        return False

    @property
    def reason(self) -> str:
        if self.cut:
            return self.cut
        return self.lane.reason if self.lost else ""

    def check(self) -> None:
        """Raise :class:`LeaseLost` when the worker knows it lost the partition."""
        if self.lost:
            raise LeaseLost(f"partition {self.partition}: this worker lost it ({self.reason}); "
                            f"another worker may handle event {self.token} now")


_CURRENT: contextvars.ContextVar[Lease | None] = contextvars.ContextVar("walex_lease", default=None)


def current_lease() -> Lease | None:
    """The lease of the handler call running (on a worker), else ``None``."""
    return _CURRENT.get()
