"""RabbitMQ batches written as walex's frames (walex.destinations.amqpframes), against the
machine's broker: the same messages as aiormq's ``basic_publish`` makes, a batch in a few
writes, order within a batch, a returned message in the middle of one, a connection cut
in the middle of one (published again, the same ids), and the fallback."""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path
from typing import Any

import pamqp.frame
import pytest
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from walex.destinations import amqpframes
from walex.destinations.base import DestinationURL, Unavailable
from walex.destinations.encoding import Outgoing
from walex.destinations.rabbitmq import RabbitMQDestination

from .brokers import rabbitmq_delete, rabbitmq_queue
from .conftest import require

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "chaos"))
from proxy import Proxy  # noqa: E402


PROPERTIES = ("content_type", "content_encoding", "headers", "delivery_mode", "priority",
              "correlation_id", "reply_to", "expiration", "message_id", "timestamp", "type",
              "user_id", "app_id")


def outgoing(n: int, table: str = "a", size: int = 60, first: int = 0) -> list[Outgoing]:
    out = []
    for i in range(first, first + n):
        body = b'{"n":%d,"pad":"%s"}' % (i, b"x" * size)
        out.append(Outgoing(f"{uuid.uuid4()}-{i:06d}", "public", table, "insert", 0, body,
                            f"/db/public/{table}", "t", f"public.{table}", None))
    return out


async def drain(queue: str, port: int, n: int, timeout: float = 30) -> list[dict[str, Any]]:
    """Take ``n`` messages from the queue (fails with what came): each as its fields."""
    import aio_pika

    connection = await aio_pika.connect(port=port)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1000)
        q = await channel.declare_queue(queue, durable=True, passive=True)
        out: list[dict[str, Any]] = []
        async with q.iterator(no_ack=True) as messages:
            deadline = asyncio.get_running_loop().time() + timeout
            while len(out) < n:
                left = deadline - asyncio.get_running_loop().time()
                assert left > 0, f"{len(out)} of {n} messages arrived"
                message = await asyncio.wait_for(messages.__anext__(), left)
                out.append({"id": message.message_id, "key": message.routing_key,
                            "body": message.body, "exchange": message.exchange,
                            "properties": {name: getattr(message, name) for name in PROPERTIES}})
        return out
    finally:
        await connection.close()


async def count(queue: str, port: int) -> int:
    import aio_pika

    connection = await aio_pika.connect(port=port)
    try:
        channel = await connection.channel()
        q = await channel.declare_queue(queue, durable=True, passive=True)
        return q.declaration_result.message_count or 0
    finally:
        await connection.close()


async def opened(url: str) -> RabbitMQDestination:
    destination = RabbitMQDestination(DestinationURL(url))
    await destination.open()
    return destination


@pytest.fixture
def amqp(unique: str):  # type: ignore[no-untyped-def]
    port = require("rabbitmq")
    exchange, queue = f"wf{unique}", f"wf{unique}.q"
    asyncio.run(rabbitmq_queue(exchange, queue, port))
    yield port, exchange, queue
    asyncio.run(rabbitmq_delete(exchange, queue, port))


def test_frames_are_pamqps_bytes() -> None:
    """What frames() writes is what aiormq's basic_publish has pamqp marshal, byte for byte:
    a routing key with non-ASCII letters, the default exchange, mandatory or not, no body,
    and bodies cut at the frame size."""
    items = outgoing(3) + outgoing(2, table="zählung", size=3000) + [
        outgoing(1)[0]._replace(body=b"")]
    for exchange, mandatory in (("walex", True), ("", False)):
        for channel_number, max_content in ((1, 131064), (7, 1000)):
            ids = [item.id.encode() for item in items]

            def method(item: Outgoing) -> bytes:
                return amqpframes.method_frame(channel_number, exchange.encode(),
                                               f"public.{item.table}".encode(), mandatory)

            chunks = amqpframes.frames(items, ids, channel_number, method, max_content)
            assert sum(n for _, n in chunks) == len(items)
            want = b""
            for item in items:
                frames: list[Any] = [
                    Basic.Publish(exchange=exchange, routing_key=f"public.{item.table}",
                                  mandatory=mandatory),
                    ContentHeader(0, len(item.body), Basic.Properties(
                        delivery_mode=2, message_id=item.id,
                        content_type="application/cloudevents+json"))]
                frames += [ContentBody(item.body[at:at + max_content])
                           for at in range(0, len(item.body), max_content)]
                want += b"".join(pamqp.frame.marshal(f, channel_number) for f in frames)
            assert b"".join(payload for payload, _ in chunks) == want


