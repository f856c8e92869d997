"""JetStream publishes as HPUB frames built by walex and handed to nats-py's write buffer.

nats-py's ``Client.publish`` spends about as much CPU on one message as all
of walex's decoding and encoding of it: it checks the subject and the reply
subject with a regular expression, builds the header block from a dict a
piece at a time (a check of every key, ``strip``, ``translate``, ``encode``)
and formats the frame in two steps. :class:`Frames` writes the same frame,
``HPUB <subject> <reply> <header bytes> <total bytes>`` with the headers
``Nats-Msg-Id`` and ``Nats-Expected-Stream``, in one bytes format per
message, and hands the frames of a batch to the client as its own
``_send_publish`` does: ``_send_command`` (the pending buffer, flushed at once
when it passes the client's ``pending_size``) and then a kick of its flusher
task; or, when nothing is pending and the socket keeps up, straight to the
connection's transport (:func:`writable`: one copy of the frames less). The connection, its reconnection, its flusher, PINGs and the read loop
stay nats-py's. :meth:`Frames.chained` writes a batch whose messages the
stream checks link by link, only the last asking for a PubAck (see there).

Those are nats-py internals, the same from 2.6 (walex's oldest) to 2.16:
:func:`usable` takes this path only for a 2.x client from 2.6 on that has
them, and :class:`~walex.destinations.nats.NatsDestination` otherwise
publishes with ``Client.publish``, as it does for a batch holding an event
id that is not plain printable ASCII (which nats-py would rewrite). A test
publishes the same batch both ways to a real stream and finds the stored
messages identical (subject, headers, payload, ``Nats-Msg-Id``).
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable
from typing import Any

import nats.errors

try:
    from nats.aio.transport import TcpTransport as _TCP
except ImportError:  # (nats-py before 2.2: usable() says no anyway)
    _TCP = None

from .base import Outgoing
from .base import version_tuple as _version

__all__ = ["CHAINED_EXTRA", "Frames", "batch_sizes", "check_publishable", "checked_client", "frames",
           "sizes", "usable", "writable"]

_CHUNK = 64 * 1024  # bytes handed to the client at a time (it copies them once more)
_FRAME = b"HPUB %b %b%d %d %d\r\nNATS/1.0\r\nNats-Msg-Id: %b\r\nNats-Expected-Stream: %b\r\n\r\n%b\r\n"
_HEADER_BYTES = len(b"NATS/1.0\r\nNats-Msg-Id: \r\nNats-Expected-Stream: \r\n\r\n")
# a chained message (see Frames.chained): its headers, then the frame without or with a reply
_CHAINED = (b"NATS/1.0\r\nNats-Msg-Id: %b\r\nNats-Expected-Stream: %b\r\n"
            b"Nats-Expected-Last-Sequence: %d\r\nNats-Expected-Last-Msg-Id: %b\r\n\r\n")
_UNANSWERED = b"HPUB %b %d %d\r\n%b%b\r\n"
_ANSWERED = b"HPUB %b %b%d %d %d\r\n%b%b\r\n"
# what a chained message's headers add to the plain ones, besides the two numbers' digits and
# the previous message's id
CHAINED_EXTRA = len(b"Nats-Expected-Last-Sequence: \r\nNats-Expected-Last-Msg-Id: \r\n")
_PLAIN = re.compile(r"[!-~]+").fullmatch  # printable ASCII, no space: as nats-py would send it
_NOT_IN_SUBJECT = re.compile(r"[ \t\r\n]")  # what nats-py refuses in a published subject


def checked_client() -> bool:
    """Whether the installed nats-py is a 2.x from 2.6 on: the versions whose internals
    walex relies on (here and in :mod:`walex.destinations.pubacks`) were checked."""
    try:
        from nats.aio.client import __version__
    except ImportError:
        return False
    return (2, 6) <= _version(__version__) < (3, 0)


def usable(nc: Any) -> bool:
    """Whether ``nc`` (a connected nats-py client) has the internals :class:`Frames` uses,
    as every nats-py 2.x from 2.6 has."""
    if not checked_client():
        return False
    return (asyncio.iscoroutinefunction(getattr(nc, "_send_command", None))
            and asyncio.iscoroutinefunction(getattr(nc, "_flush_pending", None))
            and isinstance(getattr(nc, "_pending_data_size", None), int)
            and isinstance(getattr(nc, "_max_pending_size", None), int)
            and isinstance(getattr(nc, "stats", None), dict)
            and hasattr(nc, "_flush_queue"))


def check_publishable(nc: Any, data: list[bytes]) -> None:
    """Raise what nats-py's ``publish`` raises before it takes ``data`` (commands for the
    client's pending buffer): the connection closed or draining, or, while it reconnects,
    more than its ``pending_size`` would hold."""
    if nc.is_closed:
        raise nats.errors.ConnectionClosedError
    if nc.is_draining_pubs:
        raise nats.errors.ConnectionDrainingError
    if not nc.is_connected:  # nats-py buffers while it reconnects, within pending_size
        total = sum(map(len, data))
        if nc._max_pending_size <= 0 or total + nc._pending_data_size > nc._max_pending_size:
            raise nats.errors.OutboundBufferLimitError


def writable(nc: Any) -> asyncio.WriteTransport | None:
    """The socket's transport of ``nc``'s connection when frames may be written to it at
    once rather than through the client's pending buffer; None otherwise.

    The client's flusher hands its pending commands over with ``writelines``, which
    (Python's default) joins them into one more copy of every byte; a frame written to
    the transport straight is copied once less. That keeps the order of the client's
    writes only when nothing of them is pending (the commands queued while it
    reconnected are pending until its flusher writes them), on a plain TCP connection
    (the client's ``TcpTransport``, TLS or not; a websocket's goes through the client),
    connected. And it keeps the flow control: when the transport holds more than its
    high-water mark unsent, the frames go to the pending buffer, whose flusher waits
    for the socket (``drain``) and whose ``pending_size`` then holds the publisher back.
    """
    if (nc._pending_data_size or getattr(nc, "_pending", True) or not nc.is_connected
            or type(nc._transport) is not _TCP):
        return None
    writer = getattr(nc._transport, "_io_writer", None)
    socket = getattr(writer, "transport", None)
    if socket is None or socket.is_closing():
        return None
    if socket.get_write_buffer_size() >= socket.get_write_buffer_limits()[1]:
        return None  # paused: the flusher waits for the socket
    return socket


class Frames:
    """The frames of one connection's publishes to one stream, replies ``<prefix><n>``."""

    def __init__(self, nc: Any, stream: str, prefix: str) -> None:
        self.nc = nc
        self.stream = stream.encode()
        self.prefix = prefix.encode()
        # (schema, table, type, partition) -> the rendered subject, encoded
        self._subjects: dict[tuple[str, str, str, int], bytes] = {}

    @staticmethod
    def subject(subject: str) -> bytes:
        """``subject`` as bytes, refused as nats-py refuses it (empty, white space)."""
        if not subject or _NOT_IN_SUBJECT.search(subject):
            raise nats.errors.BadSubjectError
        return subject.encode()

    async def publish(self, batch: list[Outgoing], render: Callable[[Outgoing], str],
                      first: int) -> bool:
        """Publish each event to the subject ``render`` gives, replies numbered from ``first``.

        Returns False, having sent nothing, when an event id is not plain (the
        caller then publishes with ``Client.publish``); raises what nats-py's
        publish raises on a closed or draining connection or a bad subject.
        """
        return await self._publish(batch, render, first, None)

    async def chained(self, batch: list[Outgoing], render: Callable[[Outgoing], str],
                      reply: int, last_seq: int, last_id: str) -> bool:
        """Publish ``batch`` as a chain the stream checks link by link; only the last
        message has a reply subject (``<prefix><reply>``), so one PubAck answers for all.

        Message ``i`` carries ``Nats-Expected-Last-Sequence: last_seq + i`` and
        ``Nats-Expected-Last-Msg-Id``: the id of the message before it (``last_id``, the
        stream's last message, for the first). JetStream stores a message only when the
        stream's last stored message is exactly that one at that sequence, so once one
        message of the chain is not stored (refused, a duplicate, lost) none after it is,
        whatever else reaches the stream meanwhile, and the last message's answer is an
        error. Its PubAck with sequence ``last_seq + len(batch)`` therefore says the whole
        chain is stored. Returns False, having sent nothing, when an event id is not plain.
        """
        return await self._publish(batch, render, reply, (last_seq, last_id.encode()))

    async def _publish(self, batch: list[Outgoing], render: Callable[[Outgoing], str],
                       first: int, chain: tuple[int, bytes] | None) -> bool:
        subjects = self._subjects

        def subject_of(key: tuple[str, str, str, int], item: Outgoing) -> bytes:
            if len(subjects) > 10_000:
                subjects.clear()
            subject = subjects[key] = self.subject(render(item))
            return subject

        built = _frames(batch, subjects, subject_of, self.prefix, self.stream, first, chain)
        if built is None:
            return False
        chunks, payload = built
        await self.send(chunks, len(batch), payload)
        return True

    async def send(self, chunks: list[bytes], messages: int, payload: int) -> None:
        """Hand frames (``messages`` of them, ``payload`` bytes of bodies) to the client as
        its publish does, with its checks."""
        nc = self.nc
        check_publishable(nc, chunks)
        nc.stats["out_msgs"] += messages
        nc.stats["out_bytes"] += payload
        socket = writable(nc)
        if socket is not None:
            for chunk in chunks:
                socket.write(chunk)
            return
        for chunk in chunks:
            await nc._send_command(chunk)
        if nc._flush_queue is not None and nc._flush_queue.empty():
            await nc._flush_pending()


def frames(batch: list[Outgoing], subjects: dict[Any, bytes],
           subject_of: Callable[[Any, Outgoing], bytes], prefix: bytes, stream: bytes,
           first: int, chain: tuple[int, bytes] | None) -> tuple[list[bytes], int] | None:
    """The HPUB frames of ``batch`` in chunks of about ``_CHUNK`` bytes, and the bytes of
    its bodies; None when an event id is not plain. Each message's subject is
    ``subjects[item[1:5]]``, or ``subject_of(key, item)`` (which keeps it there).

    Without ``chain``: reply ``<prefix><first + i>`` and the headers Nats-Msg-Id and
    Nats-Expected-Stream. With ``chain`` = (last sequence, last
    id): the headers of :meth:`Frames.chained`, the reply ``<prefix><first>`` on the last
    message only. ``walex.destinations._hpub.frames`` is the compiled twin (the same
    bytes, ``tests/destinations/test_nats_frames.py``)."""
    chunks: list[bytes] = []
    part: list[bytes] = []
    size = payload = 0
    last_seq, previous = chain if chain is not None else (0, b"")
    header_bytes = _HEADER_BYTES + len(stream)
    end = len(batch) - 1
    for i, item in enumerate(batch):
        event_id, body = item.id, item.body
        if not _PLAIN(event_id):
            return None
        key = item[1:5]  # schema, table, type, partition: what a template may use
        subject = subjects.get(key)
        if subject is None:
            subject = subject_of(key, item)
        ident = event_id.encode()
        if chain is None:
            headers = header_bytes + len(ident)
            data = _FRAME % (subject, prefix, first + i, headers, headers + len(body), ident,
                             stream, body)
        else:
            block = _CHAINED % (ident, stream, last_seq + i, previous)
            previous = ident
            data = (_UNANSWERED % (subject, len(block), len(block) + len(body), block, body)
                    if i < end else
                    _ANSWERED % (subject, prefix, first, len(block), len(block) + len(body),
                                 block, body))
        part.append(data)
        size += len(data)
        payload += len(body)
        if size >= _CHUNK:
            chunks.append(b"".join(part))
            part, size = [], 0
    if part:
        chunks.append(b"".join(part))
    return chunks, payload


def sizes(batch: list[Outgoing], overhead: int, limit: int) -> tuple[int, int, int]:
    """``(largest, longest_id, over)`` of a batch: the largest message with its headers
    (body, id and ``overhead``), the longest event id, and the index of the first message
    over ``limit`` (-1: none; ``limit`` 0: no limit). ``_hpub.sizes`` is the compiled twin."""
    largest = longest_id = 0
    for i, item in enumerate(batch):
        ident = len(item.id)
        if ident > longest_id:
            longest_id = ident
        size = len(item.body) + ident + overhead
        if size > largest:
            largest = size
            if limit and size > limit:
                return largest, longest_id, i
    return largest, longest_id, -1


try:  # the compiled twins, when they were built
    from ._hpub import frames as compiled_frames
    from ._hpub import sizes as compiled_sizes
except ImportError:
    compiled_frames = compiled_sizes = None

_pure = compiled_frames is None or bool(os.environ.get("WALEX_PURE_PYTHON"))
_frames = frames if _pure else compiled_frames
batch_sizes = sizes if _pure else compiled_sizes
