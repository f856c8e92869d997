"""Active-passive standby: two ``walex run --standby`` processes, the active one SIGKILLed mid-workload."""

from __future__ import annotations

import asyncio
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
import pytest

from test_observe import get, samples, wait_until
from walex import Events, WalEx
from walex.embedded import Cluster, free_port
from walex.errors import StoppedError

sys.path.insert(0, str(Path(__file__).parent / "chaos"))
from proxy import Proxy  # noqa: E402

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


def test_a_sigterm_while_standing_by_stops_the_standby_cleanly(
    dsn: str, admin: psycopg.Connection, tmp_path: Path
) -> None:
    """SIGTERM (or SIGINT) to a standby waiting for the slot: exit 0 promptly, said in the log,
    nothing left behind; the active instance goes on holding the slot."""
    admin.execute("CREATE TABLE item (id int PRIMARY KEY)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE item")
    (tmp_path / "standby_app.py").write_text(textwrap.dedent(APP.format(dsn=dsn)))
    ports = {name: free_port() for name in ("a", "b", "c")}
    procs: dict[str, subprocess.Popen[str]] = {}

    def start(name: str) -> None:
        procs[name] = subprocess.Popen(
            [*WALEX, "run", "standby_app:app", "--standby", "--metrics-port", str(ports[name])],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(tmp_path),
                 "STANDBY_LOG": str(tmp_path / f"{name}.sqlite")},
        )

    def status(name: str) -> object:
        _, body = get(f"http://127.0.0.1:{ports[name]}/healthz")
        return json.loads(body).get("status") if body else None

    def slot() -> tuple[object, ...] | None:
        return admin.execute("SELECT active_pid, confirmed_flush_lsn FROM pg_replication_slots "
                             "WHERE slot_name = 'standby_slot'").fetchone()

    try:
        start("a")
        wait_until(lambda: status("a") == "streaming", "instance a streaming")
        held_by = slot()
        start("b")
        start("c")
        for name in ("b", "c"):
            wait_until(lambda: status(name) == "standby", f"instance {name} standby")
        time.sleep(1)  # a few polls of the slot into the wait
        for name, sig in (("b", signal.SIGTERM), ("c", signal.SIGINT)):
            procs[name].send_signal(sig)
            try:  # a hang detector, not a timing test: the stop takes well under a second
                out, err = procs[name].communicate(timeout=10)
            except subprocess.TimeoutExpired:
                procs[name].kill()
                out, err = procs[name].communicate()
                raise AssertionError(f"standby {name} still running 10s after {sig.name}:\n{err}")
            assert procs[name].returncode == 0, (sig.name, procs[name].returncode, err)
            assert ("walex 'standby_app' stopped while standing by for replication slot "
                    "'standby_slot'") in err, err
            assert "Traceback" not in err and "Task was destroyed" not in err, err
            assert "took over" not in err, err
        # the active instance still holds the slot (its position may move on: an idle
        # instance acknowledges the server's WAL end, which other databases move)
        now = slot()
        assert now is not None and held_by is not None and now[0] == held_by[0]
        assert int(admin.execute("SELECT %s::pg_lsn - %s::pg_lsn",
                                 [now[1], held_by[1]]).fetchone()[0]) >= 0
        assert status("a") == "streaming"
        assert admin.execute("SELECT count(*) FROM pg_replication_slots").fetchone() == (1,)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        outputs = {name: proc.communicate(timeout=30) for name, proc in procs.items()}
    assert procs["a"].returncode == 0, outputs["a"][1]


def test_stop_while_start_stands_by_ends_the_start_and_closes_what_it_opened(
    dsn: str, admin: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """``await app.stop()`` while ``await app.start()`` waits as a standby: start() raises
    StoppedError, stop() returns, the standby's connections and endpoint are gone."""
    admin.execute("CREATE TABLE item (id int PRIMARY KEY)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE item")
    options = {"publication": "pub", "modules": [Events()], "durable_slot": True,
               "slot_name": "stop_slot", "standby": True}
    active = WalEx(dsn, name="stop_active", **options)
    waiting = WalEx(dsn, name="stop_standby", metrics_port=0, **options)

    def connections(name: str) -> int:
        row = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                            [name]).fetchone()
        return int(row[0]) if row else 0

    async def scenario() -> None:
        await active.start()
        try:
            held_by = admin.execute("SELECT active_pid FROM pg_replication_slots").fetchall()
            starting = asyncio.create_task(waiting.start())
            while not waiting.pipeline.stats.standby:
                assert not starting.done(), starting
                await asyncio.sleep(0.05)
            port = waiting.observer.port
            assert port and (await asyncio.to_thread(get, f"http://127.0.0.1:{port}/livez"))[0] == 200
            assert connections("stop_standby") == 1  # its standby lock's connection
            await asyncio.wait_for(waiting.stop(), 10)  # a hang detector
            with pytest.raises(StoppedError, match="stopped while standing by for replication "
                                                   "slot 'stop_slot'; it never streamed"):
                await asyncio.wait_for(starting, 10)
            for _ in range(100):  # a closed connection's backend leaves pg_stat_activity soon after
                if connections("stop_standby") == 0:
                    break
                await asyncio.sleep(0.1)
            assert connections("stop_standby") == 0
            assert (await asyncio.to_thread(get, f"http://127.0.0.1:{port}/livez"))[0] == 0
            assert waiting.pipeline.stats.standby is False and waiting.pipeline.stats.takeovers == 0
            await asyncio.wait_for(waiting.wait(), 1)  # stopped: wait() does not hang
            assert admin.execute("SELECT active_pid FROM pg_replication_slots").fetchall() == held_by
        finally:
            await active.stop()

    with caplog.at_level("INFO", logger="walex"):
        asyncio.run(scenario())
    assert ("walex 'stop_standby' stopped while standing by for replication slot 'stop_slot'"
            in caplog.text)


