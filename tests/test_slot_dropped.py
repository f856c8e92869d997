"""A durable slot dropped by hand while walex streams from it.

Its walsender is terminated and the slot dropped before walex reconnects: the
changes committed until a new slot would start are gone. walex must not make a
new slot silently and go on as if nothing was lost.
"""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest

from support import collecting, run, until
from walex.errors import SlotLostError


def _drop_under(admin: psycopg.Connection, slot: str) -> None:
    """Terminate the slot's walsender and drop the slot before walex reconnects."""
    deadline = time.monotonic() + 15
    while True:
        admin.execute("SELECT pg_terminate_backend(active_pid, 5000) FROM pg_replication_slots "
                      "WHERE slot_name = %s AND active_pid IS NOT NULL", [slot])
        try:
            admin.execute("SELECT pg_drop_replication_slot(%s)", [slot])
            return
        except psycopg.errors.ObjectInUse:  # walex was quicker: again
            assert time.monotonic() < deadline, "the slot could not be dropped"


def _setup(admin: psycopg.Connection) -> None:
    admin.execute("CREATE TABLE t (id int PRIMARY KEY)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE t")


def test_a_durable_slot_dropped_while_streaming_stops_the_app_naming_the_loss(
    dsn: str, admin: psycopg.Connection
) -> None:
    """On main walex made a new slot at the server's current position and went on: row 2,
    committed meanwhile, was never delivered and nothing said so."""
    _setup(admin)

    async def scenario() -> None:
        async with collecting(dsn, subscriptions=["t"], name="dropped", durable_slot=True,
                              slot_name="dropped_slot", status_interval=0.2) as rec:
            admin.execute("INSERT INTO t VALUES (1)")
            await rec.wait_for(1)
            _drop_under(admin, "dropped_slot")
            admin.execute("INSERT INTO t VALUES (2)")
            assert rec.app is not None
            await asyncio.wait_for(rec.app.wait(), 30)

    with pytest.raises(SlotLostError) as info:
        run(scenario())
    message = str(info.value)
    assert "'dropped_slot' no longer exists" in message, message
    assert "recreate_lost_slot=True" in message, message
    assert admin.execute("SELECT count(*) FROM pg_replication_slots").fetchone() == (0,)


def test_recreate_lost_slot_makes_the_dropped_slot_again_and_reports_the_gap(
    dsn: str, admin: psycopg.Connection
) -> None:
    """With ``recreate_lost_slot=True`` the slot is made again, the gap logged and recorded
    in ``app.gaps``, and the app goes on streaming."""
    _setup(admin)

    async def scenario() -> list[str]:
        async with collecting(dsn, subscriptions=["t"], name="dropped_again", durable_slot=True,
                              slot_name="dropped_again_slot", recreate_lost_slot=True,
                              status_interval=0.2) as rec:
            admin.execute("INSERT INTO t VALUES (1)")
            await rec.wait_for(1)
            _drop_under(admin, "dropped_again_slot")
            assert rec.app is not None
            app = rec.app
            await until(lambda: app.pipeline.sessions >= 2, "a new session", timeout=30)
            admin.execute("INSERT INTO t VALUES (3)")
            events = await rec.wait_for(2)
            assert [e.new_record["id"] for e in events] == [1, 3]
            return list(app.gaps)

    gaps = run(scenario())
    assert len(gaps) == 1, gaps
    assert "'dropped_again_slot' no longer exists" in gaps[0], gaps[0]
