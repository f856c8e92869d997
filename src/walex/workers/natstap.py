"""A NATS worker's chunks taken from the socket before nats-py's read loop wakes up.

nats-py reads its connection in a task: the transport hands a chunk to the
connection's ``asyncio.StreamReaderProtocol``, which puts it in the
``StreamReader``'s buffer and wakes the read loop, which takes it out again
(``read``) and parses it, in a later turn of the event loop. For a worker's
lanes (:mod:`walex.workers.natsdirect`) that is a task switch, a future and two
copies per chunk before the lane's own task is woken.

:class:`Tap` stands between the transport and that protocol
(``transport.set_protocol``): while the read loop waits for data with nothing
buffered and nats-py's parser holds nothing (so every earlier byte of the
connection has been parsed and dispatched), a chunk's leading whole frames of
the lanes' subscriptions are cut there and then (``cut``, the same as the
parser hook's), and only the rest, if any, is handed to the protocol for the
read loop. Otherwise the whole chunk goes to the protocol as before. So the
connection's frames are dispatched in the order they came, once each, and
everything else (PINGs, other subscriptions, errors, the end of the
connection) is nats-py's as it was. Every other protocol call goes to the
protocol unchanged. :func:`tap` sets it only on a plain TCP connection
(no TLS) of a transport and reader of the shape read here (asyncio's
``StreamReader`` internals ``_buffer``, ``_waiter``, ``_eof``, Python 3.8 to
3.13; uvloop's and asyncio's transports both re-read the protocol's
``data_received`` on ``set_protocol``); :meth:`Tap.remove` puts the protocol
back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

__all__ = ["Tap", "tap"]

log = logging.getLogger("walex.workers")


class Tap(asyncio.Protocol):
    """The connection's protocol while tapped: its chunks' leading lane frames cut here."""

    def __init__(self, transport: Any, protocol: Any, reader: Any,
                 cut: Callable[[bytes], bytes], idle: Callable[[], bool]) -> None:
        self.transport = transport
        self.protocol = protocol
        self.reader = reader
        self.cut = cut  # dispatches the leading lane frames; the rest (b"": none)
        self.idle = idle  # whether nats-py's parser holds nothing
        self.chunks = 0  # chunks cut here entirely (for the tests and the curious)

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        waiter = reader._waiter
        if waiter is not None and not waiter.done() and not reader._buffer and \
                not reader._eof and self.idle():
            data = self.cut(data)
            if not data:
                self.chunks += 1
                return
        self.protocol.data_received(data)

    def connection_made(self, transport: Any) -> None:
        self.protocol.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.protocol.connection_lost(exc)

    def eof_received(self) -> bool | None:
        result: bool | None = self.protocol.eof_received()
        return result

    def pause_writing(self) -> None:
        self.protocol.pause_writing()

    def resume_writing(self) -> None:
        self.protocol.resume_writing()

    def remove(self) -> None:
        """Give the transport its protocol back (if it still has this tap)."""
        transport = self.transport
        try:
            if transport.get_protocol() is self:
                transport.set_protocol(self.protocol)
        except Exception as exc:  # a transport closed meanwhile: nothing reads it any more
            log.debug("removing the NATS worker's tap: %r", exc)


def tap(nc: Any, cut: Callable[[bytes], bytes], idle: Callable[[], bool]) -> Tap | None:
    """Tap the connection of ``nc`` (a connected nats-py client); None, changing nothing,
    when its transport is not a plain TCP stream of the shape :class:`Tap` reads."""
    reader = getattr(nc._transport, "_io_reader", None)
    writer = getattr(nc._transport, "_io_writer", None)
    transport = getattr(writer, "transport", None)
    if reader is None or transport is None or transport.is_closing():
        return None
    if not (isinstance(getattr(reader, "_buffer", None), bytearray) and hasattr(reader, "_waiter")
            and hasattr(reader, "_eof")):
        return None
    try:
        protocol = transport.get_protocol()
        plain = transport.get_extra_info("sslcontext") is None and \
            transport.get_extra_info("ssl_object") is None
    except Exception:
        return None
    if not plain or not isinstance(protocol, asyncio.StreamReaderProtocol) or \
            isinstance(protocol, asyncio.BufferedProtocol) or \
            getattr(protocol, "_stream_reader", None) is not reader:
        return None
    tapped = Tap(transport, protocol, reader, cut, idle)
    transport.set_protocol(tapped)
    return tapped
