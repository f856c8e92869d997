"""Configuration: sources and precedence, validation in one error, redaction, names, TLS.

Concern: :mod:`walex.config` as a user meets it through ``WalEx(...)``,
``WALEX_*`` variables and a TOML file: keyword arguments win over the
environment, which wins over the file; explicit connection keys win over the
parts of ``url``; every problem is reported at once; the password shows
nowhere; slot, publication and app names are validated (and a publication
name full of quotes streams, so it is quoted, not pasted); subscriptions take
``schema.table``; ``ssl=True`` means TLS with the certificate verified
(checked against a TLS-enabled throwaway server when a PostgreSQL build with
OpenSSL and the ``openssl`` command are available).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from support import collecting, run

from walex import ConfigError, Events, SetupError, WalEx
from walex.config import file_values, load_settings, read_toml
from walex.embedded import Cluster, ClusterError, embedded_bindir, system_bindirs

SECRET = "pw-Secret-4711"
# what walex adds to every connection unless the URL says otherwise
LIVENESS = {"keepalives": "1", "keepalives_idle": "10", "keepalives_interval": "5",
            "keepalives_count": "3", "tcp_user_timeout": "30000"}


def table_and_publication(admin: psycopg.Connection, publication: str = "pub") -> None:
    admin.execute("CREATE TABLE item (id int PRIMARY KEY)")
    admin.execute(psycopg.sql.SQL("CREATE PUBLICATION {} FOR TABLE item").format(
        psycopg.sql.Identifier(publication)))


def inserts() -> tuple[Events, list[int]]:
    """A handler module recording the ids inserted into ``item``, and that record."""
    got: list[int] = []
    events = Events()
    events.on_insert("item")(lambda items: got.extend(e.new_record["id"] for e in items))
    return events, got


async def stream_one(app: WalEx, admin: psycopg.Connection, got: list[int],
                     row: int = 1) -> tuple[list[int], list[tuple[bool]]]:
    """Start ``app``, insert ``row``; the ids received, and whether its walsender uses TLS."""
    async with app:
        tls = admin.execute(
            "SELECT s.ssl FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid)").fetchall()
        admin.execute("INSERT INTO item VALUES (%s)", (row,))
        for _ in range(1500):
            if got:
                break
            await asyncio.sleep(0.01)
    return list(got), tls


# -- sources and precedence ---------------------------------------------------------------

def test_keyword_options() -> None:
    events, middleware = Events(), lambda message, app: None
    s = load_settings(
        hostname="db.example", username="app", password=SECRET, port=6543, database="appdb",
        publication="events", subscriptions=["user", "public.todo"],
        modules=[events, "my_app.custom.user"], name="my_app", durable_slot=True,
        slot_name="my_slot", message_middleware=middleware, ssl=True, sslrootcert="/ca.pem",
    )
    assert (s.hostname, s.username, s.port, s.database, s.publication) == (
        "db.example", "app", 6543, "appdb", "events")
    assert (s.subscriptions, s.modules, s.name) == (
        ["user", "public.todo"], [events, "my_app.custom.user"], "my_app")
    assert (s.durable_slot, s.slot_name, s.message_middleware) == (True, "my_slot", middleware)
    assert conninfo_to_dict(s.conninfo()) == {
        "host": "db.example", "port": "6543", "user": "app", "password": SECRET,
        "dbname": "appdb", "sslmode": "verify-full", "sslrootcert": "/ca.pem",
        "connect_timeout": "10",  # walex's default: libpq would wait forever
        **LIVENESS,  # and a silent network is noticed
        "client_encoding": "UTF8",  # text as str, whatever the database's encoding
    }


def test_explicit_keys_win_over_the_url() -> None:
    url = f"postgresql://u:{SECRET}@h1:1/db1?sslmode=require&application_name=x"
    assert conninfo_to_dict(load_settings(url=url, publication="p").conninfo()) == {
        "user": "u", "password": SECRET, "host": "h1", "port": "1", "dbname": "db1",
        "sslmode": "require", "application_name": "x", "connect_timeout": "10", **LIVENESS,
        "client_encoding": "UTF8",
    }
    s = load_settings(url=url, publication="p", hostname="h2", port=2, username="v",
                      password="other", database="db2", sslmode="verify-ca")
    assert conninfo_to_dict(s.conninfo()) == {
        "user": "v", "password": "other", "host": "h2", "port": "2", "dbname": "db2",
        "sslmode": "verify-ca", "application_name": "x", "connect_timeout": "10", **LIVENESS,
        "client_encoding": "UTF8",
    }
    assert s.display_target() == "v@h2:2/db2"
    given = load_settings(url="postgresql://h/db?connect_timeout=3&keepalives_idle=60", publication="p")
    assert conninfo_to_dict(given.conninfo())["connect_timeout"] == "3"
    assert conninfo_to_dict(given.conninfo())["keepalives_idle"] == "60"  # the URL's wins


def test_explicit_database_and_port_win_on_a_real_server(admin: psycopg.Connection, dsn: str) -> None:
    table_and_publication(admin)
    params = conninfo_to_dict(dsn)
    wrong = make_conninfo(dsn, dbname="no_such_db_xyz", port="1")
    events, got = inserts()
    app = WalEx(wrong, database=params["dbname"], port=int(params["port"]), publication="pub",
                modules=[events])
    assert run(stream_one(app, admin, got)) == ([1], [(False,)])

    bad = WalEx(dsn, database="no_such_db_xyz", publication="pub")
    with pytest.raises(SetupError, match='database "no_such_db_xyz" does not exist'):
        run(bad.start())


def test_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {
        "PUBLICATION": "events", "SUBSCRIPTIONS": "user, public.todo", "DURABLE_SLOT": "true",
        "PORT": "6543", "PASSWORD": SECRET, "NAME": "env_app", "MODULES": "a.b:c, d.e",
        "SSL": "false", "SLOT_NAME": "env_slot",
    }.items():
        monkeypatch.setenv(f"WALEX_{key}", value)
    s = load_settings()
    assert (s.publication, s.subscriptions, s.durable_slot, s.port, s.name, s.modules) == (
        "events", ["user", "public.todo"], True, 6543, "env_app", ["a.b:c", "d.e"])
    assert (s.slot_name, s.effective_sslmode(), s.secret()) == ("env_slot", "disable", SECRET)
    s = load_settings(port=7, publication="kw", subscriptions=["x"])  # keywords win
    assert (s.port, s.publication, s.subscriptions, s.name) == (7, "kw", ["x"], "env_app")
    monkeypatch.setenv("WALEX_PORT", "not-a-port")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value) == (
        "invalid walex configuration (1 problem):\n"
        "  - port: Input should be a valid integer, unable to parse string as an integer"
    )


def test_environment_variable_names_in_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lower- and mixed-case names count as ``WALEX_*`` (the settings look at the environment
    only when such a name is set), and settings built before one was set do not hide it."""
    for name in [n for n in os.environ if n.lower().startswith("walex_")]:
        monkeypatch.delenv(name)
    assert load_settings(publication="p").name == "walex"
    monkeypatch.setenv("walex_name", "lower_app")
    assert load_settings(publication="p").name == "lower_app"
    monkeypatch.delenv("walex_name")
    monkeypatch.setenv("Walex_Port", "6543")
    assert load_settings(publication="p").port == 6543


