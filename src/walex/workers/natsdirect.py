"""A NATS worker's deliveries straight from nats-py's parser: no ``Msg``, no header parsing, no queue.

nats-py's protocol parser hands every message to ``await
client._process_msg(sid, subject, reply, data, headers)``, looked up on the
client instance each time; for a subscription without a callback that
builds a ``Msg`` (decoding the subject and reply, parsing every header of
the relay's message, ``Nats-Msg-Id`` and the expected-stream ones, which a
worker never reads) and puts it on the subscription's ``asyncio.Queue``,
from which the lane takes it. :class:`Inboxes` sets that attribute, on the
worker's own connection, to :meth:`Inboxes._take`: a message of one of the
lanes' pull subscriptions (found by its sid) becomes a :class:`Raw` (the
reply subject, body and header bytes as the parser cut them) appended to
that lane's deque, and the lane's waiting future is woken
(:meth:`~walex.workers.nats.NatsLane.arrive`); the client's ``in_msgs``,
``in_bytes`` and the subscription's ``delivered`` count as before. A
JetStream status (a request that expired, a heartbeat) comes the same way
and is recognised from its header bytes (``NATS/1.0 408``) as nats-py does.
Every other sid goes to what ``_process_msg`` was before (nats-py's own, or
the PubAcks hook of :mod:`walex.destinations.pubacks`), unchanged.

The parser's own ``parse`` is also taken over (an instance attribute of the
connection's parser, :meth:`Inboxes.parse`): a chunk read while the parser holds
nothing is cut with ``bytes.find``/``split`` (:meth:`Inboxes.cut`) as long as it
holds whole ``MSG``/``HMSG`` frames of the lanes' sids, which go to the lanes
as above without the two regular expressions, the ``bytearray`` copies and the
coroutine call per message of nats-py's parser; the rest of the chunk (another
sid, a ``PING``, ``+OK``, ``INFO``, ``-ERR``, a frame cut in two, anything the
cut does not recognise) goes to nats-py's ``parse`` from where the cut stopped
(in the parser hook: that frame alone when it is whole, and the lane frames
after it are cut again), so the order of the frames and nats-py's handling of
everything else stay as they were. A chunk that ends within a lane's frame (a
batch's messages span several chunks) leaves that frame's head with the cut,
not with nats-py's parser (which, holding bytes, would be handed every chunk
after it): it is cut with the next chunk; :meth:`Inboxes.release` hands what it
holds to the parser. Before that, :mod:`walex.workers.natstap` cuts them from
the chunk as the transport hands it over, when the read loop is idle (the same
cut, without waking the read loop).

The lane then asks for messages itself, as nats-py's ``fetch(1)`` does (a
``CONSUMER.MSG.NEXT`` request of ``batch`` 1 to the subscription's inbox),
and acknowledges, reports progress and gives back by publishing to the
message's reply subject as ``Msg.ack()``, ``in_progress()`` and ``nak()``
do, handing the commands to the client's transport itself (:meth:`Inboxes._write`).
The hook is set only for a nats-py whose parser and client have that
shape (:func:`usable`: 2.6 to 2.16 were read, as for the PubAcks) and is
removed (:meth:`Inboxes.release`) before the connection is closed;
otherwise (``NatsConsumer.direct = False`` too) the lanes use the
subscription's queue and ``fetch`` as before.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from typing import Any

from nats.aio.msg import Msg
from nats.protocol.parser import AWAITING_CONTROL_LINE as _AWAITING_CONTROL_LINE
from nats.protocol.parser import MAX_CONTROL_LINE_SIZE as _MAX_CONTROL_LINE

from ..destinations.hpub import check_publishable
from ..destinations.hpub import usable as hpub_usable
from .natstap import Tap, tap

__all__ = ["Inboxes", "Raw", "acked_fields", "usable"]

log = logging.getLogger("walex.workers")

_STATUS_LINE = b"NATS/1.0 "  # headers that open with an inline status (NATS/1.0 408 ...)


class Raw:
    """One message of a lane's pull subscription, as the parser cut it."""

    __slots__ = ("reply", "data", "headers", "_text")

    def __init__(self, reply: bytes, data: bytes, headers: bytes | None) -> None:
        self.reply = reply
        self.data = data
        self.headers = headers
        self._text: str | None = None

    @property
    def reply_text(self) -> str:
        text = self._text
        if text is None:
            text = self._text = self.reply.decode()
        return text

    @property
    def status(self) -> str | None:
        """A JetStream status message's code (``"408"``, ``"100"`` ...), else None: as
        nats-py reads it (an empty body, headers opening with ``NATS/1.0 <digits>``)."""
        headers = self.headers
        if self.data or not headers or not headers.startswith(_STATUS_LINE):
            return None
        code = headers[9:12].strip()
        return code.decode() if code.isdigit() else None

    def acked_as(self) -> tuple[int, int, int]:
        """Deliveries so far, stream sequence and messages pending after it
        (:func:`acked_fields`, read from the bytes; other forms, a domain's, through
        nats-py's metadata)."""
        tokens = self.reply.split(b".")
        if len(tokens) == 9 and tokens[0] == b"$JS" and tokens[1] == b"ACK":
            return int(tokens[4]), int(tokens[5]), int(tokens[8])
        meta = Msg(_client=None, reply=self.reply_text, data=self.data).metadata  # type: ignore[arg-type]
        return meta.num_delivered, meta.sequence.stream, meta.num_pending


