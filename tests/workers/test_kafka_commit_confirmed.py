"""A Kafka worker counts an offset as committed only once the broker confirmed it.

The worker commits what its handlers finished every half second, asynchronously.
On main it noted an offset as committed as soon as the request was queued, and
librdkafka's answer was never read: a commit the broker refused went unnoticed (no
log record at all), and the offset was never committed again.

Here worker A's connections are held (every byte kept, nothing dropped: a frozen
path) from just before it acknowledges its third record until after its group
session expired: B joins meanwhile. When the bytes flow again, the broker refuses
A's held commit (``UNKNOWN_MEMBER_ID``): A must say so (a WARNING naming the
partition and offset), and the group (B, or A rejoined) handles again exactly the
record whose commit was not confirmed, nothing that was.

(librdkafka itself keeps an async commit through a cut or silent connection until
the coordinator answers, so a network fault alone loses no commit; with tansu, a
commit reaching the broker during a rebalance is taken. Only a refused commit is a
failure the worker sees, and the record it covers is then rightly handled again.)
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka import Producer
from destinations.kafka_support import GROUP, create_topic

from walex.destinations.base import DestinationURL
from walex.workers.kafka import KafkaConsumer

from .test_kafka_frozen import ProxiedTansu

sys.path.insert(0, str(Path(__file__).parents[1] / "chaos"))
from proxy import Proxy  # noqa: E402

HELD = 8.0  # seconds A's bytes are held: beyond its session (session.timeout.ms=6000)


def _produce(port: int, topic: str, values: list[bytes]) -> None:
    producer = Producer({"bootstrap.servers": f"127.0.0.1:{port}"})
    for value in values:
        producer.produce(topic, value)
    assert producer.flush(10) == 0


def _hold(proxy: Proxy) -> list:
    """Hold the bytes of the connections open now, both ways (new ones flow)."""
    async def run() -> list:
        links = list(proxy.links)
        for link in links:
            for writer in (link.client, link.server):
                if writer is not None:
                    writer.transport.pause_reading()
        return links
    return proxy._call(run())  # type: ignore[return-value]


def _release(proxy: Proxy, links: list) -> None:
    async def run() -> None:
        for link in links:
            for writer in (link.client, link.server):
                if writer is not None and not writer.transport.is_closing():
                    writer.transport.resume_reading()
    proxy._call(run())


def test_a_refused_commit_is_told_and_only_its_records_come_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="walex.workers")
    proxy = Proxy("127.0.0.1", 0).start()
    try:
        with ProxiedTansu(tmp_path, proxy.port) as broker:
            proxy.target = ("127.0.0.1", broker.port)
            create_topic(broker.port, "wc.item", 1)
            base = f"kafka://127.0.0.1:{proxy.port}?topic=wc.item&timeout=1&{GROUP}&group=confirm"
            _produce(broker.port, "wc.item", [b"one", b"two", b"three"])

            async def main() -> list[bytes]:
                # A's requests wait for their answer (the held bytes) rather than time out
                a = KafkaConsumer(DestinationURL(base + "&socket.timeout.ms=30000"))
                b = KafkaConsumer(DestinationURL(base))
                [lane] = await a.open()
                again: list[bytes] = []
                try:
                    taken: list = []
                    while len(taken) < 3:  # one record per call (they have no ce_id)
                        got = await lane.receive(20)
                        assert got, "A received nothing"
                        taken += got
                        if len(taken) < 3:
                            await lane.ack(got)
                    await asyncio.sleep(1.5)  # the first two are committed, confirmed
                    held = _hold(proxy)
                    await lane.ack(got)  # handled: its commit goes out within 0.5 s, held
                    await asyncio.sleep(0.8)
                    [lane_b] = await b.open()  # joins (new connections flow)
                    await asyncio.sleep(HELD)
                    _release(proxy, held)
                    deadline = time.monotonic() + 20
                    while time.monotonic() < deadline:
                        got_b = await lane_b.receive(0.5)
                        again += [d.body for d in got_b]
                        await lane_b.ack(got_b)
                        try:  # A's side goes on: it may get the partition back after rejoining
                            got_a = await lane.receive(0.01)
                            again += [d.body for d in got_a]
                            await lane.ack(got_a)
                        except Exception:  # reconnecting, as the worker would
                            pass
                finally:
                    await a.close()
                    await b.close()
                return again

            again = asyncio.run(asyncio.wait_for(main(), 90))
    finally:
        proxy.stop()
    refused = [r.getMessage() for r in caplog.records
               if "did not take the commit" in r.getMessage()]
    assert refused and "wc.item[0]@3" in refused[0], \
        "the refused commit was not told: " + repr([r.getMessage() for r in caplog.records])
    assert again == [b"three"], again
