"""A RabbitMQ worker whose queue is deleted under it does not go on consuming nothing.

When a queue is deleted, the broker cancels its consumers (``Basic.Cancel``)
and keeps their channels open: nothing more comes, and a worker that only
watched for closed channels stayed "connected", silently idle on that
partition for ever. The worker takes the cancel as the end of the
subscription: it reconnects, finds its group's queue missing and stops with
the ConfigError that names the fix (declare the group).
"""

from __future__ import annotations

import asyncio

import pytest
from support import run, until

from walex.errors import ConfigError
from walex.workers import Worker
from walex.workers import rabbitmq as worker_rabbitmq

from .test_worker import Broker, Calls, made_up, relay


@pytest.mark.parametrize("split", [True, False], ids=["split", "aiormq"])
def test_a_queue_deleted_under_the_worker_stops_it_with_the_fix(
        unique: str, split: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not split:  # the deliveries through aiormq's basic_consume
        monkeypatch.setattr(worker_rabbitmq._SourceExchange, "connection_class", None)
    b = Broker("rabbitmq", unique)
    calls = Calls()
    calls.events.on_event("item")(calls.handler("item"))

    async def main() -> None:
        import aio_pika

        worker = Worker(b.source(partitions=1), [calls.events])
        await worker.consumer.declare()
        await worker.start()
        try:
            await relay(b, [[made_up(1)]], partitions=1)
            await until(lambda: len(calls.flat("item")) == 1, "the first event", 30)
            connection = await aio_pika.connect(port=b.port)
            try:
                channel = await connection.channel()
                await channel.queue_delete(f"wk{unique}.walex.0")
            finally:
                await connection.close()
            with pytest.raises(ConfigError, match="does not exist") as info:
                await asyncio.wait_for(worker.wait(), 20)
            assert f"wk{unique}.walex.0" in str(info.value) and "--declare" in str(info.value)
            assert worker.reconnects == 1
        finally:
            await asyncio.wait_for(worker.stop(), 30)

    try:
        run(main(), timeout=90)
    finally:
        asyncio.run(b.cleanup())
