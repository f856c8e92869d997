"""A relay with raw rows (walex.rawevent) fails and recovers as one with typed rows.

An app with destinations and no handler keeps its rows as sent and writes
their CloudEvents from that text. A value the user's loader refuses is then
met by the encoder, not the reader: the app must still stop with the
DecodeError naming the column, publish nothing of that transaction and leave
it unacknowledged; started again without the refusing loader, it publishes
it. A dead-letter ``on_error`` callable gets the refused events typed.
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest
from psycopg.adapt import Loader
from support import run

from walex import DecodeError, WalEx
from walex.lsn import parse_lsn

from .brokers import redis_delete, redis_stored
from .conftest import require

def _slot_flushed(admin: psycopg.Connection, slot: str) -> int:
    row = admin.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots "
                        "WHERE slot_name = %s", (slot,)).fetchone()
    return parse_lsn(row[0])


def test_a_value_the_users_loader_refuses_stops_the_relay_unacknowledged(
    admin: psycopg.Connection, dsn: str, unique: str,
) -> None:
    port = require("redis")
    admin.execute("""
        CREATE TABLE t (id int PRIMARY KEY, valid_until timestamptz);
        CREATE PUBLICATION pub FOR TABLE t;
    """)
    url = f"redis://127.0.0.1:{port}/0?stream=rr{unique}:{{table}}"
    slot = f"raw_relay_{unique}"
    options: dict[str, Any] = dict(publication="pub", destinations=[url], durable_slot=True,
                                   slot_name=slot, name=f"rr_{unique}", status_interval=0.2)
    psycopgs = psycopg.adapters.get_loader(1184, psycopg.pq.Format.TEXT)
    assert psycopgs is not None

    class Refusing(Loader):
        def load(self, data: Any) -> Any:
            if bytes(data) == b"infinity":
                raise ValueError("no infinity here")
            return psycopgs(self.oid, self.connection).load(data)

    async def stored() -> list[Any]:
        return await redis_stored(f"rr{unique}:*", port)

    async def until(check: Any, what: str, timeout: float = 30) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not await check():
            assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.05)

    async def first() -> str:
        app = WalEx(dsn, **options)
        await app.start()
        try:
            admin.execute("INSERT INTO t VALUES (1, '2025-01-01 00:00:00+00')")

            async def one() -> bool:
                return len(await stored()) == 1

            await until(one, "the first row at the broker")
            tables = list(app.pipeline.relations._tables.values())
            assert [table.raw for table in tables] == [True]  # rows kept as sent
            admin.execute("INSERT INTO t VALUES (2, 'infinity')")
            with pytest.raises(DecodeError) as info:
                await asyncio.wait_for(app.wait(), 30)
        finally:
            await app.stop()
        return str(info.value)

    async def second() -> None:
        app = WalEx(dsn, **options)
        await app.start()
        try:
            async def both() -> bool:
                return len(await stored()) == 2

            await until(both, "the refused row at the broker once the loader takes it")
        finally:
            await app.stop()

    psycopg.adapters.register_loader("timestamptz", Refusing)
    try:
        message = run(first(), timeout=60)
        held = run(stored())
        bad_lsn = admin.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]
    finally:
        psycopg.adapters.register_loader("timestamptz", psycopgs)
    try:
        assert "column 'valid_until' (timestamptz) of a Insert row of public.t" in message
        assert "no infinity here" in message and "make it take this value" in message
        assert [doc["data"]["new_record"]["id"] for _i, doc, _x in held] == [1]
        assert _slot_flushed(admin, slot) < parse_lsn(bad_lsn)  # the refused one not acknowledged
        run(second(), timeout=60)
        docs = [doc for _i, doc, _x in run(stored())]
        assert [d["data"]["new_record"]["id"] for d in docs] == [1, 2]
        assert docs[1]["data"]["new_record"]["valid_until"] == "infinity"
    finally:
        run(redis_delete(f"rr{unique}:*", port))
        admin.execute("SELECT pg_drop_replication_slot(%s) FROM pg_replication_slots "
                      "WHERE slot_name = %s", (slot, slot))
