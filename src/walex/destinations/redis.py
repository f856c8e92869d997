"""Redis Streams: ``redis://[user:pass@]host:port/db?stream=walex:{schema}.{table}&maxlen=N``.

Each event is one ``XADD`` entry with the fields ``id`` (``event.id``) and
``event`` (the CloudEvent JSON), to the stream its template names. A batch
(with a window, the batches of several transactions) goes in one pipeline,
without ``MULTI``: one round trip; it counts as durable when every ``XADD``
was answered, and a batch cut short is published again whole. Redis
acknowledges a write before it reaches the disk unless the server runs with
``appendonly yes`` and ``appendfsync always``: that setting decides what a
crash of Redis itself can lose.

Redis keeps no message ids: after a walex crash the last batches may be
added again (with the same ``id`` field), and a consumer drops them by id.
Parameters: ``stream`` (required; ``{schema}``, ``{table}``, ``{type}``,
``{partition}``), ``maxlen`` (trims each stream to about N entries,
``MAXLEN ~``), ``timeout`` (seconds to wait for the connection and for the
replies of a batch, default 10). ``rediss://`` uses TLS. A batch refused for
want of memory (``maxmemory`` with ``noeviction``: OOM) is published again
``full_attempts`` times (8) in a row, then it is a refusal
(:class:`~walex.errors.DestinationError`) naming the fixes.

How a batch goes out, for speed (about 20x less CPU per event than redis-py's
pipeline, whose packing and per-reply timer dominated the relay: 1.05 vs 20.7
us per 250-byte event in batches of 4096): walex packs the ``XADD`` commands
itself into one buffer (:func:`xadd_commands`, compiled when built, byte for
byte what redis-py packs, which a test checks) and writes them on the client's one
connection (``single_connection_client``; redis-py still connects, logs in,
selects the database and says HELLO). The replies are taken from that
connection's hiredis reader (:func:`replies`; the ``redis`` extra installs
hiredis, else redis-py's ``read_response`` reads them), each one: a refusal
is kept with its position while the rest are read, a RESP3 push among them
goes to redis-py's handler and is never counted as a reply; the entry ids, the
usual replies, are counted from the socket's bytes in compiled code
(:func:`scan_ids`) until a reply of another kind hands the rest to hiredis. The timeout
bounds the whole batch rather than each reply; a batch that times out or
fails on the wire drops the connection (its unread replies are never taken
for another batch's) and is published again whole.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Callable

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis._parsers.socket import SERVER_CLOSED_CONNECTION_ERROR
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    NoPermissionError,
    OutOfMemoryError,
    RedisError,
    ResponseError,
)

try:  # the reader redis-py's hiredis parser uses, and its marker of a reply not whole yet
    from hiredis import Reader as _Reader
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _MORE
except ImportError:  # pragma: no cover - the redis extra installs hiredis
    _Reader = None
    _MORE = None

from ..errors import ConfigError, DestinationError
from .base import Destination, DestinationURL, Outgoing, Template, Unavailable

__all__ = ["RedisDestination", "py_xadd_commands", "replies", "xadd_commands", "xadd_head"]

log = logging.getLogger("walex.destinations")

_MOST = 2**63 - 1  # the largest integer Redis takes (maxlen)


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(value), value)


def xadd_head(key: str, maxlen: int | None) -> bytes:
    """The RESP start of ``XADD key [MAXLEN ~ maxlen] * id``: every argument but the last
    three, for a command of 7 (10 with MAXLEN) arguments."""
    trim = [b"MAXLEN", b"~", b"%d" % maxlen] if maxlen is not None else []
    args = [b"XADD", key.encode(), *trim, b"*", b"id"]
    return b"*%d\r\n" % (len(args) + 3) + b"".join(map(_bulk, args))


def py_xadd_commands(batch: list[Outgoing], heads: dict[tuple[Any, ...], bytes],
                     head_of: Callable[[Outgoing], bytes]) -> bytes:
    """``XADD key [MAXLEN ~ N] * id <event id> event <body>`` in RESP for each message of
    ``batch``, in one buffer: the bytes redis-py packs for ``execute_command("XADD", ...)``
    (a test holds them equal). ``heads`` holds each key's start (:func:`xadd_head`) by the
    message's (schema, table, type, partition), ``head_of`` makes a missing one.
    ``xadd_commands`` is the compiled twin (``walex.destinations._resp``) when it was
    built: the packing is the largest part of the relay's own CPU per message."""
    commands: list[bytes] = []
    add, get = commands.append, heads.get
    for item in batch:
        head = get(item[1:5])  # schema, table, type, partition: what the template may use
        if head is None:
            head = head_of(item)
        ident = item.id.encode()
        body = item.body
        add(b"%b$%d\r\n%b\r\n$5\r\nevent\r\n$%d\r\n%b\r\n" % (
            head, len(ident), ident, len(body), body))
    return b"".join(commands)


