"""``walex status``: JSON for scripts, exit codes for health checks; as subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

import psycopg

from support import collecting, run
from walex.cli_status import sparkline

WALEX = [sys.executable, "-m", "walex.cli"]
ENV = {**os.environ, "COLUMNS": "200"}


def status(dsn: str, *args: str) -> tuple[int, dict[str, Any]]:
    proc = subprocess.run([*WALEX, "status", "--url", dsn, "-p", "pub", "--json", *args],
                          capture_output=True, text=True, timeout=60, env=ENV)
    assert proc.stderr == "", proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def test_status_json_shows_lag_growing_and_exits_2_over_the_threshold(
    dsn: str, admin: psycopg.Connection
) -> None:
    admin.execute("CREATE TABLE item (id int PRIMARY KEY, payload text)")
    admin.execute("ALTER TABLE item REPLICA IDENTITY FULL")
    admin.execute("CREATE PUBLICATION pub FOR TABLE item")
    admin.execute("SELECT pg_create_logical_replication_slot('idle_slot', 'pgoutput')")
    code, first = status(dsn, "--max-lag", "1MiB")
    assert code == 0, first
    [slot] = first["slots"]
    assert slot["slot"] == "idle_slot" and slot["active"] is False and slot["pid"] is None
    assert slot["plugin"] == "pgoutput" and slot["confirmed_flush_lsn"]
    assert slot["wal_status"] in ("reserved", "extended")  # PG 13+
    assert first["alerts"] == [] and first["max_lag_bytes"] == 1048576
    lags = [slot["lag_bytes"]]
    for batch in range(3):  # no consumer: the slot holds every byte written
        admin.execute("INSERT INTO item SELECT g, md5(g::text) FROM generate_series(%s::int, %s::int) g",
                      (batch * 5000, batch * 5000 + 4999))
        code, report = status(dsn, "--max-lag", "1MiB")
        lags.append(report["slots"][0]["lag_bytes"])
    assert lags == sorted(lags) and len(set(lags)) == len(lags), lags
    assert lags[-1] > 1048576
    assert code == 2, report
    assert report["exit_code"] == 2
    assert report["alerts"] == [
        f"slot 'idle_slot' lags {report['slots'][0]['lag']}, over --max-lag 1.0 MiB"]
    assert report["slots"][0]["lag"].endswith("MiB")

    code, report = status(dsn, "--max-lag", "1GiB")
    assert code == 0 and report["alerts"] == []
    code, report = status(dsn, "--slot", "no_such_slot")
    assert code == 2 and report["alerts"] == ["slot 'no_such_slot' does not exist in database "
                                              f"{admin.info.dbname!r}"]


def test_status_shows_the_client_of_an_active_slot(dsn: str, admin: psycopg.Connection) -> None:
    admin.execute("CREATE TABLE item (id int PRIMARY KEY)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE item")

    async def main() -> tuple[int, dict[str, Any]]:
        async with collecting(dsn, name="status_probe", durable_slot=True,
                              slot_name="busy_slot"):
            return await asyncio.to_thread(status, dsn, "--slot", "busy_slot")

    code, report = run(main())
    [slot] = report["slots"]
    assert slot["active"] and isinstance(slot["pid"], int), slot
    assert slot["client"].startswith("status_probe (127.0.0.1:"), slot
    assert code == 0


def test_sparkline() -> None:
    assert sparkline([]) == ""
    assert sparkline([0, 0]) == "▁▁"
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7, 8]) == "▁▂▃▄▅▆▇██"
    assert sparkline([5, 5]) == "▄▄"
