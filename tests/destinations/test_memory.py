"""What a relay holds, in real bytes, stays within ``max_pending_bytes`` whatever the window.

Concern: with a broker that takes nothing (Redis stopped) and one large
transaction of rows whose typed events take several times their wire size
(bigint, int, text, timestamptz, numeric, jsonb: the W1 bench's row, about
180 bytes on the wire and 1 kB as an Event), the Python memory walex allocates
while it waits (events queued, in hand and in the window, their encoded
messages, the failing publishes) stays within the budget and a stated margin,
for a window of one transaction and of 256; once the broker is back every
event is stored and the transaction acknowledged. Measured with tracemalloc
in this process, from a baseline taken with the app streaming: the peak of
Python's allocations, not the resident set (RSS figures: bench/memory.py).
Before the events were counted by their size in memory, they were counted by
their wire bytes and the same run held about six times the budget.
"""

from __future__ import annotations

import asyncio
import tracemalloc
from pathlib import Path
from typing import Any

import psycopg
import pytest
from support import collecting, run

from walex.lsn import parse_lsn

from .brokers import redis_stored
from .servers import OwnRedis
from .test_window import until_confirmed

MiB = 1024 * 1024
ROWS = 40_000
BUDGET = 4 * MiB
# besides the budget: the failing publish's request and the client's buffers, the batch
# being decoded, tracemalloc's and the event loop's own allocations
MARGIN = 2 * MiB

W1 = """
    CREATE TABLE w1 (id bigserial PRIMARY KEY, a int, b text, c timestamptz, d numeric, e jsonb);
    CREATE PUBLICATION pub FOR TABLE w1;
"""
INSERT = (
    "INSERT INTO w1 (a, b, c, d, e) SELECT i, 'row ' || md5(i::text), "
    "timestamptz '2025-01-01 00:00:00+00' + i * interval '1 second', round(i * 1.2345, 4), "
    "jsonb_build_object('k', i, 'tag', 'x', 'even', i % 2 = 0) "
    f"FROM generate_series(1, {ROWS}) i"
)


@pytest.mark.parametrize("window", [1, 256])
def test_a_relay_to_a_stopped_broker_holds_no_more_than_max_pending_bytes(
    admin: psycopg.Connection, dsn: str, tmp_path: Path, window: int,
) -> None:
    admin.execute(W1)
    slot = f"relay_memory_{window}"

    async def main(server: OwnRedis) -> tuple[list[Any], int, int, int]:
        url = f"redis://127.0.0.1:{server.port}/0?stream=rm:{{table}}&timeout=1"
        async with collecting(dsn, destinations=[url], destination_window=window,
                              max_pending_bytes=BUDGET, durable_slot=True,
                              slot_name=slot) as rec:
            app = rec.app
            assert app is not None
            await asyncio.to_thread(server.stop)
            tracemalloc.start()
            try:
                baseline = tracemalloc.get_traced_memory()[0]
                await asyncio.to_thread(admin.execute, INSERT)
                await rec._until(lambda: app.destinations.retries >= 3, 60, "failed attempts")
                await rec._until(lambda: app.pipeline.held_back, 60, "the reader held back")
                await asyncio.sleep(2)  # whatever would still be read, decoded or encoded
                peak = tracemalloc.get_traced_memory()[1] - baseline
            finally:
                tracemalloc.stop()
            held = app.pipeline.pending_bytes
            await asyncio.to_thread(server.start)
            events = await rec.wait_for(ROWS, 120)
            await until_confirmed(admin, slot, parse_lsn(events[-1].lsn), 120)
            return events, peak, held, len(rec.events)

    with OwnRedis(tmp_path) as server:
        events, peak, held, _ = run(main(server), timeout=300)
        stored = asyncio.run(redis_stored("rm:*", server.port))
    assert peak <= BUDGET + MARGIN, (
        f"{peak / MiB:.1f} MiB allocated with the broker stopped, for max_pending_bytes of "
        f"{BUDGET / MiB:.0f} MiB (window {window}; {held / MiB:.1f} MiB counted as pending)")
    assert held <= BUDGET
    assert sorted({i for i, _d, _x in stored}) == [e.id for e in events]
    assert len(events) == ROWS
