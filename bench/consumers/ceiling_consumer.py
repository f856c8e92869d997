"""Levels ``NAME_ceiling``: what the broker and its official client take, the same payloads.

Added by ``bench/run.py --destination NAME`` next to ``walex+NAME``, with the
same URL (a target of its own: its stream, exchange and queue, keys). Two
phases in one process:

1. untimed: a WalEx app drains this level's slot (the same WAL as every
   level) and keeps every change encoded as walex's relay would publish it
   (``walex.destinations.encoding.encode``: the same CloudEvents bodies,
   message ids and subjects / keys / routing keys), until the marker row;
2. timed: the official client publishes them all, as fast as it can, with
   the durability walex waits for:

   - NATS (nats-py): core publishes to the stream's subjects with
     ``Nats-Msg-Id``, in chains of ``STEP`` messages each confirmed by one
     PubAck (every message stored, as walex's relay confirms them), up to
     ``WINDOW`` messages unconfirmed; the frames built as walex builds them
     (``walex.destinations.hpub``) and handed to the client's write buffer, the
     fastest way through nats-py;
   - Redis (redis-py asyncio): ``XADD id event`` pipelined, ``WINDOW``
     commands per round trip (no MULTI), packed as walex packs them and
     written on the client's connection, every reply read as walex reads
     them (from the connection's hiredis reader): the cheapest a client can do;
   - RabbitMQ (aiormq, as walex): persistent messages with ``message_id`` on a
     publisher-confirm channel, ``WINDOW`` at a time, written as walex's relay writes
     them (``walex.destinations.amqpframes``: a window's frames in a few writes, one
     Future for its confirmations), the fastest way through aiormq;
   - webhook (httpx, as walex): signed POSTs of ``CHUNK`` events (the
     CloudEvents batch form walex sends), one at a time, each answered;
   - Kafka (confluent-kafka, as walex): an idempotent producer with
     ``acks=all`` (and walex's partitioner), warmed up by one record without
     a value per partition before the timer, produces every record (the same
     value, key and ``ce_`` headers as walex's, made in phase 1), serving
     delivery reports only when its queue is full, then flushes; every
     delivery report is counted and must be a success.

``t_ready``/``t_end`` mark phase 2 only, so the runner's wall time is the
publishing time; ``publish_cpu_s`` is the CPU of phase 2.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import sys
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

from _common import Result, parse_args

from walex import Event, Events, WalEx
from walex.destinations.encoding import Outgoing, encode

WINDOW = int(os.environ.get("BENCH_CEILING_WINDOW", "4096"))
CHUNK = int(os.environ.get("BENCH_CEILING_CHUNK", "1000"))
STEP = 256  # NATS frames handed to the client at a time


def render(template: str, item: Outgoing, word: bool) -> str:
    """A subject / stream / routing key template, as walex fills it for the bench's URLs."""
    schema, table = (item.schema.replace(".", "_"), item.table.replace(".", "_")) if word \
        else (item.schema, item.table)
    return template.format(schema=schema, table=table, type=item.type, partition=item.partition)


async def collect(args: Any, res: Result) -> list[Outgoing]:
    marker = args.marker_table
    out: list[Outgoing] = []
    done = asyncio.Event()

    async def handle(events: list[Event]) -> None:
        rows = [e for e in events if e.name != marker]
        out.extend(encode(rows))
        if len(rows) != len(events):
            done.set()

    module = Events()
    module.on_event("all")(handle)
    app = WalEx(url=args.dsn, publication=args.publication, subscriptions=["*"], modules=[module],
                name="bench", durable_slot=True, slot_name=args.slot)
    await app.start()
    waiter = asyncio.create_task(app.wait())
    finished = asyncio.create_task(done.wait())
    await asyncio.wait([waiter, finished], return_when=asyncio.FIRST_COMPLETED)
    if waiter.done():
        waiter.result()
        raise RuntimeError("walex stopped before the marker")
    waiter.cancel()
    await app.stop()
    return out


