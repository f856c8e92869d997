"""JetStream PubAcks counted as they arrive, without a Python future or PubAck per message.

:class:`~walex.destinations.nats.NatsDestination` publishes each message of a
batch with the reply subject ``<prefix><n>`` (``n`` numbers the messages of
the connection) and one subscription to ``<prefix>*`` hands every answer to
:meth:`PubAcks.received`. An answer is a PubAck (``{"stream":...,"seq":...}``,
with ``"duplicate": true`` when the stream already had the message id) or an
error; only an error, or anything that is not a plain PubAck, is parsed as
JSON. The batch is confirmed when each of its numbers was answered once with
a PubAck; an answer to an earlier, abandoned attempt is ignored.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import nats.js.errors

__all__ = ["EXPECTED_STREAM", "PubAcks"]

EXPECTED_STREAM = "Nats-Expected-Stream"  # the stream must be this one, or it is an error
_STATUS, _NO_RESPONDERS = "Status", "503"
_PUBACK = b'{"stream":'
_DUPLICATE = b'"duplicate":'  # then true or false, with or without a space (the server writes
# '{"stream":"S", "seq":1,"duplicate": true}')


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
        done = self._done = asyncio.get_running_loop().create_future()
        if not count:
            done.set_result(None)
        return first, done

    async def received(self, msg: Any) -> None:
        """The subscription's callback: one answer."""
        try:
            i = int(msg.subject[self._cut:]) - self._first
        except ValueError:
            return
        seen, done = self._seen, self._done
        if not 0 <= i < len(seen) or seen[i] or done is None or done.done():
            return  # another attempt's answer, or one answered already
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
        at = data.find(_DUPLICATE)
        if at >= 0 and data[at + len(_DUPLICATE):].lstrip().startswith(b"true"):
            self.duplicates += 1
        self._left -= 1
        if not self._left:
            done.set_result(None)


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
