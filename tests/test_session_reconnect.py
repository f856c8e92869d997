"""Reconnects on a network that stopped answering: each attempt opens one connection."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from support import run, until
from walex import Events, WalEx
from walex.errors import ReplicationError

sys.path.insert(0, str(Path(__file__).parent / "chaos"))
from proxy import Proxy  # noqa: E402


def test_a_reconnect_to_a_silent_server_waits_one_connect_timeout_per_attempt(
    dsn: str, admin: psycopg.Connection
) -> None:
    """The network goes silent under a streaming app (connect_timeout=2, the walsender's
    timeout 2 s). Each reconnect attempt must open one connection, waiting the connect
    timeout once: on main a failed attempt also diagnosed the failure over a normal
    connection, which waited the connect timeout a second time (2 connections an attempt)
    to say the same thing. The app gives up after its 2 attempts, naming the failure."""
    admin.execute("CREATE TABLE item (id int PRIMARY KEY)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE item")
    params = conninfo_to_dict(dsn)
    proxy = Proxy(str(params.get("host") or "127.0.0.1"), int(params["port"])).start()
    url = make_conninfo(dsn, host="127.0.0.1", port=proxy.port, connect_timeout="2",
                        options="-c wal_sender_timeout=2000")
    seen: list[int] = []
    events = Events()

    @events.on_insert("item")
    def record(batch):  # type: ignore[no-untyped-def]
        seen.extend(e.new_record["id"] for e in batch)

    async def scenario() -> None:
        app = WalEx(url, publication="pub", modules=[events], name="silent_reconnect",
                    status_interval=0.5, reconnect_max_attempts=2, reconnect_backoff_max=0.5)
        await app.start()
        try:
            admin.execute("INSERT INTO item VALUES (1)")
            await until(lambda: seen == [1], "row 1")
            proxy.partition()
            before = proxy.connections
            with pytest.raises(ReplicationError, match="gave up reconnecting"):
                await asyncio.wait_for(app.wait(), 60)
            assert proxy.connections - before == 2, proxy.connections - before
        finally:
            await app.stop()

    try:
        run(scenario(), timeout=90)
    finally:
        proxy.stop()
