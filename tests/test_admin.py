"""``walex status`` / ``walex setup`` logic against real servers."""

from __future__ import annotations

import psycopg
import pytest

from walex.admin import inspect_database
from walex.diagnosis import apply_plan, diagnose


def test_status_reports_missing_publication_and_identity_problems(admin: psycopg.Connection) -> None:
    admin.execute("CREATE TABLE keyless (v text)")
    admin.execute("CREATE TABLE keyed (id int PRIMARY KEY, v text)")
    status = inspect_database(admin, "pub")
    assert status.wal_level == "logical"
    assert not status.publication_exists and not status.ok
    assert any("publication 'pub' does not exist" in p.what for p in status.problems)

    admin.execute("CREATE PUBLICATION pub FOR TABLE keyless, keyed")
    status = inspect_database(admin, "pub")
    assert status.publication_exists
    assert [(t["table"], t["replica_identity"]) for t in status.tables] == [
        ("keyed", "default"), ("keyless", "default"),
    ]
    keyless = [p for p in status.problems if "keyless" in p.what]
    assert keyless and keyless[0].fatal and "REPLICA IDENTITY FULL" in keyless[0].fix
    keyed = [p for p in status.problems if "keyed" in p.what and "keyless" not in p.what]
    assert keyed and not keyed[0].fatal  # a warning: changes will be None
    assert not status.ok


def test_setup_applies_only_what_was_asked(admin: psycopg.Connection) -> None:
    admin.execute("CREATE TABLE a (id int PRIMARY KEY)")
    admin.execute("CREATE TABLE b (v text)")
    admin.execute("ALTER TABLE b REPLICA IDENTITY FULL")
    done = apply_plan(admin, diagnose(admin, "pub", ["public.a", "b"]))
    assert done == ["created publication 'pub' for public.a, b"]
    assert inspect_database(admin, "pub").tables[0]["replica_identity"] == "default"

    done = apply_plan(admin, diagnose(admin, "pub", ["*"], replica_identity_full=True,
                                      slot="ops_slot"))
    assert done == ["set REPLICA IDENTITY FULL on public.a", "created durable slot 'ops_slot'"]
    status = inspect_database(admin, "pub")
    assert status.ok, status.problems
    assert {t["replica_identity"] for t in status.tables} == {"full"}
    [slot] = status.slots
    assert slot["slot"] == "ops_slot" and not slot["active"] and not slot["temporary"]
    assert any("not in use" in p.what and not p.fatal for p in status.problems)
    assert apply_plan(admin, diagnose(admin, "pub", ["*"], replica_identity_full=True,
                                      slot="ops_slot")) == []


def test_status_on_a_server_without_logical_wal() -> None:
    try:
        conn = psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", connect_timeout=3)
    except psycopg.OperationalError:
        pytest.skip("no system PostgreSQL with wal_level=replica on port 5432")
    with conn:
        if conn.execute("SHOW wal_level").fetchone()[0] == "logical":  # type: ignore[index]
            pytest.skip("the system PostgreSQL already has wal_level=logical")
        status = inspect_database(conn, "nothing_here")
    assert not status.ok
    assert "ALTER SYSTEM SET wal_level = 'logical'" in status.problems[0].fix
