"""A worker acknowledges what it received together once, after the batch's last call.

RabbitMQ hands a worker up to ``prefetch`` messages of a partition at once;
the worker calls the handler once per transaction among them, in order, and
acknowledges them with one cumulative acknowledgement after the last call
(not one per call: a socket write each). So a worker SIGKILLed in the
middle of a batch gives back, in place, every message of that batch: the
next worker handles them again, same ids, in order, then the rest. A
``max_batch`` handler gets the transactions received together in one call;
a call failing mid-batch under "stop" has those before it acknowledged.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
import sys
from pathlib import Path

import pytest
from support import run, until
from workers.test_worker import Broker

from walex import Event, Events, EventType, Source
from walex.destinations import Destinations
from walex.errors import HandlerError
from walex.workers import Worker, current_lease, declare

COUNT, KILL_AT = 10, 5

# The first worker: its first call (the first event, alone in its batch) says so and
# waits until the test published the rest and the broker delivered them all into the
# worker's prefetch (its next batch); the worker is SIGKILLed by its own handler while
# handling the KILL_AT-th event, after recording it.
WORKER = '''
import os, signal, sys, time
from walex import Events
from walex.workers import Worker

url, record, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
if len(sys.argv) > 4:
    Worker.ack_interval = float(sys.argv[4])
events = Events()
seen = []


@events.on_event("item")
def handle(batch):
    if not seen:
        open(record + ".started", "w").close()
        deadline = time.monotonic() + 90
        while not os.path.exists(record + ".go") and time.monotonic() < deadline:
            time.sleep(0.05)
    with open(record, "a") as out:
        for e in batch:
            out.write(e.id + "\\n")
        out.flush()
        os.fsync(out.fileno())
    seen.extend(batch)
    if len(seen) >= kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

Worker(url, [events]).run()
'''

_SOURCE = Source(db="d", schema="public", table="item", columns={"id": "int4", "seq": "int4"},
                 primary_key=("id",))


def one_row(i: int) -> Event:
    return Event("item", EventType.INSERT, _SOURCE, {"id": i, "seq": 0}, None, None,
                 dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc), "0/10", f"{16 + i:016X}-00000000")


async def publish(url: str, events: list[Event]) -> None:
    """Publish like a relay: each event a transaction of its own, confirmed."""
    destinations = Destinations([url], 1)
    await destinations.open()
    try:
        for event in events:
            await destinations.publish([event])
    finally:
        await destinations.close()


async def until_delivered(port: int, queue: str) -> None:
    """Wait until no message is ready in the queue: the broker delivered them all."""
    import aio_pika

    connection = await aio_pika.connect(port=port)
    try:
        channel = await connection.channel()

        async def ready() -> int:
            declared = await asyncio.wait_for(channel.declare_queue(queue, passive=True), 10)
            return int(declared.declaration_result.message_count or 0)

        for _ in range(1200):
            if not await ready():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"the messages of {queue} were not delivered to the worker")
    finally:
        await connection.close()


@pytest.mark.parametrize("ack_interval", [None, 0.0])
def test_killed_mid_batch_gives_back_the_whole_batch(unique: str, tmp_path: Path,
                                                      ack_interval: float | None) -> None:
    """SIGKILLed mid-batch, a worker gives back its whole batch (the default); with
    ``ack_interval=0`` (every call slower than it) what it handled before the kill was
    acknowledged already, and only the message in hand comes again."""
    broker = Broker("rabbitmq", unique)
    source = broker.source(1)
    queue = f"wk{unique}.walex.0"
    events = [one_row(i) for i in range(COUNT)]  # ten one-row transactions
    ids = [e.id for e in events]
    record = tmp_path / "first.log"

    async def main() -> None:
        await declare(source)
        await publish(broker.url, events[:1])
        script = tmp_path / "first_worker.py"
        script.write_text(WORKER)
        extra = [] if ack_interval is None else [str(ack_interval)]
        first = subprocess.Popen([sys.executable, str(script), source, str(record), str(KILL_AT),
                                  *extra],
                                 cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            await until(lambda: Path(f"{record}.started").exists() or first.poll() is not None,
                        "the first worker's first call", 60)
            await publish(broker.url, events[1:])
            await until_delivered(broker.port, queue)
            Path(f"{record}.go").touch()
            code = await asyncio.wait_for(asyncio.to_thread(first.wait), 90)
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
        assert code == -9, first.stderr.read().decode() if first.stderr else code
        handled_first = record.read_text().split()
        assert handled_first == ids[:KILL_AT]

        calls: list[tuple[list[str], bool]] = []
        handlers = Events()

        @handlers.on_event("item")
        async def handle(batch: list[Event]) -> None:
            lease = current_lease()
            assert lease is not None
            calls.append(([e.id for e in batch], lease.redelivered))

        worker = Worker(source, [handlers])
        await worker.start()
        try:
            await until(lambda: any(ids[-1] in batch for batch, _ in calls),
                        "the second worker handling the last event", 60)
        finally:
            await worker.stop()
        second = [i for batch, _ in calls for i in batch]
        # the first event was a batch of its own, acknowledged; the killed worker's second
        # batch (every other event) comes again, in order: those it handled too
        start = 1 if ack_interval is None else KILL_AT - 1
        assert second == ids[start:], (second, handled_first)
        redelivered = {i for batch, again in calls if again for i in batch}
        assert set(ids[start:KILL_AT]) <= redelivered

    try:
        run(main(), timeout=180)
    finally:
        asyncio.run(broker.cleanup())


def test_max_batch_handler_gets_the_transactions_received_together(unique: str) -> None:
    """A ``max_batch`` handler gets the one-row transactions the worker received at once in
    one call, in order; a handler without it still gets one call per transaction."""
    broker = Broker("rabbitmq", unique)
    source = broker.source(1)
    events = [one_row(i) for i in range(COUNT)]
    ids = [e.id for e in events]

    async def main() -> None:
        await declare(source)
        gate, started = asyncio.Event(), asyncio.Event()
        batched: list[list[str]] = []
        single: list[list[str]] = []
        handlers = Events()

        @handlers.on_event("item", max_batch=100)
        async def many(batch: list[Event]) -> None:
            batched.append([e.id for e in batch])

        @handlers.on_event("item")
        async def one(batch: list[Event]) -> None:
            if not single:  # the first transaction's call waits for the rest to be delivered
                started.set()
                await asyncio.wait_for(gate.wait(), 60)
            single.append([e.id for e in batch])

        worker = Worker(source, [handlers])
        await publish(broker.url, events[:1])
        await worker.start()
        try:
            await asyncio.wait_for(started.wait(), 60)
            await publish(broker.url, events[1:])
            await until_delivered(broker.port, f"wk{unique}.walex.0")
            gate.set()
            await until(lambda: len(single) == COUNT, "every transaction handled", 60)
        finally:
            await worker.stop()
        assert single == [[i] for i in ids]
        assert batched == [ids[:1], ids[1:]]
        assert worker.events_handled == COUNT

    try:
        run(main(), timeout=120)
    finally:
        asyncio.run(broker.cleanup())


def test_failing_mid_batch_acknowledges_what_was_handled(unique: str) -> None:
    """Under "stop", a call failing in the middle of a batch: the transactions handled
    before it are acknowledged, the failing one and the rest go back, in order."""
    broker = Broker("rabbitmq", unique)
    source = broker.source(1)
    events = [one_row(i) for i in range(COUNT)]
    ids = [e.id for e in events]

    async def main() -> None:
        await declare(source)
        gate, started = asyncio.Event(), asyncio.Event()
        calls: list[str] = []
        handlers = Events()

        @handlers.on_event("item")
        async def fails_at_kill(batch: list[Event]) -> None:
            if not calls:
                started.set()
                await asyncio.wait_for(gate.wait(), 60)
            calls.append(batch[0].id)
            if batch[0].id == ids[KILL_AT - 1]:
                raise RuntimeError("boom")

        worker = Worker(source, [handlers], max_retries=0)
        await publish(broker.url, events[:1])
        await worker.start()
        await asyncio.wait_for(started.wait(), 60)
        await publish(broker.url, events[1:])
        await until_delivered(broker.port, f"wk{unique}.walex.0")
        gate.set()
        with pytest.raises(HandlerError):
            await asyncio.wait_for(worker.wait(), 60)
        assert calls == ids[:KILL_AT]

        again: list[str] = []
        others = Events()

        @others.on_event("item")
        async def record(batch: list[Event]) -> None:
            again.extend(e.id for e in batch)

        second = Worker(source, [others])
        await second.start()
        try:
            await until(lambda: ids[-1] in again, "the second worker handling the last event", 60)
        finally:
            await second.stop()
        assert again == ids[KILL_AT - 1:]

    try:
        run(main(), timeout=120)
    finally:
        asyncio.run(broker.cleanup())
