"""JetStream PubAcks counted as they arrive, without a Python future or PubAck per message.

:class:`~walex.destinations.nats.NatsDestination` publishes each message of a
batch with the reply subject ``<prefix><n>`` (``n`` numbers the messages of
the connection) and one subscription to ``<prefix>*`` takes every answer. An
answer is a PubAck (``{"stream":...,"seq":...}``, with ``"duplicate": true``
when the stream already had the message id) or an error; only an error, or
anything that is not a plain PubAck, is parsed as JSON. The batch is
confirmed when each of its numbers was answered once with a PubAck; an
answer to an earlier, abandoned attempt is ignored. A chained batch asks for
one answer only (its last message's), and several may be awaited at once
(:meth:`PubAcks.expect_one`, a future per chain, beside the batch being
confirmed).

Two ways in, the same counting:

* Direct (:meth:`PubAcks.direct`): nats-py's protocol parser hands every
  message to ``await client._process_msg(sid, subject, reply, data, headers)``,
  looked up on the client instance each time. walex sets that attribute on
  its own connection to :meth:`PubAcks._take`, which counts an answer of the
  ack subscription's sid that has no headers and whose data starts with
  ``{"stream":`` (a plain PubAck) right there: its number from the subject
  bytes, no ``Msg``, no header parsing, no queue, no switch to the
  subscription's task. It keeps the client's ``in_msgs``/``in_bytes``
  statistics; the subscription's own counters (``delivered``, pending) do
  not see these answers, and none of them can be dropped as a slow
  consumer's. Everything else (another sid, an answer with headers such as a
  503 no-responders status, an error, anything else) goes to the client's
  own ``_process_msg``, hence through the subscription to
  :meth:`PubAcks.received` and the careful parsing, exactly as without the
  direct way. The attribute is removed by :meth:`PubAcks.release` (walex
  closes the connection then); a reconnect of the same client keeps the
  subscription's sid, so the hook stays right. It is set only for a nats-py
  whose parser and client have that shape (2.6 to 2.16 were read: the call
  is the same), see :func:`direct_usable`; otherwise the subscription
  alone delivers the answers, to :meth:`PubAcks.received`.
* Subscription: :meth:`PubAcks.received` is the subscription's callback.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from typing import Any

import nats.js.errors

from .hpub import checked_client

__all__ = ["EXPECTED_STREAM", "PubAcks", "direct_usable", "stored_at"]

EXPECTED_STREAM = "Nats-Expected-Stream"  # the stream must be this one, or it is an error
_STATUS, _NO_RESPONDERS = "Status", "503"
_PUBACK = b'{"stream":'
_DUPLICATE = b'"duplicate":'  # then true or false, with or without a space (the server writes
# '{"stream":"S", "seq":1,"duplicate": true}', the field last)


class PubAcks:
    """The answers for the batch being confirmed on one connection."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._cut = len(prefix)
        self._next = 0  # the number of the connection's next message
        self._first = 0  # the batch being confirmed: numbers first .. first + len(seen) - 1
        self._seen = bytearray()
        self._left = 0
        self._done: asyncio.Future[None] | None = None
        self.duplicates = 0
        self.failure: BaseException | None = None
        self.failed_at = 0  # the batch's message the failure answered for
        self.last = b""  # the PubAck of the batch's last message (its stream sequence)
        self._client: Any = None  # the client whose _process_msg is self._take (direct way)
        self._sid = -1
        self._process: Any = None  # that client's own _process_msg
        self._stats: dict[str, int] = {}
        # the one answer each chain in flight awaits: its number -> its future (expect_one)
        self._ones: dict[int, asyncio.Future[bytes | BaseException]] = {}

    def direct(self, nc: Any, sid: int) -> bool:
        """Take the plain PubAcks of subscription ``sid`` straight from ``nc``'s parser
        (see the module's docstring); False, changing nothing, when ``nc`` is not a client
        this was checked for (then the subscription's callback gets every answer)."""
        if self._client is not None or not direct_usable(nc, sid):
            return False
        self._sid, self._process, self._stats = sid, nc._process_msg, nc.stats
        nc._process_msg = self._take
        self._client = nc
        return True

    @property
    def is_direct(self) -> bool:
        """Whether plain PubAcks come straight from the parser (:meth:`direct`)."""
        return self._client is not None

    def release(self) -> None:
        """Give the client its own ``_process_msg`` back (when it still has ours)."""
        nc, self._client, self._process = self._client, None, None
        if nc is not None and vars(nc).get("_process_msg") == self._take:
            del nc._process_msg

    def expect(self, count: int) -> tuple[int, asyncio.Future[None]]:
        """Start a batch of ``count`` messages: their first number and a future done when
        every one was answered (or one was refused: :attr:`failure`)."""
        first = self._first = self._next
        self._next += count
        self._seen = bytearray(count)
        self._left = count
        self.duplicates = 0
        self.failure = None
        self.failed_at = 0
        self.last = b""
        done = self._done = asyncio.get_running_loop().create_future()
        if not count:
            done.set_result(None)
        return first, done

    def expect_one(self) -> tuple[int, asyncio.Future[bytes | BaseException]]:
        """A number for one message's answer, awaited besides the batch of :meth:`expect`
        and the other numbers of this method, and its future: done with the answer as
        it came (a PubAck's bytes, or the error it is), or with what :meth:`drop` or
        :meth:`abandon` gave. The caller bounds the wait (a timer that drops it)."""
        number = self._next
        self._next += 1
        answer = self._ones[number] = asyncio.get_running_loop().create_future()
        return number, answer

    def drop(self, number: int, outcome: BaseException | None = None) -> None:
        """Stop awaiting the answer of ``number`` (:meth:`expect_one`); its future, not done
        yet, is done with ``outcome`` (or left as it is: None)."""
        answer = self._ones.pop(number, None)
        if answer is not None and outcome is not None and not answer.done():
            answer.set_result(outcome)

    def abandon(self, outcome: BaseException) -> None:
        """Every answer of :meth:`expect_one` still awaited is done with ``outcome`` (the
        connection closed: none will come)."""
        ones, self._ones = self._ones, {}
        for answer in ones.values():
            if not answer.done():
                answer.set_result(outcome)

    def _one(self, number: int, answer: bytes | BaseException) -> None:
        future = self._ones.pop(number, None)
        if future is not None and not future.done():
            future.set_result(answer)

    async def _take(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                    headers: bytes | None) -> None:
        """The client's ``_process_msg`` while direct: a plain PubAck of the ack
        subscription is counted here, anything else goes to the client's own."""
        if sid != self._sid or headers is not None or not data.startswith(_PUBACK):
            return await self._process(sid, subject, reply, data, headers)
        stats = self._stats
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(data)
        try:
            number = int(subject[self._cut:])
        except ValueError:
            return
        i = number - self._first
        seen = self._seen
        if not 0 <= i < len(seen):
            if self._ones:
                self._one(number, data)  # a chain's answer (or another attempt's: ignored)
            return
        if seen[i]:
            return  # answered already
        done = self._done
        if done is None or done.done():
            return
        seen[i] = 1
        if not 48 <= data[-2] <= 57 and _duplicate(data):  # ends "<digit>}": not one
            self.duplicates += 1
        if i == len(seen) - 1:
            self.last = data
        self._left -= 1
        if not self._left:
            done.set_result(None)

    async def received(self, msg: Any) -> None:
        """The subscription's callback: one answer."""
        try:
            number = int(msg.subject[self._cut:])
        except ValueError:
            return
        i = number - self._first
        seen, done = self._seen, self._done
        if not 0 <= i < len(seen):
            if number in self._ones:  # a chain's answer
                self._one(number, _answer(msg))
            return  # or another attempt's answer
        if seen[i] or done is None or done.done():
            return  # answered already
        data = msg.data
        if not data.startswith(_PUBACK):
            try:
                failure = _error(msg)
            except Exception as exc:  # an answer beyond reading: the batch fails, never hangs
                failure = exc
            if failure is not None:
                self.failure, self.failed_at = failure, i
                done.set_result(None)
                return
        seen[i] = 1
        if _duplicate(data):
            self.duplicates += 1
        if i == len(seen) - 1:
            self.last = data
        self._left -= 1
        if not self._left:
            done.set_result(None)


