"""What a worker finds on the broker at start, and how workers share the partitions.

- A worker never creates the relay's stream or exchange: a missing one (or a
  mistyped name) is a ConfigError naming the fix, and nothing is created; a
  relay whose stream's subjects another stream already holds is refused at
  start (JetStream streams may not overlap), not retried for ever.
- A worker whose partitions (or subjects) cannot be the relay's stops at
  start, or as soon as the relay's first message shows it, rather than idle.
- A RabbitMQ group is declared before the relay publishes; a worker of an
  undeclared group does not silently start mid-stream.
- RabbitMQ workers started one after the other share the partitions.

Against the real brokers; the relay is walex's destination code (the relay of
a real PostgreSQL database is in test_worker.py and test_scale_out.py).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import pytest
from support import run, until
from workers.test_worker import Broker, Calls, made_up, relay

from walex import Event
from walex.destinations import Destinations
from walex.destinations.encoding import encode_event
from walex.errors import ConfigError, DestinationError
from walex.workers import Worker


async def stream_exists(name: str, port: int) -> bool:
    import nats
    from nats.js.errors import NotFoundError

    nc = await nats.connect(f"nats://127.0.0.1:{port}")
    try:
        await nc.jetstream().stream_info(name)
        return True
    except NotFoundError:
        return False
    finally:
        await nc.close()


async def exchange_exists(name: str, port: int) -> bool:
    import aio_pika
    from aio_pika.exceptions import ChannelNotFoundEntity

    connection = await aio_pika.connect(port=port)
    try:
        channel = await connection.channel()
        await channel.declare_exchange(name, passive=True)
        return True
    except ChannelNotFoundEntity:
        return False
    finally:
        await connection.close()


async def declare_group(b: Broker, partitions: int, group: str = "walex") -> None:
    """What a worker group needs, set up with the plain client: the exchange, and one
    queue per partition with single active consumer, bound with its routing key."""
    import aio_pika

    connection = await aio_pika.connect(port=b.port)
    try:
        channel = await connection.channel()
        await channel.declare_exchange(f"wk{b.unique}", aio_pika.ExchangeType.TOPIC, durable=True)
        for p in range(partitions):
            queue = await channel.declare_queue(f"wk{b.unique}.{group}.{p}", durable=True,
                                                arguments={"x-single-active-consumer": True})
            await queue.bind(f"wk{b.unique}", routing_key="*.*.*" + (f".{p}" if partitions > 1 else ""))
    finally:
        await connection.close()


async def delete_queues(b: Broker, names: list[str]) -> None:
    import aio_pika

    connection = await aio_pika.connect(port=b.port)
    try:
        channel = await connection.channel()
        for name in names:
            await channel.queue_delete(name)
    finally:
        await connection.close()


# -- JetStream: the stream --------------------------------------------------


def test_jetstream_worker_never_creates_the_stream(unique: str) -> None:
    """A worker before the relay, or with a mistyped stream name: a ConfigError naming the
    fix (and the stream that holds the subjects), and no stream that would capture the
    relay's subjects under another name."""
    b = Broker("nats", unique)
    calls = Calls()
    calls.events.on_event("item")(calls.handler("item"))
    typo = b.source().replace(f"stream=WK_{unique}", f"stream=WK_{unique}X")

    async def main() -> None:
        early = Worker(b.source(), [calls.events])
        with pytest.raises(ConfigError, match=rf"stream 'WK_{unique}' does not exist, and a "
                                              r"worker does not create it: start the relay first"):
            await early.start()
        await early.stop()
        assert not await stream_exists(f"WK_{unique}", b.port)
        await relay(b, [[made_up(1)]])  # the relay creates its stream
        mistyped = Worker(typo, [calls.events])
        with pytest.raises(ConfigError, match=rf"stream 'WK_{unique}X' does not exist.*in stream "
                                              rf"'WK_{unique}' \(is the stream name mistyped\? "
                                              rf"stream=WK_{unique}\)"):
            await mistyped.start()
        await mistyped.stop()
        assert not await stream_exists(f"WK_{unique}X", b.port)
        assert not calls.calls

    try:
        run(main(), timeout=120)
    finally:
        asyncio.run(b.cleanup())


