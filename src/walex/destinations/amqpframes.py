"""A batch of AMQP publishes written by walex as one payload on an aiormq channel.

aiormq's ``Channel.basic_publish`` costs about 100 us of CPU per message in a
relay of one-row transactions (walex's own work is under 10): a Task per
message, pamqp objects and their marshalling per frame, an ``asyncio.timeout``
and two async context managers, a confirmation Future registered in two
future stores with four done-callbacks, and one ``send()`` system call per
message (the connection's writer writes each message's frames as they come).
:func:`publish` does for a whole batch what ``basic_publish`` does for one
message, under one hold of the channel's lock:

- it numbers the messages with the channel's next delivery tags and puts one
  :class:`Pending` stand-in under each tag in ``channel.confirmations`` (and,
  with ``mandatory``, each ``message_id`` in ``message_id_delivery_tag``, where
  aiormq finds a returned message's tag), exactly where ``basic_publish`` puts
  its Futures, so aiormq's own reader settles them: an ``Ack`` (also a
  ``multiple`` one), a ``Nack``, a ``Return`` (``PublishError``, then the
  ``Ack`` that follows it is ignored, as for a Future);
- it writes the frames (``Basic.Publish``, the content header with
  ``delivery_mode`` 2, ``message_id`` and ``content_type``, the body in frames
  of at most the connection's ``frame_max``), built by :func:`frames` byte for
  byte as pamqp builds them, into the connection's write queue as a few
  ``ChannelFrame`` chunks (about 128 KiB each, cut between messages), which
  the writer sends in a few system calls;
- it waits for one Future, made by the channel's ``create_future`` (so a
  closing channel or connection rejects it, with the reason aiormq gives its
  own confirmations), resolved once every message was settled.

If the wait ends otherwise (a timeout, a cancellation) the stand-in counts as
cancelled, and aiormq ignores late confirmations as it does for a cancelled
publish; if the writing itself is interrupted, the tags of the messages not
handed to the writer are taken back, as ``basic_publish`` does.

Those are aiormq internals (``lock``, ``delivery_tag``, ``confirmations``,
``message_id_delivery_tag``, ``write_queue``, ``number``, ``max_content_size``,
``create_future`` and ``aiormq.abc.ChannelFrame``; the same from 6.8, the
oldest aiormq aio-pika 9.4 takes, to 7.2): :func:`usable` takes this path only
for an aiormq from 6.8 up to 7.x that has them, and
:class:`~walex.destinations.rabbitmq.RabbitMQDestination` otherwise publishes
every message with ``basic_publish``, as it does for a batch whose ids or
routing keys do not fit an AMQP short string. A test publishes the same batch
both ways to a real broker and finds the queued messages identical.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from .base import Outgoing
from .base import version_tuple as _version

__all__ = ["CONTENT_TYPE", "Pending", "frames", "publish", "usable"]

CONTENT_TYPE = "application/cloudevents+json"
_CHUNK = 128 * 1024  # bytes per ChannelFrame handed to the connection's writer (about)
_FRAME_END = b"\xce"
_METHOD = struct.Struct(">BHIHHH")  # frame type 1, channel, size; class 60, method 40, ticket 0
_HEADER = struct.Struct(">BHIHHQH")  # frame type 2, channel, size; class 60, weight, size, flags
_BODY = struct.Struct(">BHI")  # frame type 3, channel, size
# the properties, in their order: content_type (bit 15), delivery_mode (bit 12), message_id (bit 7)
_FLAGS = 0x8000 | 0x1000 | 0x0080
_PROPERTIES = bytes([len(CONTENT_TYPE)]) + CONTENT_TYPE.encode() + b"\x02"  # + message_id
_HEADER_SIZE = 14 + len(_PROPERTIES) + 1  # + the id's bytes
_SUPPORTED = ((6, 8), (8, 0))  # aiormq versions [from, to) whose internals this uses
_ATTRIBUTES = ("confirmations", "message_id_delivery_tag", "delivery_tag", "write_queue",
               "number", "max_content_size", "create_future", "publisher_confirms")


def supported_version() -> bool:
    """Whether the installed aiormq is one whose internals :func:`publish` knows."""
    try:
        installed = _version(version("aiormq"))
    except PackageNotFoundError:  # pragma: no cover - aio-pika requires it
        return False
    return _SUPPORTED[0] <= installed < _SUPPORTED[1]


def usable(channel: Any) -> bool:
    """Whether :func:`publish` may write on this aiormq channel (see the module's text)."""
    if not supported_version() or not all(hasattr(channel, name) for name in _ATTRIBUTES):
        return False
    try:
        from aiormq.abc import ChannelFrame

        ChannelFrame(payload=b"", should_close=False, drain_future=None)
    except Exception:  # pragma: no cover - another aiormq
        return False
    return (channel.publisher_confirms is True and isinstance(channel.confirmations, dict)
            and isinstance(channel.message_id_delivery_tag, dict)
            and isinstance(channel.delivery_tag, int) and isinstance(channel.number, int)
            and isinstance(channel.max_content_size, int) and channel.max_content_size > 0)


def method_frame(channel_number: int, exchange: bytes, routing_key: bytes, mandatory: bool) -> bytes:
    """The ``Basic.Publish`` frame (its bytes are the same for every message to that key)."""
    size = 6 + 1 + len(exchange) + 1 + len(routing_key) + 1
    return (_METHOD.pack(1, channel_number, size, 60, 40, 0) + bytes([len(exchange)]) + exchange
            + bytes([len(routing_key)]) + routing_key + (b"\x01" if mandatory else b"\x00")
            + _FRAME_END)


def frames(batch: list[Outgoing], ids: list[bytes], channel_number: int,
           method: Callable[[Outgoing], bytes], max_content: int) -> list[tuple[bytes, int]]:
    """The frames of ``batch``'s messages, as ``(payload, messages)`` chunks of about
    ``_CHUNK`` bytes cut between messages; ``method(item)`` is the item's ``Basic.Publish``
    frame, ``ids`` the items' message ids (short strings), ``max_content`` the most body
    bytes in one frame."""
    chunks: list[tuple[bytes, int]] = []
    parts: list[bytes] = []
    size = count = 0
    header, body_frame, flags, props, end = _HEADER.pack, _BODY.pack, _FLAGS, _PROPERTIES, _FRAME_END
    for item, mid in zip(batch, ids):
        body = item.body
        length = len(body)
        parts += (method(item), header(2, channel_number, _HEADER_SIZE + len(mid), 60, 0, length, flags),
                  props, bytes((len(mid),)), mid, end)
        if length < max_content:
            if length:
                parts += (body_frame(3, channel_number, length), body, end)
        else:
            view = memoryview(body)
            for at in range(0, length, max_content):
                piece = view[at:at + max_content]
                parts += (body_frame(3, channel_number, len(piece)), piece, end)
        size += length + 64
        count += 1
        if size >= _CHUNK:
            chunks.append((b"".join(parts), count))
            parts, size, count = [], 0, 0
    if count:
        chunks.append((b"".join(parts), count))
    return chunks


class Pending:
    """What :func:`publish` puts in ``channel.confirmations`` under each tag of a batch: the
    calls aiormq makes on a confirmation Future (``set_result`` with the ``Ack``,
    ``set_exception`` with a ``Nack``'s ``DeliveryError`` or a ``Return``'s
    ``PublishError``; ``done``/``cancelled`` before either) count the batch's messages
    down, and the batch's Future is resolved when the count reaches 0."""

    __slots__ = ("ack", "failures", "future", "left", "over")

    def __init__(self, count: int, future: asyncio.Future, ack: type) -> None:
        self.left = count
        self.future = future
        self.ack = ack
        self.failures: list[BaseException] = []
        self.over = False  # the publisher stopped waiting: aiormq ignores what comes now

    def done(self) -> bool:
        return self.over

    def cancelled(self) -> bool:
        return self.over

    def set_result(self, result: Any) -> None:
        if not isinstance(result, self.ack):  # a returned message, with on_return_raises off
            self.failures.append(_Returned(result))
        self._settled()

    def set_exception(self, exc: BaseException) -> None:
        self.failures.append(exc)
        self._settled()

    def _settled(self) -> None:
        self.left -= 1
        if self.left <= 0 and not self.future.done():
            self.future.set_result(None)


class _Returned(Exception):
    """A message the broker returned, reported to the channel's return callbacks."""

    def __init__(self, message: Any) -> None:
        super().__init__(f"returned: {message!r}")
        self.message = message


async def publish(channel: Any, chunks: list[tuple[bytes, int]], ids: list[str] | None,
                  ack: type) -> list[BaseException]:
    """Write ``chunks`` (from :func:`frames`) on ``channel`` and wait until the broker
    settled each message; returns the failures (Nacks, returns), in no order. ``ids``
    (the message ids, given when ``mandatory``) are registered for returns. A closing
    channel raises what aiormq rejects its confirmations with."""
    from aiormq.abc import ChannelFrame

    total = sum(count for _, count in chunks)
    if not total:
        return []
    future = channel.create_future()
    pending = Pending(total, future, ack)
    confirmations, by_id = channel.confirmations, channel.message_id_delivery_tag
    first = 0
    try:
        async with channel.lock:
            first = channel.delivery_tag + 1
            channel.delivery_tag += total
            for tag in range(first, first + total):
                confirmations[tag] = pending
            if ids is not None:
                for tag, mid in enumerate(ids, first):
                    by_id[mid] = tag
            sent = 0
            try:
                for payload, count in chunks:
                    await channel.write_queue.put(
                        ChannelFrame(payload=payload, should_close=False, drain_future=None))
                    sent += count
            except BaseException:
                # the writer never got these: their tags are free again, as in basic_publish
                channel.delivery_tag = first + sent - 1
                for tag in range(first + sent, first + total):
                    if confirmations.get(tag) is pending:
                        del confirmations[tag]
                raise
        await future
        return pending.failures
    finally:
        pending.over = True
        if not future.done():
            future.cancel()
        if ids is not None and first:
            for tag, mid in enumerate(ids, first):
                if by_id.get(mid) == tag:
                    del by_id[mid]