async def nats_publish(url: str, items: list[Outgoing]) -> None:
    """Core publishes to JetStream, every message confirmed stored, as walex's relay does it:
    the messages go in chains of ``STEP`` built by walex's own frames
    (``walex.destinations.hpub.frames``: each message names the one before it as the
    stream's last, only the last asks for a PubAck, which then confirms the whole chain),
    handed to the client's write buffer, up to WINDOW messages unconfirmed; the stream is
    fresh and this the only publisher, so each chain's start is known before the previous
    one is answered. When the client does not allow walex's frames, each message goes
    through ``Client.publish`` with a PubAck of its own."""
    import nats
    from nats.js.api import StreamConfig

    from walex.destinations.hpub import Frames, frames as build, usable

    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    stream, template = query["stream"], query["subject"]
    nc = await nats.connect(f"nats://{parts.hostname}:{parts.port}", allow_reconnect=False,
                            connect_timeout=5)
    try:
        await nc.jetstream(timeout=30).add_stream(
            StreamConfig(name=stream, subjects=[template.split("{")[0] + ">"]))
        prefix = f"_INBOX.{stream}."
        frames = Frames(nc, stream, prefix) if usable(nc) else None
        subjects: dict[Any, bytes] = {}
        for item in items:  # rendered before the timer, as walex keeps them per table
            key = item[1:5]
            if key not in subjects:
                subjects[key] = Frames.subject(render(template, item, True))
        state = {"acked": 0, "error": None}
        sizes: dict[int, int] = {}  # a chain's reply number -> its messages
        room, finished = asyncio.Event(), asyncio.Event()

        async def answered(msg: Any) -> None:
            if msg.data.startswith(b'{"stream":'):
                state["acked"] += sizes.get(int(msg.subject[len(prefix):]), 1)
            elif state["error"] is None:
                state["error"] = msg.data[:300] or msg.headers
                finished.set()
            if len(items) - state["acked"] == 0:
                finished.set()
            room.set()

        await nc.subscribe(prefix + "*", cb=answered)
        yield_start()
        step = STEP if frames is not None else 1
        last_id = b""
        for at in range(0, len(items), step):
            while at + step - state["acked"] > WINDOW:
                room.clear()
                await asyncio.wait_for(room.wait(), timeout=60)
            if frames is not None:
                chunk = items[at:at + step]
                sizes[at] = len(chunk)
                built = build(chunk, subjects, lambda key, item: subjects[key],
                              frames.prefix, frames.stream, at, (at, last_id))
                assert built is not None, "an event id that is not plain"
                await frames.send(built[0], len(chunk), built[1])
                last_id = chunk[-1].id.encode()
                continue
            item = items[at]
            await nc.publish(render(template, item, True), item.body, reply=f"{prefix}{at}",
                             headers={"Nats-Msg-Id": item.id, "Nats-Expected-Stream": stream})
        await asyncio.wait_for(finished.wait(), timeout=120)
        if state["error"] is not None:
            raise RuntimeError(f"JetStream refused a message: {state['error']!r}")
    finally:
        await nc.close()


async def redis_publish(url: str, items: list[Outgoing]) -> None:
    """``XADD id event``, WINDOW commands per round trip, packed as walex packs them
    (``walex.destinations.redis.xadd_commands``, what redis-py's packers give) and written
    on the client's connection, every reply read as walex reads them
    (``walex.destinations.redis.replies``: from the connection's hiredis reader when
    installed), a refusal an error: the cheapest way through redis-py."""
    import redis.asyncio as aioredis

    from walex.destinations.redis import replies, xadd_commands, xadd_head

    parts = urlsplit(url)
    template = parse_qs(parts.query)["stream"][0]
    heads: dict[tuple[object, ...], bytes] = {}

    def head_of(item: Outgoing) -> bytes:
        head = heads[item[1:5]] = xadd_head(render(template, item, False), None)
        return head

    # each round trip's commands in one buffer, packed before the timer
    packed = []
    for at in range(0, len(items), WINDOW):
        window = items[at:at + WINDOW]
        packed.append((xadd_commands(window, heads, head_of), len(window)))
    client = aioredis.Redis(host=parts.hostname or "127.0.0.1", port=parts.port or 6379,
                            single_connection_client=True)
    try:
        await client.ping()
        conn = client.connection
        yield_start()
        for commands, count in packed:
            async with asyncio.timeout(30):
                await conn.send_packed_command(commands)
                refused, _at = await replies(conn, count)
            if refused is not None:
                raise refused
    finally:
        await client.aclose()


async def rabbitmq_publish(url: str, items: list[Outgoing]) -> None:
    """Persistent messages with ``message_id`` on a publisher-confirm channel, ``WINDOW``
    at a time, each window waited for whole. The frames are built and written as walex's
    relay writes them (``walex.destinations.amqpframes``: a window's frames in a few writes,
    one Future for its confirmations), the fastest way through aiormq; when the installed
    aiormq does not allow that, each message goes through ``Channel.basic_publish``."""
    import aiormq
    from pamqp.commands import Basic

    from walex.destinations import amqpframes

    parts = urlsplit(url)
    exchange = parse_qs(parts.query)["exchange"][0]
    keyed = [(render("{schema}.{table}.{type}", item, True), item) for item in items]
    connection = await aiormq.connect(url.split("?")[0])
    try:
        channel = await connection.channel(publisher_confirms=True)
        framed = amqpframes.usable(channel)
        methods: dict[tuple, bytes] = {}  # by (schema, table, type, partition), as walex's
        for key, item in keyed:  # made before the timer, as walex keeps them per table
            if item[1:5] not in methods:
                methods[item[1:5]] = amqpframes.method_frame(channel.number, exchange.encode(),
                                                             key.encode(), False)
        yield_start()
        for at in range(0, len(keyed), WINDOW):
            window = keyed[at:at + WINDOW]
            if framed:
                batch = [item for _key, item in window]
                chunks = amqpframes.frames(batch, [item.id.encode() for item in batch],
                                           channel.number, lambda item: methods[item[1:5]],
                                           channel.max_content_size)
                failures = await asyncio.wait_for(
                    amqpframes.publish(channel, chunks, None, Basic.Ack), timeout=120)
                if failures:
                    raise RuntimeError(f"not confirmed: {failures[0]!r}")
                continue
            confirms = [asyncio.ensure_future(channel.basic_publish(
                item.body, exchange=exchange, routing_key=key, wait=False,
                properties=Basic.Properties(delivery_mode=2, message_id=item.id,
                                            content_type="application/cloudevents+json")))
                for key, item in window]
            for result in await asyncio.wait_for(asyncio.gather(*confirms), timeout=120):
                if not isinstance(result, Basic.Ack):
                    raise RuntimeError(f"not confirmed: {result!r}")
    finally:
        await connection.close()