def py_scan_ids(data: bytes, most: int) -> tuple[int, int, bool]:
    """How many whole bulk string replies (``$<n>\\r\\n<n bytes>\\r\\n``: an XADD's entry
    id) ``data`` starts with, at most ``most``; the bytes they take; and whether the scan
    stopped only for want of more bytes (a bulk string begun, not whole yet), not at
    ``most`` nor at a reply of another kind (an error, a push, a null), which is left to
    hiredis. ``scan_ids`` is the compiled twin (a test holds them equal)."""
    size, at, n = len(data), 0, 0
    while n < most:
        if at >= size:
            return n, at, True
        if data[at] != 0x24:  # "$"
            break
        j = at + 1
        end = j
        while end < size and end - j < 18 and 0x30 <= data[end] <= 0x39:
            end += 1
        if end >= size:
            return n, at, True
        if end == j or data[end] != 0x0D:  # "$-1" (a null), over 18 digits, or not RESP
            break
        if end + 1 >= size:
            return n, at, True
        if data[end + 1] != 0x0A:
            break
        stop = end + 2 + int(data[j:end])
        if stop + 2 > size:
            return n, at, True
        if data[stop:stop + 2] != b"\r\n":
            break
        at = stop + 2
        n += 1
    return n, at, False


try:
    from ._resp import scan_ids as compiled_scan_ids
    from ._resp import xadd_commands as compiled_xadd_commands
except ImportError:  # not built (no compiler or Cython): the same bytes, in Python
    compiled_xadd_commands = compiled_scan_ids = None
# WALEX_PURE_PYTHON=1 takes the pure twin, as for walex's other compiled parts
xadd_commands = compiled_xadd_commands \
    if compiled_xadd_commands is not None and not os.environ.get("WALEX_PURE_PYTHON") \
    else py_xadd_commands
# the replies are counted from the socket's bytes only by the compiled scan (in Python,
# hiredis's reader is the faster one): None takes every reply from hiredis
scan_ids = compiled_scan_ids if not os.environ.get("WALEX_PURE_PYTHON") else None


