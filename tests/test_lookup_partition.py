"""A silent network partition that begins while the reader waits on a lookup of the normal
connection (a Relation message's primary key, a type) is noticed within the session's
silence bound, as one during a read is, not after the lookups' own attempts."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from support import collecting, run, until

sys.path.insert(0, str(Path(__file__).parent / "chaos"))
from proxy import Proxy  # noqa: E402


def test_a_partition_during_a_primary_key_lookup_is_noticed_within_the_silence_bound(
    dsn: str, admin: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """``wal_sender_timeout`` 2 s (a silence bound of 2.5 s). The lookup connection goes
    silent (the proxy drops its bytes), a column is added, and a row inserted: its Relation
    message sends the reader to look the primary key up (REPLICA IDENTITY FULL); then the
    whole network goes silent. On main the reader waited for the lookup's 30 s timeout and
    two more attempts to connect (10 s each) before reconnecting: ~61 s; now within the
    lookups' bound of 5 s (at least the silence bound), and the row comes once healed."""
    admin.execute("CREATE TABLE t (id int PRIMARY KEY)")
    admin.execute("ALTER TABLE t REPLICA IDENTITY FULL")
    admin.execute("CREATE PUBLICATION pub FOR TABLE t")
    params = conninfo_to_dict(dsn)
    proxy = Proxy(str(params.get("host") or "127.0.0.1"), int(params["port"])).start()
    via = make_conninfo(dsn, host="127.0.0.1", port=proxy.port,
                        options="-c wal_sender_timeout=2s")

    def lookup_port() -> int | None:
        row = admin.execute(
            "SELECT client_port FROM pg_stat_activity WHERE application_name = 'lookup_cut' "
            "AND backend_type = 'client backend'").fetchone()
        return row[0] if row else None

    async def scenario() -> float:
        async with collecting(via, subscriptions=["t"], name="lookup_cut", durable_slot=True,
                              status_interval=0.5) as rec:
            admin.execute("INSERT INTO t VALUES (1)")
            await rec.wait_for(1)
            port = lookup_port()
            assert port is not None, "no lookup connection"
            assert proxy.silence(port)
            admin.execute("ALTER TABLE t ADD COLUMN x int")
            admin.execute("INSERT INTO t VALUES (2)")
            await asyncio.sleep(1.0)  # the Relation message read, its lookup unanswered
            began = time.monotonic()
            proxy.partition()
            await until(lambda: "reconnect" in caplog.text or "interrupted" in caplog.text,
                        "walex noticing the partition", timeout=90)
            noticed = time.monotonic() - began
            proxy.heal()
            await rec.wait_for(2, timeout=60)
            return noticed

    try:
        with caplog.at_level("INFO", logger="walex"):
            noticed = run(scenario(), timeout=150)
    finally:
        proxy.stop()
    assert noticed < 10, f"the partition was noticed after {noticed:.1f}s"