async def webhook_publish(url: str, items: list[Outgoing]) -> None:
    import httpx

    secret = os.environ["BENCH_WEBHOOK_SECRET"]
    key = base64.b64decode(secret.removeprefix("whsec_"))
    target = url.split("?")[0]
    chunks = [items[at:at + CHUNK] for at in range(0, len(items), CHUNK)]
    async with httpx.AsyncClient(timeout=30) as client:
        yield_start()
        for chunk in chunks:
            body = b"[" + b",".join(item.body for item in chunk) + b"]"
            message_id, stamp = chunk[0].id, int(time.time())
            digest = hmac.new(key, f"{message_id}.{stamp}.".encode() + body, hashlib.sha256).digest()
            response = await client.post(target, content=body, headers={
                "content-type": "application/cloudevents-batch+json", "webhook-id": message_id,
                "webhook-timestamp": str(stamp),
                "webhook-signature": "v1," + base64.b64encode(digest).decode()})
            response.raise_for_status()


def kafka_records(items: list[Outgoing]) -> list[tuple[bytes, bytes, list[Any]]]:
    """Each item's record as walex's Kafka destination makes it: (key, value, headers)."""
    import orjson

    from walex.destinations.kafka import CONTENT_TYPE

    out = []
    for item in items:
        doc = orjson.loads(item.body)
        headers = [("ce_specversion", b"1.0"), ("ce_id", item.id.encode()),
                   ("ce_source", doc["source"].encode()), ("ce_type", doc["type"].encode()),
                   ("ce_time", doc["time"].encode()), ("content-type", CONTENT_TYPE)]
        if doc.get("subject") is not None:
            headers.append(("ce_subject", doc["subject"].encode()))
        out.append((doc["partitionkey"].encode(), item.body, headers))
    return out


async def kafka_publish(url: str, items: list[Outgoing]) -> None:
    from confluent_kafka import KafkaException, Producer

    parts = urlsplit(url)
    topic = parse_qs(parts.query)["topic"][0]
    records = kafka_records(items)
    producer = Producer({"bootstrap.servers": parts.netloc, "enable.idempotence": True,
                         "acks": "all", "partitioner": "murmur2_random",
                         "message.timeout.ms": 30000})
    state = {"ok": 0, "error": None}

    def delivered(err: Any, msg: Any) -> None:
        if err is None:
            state["ok"] += 1
        elif state["error"] is None:
            state["error"] = err

    try:
        # untimed warm-up: a fresh idempotent producer gets its producer id and the
        # partitions' leaders only after list_topics() (seen: 0.5 s more on tansu), so one
        # record without a value goes to each partition and is flushed first
        meta = producer.list_topics(topic, timeout=30)
        for partition in meta.topics[topic].partitions:
            producer.produce(topic, None, b"bench-warmup", partition=partition)
        if producer.flush(30):
            raise RuntimeError(f"the warm-up records to {topic} were not confirmed in 30 s")
        yield_start()
        produce, poll = producer.produce, producer.poll
        for key, value, headers in records:
            while True:
                try:
                    produce(topic, value, key, headers=headers, on_delivery=delivered)
                    break
                except BufferError:  # the queue is full: serve reports to free it
                    poll(0.05)
        left = producer.flush(120)
    except KafkaException as exc:
        raise RuntimeError(f"Kafka refused: {exc}") from None
    if state["error"] is not None or left or state["ok"] != len(records):
        raise RuntimeError(f"{state['ok']} of {len(records)} records confirmed, {left} left: "
                           f"{state['error']}")


_phase: dict[str, float] = {}


def yield_start() -> None:
    """Connected, the target made: the timed phase begins."""
    _phase["t"] = time.time()
    _phase["cpu"] = time.process_time()


PUBLISHERS = {"nats": nats_publish, "redis": redis_publish, "amqp": rabbitmq_publish,
              "http": webhook_publish, "kafka": kafka_publish}


def main() -> int:
    args = parse_args(__doc__.splitlines()[0])
    url = args.destination[0]
    publisher = PUBLISHERS[urlsplit(url).scheme]
    res = Result(f"ceiling:{urlsplit(url).scheme}", args)
    items = asyncio.run(collect(args, res))
    asyncio.run(publisher(url, items))
    res.data["t_ready"] = _phase["t"]
    res.data["t_first_row"] = _phase["t"]
    res.end()
    res.data["publish_cpu_s"] = time.process_time() - _phase["cpu"]
    res.data["rows"] = len(items)
    res.data["marker_seen"] = True
    res.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