async def replies(conn: Any, count: int) -> tuple[ResponseError | None, int]:
    """Read the ``count`` replies of the commands just written on ``conn``, each one; return
    the first refusal (a ``ResponseError`` reply, say WRONGTYPE) and its position, or
    ``(None, 0)`` when every command was answered without one. A reply that is a
    connection error (LOADING, say) is raised at once; the caller drops the connection.

    With hiredis (the ``redis`` extra), the replies are taken from the connection's own
    hiredis reader in this one loop, the socket read when it has no whole reply left: two
    C calls per reply instead of three coroutines, a host description and a protocol
    check in redis-py's ``read_response`` per reply (about 5x less CPU per reply).
    When hiredis holds nothing yet, the entry ids are first counted straight from the
    socket's bytes by the compiled :func:`scan_ids` (no reply object, no copy into
    hiredis: ~1.4k fewer instructions per row); hiredis takes the bytes from the first
    reply of another kind on. Without hiredis, through ``read_response``."""
    refused: ResponseError | None = None
    at = 0
    parser = getattr(conn, "_parser", None)
    reader = getattr(parser, "_reader", None)
    if _Reader is None or type(reader) is not _Reader or not getattr(parser, "_connected", 0):
        read = conn.read_response
        for i in range(count):
            try:
                await read()
            except ResponseError as exc:
                if refused is None:
                    refused, at = exc, i
        return refused, at
    i = 0
    stream = getattr(parser, "_stream", None)
    has_data = getattr(reader, "has_data", None)
    if scan_ids is not None and stream is not None and has_data is not None \
            and not has_data():
        # hiredis holds nothing: the entry ids are counted straight from the socket's bytes
        # (no reply object, no copy into hiredis's buffer); at the first reply of another
        # kind (a refusal, a push) hiredis takes what is left, and reads the rest below
        read, size, scan, rest = stream.read, parser._read_size, scan_ids, b""
        while True:
            data = await read(size)
            if not data:
                raise RedisConnectionError(SERVER_CLOSED_CONNECTION_ERROR)
            if rest:
                data = rest + data
            n, used, want = scan(data, count - i)
            i += n
            rest = data[used:] if used != len(data) else b""
            if i == count or not want:
                break
        if rest:  # a reply of another kind, or bytes after the batch's (a push)
            reader.feed(rest)
        if i == count:
            return None, 0
    gets, more = reader.gets, parser.read_from_socket
    while i < count:
        reply = gets()
        if reply.__class__ is bytes:  # an entry id: the common case, first
            i += 1
        elif reply is _MORE:
            await more()  # raises ConnectionError when the server closed the connection
        elif isinstance(reply, list):  # RESP3 push (an invalidation, say), not a reply: an
            await parser.handle_push_response(reply)  # XADD never answers with an array
        else:
            if isinstance(reply, ResponseError):
                if refused is None:
                    refused, at = reply, i
            elif isinstance(reply, BaseException):  # ConnectionError replies, as redis-py
                raise reply
            i += 1
    return refused, at


