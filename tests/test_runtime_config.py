"""Runtime configuration: add, remove and replace options of a running app.

Concern: ``app.config.add/remove/replace/get`` and the module-level
``add_config/remove_config/replace_config/get_config`` addressing an app by
name. Subscription and module changes apply from the next transaction,
without a restart (one session, one slot) and without losing or repeating an
event of what stays subscribed, even while changes are committed
concurrently; a replaced password is used at the next reconnect; the handler
options apply at once; an invalid change raises ``ConfigError`` and changes
nothing; an added subscription is checked as ``start()`` checks it (a
``SetupError``, from any thread, and the old subscriptions stay).
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from support import Recorder, collecting, run, until

from walex import ConfigError, Event, Events, SetupError
from walex.configs import add_config, get_config, remove_config, replace_config

SCHEMA = """
CREATE TABLE item (id int PRIMARY KEY);
CREATE TABLE note (id int PRIMARY KEY);
CREATE PUBLICATION pub FOR TABLE item, note;
"""


def names(events: list[Event]) -> list[str]:
    return [f"{e.name}{e.new_record['id']}" for e in events]


def slots(admin: psycopg.Connection) -> list[tuple[str, bool]]:
    return admin.execute("SELECT slot_name, active FROM pg_replication_slots "
                         "WHERE database = current_database()").fetchall()


def test_subscriptions_added_and_removed_while_running(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(SCHEMA)

    async def main() -> None:
        async with collecting(dsn, subscriptions=["item"]) as rec:
            app = rec.app
            assert app is not None
            slot = slots(admin)
            admin.execute("INSERT INTO note VALUES (1)")
            admin.execute("INSERT INTO item VALUES (1)")
            await rec.wait_for(1)
            app.config.add("subscriptions", ["note"])
            assert app.config.get("subscriptions") == ["item", "note"]
            admin.execute("INSERT INTO note VALUES (2)")
            admin.execute("INSERT INTO item VALUES (2); INSERT INTO note VALUES (3)")
            await rec.wait_for(4)
            app.config.remove("subscriptions", "note")
            assert app.config.get("subscriptions") == ["item"]
            admin.execute("INSERT INTO note VALUES (4)")
            admin.execute("INSERT INTO item VALUES (3)")
            await rec.wait_for(5)
            await rec.settle()
            assert names(rec.events) == ["item1", "note2", "item2", "note3", "item3"]
            assert (app.pipeline.sessions, slots(admin)) == (1, slot)  # no restart

    run(main())


def write_module(tmp_path: Path, source: str) -> str:
    """A module of a unique name in ``tmp_path`` (on sys.path); returns its name."""
    name = f"wxrt_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{name}.py").write_text(source)
    importlib.invalidate_caches()
    return name


HANDLERS = """
from walex import Events
CALLS = []
events = Events()
@events.on_insert("all")
def record(items):
    CALLS.append([f"{e.name}{e.new_record['id']}" for e in items])
