"""Active-passive standby: two ``walex run --standby`` processes, the active one SIGKILLed mid-workload."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psycopg

from test_observe import get, samples, wait_until
from walex.embedded import free_port

WALEX = [sys.executable, "-m", "walex.cli"]
ROWS = 300

APP = """
import os, sqlite3, threading
from walex import WalEx, Events

events = Events()
db = sqlite3.connect(os.environ["STANDBY_LOG"], isolation_level=None, check_same_thread=False)
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA synchronous=FULL")
db.execute("CREATE TABLE IF NOT EXISTS log (id TEXT, pk INTEGER)")
lock = threading.Lock()

@events.on_insert("item")
def record(batch):  # durable before the handler returns, so before walex acknowledges
    with lock:
        db.execute("BEGIN IMMEDIATE")
        db.executemany("INSERT INTO log VALUES (?, ?)", [(e.id, e.new_record["id"]) for e in batch])
        db.execute("COMMIT")

app = WalEx({dsn!r}, publication="pub", modules=[events], name="standby_app",
            durable_slot=True, slot_name="standby_slot", status_interval=0.3)
"""


def logged(path: Path) -> list[tuple[str, int]]:
    if not path.exists():
        return []
    with sqlite3.connect(path) as db:
        try:
            return db.execute("SELECT id, pk FROM log ORDER BY rowid").fetchall()
        except sqlite3.OperationalError:  # the table is not there yet
            return []


def test_the_standby_takes_over_after_a_sigkill_with_nothing_lost(
    dsn: str, admin: psycopg.Connection, tmp_path: Path
) -> None:
    admin.execute("CREATE TABLE item (id int PRIMARY KEY)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE item")
    (tmp_path / "standby_app.py").write_text(textwrap.dedent(APP.format(dsn=dsn)))
    logs = {name: tmp_path / f"{name}.sqlite" for name in ("a", "b")}
    ports = {name: free_port() for name in ("a", "b")}
    procs: dict[str, subprocess.Popen[str]] = {}

    def start(name: str) -> None:
        procs[name] = subprocess.Popen(
            [*WALEX, "run", "standby_app:app", "--standby", "--metrics-port", str(ports[name])],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(tmp_path), "STANDBY_LOG": str(logs[name])},
        )

    def health(name: str) -> tuple[int, dict[str, object]]:
        status, body = get(f"http://127.0.0.1:{ports[name]}/healthz")
        return status, json.loads(body) if body else {}

    stop_workload = threading.Event()

    def workload() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for pk in range(1, ROWS + 1):
                conn.execute("INSERT INTO item VALUES (%s)", (pk,))
                time.sleep(0.01)
                if stop_workload.is_set():
                    return

    writer = threading.Thread(target=workload)
    try:
        start("a")
        wait_until(lambda: health("a")[0] == 200, "instance a streaming")
        start("b")
        wait_until(lambda: health("b")[1].get("status") == "standby", "instance b standby")
        assert get(f"http://127.0.0.1:{ports['b']}/livez")[0] == 200
        writer.start()
        wait_until(lambda: len(logged(logs["a"])) >= ROWS // 3, "a third of the rows handled by a")
        procs["a"].kill()  # SIGKILL: no goodbye, no last acknowledgement
        procs["a"].wait(timeout=30)
        wait_until(lambda: health("b")[0] == 200, "instance b taking over", timeout=60)
        writer.join(timeout=60)
        wait_until(lambda: {pk for _, pk in logged(logs["b"])} >= {ROWS},
                   "the last row handled by b", timeout=60)
        found = samples(get(f"http://127.0.0.1:{ports['b']}/metrics")[1])
        assert found["walex_takeovers_total"] == 1 and found["walex_standby"] == 0
    finally:
        stop_workload.set()
        if writer.is_alive():
            writer.join(timeout=30)
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        outputs = {name: proc.communicate(timeout=30) for name, proc in procs.items()}
    assert procs["b"].returncode == 0, outputs["b"][1]
    b_log = outputs["b"][1]
    assert "is a standby: replication slot 'standby_slot' is held by another instance" in b_log
    assert "took over replication slot 'standby_slot'" in b_log

    a, b = logged(logs["a"]), logged(logs["b"])
    a_ids, b_ids = [i for i, _ in a], [i for i, _ in b]
    assert len(set(a_ids)) == len(a_ids) and len(set(b_ids)) == len(b_ids)  # no duplicate in one
    assert {pk for _, pk in a + b} == set(range(1, ROWS + 1))  # nothing lost
    pk_of = dict(a)
    assert all(pk_of.get(i, pk) == pk for i, pk in b)  # a redelivered change has the same id
    # b redelivers exactly what a handled without acknowledging it: a's tail, in order
    first = b_ids[0]
    assert first in a_ids or first > a_ids[-1]
    tail = [i for i in a_ids if i >= first]
    assert b_ids[:len(tail)] == tail
    assert len(a) >= ROWS // 3 and len(b) > 0
