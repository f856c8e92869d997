"""A Kafka worker's consumer thread that outlives ``close()``, then a new connection.

The thread gives up its partition in a rebalance and commits what was handled
while the broker stops answering (the proxy holds every byte): the commit
waits for ``socket.timeout.ms`` (50 s, set in the URL), longer than close()
waits for the thread (``timeout`` + 30 s). The worker connects again. On main
the reopened consumer's state was the old thread's too: once the broker
answered, the old thread read the new connection's stop event and went on
consuming, a second member of the group in the same worker, for good. The old
thread must end, and leave the new connection alone.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path

from confluent_kafka import Producer
from destinations.kafka_support import GROUP, create_topic

from walex.destinations.base import DestinationURL
from walex.workers.kafka import KafkaConsumer

from .test_kafka_frozen import ProxiedTansu

sys.path.insert(0, str(Path(__file__).parents[1] / "chaos"))
from proxy import Proxy  # noqa: E402


def _in(thread: threading.Thread, function: str) -> bool:
    frame = sys._current_frames().get(thread.ident or 0)
    while frame is not None:
        if frame.f_code.co_name == function:
            return True
        frame = frame.f_back
    return False


def _produce(port: int, topic: str, value: bytes) -> None:
    producer = Producer({"bootstrap.servers": f"127.0.0.1:{port}"})
    producer.produce(topic, value)
    assert producer.flush(10) == 0


def test_a_thread_that_outlived_close_leaves_the_next_connection_alone(tmp_path: Path) -> None:
    proxy = Proxy("127.0.0.1", 0).start()
    try:
        with ProxiedTansu(tmp_path, proxy.port) as broker:
            proxy.target = ("127.0.0.1", broker.port)
            create_topic(broker.port, "wr.item", 1)
            base = f"kafka://127.0.0.1:{{}}?topic=wr.item&timeout=1&{GROUP}&group=reopen"
            _produce(broker.port, "wr.item", b"one")

            async def until(check: object, what: str, timeout: float = 30) -> None:
                deadline = time.monotonic() + timeout
                while not check():  # type: ignore[operator]
                    assert time.monotonic() < deadline, what
                    await asyncio.sleep(0.05)

            async def main() -> None:
                a = KafkaConsumer(DestinationURL(base.format(proxy.port)
                                                 + "&socket.timeout.ms=50000"))
                b = KafkaConsumer(DestinationURL(base.format(broker.port)))
                [lane] = await a.open()
                old = a.thread
                assert old is not None
                try:
                    taken = await lane.receive(20)
                    assert taken, "A received nothing"
                    await b.open()  # joins: A gives its partition up once the call in hand ends
                    await until(lambda: _in(old, "_give_up"), "A's revoke")
                    proxy.pause()
                    await lane.ack(taken)  # handled: the revoke commits it, and waits
                    await until(lambda: _in(old, "_commit"), "A's commit")
                    await a.close()  # waits timeout + 30 s for the thread: in vain
                    assert old.is_alive()
                    proxy.resume()
                    await a.open()
                    await until(lambda: not old.is_alive(), "the old thread went on", 15)
                finally:
                    await a.close()
                    await b.close()

            asyncio.run(asyncio.wait_for(main(), 80))
    finally:
        proxy.stop()
