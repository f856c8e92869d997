"""walex as a relay (``walex run``, no Python written), SIGKILLed mid-stream.

A writer commits numbered transactions into two tables while ``walex run``
relays them to a broker with a durable slot. The relay is killed with
SIGKILL twice while the writer runs, and started again at once. At the end
the broker holds every row once per id: no gap; a duplicate (a batch the
broker stored but walex could not acknowledge before it died) carries the
same id and the same content as the first copy, and NATS, which deduplicates
by ``Nats-Msg-Id``, holds none. First copies are in commit order per table.

NATS is configured on the command line (``--destination`` and ``WALEX_*``
variables), the others by ``walex run --config walex.toml``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from .brokers import (
    Stored, nats_delete, nats_stored, rabbitmq_delete, rabbitmq_queue, rabbitmq_stored,
    redis_delete, redis_stored,
)
from .conftest import require
from .receiver import Receiver

SCRIPT = Path(sys.executable).parent / "walex"
WALEX = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "walex.cli"]
SECRET = "whsec_" + base64.b64encode(b"crash").decode()
TRANSACTIONS = 150


def writer(dsn: str, done: threading.Event, progress: list[int]) -> None:
    """Numbered transactions: 1-3 rows into a, b or both; pk increases per table."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        pk = {"a": 0, "b": 0}
        for txn in range(TRANSACTIONS):
            with conn.transaction():
                for i in range(txn % 3 + 1):
                    table = "a" if (txn + i) % 4 else "b"
                    pk[table] += 1
                    conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (pk[table], txn))
            progress.append(txn)
            time.sleep(0.01)
    done.set()


def expected_rows() -> dict[str, list[int]]:
    rows: dict[str, list[int]] = {"a": [], "b": []}
    for txn in range(TRANSACTIONS):
        for i in range(txn % 3 + 1):
            table = "a" if (txn + i) % 4 else "b"
            rows[table].append(len(rows[table]) + 1)
    return rows


def relay(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("WALEX_") and k != "PYTHONPATH"}
    with open(cwd / "relay.log", "ab") as log:
        return subprocess.Popen([*WALEX, "run", *args], cwd=cwd, stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL, env={**base, **env})


def wait(check: Any, what: str, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; relay log:\n{log.read_text()[-4000:]}")
        time.sleep(0.05)


def streaming(admin: psycopg.Connection, slot: str) -> bool:
    row = admin.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s",
                        (slot,)).fetchone()
    return bool(row and row[0])


@pytest.mark.parametrize("broker", ["nats", "redis", "rabbitmq", "webhook"])
def test_sigkilled_relay_leaves_no_gap_and_no_duplicate_beyond_ids(
    broker: str, admin: psycopg.Connection, dsn: str, tmp_path: Path, unique: str,
) -> None:
    admin.execute("""
        CREATE TABLE a (id int PRIMARY KEY, txn int);
        CREATE TABLE b (id int PRIMARY KEY, txn int);
        CREATE PUBLICATION pub FOR ALL TABLES;
    """)
    slot = f"crash_{unique}"
    env = {"WALEX_TEST_CRASH_SECRET": SECRET}
    hook: Receiver | None = None
    if broker == "nats":
        port = require("nats")
        url = f"nats://127.0.0.1:{port}?stream=WT_{unique}&subject=wt{unique}.{{table}}"
        read: Any = lambda: nats_stored(f"WT_{unique}", port)  # noqa: E731
        cleanup: Any = lambda: nats_delete(f"WT_{unique}", port)  # noqa: E731
    elif broker == "redis":
        port = require("redis")
        url = f"redis://127.0.0.1:{port}/0?stream=wt{unique}:{{table}}"
        read = lambda: redis_stored(f"wt{unique}:*", port)  # noqa: E731
        cleanup = lambda: redis_delete(f"wt{unique}:*", port)  # noqa: E731
    elif broker == "rabbitmq":
        port = require("rabbitmq")
        exchange, queue = f"wt{unique}", f"wt{unique}.q"
        asyncio.run(rabbitmq_queue(exchange, queue, port))
        url = f"amqp://guest:guest@127.0.0.1:{port}/?exchange={exchange}"
        read = lambda: rabbitmq_stored(queue, port)  # noqa: E731
        cleanup = lambda: rabbitmq_delete(exchange, queue, port)  # noqa: E731
    else:
        hook = Receiver().__enter__()
        url = hook.url(query="secret_env=WALEX_TEST_CRASH_SECRET")

        async def read_hook() -> list[Stored]:
            assert hook is not None
            return [(e["id"], e, h["webhook-id"])
                    for _p, h, body, _s in hook.accepted() for e in json.loads(body)]

        async def no_cleanup() -> None:
            return None

        read, cleanup = read_hook, no_cleanup

    if broker == "nats":
        args = ["--destination", url]
        env.update(WALEX_URL=dsn, WALEX_PUBLICATION="pub", WALEX_DURABLE_SLOT="true",
                   WALEX_SLOT_NAME=slot, WALEX_STATUS_INTERVAL="0.5", WALEX_BATCH_SIZE="4",
                   WALEX_DESTINATION_WINDOW="32")  # pipelined (walex.destinations.window)
    else:
        (tmp_path / "walex.toml").write_text(
            f"url = {json.dumps(dsn)}\npublication = \"pub\"\ndurable_slot = true\n"
            f"slot_name = \"{slot}\"\nstatus_interval = 0.5\nbatch_size = 4\n"
            "destination_window = 32\n"
            f"destinations = [{json.dumps(url)}]\n"
        )
        args = ["--config", "walex.toml"]
    log = tmp_path / "relay.log"
    total = sum(len(v) for v in expected_rows().values())

    def distinct() -> int:
        return len({i for i, _d, _x in asyncio.run(read())})

    proc = relay(args, tmp_path, env)
    try:
        wait(lambda: streaming(admin, slot), "the relay to stream", 60, log)
        done, progress = threading.Event(), []
        thread = threading.Thread(target=writer, args=(dsn, done, progress), daemon=True)
        thread.start()
        for kill_at in (TRANSACTIONS // 4, TRANSACTIONS // 2):
            wait(lambda: len(progress) >= kill_at, f"{kill_at} transactions", 120, log)
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            proc = relay(args, tmp_path, env)
        thread.join(120)
        assert done.is_set(), "the writer did not finish"
        wait(lambda: distinct() >= total, f"{total} events at the broker", 120, log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-4000:]
        stored = asyncio.run(read())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        asyncio.run(cleanup())
        if hook is not None:
            hook.__exit__()

    first: dict[str, dict[str, Any]] = {}
    order: dict[str, list[int]] = {"a": [], "b": []}
    duplicates = 0
    for message_id, doc, _extra in stored:
        if message_id in first:
            duplicates += 1
            assert first[message_id] == doc, f"{message_id}: a duplicate differs from the first copy"
            continue
        first[message_id] = doc
        table = doc["source"].rsplit("/", 1)[1]
        order[table].append(doc["data"]["new_record"]["id"])
    assert order == expected_rows(), "a row is missing, repeated under another id, or out of order"
    print(f"{broker}: {len(stored)} stored, {duplicates} duplicates")
    if broker == "nats":
        assert duplicates == 0, "JetStream stored a replayed message id twice"
    for table in ("a", "b"):  # ids increase with commit order, per table
        ids = [i for i, d in first.items() if d["source"].endswith(f"/{table}")]
        assert ids == sorted(ids)