def direct_usable(nc: Any, sid: int) -> bool:
    """Whether :meth:`PubAcks.direct` may hook ``nc`` (a connected nats-py client) for
    its subscription ``sid``: a checked nats-py version whose parser dispatches through
    the client's ``_process_msg`` attribute, a coroutine method nobody replaced yet."""
    if not checked_client():
        return False
    parser = getattr(nc, "_ps", None)
    parse = getattr(type(parser), "parse", None)
    code = getattr(parse, "__code__", None)
    process = getattr(type(nc), "_process_msg", None)
    subs = getattr(nc, "_subs", None)
    return (code is not None and "_process_msg" in code.co_names
            and getattr(parser, "nc", None) is nc
            and inspect.iscoroutinefunction(process)
            and "_process_msg" not in vars(nc)
            and isinstance(getattr(nc, "stats", None), dict)
            and isinstance(subs, dict) and sid in subs)


def stored_at(answer: bytes) -> int | None:
    """The stream sequence a plain PubAck (:attr:`PubAcks.last`) gives its message, or None
    when it is not one or says ``"duplicate": true`` (then the message was stored earlier,
    and that sequence is not the stream's last)."""
    try:
        fields = json.loads(answer)
    except ValueError:
        return None
    if not isinstance(fields, dict) or fields.get("duplicate"):
        return None
    seq = fields.get("seq")
    return seq if type(seq) is int and seq > 0 else None