def test_jetstream_relay_refuses_a_stream_overlapping_another(unique: str) -> None:
    """Another stream holds the relay's subjects (as an old worker with a mistyped stream name
    made it): the relay's start fails naming it, instead of retrying for ever."""
    import nats

    b = Broker("nats", unique)

    async def main() -> None:
        nc = await nats.connect(f"nats://127.0.0.1:{b.port}")
        try:
            await nc.jetstream().add_stream(name=f"WK_{unique}X", subjects=[f"wk{unique}.>"])
        finally:
            await nc.close()
        destinations = Destinations([b.url], 2)
        try:
            with pytest.raises(DestinationError, match=rf"cannot create stream 'WK_{unique}' for "
                                                       rf"subjects .*: stream 'WK_{unique}X' "
                                                       r"already holds them"):
                await asyncio.wait_for(destinations.open(), 60)
        finally:
            await destinations.close()

    try:
        run(main(), timeout=120)
    finally:
        from destinations.brokers import nats_delete

        asyncio.run(nats_delete(f"WK_{unique}X", b.port))
        asyncio.run(b.cleanup())


def test_jetstream_partitions_not_the_relays_stop_the_worker(unique: str) -> None:
    """The relay publishes with partitions=1 (subjects without a partition), the workers say
    partitions=4: none of their filters takes a message. At start the newest message shows
    it; on an empty stream, the first message the relay publishes does."""
    b = Broker("nats", unique)
    relay_url = f"nats://127.0.0.1:{b.port}?stream=WK_{unique}&subject=wk{unique}.{{schema}}.{{table}}"
    calls = Calls()
    calls.events.on_event("item")(calls.handler("item"))

    async def publish(events: list[Event]) -> None:
        destinations = Destinations([relay_url], 1)
        await destinations.open()
        try:
            if events:
                await destinations.publish(events)
        finally:
            await destinations.close()

    async def main() -> None:
        await publish([])  # the relay's stream, empty
        waiting = Worker(b.source(partitions=4), [calls.events])
        waiting.consumer.recheck_every = 0.5  # type: ignore[attr-defined]
        await waiting.start()
        await publish([made_up(1)])
        with pytest.raises(ConfigError, match=r"publishes to stream .* with partitions=1 .*"
                                              r"this worker has partitions=4.*&partitions=1"):
            await asyncio.wait_for(waiting.wait(), 60)
        late = Worker(b.source(partitions=4), [calls.events])
        with pytest.raises(ConfigError, match=r"with partitions=1 \(its newest message, on "
                                              rf"'wk{unique}.public.item'\)"):
            await late.start()
        await late.stop()
        assert not calls.calls

    try:
        run(main(), timeout=120)
    finally:
        asyncio.run(b.cleanup())


# -- RabbitMQ: the exchange and the group's queues ----------------------------


def test_rabbitmq_worker_never_declares_the_exchange(unique: str) -> None:
    b = Broker("rabbitmq", unique)
    calls = Calls()
    calls.events.on_event("item")(calls.handler("item"))

    async def main() -> None:
        worker = Worker(b.source(), [calls.events])
        with pytest.raises(ConfigError, match=rf"exchange 'wk{unique}' does not exist, and a "
                                              r"worker does not declare it: start the relay first"):
            await worker.start()
        await worker.stop()
        assert not await exchange_exists(f"wk{unique}", b.port)

    try:
        run(main(), timeout=60)
    finally:
        asyncio.run(b.cleanup())


