"""A NATS worker asks for a partition's next message with the acknowledgement (``+NXT``).

With ``max_ack_pending=1`` a partition's messages come one at a time, so
each one used to cost an acknowledgement and a fetch request of its own.
The acknowledgement now asks for the next message itself: while messages
are waiting, the worker sends no fetch request at all. The order, one
message per call and the handover of what the worker had been sent when it
stops (at once, not after ``ack_wait``) are unchanged.
"""

from __future__ import annotations

import asyncio

from support import run, until
from workers.test_worker import Broker, Calls, made_up, relay, worker_running

from walex.workers import Worker

COUNT = 40


def test_messages_waiting_are_asked_for_by_the_acknowledgements(unique: str) -> None:
    import nats

    b = Broker("nats", unique)
    calls = Calls()
    calls.events.on_event("item")(calls.handler("item"))

    async def main() -> int:
        nc = await nats.connect(f"nats://127.0.0.1:{b.port}")
        requests = 0

        async def count(_msg: object) -> None:
            nonlocal requests
            requests += 1

        try:
            await relay(b, [[made_up(i) for i in range(COUNT)]], partitions=1)
            # every fetch request of the partition's consumer goes to this subject
            await nc.subscribe(f"$JS.API.CONSUMER.MSG.NEXT.WK_{unique}.walex_0", cb=count)
            await nc.flush()
            async with worker_running(Worker(b.source(partitions=1), [calls.events])):
                await until(lambda: len(calls.flat("item")) == COUNT, "every event handled", 30)
            await nc.flush()
        finally:
            await nc.close()
        return requests

    try:
        requests = run(main(), timeout=60)
    finally:
        asyncio.run(b.cleanup())
    assert [e.id for e in calls.flat("item")] == [made_up(i).id for i in range(COUNT)]
    assert all(len(batch) == 1 for batch in calls.of("item"))
    assert requests <= 5, f"{requests} fetch requests for {COUNT} messages waiting"


def test_a_stopping_worker_gives_back_the_message_it_asked_for(unique: str) -> None:
    """The worker stops right after acknowledging (and so asking for the next message): the
    next worker gets that message at once, not after ack_wait."""
    b = Broker("nats", unique)
    first, second = Calls(), Calls()
    first.events.on_event("item")(first.handler("item"))
    second.events.on_event("item")(second.handler("item"))

    async def main() -> None:
        await relay(b, [[made_up(i)] for i in range(3)], partitions=1)
        worker = Worker(b.source(partitions=1, ack_wait=60), [first.events])

        async def stop_after_first(batch: list) -> None:
            asyncio.get_running_loop().create_task(worker.stop())
            await asyncio.sleep(0.2)

        first.events.on_event("item")(stop_after_first)
        async with worker_running(worker):
            await until(lambda: len(first.flat("item")) >= 1, "the first call", 30)
            await asyncio.wait_for(worker._stopped.wait(), 30)
        handled = len(first.flat("item"))
        async with worker_running(Worker(b.source(partitions=1, ack_wait=60), [second.events])):
            await until(lambda: handled + len(second.flat("item")) >= 3, "the rest handed over",
                        15)
        assert [e.id for e in first.flat("item") + second.flat("item")] == \
            [made_up(i).id for i in range(3)]

    try:
        run(main(), timeout=60)
    finally:
        asyncio.run(b.cleanup())
