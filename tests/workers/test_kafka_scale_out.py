"""Three ``walex worker`` processes in one Kafka consumer group on a 4-partition topic (tansu).

A relay (``walex run``, durable slot) produces the changes of rows updated
again and again with an increasing ``seq``; the relay picks the Kafka
partition with librdkafka's ``consistent`` partitioner (CRC-32 of the key), so
the handlers know each event's partition. Each handler call is logged in one
SQLite file shared by the workers: its events, and a window (worker, Kafka
partition, start, end). One worker stalls inside its handler after its 20th
row (its effect committed, the record never acknowledged) and is SIGKILLed
there. At the end:

- every change was handled (nothing lost), each row's changes first handled
  in ``seq`` order;
- the killed worker's last change was handled again by another worker;
- no two workers' windows on one partition overlap (the killed worker's
  window ends at the kill): a partition is never handled by two at once,
  across the rebalances of joining workers and of the kill.
"""

from __future__ import annotations

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
from destinations.kafka_support import GROUP, create_topic
from destinations.servers import OwnTansu

SCRIPT = Path(sys.executable).parent / "walex"
WALEX = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "walex.cli"]
ROWS, ROUNDS, PARTITIONS, STALL_AFTER = 12, 40, 4, 20
EXPECTED = ROWS * (ROUNDS + 1)

HANDLERS = '''
import os, sqlite3, time, zlib
from walex import Events

events = Events()
_conn = None


def log():
    global _conn
    if _conn is None:
        _conn = sqlite3.connect(os.environ["WORKER_LOG"], isolation_level=None, timeout=60)
        _conn.execute("PRAGMA journal_mode=WAL")
    return _conn


@events.on_event("item")
def handle(batch):
    conn = log()
    me = os.environ["WORKER_NAME"]
    # librdkafka's "consistent" partitioner: CRC-32 of the key, modulo the partitions
    partition = zlib.crc32(f"public.item/{batch[0].record['id']}".encode()) % 4
    call = conn.execute("INSERT INTO calls (worker, part, start) VALUES (?, ?, ?)",
                        (me, partition, time.time())).lastrowid
    time.sleep(0.01)
    base = os.environ["WORKER_LOG"]
    if os.path.exists(base + ".joining") and not os.path.exists(base + ".joined"):
        time.sleep(10)  # a call in hand while w2 joins: the rebalance must wait for it
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(
        "INSERT INTO handled (event_id, pk, seq, worker) VALUES (?, ?, ?, ?)",
        [(e.id, e.record["id"], e.record["seq"], me) for e in batch])
    conn.execute("COMMIT")
    stall = int(os.environ.get("WORKER_STALL_AFTER", "0"))
    if stall and os.path.exists(os.environ["WORKER_LOG"] + ".joined"):
        mine = conn.execute("SELECT count(*) FROM handled WHERE worker = ?", (me,)).fetchone()[0]
        if mine >= stall:
            stalled = os.environ["WORKER_LOG"] + ".stalled"
            with open(stalled + ".tmp", "w") as out:  # the test waits for the file: whole
                out.write(batch[-1].id)
            os.replace(stalled + ".tmp", stalled)
            time.sleep(3600)  # handled and logged, never acknowledged: killed here
    time.sleep(0.01)
    conn.execute("UPDATE calls SET stop = ? WHERE n = ?", (time.time(), call))
'''


def writer(dsn: str, done: threading.Event) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO item SELECT g, 0 FROM generate_series(1, %s) g", (ROWS,))
        for seq in range(1, ROUNDS + 1):
            for first in range(1, ROWS + 1, 3):
                conn.execute("UPDATE item SET seq = %s WHERE id BETWEEN %s AND %s",
                             (seq, first, first + 2))
            time.sleep(0.15)
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
        time.sleep(0.1)


def query(db: Path, sql: str) -> list[Any]:
    with sqlite3.connect(db, timeout=60) as conn:
        return conn.execute(sql).fetchall()