@pytest.mark.parametrize(("value", "expected"), [
    ('["user","todo"]', ["user", "todo"]),
    ('[ "user", "public.todo" ]', ["user", "public.todo"]),
    ("user, todo", ["user", "todo"]),
    ('["a,b"]', ["a,b"]),  # JSON keeps a comma of a name
])
def test_list_variables_take_json_or_commas(monkeypatch: pytest.MonkeyPatch, value: str,
                                            expected: list[str]) -> None:
    monkeypatch.setenv("WALEX_SUBSCRIPTIONS", value)
    monkeypatch.setenv("WALEX_MODULES", value)
    s = load_settings(publication="p")
    assert s.subscriptions == expected and s.modules == expected


@pytest.mark.parametrize("value", ['["user",', '["user", 1]', '[["user"]]'])
def test_list_variable_in_broken_json(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("WALEX_SUBSCRIPTIONS", value)
    with pytest.raises(ConfigError) as info:
        load_settings(publication="p")
    [problem] = str(info.value).splitlines()[1:]
    assert problem.startswith("  - subscriptions: ") and 'JSON list of strings' in problem


def test_environment_configures_a_running_app(admin: psycopg.Connection, dsn: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    table_and_publication(admin)
    monkeypatch.setenv("WALEX_URL", dsn)
    monkeypatch.setenv("WALEX_PUBLICATION", "pub")
    monkeypatch.setenv("WALEX_SUBSCRIPTIONS", "public.item")
    events, got = inserts()
    app = WalEx(name="from_env", modules=[events])
    assert app.settings.subscriptions == ["public.item"]
    assert run(stream_one(app, admin, got, 7)) == ([7], [(False,)])


def test_toml_file_below_environment_and_keywords(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "walex.toml"
    path.write_text(f"""
url = "postgresql://u:{SECRET}@h/db"
publication = "events"
subscriptions = ["user", "public.todo"]
modules = ["my_app.custom.user"]
port = 5000
durable_slot = true
name = "from_file"
""")
    values = read_toml(path)
    with file_values(values):
        s = load_settings()
        assert (s.publication, s.subscriptions, s.modules, s.port, s.durable_slot, s.name) == (
            "events", ["user", "public.todo"], ["my_app.custom.user"], 5000, True, "from_file")
        monkeypatch.setenv("WALEX_PORT", "5001")
        monkeypatch.setenv("WALEX_NAME", "from_env")
        s = load_settings(name="from_keyword")
        assert (s.port, s.name, s.secret()) == (5001, "from_keyword", SECRET)
    assert load_settings(publication="p").port == 5001  # the file applies only inside


def test_toml_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"configuration file '.*nope\.toml' does not exist"):
        read_toml(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text('publication = "p"\nport = \n')
    with pytest.raises(ConfigError) as info:
        read_toml(bad)
    assert str(info.value) == (
        f"configuration file {str(bad)!r} is not valid TOML: Invalid value (at line 2, column 8)"
    )
    wrong = tmp_path / "wrong.toml"
    wrong.write_text(f'publication = "p"\nport = "x"\npasword = "{SECRET}"\n')
    with file_values(read_toml(wrong)), pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value) == (
        "invalid walex configuration (2 problems):\n"
        "  - port: Input should be a valid integer, unable to parse string as an integer\n"
        "  - pasword: Extra inputs are not permitted"
    )


# -- validation and redaction ---------------------------------------------------------------

def test_every_problem_in_one_error_without_the_password() -> None:
    with pytest.raises(ConfigError) as info:
        WalEx(hostnme="x", port="abc", durable_slot="maybe", subscriptions=["a.b.c", "*"],
              slot_name="Bad-Name", password=SECRET, url=f"postgresql://u:{SECRET}@h/db",
              on_error="retry", message_middleware=42, sslmode="bogus")
    message = str(info.value)
    assert message.startswith("invalid walex configuration (9 problems):\n")
    lines = message.splitlines()[1:]
    assert [line.split(":")[0] for line in lines] == [
        "  - port", "  - sslmode", "  - publication", "  - subscriptions", "  - durable_slot",
        "  - slot_name", "  - message_middleware", "  - on_error", "  - hostnme",
    ]
    assert "  - subscriptions: 'a.b.c' is not a table name, 'schema.table' or '*'" in lines
    assert ("  - slot_name: a replication slot name has 1-63 characters among lower-case "
            "letters, digits and underscores") in lines
    assert "  - publication: required: give publication=... or set WALEX_PUBLICATION" in lines
    assert "  - hostnme: Extra inputs are not permitted" in lines
    assert SECRET not in message


def test_password_shows_nowhere(admin: psycopg.Connection, dsn: str,
                                caplog: pytest.LogCaptureFixture) -> None:
    table_and_publication(admin)
    url = make_conninfo(dsn, password=SECRET)  # trust authentication ignores it
    events, got = inserts()
    app = WalEx(url, password=SECRET, publication="pub", name="secretive", modules=[events])
    assert SECRET in app.settings.conninfo()  # it is there, to be hidden
    for text in (repr(app), repr(app.settings), str(app.settings), app.settings.display_target(),
                 repr(app.config.get("password")), repr(app.config.get("url"))):
        assert SECRET not in text
    with caplog.at_level(logging.DEBUG):
        assert run(stream_one(app, admin, got)) == ([1], [(False,)])
        with pytest.raises(SetupError) as info:
            run(WalEx(url, password=SECRET, database="no_such_db", publication="pub").start())
    assert 'database "no_such_db" does not exist' in str(info.value)
    assert SECRET not in str(info.value)
    assert len(caplog.records) > 3
    assert not [r for r in caplog.records if SECRET in r.getMessage()]


def test_invalid_url_is_reported_redacted() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(url=f"mysql://u:{SECRET}@h/db", publication="p")
    assert str(info.value) == (
        "invalid walex configuration (1 problem):\n  - url: not a valid database url: "
        "it must start with postgresql://"
    )
    with pytest.raises(ConfigError, match="url: not a valid database url: its port is not a number"):
        load_settings(url=f"postgresql://u:{SECRET}@h:port/db", publication="p")


# (connection string, the words of its password): libpq quotes what it cannot parse,
# and a password with an unencoded '@' or '/' is parsed as host, port or database name
MALFORMED_URLS = [
    ("postgresql://app:50%offHush!@db.example/app", ["50%offHush!", "offHush"]),  # bad %-encoding
    ("postgresql://app:Hush%00Kumquat@db/app", ["Hush", "Kumquat"]),  # forbidden %00
    ("postgres://app:Hush Kumquat@db/app", ["Hush", "Kumquat"]),  # unencoded space
    ("postgresql://app:Hush@[::1/app", ["Hush"]),  # unterminated IPv6 address
    ("postgresql://app:Hush@db:x5432/app", ["Hush"]),  # bad port
    ("postgresql://app:5/Kumquat@db/app", ["Kumquat"]),  # '/' in the password: read as port
    ("postgresql://app:Hu@sh@db/app", ["Hu@sh", "sh@db"]),  # '@' in the password: read as host
    ("postgresql://app:Hush@db/app?Kumquat", ["Hush", "Kumquat"]),  # query key without value
    ("postgresql://db/app?password=Hush&Kumquat=1", ["Hush", "Kumquat"]),  # '&' in the password
    ("postgresql://app:Hush@db/app?nonsense=1", ["Hush"]),  # unknown option
    ("host=db password='Hush Kumquat", ["Hush", "Kumquat"]),  # unterminated quotes
    ("host=db password=Hush Kumquat", ["Hush", "Kumquat"]),  # unquoted space
    ("host=db password=Hush Kumquat=1", ["Hush", "Kumquat"]),  # read as an unknown option
]


@pytest.mark.parametrize(("url", "words"), MALFORMED_URLS)
def test_malformed_url_never_shows_its_password(url: str, words: list[str],
                                                caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        for build in (lambda: load_settings(url=url, publication="p"),
                      lambda: WalEx(url, publication="p"), lambda: WalEx(url=url, publication="p")):
            with pytest.raises(ConfigError) as info:
                build()
            message = str(info.value)
            assert message.startswith("invalid walex configuration (1 problem):\n  - url: "
                                      "not a valid database url: "), message
            for word in words:
                for text in (message, repr(info.value), caplog.text):
                    assert word not in text, (word, message)


@pytest.mark.parametrize("slot_name", ["Upper", "with-dash", "x" * 64, "", "a;drop", 'q"uote'])
def test_invalid_slot_names(slot_name: str) -> None:
    with pytest.raises(ConfigError, match="slot_name: a replication slot name has 1-63"):
        load_settings(publication="p", slot_name=slot_name)


@pytest.mark.parametrize(("name", "valid"), [
    ("my_app", True), ("my-app.v2", True), ("App1", True),
    ("café", False), ("", False), ("a b", False), ("-x", False), ("x" * 64, False),
])
def test_app_names(name: str, valid: bool) -> None:
    if valid:
        assert load_settings(publication="p", name=name).name == name
    else:
        with pytest.raises(ConfigError, match="name: an app name has 1-63 characters"):
            load_settings(publication="p", name=name)


@pytest.mark.parametrize(("subscriptions", "problem"), [
    (["a.b.c"], "'a.b.c' is not a table name, 'schema.table' or '*'"),
    ([""], "'' is not a table name, 'schema.table' or '*'"),
    ([], "at least one table is needed; use '*' for every published table"),
    ("", "at least one table is needed; use '*' for every published table"),
])
def test_invalid_subscriptions(subscriptions: Any, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(publication="p", subscriptions=subscriptions)
    assert str(info.value).splitlines()[1] == f"  - subscriptions: {problem}"


def test_publication_name_is_quoted_not_pasted(admin: psycopg.Connection, dsn: str) -> None:
    name = """Pub "x", 'y'; DROP TABLE item; --"""
    table_and_publication(admin, name)
    events, got = inserts()
    app = WalEx(dsn, publication=name, subscriptions=["item"], modules=[events])
    assert run(stream_one(app, admin, got)) == ([1], [(False,)])
    assert admin.execute("SELECT count(*) FROM item").fetchone() == (1,)
    with pytest.raises(ConfigError, match="publication: a publication name has at most 63 bytes"):
        load_settings(publication="é" * 32)


def test_durable_slot_names(admin: psycopg.Connection, dsn: str) -> None:
    table_and_publication(admin)

    async def main() -> list[tuple[str, bool, bool]]:
        async with WalEx(dsn, publication="pub", durable_slot=True, slot_name="cfg_custom_slot"), \
                WalEx(dsn, publication="pub", durable_slot=True, name="Cfg-App"):
            return admin.execute(
                "SELECT slot_name, temporary, active FROM pg_replication_slots "
                "WHERE database = current_database() ORDER BY slot_name").fetchall()

    derived, custom = run(main())
    assert custom == ("cfg_custom_slot", False, True)
    # "Cfg-App" is no valid slot name: sanitised, plus a hash of the exact name so that
    # "cfg_app" or "CFG-APP" get slots of their own; stable across restarts
    assert derived[1:] == (False, True)
    assert derived[0] == WalEx(dsn, publication="pub", durable_slot=True, name="Cfg-App").slot_name
    assert derived[0].startswith("cfg_app_") and derived[0].endswith("_walex")


def test_subscriptions_accept_schema_and_table(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute("""CREATE SCHEMA other; CREATE TABLE item (id int PRIMARY KEY);
                     CREATE TABLE other.item (id int PRIMARY KEY);
                     CREATE PUBLICATION pub FOR TABLE item, other.item""")

    async def main(subscriptions: list[str], expected: int) -> list[str]:
        async with collecting(dsn, subscriptions=subscriptions) as rec:
            admin.execute("TRUNCATE item, other.item")
            admin.execute("INSERT INTO item VALUES (1); INSERT INTO other.item VALUES (2)")
            admin.execute("INSERT INTO other.item VALUES (3)")
            admin.execute("INSERT INTO item VALUES (4)")
            await rec.wait_for(expected)
            await rec.settle()
            return [f"{e.type.value}:{e.table}:{(e.new_record or {}).get('id')}" for e in rec.events]

    assert run(main(["other.item"], 3)) == [
        "truncate:other.item:None", "insert:other.item:2", "insert:other.item:3"]
    assert run(main(["public.item"], 3)) == [
        "truncate:public.item:None", "insert:public.item:1", "insert:public.item:4"]
    assert run(main(["item"], 6)) == [
        "truncate:public.item:None", "truncate:other.item:None", "insert:public.item:1",
        "insert:other.item:2", "insert:other.item:3", "insert:public.item:4"]
    with pytest.raises(SetupError, match="subscribed table 'nope.item' does not exist"):
        run(main(["nope.item"], 0))


# -- TLS ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("options", "sslmode", "rootcert"), [
    ({}, None, None),
    ({"ssl": True}, "verify-full", None),
    ({"ssl": True, "sslrootcert": "/ca.pem"}, "verify-full", "/ca.pem"),
    ({"sslrootcert": "/ca.pem"}, "verify-full", "/ca.pem"),
    ({"ssl": True, "sslmode": "verify-ca"}, "verify-ca", None),
    ({"ssl": True, "sslmode": "require"}, "require", None),
    ({"ssl": False}, "disable", None),
    ({"sslmode": "prefer"}, "prefer", None),
    ({"url": "postgresql://h/db?sslmode=require"}, "require", None),
    ({"url": "postgresql://h/db?sslmode=require", "ssl": True}, "require", None),
    ({"url": "postgresql://h/db?sslmode=disable", "ssl": True}, "verify-full", None),
    ({"url": "postgresql://h/db?sslmode=verify-ca", "sslrootcert": "/ca.pem"}, "verify-ca", "/ca.pem"),
])
def test_ssl_options_reach_the_conninfo(options: dict[str, Any], sslmode: str | None,
                                        rootcert: str | None) -> None:
    options.setdefault("url", "postgresql://h/db")
    params = conninfo_to_dict(WalEx(publication="p", **options).settings.conninfo())
    assert (params.get("sslmode"), params.get("sslrootcert")) == (sslmode, rootcert)


@pytest.mark.parametrize(("options", "problem"), [
    ({"ssl": True, "sslmode": "prefer"}, "ssl=True asks for TLS but sslmode='prefer' does not require it"),
    ({"ssl": True, "sslmode": "disable"}, "ssl=True asks for TLS but sslmode='disable'"),
    ({"ssl": False, "sslmode": "require"}, "ssl=False contradicts sslmode='require'"),
    ({"sslmode": "verify"}, "sslmode: must be one of disable, allow, prefer, require, verify-ca, verify-full"),
])
def test_contradictory_ssl_options(options: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem.replace("(", r"\(")):
        load_settings(publication="p", **options)


def test_ssl_true_refuses_a_server_without_tls(admin: psycopg.Connection, dsn: str) -> None:
    table_and_publication(admin)
    with pytest.raises(SetupError, match="server does not support SSL, but SSL was required"):
        run(WalEx(dsn, publication="pub", ssl=True).start())
    events, got = inserts()
    app = WalEx(dsn, publication="pub", ssl=False, modules=[events])
    assert run(stream_one(app, admin, got)) == ([1], [(False,)])


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _certificates(folder: Path) -> None:
    """ca.crt and other_ca.crt; server.crt/key signed by ca for IP 127.0.0.1 only."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "other_ca"):
        _openssl(folder, "req", "-x509", *ec, "-days", "2", "-subj", f"/CN=walex test {ca}",
                 "-keyout", f"{ca}.key", "-out", f"{ca}.crt",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    _openssl(folder, "req", *ec, "-subj", "/CN=walex test server", "-keyout", "server.key",
             "-out", "server.csr")
    (folder / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl(folder, "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-out", "server.crt", "-extfile", "san.cnf")


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Path]]:
    """A throwaway server with ssl=on, and the folder of its certificates."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    certs = tmp_path_factory.mktemp("certs")
    _certificates(certs)
    for bindir in [*system_bindirs(), embedded_bindir()]:
        try:
            cluster = Cluster(bindir).start()
        except ClusterError:
            continue
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            if not conn.execute("SHOW ssl_library").fetchone()[0]:  # built without OpenSSL
                cluster.cleanup()
                continue
            owner = os.stat(cluster.datadir)
            for name in ("server.crt", "server.key"):
                shutil.copy(certs / name, cluster.datadir / name)
                os.chown(cluster.datadir / name, owner.st_uid, owner.st_gid)
                os.chmod(cluster.datadir / name, 0o600)
            conn.execute("ALTER SYSTEM SET ssl = on")
            conn.execute("SELECT pg_reload_conf()")
            table_and_publication(conn)
        try:
            yield cluster, certs
        finally:
            cluster.cleanup()
        return
    pytest.skip("no PostgreSQL build with OpenSSL support on this machine")


def _tls_app(cluster: Cluster, host: str = "127.0.0.1", **options: Any) -> tuple[WalEx, list[int]]:
    events, got = inserts()
    app = WalEx(hostname=host, port=cluster.port, username="postgres", database="postgres",
                publication="pub", modules=[events], **options)
    return app, got


def test_ssl_true_verifies_certificate_and_host(tls_server: tuple[Cluster, Path],
                                                monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    cluster, certs = tls_server
    ca = str(certs / "ca.crt")
    with psycopg.connect(cluster.dsn(), autocommit=True, sslmode="disable") as admin:
        admin.execute("DELETE FROM item")
        # verified against the right CA, for the address in the certificate
        app, got = _tls_app(cluster, ssl=True, sslrootcert=ca)
        assert run(stream_one(app, admin, got, 1)) == ([1], [(True,)])
        # sslmode=require is an explicit choice of TLS without verification
        app, got = _tls_app(cluster, sslmode="require")
        assert run(stream_one(app, admin, got, 2)) == ([2], [(True,)])
        # the host name is verified too (the certificate names 127.0.0.1 only) ...
        app, got = _tls_app(cluster, "localhost", ssl=True, sslrootcert=ca)
        with pytest.raises(SetupError, match='does not match host name "localhost"'):
            run(app.start())
        # ... unless verify-ca is asked for
        app, got = _tls_app(cluster, "localhost", ssl=True, sslmode="verify-ca", sslrootcert=ca)
        assert run(stream_one(app, admin, got, 3)) == ([3], [(True,)])
        # a certificate of another CA is refused
        app, got = _tls_app(cluster, ssl=True, sslrootcert=str(certs / "other_ca.crt"))
        with pytest.raises(SetupError, match="certificate verify failed"):
            run(app.start())
        # ssl=True without a root certificate: libpq looks for ~/.postgresql/root.crt
        monkeypatch.setenv("HOME", str(tmp_path))
        app, got = _tls_app(cluster, ssl=True)
        with pytest.raises(SetupError) as info:
            run(app.start())
        assert f'root certificate file "{tmp_path}/.postgresql/root.crt" does not exist' in str(info.value)


def test_number_options_refuse_true_and_false() -> None:
    """``function_concurrency=True`` was taken as 1 (one call at a time), ``max_retries=True``
    as one retry, without a word: every number option refuses a bool, and the list of them
    is every int, float or byte-size field."""
    from walex import config

    numbers = {name for name, field in config.WalExSettings.model_fields.items()
               if any(kind in str(field.annotation) for kind in ("int", "float", "ByteSize"))}
    assert numbers == set(config._NUMBERS)
    for name in sorted(numbers):
        for flag in (True, False):
            with pytest.raises(ConfigError, match=name):
                WalEx("postgresql://u@h/db", publication="p", **{name: flag})
