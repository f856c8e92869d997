"""``walex drop-slot``: asks first, refuses a slot in use; as a subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from support import collecting, run
from walex.embedded import Cluster

sys.path.insert(0, str(Path(__file__).parent / "chaos"))
from proxy import Proxy  # noqa: E402

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


def held(output: str) -> float:
    """The bytes of WAL `drop-slot` says the slot holds ('no' WAL: 0)."""
    found = re.search(r"holds (no|[\d.]+ (?:B|KiB|MiB|GiB)) WAL", output)
    assert found, output
    if found.group(1) == "no":
        return 0
    number, unit = found.group(1).split()
    return float(number) * 1024 ** ["B", "KiB", "MiB", "GiB"].index(unit)


def test_drop_slot_counts_the_wal_held_from_restart_lsn(dsn: str, admin: psycopg.Connection) -> None:
    """A transaction open when the slot was read keeps its restart_lsn back: the WAL the slot
    holds (what dropping it frees) is counted from there, not from confirmed_flush_lsn."""
    admin.execute("CREATE TABLE t (v text)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE t")
    admin.execute("SELECT pg_create_logical_replication_slot('held_slot', 'pgoutput')")
    with psycopg.connect(dsn) as open_txn:  # written, not committed: decoding restarts before it
        open_txn.execute("INSERT INTO t VALUES ('open')")
        admin.execute("INSERT INTO t SELECT repeat(md5(g::text), 32) FROM generate_series(1, 3000) g")
        admin.execute("SELECT count(*) FROM pg_logical_slot_get_binary_changes('held_slot', NULL, "
                      "NULL, 'proto_version', '1', 'publication_names', 'pub')")
        retained, unconfirmed = admin.execute(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), "
            "pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn) "
            "FROM pg_replication_slots WHERE slot_name = 'held_slot'").fetchone()  # type: ignore[misc]
        assert retained > 2 * 2**20 and unconfirmed < 2**20, (retained, unconfirmed)
        proc = drop(dsn, "held_slot", answer="n\n")
        report = subprocess.run([*WALEX, "status", "--url", dsn, "--json"],
                                capture_output=True, text=True, timeout=60, env=ENV)
    assert proc.returncode == 1 and "not dropped" in proc.stdout, proc.stdout + proc.stderr
    assert held(proc.stdout) > 2 * 2**20, proc.stdout
    (slot,) = json.loads(report.stdout)["slots"]
    assert slot["retained_bytes"] > 2 * 2**20 and slot["lag_bytes"] < 2**20, slot
    (warning,) = [p["what"] for p in json.loads(report.stdout)["problems"] if "held_slot" in p["what"]]
    assert "MiB WAL" in warning, warning


def test_drop_slot_checks_the_name_before_postgresql_truncates_it(
    dsn: str, admin: psycopg.Connection
) -> None:
    """PostgreSQL cuts a name to 63 bytes: a longer one must not find and drop another slot."""
    kept = "s" * 63
    admin.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (kept,))
    for name in (kept + "_2", "S" * 10, "x'; drop table t; --"):
        proc = drop(dsn, name, "--yes")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "not a replication slot name" in proc.stderr and "63" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert slots(admin) == [kept]


def test_drop_slot_of_a_physical_slot(dsn: str, admin: psycopg.Connection) -> None:
    admin.execute("SELECT pg_create_physical_replication_slot('phys_slot', true)")
    try:
        proc = drop(dsn, "phys_slot", answer="n\n")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "physical" in proc.stdout and "None" not in proc.stdout, proc.stdout
    finally:
        admin.execute("SELECT pg_drop_replication_slot('phys_slot')")


def test_drop_slot_of_an_invalidated_slot_says_nothing_more_is_lost(pg_cluster: Any) -> None:
    """wal_status 'lost': the slot holds no WAL and its consumer lost its position already."""
    bindir = pg_cluster.cluster.bindir if pg_cluster.cluster is not None else None
    with Cluster(bindir, settings={"max_slot_wal_keep_size": "1MB", "wal_keep_size": "0",
                                   "max_wal_size": "32MB", "min_wal_size": "32MB"}) as cluster:
        dsn = cluster.dsn("postgres")
        with psycopg.connect(dsn, autocommit=True) as admin:
            invalidate(admin, "lost_slot")
            proc = drop(dsn, "lost_slot", answer="n\n")
            assert proc.returncode == 1, proc.stdout + proc.stderr
            assert "invalidated" in proc.stdout and held(proc.stdout) == 0, proc.stdout
            assert "never delivered" not in proc.stdout, proc.stdout
            report = subprocess.run([*WALEX, "status", "--url", dsn, "--json"],
                                    capture_output=True, text=True, timeout=60, env=ENV)
            assert report.returncode == 2, report.stdout + report.stderr
            (slot,) = json.loads(report.stdout)["slots"]
            assert slot["wal_status"] == "lost" and slot["retained_bytes"] is None, slot
            if cluster.major_version >= 17:  # and why (pg_replication_slots.invalidation_reason)
                (problem,) = json.loads(report.stdout)["problems"]
                assert "over max_slot_wal_keep_size" in problem["what"], problem
            yes = drop(dsn, "lost_slot", "--yes")
            assert yes.returncode == 0, yes.stdout + yes.stderr
            assert slots(admin) == []


def invalidate(admin: psycopg.Connection, slot: str) -> None:
    """Write WAL past max_slot_wal_keep_size until ``slot`` is invalidated."""
    admin.execute("CREATE TABLE t (id int PRIMARY KEY, pad text)")
    admin.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
    for _ in range(100):
        admin.execute("INSERT INTO t SELECT g, repeat(md5(random()::text), 300) "
                      "FROM generate_series(1, 200) g ON CONFLICT DO NOTHING")
        admin.execute("SELECT pg_switch_wal()")
        admin.execute("CHECKPOINT")
        status = admin.execute("SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s",
                               (slot,)).fetchone()[0]  # type: ignore[index]
        if status == "lost":
            return
    raise AssertionError(f"slot {slot} was not invalidated")


def test_drop_slot_racing_a_consumer_that_took_the_slot_meanwhile(
    dsn: str, admin: psycopg.Connection
) -> None:
    """The slot was free when read; a consumer starts on it while drop-slot asks: the drop is
    refused by PostgreSQL, and walex says what happened and what to do."""
    admin.execute("CREATE TABLE t (id int PRIMARY KEY)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE t")
    admin.execute("SELECT pg_create_logical_replication_slot('raced_slot', 'pgoutput')")
    proc = subprocess.Popen([*WALEX, "drop-slot", "raced_slot", "--url", dsn],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    try:
        shown = ""
        while "[y/N]" not in shown:  # the prompt: the slot was read, not in use
            char = proc.stdout.read(1)  # type: ignore[union-attr]
            assert char, shown
            shown += char

        async def main() -> tuple[str, str]:
            async with collecting(dsn, durable_slot=True, slot_name="raced_slot"):
                return await asyncio.to_thread(proc.communicate, "y\n", 60)

        out, err = run(main())
    finally:
        proc.kill()
    assert proc.returncode == 1, shown + out + err
    assert "started streaming from it after it was read" in err, err
    assert "Traceback" not in err and slots(admin) == ["raced_slot"]


def test_drop_slot_gives_up_on_a_silent_network_within_its_timeout(
    dsn: str, admin: psycopg.Connection
) -> None:
    """The network goes silent between the question and the drop: the command ends within
    --timeout (+5 s) and says the drop may or may not have happened."""
    admin.execute("SELECT pg_create_logical_replication_slot('silent_slot', 'pgoutput')")
    params = conninfo_to_dict(dsn)
    proxy = Proxy(str(params["host"]), int(params["port"])).start()
    try:
        url = make_conninfo(dsn, port=proxy.port)
        proc = subprocess.Popen([*WALEX, "drop-slot", "silent_slot", "--url", url,
                                 "--timeout", "2"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        try:
            shown = ""
            while "[y/N]" not in shown:
                char = proc.stdout.read(1)  # type: ignore[union-attr]
                assert char, shown
                shown += char
            proxy.partition()
            started = time.monotonic()
            _, err = proc.communicate("y\n", timeout=60)
        finally:
            proc.kill()
    finally:
        proxy.stop()
    assert proc.returncode == 1, err
    assert time.monotonic() - started < 20, time.monotonic() - started
    assert "no answer from" in err and "was dropped is unknown" in err, err


def test_status_alerts_on_a_slot_about_to_be_invalidated(pg_cluster: Any) -> None:
    """wal_status 'unreserved': the slot's WAL is past max_slot_wal_keep_size and goes at
    the next checkpoint. status says so and a health check fails (exit 2) before it is lost."""
    bindir = pg_cluster.cluster.bindir if pg_cluster.cluster is not None else None
    with Cluster(bindir, settings={"max_slot_wal_keep_size": "1MB", "wal_keep_size": "0",
                                   "max_wal_size": "64MB", "min_wal_size": "64MB",
                                   "checkpoint_timeout": "1h"}) as cluster:
        dsn = cluster.dsn("postgres")
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute("CREATE TABLE t (id int PRIMARY KEY, pad text)")
            admin.execute("SELECT pg_create_logical_replication_slot('doomed_slot', 'pgoutput')")
            for _ in range(20):  # WAL past max_slot_wal_keep_size, no checkpoint yet
                admin.execute("INSERT INTO t SELECT g, repeat(md5(random()::text), 300) "
                              "FROM generate_series(1, 200) g ON CONFLICT DO NOTHING")
                admin.execute("SELECT pg_switch_wal()")
                (wal_status,) = admin.execute(
                    "SELECT wal_status FROM pg_replication_slots").fetchone()  # type: ignore[misc]
                if wal_status == "unreserved":
                    break
            assert wal_status == "unreserved"
            report = subprocess.run([*WALEX, "status", "--url", dsn, "--json"],
                                    capture_output=True, text=True, timeout=60, env=ENV)
            assert report.returncode == 2, report.stdout + report.stderr
            data = json.loads(report.stdout)
            assert any("about to be invalidated" in a for a in data["alerts"]), data["alerts"]
            assert any("max_slot_wal_keep_size" in p["fix"] for p in data["problems"]), data


def test_drop_slot_without_an_answer_says_how_to_drop_without_asking(
    dsn: str, admin: psycopg.Connection
) -> None:
    admin.execute("SELECT pg_create_logical_replication_slot('asked_slot', 'pgoutput')")
    proc = subprocess.run([*WALEX, "drop-slot", "asked_slot", "--url", dsn],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
                          env=ENV)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.startswith("walex: not dropped") and "--yes" in proc.stderr, proc.stderr
    assert slots(admin) == ["asked_slot"]
