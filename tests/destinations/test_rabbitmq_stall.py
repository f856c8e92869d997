"""A RabbitMQ that stops answering mid-publish: the publish ends within ``timeout``.

Behind a TCP proxy that holds every byte (a silent connection, as a broker
blocking publishers under a memory or disk alarm also looks to a client),
each way of publishing (walex's frames, aiormq's ``basic_publish``) raises
Unavailable within the destination's timeout, saying that no confirmation came
within it and what may cause that, and closing the destination does not hang.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

from walex.destinations.base import Unavailable

from .brokers import rabbitmq_delete
from .conftest import require
from .test_rabbitmq_frames import opened, outgoing
from .test_rabbitmq_refusals import queue

sys.path.insert(0, str(Path(__file__).parents[1] / "chaos"))
from proxy import Proxy  # noqa: E402


@pytest.mark.parametrize("framed", [True, False], ids=["frames", "basic_publish"])
def test_a_silent_broker_fails_the_publish_within_the_timeout(unique: str, framed: bool) -> None:
    port = require("rabbitmq")
    exchange, name = f"rs{unique}", f"rs{unique}.q"
    proxy = Proxy("127.0.0.1", port).start()
    url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/?exchange={exchange}&timeout=1"

    async def main() -> None:
        await queue(exchange, name, port)
        destination = await opened(url)
        try:
            destination.framed = framed
            await destination.publish(outgoing(3))
            proxy.pause()
            started = time.monotonic()
            with pytest.raises(Unavailable, match=r"did not confirm the batch within timeout=1s"):
                await destination.publish(outgoing(3))
            assert time.monotonic() - started < 3
        finally:
            started = time.monotonic()
            await asyncio.wait_for(destination.close(), 10)
            assert time.monotonic() - started < 5
            proxy.resume()

    try:
        asyncio.run(main())
    finally:
        proxy.stop()
        asyncio.run(rabbitmq_delete(exchange, name, port))