def acked_fields(reply: str) -> tuple[int, int, int] | None:
    """Deliveries so far, stream sequence and messages pending after it, from a JetStream
    message's reply subject (``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.
    <consumer seq>.<time>.<pending>``) without nats-py's metadata; None for other forms."""
    tokens = reply.split(".")
    if len(tokens) == 9 and tokens[0] == "$JS" and tokens[1] == "ACK":
        return int(tokens[4]), int(tokens[5]), int(tokens[8])
    return None


def usable(nc: Any, sids: list[int]) -> bool:
    """Whether :class:`Inboxes` may hook ``nc`` (a connected nats-py client) for the
    subscriptions ``sids``: a checked nats-py version whose parser dispatches through the
    client's ``_process_msg`` attribute (a coroutine function, nats-py's own or the
    PubAcks hook), whose ``buf`` and ``state`` :meth:`Inboxes.parse` reads, with the
    internals :meth:`Inboxes.send` uses."""
    if not hpub_usable(nc):
        return False
    parser = getattr(nc, "_ps", None)
    code = getattr(getattr(type(parser), "parse", None), "__code__", None)
    subs = getattr(nc, "_subs", None)
    return (code is not None and "_process_msg" in code.co_names
            and getattr(parser, "nc", None) is nc
            and isinstance(getattr(parser, "buf", None), bytearray)
            and getattr(parser, "state", None) is not None and "parse" not in vars(parser)
            and inspect.iscoroutinefunction(getattr(nc, "_process_msg", None))
            and isinstance(subs, dict) and all(sid in subs for sid in sids)
            and all(isinstance(getattr(subs[sid], "_received", None), int) for sid in sids))


def _frame_end(data: bytes) -> int:
    """The length of the whole frame (``MSG``/``HMSG`` or a one-line command) at the head of
    ``data``; 0 when it is not whole or not read."""
    eol = data.find(b"\r\n")
    if eol < 0:
        return 0
    if not (data.startswith(b"MSG ") or data.startswith(b"HMSG ")):
        return eol + 2
    size = data[:eol].rsplit(None, 1)[-1]
    if not size.isdigit():
        return 0
    end = eol + 2 + int(size) + 2
    return end if end <= len(data) else 0


