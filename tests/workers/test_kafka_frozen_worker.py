"""A Kafka worker process frozen (SIGSTOP) in a call past the group's session timeout: when
it thaws, its call's lease says lost, before the group has told it.

Worker process ``a`` holds the topic's one partition and is inside a call (a plain
handler sleeping 3 s on its thread, then checking ``current_lease().lost`` before its
effect, as the fencing doc asks). The test freezes ``a`` for longer than ``session.timeout.ms``: the
group gives the partition to worker ``b``, which handles the event. Thawed, ``a``'s
handler wakes at once (its wait ran out while frozen), well before librdkafka hears from
the group that ``a`` lost the partition. Its lease must say lost then: ``a``'s consumer
thread did not run for most of the session timeout, so the group may have given the
partition away. On main it said valid, and ``a`` applied its effect after ``b`` had
handled the event (two workers on one partition; seen in a SIGSTOP chaos run with an
async handler too, where it races librdkafka's own session timer: the plain handler's
thread wakes first).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from destinations.kafka_support import GROUP, create_topic
from destinations.servers import OwnTansu
from support import run
from workers.test_worker import made_up

from walex import Event, Events
from walex.destinations import Destinations
from walex.workers import Worker

SCRIPT = Path(sys.executable).parent / "walex"
WALEX = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "walex.cli"]

HANDLERS = '''
import os, time
from walex import Events
from walex.workers import current_lease

events = Events()
LOG = os.environ["FROZEN_LOG"]


def note(text):
    with open(LOG, "a") as out:
        out.write(f"{time.time():.6f} a {text}\\n")


@events.on_event("item")
def handle(batch):  # plain: on the handler thread, which wakes first when thawed
    lease = current_lease()
    note(f"start {batch[0].id}")
    time.sleep(3)  # the test freezes the process meanwhile
    note("lost" if lease.lost else "applied")  # the effect, fenced as the doc says
'''


def env_base() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("WALEX_") and k != "PYTHONPATH"}


def test_a_thawed_worker_s_call_finds_its_lease_lost(tmp_path: Path) -> None:
    (tmp_path / "handlers.py").write_text(HANDLERS)
    beats = tmp_path / "beats.txt"
    beats.write_text("")
    out = tmp_path / "a.log"
    with OwnTansu(tmp_path) as broker:
        create_topic(broker.port, "wf.item", 1)
        url = f"kafka://127.0.0.1:{broker.port}?topic=wf.{{table}}"
        source = f"{url}&{GROUP}&group=frozen"  # session.timeout.ms=6000
        with open(out, "ab") as log:
            a = subprocess.Popen(
                [*WALEX, "worker", f"{source}&client.id=a-worker", "handlers:events"],
                cwd=tmp_path, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                env={**env_base(), "FROZEN_LOG": str(beats)})

        def a_text() -> str:
            return out.read_text(errors="replace")

        def lines() -> list[list[str]]:
            return [line.split(" ", 2) for line in beats.read_text().splitlines() if line]

        got: list[Event] = []
        events = Events()

        def b_handle(batch: list[Event]) -> None:
            with open(beats, "a") as note:
                note.write(f"{time.time():.6f} b start {batch[0].id}\n")
            got.extend(batch)

        events.on_event("item")(b_handle)
        event = made_up(1)

        async def until(check: object, what: str, timeout: float = 60) -> None:
            deadline = time.monotonic() + timeout
            while not check():  # type: ignore[operator]
                assert time.monotonic() < deadline, f"{what}\n--- a\n{a_text()[-4000:]}"
                await asyncio.sleep(0.05)

        async def main() -> None:
            await until(lambda: "assigned wf.item[0]" in a_text(), "a assigned the partition")
            async with Worker(f"{source}&client.id=z-worker", [events], name="b") as b:
                # b joins; a (its client.id sorts first) keeps the partition
                await until(lambda: a_text().count("assigned wf.item[0]") >= 2,
                            "a assigned the partition again after b joined")
                destinations = Destinations([url], 1)
                await destinations.open()
                try:
                    await destinations.publish([event])
                finally:
                    await destinations.close()
                await until(lambda: any(t == f"start {event.id}" for _, w, t in lines()),
                            "a inside its call")
                a.send_signal(signal.SIGSTOP)
                try:
                    await until(lambda: bool(got), "b handling the event of the frozen a")
                    assert b.consumer.assigned == {("wf.item", 0)}
                finally:
                    a.send_signal(signal.SIGCONT)
                await until(lambda: any(w == "a" and t in ("lost", "applied", "cancelled")
                                        for _, w, t in lines()), "a's call to end")

        try:
            run(main(), timeout=120)
        finally:
            a.send_signal(signal.SIGCONT)
            a.terminate()
            try:
                a.wait(30)
            except subprocess.TimeoutExpired:
                a.kill()
                a.wait(10)
    b_start = min(float(t) for t, w, _ in lines() if w == "b")
    ended = [(float(t), text) for t, w, text in lines() if w == "a" and
             text in ("lost", "applied", "cancelled")]
    assert [e.id for e in got] == [event.id]
    assert ended and ended[0][0] > b_start, (ended, b_start)  # a thawed after b handled it
    assert ended[0][1] != "applied", \
        f"a applied its effect after b handled the event: {lines()}\n--- a\n{a_text()[-3000:]}"
