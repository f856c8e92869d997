"""``walex setup``: diagnose first, apply nothing when a prerequisite fails; as subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from walex.diagnosis import apply_plan, diagnose
from walex.embedded import Cluster

WALEX = [sys.executable, "-m", "walex.cli"]
ENV = {**os.environ, "COLUMNS": "200"}


def walex(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*WALEX, *args], capture_output=True, text=True, timeout=120, env=ENV)


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
