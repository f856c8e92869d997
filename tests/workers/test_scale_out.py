"""Three ``walex worker`` processes share a relay's partitions; one is SIGKILLed mid-run.

A relay (``walex run --destination``, durable slot, 4 partitions) publishes
the changes of rows that are updated again and again with an increasing
``seq``; three worker processes (``walex worker URL handlers:events``) handle
them with a plain handler that records each event in one SQLite log shared
by the three (its autoincrement key is the order in which handlers
committed, across processes). One worker's handler stalls after its 30th
row, having committed it (a worker dying after its handler's effect and
before the acknowledgement); the test SIGKILLs it there. At the end:

- every change was handled (nothing lost);
- per row, the first handling of each change is in ``seq`` order, across
  the three workers (per-row order holds);
- a change handled twice has the same event id both times, and the
  stalled worker's last change was handled again by another worker (its
  unacknowledged message went to another);
- the surviving workers stop cleanly on SIGTERM (exit 0).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import psycopg
import pytest
from destinations.conftest import require

SCRIPT = Path(sys.executable).parent / "walex"
WALEX = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "walex.cli"]
ROWS, ROUNDS, PARTITIONS, STALL_AFTER = 12, 20, 4, 30
EXPECTED = ROWS * (ROUNDS + 1)

HANDLERS = '''
import os, sqlite3, threading, time
from walex import Events

events = Events()
_conn = None


def log():
    global _conn
    if _conn is None:  # made once, on the worker's handler thread, and kept
        _conn = sqlite3.connect(os.environ["WORKER_LOG"], isolation_level=None, timeout=60)
        _conn.execute("PRAGMA journal_mode=WAL")
        _conn.execute("PRAGMA synchronous=FULL")
    return _conn


@events.on_event("item")
def handle(batch):
    conn = log()
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(
        "INSERT INTO handled (event_id, pk, seq, kind, worker, call_size) VALUES (?, ?, ?, ?, ?, ?)",
        [(e.id, e.record["id"], e.record["seq"], e.type.value, os.environ["WORKER_NAME"], len(batch))
         for e in batch])
    conn.execute("COMMIT")
    stall = int(os.environ.get("WORKER_STALL_AFTER", "0"))
    if stall:
        mine = conn.execute("SELECT count(*) FROM handled WHERE worker = ?",
                            (os.environ["WORKER_NAME"],)).fetchone()[0]
        if mine >= stall:
            stalled = os.environ["WORKER_LOG"] + ".stalled"
            with open(stalled + ".tmp", "w") as out:  # the test waits for the file: whole
                out.write(batch[-1].id)
            os.replace(stalled + ".tmp", stalled)
            time.sleep(3600)  # handled and logged, never acknowledged: killed here
    time.sleep(0.005)
'''


def writer(dsn: str, done: threading.Event) -> None:
    """Insert the rows (seq 0), then ROUNDS rounds of updates, three rows per transaction."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO item SELECT g, 0 FROM generate_series(1, %s) g", (ROWS,))
        for seq in range(1, ROUNDS + 1):
            for first in range(1, ROWS + 1, 3):
                conn.execute("UPDATE item SET seq = %s WHERE id BETWEEN %s AND %s",
                             (seq, first, first + 2))
            time.sleep(0.02)
    done.set()


def start(args: list[str], cwd: Path, log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("WALEX_") and k != "PYTHONPATH"}
    with open(log, "ab") as out:
        return subprocess.Popen([*WALEX, *args], cwd=cwd, stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL, env={**base, **env})


def wait(check: Any, what: str, timeout: float, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs if p.exists())
            raise AssertionError(f"timed out waiting for {what}\n{tails}")
        time.sleep(0.05)


def handled(db: Path) -> list[tuple[int, str, int, int, str, str, int]]:
    with sqlite3.connect(db, timeout=60) as conn:
        return conn.execute("SELECT * FROM handled ORDER BY n").fetchall()


async def _cleanup(broker: str, unique: str, port: int) -> None:
    if broker == "nats":
        from destinations.brokers import nats_delete

        await nats_delete(f"WW_{unique}", port)
        return
    import aio_pika

    connection = await aio_pika.connect(port=port)
    try:
        channel = await connection.channel()
        for p in range(PARTITIONS):
            await channel.queue_delete(f"ww{unique}.walex.{p}")
        await channel.exchange_delete(f"ww{unique}")
    finally:
        await connection.close()


