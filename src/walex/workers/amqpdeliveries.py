"""A RabbitMQ worker's deliveries taken off the connection's bytes before aiormq parses them.

aiormq spends most of a worker's CPU per message: it reads each of a
delivery's three frames (``Basic.Deliver``, the content header, the body)
with three ``readexactly`` calls under a lock, decodes each into pamqp
objects, passes them through two queues and two tasks, and runs the consumer
callback in a Task of its own, registered in two future stores. A worker
needs three things of a delivery: its tag, its ``redelivered`` flag and its
body.

:class:`SplitReader` stands between the connection's ``StreamReader`` and
aiormq's frame receiver (which reads it through ``at_eof``, ``readexactly``
and ``read``, through the ``transport_factory`` an aiormq connection takes).
It reads what the socket has in large chunks and cuts them into frames. The
frames of a channel with a registered sink (:meth:`SplitReader.register`):
a ``Basic.Deliver`` and the content header and body frames after it go
to the sink as ``sink(delivery_tag, redelivered, body)``, in the order they
came; every other frame (the connection's, other channels', the consuming
channels' replies, closes and cancels) goes on to aiormq as it came, byte
for byte. aiormq thus still opens, closes and acknowledges on these channels
and sees every frame that is not a delivery. As it no longer sees the
deliveries, which may be all the broker sends for a while (RabbitMQ sends a
heartbeat only when it has nothing else to send), the reader gives aiormq a
heartbeat frame of its own at most once a second while it takes deliveries
and passes nothing on, so aiormq does not take a busy connection for a stuck
one.

A delivery whose sink is removed (:meth:`SplitReader.unregister`) while its
frames are still arriving is taken whole and dropped (its channel is being
closed, so the broker puts it back); its content frames never reach aiormq
without their method frame. Bytes that are not AMQP frames (the broker's
protocol header when it refuses the protocol, anything corrupt) and
everything after them go to aiormq unchanged, so it fails on them as it
would have.

Those are aiormq internals (``TransportFactory``, the connection's
``transport_factory`` argument, a frame receiver that reads with
``at_eof``/``readexactly``/``read``): :func:`usable` says whether the installed
aiormq has them (7.x); otherwise a worker consumes through aiormq's
``basic_consume`` as before. A test consumes the same messages both ways.
"""

from __future__ import annotations

import asyncio
import inspect
import struct
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from ..destinations.base import version_tuple as _version

__all__ = ["Sink", "SplitReader", "connection_class", "usable"]

Sink = Callable[[int, bool, bytes], None]  # (delivery tag, redelivered, body)

_FRAME = struct.Struct(">BHI")  # type, channel, payload size; then the payload and 0xCE
_TAG = struct.Struct(">Q")
_DELIVER = b"\x00\x3c\x00\x3c"  # class 60 (basic), method 60 (deliver)
_HEARTBEAT = b"\x08\x00\x00\x00\x00\x00\x00\xce"
_FRAME_END = 0xCE
_KINDS = (1, 2, 3, 8)  # method, content header, content body, heartbeat
_LARGEST = 1 << 24  # a frame size beyond any frame_max a broker offers: not a frame
_CHUNK = 256 * 1024  # bytes read from the socket's buffer at once (at most)
_QUIET = 1.0  # seconds of taken deliveries without a frame for aiormq: one heartbeat
_SUPPORTED = ((7, 0), (8, 0))  # aiormq versions [from, to) whose internals this uses


def usable() -> bool:
    """Whether the installed aiormq takes a ``transport_factory`` (see the module's text)."""
    try:
        if not _SUPPORTED[0] <= _version(version("aiormq")) < _SUPPORTED[1]:
            return False
        from aiormq import connection as module
    except (PackageNotFoundError, ImportError):  # pragma: no cover - aio-pika requires it
        return False
    return (hasattr(module, "TransportFactory") and hasattr(module, "TCPTransportFactory")
            and hasattr(module, "TLSTransportFactory") and hasattr(module, "FrameReceiver")
            and "transport_factory" in inspect.signature(module.Connection.__init__).parameters)


class _Channel:
    """A registered channel: its sink and the delivery being assembled on it."""

    __slots__ = ("body", "parts", "redelivered", "sink", "size", "tag")

    def __init__(self, sink: Sink | None) -> None:
        self.sink = sink
        self.tag = -1  # -1: no delivery in hand
        self.redelivered = False
        self.size = -1  # -1: its content header not come yet
        self.body = 0  # body bytes come so far
        self.parts: list[bytes] = []


