"""What a process loads: ``import walex`` only the errors, and the streaming path only
what it needs (never the CLI's libraries, the destinations, the workers or the backfill's
table readers).

Each check runs in a new interpreter, so nothing this test process imported counts.
The public names stay importable from ``walex``, and ``start()`` opens one connection
before streaming.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

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


def test_the_cli_loads_rich_only_to_print() -> None:
    """``walex run`` (a relay started from the command line) and ``walex worker`` print
    through rich only on an error: building the CLI loads none of it
    (walex.cli_console), and a console is made when it first prints."""
    assert loaded("import walex.cli", ["rich"]) == []
    code = ("from walex.cli_admin import out\n"
            "assert out.is_terminal in (True, False)\n")  # an attribute makes the console
    assert loaded(code, ["rich", "rich.console"]) == ["rich", "rich.console"]


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


# never loaded by a worker (walex.workers), which reads what a relay published and never
# talks to PostgreSQL: psycopg, and walex's modules of the replication stream and of encoding
NOT_FOR_A_WORKER = ["psycopg", "psycopg_binary", "psycopg_c", "walex.pgoutput", "walex.relations",
                    "walex.rawevent", "walex.pgtypes", "walex.assembler", "walex.app",
                    "walex.destinations.encoding", "walex.destinations.direct",
                    "walex.destinations.fanout", "walex.backfill", "pydantic"]


def _relay_encoded() -> tuple[bytes, dict[str, Any]]:
    """One event as a relay publishes it (the relay's encoder), and the record it carries."""
    import datetime as dt
    import ipaddress
    import uuid
    from decimal import Decimal

    from walex.destinations.encoding import encode
    from walex.event import Event, EventType, Source

    columns = {"id": "int8", "big": "int8", "note": "text", "price": "numeric", "at": "timestamptz",
               "day": "date", "ref": "uuid", "doc": "jsonb", "tags": "text[]", "raw": "bytea",
               "took": "interval", "addr": "inet", "ok": "bool", "ratio": "float8", "gone": "text"}
    record: dict[str, Any] = {
        "id": 7, "big": 2**62 + 1, "note": "é\"x", "price": Decimal("12.50"),
        "at": dt.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=dt.timezone.utc), "day": dt.date(2026, 2, 3),
        "ref": uuid.UUID(int=7), "doc": {"a": [1, 2**70], "b": None}, "tags": ["a", None, "c"],
        "raw": b"\x00\xff", "took": dt.timedelta(days=1, seconds=2, microseconds=3),
        "addr": ipaddress.ip_interface("10.0.0.1/24"), "ok": True, "ratio": 0.5, "gone": None,
    }
    source = Source(db="app", schema="public", table="orders", columns=columns, primary_key=("id",))
    event = Event("orders", EventType.INSERT, source, record, None, None,
                  dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc), "0/16B3748",
                  "00000000016B3748-00000000")
    return encode([event], 1)[0].body, record


def test_a_worker_loads_no_psycopg(tmp_path: Path) -> None:
    """A new interpreter builds a worker as ``walex worker nats://... handlers:events`` does
    (walex.cli_worker.build_worker: the NATS source, the handlers' module) and types a
    relay-encoded event back through its decoder: the values are the relay's, and neither
    psycopg nor walex's replication or encoding modules were imported."""
    body, record = _relay_encoded()
    (tmp_path / "handlers_noimports.py").write_text(
        "from walex import Events\n"
        "events = Events()\n"
        "@events.on_event('all')\n"
        "async def handle(batch):\n"
        "    pass\n"
    )
    code = (
        "import pickle, sys\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "from walex.cli_worker import build_worker\n"
        "worker = build_worker('nats://127.0.0.1:4222?stream=S&partitions=1', "
        "'handlers_noimports:events', {})\n"
        f"event = worker.decoder.decode({body!r})\n"
        "print(pickle.dumps((type(worker).__name__, type(worker.consumer).__name__, "
        "event.new_record)).hex())\n"
    )
    probe = (f"{code}\nimport json\nprint(json.dumps(sorted({{m for m in sys.modules for n in "
             f"{NOT_FOR_A_WORKER!r} if m == n or m.startswith(n + '.')}})))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=120)
    lines = out.stdout.strip().splitlines()
    assert pickle.loads(bytes.fromhex(lines[-2])) == ("Worker", "NatsConsumer", record)
    assert json.loads(lines[-1]) == []


def test_walex_worker_help_loads_no_psycopg() -> None:
    """``walex worker --help`` registers every command (typer) without their PostgreSQL
    machinery: psycopg, the checks, the backfill runner are imported by the commands that run."""
    code = (
        "import sys\n"
        "sys.argv = ['walex', 'worker', '--help']\n"
        "import walex.cli\n"
        "try:\n"
        "    walex.cli.app()\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
    )
    assert loaded(code, ["psycopg", "walex.diagnosis", "walex.backfill.runner",
                         "walex.backfill.store", "walex.lookups", "walex.app", "walex.workers"]) == []