class Inboxes:
    """The hook on one client: the messages of the lanes' subscriptions, by sid."""

    def __init__(self, nc: Any, lanes: dict[int, Callable[[Raw], None]],
                 taps: bool = True) -> None:
        self.nc = nc
        self._lanes = lanes
        self._subs = {sid: nc._subs[sid] for sid in lanes}
        self._stats: dict[str, int] = nc.stats
        self._had = vars(nc).get("_process_msg")  # an instance attribute before ours (PubAcks)
        self._process = nc._process_msg  # what every other sid goes to
        self._outbox: list[bytes] = []  # commands not written yet (send(coalesce=True))
        # the head of a frame the chunks cut in two (see cut), held here, not by nats-py's
        # parser, so the next chunk's frames are cut here too; nats-py's parser is idle then
        self._carry = b""
        # lanes woken by a delivery that have not answered it or waited again yet (the
        # lanes count it, NatsLane.arrive and _settle): queue() writes when it is 0
        self.awake = 0
        self._kicks: set[asyncio.Task[None]] = set()  # nats-py's flusher being woken
        self._loop: asyncio.AbstractEventLoop | None = None  # see send()
        nc._process_msg = self._take
        parser = nc._ps
        self._parser = parser
        self._parse = type(parser).parse.__get__(parser)  # nats-py's own, for the rest
        parser.parse = self.parse
        # the chunks themselves, before the read loop takes them (walex.workers.natstap)
        self.tap: Tap | None = tap(nc, self.cut, self._idle) if taps else None

    def _idle(self) -> bool:
        """Whether nats-py's parser holds nothing (between frames, no bytes kept)."""
        parser = self._parser
        return not parser.buf and parser.state == _AWAITING_CONTROL_LINE

    @classmethod
    def install(cls, nc: Any, lanes: dict[int, Callable[[Raw], None]],
                taps: bool = True) -> Inboxes | None:
        """Hook ``nc`` for these sids (and tap its connection, ``taps``, when it can be);
        None, changing nothing, when it is not a client this was checked for."""
        if not usable(nc, list(lanes)):
            return None
        return cls(nc, lanes, taps)

    async def _take(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                    headers: bytes | None) -> None:
        """The client's ``_process_msg`` while hooked."""
        arrive = self._lanes.get(sid)
        if arrive is None:
            return await self._process(sid, subject, reply, data, headers)
        stats = self._stats
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(data)
        self._subs[sid]._received += 1
        arrive(Raw(reply, data, headers))
        return None

    async def parse(self, data: bytes = b"") -> None:
        """The parser's ``parse`` while hooked: the lanes' whole frames at the head of a
        chunk cut here (:meth:`cut`), the rest by nats-py's ``parse``."""
        parser = self._parser
        if parser.buf or parser.state != _AWAITING_CONTROL_LINE or not data:
            return await self._parse(data)
        rest = self.cut(data)
        while rest:
            # anything else (a lease's reply, a PING): that frame alone to nats-py, when it
            # is whole, and the lanes' frames after it cut here again
            end = _frame_end(rest)
            if not end or end == len(rest):
                await self._parse(rest)
                return None
            await self._parse(rest[:end])
            if parser.buf or parser.state != _AWAITING_CONTROL_LINE or \
                    vars(parser).get("parse") != self.parse:
                await self._parse(rest[end:])
                return None
            rest = self.cut(rest[end:])
        return None

    carry_at_most = 65536  # bytes of a frame cut in two held here; a longer one: nats-py's

    def cut(self, data: bytes) -> bytes:
        """Hand the lanes the whole ``MSG``/``HMSG`` frames of their sids at the head of
        the held bytes and ``data`` (as :meth:`_take` does); the bytes not taken, for
        nats-py's parser: from anything else on (another sid's frame, another command),
        else b"". A chunk ending within a frame (a batch of messages spans several)
        leaves that frame's head held here (up to ``carry_at_most`` bytes), cut with the
        next chunk, so nats-py's parser, which would then take every following chunk
        whole, is not handed it."""
        carry = self._carry
        if carry:
            self._carry = b""
            data = carry + data
        at = self._cut(data)
        end = len(data)
        if at == end:
            return b""
        if end - at <= self.carry_at_most and self._cut_in_two(data, at):
            self._carry = data[at:]
            return b""
        return data[at:] if at else data

    def _cut_in_two(self, data: bytes, at: int) -> bool:
        """Whether ``data[at:]`` is the head of a lane's frame (or of a ``MSG``/``HMSG``
        control line) that the next bytes complete."""
        head = data[at:at + 5]
        if len(head) < 5:
            return b"HMSG ".startswith(head) or b"MSG ".startswith(head[:4])
        eol = data.find(b"\r\n", at)
        if eol < 0:
            return (head == b"HMSG " or head[:4] == b"MSG ") and \
                len(data) - at <= _MAX_CONTROL_LINE
        fields = data[at:eol].split()
        if fields[0] == b"MSG" and len(fields) in (4, 5):
            sid, size, hsize = fields[2], fields[-1], b"0"
        elif fields[0] == b"HMSG" and len(fields) in (5, 6):
            sid, size, hsize = fields[2], fields[-1], fields[-2]
        else:
            return False
        return sid.isdigit() and size.isdigit() and hsize.isdigit() and \
            int(sid) in self._lanes and eol + 2 + int(size) + 2 > len(data)

    def _cut(self, data: bytes) -> int:
        """:meth:`cut` of ``data``: the offset of the first byte not taken."""
        lanes = self._lanes
        subs = self._subs
        at, end = 0, len(data)
        taken = taken_bytes = 0  # into the client's stats once, at the end
        while at < end:
            if data.startswith(b"HMSG ", at):
                eol = data.find(b"\r\n", at)
                if eol < 0:
                    break
                fields = data[at + 5:eol].split()
                if len(fields) == 5:
                    _subject, sid, reply, hsize, size = fields
                elif len(fields) == 4:
                    _subject, sid, hsize, size = fields
                    reply = b""
                else:
                    break
            elif data.startswith(b"MSG ", at):
                eol = data.find(b"\r\n", at)
                if eol < 0:
                    break
                fields = data[at + 4:eol].split()
                hsize = b"0"
                if len(fields) == 4:
                    _subject, sid, reply, size = fields
                elif len(fields) == 3:
                    _subject, sid, size = fields
                    reply = b""
                else:
                    break
            else:
                break
            if not (sid.isdigit() and size.isdigit() and hsize.isdigit()):
                break
            key = int(sid)
            arrive = lanes.get(key)
            start = eol + 2
            stop = start + int(size)
            if arrive is None or stop + 2 > end:
                break
            head = int(hsize)
            body = data[start + head:stop]
            taken += 1
            taken_bytes += len(body)
            subs[key]._received += 1
            arrive(Raw(reply, body, data[start:start + head] if head else None))
            at = stop + 2
        if taken:
            stats = self._stats
            stats["in_msgs"] += taken
            stats["in_bytes"] += taken_bytes
        return at

    def release(self) -> None:
        """Give the client what ``_process_msg`` was before (when it still has ours)."""
        nc = self.nc
        self._write()
        if self._carry:  # nats-py's parser goes on from the frame's head
            self._parser.buf.extend(self._carry)
            self._carry = b""
        if self.tap is not None:
            self.tap.remove()
        if vars(self._parser).get("parse") == self.parse:
            del self._parser.parse
        if vars(nc).get("_process_msg") != self._take:
            return
        if self._had is not None:
            nc._process_msg = self._had
        else:
            del nc._process_msg

    async def send(self, command: bytes, payload: int, coalesce: bool = False) -> None:
        """Hand one ``PUB`` command (``payload`` bytes of body) to the client, with the
        checks of its publish; written to the socket at once or, ``coalesce``, with the
        others of this turn of the event loop (see :meth:`_write`)."""
        self.queue(command, payload)
        if not coalesce:
            self._write()

    def queue(self, command: bytes, payload: int) -> None:
        """:meth:`send` with ``coalesce``, which never waits: the command is written with
        the others handed over in this turn of the event loop; at once when no lane woken
        by a delivery is still to answer (``awake``), since none would join it then (and
        the event loop need not turn once more before it goes)."""
        nc = self.nc
        if not nc.is_connected or nc.is_draining_pubs:  # (else check_publishable passes)
            check_publishable(nc, [command])
        stats = self._stats
        stats["out_msgs"] += 1
        stats["out_bytes"] += payload
        out = self._outbox
        out.append(command)
        if not self.awake:
            self._write()
        elif len(out) == 1:
            loop = self._loop
            if loop is None:  # looked up once: on Python 3.11 each lookup is a system call
                loop = self._loop = asyncio.get_running_loop()
            loop.call_soon(self._write)

    def _write(self) -> None:
        """Write the commands handed over. nats-py's own publish appends to the client's
        pending buffer and wakes its flusher task (a future and a queue per message, a task
        switch); here they go to the transport directly, as nats-py writes its PINGs, while
        nothing of the client's is pending (so the order of the connection's commands stays
        the order they were handed over in). Otherwise, or not connected, they join the
        pending buffer, which nats-py writes (after a reconnect too)."""
        out = self._outbox
        if not out:
            return
        self._outbox = []
        nc = self.nc
        if nc.is_connected and not nc._pending and nc._transport is not None:
            tapped = self.tap
            try:
                if tapped is not None and not tapped.transport.is_closing():
                    tapped.transport.writelines(out)  # the socket's, under nats-py's two
                else:
                    nc._transport.writelines(out)
                return
            except Exception as exc:  # a transport closing: nats-py's pending buffer takes them
                log.debug("writing to NATS directly failed: %r", exc)
        nc._pending.extend(out)
        nc._pending_data_size += sum(map(len, out))
        if nc.is_connected and nc._flush_queue is not None and nc._flush_queue.empty():
            kick = asyncio.get_running_loop().create_task(nc._flush_pending())
            self._kicks.add(kick)  # kept until done; a failure is told, not left unseen
            kick.add_done_callback(self._kicked)

    def _kicked(self, kick: asyncio.Task[None]) -> None:
        self._kicks.discard(kick)
        if not kick.cancelled() and kick.exception() is not None:
            log.warning("waking nats-py's flusher failed (%r): the commands wait in its "
                        "buffer until the next publish or reconnection", kick.exception())

    def send_many(self, commands: list[bytes], payload: int, count: int | None = None) -> None:
        """Hand ``PUB`` commands of ``payload`` bytes of body each to the client, written
        together (a batch's acknowledgements: one write). ``count``: how many commands
        ``commands`` holds when they come joined (fewer bytes objects than commands)."""
        nc = self.nc
        if not nc.is_connected or nc.is_draining_pubs:
            check_publishable(nc, commands)
        n = len(commands) if count is None else count
        stats = self._stats
        stats["out_msgs"] += n
        stats["out_bytes"] += payload * n
        self._outbox.extend(commands)
        self._write()

    async def reply(self, raw: Raw, body: bytes) -> None:
        """Answer a message (``+ACK``, ``+WPI``, ``-NAK``), as ``Msg.ack()`` and its kin."""
        await self.send(b"PUB %b %d\r\n%b\r\n" % (raw.reply, len(body), body), len(body))
