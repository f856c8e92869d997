"""``walex drop-slot``: asks first, refuses a slot in use; as a subprocess."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import psycopg

from support import collecting, run

WALEX = [sys.executable, "-m", "walex.cli"]
ENV = {**os.environ, "COLUMNS": "200"}


def drop(dsn: str, *args: str, answer: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([*WALEX, "drop-slot", *args, "--url", dsn], input=answer,
                          capture_output=True, text=True, timeout=60, env=ENV)


def slots(admin: psycopg.Connection) -> list[str]:
    return [r[0] for r in admin.execute("SELECT slot_name FROM pg_replication_slots "
                                        "WHERE database = current_database()")]


def test_drop_slot_asks_and_drops(dsn: str, admin: psycopg.Connection) -> None:
    admin.execute("SELECT pg_create_logical_replication_slot('old_slot', 'pgoutput')")
    admin.execute("CREATE TABLE t (v text)")
    admin.execute("INSERT INTO t SELECT repeat('x', 100) FROM generate_series(1, 1000)")
    no = drop(dsn, "old_slot", answer="n\n")
    assert no.returncode == 1 and "not dropped" in no.stdout, no.stdout + no.stderr
    assert "holds" in no.stdout and "KiB WAL" in no.stdout
    assert slots(admin) == ["old_slot"]
    yes = drop(dsn, "old_slot", answer="y\n")
    assert yes.returncode == 0 and "dropped replication slot old_slot" in yes.stdout, yes.stderr
    assert slots(admin) == []
    missing = drop(dsn, "old_slot", "--yes")
    assert missing.returncode == 1 and "does not exist" in missing.stderr


def test_drop_slot_refuses_a_slot_in_use(dsn: str, admin: psycopg.Connection) -> None:
    admin.execute("CREATE TABLE t (id int PRIMARY KEY)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE t")

    async def main() -> subprocess.CompletedProcess[str]:
        async with collecting(dsn, durable_slot=True, slot_name="busy_slot"):
            return await asyncio.to_thread(drop, dsn, "busy_slot", "--yes")

    proc = run(main())
    assert proc.returncode == 1 and "is in use by server process" in proc.stderr, proc.stderr
    assert slots(admin) == ["busy_slot"]
