"""Fault injection: walex must lose nothing whatever breaks, and ack nothing early.

Each test runs the workload (``workload.py``) against a fresh database of a
private cluster while a consumer process (``consumer.py``, a WalEx app with a
durable slot logging every event to SQLite) streams it, injects one kind of
fault, lets the consumer catch up, stops it cleanly and checks the invariants
of ``harness.verify`` against the ground truth. Figures of every run go to
``tests/chaos/last_run.json`` and the end of the pytest output.

Reproduce a run with ``WALEX_CHAOS_SEED=<seed from the report>`` (the
workload's shape is seeded; timings are not).
"""

from __future__ import annotations

import random
import re
import signal
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from harness import STATUS_INTERVAL, ChaosRun, record
from proxy import Proxy
from walex.embedded import Cluster

pytestmark = pytest.mark.chaos

SIGKILLS = 24


def _finish(run: ChaosRun, catch_up_timeout: float = 60) -> dict[str, Any]:
    report = run.finish(catch_up_timeout)
    record(report)
    print(f"\n{run.name} pg{report['server']}: faults={report['faults']} "
          f"events={report['events_delivered']} duplicates={report['duplicates']} "
          f"lost={report['lost']} early_acks={report['early_acks']} "
          f"processes={report['consumer_processes']} reconnects={report['reconnects']} "
          f"seconds={report['seconds']} seed={report['seed']}")
    assert not report["violations"], "invariants violated:\n" + "\n".join(report["violations"])
    assert report["lost"] == 0
    return report


@pytest.fixture
def run_factory(chaos_cluster: Cluster, tmp_path: Path, seed: int):
    runs: list[ChaosRun] = []

    def make(name: str) -> ChaosRun:
        run = ChaosRun(chaos_cluster, name, tmp_path, seed)
        runs.append(run)
        return run

    yield make
    for run in runs:
        run.close()


def test_sigkill_consumer_many_times(run_factory: Any, seed: int) -> None:
    """SIGKILL the consumer at random points (startup included) while the workload runs.

    Each new process starts once the killed one's walsender is gone (restarting
    while the slot is still held is test_second_consumer_waits_for_the_slot)."""
    rng = random.Random(seed)
    run = run_factory("sigkill")
    run.start_consumer()
    run.workload.start()
    for _ in range(SIGKILLS):
        inc = run.incarnations[-1]
        time.sleep(rng.uniform(0.15, 1.6))
        assert inc.proc.poll() is None, f"consumer exited by itself:\n{run.consumer_log_tail()}"
        run.fault("sigkill")
        run.kill(inc)
        run.start_consumer(wait_ready=False)
    report = _finish(run)
    assert report["faults"] >= 20


def test_crash_after_dispatch_before_ack(run_factory: Any, seed: int) -> None:
    """``after_dispatch=exit@N``: handled but not acknowledged, so delivered again, same ids."""
    rng = random.Random(seed)
    run = run_factory("exit_after_dispatch")
    run.start_consumer()
    run.workload.start()
    time.sleep(0.5)
    crashed: list[tuple[int, int]] = []  # (pid, confirmed after its death)
    run.kill(run.incarnations[-1], signal.SIGTERM)
    for _ in range(5):
        n = rng.randint(2, 25)
        inc = run.start_consumer(failpoints=f"after_dispatch=exit@{n}", wait_ready=False)
        code = run.reap(inc)
        assert code == 137, f"failpoint exit expected, got {code}:\n{run.consumer_log_tail()}"
        run.fault("exit_after_dispatch")
        crashed.append((inc.pid, inc.end_confirmed or 0))
    run.start_consumer()
    report = _finish(run)
    rows = run.log_rows()
    for pid, confirmed in crashed:
        mine = [r for r in rows if r["pid"] == pid]
        assert mine, f"crashed consumer {pid} handled nothing"
        last_end = mine[-1]["end_lsn"]
        assert last_end > confirmed, "the transaction handled before the crash was acknowledged"
        last_ids = [r["id"] for r in mine if r["end_lsn"] == last_end]
        later = [r["id"] for r in rows if r["rowid"] > mine[-1]["rowid"] and r["end_lsn"] == last_end]
        assert later[: len(last_ids)] == last_ids, "the unacknowledged transaction was not redelivered whole"
    assert report["duplicates"] > 0


