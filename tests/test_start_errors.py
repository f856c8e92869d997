"""``WalEx.start()`` refuses a setup that cannot work, saying what is wrong and the fix.

After every failed start no replication slot and no connection is left behind.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from support import collecting, run

import walex
from walex import ConfigError, SetupError, WalEx

if TYPE_CHECKING:
    from conftest import PgServer

SECRET = "s3cret-Pa55word-xyzzy"
WRONG = "wr0ng-Pa55word-plugh"


def start_error(dsn: str | None = None, **options: Any) -> tuple[WalEx, BaseException]:
    """Start an app that must fail; return it and the error."""
    options.setdefault("publication", "pub")
    app = WalEx(dsn, **options)

    async def main() -> BaseException:
        try:
            await asyncio.wait_for(app.start(), 20)
        except Exception as exc:
            return exc
        await app.stop()
        raise AssertionError("start() succeeded")

    return app, asyncio.run(main())


def assert_nothing_left(admin: psycopg.Connection) -> None:
    """No slot, and no other connection to the test's database.

    A closed connection's backend (and its temporary slot) goes away shortly
    after the client closed it: allow a few seconds.
    """
    for _ in range(50):
        slots = admin.execute("SELECT slot_name FROM pg_replication_slots").fetchall()
        others = admin.execute(
            "SELECT pid, backend_type, state, query FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
        if not slots and not others:
            return
        time.sleep(0.1)
    raise AssertionError(f"left behind: slots {slots}, connections {others}")


def test_no_such_publication(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute("CREATE TABLE t (id int PRIMARY KEY)")
    _, exc = start_error(dsn, publication="nope", subscriptions=["t"])
    assert isinstance(exc, SetupError)
    message = str(exc)
    assert "publication 'nope' does not exist" in message
    assert admin.info.dbname in message
    assert 'CREATE PUBLICATION "nope"' in message
    assert_nothing_left(admin)


def test_subscribed_table_does_not_exist(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute("CREATE TABLE t (id int PRIMARY KEY); CREATE PUBLICATION pub FOR ALL TABLES")
    _, exc = start_error(dsn, subscriptions=["t", "missing"])
    assert isinstance(exc, SetupError)
    assert "'missing' does not exist" in str(exc) and "Fix" in str(exc)
    _, exc = start_error(dsn, subscriptions=["other.t"])  # exists, but not in that schema
    assert isinstance(exc, SetupError) and "'other.t' does not exist" in str(exc)
    assert_nothing_left(admin)


def test_quoted_subscription_says_names_are_unquoted(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute('CREATE TABLE "User" (id int PRIMARY KEY); CREATE PUBLICATION pub FOR ALL TABLES')
    for spec, plain in (('"User"', "User"), ('public."User"', "public.User")):
        _, exc = start_error(dsn, subscriptions=[spec])
        assert isinstance(exc, SetupError)
        assert (f"Names are written unquoted, as PostgreSQL stores them (case matters): "
                f"{plain!r}, not {spec!r}.") in str(exc)

    async def main() -> None:  # the suggestion works
        async with WalEx(dsn, publication="pub", subscriptions=["User", "public.User"]):
            pass

    asyncio.run(main())
    assert_nothing_left(admin)


def test_subscribed_table_not_in_publication(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute("""
        CREATE TABLE t (id int PRIMARY KEY);
        CREATE TABLE "Other" (id int PRIMARY KEY);
        CREATE PUBLICATION pub FOR TABLE t;
    """)
    _, exc = start_error(dsn, subscriptions=["t", "Other"])
    assert isinstance(exc, SetupError)
    message = str(exc)
    assert "'Other' is not in publication 'pub'" in message
    assert 'ALTER PUBLICATION "pub" ADD TABLE "public"."Other";' in message
    # the suggested fix works
    admin.execute('ALTER PUBLICATION "pub" ADD TABLE "public"."Other"')

    async def main() -> None:
        async with WalEx(dsn, publication="pub", subscriptions=["t", "Other"]):
            pass

    asyncio.run(main())
    assert_nothing_left(admin)


def test_partitioned_table_published_under_other_names(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute("""
        CREATE TABLE m (id int, k int) PARTITION BY RANGE (k);
        CREATE TABLE m1 PARTITION OF m FOR VALUES FROM (0) TO (10);
        CREATE TABLE m2 PARTITION OF m FOR VALUES FROM (10) TO (20);
        CREATE PUBLICATION pub FOR TABLE m;
    """)
    # the partitioned table is in the publication, but its changes come as m1 / m2:
    # "ALTER PUBLICATION ... ADD TABLE m" would be a wrong fix (it is already there)
    _, exc = start_error(dsn, subscriptions=["m"])
    assert isinstance(exc, SetupError)
    message = str(exc)
    assert "'m' is partitioned" in message and "public.m1, public.m2" in message
    assert 'ALTER PUBLICATION "pub" SET (publish_via_partition_root = true);' in message
    assert "ADD TABLE" not in message
    admin.execute('ALTER PUBLICATION "pub" SET (publish_via_partition_root = true)')

    # now the partitions' changes come as those of m
    _, exc = start_error(dsn, subscriptions=["m1"])
    assert isinstance(exc, SetupError)
    message = str(exc)
    assert "'m1' is a partition" in message and "'public.m'" in message
    assert "ADD TABLE" not in message

    async def main() -> list[str]:
        async with collecting(dsn, subscriptions=["m"]) as rec:
            admin.execute("INSERT INTO m VALUES (1, 1), (2, 15)")
            return [e.name for e in await rec.wait_for(2)]

    assert run(main()) == ["m", "m"]
    assert_nothing_left(admin)


def test_role_without_replication(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute("CREATE PUBLICATION pub FOR ALL TABLES")
    admin.execute("DROP ROLE IF EXISTS walex_plain; CREATE ROLE walex_plain LOGIN")
    try:
        _, exc = start_error(dsn, username="walex_plain")
        assert isinstance(exc, SetupError)
        assert "'walex_plain' may not start replication" in str(exc)
        assert 'ALTER ROLE "walex_plain" REPLICATION' in str(exc)
        assert_nothing_left(admin)
    finally:
        admin.execute("DROP ROLE walex_plain")


@pytest.mark.parametrize("how", ["username", "database"])
def test_nonexistent_role_or_database(
    admin: psycopg.Connection, dsn: str, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    admin.execute("CREATE PUBLICATION pub FOR ALL TABLES")
    caplog.set_level(logging.DEBUG)
    option = {"username": "walex_nobody"} if how == "username" else {"database": "walex_no_db"}
    url = make_conninfo(dsn, password=SECRET)
    app, exc = start_error(url, **option)
    assert isinstance(exc, SetupError)
    message = str(exc)
    assert message.startswith("cannot connect to ")
    assert "walex_nobody" in message or "walex_no_db" in message
    for text in (message, repr(app), repr(exc), caplog.text):
        assert SECRET not in text
    assert_nothing_left(admin)


# -- password authentication ------------------------------------------------


@pytest.fixture
def password_role(pg_cluster: PgServer, admin: psycopg.Connection) -> Iterator[str]:
    """A REPLICATION role that must log in with password SECRET (scram-sha-256).

    The throwaway clusters trust every local connection: a line for this role
    is put first in pg_hba.conf (the tests run as root or as the server's
    user, so the file is writable), and removed afterwards.
    """
    if pg_cluster.cluster is None:
        pytest.skip("external server: pg_hba.conf is not ours to change")
    hba = Path(pg_cluster.cluster.datadir, "pg_hba.conf")
    original = hba.read_text()
    role = "walex_pw"
    admin.execute("SET password_encryption = 'scram-sha-256'")
    admin.execute(f"DROP ROLE IF EXISTS {role}")
    admin.execute(f"CREATE ROLE {role} LOGIN REPLICATION PASSWORD '{SECRET}'")
    admin.execute("CREATE PUBLICATION pub FOR ALL TABLES")
    lines = [f"host all {role} 127.0.0.1/32 scram-sha-256",
             f"host replication {role} 127.0.0.1/32 scram-sha-256"]
    hba.write_text("\n".join(lines) + "\n" + original)
    admin.execute("SELECT pg_reload_conf()")
    try:
        yield role
    finally:
        hba.write_text(original)
        admin.execute("SELECT pg_reload_conf()")
        admin.execute(f"DROP ROLE IF EXISTS {role}")


def test_bad_password(
    password_role: str, admin: psycopg.Connection, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(make_conninfo(dsn, user=password_role, password=WRONG)).close()

    url = make_conninfo(dsn, user=password_role, password=WRONG)
    variants: list[tuple[str | None, dict[str, Any]]] = [
        (url, {}),  # password in the URL
        (dsn, {"username": password_role, "password": WRONG}),  # as options
    ]
    for target, options in variants:
        app, exc = start_error(target, **options)
        assert isinstance(exc, SetupError), exc
        message = str(exc)
        assert "cannot connect to" in message
        assert "password authentication failed" in message and password_role in message
        for text in (message, repr(app), repr(exc), str(app.settings), caplog.text):
            assert WRONG not in text
    assert_nothing_left(admin)

    # the right password works: the role line really is in force
    async def main() -> None:
        async with WalEx(dsn, publication="pub", username=password_role, password=SECRET) as app:
            assert SECRET not in repr(app)

    asyncio.run(main())
    assert SECRET not in caplog.text


# -- wal_level ----------------------------------------------------------------

SYSTEM_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def _system_server() -> str:
    """The machine's own PostgreSQL (wal_level=replica), or skip."""
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            pass
        with psycopg.connect(SYSTEM_DSN, connect_timeout=3) as conn:
            level = conn.execute("SHOW wal_level").fetchone()
    except (OSError, psycopg.Error) as exc:
        pytest.skip(f"no PostgreSQL at {SYSTEM_DSN}: {exc}")
    if level != ("replica",):
        pytest.skip(f"{SYSTEM_DSN} has wal_level {level}, not 'replica'")
    return SYSTEM_DSN


