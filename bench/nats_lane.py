"""A window's NATS lane alone: prepared batches through ``Window``/``Lane`` to the local server.

    .venv/bin/python bench/nats_lane.py                      # 200 batches of 1,000 events (W1-like)
    .venv/bin/python bench/nats_lane.py --batches 20000 --size 1   # one-event transactions (W2-like)
    .venv/bin/python bench/nats_lane.py --depth 3            # groups in flight at most (branch only)

Synthetic CloudEvents of the W1 row's size (``kafka_publish.items``) are queued
on a window of ``--window`` transactions as fast as it has room, as the
dispatcher does (no PostgreSQL, no reader, no encoder), and the lane publishes
them to a fresh stream of the NATS server at 127.0.0.1:4222. Prints wall time,
the process's CPU per event, the lane's publishes (``groups``) and how many were
handed over while another was in flight (``overlapped``, 0 before pipelining),
best of ``--reps``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from kafka_publish import items  # noqa: E402

from walex.destinations import Destinations  # noqa: E402
from walex.destinations.window import Entry  # noqa: E402


chains = [0, 0, 0]  # the last run's chains, those that failed, duplicates


class _Txn:
    events = ()


async def run(url: str, batches: list[list[Any]], window_size: int, depth: int | None
              ) -> tuple[float, float, int, int]:
    destinations = Destinations([url], window=window_size)
    if depth is not None:
        destinations.items[0].depth = depth
    await destinations.open()
    recorded = [0]

    def record(txns: list[Any]) -> None:
        recorded[0] += len(txns)

    window = destinations.lanes(record)
    lane = window.lanes[0]
    warm_up = batches[0][0]._replace(id="warm-up")
    await destinations.items[0].publish([warm_up])  # the stream's last known
    t0, c0 = time.perf_counter(), time.process_time()
    async with window.running():
        for outgoing in batches:
            if window._full():
                await window._wait_room()
            entry = Entry(_Txn(), outgoing, 2)
            window.entries.append(entry)
            window.held += entry.size
            lane.queued.append(entry)
            lane._wake.set()
            window.finished(entry)  # the handlers' part
        await window.drain()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert recorded[0] == len(batches)
    d = destinations.items[0]
    chains[:] = [d.chains, d.chains_failed, d.duplicates]
    await destinations.close()
    return wall, cpu, lane.groups, getattr(lane, "overlapped", 0)


async def _stream(name: str, create: bool) -> None:
    import nats
    from nats.js.api import StreamConfig

    nc = await nats.connect("nats://127.0.0.1:4222")
    js = nc.jetstream()
    try:
        await js.delete_stream(name)
    except Exception:
        pass
    if create:
        await js.add_stream(StreamConfig(name=name, subjects=[f"{name.lower()}.>"]))
    await nc.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--size", type=int, default=1000, help="events per batch")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    events = items(args.batches * args.size)
    batches = [events[i:i + args.size] for i in range(0, len(events), args.size)]
    name = f"LANE{os.getpid()}"
    url = f"nats://127.0.0.1:4222?stream={name}&subject={name.lower()}.{{table}}"
    best = None
    for _ in range(args.reps):
        asyncio.run(_stream(name, True))
        try:
            wall, cpu, groups, overlapped = asyncio.run(run(url, batches, args.window,
                                                            args.depth))
        finally:
            asyncio.run(_stream(name, False))
        n = len(events)
        print(f"wall {wall:.3f}s ({n / wall:,.0f} events/s) cpu {cpu / n * 1e6:.2f} us/event "
              f"groups {groups} overlapped {overlapped} chains/failed/duplicates {chains}", flush=True)
        best = (wall, cpu) if best is None or wall < best[0] else best
    assert best is not None
    print(f"best: {len(events) / best[0]:,.0f} events/s, {best[1] / len(events) * 1e6:.2f} "
          f"us/event ({args.batches} batches of {args.size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
