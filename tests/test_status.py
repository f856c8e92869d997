"""``walex status``: JSON for scripts, exit codes for health checks; as subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from support import collecting, run, standby_of
from walex.backfill.store import CREATE as CREATE_STORE
from walex.cli_status import sparkline
from walex.embedded import Cluster

sys.path.insert(0, str(Path(__file__).parent / "chaos"))
from proxy import Proxy  # noqa: E402

WALEX = [sys.executable, "-m", "walex.cli"]
# no WALEX_* from the environment: each test says what it gives
ENV = {**{k: v for k, v in os.environ.items() if not k.upper().startswith("WALEX_")},
       "COLUMNS": "200"}


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


def test_status_names_every_client_a_role_may_not_see_in_full(
    dsn: str, admin: psycopg.Connection, plain_role: str
) -> None:
    """A role without pg_read_all_stats sees no client address: status says it is hidden
    (not 'no client'); a slot held by a SQL session (not a walsender) has its client too."""
    admin.execute("CREATE TABLE item (id int PRIMARY KEY)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE item")
    admin.execute("SELECT pg_create_logical_replication_slot('sql_slot', 'pgoutput', true)")

    async def main() -> list[tuple[int, dict[str, Any]]]:
        async with collecting(dsn, name="status_probe", durable_slot=True,
                              slot_name="busy_slot"):
            return [await asyncio.to_thread(status, url)
                    for url in (make_conninfo(dsn, user=plain_role), dsn)]

    (_, hidden), (_, full) = run(main())
    clients = {s["slot"]: s["client"] for s in hidden["slots"]}
    assert clients == {"busy_slot": "status_probe (address hidden from this role)",
                       "sql_slot": "(address hidden from this role)"}, clients
    clients = {s["slot"]: s["client"] for s in full["slots"]}
    assert clients["sql_slot"].startswith("client backend session (127.0.0.1:"), clients
    assert clients["busy_slot"].startswith("status_probe (127.0.0.1:"), clients


def test_sparkline() -> None:
    assert sparkline([]) == ""
    assert sparkline([0, 0]) == "▁▁"
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7, 8]) == "▁▂▃▄▅▆▇██"
    assert sparkline([5, 5]) == "▄▄"


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
    return result


@pytest.fixture
def plain_role(admin: psycopg.Connection) -> Iterator[str]:
    """A role without privileges (LOGIN, REPLICATION), dropped afterwards."""
    role = f"walex_plain_{os.getpid()}"
    admin.execute(f"DROP ROLE IF EXISTS {role}")
    admin.execute(f"CREATE ROLE {role} LOGIN REPLICATION")
    try:
        yield role
    finally:
        admin.execute(f"DROP OWNED BY {role}")
        admin.execute(f"DROP ROLE {role}")


def test_status_without_a_publication_reports_the_server_and_every_slot(
    dsn: str, admin: psycopg.Connection
) -> None:
    admin.execute("SELECT pg_create_logical_replication_slot('first_slot', 'pgoutput')")
    admin.execute("SELECT pg_create_logical_replication_slot('second_slot', 'pgoutput')")
    proc = subprocess.run([*WALEX, "status", "--url", dsn, "--json"],
                          capture_output=True, text=True, timeout=60, env=ENV)
    assert proc.returncode == 0 and proc.stderr == "", proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["publication"] is None and report["publication_exists"] is False
    assert [s["slot"] for s in report["slots"]] == ["first_slot", "second_slot"]
    assert report["wal_level"] == "logical" and report["settings"]["max_replication_slots"]
    assert not [p for p in report["problems"] if p["fatal"]], report["problems"]

    proc = subprocess.run([*WALEX, "status", "--url", dsn], capture_output=True, text=True,
                          timeout=60, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "first_slot" in proc.stdout and "second_slot" in proc.stdout
    assert "no publication checked" in proc.stdout and "publication" not in proc.stderr


def test_status_names_a_missing_privilege_and_exits_3(
    dsn: str, admin: psycopg.Connection, plain_role: str
) -> None:
    admin.execute(CREATE_STORE.format(store="walex_backfill"))  # the progress store: not readable
    url = make_conninfo(dsn, user=plain_role)
    proc = subprocess.run([*WALEX, "status", "--url", url], capture_output=True, text=True,
                          timeout=60, env=ENV)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "permission denied for table walex_backfill" in proc.stderr, proc.stderr
    proc = subprocess.run([*WALEX, "status", "--url", url, "--json"], capture_output=True,
                          text=True, timeout=60, env=ENV)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr
    report = json.loads(proc.stdout)
    assert report["exit_code"] == 3 and "permission denied" in report["error"], report


def blocked_on(admin: psycopg.Connection, application: str) -> int | None:
    """The pid of the backend of ``application`` once it waits for a lock."""
    row = admin.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s "
                        "AND wait_event_type = 'Lock'", (application,)).fetchone()
    return row[0] if row else None


def test_status_reports_a_dropped_connection_and_exits_3(
    dsn: str, admin: psycopg.Connection
) -> None:
    admin.execute("CREATE TABLE walex_backfill (x int)")
    with psycopg.connect(dsn) as locker:  # holds the store: status waits on it
        locker.execute("LOCK TABLE walex_backfill IN ACCESS EXCLUSIVE MODE")
        url = make_conninfo(dsn, application_name="status_dropped")
        proc = subprocess.Popen([*WALEX, "status", "--url", url], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=ENV)
        try:
            pid = wait_for(lambda: blocked_on(admin, "status_dropped"), "status waiting")
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            out, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
    assert proc.returncode == 3, out + err
    assert "Traceback" not in err and "terminating connection" in err, err


def test_status_gives_up_on_a_silent_network(dsn: str, admin: psycopg.Connection) -> None:
    """The connection goes silent mid-query (a proxy drops every byte): exit 3, no hang."""
    admin.execute("CREATE TABLE walex_backfill (x int)")
    params = conninfo_to_dict(dsn)
    proxy = Proxy(str(params["host"]), int(params["port"])).start()
    try:
        with psycopg.connect(dsn) as locker:
            locker.execute("LOCK TABLE walex_backfill IN ACCESS EXCLUSIVE MODE")
            url = make_conninfo(dsn, port=proxy.port, application_name="status_silent")
            started = time.monotonic()
            proc = subprocess.Popen([*WALEX, "status", "--url", url, "--timeout", "8"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=ENV)
            try:
                wait_for(lambda: blocked_on(admin, "status_silent"), "status waiting")
                proxy.partition()  # the server's statement_timeout error never arrives
                out, err = proc.communicate(timeout=90)
            finally:
                proc.kill()
    finally:
        proxy.stop()
    assert proc.returncode == 3, out + err
    assert "Traceback" not in err and "no answer from" in err, err
    assert time.monotonic() - started < 90


def test_status_watch_prints_each_refresh_when_stdout_is_a_pipe(
    dsn: str, admin: psycopg.Connection
) -> None:
    admin.execute("CREATE PUBLICATION pub FOR ALL TABLES")
    admin.execute("SELECT pg_create_logical_replication_slot('watched_slot', 'pgoutput')")
    proc = subprocess.Popen([*WALEX, "status", "--url", dsn, "-p", "pub", "--watch", "0.5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout],  # type: ignore[union-attr]
                     daemon=True).start()
    seen: list[str] = []

    def refreshes() -> bool:
        while not lines.empty():
            seen.append(lines.get())
        return sum("Ctrl-C ends" in line for line in seen) >= 3

    try:
        wait_for(refreshes, "three refreshes on the pipe")
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert sum("watched_slot" in line for line in seen) >= 3, seen


def test_status_watch_ends_on_ctrl_c_that_a_check_swallowed(dsn: str, admin: psycopg.Connection) -> None:
    """Ctrl-C while a check runs, where something catches the KeyboardInterrupt (the
    failpoint ``status_check=swallow``, as a library could): the watch still ends, at once
    and with its code, instead of refreshing for ever."""
    admin.execute("CREATE PUBLICATION pub FOR ALL TABLES")
    env = {**ENV, "WALEX_FAILPOINTS": "status_check=swallow:2"}
    proc = subprocess.Popen([*WALEX, "status", "--url", dsn, "-p", "pub", "--watch", "0.1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    first = threading.Event()
    threading.Thread(target=lambda: [first.set() for line in proc.stdout  # type: ignore[union-attr]
                                     if "Ctrl-C ends" in line], daemon=True).start()
    try:
        assert first.wait(60), "no refresh"
        time.sleep(0.8)  # the next check is in the failpoint's 2 s (it starts 0.1 s on)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, proc.stderr.read()  # type: ignore[union-attr]


def test_status_slot_of_another_kind_or_database_is_not_called_missing(
    dsn: str, admin: psycopg.Connection
) -> None:
    """--slot names a physical slot, or a logical slot of another database: it exists, and
    the alert says what it is and where to check it instead of 'does not exist'."""
    other = f"{admin.info.dbname}_other"
    admin.execute("SELECT pg_create_physical_replication_slot('phys_slot', true)")
    admin.execute(f"CREATE DATABASE {other}")
    try:
        with psycopg.connect(make_conninfo(dsn, dbname=other), autocommit=True) as conn:
            conn.execute("SELECT pg_create_logical_replication_slot('far_slot', 'pgoutput')")
        code, report = status(dsn, "--slot", "phys_slot")
        assert code == 2, report
        assert "is a physical slot" in report["alerts"][0], report["alerts"]
        assert "does not exist" not in report["alerts"][0]
        code, report = status(dsn, "--slot", "far_slot")
        assert code == 2, report
        assert f"is a logical slot of database {other!r}" in report["alerts"][0], report["alerts"]
    finally:
        admin.execute("SELECT pg_drop_replication_slot('phys_slot')")
        admin.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                      "WHERE database = %s", (other,))
        admin.execute(f"DROP DATABASE {other}")


def test_status_and_drop_slot_on_a_standby(pg_cluster: Any) -> None:
    """A hot standby has no current WAL position (pg_current_wal_lsn() fails in recovery):
    the lag and the WAL held are counted from the last WAL replayed, and its logical slots
    (PostgreSQL 16+) are reported and dropped like a primary's."""
    if pg_cluster.cluster is None:
        pytest.skip("needs a throwaway cluster, not WALEX_TEST_DSN")
    with Cluster(pg_cluster.cluster.bindir) as primary, standby_of(primary) as standby:
        with psycopg.connect(primary.dsn("postgres"), autocommit=True) as conn:
            conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
            conn.execute("CREATE PUBLICATION pub FOR TABLE t")
        with psycopg.connect(standby, autocommit=True) as conn:
            wait_for(lambda: conn.execute(
                "SELECT 1 FROM pg_publication WHERE pubname = 'pub'").fetchone(),
                "the publication replayed on the standby")
            if primary.major_version >= 16:  # logical decoding on a standby
                conn.execute("SELECT pg_create_logical_replication_slot('standby_slot', "
                             "'pgoutput')")
        code, report = status(standby)
        assert code == 0, report
        if primary.major_version >= 16:
            (slot,) = report["slots"]
            assert slot["slot"] == "standby_slot" and slot["lag_bytes"] is not None, slot
            proc = subprocess.run([*WALEX, "drop-slot", "standby_slot", "--url", standby],
                                  input="y\n", capture_output=True, text=True, timeout=60,
                                  env=ENV)
            assert proc.returncode == 0 and "holds" in proc.stdout, proc.stdout + proc.stderr
        # setup: read-only, so a publication is made on the primary; a slot (16+) here
        proc = subprocess.run([*WALEX, "setup", "--url", standby, "-p", "other_pub"],
                              capture_output=True, text=True, timeout=60, env=ENV)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "a standby" in proc.stdout and "against the primary" in proc.stdout, proc.stdout
        assert "read-only transaction" not in proc.stderr, proc.stderr
        proc = subprocess.run([*WALEX, "setup", "--url", standby, "-p", "pub", "--slot",
                               "made_here"], capture_output=True, text=True, timeout=60,
                              env=ENV)
        if primary.major_version >= 16:
            assert proc.returncode == 0, proc.stdout + proc.stderr
        else:
            assert proc.returncode == 1 and "before 16" in proc.stdout, proc.stdout + proc.stderr
