"""What a process loads: ``import walex`` only the errors, and the streaming path only
what it needs (never the CLI's libraries, the destinations, the workers or the backfill's
table readers).

Each check runs in a new interpreter, so nothing this test process imported counts.
The public names stay importable from ``walex``, and ``start()`` opens one connection
before streaming.
"""

from __future__ import annotations

import json
import subprocess
import sys

import psycopg

from support import collecting, run

# modules of the CLI (typer, rich), of publishing (walex.destinations), of the workers,
# of reading tables for backfills, and of the settings (pydantic): never loaded by
# ``import walex``
HEAVY = ["typer", "rich", "pydantic", "pydantic_settings", "psycopg", "walex.app",
         "walex.config", "walex.destinations", "walex.workers", "walex.backfill",
         "walex.pipeline"]
# loaded by the streaming path only when an app asks for them
OFF_STREAMING_PATH = ["typer", "rich", "walex.destinations", "walex.workers",
                      "walex.backfill.chunks", "walex.backfill.target", "walex.backfill.report",
                      "walex.observe.server", "walex.cli"]


def loaded(code: str, names: list[str]) -> list[str]:
    """Which of ``names`` are in ``sys.modules`` after running ``code`` in a new interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([n for n in {names!r} if n in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_walex_loads_only_the_errors() -> None:
    assert loaded("import walex", HEAVY) == []


def test_public_names_still_import() -> None:
    code = (
        "from walex import WalEx, Worker, Events, Event, EventType, Change, Source, Transaction, "
        "UNCHANGED_TOAST, WalExError, ConfigError, SetupError, ReplicationError, SlotInUseError, "
        "SlotLostError, DecodeError, HandlerError, DestinationError\n"
        "import walex\n"
        "from walex.app import WalEx as A\n"
        "from walex.event import WALEX_VERSION\n"
        "assert walex.WalEx is A and set(walex.__all__) <= set(dir(walex)) and WALEX_VERSION\n"
        "from walex import *\n"
    )
    assert loaded(code, ["walex.workers"]) == ["walex.workers"]


def test_streaming_app_loads_nothing_off_its_path() -> None:
    code = (
        "from walex import Event, Events, WalEx\n"
        "app = WalEx('postgresql://u@h/db', publication='p', modules=[Events()])\n"
    )
    assert loaded(code, OFF_STREAMING_PATH) == []


# never loaded by an app that streams to handlers only, up to and after start(): the
# broker clients, the CLI's libraries, and what only some apps need (pickle: a spill of a
# streamed transaction; tomllib: a configuration file)
NOT_FOR_A_PLAIN_APP = ["nats", "aiormq", "aio_pika", "pamqp", "redis", "confluent_kafka",
                       "httpx", "httpcore", "aiohttp", "typer", "rich", "click", "pickle",
                       "tomllib", "walex.destinations", "walex.workers", "walex.cli"]


def test_a_streaming_app_loads_no_broker_client_nor_cli(admin: psycopg.Connection,
                                                         dsn: str) -> None:
    """A new interpreter starts an app with one handler; once streaming (start() returned,
    a row received) none of those modules (nor any of their submodules) was imported."""
    admin.execute("CREATE TABLE t (id int PRIMARY KEY); CREATE PUBLICATION pub FOR TABLE t")
    code = (
        "import asyncio, json, sys\n"
        "import psycopg\n"
        "from walex import Event, Events, WalEx\n"
        "events = Events()\n"
        "got = []\n"
        "@events.on_event('all')\n"
        "async def handle(batch: list[Event]) -> None:\n"
        "    got.extend(batch)\n"
        "async def main() -> None:\n"
        f"    app = WalEx({dsn!r}, publication='pub', modules=[events])\n"
        "    await app.start()\n"
        f"    with psycopg.connect({dsn!r}, autocommit=True) as conn:\n"
        "        conn.execute('INSERT INTO t VALUES (1)')\n"
        "    while not got:\n"
        "        await asyncio.sleep(0.01)\n"
        "    await app.stop()\n"
        "asyncio.run(main())\n"
    )
    probe = (f"{code}\nprint(json.dumps(sorted({{m for m in sys.modules for n in "
             f"{NOT_FOR_A_PLAIN_APP!r} if m == n or m.startswith(n + '.')}})))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=120)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_a_relay_loads_the_client_of_its_destination_only() -> None:
    """An app publishing to NATS imports nats-py (when the URL is checked), no other broker's
    client, nor the CLI's libraries."""
    code = (
        "from walex import WalEx\n"
        "app = WalEx('postgresql://u@h/db', publication='p', "
        "destinations=['nats://127.0.0.1:4222?stream=s'])\n"
    )
    clients = ["nats", "aio_pika", "aiormq", "redis", "confluent_kafka", "httpx", "typer", "rich"]
    assert loaded(code, clients) == ["nats"]


def test_the_cli_loads_the_settings_only_for_a_command_that_reads_them() -> None:
    """``walex --help`` and ``walex worker`` do not pay for pydantic: the commands that build
    settings (run, status, setup, ...) import them when they run."""
    assert loaded("import walex.cli", ["pydantic", "pydantic_settings", "walex.config",
                                       "walex.app", "walex.destinations"]) == []
    out = subprocess.run([sys.executable, "-m", "walex.cli", "--help"], capture_output=True,
                         text=True, check=False)
    assert "status" in out.stdout and "worker" in out.stdout, out.stderr


def test_an_unknown_name_is_an_attribute_error() -> None:
    probe = "import walex\ntry:\n    walex.Nope\nexcept AttributeError as e:\n    print(e)\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert "has no attribute 'Nope'" in out.stdout


def test_start_opens_one_connection_before_streaming(admin: psycopg.Connection, dsn: str) -> None:
    """The walsender runs the checks; no normal connection until one is needed."""
    admin.execute("CREATE TABLE t (id int PRIMARY KEY); CREATE PUBLICATION pub FOR TABLE t")

    async def main() -> None:
        async with collecting(dsn, subscriptions=["t"], publication="pub") as rec:
            admin.execute("INSERT INTO t VALUES (1)")
            await rec.wait_for(1)
            others = admin.execute(
                "SELECT backend_type FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND backend_type IN ('client backend', 'walsender')"
            ).fetchall()
            assert others == [("walsender",)]

    run(main())