def test_three_workers_one_killed_every_change_in_order_one_worker_per_partition(
    admin: psycopg.Connection, dsn: str, tmp_path: Path, unique: str,
) -> None:
    admin.execute("CREATE TABLE item (id int PRIMARY KEY, seq int NOT NULL); "
                  "CREATE PUBLICATION pub FOR TABLE item")
    (tmp_path / "handlers.py").write_text(HANDLERS)
    db = tmp_path / "handled.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE handled (n INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT, "
                     "pk INT, seq INT, worker TEXT)")
        conn.execute("CREATE TABLE calls (n INTEGER PRIMARY KEY AUTOINCREMENT, worker TEXT, "
                      "part INT, start REAL, stop REAL)")
    slot = f"kscale_{unique}"
    names = ["w0", "w1", "w2"]
    logs = [tmp_path / f"{name}.log" for name in names] + [tmp_path / "relay.log"]
    workers: dict[str, subprocess.Popen[bytes]] = {}
    relay = None
    with OwnTansu(tmp_path) as broker:
        create_topic(broker.port, "wk.item", PARTITIONS)
        url = f"kafka://127.0.0.1:{broker.port}?topic=wk.{{table}}&partitioner=consistent"
        source = f"{url}&{GROUP}&group=wg"
        try:
            # w0 and w1 first; w2 joins while the changes flow: a rebalance takes partitions
            # from workers in the middle of handler calls
            for name, log in zip(names, logs):
                env = {"WORKER_LOG": str(db), "WORKER_NAME": name}
                if name == "w0":
                    env["WORKER_STALL_AFTER"] = str(STALL_AFTER)
                if name == "w2":
                    wait(lambda: len(query(db, "SELECT * FROM handled")) >= 60,
                         "60 changes handled by w0 and w1", 120, logs)
                    Path(f"{db}.joining").write_text("")
                workers[name] = start(["worker", source, "handlers:events"], tmp_path, log, env)
                if name == "w1":
                    for log in logs[:2]:
                        wait(lambda log=log: log.exists() and "wk.item[" in log.read_text(),
                             f"{log.stem} to be assigned partitions", 120, logs)
                    relay = start(["run", "--destination", url], tmp_path, logs[3], {
                        "WALEX_URL": dsn, "WALEX_PUBLICATION": "pub", "WALEX_DURABLE_SLOT": "true",
                        "WALEX_SLOT_NAME": slot, "WALEX_STATUS_INTERVAL": "0.5",
                    })

                    def streaming() -> bool:
                        row = admin.execute("SELECT active FROM pg_replication_slots "
                                            "WHERE slot_name = %s", (slot,)).fetchone()
                        return bool(row and row[0])

                    wait(streaming, "the relay to stream", 60, logs)
                    done = threading.Event()
                    thread = threading.Thread(target=writer, args=(dsn, done), daemon=True)
                    thread.start()
            wait(lambda: "wk.item[" in logs[2].read_text(), "w2 to be assigned partitions", 120,
                 logs)
            Path(f"{db}.joined").write_text("")
            stalled = Path(f"{db}.stalled")
            wait(stalled.exists, "worker w0 to stall after its handler committed", 120, logs)
            time.sleep(2)  # a worker committing offsets too early would have done so by now
            workers["w0"].send_signal(signal.SIGKILL)
            workers["w0"].wait(30)
            killed_at = time.time()
            thread.join(120)
            assert done.is_set(), "the writer did not finish"

            def complete() -> bool:
                return len(query(db, "SELECT DISTINCT pk, seq FROM handled")) >= EXPECTED

            wait(complete, f"{EXPECTED} changes handled", 180, logs)
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

    rows = query(db, "SELECT event_id, pk, seq, worker FROM handled ORDER BY n")
    first: dict[str, tuple[int, int]] = {}
    per_row: dict[int, list[int]] = defaultdict(list)
    repeats: list[tuple[str, str]] = []
    for event_id, pk, seq, worker in rows:
        if event_id in first:
            assert first[event_id] == (pk, seq), f"{event_id} handled twice, differently"
            repeats.append((event_id, worker))
            continue
        first[event_id] = (pk, seq)
        per_row[pk].append(seq)
    assert sorted(per_row) == list(range(1, ROWS + 1))
    for pk, seqs in per_row.items():
        assert seqs == list(range(ROUNDS + 1)), f"row {pk}: changes first handled in the order {seqs}"
    stalled_id = stalled.read_text()
    assert any(i == stalled_id and w != "w0" for i, w in repeats), \
        f"{stalled_id} (handled by w0, never committed) was not handled again: {repeats}"
    # one worker at a time per partition
    calls = query(db, "SELECT worker, part, start, stop FROM calls ORDER BY start")
    workers_of = defaultdict(set)
    last_end: dict[tuple[int, str], float] = {}
    for worker, part, begin, end in calls:
        end = end if end is not None else killed_at
        assert end is not None and (worker == "w0" or end != killed_at), "a call never ended"
        for (p, other), other_end in last_end.items():
            if p == part and other != worker:
                assert other_end <= begin, (f"partition {part}: {worker} started at {begin} "
                                            f"while {other} worked on it until {other_end}")
        last_end[(part, worker)] = max(end, last_end.get((part, worker), 0.0))
        workers_of[part].add(worker)
    assert len(workers_of) == PARTITIONS
    print(f"kafka: {len(rows)} handled, {len(repeats)} repeats, partitions by worker "
          f"{ {p: sorted(w) for p, w in workers_of.items()} }")