@pytest.mark.parametrize("framed", [True, False], ids=["frames", "basic_publish"])
def test_both_paths_queue_the_same_messages_in_order(amqp: tuple[int, str, str],
                                                     framed: bool) -> None:
    """A batch (big bodies cut into several frames among small ones, two routing keys)
    arrives in order with the same fields whichever path publishes it."""
    port, exchange, queue = amqp
    batch = outgoing(300) + outgoing(3, table="b", size=400_000) + outgoing(300, table="b",
                                                                            first=300)

    async def main() -> list[dict[str, Any]]:
        destination = await opened(f"amqp://guest:guest@127.0.0.1:{port}/?exchange={exchange}")
        try:
            assert destination.framed  # the installed aiormq is one amqpframes knows
            destination.framed = framed
            await destination.publish(batch)
            channel = destination.underlay
            assert not channel.confirmations and not channel.message_id_delivery_tag
        finally:
            await destination.close()
        return await drain(queue, port, len(batch))

    stored = asyncio.run(main())
    assert [m["id"] for m in stored] == [item.id for item in batch]
    assert [m["body"] for m in stored] == [item.body for item in batch]
    assert [m["key"] for m in stored] == [f"public.{item.table}.insert" for item in batch]
    assert {m["exchange"] for m in stored} == {exchange}
    for m in stored:
        props = {k: v for k, v in m["properties"].items() if v not in (None, {}, 0)}
        assert props == {"content_type": "application/cloudevents+json", "delivery_mode": 2,
                         "message_id": m["id"]}, props