"""


def test_modules_added_and_removed_while_running(admin: psycopg.Connection, dsn: str,
                                                 on_path: Path) -> None:
    admin.execute(SCHEMA)
    module = write_module(on_path, HANDLERS)
    rec, first, second = Recorder(), Events(), Events()
    first.on_insert("item")(rec.handler("first"))
    second.on_insert("item")(rec.handler("second"))

    async def main() -> None:
        async with collecting(dsn, modules=[first], recorder=rec) as rec_:
            app = rec_.app
            assert app is not None
            admin.execute("INSERT INTO item VALUES (1)")
            await rec.wait_for(1)
            app.config.add("modules", [second, f"{module}:events"])
            admin.execute("INSERT INTO item VALUES (2)")
            await rec.wait_for(2)
            app.config.remove("modules", first)
            app.config.remove("modules", f"{module}:events")
            admin.execute("INSERT INTO item VALUES (3)")
            await rec.wait_for(3)
            await until(lambda: app.transactions_handled == 3, "3 transactions")
            assert app.pipeline.sessions == 1

    run(main())
    assert [names(c) for c in rec.calls_of("first")] == [["item1"], ["item2"]]
    assert [names(c) for c in rec.calls_of("second")] == [["item2"], ["item3"]]
    assert sys.modules[module].CALLS == [["item2"]]


def test_added_subscription_finds_its_module_by_convention(admin: psycopg.Connection, dsn: str,
                                                           on_path: Path) -> None:
    admin.execute(SCHEMA)
    package = f"wxrt_{uuid.uuid4().hex[:10]}"
    (on_path / package / "events").mkdir(parents=True)
    (on_path / package / "__init__.py").write_text("")
    (on_path / package / "events" / "__init__.py").write_text("")
    (on_path / package / "events" / "note.py").write_text(HANDLERS)
    importlib.invalidate_caches()

    async def main() -> None:
        async with collecting(dsn, subscriptions=["item"], name=package) as rec:
            assert rec.app is not None
            assert f"{package}.events.note" not in sys.modules
            add_config(package, "subscriptions", "note")  # by the app's name
            assert get_config(package, "subscriptions") == ["item", "note"]
            admin.execute("INSERT INTO note VALUES (1); INSERT INTO item VALUES (1)")
            await rec.wait_for(2)
            await until(lambda: rec.app.transactions_handled == 1, "the transaction")  # type: ignore[union-attr]

    run(main())
    assert sys.modules[f"{package}.events.note"].CALLS == [["note1", "item1"]]


def test_no_event_lost_while_changing_configuration(admin: psycopg.Connection, dsn: str) -> None:
    """Rows committed one per transaction while subscriptions and modules change under way."""
    admin.execute(SCHEMA)
    rows = 300
    extra = Events()
    extra.on_insert("note")(lambda items: None)
    progress = {"written": 0}

    def writer() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for i in range(1, rows + 1):
                conn.execute("INSERT INTO item VALUES (%s)", (i,))
                conn.execute("INSERT INTO note VALUES (%s)", (i,))
                progress["written"] = i
                time.sleep(0.002)

    async def main() -> list[Event]:
        async with collecting(dsn, subscriptions=["item"]) as rec:
            app = rec.app
            assert app is not None
            thread = threading.Thread(target=writer)
            thread.start()
            try:
                changes = 0
                while progress["written"] < rows and changes < 200:
                    app.config.add("subscriptions", ["note"])
                    app.config.add("modules", [extra])
                    await asyncio.sleep(0.003)
                    app.config.remove("subscriptions", "note")
                    app.config.remove("modules", extra)
                    await asyncio.sleep(0.003)
                    changes += 1
                assert changes >= 20, f"only {changes} changes were made while writing"
            finally:
                await asyncio.to_thread(thread.join, 30)
            admin.execute("INSERT INTO item VALUES (0)")  # the end marker
            await until(lambda: bool(rec.events) and rec.events[-1].new_record["id"] == 0,
                        "the end marker")
            assert app.pipeline.sessions == 1
            return list(rec.events)

    received = run(main())
    items = [e.new_record["id"] for e in received if e.name == "item"]
    assert items == [*range(1, rows + 1), 0]  # each once, in order
    notes = [e.new_record["id"] for e in received if e.name == "note"]
    assert notes == sorted(set(notes)) and 0 < len(notes) < rows  # subscribed at times
    assert [e.id for e in received] == sorted({e.id for e in received})


@pytest.fixture
def password_role(pg_cluster: object, admin: psycopg.Connection) -> Iterator[str]:
    """A role that must log in with a password (pg_hba.conf: scram-sha-256), 'old' for now."""
    cluster = getattr(pg_cluster, "cluster", None)
    if cluster is None:
        pytest.skip("needs a throwaway cluster to edit its pg_hba.conf")
    role = f"walex_pw_{uuid.uuid4().hex[:8]}"
    hba = cluster.datadir / "pg_hba.conf"
    original = hba.read_text()
    rules = "".join(f"host {db} {role} 127.0.0.1/32 scram-sha-256\n" for db in ("all", "replication"))
    admin.execute(sql.SQL("CREATE ROLE {} LOGIN REPLICATION PASSWORD 'old'").format(
        sql.Identifier(role)))
    hba.write_text(rules + original)
    admin.execute("SELECT pg_reload_conf()")
    params = conninfo_to_dict(admin.info.dsn)
    deadline = time.monotonic() + 10
    while True:  # until the postmaster applied the new rules
        try:
            psycopg.connect(host="127.0.0.1", port=params["port"], dbname=params["dbname"],
                            user=role, password="", connect_timeout=5).close()
        except psycopg.OperationalError as exc:
            if "password" in str(exc):
                break
        assert time.monotonic() < deadline, "pg_hba.conf was not reloaded"
        time.sleep(0.05)
    try:
        yield role
    finally:
        hba.write_text(original)
        admin.execute("SELECT pg_reload_conf()")
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                      (role,))
        for _ in range(100):
            try:
                admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
                break
            except psycopg.errors.ObjectInUse:
                time.sleep(0.05)


def test_replaced_password_is_used_at_the_next_reconnect(admin: psycopg.Connection, dsn: str,
                                                         password_role: str) -> None:
    admin.execute(SCHEMA)

    async def main() -> None:
        async with collecting(dsn, subscriptions=["item"], username=password_role,
                              password="old", durable_slot=True, slot_name="pw_change",
                              reconnect_max_attempts=3) as rec:
            app = rec.app
            assert app is not None
            admin.execute("INSERT INTO item VALUES (1)")
            await rec.wait_for(1)
            admin.execute(sql.SQL("ALTER ROLE {} PASSWORD 'new'").format(
                sql.Identifier(password_role)))
            app.config.replace("password", "new")
            assert "new" not in repr(app.config.get("password"))
            assert app.pipeline.sessions == 1  # no reconnect needed to take it
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE usename = %s", (password_role,))
            admin.execute("INSERT INTO item VALUES (2)")
            await rec.wait_for(2)
            assert (app.pipeline.sessions, app.gaps) == (2, [])
            users = admin.execute("SELECT DISTINCT usename FROM pg_stat_activity "
                                  "WHERE usename = %s", (password_role,)).fetchall()
            assert users == [(password_role,)]
        assert names(rec.events) == ["item1", "item2"]

    run(main())


def test_functions_by_app_name(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(SCHEMA)

    async def main() -> None:
        async with collecting(dsn, subscriptions=["item"], name="rt_by_name") as rec:
            add_config("rt_by_name", "subscriptions", ["note"])
            replace_config("rt_by_name", "max_retries", 7)
            assert (get_config("rt_by_name", "max_retries"), rec.app.dispatcher.max_retries) == (7, 7)  # type: ignore[union-attr]
            remove_config("rt_by_name", "subscriptions", "item")
            assert get_config("rt_by_name", "subscriptions") == ["note"]
            admin.execute("INSERT INTO item VALUES (1); INSERT INTO note VALUES (1)")
            await rec.wait_for(1)
            with pytest.raises(ConfigError, match=r"no walex app named 'other' is running "
                                                  r"\(running: \['rt_by_name'\]\)"):
                add_config("other", "subscriptions", ["note"])
        assert names(rec.events) == ["note1"]
        with pytest.raises(ConfigError, match="no walex app named 'rt_by_name' is running"):
            get_config("rt_by_name", "subscriptions")

    run(main())


def test_invalid_changes_raise_and_change_nothing(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(SCHEMA)
    changes: list[tuple[str, str, object, str]] = [
        ("add", "subscriptions", ["a.b.c"], "'a.b.c' is not a table name"),
        ("replace", "port", "x", "port: Input should be a valid integer"),
        ("remove", "subscriptions", "nope", "'nope' is not in subscriptions (['item'])"),
        ("remove", "subscriptions", "item", "at least one table is needed"),
        ("add", "password", "x", "password is not a list option; use replace()"),
        ("replace", "bogus", 1, "unknown configuration key 'bogus'"),
        ("add", "modules", [42], "modules must hold walex.Events objects or import strings"),
        ("add", "modules", ["no_such_module_xyz"], "cannot import 'no_such_module_xyz'"),
        ("replace", "on_error", "retry", "on_error: must be 'stop', 'skip' or a dead-letter"),
        *[("replace", key, value, f"{key} cannot change while the app exists")
          for key, value in [("name", "x"), ("slot_name", "x"), ("publication", "p2"),
                             ("durable_slot", True), ("streaming", True),
                             # accepted and shown, never used: the queue was made with the app
                             ("max_pending_bytes", "1MiB"), ("max_pending_transactions", 3),
                             ("batch_size", 7), ("status_interval", 1.5)]],
        *[("replace", key, value, f"{key} cannot change while the app runs")
          for key, value in [("metrics_port", 0), ("tracing", True), ("gc_threshold", 5000)]],
    ]

    async def main() -> None:
        async with collecting(dsn, subscriptions=["item"]) as rec:
            app = rec.app
            assert app is not None
            settings, modules = app.settings, list(app.modules)
            for method, key, value, message in changes:
                with pytest.raises(ConfigError) as info:
                    getattr(app.config, method)(key, value)
                assert message in str(info.value), (method, key, str(info.value))
                assert app.settings is settings and app.modules == modules
                assert app.dispatcher.handlers == [h for m in modules for h in m.handlers]
            admin.execute("INSERT INTO note VALUES (1); INSERT INTO item VALUES (1)")
            await rec.wait_for(1)
        assert names(rec.events) == ["item1"]

    run(main())


def test_handler_options_apply_at_once(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(SCHEMA)
    events, attempts = Events(), itertools.count(1)

    @events.on_insert("item")
    def fails_on_first(items: list[Event]) -> None:
        next(attempts)
        if items[0].new_record["id"] == 1:
            raise RuntimeError("first")

    async def main() -> None:
        async with collecting(dsn, modules=[events], max_retries=0) as rec:
            app = rec.app
            assert app is not None and app.dispatcher.on_error == "stop"
            app.config.replace("on_error", "skip")
            app.config.replace("max_retries", 2)
            app.config.replace("retry_backoff", 0.01)
            admin.execute("INSERT INTO item VALUES (1)")
            admin.execute("INSERT INTO item VALUES (2)")
            await rec.wait_for(2)
            await until(lambda: app.transactions_handled == 2, "2 transactions")
            assert (app.dispatcher.failures, app.dispatcher.retries) == (1, 2)

    run(main())
    assert next(attempts) == 5  # 3 tries of the first, 1 of the second


def test_added_subscription_is_checked_as_at_start(admin: psycopg.Connection, dsn: str) -> None:
    """The start check, run by add(): it raises, and the old subscriptions stay in force."""
    admin.execute("CREATE TABLE published (id int PRIMARY KEY)")
    admin.execute("CREATE TABLE hidden (id int PRIMARY KEY)")
    admin.execute("CREATE TABLE later (id int PRIMARY KEY)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE published")

    async def start_error(subscriptions: list[str]) -> str:
        with pytest.raises(SetupError) as info:
            async with collecting(dsn, subscriptions=subscriptions):
                pass
        return str(info.value)

    async def main() -> None:
        at_start = [await start_error(["published", spec]) for spec in ("hidden", "missing")]
        async with collecting(dsn, subscriptions=["published"]) as rec:
            app = rec.app
            assert app is not None
            for spec, expected in zip(("hidden", "missing"), at_start):
                with pytest.raises(SetupError) as info:
                    app.config.add("subscriptions", [spec])
                assert str(info.value) == expected
                assert app.config.get("subscriptions") == ["published"]
            with pytest.raises(SetupError, match="'later' is not in publication 'pub'"):
                await asyncio.to_thread(add_config, app.settings.name, "subscriptions", "later")
            admin.execute("ALTER PUBLICATION pub ADD TABLE later")
            await asyncio.to_thread(add_config, app.settings.name, "subscriptions", "later")
            admin.execute("INSERT INTO hidden VALUES (1); INSERT INTO later VALUES (1); "
                          "INSERT INTO published VALUES (1)")
            await rec.wait_for(2)
            assert app.pipeline.sessions == 1
        assert names(rec.events) == ["later1", "published1"]
        assert 'ALTER PUBLICATION "pub" ADD TABLE "public"."hidden"' in at_start[0]
        assert "'missing' does not exist" in at_start[1]

    run(main())
