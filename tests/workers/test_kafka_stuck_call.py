"""A Kafka handler call that outlives its cancellation never runs while another worker has
its partition: the worker process ends first.

Worker process ``a`` (``walex worker``) holds the topic's one partition and is inside a
call that will not end: an async handler that catches every ``CancelledError`` and goes
on, or a plain handler blocking its thread. Both write a heartbeat line to a shared file
while they run. Worker ``b`` joins (its ``client.id`` sorts first, so the range assignor
gives it the partition): ``a`` must give the partition up. It cancels the call after the
revoke limit (a third of ``max.poll.interval.ms``), waits as long again, and then, the
call still running, exits with :data:`~walex.workers.kafkasession.STUCK_EXIT` and a
CRITICAL naming the partition and the fix, so the group hands the partition to ``b``
only once the call is gone. Checked: ``b`` handles the event (the same id), no heartbeat
of ``a`` comes after ``b`` started it, and ``a`` exited so. On main ``a`` let the
partition go with the call still running (a plain handler's at once, as its cancelled
await returned), and went on running: ``b`` handled the partition while ``a``'s call
ran.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from destinations.kafka_support import GROUP, create_topic
from destinations.servers import OwnTansu
from support import run
from workers.test_worker import made_up

from walex import Event, Events
from walex.destinations import Destinations
from walex.workers import Worker
from walex.workers.kafkasession import STUCK_EXIT

SCRIPT = Path(sys.executable).parent / "walex"
WALEX = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "walex.cli"]
POLL = "max.poll.interval.ms=6000"  # cancelled after 2 s, the process ends after 4 s

HANDLERS = '''
import asyncio, os, time
from walex import Events

events = Events()
LOG = os.environ["STUCK_LOG"]


def note(text):
    with open(LOG, "a") as out:
        out.write(f"{time.time():.6f} a {text}\\n")


if os.environ["STUCK_MODE"] == "async":
    @events.on_event("item")
    async def handle(batch):
        note(f"start {batch[0].id}")
        end = time.monotonic() + 40
        while time.monotonic() < end:
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                note("ignores the cancellation")
            note("running")
else:
    @events.on_event("item")
    def handle(batch):  # on the handler thread: cannot be cancelled
        note(f"start {batch[0].id}")
        end = time.monotonic() + 40
        while time.monotonic() < end:
            time.sleep(0.05)
            note("running")
'''


def env_base() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("WALEX_") and k != "PYTHONPATH"}


@pytest.mark.parametrize("mode", ["async", "thread"])
def test_a_call_that_outlives_its_cancellation_ends_the_process_first(
    tmp_path: Path, mode: str,
) -> None:
    (tmp_path / "handlers.py").write_text(HANDLERS)
    beats = tmp_path / "beats.txt"
    beats.write_text("")
    out = tmp_path / "a.log"
    with OwnTansu(tmp_path) as broker:
        create_topic(broker.port, "ws.item", 1)
        url = f"kafka://127.0.0.1:{broker.port}?topic=ws.{{table}}"
        source = f"{url}&{GROUP}&{POLL}&group=stuck"
        with open(out, "ab") as log:
            a = subprocess.Popen(
                [*WALEX, "worker", f"{source}&client.id=z-worker", "handlers:events"],
                cwd=tmp_path, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                env={**env_base(), "STUCK_LOG": str(beats), "STUCK_MODE": mode})
        try:
            def a_text() -> str:
                return out.read_text(errors="replace")

            def wait(check: object, what: str, timeout: float) -> None:
                deadline = time.monotonic() + timeout
                while not check():  # type: ignore[operator]
                    assert time.monotonic() < deadline, f"{what}\n--- a\n{a_text()[-4000:]}"
                    time.sleep(0.05)

            wait(lambda: "assigned ws.item[0]" in a_text(), "a assigned the partition", 60)
            event = made_up(1)

            async def publish() -> None:
                destinations = Destinations([url], 1)
                await destinations.open()
                try:
                    await destinations.publish([event])
                finally:
                    await destinations.close()

            run(publish(), timeout=60)
            wait(lambda: f"a start {event.id}" in beats.read_text(), "a inside its call", 60)

            got: list[tuple[float, str]] = []
            events = Events()

            def b_handle(batch: list[Event]) -> None:
                with open(beats, "a") as note:
                    note.write(f"{time.time():.6f} b start {batch[0].id}\n")
                got.extend((time.time(), e.id) for e in batch)

            events.on_event("item")(b_handle)

            async def b_runs() -> None:
                async with Worker(f"{source}&client.id=a-worker", [events], name="b") as b:
                    deadline = time.monotonic() + 60
                    while not got:
                        assert time.monotonic() < deadline, \
                            f"b never handled the event\n--- a\n{a_text()[-4000:]}"
                        await asyncio.sleep(0.05)
                    await asyncio.sleep(0.5)
                    assert b.consumer.assigned == {("ws.item", 0)}

            run(b_runs(), timeout=90)
            try:
                code = a.wait(10)
            except subprocess.TimeoutExpired:
                code = None
        finally:
            if a.poll() is None:
                a.kill()
                a.wait(10)
    lines = [line.split(" ", 2) for line in beats.read_text().splitlines() if line]
    b_start = min(float(t) for t, who, text in lines if who == "b")
    a_last = max(float(t) for t, who, text in lines if who == "a")
    assert [e for _, e in got] == [event.id]
    assert a_last < b_start, (f"a's call still ran {a_last - b_start:.2f}s after b started the "
                              f"partition's event\n--- a\n{a_text()[-3000:]}")
    assert code == STUCK_EXIT, f"a: exit code {code}\n--- a\n{a_text()[-3000:]}"
    assert "still runs" in a_text() and "ws.item[0]" in a_text() and \
        "max.poll.interval.ms" in a_text(), a_text()[-3000:]