TIMED_APP = """
import os, sqlite3, threading, time
from walex import WalEx, Events

events = Events()
db = sqlite3.connect(os.environ["STANDBY_LOG"], isolation_level=None, check_same_thread=False,
                     timeout=30)
db.execute("PRAGMA journal_mode=WAL")
db.execute("CREATE TABLE IF NOT EXISTS batch (pid INTEGER, start REAL, end REAL, ids TEXT)")
pid = os.getpid()

@events.on_insert("item")
def record(batch):  # every batch: which process handled it, and when
    start = time.time()
    time.sleep(0.05)  # a slow handler: a backlog builds up in the queue
    db.execute("INSERT INTO batch VALUES (?, ?, ?, ?)",
               (pid, start, time.time(), ",".join(str(e.new_record["id"]) for e in batch)))

app = WalEx(os.environ.get("STANDBY_DSN") or {dsn!r}, publication="pub", modules=[events],
            name="fenced_app",
            durable_slot=True, slot_name="fenced_slot", status_interval=0.3)
"""


def _batches(path: Path) -> list[tuple[int, float, float, str]]:
    with sqlite3.connect(path, timeout=30) as db:
        try:
            return db.execute("SELECT pid, start, end, ids FROM batch ORDER BY start").fetchall()
        except sqlite3.OperationalError:
            return []


def test_two_instances_never_handle_at_once_when_the_active_loses_a_connection(
    dsn: str, admin: psycopg.Connection, tmp_path: Path
) -> None:
    """Two ``--standby`` instances; the active one's walsender is terminated while it has a
    backlog, later its standby lock's connection: every batch is recorded with (pid, start,
    end), and no two batches of different processes overlap in time; nothing is lost."""
    admin.execute("CREATE TABLE item (id int PRIMARY KEY)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE item")
    (tmp_path / "fenced_app.py").write_text(textwrap.dedent(TIMED_APP.format(dsn=dsn)))
    log_path = tmp_path / "batches.sqlite"
    ports = {name: free_port() for name in ("a", "b")}
    procs: dict[str, subprocess.Popen[str]] = {}

    def start(name: str) -> None:
        procs[name] = subprocess.Popen(
            [*WALEX, "run", "fenced_app:app", "--standby", "--metrics-port", str(ports[name])],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(tmp_path), "STANDBY_LOG": str(log_path)},
        )

    def status(name: str) -> object:
        _, body = get(f"http://127.0.0.1:{ports[name]}/healthz")
        return json.loads(body).get("status") if body else None

    def handled() -> set[int]:
        return {int(i) for *_, ids in _batches(log_path) for i in ids.split(",")}

    def burst(first: int, count: int) -> None:  # one transaction per row: one batch each
        with psycopg.connect(dsn, autocommit=True) as conn:
            for pk in range(first, first + count):
                conn.execute("INSERT INTO item VALUES (%s)", (pk,))

    def no_overlap() -> None:
        batches = _batches(log_path)
        for (pid1, _, end1, ids1), (pid2, start2, _, ids2) in zip(batches, batches[1:]):
            assert pid1 == pid2 or end1 <= start2, (
                f"process {pid1} handled {ids1} until {end1} while process {pid2} "
                f"had begun {ids2} at {start2}")

    def backlog() -> bool:  # the active instance received rows it has not handled yet
        for name in ports:
            found = samples(get(f"http://127.0.0.1:{ports[name]}/metrics")[1])
            if found.get("walex_streaming") == 1 and found.get("walex_pending_bytes", 0) > 0:
                return True
        return False

    try:
        start("a")
        wait_until(lambda: status("a") == "streaming", "instance a streaming")
        start("b")
        wait_until(lambda: status("b") == "standby", "instance b standby")
        rows = 0
        # 1. the walsender of the active instance is terminated while it has a backlog
        burst(rows + 1, 120)
        rows += 120
        wait_until(backlog, "a backlog in the active instance")
        admin.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                      "WHERE slot_name = 'fenced_slot'")
        wait_until(lambda: handled() >= set(range(1, rows + 1)), "every row handled", timeout=90)
        no_overlap()
        # 2. the connection holding the active instance's standby lock is terminated
        burst(rows + 1, 120)
        rows += 120
        wait_until(backlog, "a backlog in the active instance")
        [holder] = admin.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted").fetchall()
        admin.execute("SELECT pg_terminate_backend(%s)", holder)
        wait_until(lambda: handled() >= set(range(1, rows + 1)), "every row handled", timeout=90)
        wait_until(lambda: {status("a"), status("b")} == {"streaming", "standby"},
                   "one instance streaming, the other standing by", timeout=60)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        outputs = {name: proc.communicate(timeout=30) for name, proc in procs.items()}
        for name, (_, err) in outputs.items():
            print(f"--- instance {name}:\n{err}")  # shown when the test fails
    for name, proc in procs.items():
        assert proc.returncode == 0, outputs[name][1]
    no_overlap()
    assert handled() == set(range(1, rows + 1))