def _duplicate(data: bytes) -> bool:
    """Whether a PubAck says ``"duplicate": true``.

    The server writes that field last (``{"stream":"S", "seq":7,"duplicate": true}``),
    after the sequence number, so a PubAck whose last value is a number (``..."seq":7}``,
    the common case) needs no search: :meth:`PubAcks._take` looks at that byte first.
    """
    at = data.find(_DUPLICATE)
    return at >= 0 and data[at + len(_DUPLICATE):].lstrip().startswith(b"true")


def _answer(msg: Any) -> bytes | BaseException:
    """An answer as :meth:`PubAcks.expect_one`'s future gives it: a PubAck's bytes, or the
    error it is."""
    data = msg.data
    if data.startswith(_PUBACK):
        return bytes(data)
    try:
        failure = _error(msg)
    except Exception as exc:  # an answer beyond reading: the chain fails, never hangs
        failure = exc
    return bytes(data) if failure is None else failure


def _error(msg: Any) -> BaseException | None:
    """What an answer that is not a plain PubAck says: the client's own error, or None."""
    headers = msg.headers
    if headers and headers.get(_STATUS) == _NO_RESPONDERS:
        return nats.js.errors.NoStreamResponseError()
    try:
        answer = json.loads(msg.data)
    except ValueError:
        return nats.js.errors.Error(f"unreadable PubAck {msg.data[:200]!r}")
    if not isinstance(answer, dict):
        return nats.js.errors.Error(f"unreadable PubAck {msg.data[:200]!r}")
    if "error" in answer:
        try:  # the client raises the error of the answer's code
            nats.js.errors.APIError.from_error(answer["error"])
        except Exception as exc:
            return exc
        return nats.js.errors.Error(f"refused: {answer['error']!r}")
    if "stream" in answer and "seq" in answer:
        return None
    return nats.js.errors.Error(f"unreadable PubAck {msg.data[:200]!r}")
