"""What every worker source shares: the abstract consumer, its lanes, the partition filters.

A broker module subclasses :class:`Consumer`: :meth:`~Consumer.open`
connects, declares what it consumes (with the broker's own mechanism that
lets one worker at a time take a partition's messages) and returns one
:class:`Lane` per partition; :meth:`~Consumer.close` disconnects, and
whatever was received but not acknowledged goes back to the broker.

A :class:`Lane` hands out one partition's messages in order (and is
revoked, :meth:`Lane.revoke`, when the worker learns the broker may hand
them to another worker: the worker cancels the call in hand and connects
again; or only the call in hand is cut off, :meth:`Lane.cut`, where the
lane goes on with other partitions, as a Kafka lane does):
:meth:`~Lane.receive` returns the next messages available (an empty list
after ``wait`` seconds without any), :meth:`~Lane.ack` acknowledges
delivered messages once they are handled, :meth:`~Lane.release` gives
messages back unhandled, for redelivery. A connection that is lost raises
:class:`~walex.destinations.base.Unavailable` from any of them; the worker
then reconnects with backoff.

A source URL is its destination URL (the broker module takes the
destination's own parameters through the destination class, which also
connects and declares the stream or exchange) plus the worker's:
``partitions`` (the relay's ``partitions``, default 1) and ``group`` (the
worker group: every group receives every event once, from its declaration
on; default ``walex``). A worker never creates the stream or exchange: the
relay does, or :meth:`Consumer.declare`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import string
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from ..destinations.base import Destination, DestinationURL, Unavailable
from ..errors import ConfigError

__all__ = ["CallCut", "Consumer", "Delivery", "Lane", "Unavailable", "close_quietly",
           "partition_filter"]

log = logging.getLogger("walex.workers")

_GROUP = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class CallCut(Exception):
    """A call cut off by :meth:`Lane.cut`, or messages whose partition the lane lost since it
    handed them out (:meth:`Lane.gone`): they were given back and the lane goes on."""


@dataclass(slots=True)
class Delivery:
    """One message as the broker delivered it."""

    body: bytes
    handle: Any  # the client's message object
    redelivered: bool = False
    pending: int | None = None  # messages of the partition after this one, if the broker says
    attempt: int | None = None  # deliveries of this message so far, if the broker says
    sequence: int | None = None  # its position in the stream, if the broker says


class Lane(ABC):
    """One partition's messages at this worker, in the order they were published."""

    alone: ClassVar[bool] = False  # it may lose its partition alone (:meth:`gone` tells)

    def __init__(self, partition: int) -> None:
        self.partition = partition
        self.task: asyncio.Task[Any] | None = None  # the task running the lane (Worker._lane)
        self.revoked = asyncio.Event()  # set when this worker lost the partition
        self.reason = ""
        self.call: asyncio.Task[Any] | None = None  # the handler call in hand, cancelled by revoke
        self.lease: Any = None  # the call in hand's walex.workers.lease.Lease, while self.call

    def revoke(self, reason: str) -> None:
        """This worker no longer holds the partition: the call in hand is cancelled."""
        if not self.revoked.is_set():
            self.reason = reason
            self.revoked.set()
            log.debug("partition %d: %s", self.partition, reason)
            if self.call is not None:
                self.call.cancel()

    def cut(self, reason: str) -> bool:
        """The call in hand alone lost its partition: it is cancelled and nothing of it is
        acknowledged (its messages come again), and the lane goes on; False when no call is
        in hand."""
        lease, call = self.lease, self.call
        if lease is None or call is None or lease.cut:
            return False
        lease.cut = reason
        lease.cancelled = True
        log.debug("partition %d: %s", lease.partition, reason)
        call.cancel()
        return True

    def stale(self) -> str | None:
        """Why the partition may be another worker's although the broker has not said so yet
        (this worker was stalled longer than the broker waits for it), or None. Called from
        handler threads too: it reads, and changes nothing."""
        return None

    def gone(self) -> str | None:
        """Why the messages this lane handed out last are no longer this worker's to handle
        (it lost their partition alone, and goes on with the lane), or None."""
        return None

    @abstractmethod
    async def receive(self, wait: float) -> list[Delivery]:
        """The next messages: at least one, or none after ``wait`` seconds."""

    @abstractmethod
    async def ack(self, deliveries: list[Delivery]) -> None:
        """Acknowledge these messages (the oldest unacknowledged ones, in order)."""

    @abstractmethod
    async def release(self, deliveries: list[Delivery]) -> None:
        """Give these messages back to the broker unhandled; never raises."""