class SplitReader:
    """The connection's ``StreamReader`` as aiormq's frame receiver reads it, without the
    deliveries of the registered channels (see the module's text)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.channels: dict[int, _Channel] = {}
        self.taken = 0  # deliveries handed to sinks
        self._raw = bytearray()  # bytes read and not yet cut into frames
        self._out = bytearray()  # frames for aiormq
        self._plain = False  # not frames: every byte from here on goes to aiormq as it is
        self._time = asyncio.get_running_loop().time
        self._passed = self._time()  # when aiormq last got a frame

    # -- the channels ------------------------------------------------------

    def register(self, number: int, sink: Sink) -> None:
        """Hand channel ``number``'s deliveries to ``sink`` from the next frame on."""
        self.channels[number] = _Channel(sink)

    def unregister(self, number: int, sink: Sink) -> None:
        """Stop handing channel ``number``'s deliveries to ``sink`` (if it is still the
        channel's); a delivery whose frames are still arriving is taken whole and dropped."""
        entry = self.channels.get(number)
        if entry is not None and entry.sink is sink:
            if entry.tag < 0:
                del self.channels[number]
            else:
                entry.sink = None  # removed once the delivery in hand is complete

    # -- what aiormq's frame receiver calls ------------------------------

    def at_eof(self) -> bool:
        return not self._out and self.reader.at_eof()

    async def readexactly(self, n: int) -> bytes:
        out = self._out
        while len(out) < n:
            chunk = await self.reader.read(_CHUNK)
            if chunk:
                self._split(chunk)
                continue
            out += self._raw  # the end: what could not be cut goes to aiormq as it is
            self._raw.clear()
            if len(out) < n:
                partial = bytes(out)
                out.clear()
                raise asyncio.IncompleteReadError(partial, n)
        data = bytes(out[:n])
        del out[:n]
        return data

    async def read(self, n: int = -1) -> bytes:
        if not self._out:
            chunk = await self.reader.read(_CHUNK)
            if not chunk:
                data = bytes(self._raw)
                self._raw.clear()
                return data
            self._split(chunk)
        out = self._out
        if n < 0 or n >= len(out):
            data = bytes(out)
            out.clear()
        else:
            data = bytes(out[:n])
            del out[:n]
        return data

    # -- cutting ---------------------------------------------------------------

    def _split(self, chunk: bytes) -> None:
        raw, out = self._raw, self._out
        raw += chunk
        if self._plain:
            out += raw
            raw.clear()
            return
        channels, unpack, take = self.channels, _FRAME.unpack_from, self._take
        pos, end = 0, len(raw)
        passed = took = False
        while end - pos >= 7:
            kind, number, size = unpack(raw, pos)
            stop = pos + 7 + size  # where the frame's end byte is
            if kind not in _KINDS or size > _LARGEST:
                return self._not_frames(pos)
            if stop >= end:
                break  # the rest comes with the next chunk
            if raw[stop] != _FRAME_END:
                return self._not_frames(pos)
            entry = channels.get(number) if number else None
            if entry is not None and take(entry, number, kind, raw, pos + 7, stop):
                took = True
            else:
                out += memoryview(raw)[pos:stop + 1]
                passed = True
            pos = stop + 1
        del raw[:pos]
        if passed:
            self._passed = self._time()
        elif took:
            now = self._time()
            if now - self._passed > _QUIET:
                out += _HEARTBEAT
                self._passed = now

    def _not_frames(self, pos: int) -> None:
        """Corrupt, or not AMQP: from ``pos`` on, aiormq gets the bytes as they came."""
        self._plain = True
        self._out += memoryview(self._raw)[pos:]
        self._raw.clear()

    def _take(self, entry: _Channel, number: int, kind: int, raw: bytearray, start: int,
              stop: int) -> bool:
        """Take a frame of a registered channel: a delivery's; False: the frame is aiormq's."""
        if kind == 1:
            if raw[start:start + 4] != _DELIVER:
                return False
            at = start + 5 + raw[start + 4]  # after the consumer tag (a short string)
            entry.tag = _TAG.unpack_from(raw, at)[0]
            entry.redelivered = bool(raw[at + 8] & 1)
            entry.size = -1
            return True
        if entry.tag < 0:
            return False  # content of some other method (none on a consuming channel)
        if kind == 2:
            if entry.size >= 0:
                return False
            entry.size = _TAG.unpack_from(raw, start + 4)[0]  # after class and weight
            entry.body = 0
            entry.parts = []
            if entry.size == 0:
                self._deliver(entry, number, b"")
            return True
        if kind == 3 and entry.size >= 0:
            piece = bytes(raw[start:stop])
            entry.body += len(piece)
            if entry.body >= entry.size:
                if entry.parts:
                    entry.parts.append(piece)
                    piece = b"".join(entry.parts)
                self._deliver(entry, number, piece)
            else:
                entry.parts.append(piece)
            return True
        return False

    def _deliver(self, entry: _Channel, number: int, body: bytes) -> None:
        tag, entry.tag, entry.parts = entry.tag, -1, []
        sink = entry.sink
        if sink is None:  # unregistered meanwhile: dropped, the broker puts it back
            if self.channels.get(number) is entry:
                del self.channels[number]
            return
        self.taken += 1
        sink(tag, entry.redelivered, body)


def connection_class() -> type:
    """An aio-pika connection class whose aiormq connection reads through a
    :class:`SplitReader` (its ``split`` attribute once connected); call only when
    :func:`usable`."""
    import aio_pika
    from aiormq import connection as module

    class SplitFactory(module.TransportFactory):  # type: ignore[misc, name-defined]
        """aiormq's own transport (TLS for ``amqps``), its reader behind a SplitReader."""

        def __init__(self) -> None:
            self.split: SplitReader | None = None

        async def create(self, url: Any, **kwargs: Any) -> tuple[Any, Any]:
            inner = (module.TLSTransportFactory() if url.scheme == "amqps"
                     else module.TCPTransportFactory())
            reader, writer = await inner.create(url, **kwargs)
            self.split = SplitReader(reader)
            return self.split, writer

    class SplitConnection(aio_pika.Connection):  # type: ignore[misc]
        """An aio-pika connection whose deliveries a worker's lanes can take first."""

        factory: SplitFactory | None = None

        async def connect(self, timeout: Any = None) -> None:
            self.factory = SplitFactory()
            self.kwargs["transport_factory"] = self.factory
            await super().connect(timeout)

        @property
        def split(self) -> SplitReader | None:
            return self.factory.split if self.factory is not None else None

    return SplitConnection
