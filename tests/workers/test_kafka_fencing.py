"""A Kafka worker frozen (SIGSTOP) past its session, inside a handler call, then thawed.

The group gives its partitions to the other worker meanwhile; when the frozen
worker runs again it learns the partitions were lost and cancels the call in
hand (the fencing of :func:`walex.workers.current_lease`): nothing of it is
committed, the other worker handled those changes, and every change is handled.
"""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from pathlib import Path

import psycopg
from destinations.kafka_support import GROUP, create_topic
from destinations.servers import OwnTansu

from .test_kafka_scale_out import query, start, wait

ROWS, ROUNDS = 4, 10
EXPECTED = ROWS * (ROUNDS + 1)

HANDLERS = '''
import os, sqlite3, time
from walex import Events
from walex.workers import current_lease

events = Events()


@events.on_event("item")
async def handle(batch):
    import asyncio
    me = os.environ["WORKER_NAME"]
    base = os.environ["WORKER_LOG"]
    if me == "w0" and batch[0].record["seq"] == 3 and not os.path.exists(base + ".frozen"):
        # the test freezes this process as soon as the file exists: it appears whole
        with open(base + ".frozen.tmp", "w") as out:
            out.write(batch[0].id)
        os.replace(base + ".frozen.tmp", base + ".frozen")
        await asyncio.sleep(60)  # frozen here by the test, then cancelled on the lost partition
    conn = sqlite3.connect(base, isolation_level=None, timeout=60)
    conn.executemany("INSERT INTO handled (event_id, pk, seq, worker, part) VALUES (?, ?, ?, ?, ?)",
                     [(e.id, e.record["id"], e.record["seq"], me, current_lease().partition)
                      for e in batch])
    conn.close()
'''


def writer(dsn: str, done: threading.Event) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO item SELECT g, 0 FROM generate_series(1, %s) g", (ROWS,))
        for seq in range(1, ROUNDS + 1):
            conn.execute("UPDATE item SET seq = %s", (seq,))
            time.sleep(0.1)
    done.set()


def test_a_frozen_worker_loses_its_partitions_and_its_call_is_cut_off(
    admin: psycopg.Connection, dsn: str, tmp_path: Path, unique: str,
) -> None:
    admin.execute("CREATE TABLE item (id int PRIMARY KEY, seq int NOT NULL); "
                  "CREATE PUBLICATION pub FOR TABLE item")
    (tmp_path / "handlers.py").write_text(HANDLERS)
    db = tmp_path / "handled.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE handled (n INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT, "
                     "pk INT, seq INT, worker TEXT, part INT)")
    slot = f"kfence_{unique}"
    logs = [tmp_path / "w0.log", tmp_path / "w1.log", tmp_path / "relay.log"]
    procs = []
    with OwnTansu(tmp_path) as broker:
        create_topic(broker.port, "wf.item", 2)
        url = f"kafka://127.0.0.1:{broker.port}?topic=wf.{{table}}&partitioner=consistent"
        source = f"{url}&{GROUP}&group=wf"
        try:
            w0 = start(["worker", source, "handlers:events", "--log-level", "DEBUG"], tmp_path, logs[0],
                       {"WORKER_LOG": str(db), "WORKER_NAME": "w0"})
            procs.append(w0)
            wait(lambda: "wf.item[" in logs[0].read_text(), "w0 assigned", 120, logs)
            relay = start(["run", "--destination", url], tmp_path, logs[2], {
                "WALEX_URL": dsn, "WALEX_PUBLICATION": "pub", "WALEX_DURABLE_SLOT": "true",
                "WALEX_SLOT_NAME": slot, "WALEX_STATUS_INTERVAL": "0.5",
            })
            procs.append(relay)

            def streaming() -> bool:
                row = admin.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s",
                                    (slot,)).fetchone()
                return bool(row and row[0])

            wait(streaming, "the relay to stream", 60, logs)
            done = threading.Event()
            thread = threading.Thread(target=writer, args=(dsn, done), daemon=True)
            thread.start()
            frozen = Path(f"{db}.frozen")
            wait(frozen.exists, "w0 inside the call to freeze", 120, logs)
            w0.send_signal(signal.SIGSTOP)
            cut = frozen.read_text()  # the frozen call's first event
            assert cut, "the marker file of the frozen call is empty"
            w1 = start(["worker", source, "handlers:events", "--log-level", "DEBUG"], tmp_path, logs[1],
                       {"WORKER_LOG": str(db), "WORKER_NAME": "w1"})
            procs.append(w1)
            # w1 joins; the group waits for w0 until its session (6 s) times out, then w1
            # takes both partitions and handles what w0 was holding
            wait(lambda: cut in {r[0] for r in query(db, "SELECT event_id FROM handled")},
                 f"w1 to handle the frozen call's changes ({cut})", 180, logs)
            w0.send_signal(signal.SIGCONT)
            wait(lambda: "cut off" in logs[0].read_text(), "w0 to cut its call off", 120, logs)
            thread.join(120)
            assert done.is_set()
            wait(lambda: len(query(db, "SELECT DISTINCT pk, seq FROM handled")) >= EXPECTED,
                 f"{EXPECTED} changes handled", 180, logs)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGCONT)
                    proc.kill()
                    proc.wait(10)
    rows = query(db, "SELECT event_id, worker FROM handled")
    assert [w for i, w in rows if i == cut] == ["w1"], "the frozen call was not cut off"
    text = logs[0].read_text()
    # cut off as the group's loss arrived, or sooner: as w0 found its consumer had not run
    # for most of the session timeout (frozen), before the group could tell it
    assert "were lost" in text or "did not run for" in text, text[-3000:]