class Consumer(ABC):
    """One source URL: a broker connection and the lanes of its partitions."""

    scheme: ClassVar[str]
    destination_class: ClassVar[type[Destination]]
    accepted: ClassVar[tuple[str, ...]] = ()  # the worker's own URL parameters

    def __init__(self, url: DestinationURL) -> None:
        self.url = url
        self.partitions = url.take_int("partitions", 1, minimum=1) or 1
        if self.partitions > 65536:
            raise ConfigError(f"worker source {url.display}: partitions must be at most 65536")
        self.group = url.take("group", "walex") or "walex"
        if not _GROUP.match(self.group):
            raise ConfigError(f"worker source {url.display}: group {self.group!r} may use letters, "
                              "digits, '_' and '-' only (at most 64)")
        self.take_options(url)
        known = ("partitions", "group", *self.accepted, *self.destination_class.accepted)
        unknown = sorted(set(url.params) - set(known))
        if unknown:
            raise ConfigError(
                f"worker source {url.display}: unknown parameter{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(unknown)}; known: {', '.join(known)}"
            )
        # the rest are the destination's parameters: the same URL as the relay's
        self.destination = self.destination_class(url, self.partitions)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.display} group={self.group!r}>"

    @property
    def display(self) -> str:
        return self.url.display

    def take_options(self, url: DestinationURL) -> None:
        """Take the broker module's own worker parameters from ``url``."""

    def trouble(self) -> str | None:
        """What keeps this consumer from consuming although connected (``/healthz`` 503
        ``stalled`` with it as the reason), or None."""
        return None

    @abstractmethod
    async def open(self) -> list[Lane]:
        """Connect, declare, subscribe; one lane per partition.

        Raises :class:`Unavailable` when the broker cannot be reached (the
        worker tries again) and :class:`~walex.errors.ConfigError` when what
        exists on the broker cannot keep the order (the worker stops).
        """

    @abstractmethod
    async def declare(self) -> None:
        """Create what the relay and this worker group need on the broker (the stream or
        exchange as the relay does, the group's consumers or queues), then disconnect."""

    @abstractmethod
    async def close(self) -> None:
        """Disconnect; unacknowledged messages go back to the broker. Never raises."""

    def info(self) -> dict[str, Any]:
        return {"url": self.display, "group": self.group, "partitions": self.partitions}


def partition_filter(text: str, partition: int, partitions: int, where: str, what: str) -> str:
    """The subject filter (or binding key) of one partition's messages, from a template.

    Each ``.``-separated token holding ``{schema}``, ``{table}`` or ``{type}``
    becomes ``*``; ``{partition}`` becomes the partition (``*`` with one
    partition, so a worker of one partition takes every message in order).
    With several partitions ``{partition}`` must be in a token without the
    other fields.
    """
    tokens: list[str] = []
    found = False
    for token in text.split("."):
        fields = [name for _, name, _, _ in string.Formatter().parse(token) if name is not None]
        if not fields:
            tokens.append(token.replace("{{", "{").replace("}}", "}"))
        elif "partition" not in fields:
            tokens.append("*")
        elif len(fields) == 1:
            found = True
            tokens.append("*" if partitions == 1 else token.format(partition=partition))
        else:
            raise ConfigError(
                f"worker source {where}: the {what} template {text!r} mixes {{partition}} with "
                f"other fields in one token; write it as a token of its own, e.g. "
                f"'walex.{{schema}}.{{table}}.{{partition}}'"
            )
    if partitions > 1 and not found:
        raise ConfigError(
            f"worker source {where}: with partitions={partitions} the {what} template {text!r} "
            f"must contain {{partition}} as a token of its own (the relay's destination URL too), "
            f"e.g. 'walex.{{schema}}.{{table}}.{{partition}}', the default when partitions > 1"
        )
    return ".".join(tokens)


async def close_quietly(destination: Destination) -> None:
    """Close a connection that may be broken; a broker that does not answer cannot hold it up."""
    try:
        await asyncio.wait_for(destination.close(), timeout=5)
    except (Exception, TimeoutError) as exc:
        log.debug("closing %s: %r", destination.display, exc)
