"""Records as large as the producer lets through, and the producer's own queue.

librdkafka refuses a record over ``message.max.bytes`` at once (MSG_SIZE_TOO_LARGE,
test_kafka), and holds what it was given in a queue bounded by
``queue.buffering.max.kbytes``, which walex sets to about two groups' bytes. A
record over that bound finds the queue full even when it is empty, for ever: a
publish that waits for room would fail on its timeout and be retried without end,
the relay wedged behind one row. So the queue walex sizes holds the largest record
``message.max.bytes`` allows, and a record over a queue the URL made smaller is a
refusal for good (on_error settles it) that names the setting, at once.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from support import run

from walex.destinations.base import DestinationURL, Outgoing, Unavailable
from walex.destinations.kafka import KafkaDestination
from walex.errors import DestinationError

from .kafka_support import create_topic, records
from .servers import OwnTansu


def _item(n: int, size: int) -> Outgoing:
    body = b'{"id":"0/1000-%04d","v":"%s"}' % (n, b"x" * size)
    return Outgoing(f"0/1000-{n:04d}", "public", "t", "update", 0, body, "/db/public/t",
                    "2026-12-07T08:00:00Z", "public.t/1", "1")


def test_a_record_over_the_producers_queue(tmp_path: Path) -> None:
    with OwnTansu(tmp_path) as broker:
        create_topic(broker.port, "big.t", 1)
        base = f"kafka://127.0.0.1:{broker.port}?topic=big.{{table}}&timeout=2"
        # message.max.bytes raised for large rows: a 20 MB record is allowed, over the
        # 16 MiB walex gave the queue before
        roomy = KafkaDestination(DestinationURL(base + "&message.max.bytes=60000000"))
        # the queue the URL asks for (1 MiB) is smaller than a record allowed (5 MB)
        small = KafkaDestination(DestinationURL(
            base + "&message.max.bytes=5000000&queue.buffering.max.kbytes=1024"))

        async def main() -> None:
            await roomy.open()
            try:
                await roomy.publish([_item(0, 10), _item(1, 20_000_000), _item(2, 10)])
            finally:
                await roomy.close()
            await small.open()
            try:
                started = time.monotonic()
                with pytest.raises(DestinationError) as info:
                    await small.publish([_item(3, 10), _item(4, 2_000_000), _item(5, 10)])
                assert time.monotonic() - started < 2, "waited for room that never comes"
                message = str(info.value)
                assert "topic 'big.t' refused a record for good" in message, message
                assert "queue.buffering.max.kbytes=1024" in message, message
                assert "Fix: raise queue.buffering.max.kbytes" in message, message
                # the producer goes on: a record that fits is published
                await small.publish([_item(6, 10)])
            except Unavailable as exc:
                pytest.fail(f"a record that can never fit was taken for an outage: {exc}")
            finally:
                await small.close()

        run(main(), timeout=50)
        stored = [(m.value() or b"")[:18].decode() for m in records(broker.port, "big.t")]
        sizes = [len(m.value() or b"") for m in records(broker.port, "big.t")]
    assert stored[:3] == [f'{{"id":"0/1000-{n:04d}' for n in range(3)], stored
    assert sizes[1] > 20_000_000
    assert stored[-1] == '{"id":"0/1000-0006', stored
    assert '{"id":"0/1000-0004' not in stored