class Instances:
    """``walex run standby_app:app --standby`` processes, each with its port, log file and
    stderr in a file (read while it runs)."""

    def __init__(self, tmp_path: Path, dsn: str) -> None:
        self.tmp_path = tmp_path
        app = textwrap.dedent(APP.format(dsn=dsn)).replace(
            f"WalEx({dsn!r},", 'WalEx(os.environ["STANDBY_DSN"],')
        (tmp_path / "standby_app.py").write_text(app)
        self.dsn = dsn
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.ports: dict[str, int] = {}

    def start(self, name: str, dsn: str | None = None) -> None:
        self.ports[name] = free_port()
        env = {**os.environ, "PYTHONPATH": str(self.tmp_path),
               "STANDBY_LOG": str(self.tmp_path / f"{name}.sqlite")}
        env["STANDBY_DSN"] = dsn or self.dsn  # an instance may connect through a proxy
        with open(self.tmp_path / f"{name}.err", "w") as err:
            self.procs[name] = subprocess.Popen(
                [*WALEX, "run", "standby_app:app", "--standby", "--metrics-port",
                 str(self.ports[name])], cwd=self.tmp_path, stdout=subprocess.DEVNULL,
                stderr=err, text=True, env=env)

    def err(self, name: str) -> str:
        return (self.tmp_path / f"{name}.err").read_text()

    def status(self, name: str) -> object:
        _, body = get(f"http://127.0.0.1:{self.ports[name]}/healthz")
        return json.loads(body).get("status") if body else None

    def logged(self, name: str) -> set[int]:
        return {pk for _, pk in logged(self.tmp_path / f"{name}.sqlite")}

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def own_cluster(pg_cluster: object) -> object:
    """A cluster of this test's own, which it may stop and partition."""
    bindir = getattr(getattr(pg_cluster, "cluster", None), "bindir", None)
    if bindir is None:
        pytest.skip("stops the server: needs a throwaway cluster, not WALEX_TEST_DSN")
    with Cluster(bindir) as cluster:
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            conn.execute("CREATE TABLE item (id int PRIMARY KEY)")
            conn.execute("CREATE PUBLICATION pub FOR TABLE item")
        yield cluster


def test_a_standby_that_never_streamed_survives_a_server_restart(
    own_cluster: Cluster, tmp_path: Path
) -> None:
    """The server restarts (down 1.5 s) while one instance streams and the other stands by:
    neither exits; afterwards one streams, the other stands by, and changes flow."""
    dsn = own_cluster.dsn()
    run = Instances(tmp_path, dsn)
    try:
        run.start("a")
        wait_until(lambda: run.status("a") == "streaming", "instance a streaming")
        run.start("b")
        wait_until(lambda: run.status("b") == "standby", "instance b standby")
        own_cluster.stop("fast")
        time.sleep(1.5)
        own_cluster.restart()
        wait_until(lambda: {run.status("a"), run.status("b")} == {"streaming", "standby"},
                   "one instance streaming, the other standing by again", timeout=90)
        for name, proc in run.procs.items():
            assert proc.poll() is None, (name, proc.returncode, run.err(name))
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO item VALUES (1)")
        wait_until(lambda: 1 in run.logged("a") | run.logged("b"), "the row handled", timeout=60)
    finally:
        run.stop()
    for name, proc in run.procs.items():
        assert proc.returncode == 0, (name, run.err(name))