def test_a_batch_goes_out_in_a_few_writes(amqp: tuple[int, str, str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """500 small messages reach the socket in a few writes, not one each (aiormq's writer
    writes every basic_publish's frames on their own: 500 system calls)."""
    port, exchange, queue = amqp
    batch = outgoing(500)
    import asyncio.selector_events as selector_events

    writes: list[int] = []
    write = selector_events._SelectorSocketTransport.write

    def counting(self: Any, data: Any) -> None:
        writes.append(len(data))
        write(self, data)

    async def main() -> None:
        destination = await opened(f"amqp://guest:guest@127.0.0.1:{port}/?exchange={exchange}")
        try:
            monkeypatch.setattr(selector_events._SelectorSocketTransport, "write", counting)
            await destination.publish(batch)
            monkeypatch.undo()
        finally:
            await destination.close()

    asyncio.run(main())
    assert sum(writes) > 500 * 60
    assert len(writes) <= 5, f"{len(writes)} writes for 500 messages"
    assert [m["id"] for m in asyncio.run(drain(queue, port, 500))] == [i.id for i in batch]


@pytest.mark.parametrize("framed", [True, False], ids=["frames", "basic_publish"])
def test_a_returned_message_in_the_middle_of_a_batch(amqp: tuple[int, str, str],
                                                     framed: bool) -> None:
    """Only table a's routing keys are bound: the one message for table c in the middle is
    returned, the publish is Unavailable naming it, the others are queued in order, and the
    channel keeps no trace of the batch (no leak across retries)."""
    port, exchange, queue = amqp
    exchange += "r"  # the fixture's queue takes every key
    url = (f"amqp://guest:guest@127.0.0.1:{port}/?exchange={exchange}"
           "&routing_key={table}")
    before, lost, after = outgoing(50), outgoing(1, table="c"), outgoing(50, first=50)

    async def main() -> list[dict[str, Any]]:
        import aio_pika

        destination = await opened(url)  # declares the exchange
        connection = await aio_pika.connect(port=port)
        channel = await connection.channel()
        q = await channel.declare_queue(f"{queue}.a", durable=True)
        await q.bind(exchange, "a")
        await connection.close()
        try:
            destination.framed = framed
            for _ in range(2):  # as a retry would: the same ids again, on the same channel
                with pytest.raises(Unavailable, match=f"returned event {lost[0].id} as "
                                                      "unroutable .routing key 'c'."):
                    await destination.publish(before + lost + after)
                await asyncio.sleep(0.3)  # the Ack that follows the Return
                channel = destination.underlay
                assert not channel.confirmations and not channel.message_id_delivery_tag
            await destination.publish(outgoing(5))  # the channel still publishes
        finally:
            await destination.close()
        return await drain(f"{queue}.a", port, 205)

    try:
        stored = asyncio.run(main())
    finally:
        asyncio.run(rabbitmq_delete(exchange, f"{queue}.a", port))
    ids = [item.id for item in before + after]
    assert [m["id"] for m in stored[:200]] == ids + ids


@pytest.mark.parametrize("framed", [True, False], ids=["frames", "basic_publish"])
def test_a_connection_cut_mid_batch_fails_it_and_it_is_published_again(
        amqp: tuple[int, str, str], framed: bool) -> None:
    """Behind a TCP proxy, the connection is cut once part of a large batch is queued: the
    publish is Unavailable (never a success), and the same batch published again on a new
    connection arrives whole, with the same ids, after a prefix of itself."""
    port, exchange, queue = amqp
    proxy = Proxy("127.0.0.1", port).start()
    url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/?exchange={exchange}&timeout=30"

    async def attempt(batch: list[Outgoing]) -> bool:
        """Whether the cut came while the batch was out (else it was confirmed first)."""
        destination = await opened(url)
        try:
            destination.framed = framed
            # the cut once a third of the batch's bodies went through the proxy: mid-batch
            # whatever the pace (watching the queue instead lost the race on a fast host)
            proxy.partition_after(sum(len(o.body) for o in batch) // 3)
            publishing = asyncio.ensure_future(destination.publish(batch))
            while not proxy.partitioned and not publishing.done():
                await asyncio.sleep(0.01)
            proxy.heal()  # the damaged connection is reset
            try:
                await publishing
                return False
            except Unavailable:
                return True
        finally:
            await destination.close()

    async def main() -> tuple[list[Outgoing], list[dict[str, Any]]]:
        size = 20_000
        for _ in range(3):
            batch = outgoing(size, size=200)
            if await attempt(batch):
                break
            await drain(queue, port, size)  # confirmed before the cut: again, larger
            size *= 2
        else:
            pytest.fail("every batch was confirmed before the cut")
        first, last = -1, await count(queue, port)
        while first != last:  # what the broker took before the cut, all queued
            await asyncio.sleep(0.5)
            first, last = last, await count(queue, port)
        assert 0 < first < len(batch)
        destination = await opened(url)
        try:
            destination.framed = framed
            await destination.publish(batch)
        finally:
            await destination.close()
        return batch, await drain(queue, port, len(batch) + first, timeout=60)

    try:
        batch, stored = asyncio.run(main())
    finally:
        proxy.stop()
    ids = [item.id for item in batch]
    got = [m["id"] for m in stored]
    prefix = len(got) - len(ids)
    assert got[prefix:] == ids
    assert got[:prefix] == ids[:prefix]


def test_without_the_internals_each_message_goes_through_basic_publish(
        amqp: tuple[int, str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Another aiormq version (or a channel without the internals, or an id longer than a
    short string): basic_publish, and the batch still arrives."""
    port, exchange, queue = amqp
    import aiormq.channel

    calls = []
    publish = aiormq.channel.Channel.basic_publish

    async def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs["properties"].message_id)
        return await publish(self, *args, **kwargs)

    monkeypatch.setattr(aiormq.channel.Channel, "basic_publish", counted)
    monkeypatch.setattr(amqpframes, "version", lambda name: "9.0.0")
    assert not amqpframes.supported_version()
    batch = outgoing(20)

    async def main() -> None:
        destination = await opened(f"amqp://guest:guest@127.0.0.1:{port}/?exchange={exchange}")
        try:
            assert not destination.framed
            await destination.publish(batch[:10])
            destination.framed = True
            await destination.publish(batch[10:])  # framed
        finally:
            await destination.close()

    asyncio.run(main())
    assert calls == [item.id for item in batch[:10]]
    assert [m["id"] for m in asyncio.run(drain(queue, port, 20))] == [i.id for i in batch]
    monkeypatch.undo()
    assert amqpframes.supported_version()
    assert not amqpframes.usable(object())
