"""A topic or partition error the Kafka client hands a worker is said, not a silent stall.

librdkafka hands some errors over as records of a topic or partition (a topic that does
not exist, a read the broker refuses, records it cannot decompress: error 76
UNSUPPORTED_COMPRESSION_TYPE among them): the worker reads nothing of that partition
while they last. On main it wrote them at DEBUG, and ``/healthz`` said ``consuming``.

The error tansu gives for real here: a worker subscribed to a topic that does not exist
(its source URL names a topic the relay has not created), or to a template (a pattern
subscription) no topic matches yet. Checked: one WARNING names
the topic, the error and the fix, however often the client repeats it; ``/healthz``
answers 503 ``stalled`` with the same reason; once the topic is made and the relay
publishes, the worker handles the event, says the error is over and answers 200.
Not reproduced (tansu cannot be made to send them): error 76 itself, an authorization
refusal, a topic deleted under the worker (tansu's DeleteTopics ends the broker); they
take the same path (a record whose ``error()`` is not ``_PARTITION_EOF``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
from destinations.kafka_support import GROUP, create_topic
from destinations.servers import OwnTansu
from support import run
from workers.test_worker import made_up

from walex import Event, Events
from walex.destinations import Destinations
from walex.observe.workers import worker_health
from walex.workers import Worker


@pytest.mark.parametrize("topic", ["wm.item", "wm.{table}"])
def test_a_missing_topic_is_a_warning_and_stalls_healthz(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, topic: str,
) -> None:
    caplog.set_level(logging.DEBUG, logger="walex.workers")
    got: list[Event] = []
    events = Events()
    events.on_event("item")(got.extend)
    with OwnTansu(tmp_path) as broker:
        url = f"kafka://127.0.0.1:{broker.port}?topic={topic}"
        source = f"{url}&{GROUP}&topic.metadata.refresh.interval.ms=1000&group=missing"

        def warnings() -> list[str]:
            return [r.getMessage() for r in caplog.records
                    if r.levelno >= logging.WARNING and r.name == "walex.workers"]

        async def until(check: object, what: str, timeout: float = 40) -> None:
            deadline = time.monotonic() + timeout
            while not check():  # type: ignore[operator]
                assert time.monotonic() < deadline, \
                    f"{what}; warnings: {warnings()}; health: {worker_health(w)}"
                await asyncio.sleep(0.05)

        w = Worker(source, [events], name="w")

        async def main() -> tuple[list[str], tuple[int, dict[str, object]]]:
            async with w:
                await until(lambda: any("Unknown topic" in m for m in warnings()),
                            "a warning naming the missing topic")
                await until(lambda: worker_health(w)[0] == 503, "/healthz 503")
                stalled = worker_health(w)
                await asyncio.sleep(3)  # the client repeats the error meanwhile
                said = warnings()
                await asyncio.to_thread(create_topic, broker.port, "wm.item", 1)
                event = made_up(1)
                destinations = Destinations([url], 1)
                await destinations.open()
                try:
                    await destinations.publish([event])
                finally:
                    await destinations.close()
                await until(lambda: [e.id for e in got] == [event.id], "the event handled")
                await until(lambda: worker_health(w)[0] == 200, "/healthz 200 again")
            return said, stalled

        said, stalled = run(main(), timeout=120)
    [warning] = said  # once, however often the client repeated it
    named = "wm.item" if "{" not in topic else "^wm\\..+$"  # a pattern: none matches it
    assert named in warning and "Unknown topic" in warning and "create the topic" in warning
    code, body = stalled
    assert code == 503 and body["status"] == "stalled", body
    reason = str(body["reason"])
    assert named in reason and "UNKNOWN_TOPIC_OR_PART" in reason, body
    assert any("is consumed again" in r.getMessage() for r in caplog.records), \
        [r.getMessage() for r in caplog.records]