def test_a_standby_behind_a_silent_partition_notices_reconnects_and_takes_over(
    own_cluster: Cluster, tmp_path: Path
) -> None:
    """The standby's network goes silent (a proxy drops every byte): its wait notices within
    its query timeout and says so; once the network is back and the active instance is gone,
    it takes over."""
    dsn = own_cluster.dsn()
    host, port = psycopg.conninfo.conninfo_to_dict(dsn)["host"], own_cluster.port
    proxy = Proxy(str(host), int(port)).start()
    via_proxy = psycopg.conninfo.make_conninfo(dsn, host="127.0.0.1", port=proxy.port)
    run = Instances(tmp_path, dsn)
    try:
        run.start("a")
        wait_until(lambda: run.status("a") == "streaming", "instance a streaming")
        run.start("b", via_proxy)
        wait_until(lambda: run.status("b") == "standby", "instance b standby")
        proxy.partition()
        wait_until(lambda: "did not answer" in run.err("b"), "the standby noticing the silence",
                   timeout=60)
        assert run.procs["b"].poll() is None, run.err("b")
        run.procs["a"].kill()  # the slot is free, but b cannot reach the server yet
        run.procs["a"].wait(timeout=30)
        proxy.heal()
        wait_until(lambda: run.status("b") == "streaming", "instance b taking over", timeout=120)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO item VALUES (1)")
        wait_until(lambda: 1 in run.logged("b"), "the row handled by b", timeout=60)
    finally:
        run.stop()
        proxy.stop()
    assert run.procs["b"].returncode == 0, run.err("b")
    assert "took over replication slot 'standby_slot'" in run.err("b")


def test_an_active_instance_cut_off_by_a_partition_stops_handling(
    own_cluster: Cluster, tmp_path: Path
) -> None:
    """The active instance's network goes silent (a proxy drops every byte) while it has a
    backlog: it notices that its standby lock's connection does not answer, says so and
    starts no batch after that; once the network is back, every row is handled, and no two
    batches of different processes overlap."""
    dsn = own_cluster.dsn()
    proxy = Proxy("127.0.0.1", own_cluster.port).start()
    via_proxy = psycopg.conninfo.make_conninfo(dsn, host="127.0.0.1", port=proxy.port)
    (tmp_path / "fenced_app.py").write_text(textwrap.dedent(TIMED_APP.format(dsn=dsn)))
    log_path = tmp_path / "batches.sqlite"
    ports = {name: free_port() for name in ("a", "b")}
    procs: dict[str, subprocess.Popen[str]] = {}

    def start(name: str, url: str) -> None:
        with open(tmp_path / f"{name}.err", "w") as err:
            procs[name] = subprocess.Popen(
                [*WALEX, "run", "fenced_app:app", "--standby", "--metrics-port", str(ports[name])],
                cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err, text=True,
                env={**os.environ, "PYTHONPATH": str(tmp_path), "STANDBY_LOG": str(log_path),
                     "STANDBY_DSN": url})

    def status(name: str) -> object:
        _, body = get(f"http://127.0.0.1:{ports[name]}/healthz")
        return json.loads(body).get("status") if body else None

    def handled() -> set[int]:
        return {int(i) for *_, ids in _batches(log_path) for i in ids.split(",")}

    def lost_line() -> str | None:
        for line in (tmp_path / "a.err").read_text().splitlines():
            if "lost its standby lock" in line:
                return line
        return None

    try:
        start("a", via_proxy)
        wait_until(lambda: status("a") == "streaming", "instance a streaming")
        start("b", dsn)
        wait_until(lambda: status("b") == "standby", "instance b standby")
        with psycopg.connect(dsn, autocommit=True) as conn:
            for pk in range(1, 301):  # one transaction per row: 300 batches of 0.05 s
                conn.execute("INSERT INTO item VALUES (%s)", (pk,))
        wait_until(lambda: samples(get(f"http://127.0.0.1:{ports['a']}/metrics")[1]).get(
            "walex_pending_bytes", 0) > 0, "a backlog in instance a")
        proxy.partition()
        line = wait_until(lost_line, "instance a saying it lost its lock", timeout=60)
        said = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1000
        a_pid = procs["a"].pid
        # nothing begun after it said it stopped (the log's clock is read to the ms, and the
        # call that began as it said so is the one in hand: one call of 0.05 s of slack)
        late = [(start, ids) for pid, start, _, ids in _batches(log_path)
                if pid == a_pid and start > said + 0.06]
        assert late == [], late
        proxy.heal()
        wait_until(lambda: handled() >= set(range(1, 301)), "every row handled", timeout=120)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        proxy.stop()
    batches = _batches(log_path)
    for (pid1, _, end1, ids1), (pid2, start2, _, ids2) in zip(batches, batches[1:]):
        assert pid1 == pid2 or end1 <= start2, (
            f"process {pid1} handled {ids1} until {end1} while process {pid2} "
            f"had begun {ids2} at {start2}")
    assert handled() == set(range(1, 301))
