"""Reading back what walex published, on each broker, and checking it.

Each reader returns the CloudEvents a destination stored, in the broker's
order, as ``(message id, decoded event, extra)`` where ``extra`` is what the
broker adds (the subject, the routing key, the stream entry id ...).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import jsonschema

SCHEMA_DOC = json.loads(
    resources.files("walex.destinations").joinpath("cloudevent.schema.json").read_text()
)
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA_DOC)

Stored = tuple[str, dict[str, Any], Any]


async def wait_count(read: Callable[[], Awaitable[list[Stored]]], n: int,
                     timeout: float = 30) -> list[Stored]:
    """Read until at least ``n`` messages are stored; fails with what was there."""
    deadline = time.monotonic() + timeout
    while True:
        stored = await read()
        if len(stored) >= n or time.monotonic() > deadline:
            assert len(stored) >= n, f"{len(stored)} of {n} messages arrived: {[s[0] for s in stored]}"
            return stored
        await asyncio.sleep(0.1)


def check_stream(stored: list[Stored], ids: list[str], tables: dict[str, str] | None = None) -> None:
    """``stored`` is exactly the events ``ids``, once each and in order, each a valid envelope.

    ``tables`` maps event id to ``schema.table``, to check the per-table order
    when the broker's global order is not commit order.
    """
    got = [message_id for message_id, _doc, _extra in stored]
    if tables is None:
        assert got == ids, f"stored {got} != published {ids}"
    else:
        assert sorted(got) == sorted(ids), "not the same events once each"
        per_table: dict[str, list[str]] = defaultdict(list)
        for message_id in got:
            per_table[tables[message_id]].append(message_id)
        for table, table_ids in per_table.items():
            assert table_ids == sorted(table_ids), f"{table} out of order: {table_ids}"
    for message_id, doc, _extra in stored:
        errors = list(VALIDATOR.iter_errors(doc))
        assert not errors, f"{message_id}: {errors[0].message}"
        assert doc["id"] == message_id


# -- NATS --------------------------------------------------------------------


async def nats_stored(stream: str, port: int = 4222) -> list[Stored]:
    import nats
    from nats.js.errors import NotFoundError

    nc = await nats.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False)
    try:
        js = nc.jetstream()
        try:
            info = await js.stream_info(stream)
        except NotFoundError:
            return []
        out = []
        if info.state.messages:
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                msg = await js.get_msg(stream, seq)
                out.append((msg.headers["Nats-Msg-Id"], json.loads(msg.data), msg.subject))
        return out
    finally:
        await nc.close()


async def nats_stream_config(stream: str, port: int = 4222) -> Any:
    import nats

    nc = await nats.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False)
    try:
        return (await nc.jetstream().stream_info(stream)).config
    finally:
        await nc.close()


async def nats_delete(stream: str, port: int = 4222) -> None:
    import nats

    try:
        nc = await nats.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False)
    except Exception:
        return
    try:
        await nc.jetstream().delete_stream(stream)
    except Exception:
        pass
    finally:
        await nc.close()


# -- Redis -------------------------------------------------------------------


async def redis_stored(pattern: str, port: int = 6379) -> list[Stored]:
    """The entries of every stream whose key matches ``pattern``, stream by stream."""
    import redis.asyncio as aioredis

    client = aioredis.Redis(port=port)
    try:
        out = []
        for key in sorted(await client.keys(pattern)):
            for entry_id, fields in await client.xrange(key):
                out.append((fields[b"id"].decode(), json.loads(fields[b"event"]),
                            (key.decode(), entry_id.decode())))
        return out
    finally:
        await client.aclose()


async def redis_delete(pattern: str, port: int = 6379) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis(port=port)
    try:
        keys = await client.keys(pattern)
        if keys:
            await client.delete(*keys)
    except Exception:
        pass
    finally:
        await client.aclose()


# -- RabbitMQ ----------------------------------------------------------------


async def rabbitmq_queue(exchange: str, queue: str, port: int = 5672) -> None:
    """Declare the exchange walex uses and a durable queue bound to all of it."""
    import aio_pika

    connection = await aio_pika.connect(port=port)
    try:
        channel = await connection.channel()
        ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        q = await channel.declare_queue(queue, durable=True)
        await q.bind(ex, "#")
    finally:
        await connection.close()


async def rabbitmq_stored(queue: str, port: int = 5672) -> list[Stored]:
    """Every message in the queue, in order, left in it: read without acknowledging,
    they go back to their places when the channel closes."""
    import aio_pika

    connection = await aio_pika.connect(port=port)
    try:
        channel = await connection.channel()
        q = await channel.declare_queue(queue, durable=True, passive=True)
        out, held = [], []
        while True:
            message = await q.get(no_ack=False, fail=False)
            if message is None:
                break
            held.append(message)
            out.append((message.message_id, json.loads(message.body),
                        (message.routing_key, message.delivery_mode, message.content_type)))
        await channel.close()  # unacknowledged messages go back to the queue, in order
        return out
    finally:
        await connection.close()


async def rabbitmq_delete(exchange: str, queue: str, port: int = 5672) -> None:
    import aio_pika

    try:
        connection = await aio_pika.connect(port=port)
    except Exception:
        return
    try:
        channel = await connection.channel()
        await channel.queue_delete(queue)
        await channel.exchange_delete(exchange)
    except Exception:
        pass
    finally:
        await connection.close()
