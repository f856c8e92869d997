"""A destination window at its edges, attacked the way users hit it.

Concern (:mod:`walex.destinations.window`, :mod:`walex.windowed`): the window
full while the broker is down and the app stopped; against real brokers the
tests start and kill themselves. Every change reaches the broker in order per
key, with the same ids when published again, and nothing is acknowledged to
PostgreSQL before the broker confirmed it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import psycopg
from support import collecting, run

from walex.lsn import parse_lsn

from .brokers import redis_stored
from .servers import OwnRedis
from .test_outage import confirmed
from .test_window import INSERT_KEYS, KEYS, SETUP, check_keys, until_confirmed, write


def test_stop_while_the_dispatcher_waits_for_room_in_a_full_window(
    admin: psycopg.Connection, dsn: str, tmp_path: Path,
) -> None:
    """The broker is down and the window (window=4) is full, so the dispatcher waits for
    room with more transactions queued: stop() cuts the window off after shutdown_grace
    without failing, nothing past the broker's last confirmation is acknowledged, and a
    restart delivers every change, in order per key, with the same ids."""
    admin.execute(SETUP)
    slot, updates = "window_full_stop", 12

    async def main(server: OwnRedis) -> tuple[list[Any], list[Any], int]:
        url = f"redis://127.0.0.1:{server.port}/0?stream=wf:{{table}}&timeout=1&window=4"
        options: dict[str, Any] = dict(durable_slot=True, slot_name=slot, status_interval=0.2,
                                       shutdown_grace=1)
        async with collecting(dsn, destinations=[url], **options) as rec:
            app = rec.app
            assert app is not None
            admin.execute(INSERT_KEYS)
            await rec._until(lambda: app.transactions_handled == 1, 60, "the rows stored")
            await asyncio.to_thread(server.stop)
            await asyncio.to_thread(write, dsn, updates)
            await rec._until(lambda: app.destinations.retries >= 1, 60, "a failed attempt")
            await rec._until(lambda: app.pipeline.queue.qsize() >= 1
                             and len(app.pipeline.window) == 4, 60, "the window full")
            first = list(rec.events)
        held = confirmed(admin, slot)
        await asyncio.to_thread(server.start)
        async with collecting(dsn, destinations=[url], **options) as rec:
            again = await rec.wait_for(updates, 60)
            await until_confirmed(admin, slot, parse_lsn(again[-1].lsn), 60)
        return first, again, held

    with OwnRedis(tmp_path) as server:
        first, again, held = run(main(server), timeout=240)
        stored = asyncio.run(redis_stored("wf:*", server.port))
    assert held < parse_lsn(first[KEYS].lsn), "acknowledged before Redis confirmed it"
    handled = {e.id: e for e in first}
    assert all(handled[e.id].lsn == e.lsn for e in again if e.id in handled)
    check_keys(stored, updates)