@pytest.mark.parametrize("broker", ["nats", "rabbitmq"])
def test_three_workers_one_killed_nothing_lost_order_kept(
    broker: str, admin: psycopg.Connection, dsn: str, tmp_path: Path, unique: str,
) -> None:
    port = require(broker)
    admin.execute("""
        CREATE TABLE item (id int PRIMARY KEY, seq int NOT NULL);
        CREATE PUBLICATION pub FOR TABLE item;
    """)
    if broker == "nats":
        url = f"nats://127.0.0.1:{port}?stream=WW_{unique}&subject=ww{unique}.{{schema}}.{{table}}.{{partition}}"
        source = f"{url}&partitions={PARTITIONS}&ack_wait=2"
    else:
        url = f"amqp://guest:guest@127.0.0.1:{port}/?exchange=ww{unique}"
        source = f"{url}&partitions={PARTITIONS}"
    (tmp_path / "handlers.py").write_text(HANDLERS)
    db = tmp_path / "handled.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE handled (n INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT, "
                     "pk INT, seq INT, kind TEXT, worker TEXT, call_size INT)")
    slot = f"scale_{unique}"
    names = ["w0", "w1", "w2"]
    logs = [tmp_path / f"{name}.log" for name in names] + [tmp_path / "relay.log"]
    workers: dict[str, subprocess.Popen[bytes]] = {}
    relay = None
    try:
        # the group declared before the relay publishes (workers create no stream or exchange)
        subprocess.run([*WALEX, "worker", "--declare", source], cwd=tmp_path, timeout=60,
                       check=True, env={k: v for k, v in os.environ.items()
                                        if not k.startswith("WALEX_") and k != "PYTHONPATH"})
        # w0 first: RabbitMQ makes a queue's first consumer the active one, so w0 has
        # partitions to stall on; w1 and w2 take them over when it is killed
        for name, log in zip(names, logs):
            env = {"WORKER_LOG": str(db), "WORKER_NAME": name}
            if name == "w0":
                env["WORKER_STALL_AFTER"] = str(STALL_AFTER)
            workers[name] = start(["worker", source, "handlers:events"], tmp_path, log, env)
            if name == "w0":
                wait(lambda: logs[0].exists() and "consumes" in logs[0].read_text(),
                     "w0 to subscribe", 60, logs)
        for log in logs[1:3]:
            wait(lambda log=log: log.exists() and "consumes" in log.read_text(),
                 f"{log.stem} to subscribe", 60, logs)
        relay = start(["run", "--destination", url], tmp_path, logs[3], {
            "WALEX_URL": dsn, "WALEX_PUBLICATION": "pub", "WALEX_DURABLE_SLOT": "true",
            "WALEX_SLOT_NAME": slot, "WALEX_PARTITIONS": str(PARTITIONS),
            "WALEX_STATUS_INTERVAL": "0.5",
        })

        def streaming() -> bool:
            row = admin.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s",
                                (slot,)).fetchone()
            return bool(row and row[0])

        wait(streaming, "the relay to stream", 60, logs)
        done = threading.Event()
        thread = threading.Thread(target=writer, args=(dsn, done), daemon=True)
        thread.start()

        stalled = Path(f"{db}.stalled")
        wait(stalled.exists, "worker w0 to stall after its handler committed", 120, logs)
        workers["w0"].send_signal(signal.SIGKILL)
        workers["w0"].wait(30)
        killed_at = max(row[0] for row in handled(db))
        thread.join(120)
        assert done.is_set(), "the writer did not finish"

        stalled_id = stalled.read_text()

        def complete() -> bool:
            # every change, and the stalled worker's unacknowledged one again by another worker
            # (its (pk, seq) was logged before the stall, so the count alone does not wait for it)
            rows = handled(db)
            again = any(r[1] == stalled_id and r[5] != "w0" for r in rows)
            return again and len({(r[2], r[3]) for r in rows}) >= EXPECTED

        wait(complete, f"{EXPECTED} changes handled", 120, logs)
        for name in ("w1", "w2"):
            workers[name].send_signal(signal.SIGTERM)
        for name in ("w1", "w2"):
            code = workers[name].wait(60)
            assert code == 0, f"{name} exited {code}:\n{logs[names.index(name)].read_text()[-3000:]}"
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(30) == 0, logs[3].read_text()[-3000:]
    finally:
        for proc in [*workers.values(), relay]:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
        asyncio.run(_cleanup(broker, unique, port))

    rows = handled(db)
    first: dict[str, tuple[int, int, str]] = {}
    per_row: dict[int, list[int]] = defaultdict(list)
    duplicates: list[tuple[str, str]] = []  # (event id, worker of the repeat)
    for _n, event_id, pk, seq, kind, worker, _size in rows:
        if event_id in first:
            assert first[event_id] == (pk, seq, kind), f"{event_id} handled twice, differently"
            duplicates.append((event_id, worker))
            continue
        first[event_id] = (pk, seq, kind)
        per_row[pk].append(seq)
    # nothing lost, nothing extra, each row's changes first handled in order
    assert sorted(per_row) == list(range(1, ROWS + 1))
    for pk, seqs in per_row.items():
        assert seqs == list(range(ROUNDS + 1)), f"row {pk}: changes handled in the order {seqs}"
    assert len(first) == EXPECTED
    # the stalled worker's last change was handled again, by another worker, same id
    assert any(event_id == stalled_id and worker != "w0" for event_id, worker in duplicates), \
        f"{stalled_id} (handled by w0, never acknowledged) was not handled again: {duplicates}"
    by_worker = defaultdict(int)
    for row in rows:
        by_worker[row[5]] += 1
    assert by_worker["w0"] >= STALL_AFTER
    after = {row[5] for row in rows if row[0] > killed_at}
    assert after and "w0" not in after, f"handled after the kill by {after}"
    if broker == "nats":  # any worker fetches from any partition
        assert by_worker["w1"] and by_worker["w2"], f"the work was not shared: {dict(by_worker)}"
    print(f"{broker}: {len(rows)} handled, {len(duplicates)} duplicates, by worker "
          f"{dict(by_worker)}, largest call {max(r[6] for r in rows)}")
