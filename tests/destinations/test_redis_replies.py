"""How the Redis destination reads the replies of a batch, against the machine's Redis.

Each XADD of a batch gets its own reply; walex takes them straight from the
connection's hiredis reader (not through redis-py's ``read_response`` per reply),
and still reads every one: a refusal in the middle of a batch is found with its
position, and the replies after it are read, so the connection stays in step.
"""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from redis._parsers import _AsyncHiredisParser, _AsyncRESP2Parser, _AsyncRESP3Parser
from redis.exceptions import ResponseError
from support import run

from walex.destinations import from_url
from walex.destinations.encoding import Outgoing
from walex.destinations.redis import xadd_commands, xadd_head

from .conftest import require


def _outgoing(table: str, count: int, start: int = 0) -> list[Outgoing]:
    return [Outgoing(f"id-{i}", "public", table, "insert", 0, b'{"n":%d,"pad":"%s"}' % (i, b"x" * 100),
                     "/db/public/" + table, "2026-12-06T00:00:00Z", f"public.{table}/{i}", str(i))
            for i in range(start, start + count)]


def test_publish_reads_the_replies_without_read_response_per_reply(unique: str) -> None:
    """With hiredis (the redis extra), a batch of 3000 XADDs (replies over more than one
    socket read) is confirmed without one ``read_response`` call, every entry stored."""
    port = require("redis")
    batch = _outgoing("a", 3000)

    async def main() -> None:
        destination = from_url(f"redis://127.0.0.1:{port}/0?stream=wr{unique}:{{table}}")
        await destination.open()
        client = aioredis.Redis(port=port)
        try:
            conn = destination.client.connection  # type: ignore[attr-defined]
            assert isinstance(conn._parser, _AsyncHiredisParser)
            calls = 0
            read_response = conn.read_response

            async def counted(*args: object, **kwargs: object) -> object:
                nonlocal calls
                calls += 1
                return await read_response(*args, **kwargs)

            conn.read_response = counted
            await destination.publish(batch)
            await destination.publish(batch[:10])
            assert calls == 0
            entries = await client.xrange(f"wr{unique}:a")
            assert [fields[b"id"] for _entry, fields in entries] == \
                [item.id.encode() for item in batch + batch[:10]]
        finally:
            await destination.close()
            await client.delete(f"wr{unique}:a")
            await client.aclose()

    run(main())


@pytest.mark.parametrize(("parser", "protocol"), [
    (_AsyncHiredisParser, 3), (_AsyncHiredisParser, 2), (_AsyncRESP3Parser, 3),
    (_AsyncRESP2Parser, 2)])
def test_a_refusal_mid_batch_is_found_and_every_reply_read(unique: str, parser: type,
                                                           protocol: int) -> None:
    """One XADD of 4000 to a key holding a string: ``replies`` returns that refusal and its
    position, with redis-py's hiredis parser and with its pure-Python ones; the other
    entries are stored, and the next batch on the same connection is answered in step."""
    from walex.destinations.redis import replies

    port = require("redis")
    good, bad = f"wr{unique}:good", f"wr{unique}:bad"
    good_head, bad_head = xadd_head(good, None), xadd_head(bad, None)
    refused_at = 2500

    async def main() -> None:
        pool = aioredis.ConnectionPool(port=port, parser_class=parser, protocol=protocol)
        client = aioredis.Redis(connection_pool=pool, single_connection_client=True)
        await client.set(bad, "not a stream")
        try:
            await client.ping()
            conn = client.connection
            assert isinstance(conn._parser, parser)
            batch = _outgoing("good", 4000)
            batch[refused_at] = batch[refused_at]._replace(table="bad")
            heads = {("public", "good", "insert", 0): good_head,
                     ("public", "bad", "insert", 0): bad_head}
            commands = xadd_commands(batch, heads, heads.__getitem__)
            await conn.send_packed_command(commands)
            refused, at = await replies(conn, len(batch))
            assert isinstance(refused, ResponseError) and "WRONGTYPE" in str(refused)
            assert at == refused_at
            # the connection is in step: the next batch's replies are its own
            await conn.send_packed_command(xadd_commands(_outgoing("good", 1, 4000), heads,
                                                         heads.__getitem__))
            assert await replies(conn, 1) == (None, 0)
            assert await client.xlen(good) == 4000
            last = await client.xrevrange(good, count=1)
            assert last[0][1][b"id"] == b"id-4000"
        finally:
            await client.delete(good, bad)
            await client.aclose()

    run(main())


def test_a_push_among_the_replies_is_not_counted_as_one(unique: str) -> None:
    """redis-py speaks RESP3 by default, where Redis may push messages (here an invalidation
    of client-side caching) on the connection between replies: such a push is handed to
    redis-py's handler and never taken for an XADD's reply, so every entry of the batch is
    answered before it counts as confirmed and the next batch reads its own replies."""
    port = require("redis")
    tracked = f"wr{unique}:tracked"

    async def main() -> None:
        destination = from_url(f"redis://127.0.0.1:{port}/0?stream=wr{unique}:{{table}}")
        await destination.open()
        other = aioredis.Redis(port=port)
        try:
            conn = destination.client.connection  # type: ignore[attr-defined]
            if int(conn.protocol) != 3:
                pytest.skip("this redis-py speaks RESP2: no pushes")
            await conn.send_command("CLIENT", "TRACKING", "ON")
            assert await conn.read_response() == b"OK"
            await conn.send_command("GET", tracked)  # tracked now: a change pushes
            assert await conn.read_response() is None
            await other.set(tracked, "changed")  # Redis queues the push to conn at once
            await destination.publish(_outgoing("a", 50))
            await destination.publish(_outgoing("a", 1, start=50))
            entries = await other.xrange(f"wr{unique}:a")
            assert [fields[b"id"] for _entry, fields in entries] == \
                [f"id-{i}".encode() for i in range(51)]
            await conn.send_command("PING")  # still in step: PING's own reply
            assert await conn.read_response() == b"PONG"
        finally:
            await destination.close()
            await other.delete(f"wr{unique}:a", tracked)
            await other.aclose()

    run(main())
