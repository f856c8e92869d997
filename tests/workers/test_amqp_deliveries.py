"""A RabbitMQ worker takes its deliveries off the connection's bytes (walex.workers.amqpdeliveries).

- Cut at any byte, the frames of a registered channel's deliveries go to its
  sink as (tag, redelivered, body), bodies of several frames joined and empty
  ones included; every other frame reaches aiormq's own frame receiver
  exactly as it would have without the split (AMQP bytes built by pamqp,
  read by aiormq's FrameReceiver).
- While only deliveries come, aiormq gets a heartbeat frame now and then.
- A delivery whose sink is removed mid-way is dropped whole: its content frames
  never reach aiormq without their method frame.
- Bytes that are not frames reach aiormq as they came (it fails as it would).
- Against a real RabbitMQ: a worker consuming this way handles the same events in
  the same order as one consuming through aiormq's basic_consume, a body larger
  than a frame included, and the deliveries did come through the split.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from typing import Any

import pytest
from support import run, until
from workers.test_worker import Broker

from walex import Event, Events, EventType, Source
from walex.destinations import Destinations
from walex.destinations.encoding import encode_event
from walex.workers import Worker, current_lease, declare
from walex.workers import amqpdeliveries
from walex.workers import rabbitmq as worker_rabbitmq

pamqp = pytest.importorskip("pamqp")
from aiormq.connection import FrameReceiver  # noqa: E402
from aiormq.exceptions import AMQPConnectionError  # noqa: E402
from pamqp import commands as spec  # noqa: E402
from pamqp.body import ContentBody  # noqa: E402
from pamqp.frame import marshal  # noqa: E402
from pamqp.header import ContentHeader  # noqa: E402
from pamqp.heartbeat import Heartbeat  # noqa: E402

FRAME_MAX = 131072
BIG = bytes(random.Random(7).randrange(256) for _ in range(300_000))  # three body frames


def delivery(channel: int, tag: int, body: bytes, redelivered: bool = False) -> list[bytes]:
    """The frames of one delivery, as a broker sends them."""
    frames = [marshal(spec.Basic.Deliver(consumer_tag=f"ctag{channel}.x", delivery_tag=tag,
                                         redelivered=redelivered, exchange="ex",
                                         routing_key="a.b.c"), channel),
              marshal(ContentHeader(0, len(body)), channel)]
    for at in range(0, len(body), FRAME_MAX - 8):
        frames.append(marshal(ContentBody(body[at:at + FRAME_MAX - 8]), channel))
    return frames


def stream(big: bytes) -> tuple[list[bytes], list[bytes], list[tuple[int, bool, bytes]]]:
    """(every frame, the frames aiormq must still get, what channel 1's sink must get)."""
    kept: list[bytes] = []
    frames: list[bytes] = []

    def add(items: list[bytes], keep: bool) -> None:
        frames.extend(items)
        if keep:
            kept.extend(items)

    add([marshal(Heartbeat(), 0)], True)
    add([marshal(spec.Basic.ConsumeOk(consumer_tag="ctag1.x"), 1)], True)
    add(delivery(1, 1, b"hello"), False)
    add(delivery(2, 1, b"another channel's"), True)
    add(delivery(1, 2, b"", redelivered=True), False)
    add(delivery(1, 3, big), False)
    add(delivery(2, 2, big), True)
    add([marshal(spec.Basic.CancelOk(consumer_tag="ctag1.x"), 1)], True)
    add(delivery(1, 4, b"last"), False)
    add([marshal(spec.Channel.Close(reply_code=406, reply_text="PRECONDITION_FAILED",
                                          class_id=50, method_id=10), 1)], True)
    taken = [(1, False, b"hello"), (2, True, b""), (3, False, big), (4, False, b"last")]
    return frames, kept, taken


async def frames_read(reader: Any) -> list[bytes]:
    """What aiormq's frame receiver makes of a reader's bytes, each frame marshalled again
    (until the end: found at a frame's start, or, when the end came while it waited for
    the next frame, the error it makes of reading nothing there)."""
    frames: list[bytes] = []
    try:
        async for _, channel, frame in FrameReceiver(reader):
            frames.append(marshal(frame, channel))
    except AMQPConnectionError as exc:
        assert "Read 0 bytes but 1 bytes expected" in str(exc)
    return frames


async def feed(reader: asyncio.StreamReader, data: bytes, rng: random.Random, most: int) -> None:
    at = 0
    while at < len(data):
        size = rng.randint(1, most)
        reader.feed_data(data[at:at + size])
        at += size
        await asyncio.sleep(0)
    reader.feed_eof()


@pytest.mark.parametrize("most", [1, 7, 100, 5000, 400_000])
def test_frames_cut_anywhere(most: int) -> None:
    # bodies of three frames; of two, cut in 1-7 bytes; of one frame, cut at every byte
    frames, kept, taken = stream(BIG if most >= 100 else BIG[:140_000] if most > 1 else BIG[:300])
    data = b"".join(frames)

    async def main() -> None:
        got: list[tuple[int, bool, bytes]] = []
        plain = asyncio.StreamReader(limit=1 << 20)
        plain.feed_data(b"".join(kept))
        plain.feed_eof()
        expected = await frames_read(plain)
        for seed in range(3 if most >= 100 else 1):
            got.clear()
            raw = asyncio.StreamReader(limit=1 << 20)
            split = amqpdeliveries.SplitReader(raw)
            split.register(1, lambda *delivered: got.append(delivered))
            feeder = asyncio.create_task(feed(raw, data, random.Random(seed), most))
            passed = await frames_read(split)
            await feeder
            assert [f for f in passed if f != marshal(Heartbeat(), 0)] == \
                [f for f in expected if f != marshal(Heartbeat(), 0)]
            assert got == taken
            assert split.taken == len(taken)

    run(main(), timeout=60)


def test_heartbeat_while_only_deliveries_come(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(amqpdeliveries, "_QUIET", 0.0)

    async def main() -> None:
        got: list[Any] = []
        raw = asyncio.StreamReader()
        split = amqpdeliveries.SplitReader(raw)
        split.register(1, lambda *delivered: got.append(delivered))
        receiver = FrameReceiver(split)
        await asyncio.sleep(0.01)
        raw.feed_data(b"".join(delivery(1, 1, b"x") + delivery(1, 2, b"y")))
        _, channel, frame = await asyncio.wait_for(receiver.get_frame(), 5)
        assert (channel, type(frame)) == (0, Heartbeat)
        assert got == [(1, False, b"x"), (2, False, b"y")]

    run(main(), timeout=30)


def test_unregistered_mid_delivery_is_dropped_whole() -> None:
    async def main() -> None:
        got: list[Any] = []

        def sink(*delivered: Any) -> None:
            got.append(delivered)

        raw = asyncio.StreamReader()
        split = amqpdeliveries.SplitReader(raw)
        split.register(1, sink)
        receiver = FrameReceiver(split)
        first = delivery(1, 1, b"0123456789")
        beat = marshal(Heartbeat(), 0)
        raw.feed_data(first[0] + first[1] + beat)  # the method and the header: taken
        assert (await asyncio.wait_for(receiver.get_frame(), 5))[1] == 0
        split.unregister(1, sink)
        second = delivery(1, 2, b"after")
        raw.feed_data(first[2] + b"".join(second) + beat)
        raw.feed_eof()
        passed = [marshal(frame, channel) async for _, channel, frame in receiver]
        assert passed == [*second, beat]  # the first body dropped, the second delivery aiormq's
        assert got == []
        assert split.channels == {}

    run(main(), timeout=30)


@pytest.mark.parametrize("data", [b"AMQP\x00\x00\x09\x01",
                                  b"".join(delivery(1, 1, b"ok")) + b"\x01\x00\x01garbage\xff",
                                  b"\x08\x00\x00\x00\x00\x00\x00\x00"])
def test_bytes_that_are_not_frames_reach_aiormq_as_they_are(data: bytes) -> None:
    async def outcome(split: bool) -> tuple[list[bytes], str]:
        raw = asyncio.StreamReader()
        raw.feed_data(data)
        raw.feed_eof()
        reader: Any = raw
        if split:
            reader = amqpdeliveries.SplitReader(raw)
            reader.register(2, lambda *_: None)
        frames: list[bytes] = []
        try:
            async for _, channel, frame in FrameReceiver(reader):
                frames.append(marshal(frame, channel))
        except Exception as exc:
            return frames, type(exc).__name__
        return frames, ""

    async def main() -> None:
        assert await outcome(True) == await outcome(False)

    run(main(), timeout=30)


_SOURCE = Source(db="d", schema="public", table="item", columns={"id": "int4", "note": "text"},
                 primary_key=("id",))


def event(i: int, note: str) -> Event:
    return Event("item", EventType.INSERT, _SOURCE, {"id": i, "note": note}, None, None,
                 dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc), "0/10",
                 f"{16 + i // 7:016X}-{i % 7:08X}")


@pytest.mark.parametrize("split", [True, False], ids=["split", "basic_consume"])
def test_worker_consumes_the_same_either_way(unique: str, split: bool,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    if not split:
        monkeypatch.setattr(worker_rabbitmq._SourceExchange, "connection_class", None)
    assert amqpdeliveries.usable()  # this aiormq: the workers take the split path
    broker = Broker("rabbitmq", unique)
    source = broker.source(2)
    events = [event(i, "x" * (300_000 if i == 40 else i)) for i in range(200)]

    async def main() -> None:
        await declare(source)
        destinations = Destinations([broker.url], 2)
        await destinations.open()
        try:
            await destinations.publish(events)
        finally:
            await destinations.close()
        handled: dict[int, list[Event]] = {0: [], 1: []}
        handlers = Events()

        @handlers.on_event("item")
        async def handle(batch: list[Event]) -> None:
            lease = current_lease()
            assert lease is not None
            handled[lease.partition].extend(batch)

        worker = Worker(source, [handlers])
        await worker.start()
        try:
            await until(lambda: sum(map(len, handled.values())) >= len(events),
                        "every event handled", 60)
            reader = getattr(worker.consumer.destination.connection, "split", None)
            taken = reader.taken if reader is not None else None
        finally:
            await worker.stop()
        for p, got in handled.items():
            mine = [e for e in events if encode_event(e, 2).partition == p]
            assert mine
            assert [e.id for e in got] == [e.id for e in mine]
            assert [e.new_record for e in got] == [e.new_record for e in mine]
        assert taken == (len(events) if split else None)

    try:
        run(main(), timeout=120)
    finally:
        asyncio.run(broker.cleanup())
