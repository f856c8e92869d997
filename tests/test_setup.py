"""``walex setup``: diagnose first, apply nothing when a prerequisite fails; as subprocesses."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from walex.diagnosis import apply_plan, diagnose
from walex.embedded import Cluster

sys.path.insert(0, str(Path(__file__).parent / "chaos"))
from proxy import Proxy  # noqa: E402

WALEX = [sys.executable, "-m", "walex.cli"]
# no WALEX_* from the environment: each test says what it gives
ENV = {**{k: v for k, v in os.environ.items() if not k.upper().startswith("WALEX_")},
       "COLUMNS": "200"}


def walex(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*WALEX, *args], capture_output=True, text=True, timeout=120,
                          env={**ENV, **env})


def state(conn: psycopg.Connection) -> dict[str, Any]:
    """What setup may change: publications and their tables, slots, replica identities."""
    return {
        "publications": conn.execute(
            "SELECT pubname, puballtables FROM pg_publication ORDER BY 1").fetchall(),
        "published": conn.execute(
            "SELECT pubname, schemaname, tablename FROM pg_publication_tables ORDER BY 1, 2, 3"
        ).fetchall(),
        "slots": conn.execute("SELECT slot_name FROM pg_replication_slots ORDER BY 1").fetchall(),
        "identity": conn.execute(
            "SELECT relname, relreplident FROM pg_class WHERE relnamespace = 'public'::regnamespace "
            "AND relkind = 'r' ORDER BY 1").fetchall(),
    }


@pytest.fixture(scope="module")
def replica_cluster(pg_cluster: Any) -> Iterator[Cluster]:
    """A fresh cluster as many are installed: wal_level = replica."""
    if pg_cluster.cluster is None:
        pytest.skip("needs a throwaway cluster, not WALEX_TEST_DSN")
    with Cluster(pg_cluster.cluster.bindir, settings={"wal_level": "replica"}) as cluster:
        yield cluster


def test_setup_on_wal_level_replica_reports_the_fix_and_changes_nothing(
    replica_cluster: Cluster,
) -> None:
    dsn = replica_cluster.dsn()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS item")
        conn.execute("CREATE TABLE item (id int PRIMARY KEY, label text)")
        before = state(conn)
        proc = walex("setup", "--url", dsn, "-p", "pub", "--table", "item", "--slot", "ops_slot",
                     "--replica-identity-full")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "ALTER SYSTEM SET wal_level = 'logical'; then restart PostgreSQL" in proc.stdout
        assert "problem" in proc.stdout and "nothing was changed" in proc.stdout
        assert "created" not in proc.stdout
        assert state(conn) == before  # no publication, no slot, identity untouched

        proc = walex("setup", "--url", dsn, "-p", "pub", "--table", "item", "--json")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        result = json.loads(proc.stdout)
        assert result["exit_code"] == 1 and result["blocked"] and result["applied"] == []
        [wal] = [f for f in result["findings"] if f["check"] == "wal_level"]
        assert wal["status"] == "problem" and wal["blocking"] and "ALTER SYSTEM" in wal["fix"]
        assert result["sql"] == []  # the publication would wait: nothing runs while blocked
        assert state(conn) == before

        # --wal-level applies that one fix, and nothing else before the restart
        proc = walex("setup", "--url", dsn, "-p", "pub", "--table", "item", "--wal-level")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "ALTER SYSTEM SET wal_level = 'logical': restart PostgreSQL" in proc.stdout
        assert state(conn) == before
        proc = walex("setup", "--url", dsn, "-p", "pub", "--table", "item")
        assert proc.returncode == 1 and "waits for a restart" in proc.stdout, proc.stdout
    replica_cluster.restart()
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SHOW wal_level").fetchone() == ("logical",)
        proc = walex("setup", "--url", dsn, "-p", "pub", "--table", "item")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "created publication 'pub' for item" in proc.stdout
        assert ("pub", "public", "item") in state(conn)["published"]


def test_setup_creates_what_is_missing_and_is_idempotent(dsn: str, admin: psycopg.Connection) -> None:
    admin.execute("CREATE TABLE item (id int PRIMARY KEY, label text)")
    admin.execute("CREATE TABLE keyless (v text)")
    proc = walex("setup", "--url", dsn, "-p", "pub", "--table", "item")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "created publication 'pub' for item" in proc.stdout and "ready" in proc.stdout
    after = state(admin)
    assert after["published"] == [("pub", "public", "item")]

    again = walex("setup", "--url", dsn, "-p", "pub", "--table", "item")
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout
    assert state(admin) == after

    # a keyless table would make its UPDATEs and DELETEs fail once published: blocked
    proc = walex("setup", "--url", dsn, "-p", "pub", "--table", "item", "--table", "keyless")
    assert proc.returncode == 1, proc.stdout
    assert 'ALTER TABLE "public"."keyless" REPLICA IDENTITY FULL;' in proc.stdout
    assert state(admin) == after

    dry = walex("setup", "--url", dsn, "-p", "pub", "-t", "keyless", "--replica-identity-full",
                "--slot", "ops_slot", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert 'ALTER PUBLICATION "pub" ADD TABLE "public"."keyless";' in dry.stdout
    assert 'ALTER TABLE "public"."keyless" REPLICA IDENTITY FULL;' in dry.stdout
    assert "SELECT pg_create_logical_replication_slot('ops_slot', 'pgoutput');" in dry.stdout
    assert state(admin) == after

    proc = walex("setup", "--url", dsn, "-p", "pub", "-t", "keyless", "--replica-identity-full",
                 "--slot", "ops_slot", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["applied"] == [
        "added public.keyless to publication 'pub'",
        "set REPLICA IDENTITY FULL on public.keyless",
        "created durable slot 'ops_slot'",
    ]
    done = state(admin)
    assert done["published"] == [("pub", "public", "item"), ("pub", "public", "keyless")]
    assert ("keyless", "f") in done["identity"] and done["slots"] == [("ops_slot",)]
    again = walex("setup", "--url", dsn, "-p", "pub", "-t", "keyless", "--replica-identity-full",
                  "--slot", "ops_slot", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["applied"] == []
    assert state(admin) == done


def test_setup_could_not_check_is_not_a_problem_found() -> None:
    proc = walex("setup", "--url", "postgresql://u:pw-s3cret@127.0.0.1:1/db", "-p", "pub", "--json")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["error"].startswith("could not check: cannot connect")
    assert "pw-s3cret" not in proc.stdout + proc.stderr


def test_role_without_replication_and_for_all_tables(dsn: str, admin: psycopg.Connection) -> None:
    admin.execute("DROP ROLE IF EXISTS walex_plain")
    admin.execute("CREATE ROLE walex_plain LOGIN")
    try:
        admin.execute("CREATE TABLE item (id int PRIMARY KEY)")
        admin.execute("GRANT CREATE ON DATABASE " + admin.info.dbname + " TO walex_plain")
        with psycopg.connect(dsn, user="walex_plain", autocommit=True) as conn:
            plan = diagnose(conn, "pub", ["*"])
            problems = {f.check: f for f in plan.findings if f.status == "problem"}
            assert problems["role"].fix == 'ALTER ROLE "walex_plain" REPLICATION; (as a superuser)'
            assert "only a superuser can create it FOR ALL TABLES" in problems["publication"].detail
            assert plan.exit_code == 1 and plan.runnable() == []
            assert apply_plan(conn, plan) == []
            plan = diagnose(conn, "pub", ["item"])  # not the owner of item
            assert any(f.check == "table public.item" and f.blocking and "only its owner" in f.detail
                       for f in plan.findings), plan.findings
        assert state(admin)["publications"] == []
    finally:
        admin.execute("REVOKE ALL ON DATABASE " + admin.info.dbname + " FROM walex_plain")
        admin.execute("DROP OWNED BY walex_plain")
        admin.execute("DROP ROLE walex_plain")


# PGOPTIONS (read by libpq) makes the slot creation give up quickly; walex keeps a
# statement_timeout lower than its own --timeout
QUICK = {"PGOPTIONS": "-c statement_timeout=3s"}


def test_setup_that_fails_on_the_slot_reports_the_publication_it_created(
    dsn: str, admin: psycopg.Connection
) -> None:
    """The publication is created, then the slot times out: say what was applied, not
    "nothing was changed"."""
    admin.execute("CREATE TABLE item (id int PRIMARY KEY, label text)")
    admin.execute("CREATE TABLE other (id int PRIMARY KEY)")
    with psycopg.connect(dsn) as open_txn:
        # a transaction that wrote and stays open: creating a slot waits for it to end
        open_txn.execute("INSERT INTO other VALUES (1)")
        proc = walex("setup", "--url", dsn, "-p", "pub", "-t", "item", "--slot", "late_slot",
                     **QUICK)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr
        assert "nothing was changed" not in proc.stdout + proc.stderr
        assert "- created publication 'pub' for item" in proc.stdout
        assert "pg_create_logical_replication_slot('late_slot', 'pgoutput') failed" in proc.stderr
        assert "Applied before it, and kept: created publication 'pub' for item" in proc.stderr
        assert state(admin)["published"] == [("pub", "public", "item")]
        assert state(admin)["slots"] == []

        admin.execute("DROP PUBLICATION pub")
        proc = walex("setup", "--url", dsn, "-p", "pub", "-t", "item", "--slot", "late_slot",
                     "--json", **QUICK)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        result = json.loads(proc.stdout)
        assert result["applied"] == ["created publication 'pub' for item"], result
        assert result["failed"] == "SELECT pg_create_logical_replication_slot('late_slot', 'pgoutput')"
        assert "statement timeout" in result["error"] and "nothing was changed" not in result["error"]
        assert state(admin)["published"] == [("pub", "public", "item")]
        assert state(admin)["slots"] == []
        open_txn.rollback()
    proc = walex("setup", "--url", dsn, "-p", "pub", "-t", "item", "--slot", "late_slot", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["applied"] == ["created durable slot 'late_slot'"]


def test_setup_json_has_the_same_keys_in_every_outcome(
    dsn: str, admin: psycopg.Connection, tmp_path: Any
) -> None:
    admin.execute("CREATE TABLE item (id int PRIMARY KEY)")
    admin.execute("CREATE TABLE keyless (v text)")
    outcomes = {
        "ready": walex("setup", "--url", dsn, "-p", "pub", "-t", "item", "--json"),
        "dry run": walex("setup", "--url", dsn, "-p", "pub", "-t", "item", "--dry-run", "--json"),
        "blocked": walex("setup", "--url", dsn, "-p", "pub", "-t", "keyless", "--json"),
        "unreachable": walex("setup", "--url", "postgresql://u:pw-s3cret@127.0.0.1:1/db",
                             "-p", "pub", "--json"),
        "no publication": walex("setup", "--url", dsn, "--json"),
        "bad config file": walex("setup", "--config", str(tmp_path / "missing.toml"), "--json"),
    }
    with psycopg.connect(dsn) as open_txn:
        open_txn.execute("INSERT INTO item VALUES (1)")
        outcomes["failed applying"] = walex("setup", "--url", dsn, "-p", "pub", "-t", "item",
                                            "--slot", "late_slot", "--json", **QUICK)
    codes = {name: proc.returncode for name, proc in outcomes.items()}
    assert codes == {"ready": 0, "dry run": 0, "blocked": 1, "unreachable": 3,
                     "no publication": 1, "bad config file": 1, "failed applying": 1}, outcomes
    results = {name: json.loads(proc.stdout) for name, proc in outcomes.items()}
    keys = {name: sorted(result) for name, result in results.items()}
    assert len({tuple(k) for k in keys.values()}) == 1, keys
    assert sorted(results["ready"]) == sorted([
        "publication", "platform", "target", "dry_run", "exit_code", "blocked", "findings",
        "sql", "applied", "failed", "error"])
    for name, result in results.items():
        assert result["exit_code"] == codes[name]
        assert (result["error"] is None) == (codes[name] == 0) or name == "blocked", result
    assert results["unreachable"]["error"].startswith("could not check: cannot connect")
    assert "publication" in results["no publication"]["error"]
    assert "missing.toml" in results["bad config file"]["error"]
    assert "pw-s3cret" not in json.dumps(results)


def test_setup_gives_up_on_a_silent_network_while_applying(
    dsn: str, admin: psycopg.Connection
) -> None:
    """CREATE PUBLICATION waits for a lock, then the network goes silent: exit, no hang."""
    admin.execute("CREATE TABLE item (id int PRIMARY KEY)")
    params = conninfo_to_dict(dsn)
    proxy = Proxy(str(params["host"]), int(params["port"])).start()
    try:
        with psycopg.connect(dsn) as locker:
            locker.execute("LOCK TABLE item IN ACCESS EXCLUSIVE MODE")
            url = make_conninfo(dsn, port=proxy.port, application_name="setup_silent")
            proc = subprocess.Popen([*WALEX, "setup", "--url", url, "-p", "pub", "-t", "item",
                                     "--timeout", "8", "--json"], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=ENV)
            try:
                deadline = time.monotonic() + 60
                while admin.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE application_name = 'setup_silent' "
                    "AND wait_event_type = 'Lock'").fetchone() is None:
                    assert time.monotonic() < deadline and proc.poll() is None, proc.poll()
                    time.sleep(0.05)
                proxy.partition()  # the server's answer (a statement timeout) never arrives
                out, err = proc.communicate(timeout=90)
            finally:
                proc.kill()
    finally:
        proxy.stop()
    assert proc.returncode == 1, out + err
    assert "Traceback" not in err, err
    result = json.loads(out)
    assert result["failed"] == 'CREATE PUBLICATION "pub" FOR TABLE "public"."item"', result
    assert result["applied"] == [] and "no answer from" in result["error"], result
    assert "whether it was applied is unknown" in result["error"]
    assert "Nothing was applied before it" in result["error"]
    assert state(admin)["publications"] == []  # the server's statement_timeout undid it


def test_setup_refuses_a_slot_name_postgresql_would_reject_or_truncate(
    dsn: str, admin: psycopg.Connection
) -> None:
    """Checked before anything is applied: not after the publication was created, and never
    a name cut to 63 bytes that finds another slot and reports it as walex's."""
    admin.execute("CREATE TABLE t (id int PRIMARY KEY)")
    admin.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", ("s" * 63,))
    before = state(admin)
    for name in ("s" * 63 + "_2", "Bad Name", "x'; drop table t; --"):
        proc = walex("setup", "--url", dsn, "-p", "pub", "--slot", name)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "not a replication slot name" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
        assert state(admin) == before
    status = subprocess.run([*WALEX, "status", "--url", dsn, "--slot", "s" * 63 + "_2"],
                            capture_output=True, text=True, timeout=60, env=ENV)
    assert status.returncode == 1 and "not a replication slot name" in status.stderr, \
        status.stdout + status.stderr


def test_fixes_for_a_missing_publication_can_be_copied_as_they_are(
    dsn: str, admin: psycopg.Connection
) -> None:
    """Every table asked for is missing: no 'FOR TABLE ;' to copy. A publication name with
    spaces and quotes: the walex setup command of status's fix is quoted for the shell."""
    proc = walex("setup", "--url", dsn, "-p", "pub", "-t", "no_such_table", "--json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (finding,) = [f for f in json.loads(proc.stdout)["findings"] if f["check"] == "publication"]
    assert "FOR TABLE ;" not in finding["fix"], finding
    name = 'Pub "Q" x'
    status = subprocess.run([*WALEX, "status", "--url", dsn, "-p", name, "--json"],
                            capture_output=True, text=True, timeout=60, env=ENV)
    (problem,) = [p for p in json.loads(status.stdout)["problems"] if "publication" in p["what"]]
    command = problem["fix"].split(" (creates it")[0]
    assert shlex.split(command) == ["walex", "setup", "--publication", name], problem