def test_server_immediate_restart(run_factory: Any, chaos_cluster: Cluster, seed: int) -> None:
    """``pg_ctl -m immediate`` restarts: the consumer reconnects by itself."""
    rng = random.Random(seed)
    run = run_factory("server_crash")
    inc = run.start_consumer()
    run.workload.start()
    for _ in range(3):
        time.sleep(rng.uniform(1.0, 2.5))
        run.fault("server_immediate_restart")
        chaos_cluster.restart(mode="immediate")
    time.sleep(1.0)
    assert inc.proc.poll() is None, f"consumer died:\n{run.consumer_log_tail()}"
    report = _finish(run)
    assert report["consumer_processes"] == 1
    assert report["reconnects"] >= 3


def test_walsender_terminated(run_factory: Any, seed: int) -> None:
    """``pg_terminate_backend`` of the walsender: the consumer reconnects by itself."""
    rng = random.Random(seed)
    run = run_factory("terminate_walsender")
    inc = run.start_consumer()
    run.workload.start()
    with psycopg.connect(run.cluster.dsn(), autocommit=True) as conn:
        for _ in range(6):
            time.sleep(rng.uniform(0.3, 1.5))
            deadline = time.monotonic() + 20
            while True:
                killed = conn.execute(
                    "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                    "WHERE slot_name = %s AND active_pid IS NOT NULL", (run.slot,)).fetchall()
                if killed:
                    break
                assert time.monotonic() < deadline, f"walsender never came back:\n{run.consumer_log_tail()}"
                time.sleep(0.05)
            run.fault("pg_terminate_backend")
    assert inc.proc.poll() is None, f"consumer died:\n{run.consumer_log_tail()}"
    report = _finish(run)
    assert report["consumer_processes"] == 1
    assert report["reconnects"] >= 6


def test_network_partition(run_factory: Any, chaos_cluster: Cluster, seed: int) -> None:
    """A proxy silently drops every byte for a while: walex notices the silence
    after wal_sender_timeout (2s here) + status_interval, the longest a healthy
    but busy walsender may stay silent, and reconnects once traffic flows again."""
    rng = random.Random(seed)
    run = run_factory("network_partition")
    proxy = Proxy(chaos_cluster.host, chaos_cluster.port).start()
    with psycopg.connect(chaos_cluster.dsn("postgres"), autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET wal_sender_timeout = '2s'")
        conn.execute("SELECT pg_reload_conf()")
    try:
        inc = run.start_consumer(dsn=f"postgresql://postgres@127.0.0.1:{proxy.port}/{run.dbname}")
        run.workload.start()
        partitions: list[float] = []
        for _ in range(3):
            time.sleep(rng.uniform(1.0, 2.0))
            run.fault("network_partition")
            partitions.append(time.time())
            proxy.partition()
            time.sleep(4.0)
            proxy.heal()
        time.sleep(1.0)
        assert inc.proc.poll() is None, f"consumer died:\n{run.consumer_log_tail()}"
        report = _finish(run)
    finally:
        proxy.stop()
        with psycopg.connect(chaos_cluster.dsn("postgres"), autocommit=True) as conn:
            conn.execute("ALTER SYSTEM RESET wal_sender_timeout")
            conn.execute("SELECT pg_reload_conf()")
    log = run.consumer_log()
    noticed = [float(m.group(1)) for m in re.finditer(
        r"^(\d+\.\d+) \d+ walex WARNING replication interrupted: the server sent nothing", log, re.M)]
    latencies = []
    for start in partitions:
        after = [t for t in noticed if t >= start]
        assert after, f"the partition at {start:.3f} went unnoticed:\n{run.consumer_log_tail()}"
        latencies.append(round(after[0] - start, 2))
    report["silence_detected_after"] = latencies
    record(report)
    assert all(lat <= 2.0 + STATUS_INTERVAL + 1.5 for lat in latencies), latencies
    assert report["reconnects"] >= 3
    assert proxy.dropped_bytes > 0


def test_handler_raises_stops_without_ack(run_factory: Any, seed: int) -> None:
    """A handler that keeps raising (on_error="stop"): the process exits non-zero and
    acknowledges nothing of that transaction; once fixed, it is delivered."""
    run = run_factory("handler_raises")
    run.start_consumer()
    run.workload.start()
    time.sleep(0.5)
    run.kill(run.incarnations[-1], signal.SIGTERM)
    failed: list[tuple[int, int]] = []
    for fail_after in (15, 25):
        inc = run.start_consumer(args=("--fail-after", str(fail_after)), wait_ready=False)
        code = run.reap(inc)
        assert code == 3, f"non-zero exit 3 expected, got {code}:\n{run.consumer_log_tail()}"
        run.fault("handler_raises")
        failed.append((inc.pid, fail_after))
        assert "injected handler failure" in run.consumer_log()
    run.start_consumer()
    _finish(run)
    rows = run.log_rows()
    for pid, fail_after in failed:
        inc = next(i for i in run.incarnations if i.pid == pid)
        mine = [r for r in rows if r["pid"] == pid]
        assert len({r["call"] for r in mine}) == fail_after
        # The failed transaction: the first one delivered after that process's last that it
        # had not handled.
        last = mine[-1]["rowid"]
        done = {r["end_lsn"] for r in rows if r["rowid"] <= last}
        nxt = next(r for r in rows if r["rowid"] > last and r["end_lsn"] not in done)
        assert nxt["end_lsn"] > (inc.end_confirmed or 0), (
            f"the failing transaction (ending at {nxt['end_lsn']:X}) was acknowledged "
            f"(slot at {inc.end_confirmed or 0:X})")
    assert "it was not acknowledged" in run.consumer_log()


def test_handler_slower_than_wal_sender_timeout(run_factory: Any, chaos_cluster: Cluster) -> None:
    """wal_sender_timeout = 2s, a handler sleeping 5s twice, a full queue: no
    disconnect (status updates keep flowing), nothing lost."""
    with psycopg.connect(chaos_cluster.dsn(), autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET wal_sender_timeout = '2s'")
        conn.execute("SELECT pg_reload_conf()")
    try:
        log_start = chaos_cluster.logfile.stat().st_size
        run = run_factory("slow_handler")
        with psycopg.connect(run.dsn, autocommit=True) as conn:
            assert conn.execute("SHOW wal_sender_timeout").fetchone()[0] == "2s"
        inc = run.start_consumer(args=("--sleep-calls", "10,40:5", "--max-pending", "4"))
        run.workload.start()
        run.fault("slow_handler")
        run.fault("slow_handler")
        deadline = time.monotonic() + 60
        while run.consumer_log().count("in the handler") < 2 or len(run.delivered_txns()) < 45:
            assert time.monotonic() < deadline, run.consumer_log_tail()
            assert inc.proc.poll() is None, run.consumer_log_tail()
            time.sleep(0.2)
        report = _finish(run)
        walsenders = {pid for _, _, _, pid in run.samples if pid is not None}
        server_log = chaos_cluster.logfile.read_bytes()[log_start:].decode(errors="replace")
    finally:
        with psycopg.connect(chaos_cluster.dsn(), autocommit=True) as conn:
            conn.execute("ALTER SYSTEM RESET wal_sender_timeout")
            conn.execute("SELECT pg_reload_conf()")
    assert "replication timeout" not in server_log, server_log
    assert "replication interrupted" not in run.consumer_log()
    assert report["reconnects"] == 0
    assert len(walsenders) == 1, f"the walsender changed: {walsenders}"


def test_status_updates_dropped(run_factory: Any, chaos_cluster: Cluster) -> None:
    """``before_status=skip``: the server hears no status update, so it ends the
    walsender after wal_sender_timeout (2s here; this also shows that the timeout
    of the slow-handler test is enforced); the consumer reconnects by itself, and
    after a SIGKILL a consumer without the fault gets every unacknowledged
    transaction again. (The failpoint does not cover the status update walex sends
    with a reply request after status_interval of silence, nor the last one at a
    clean stop: a few acknowledgements may still get through, so the slot is not
    asserted to stay put; the usual invariants hold either way.)"""
    with psycopg.connect(chaos_cluster.dsn(), autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET wal_sender_timeout = '2s'")
        conn.execute("SELECT pg_reload_conf()")
    try:
        log_start = chaos_cluster.logfile.stat().st_size
        run = run_factory("status_dropped")
        # walex's own silence detection (2 x 2s) is slower than the server's timeout here
        inc = run.start_consumer(failpoints="before_status=skip", status_interval=2.0)
        run.workload.start()
        run.fault("status_updates_dropped")
        deadline = time.monotonic() + 30
        while "replication timeout" not in chaos_cluster.logfile.read_bytes()[log_start:].decode(errors="replace"):
            assert time.monotonic() < deadline, "the server never timed the walsender out"
            time.sleep(0.2)
        time.sleep(2.0)
        assert inc.proc.poll() is None, run.consumer_log_tail()
        run.kill(inc)
        run.start_consumer()
        time.sleep(1.0)
        report = _finish(run)
    finally:
        with psycopg.connect(chaos_cluster.dsn(), autocommit=True) as conn:
            conn.execute("ALTER SYSTEM RESET wal_sender_timeout")
            conn.execute("SELECT pg_reload_conf()")
    assert report["reconnects"] >= 1
    assert report["duplicates"] > 0


def test_second_consumer_waits_for_the_slot(run_factory: Any) -> None:
    """A rolling restart (or a supervisor restarting a crashed consumer before its
    walsender is gone): the new process must wait for the slot, then take over."""
    run = run_factory("slot_in_use")
    first = run.start_consumer()
    run.workload.start()
    time.sleep(1.0)
    second = run.start_consumer(wait_ready=False, overlap=True)
    run.fault("slot_in_use")
    time.sleep(1.5)
    assert second.proc.poll() is None, (
        f"the second consumer gave up while the slot was held (exit {second.proc.returncode}):\n"
        + run.consumer_log_tail(8))
    run.kill(first, signal.SIGTERM)
    run.wait_ready(second)
    _finish(run)


def test_large_transaction_without_published_changes(run_factory: Any) -> None:
    """A bulk load of 1M rows into an unpublished table, in one transaction, between
    published ones: walex must not take the busy walsender for a dead one."""
    run = run_factory("large_unpublished_txn")
    with psycopg.connect(run.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE bulk (i int)")
    run.start_consumer(status_interval=0.2)
    run.workload.run_for(20)
    with psycopg.connect(run.dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO bulk SELECT generate_series(1, 1000000)")
    run.fault("large_unpublished_transaction")
    run.workload.run_for(20)
    report = _finish_with(run, catch_up_timeout=10)
    assert report["reconnects"] == 0, "walex dropped a healthy, busy connection"


def _finish_with(run: ChaosRun, catch_up_timeout: float) -> dict[str, Any]:
    try:
        return _finish(run, catch_up_timeout)
    except AssertionError as exc:
        reconnects = run.consumer_log().count("reconnected (session")
        raise AssertionError(f"{exc}\n({reconnects} reconnects)") from None