def test_rabbitmq_group_started_later_is_declared_first(unique: str) -> None:
    """Group 'walex' was declared before the relay published; group 'other' was not: its
    worker refuses to start mid-stream, naming how to declare it. Declared (walex worker
    --declare, walex.workers.declare), 'other' gets every event published from then on,
    though its worker starts later; a worker with more partitions than the group's queues
    is refused too."""
    b = Broker("rabbitmq", unique)
    mine, theirs = Calls(), Calls()
    mine.events.on_event("item")(mine.handler("item"))
    theirs.events.on_event("item")(theirs.handler("item"))
    before, after = [made_up(i, pk=i) for i in range(1, 4)], [made_up(i, pk=i) for i in range(4, 7)]

    async def main() -> None:
        await declare_group(b, 2)
        await relay(b, [before])
        other = Worker(b.source(group="other"), [theirs.events])
        with pytest.raises(ConfigError, match=r"queue 'wk\w+\.other\.0' of group 'other' does "
                                              r"not exist.*walex worker --declare SOURCE_URL"):
            await other.start()
        await other.stop()
        more = Worker(b.source(partitions=4), [mine.events])
        with pytest.raises(ConfigError, match=r"queue 'wk\w+\.walex\.2' .* was it declared with "
                                              r"partitions=2\?"):
            await more.start()
        await more.stop()

        from walex.workers import declare

        await declare(b.source(group="other"))
        await relay(b, [after])
        first, second = Worker(b.source(), [mine.events]), Worker(b.source(group="other"),
                                                                 [theirs.events])
        await first.start()
        await second.start()
        try:
            await until(lambda: len(mine.flat("item")) == 6 and len(theirs.flat("item")) == 3,
                        "each group's events", 60)
            await asyncio.sleep(0.5)
        finally:
            await asyncio.wait_for(first.stop(), 30)
            await asyncio.wait_for(second.stop(), 30)

    try:
        run(main(), timeout=120)
    finally:
        asyncio.run(b.cleanup())
    assert sorted(e.id for e in mine.flat("item")) == sorted(e.id for e in before + after)
    assert sorted(e.id for e in theirs.flat("item")) == sorted(e.id for e in after)


def test_rabbitmq_workers_started_one_after_another_share_the_partitions(unique: str) -> None:
    """Three workers, six partitions, started one after the other while changes flow: the
    first holds every partition at first, then each worker holds two (at most
    ceil(6 / 3)), every partition handled by one of them."""
    b = Broker("rabbitmq", unique)
    partitions = 6
    seen: list[tuple[float, str, int]] = []
    lock = threading.Lock()
    keys: dict[int, int] = {}  # partition -> a row in it
    for pk in itertools.count(1):
        keys.setdefault(encode_event(made_up(pk), partitions).partition, pk)
        if len(keys) == partitions:
            break

    def module(name: str) -> Calls:
        calls = Calls()

        async def record(batch: list[Event]) -> None:
            with lock:
                seen.extend((time.monotonic(), name, e.record["id"]) for e in batch)  # type: ignore[index]

        calls.events.on_event("item")(record)
        return calls

    def spread() -> dict[str, set[int]] | None:
        """Who handled which rows in the last 4 seconds, if every row was handled."""
        now = time.monotonic()
        with lock:
            recent = [(name, pk) for t, name, pk in seen if now - t < 4]
        holders: dict[int, set[str]] = {}
        for name, pk in recent:
            holders.setdefault(pk, set()).add(name)
        if len(holders) < partitions:
            return None
        by_worker: dict[str, set[int]] = {}
        for name, pk in recent:
            by_worker.setdefault(name, set()).add(pk)
        return by_worker

    async def main() -> dict[str, set[int]] | None:
        await declare_group(b, partitions)
        destinations = Destinations([b.url], partitions)
        await destinations.open()
        counter = itertools.count(100)
        workers = [Worker(b.source(partitions=partitions), [module(n).events], name=n)
                   for n in ("A", "B", "C")]

        async def feed() -> None:
            while True:
                await destinations.publish([made_up(next(counter), 1, pk) for pk in keys.values()])
                await asyncio.sleep(0.2)

        feeder = asyncio.create_task(feed())
        try:
            for worker in workers:
                await worker.start()
                await until(lambda worker=worker: worker.connected, "the worker to subscribe", 60)
                await asyncio.sleep(1)
            deadline = time.monotonic() + 90
            found = None
            while time.monotonic() < deadline:
                found = spread()
                if found is not None and len(found) == 3 and \
                        all(len(rows) == 2 for rows in found.values()):
                    break
                await asyncio.sleep(0.5)
            return found
        finally:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)
            await destinations.close()
            for worker in workers:
                await asyncio.wait_for(worker.stop(), 30)

    try:
        found = run(main(), timeout=240)
    finally:
        asyncio.run(delete_queues(b, [f"wk{unique}.walex.{p}" for p in range(4, partitions)]))
        asyncio.run(b.cleanup())
    assert found is not None and len(found) == 3, found
    assert all(len(rows) == 2 for rows in found.values()), found
    assert set().union(*found.values()) == set(keys.values())