def test_wal_level_replica() -> None:
    """Read-only use of the system server: start() fails before creating anything."""
    dsn = _system_server()
    with psycopg.connect(dsn) as conn:
        slots_before = conn.execute("SELECT count(*) FROM pg_replication_slots").fetchone()
    _, exc = start_error(dsn, publication="whatever")
    assert isinstance(exc, SetupError)
    message = str(exc)
    assert "wal_level is 'replica'" in message
    assert "ALTER SYSTEM SET wal_level = 'logical'" in message and "restart" in message
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM pg_replication_slots").fetchone() == slots_before


# -- configuration ------------------------------------------------------------


def test_every_config_problem_in_one_error() -> None:
    with pytest.raises(ConfigError) as info:
        walex.WalEx(publication="pub", port="abc", unknown_key=1)
    message = str(info.value)
    assert "2 problems" in message
    assert "port" in message and "unknown_key" in message

    with pytest.raises(ConfigError) as info:
        walex.WalEx(port="abc", unknown_key=1, password=SECRET)  # and no publication
    message = str(info.value)
    assert "3 problems" in message
    assert "publication" in message and "port" in message and "unknown_key" in message
    assert SECRET not in message


def test_config_error_never_shows_the_password() -> None:
    url = f"postgresql://someone:{SECRET}@localhost:5432/db"
    with pytest.raises(ConfigError) as info:
        walex.WalEx(url, publication="", port=0)
    assert SECRET not in str(info.value)
    app = walex.WalEx(url, publication="pub")
    assert SECRET not in repr(app) and SECRET not in str(app.settings)
    assert conninfo_to_dict(app.settings.conninfo())["password"] == SECRET