class RedisDestination(Destination):
    scheme = "redis"
    extra = "redis"
    accepted = ("stream", "maxlen", "timeout")

    def __init__(self, url: DestinationURL, partitions: int = 1) -> None:
        super().__init__(url, partitions)
        self.stream = Template(url.require("stream", "stream=walex:{schema}.{table}"),
                               "stream", url.display)
        self.maxlen = url.take_int("maxlen", None, minimum=1)
        if self.maxlen is not None and self.maxlen > _MOST:  # Redis would refuse every XADD
            raise ConfigError(f"destination {url.display}: maxlen must be at most {_MOST} "
                              f"(Redis takes a signed 64-bit integer), got {self.maxlen}")
        # (schema, table, type, partition) -> the start of the XADD commands to its stream
        self._heads: dict[tuple[Any, ...], bytes] = {}
        self.timeout = url.take_float("timeout", 10.0, minimum=0.01)
        url.no_more_params(self.accepted)
        db = url.path.strip("/") or "0"
        if not db.isdigit():
            raise ConfigError(f"destination {url.display}: the path names the database by its "
                              f"number (redis://host:6379/0), not {db!r}")
        self.db = int(db)
        self.client: Any = None

    async def open(self) -> None:
        url = self.url
        self.client = aioredis.Redis(
            host=url.host or "127.0.0.1", port=url.port or 6379, db=self.db,
            username=url.username, password=url.password, ssl=url.scheme == "rediss",
            # no per-read timeout (a timer per reply); publish() bounds each batch
            socket_timeout=None, socket_connect_timeout=self.timeout,
            retry=Retry(NoBackoff(), 0), client_name="walex",
            single_connection_client=True,  # publish() writes to client.connection
        )
        try:
            async with asyncio.timeout(self.timeout):
                await self.client.ping()
        except NoPermissionError as exc:  # logged in, but PING or CLIENT SETNAME not allowed
            await self.close()
            raise self.misconfigured(
                f"Redis refused a command to the URL's user ({self.describe(exc)})",
                "allow the user PING, CLIENT and XADD on the stream keys (ACL SETUSER USER "
                "+ping +client +xadd ~KEYS), or give a user that may",
            ) from None
        except (AuthenticationError, AuthenticationWrongNumberOfArgsError) as exc:
            await self.close()
            given = "a password" if url.password else "no password"
            raise self.misconfigured(
                f"Redis refused the login with {given} ({self.describe(exc)})",
                "put the user and password Redis accepts (requirepass, or an ACL user allowed "
                "PING and XADD) in the URL: redis://[USER]:PASSWORD@host:6379/0",
            ) from None
        except ResponseError as exc:
            await self.close()
            if "AUTH" not in str(exc):
                raise self.unavailable("cannot connect", exc) from None
            raise self.misconfigured(
                f"Redis refused the login ({self.describe(exc)})",
                "the server has no password set: remove it from the URL, or set one "
                "(requirepass or an ACL user)",
            ) from None
        except Exception as exc:
            await self.close()
            raise self.unavailable("cannot connect", exc) from None
        self.opened = True

    def _head(self, item: Outgoing) -> bytes:
        """The start of the XADD commands to ``item``'s stream, kept per (schema, table,
        type, partition): what the template may use."""
        heads = self._heads
        if len(heads) > 10_000:
            heads.clear()
        head = heads[item[1:5]] = xadd_head(self.stream.render(item), self.maxlen)
        return head

    async def publish(self, batch: list[Outgoing]) -> None:
        client = self.client
        conn = client.connection if client is not None else None
        if conn is None:
            raise Unavailable("not connected")
        # one round trip, no MULTI/EXEC: Redis answers each XADD (half the replies of a
        # transaction's QUEUED + EXEC); a batch cut short is published again, same ids.
        # The commands are packed here (xadd_commands) and handed to the client's
        # connection: redis-py's pipeline costs ~5x as much CPU per command.
        commands = xadd_commands(batch, self._heads, self._head)
        refused: ResponseError | None = None
        try:
            async with asyncio.timeout(self.timeout):
                try:
                    await conn.send_packed_command(commands)
                    refused, refused_at = await replies(conn, len(batch))
                except BaseException:  # replies may be left unread: never reuse the socket
                    await conn.disconnect(nowait=True)
                    raise
            if refused is not None:
                raise refused
        except TimeoutError:
            raise Unavailable(f"no reply from Redis to the batch within {self.timeout:g}s (the "
                              "connection is dropped; the batch is published again)") from None
        except NoPermissionError as exc:  # an ACL user without XADD (on these keys)
            raise self.misconfigured(
                f"Redis refused a command to the URL's user ({self.describe(exc)})",
                "allow the user XADD on the stream keys (ACL SETUSER USER +xadd ~KEYS), or "
                "give a user that may",
            ) from None
        except OutOfMemoryError as exc:  # maxmemory reached, maxmemory-policy noeviction
            raise Unavailable(
                f"Redis refused the batch for want of memory ({self.describe(exc)}); raise "
                "its maxmemory, give the destination maxlen=N (walex trims each stream to "
                "about N entries) or trim the streams (XTRIM)", attempts=self.full_attempts,
            ) from None
        except ResponseError as exc:
            if "WRONGTYPE" in str(exc):
                what, fix = "a stream key", "give the stream template other names"
                if refused is exc:  # the refusal of a message of the batch: its key is known
                    name = self.stream.render(batch[refused_at])
                    what = f"the stream key {name!r}"
                    fix = (f"delete that key (DEL {name}) if nothing else uses it, or " + fix)
                raise DestinationError(
                    f"destination {self.display}: {what} holds another type of value than a "
                    f"stream ({self.describe(exc)}); {fix}"
                ) from None
            raise self.unavailable("Redis refused the batch", exc) from None
        except (RedisError, OSError) as exc:
            raise self.unavailable("the batch was not confirmed", exc) from None

    async def close(self) -> None:
        client, self.client = self.client, None
        self.opened = False
        if client is not None:
            try:
                async with asyncio.timeout(self.timeout):
                    await client.aclose()
            except Exception as exc:  # closing a broken connection
                log.debug("closing redis connection to %s: %s", self.display, self.describe(exc))
