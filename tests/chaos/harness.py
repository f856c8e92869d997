"""One run of a fault scenario: consumer processes, the workload, a monitor, the checks.

A :class:`ChaosRun` owns a fresh database on the chaos cluster, a durable
slot and the consumer's SQLite log. It starts and kills consumer processes
(*incarnations*), recording for each the slot's ``confirmed_flush_lsn`` it
started from (read once the previous one and its walsender were gone). A
monitor thread samples ``confirmed_flush_lsn`` and the size of the log every
few tens of milliseconds. :func:`verify` then checks the invariants of the
brief against the ground truth of the workload:

- nothing lost: every committed transaction delivered, whole and exact
  (positions, types, pks, seqs, payload hashes), rolled-back work never;
- transactions whole: a handler call holds one transaction, all its events;
- order: first deliveries are in commit order, ids increase with it, and per
  pk, seq increases (a delete repeats the last seq);
- duplicates only where allowed: within one process never; a new process
  delivers exactly the committed transactions above the confirmed position it
  started from, in order (so it redelivers every unacknowledged one, with the
  same ids, and nothing acknowledged);
- no early acknowledgement: whenever the slot's ``confirmed_flush_lsn`` was
  C, every committed transaction ending at or below C was already in the
  durable log. (The brief's "C never ahead of the largest end LSN in the
  log" is this rule when every WAL record belongs to a published
  transaction; walex also acknowledges the server's WAL end when it is idle,
  which legitimately moves C past the log over unpublished WAL, so the
  stronger rule is the one checked; the samples where C was past the log's
  largest end LSN are counted as ``idle_acks_past_log``.)
"""

from __future__ import annotations

import bisect
import json
import os
import select
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from walex.embedded import Cluster
from walex.lsn import format_lsn, parse_lsn

import workload as wl

CONSUMER = Path(__file__).with_name("consumer.py")
STATUS_INTERVAL = 0.5
SUMMARY = Path(__file__).with_name("last_run.json")
RESULTS: list[dict[str, Any]] = []  # the reports of this session's runs
_session_start = time.time()


def record(report: dict[str, Any]) -> None:
    """Add (or, for the same scenario and server, replace) a report; rewrite the summary."""
    RESULTS[:] = [r for r in RESULTS
                  if (r["scenario"], r["server"]) != (report["scenario"], report["server"])]
    RESULTS.append(report)
    SUMMARY.write_text(json.dumps({
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(_session_start)),
        "seconds": round(time.time() - _session_start, 1),
        "runs": RESULTS,
        "totals": {k: sum(r.get(k, 0) for r in RESULTS)
                   for k in ("faults", "events_delivered", "duplicates", "lost", "early_acks")},
    }, indent=2, default=str) + "\n")


@dataclass
class Incarnation:
    proc: subprocess.Popen[bytes]
    start_confirmed: int | None  # the slot's confirmed_flush_lsn it started from (None: no slot yet)
    started: float
    end_confirmed: int | None = None
    exit_code: int | None = None
    overlapped: bool = False  # started while another consumer held the slot: start unknown

    @property
    def pid(self) -> int:
        return self.proc.pid


class ChaosRun:
    def __init__(self, cluster: Cluster, name: str, tmp: Path, seed: int) -> None:
        self.cluster = cluster
        self.name = name
        self.seed = seed
        self.dbname = f"chaos_{name}"
        self.slot = f"chaos_{name}"
        self.dsn = cluster.dsn(self.dbname)
        self.log_path = tmp / "events.sqlite"
        self.stderr_path = tmp / "consumer.log"
        self.incarnations: list[Incarnation] = []
        self.samples: list[tuple[float, int, int, int | None]] = []  # t, confirmed, log rows, active_pid
        self.faults: list[tuple[float, str]] = []
        self.t0 = time.time()
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.dbname)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.dbname)))
        wl.setup(self.dsn)
        self.workload = wl.Workload(self.dsn, seed)
        self._stop_monitor = threading.Event()
        self._monitor = threading.Thread(target=self._monitor_loop, name="chaos-monitor", daemon=True)
        self._monitor.start()

    # -- the consumer ----------------------------------------------------

    def start_consumer(self, *, dsn: str | None = None, failpoints: str = "",
                       args: tuple[str, ...] = (), wait_ready: bool = True,
                       status_interval: float = STATUS_INTERVAL, overlap: bool = False) -> Incarnation:
        """Start a consumer process; ``overlap``: while the previous one still runs
        (its start position is then unknown, and checked more loosely)."""
        running = bool(self.incarnations) and self.incarnations[-1].proc.poll() is None
        assert overlap == running, "the previous consumer is still running" if running else "no overlap"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WALEX_", "PG"))}
        if failpoints:
            env["WALEX_FAILPOINTS"] = failpoints
        start = None if overlap else self.slot_state()[0]
        with open(self.stderr_path, "ab") as err:
            err.write(f"--- {time.time():.3f} consumer start, failpoints={failpoints!r} args={args}"
                      f" confirmed={format_lsn(start) if start is not None else None}\n".encode())
            err.flush()
            proc = subprocess.Popen(
                [sys.executable, str(CONSUMER), "--dsn", dsn or self.dsn, "--slot", self.slot,
                 "--log", str(self.log_path), "--status-interval", str(status_interval), *args],
                stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, env=env,
            )
        inc = Incarnation(proc, start, time.time(), overlapped=overlap)
        self.incarnations.append(inc)
        if wait_ready:
            self.wait_ready(inc)
        return inc

    def wait_ready(self, inc: Incarnation, timeout: float = 60) -> None:
        assert inc.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([inc.proc.stdout], [], [], 0.1)
            if ready:
                line = inc.proc.stdout.readline()
                if line.strip() == b"READY":
                    return
                if not line:
                    break
        raise AssertionError(f"consumer {inc.pid} not ready (exit {inc.proc.poll()}):\n{self.consumer_log_tail()}")

    def kill(self, inc: Incarnation, sig: int = signal.SIGKILL) -> None:
        inc.proc.send_signal(sig)
        self.reap(inc)

    def reap(self, inc: Incarnation, timeout: float = 60) -> int:
        """Wait for the process and its walsender to be gone; record the slot's position."""
        try:
            inc.exit_code = inc.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"consumer {inc.pid} did not exit within {timeout}s:\n"
                                 f"{self.consumer_log_tail()}") from None
        if inc.proc.stdout is not None:
            inc.proc.stdout.close()
        if any(i.proc.poll() is None for i in self.incarnations):
            return inc.exit_code  # another consumer may hold the slot already
        deadline = time.monotonic() + 30
        while True:
            confirmed, active_pid, walsenders = self.slot_state(walsenders=True)
            if active_pid is None and walsenders == 0:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"the walsender of dead consumer {inc.pid} stayed ({active_pid})")
            time.sleep(0.02)
        inc.end_confirmed = confirmed
        return inc.exit_code

    def slot_state(self, walsenders: bool = False) -> tuple[int | None, int | None, int]:
        """(confirmed_flush_lsn, active_pid, walsender backends of the database)."""
        for _ in range(600):
            try:
                with psycopg.connect(self.cluster.dsn(), autocommit=True, connect_timeout=5) as conn:
                    row = conn.execute(
                        "SELECT confirmed_flush_lsn::text, active_pid FROM pg_replication_slots "
                        "WHERE slot_name = %s", (self.slot,)).fetchone()
                    count = 0
                    if walsenders:
                        count = conn.execute(
                            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                            "AND backend_type = 'walsender'", (self.dbname,)).fetchone()[0]
                break
            except psycopg.OperationalError:
                time.sleep(0.1)
        else:
            raise AssertionError("the server did not answer for a minute")
        if row is None:
            return None, None, count
        return (parse_lsn(row[0]) if row[0] else None), row[1], count

    def consumer_log(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def consumer_log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.consumer_log().splitlines()[-lines:])

    # -- monitor ---------------------------------------------------------

    def _monitor_loop(self) -> None:
        conn: psycopg.Connection | None = None
        db: sqlite3.Connection | None = None
        while not self._stop_monitor.wait(0.03):
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.cluster.dsn(), autocommit=True, connect_timeout=2)
                row = conn.execute(
                    "SELECT confirmed_flush_lsn::text, active_pid FROM pg_replication_slots "
                    "WHERE slot_name = %s", (self.slot,)).fetchone()
            except psycopg.Error:
                if conn is not None:
                    conn.close()
                conn = None
                continue
            if row is None or row[0] is None:
                continue
            confirmed = parse_lsn(row[0])
            try:  # read the log after the slot: what was acknowledged must be there
                if db is None:
                    if not self.log_path.exists():
                        self.samples.append((time.time(), confirmed, 0, row[1]))
                        continue
                    db = sqlite3.connect(f"file:{self.log_path}?mode=ro", uri=True, timeout=5)
                rows = db.execute("SELECT coalesce(max(rowid), 0) FROM log").fetchone()[0]
            except sqlite3.Error:
                continue
            self.samples.append((time.time(), confirmed, rows, row[1]))
        if conn is not None:
            conn.close()
        if db is not None:
            db.close()

    # -- reading the outcome ---------------------------------------------

    def log_rows(self) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        db = sqlite3.connect(f"file:{self.log_path}?mode=ro", uri=True, timeout=10)
        db.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in db.execute("SELECT * FROM log ORDER BY rowid")]
        except sqlite3.OperationalError:  # no table yet
            return []
        finally:
            db.close()

    def delivered_txns(self) -> set[int]:
        return {r["pk"] for r in self.log_rows() if r["tbl"] == "txns"}

    def wait_caught_up(self, timeout: float = 60) -> None:
        """Wait until every committed transaction reached the log."""
        truth = set(wl.ground_truth(self.dsn))
        deadline = time.monotonic() + timeout
        while True:
            missing = truth - self.delivered_txns()
            if not missing:
                return
            inc = self.incarnations[-1]
            if inc.proc.poll() is not None:
                raise AssertionError(f"consumer {inc.pid} exited ({inc.proc.returncode}) with "
                                     f"{len(missing)} transactions missing:\n{self.consumer_log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(missing)} committed transactions not delivered after "
                                     f"{timeout}s, e.g. {sorted(missing)[:10]}:\n{self.consumer_log_tail()}")
            time.sleep(0.1)

    def finish(self, catch_up_timeout: float = 60) -> dict[str, Any]:
        """Stop the workload, let the consumer catch up, stop it cleanly, verify."""
        self.workload.stop()
        inc = self.incarnations[-1]
        if inc.proc.poll() is not None:
            inc = self.start_consumer()
        self.wait_caught_up(catch_up_timeout)
        time.sleep(3 * STATUS_INTERVAL)  # a few samples of the settled slot
        code = self.reap_after(signal.SIGTERM, inc)
        assert code == 0, f"consumer did not stop cleanly on SIGTERM (exit {code}):\n{self.consumer_log_tail()}"
        self._stop_monitor.set()
        self._monitor.join(10)
        report = verify(self.log_rows(), wl.ground_truth(self.dsn), self.workload.commit_order,
                        self.workload.aborted, self.incarnations, self.samples)
        report["final_confirmed_after_clean_stop"] = format_lsn(inc.end_confirmed or 0)
        if report["last_end_lsn"] and (inc.end_confirmed or 0) < parse_lsn(report["last_end_lsn"]):
            report["violations"].append(
                f"after a clean stop the slot is at {format_lsn(inc.end_confirmed or 0)}, below the "
                f"last handled transaction ({report['last_end_lsn']})")
        report.update(scenario=self.name, seed=self.seed, server=self.cluster.major_version,
                      faults=len(self.faults), fault_kinds=sorted({f for _, f in self.faults}),
                      consumer_processes=len(self.incarnations),
                      reconnects=self.consumer_log().count("reconnected (session"),
                      workload=dict(self.workload.stats, transactions_tried=self.workload.txn_no,
                                    workload_errors=self.workload.errors),
                      seconds=round(time.time() - self.t0, 1))
        return report

    def reap_after(self, sig: int, inc: Incarnation) -> int:
        inc.proc.send_signal(sig)
        return self.reap(inc)

    def fault(self, kind: str) -> None:
        self.faults.append((time.time(), kind))

    def close(self) -> None:
        """Stop whatever is still running and drop the database and its slot."""
        self._stop_monitor.set()
        try:
            self.workload.stop()
        except BaseException:  # noqa: BLE001 - already reported, or the test failed anyway
            pass
        for inc in self.incarnations:
            if inc.proc.poll() is None:
                inc.proc.kill()
                inc.proc.wait(10)
        self._monitor.join(10)
        try:
            with psycopg.connect(self.cluster.dsn(), autocommit=True, connect_timeout=10) as conn:
                for _ in range(100):
                    conn.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                                 "WHERE slot_name = %s AND active_pid IS NOT NULL", (self.slot,))
                    try:
                        conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM "
                                     "pg_replication_slots WHERE slot_name = %s", (self.slot,))
                        break
                    except psycopg.errors.ObjectInUse:
                        time.sleep(0.1)
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                             .format(sql.Identifier(self.dbname)))
        except psycopg.Error:
            pass


# -- the checks -----------------------------------------------------------


def _expected_event(op: list[Any]) -> tuple[Any, ...]:
    kind, table, pk, seq, vhash = op
    return (table, kind, pk, seq, vhash)


def verify(rows: list[dict[str, Any]], truth: dict[int, list[Any]], commit_order: list[int],
           aborted: list[int], incarnations: list[Incarnation],
           samples: list[tuple[float, int, int, int | None]]) -> dict[str, Any]:
    """Check the invariants; returns figures and a list of violations (empty: all good)."""
    violations: list[str] = []

    def bad(message: str) -> None:
        if len(violations) < 50:
            violations.append(message)

    # Deliveries: one handler call = one transaction.
    calls: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for r in rows:
        calls.setdefault((r["pid"], r["call"]), []).append(r)
    deliveries: list[tuple[int, int, int | None, int]] = []  # pid, end_lsn, txn_no, first rowid
    end_of: dict[int, int] = {}
    ids_of: dict[int, list[str]] = {}
    for (pid, call), evs in calls.items():
        ends = {e["end_lsn"] for e in evs}
        if len(ends) != 1:
            bad(f"pid {pid} call {call} mixes transactions {sorted(format_lsn(x) for x in ends)}")
            continue
        end = ends.pop()
        markers = [e["pk"] for e in evs if e["tbl"] == "txns"]
        txn = markers[0] if len(markers) == 1 else None
        deliveries.append((pid, end, txn, evs[0]["rowid"]))
        if txn is None:
            bad(f"transaction ending at {format_lsn(end)} (pid {pid}) has {len(markers)} markers: "
                f"partial or unknown: {[e['id'] for e in evs]}")
            continue
        if txn not in truth:
            bad(f"transaction {txn} ending at {format_lsn(end)} was delivered but never committed"
                f"{' (it was rolled back)' if txn in aborted else ''}")
            continue
        got = [(e["tbl"], e["type"], e["pk"], e["seq"], e["vhash"]) for e in evs]
        want = [_expected_event(op) for op in truth[txn]]
        if [e["pos"] for e in evs] != list(range(len(evs))) or got != want:
            bad(f"transaction {txn} ending at {format_lsn(end)} (pid {pid}) delivered as\n  {got}\n"
                f"  expected\n  {want}\n  positions {[e['pos'] for e in evs]}")
        if end_of.setdefault(txn, end) != end:
            bad(f"transaction {txn} delivered with end LSN {format_lsn(end)} and {format_lsn(end_of[txn])}")
        ids = [e["id"] for e in evs]
        if ids_of.setdefault(txn, ids) != ids:
            bad(f"transaction {txn} redelivered with other ids: {ids_of[txn]} then {ids}")
        for e in evs:
            if (e["seq"] is not None and e["seq"] < 0) or (e["tbl"] == "items" and (e["pk"] or 0) >= wl.POISON_PK):
                bad(f"rolled-back savepoint change delivered: {e}")

    expected_order = [t for t in commit_order if t in truth]
    unknown = set(truth) - set(commit_order)
    if unknown:
        bad(f"ground truth has transactions the workload never committed: {sorted(unknown)[:10]}")

    # Nothing lost, nothing extra, first deliveries in commit order.
    first_seen: dict[int, int] = {}
    first_order: list[int] = []
    for _pid, _end, txn, rowid in deliveries:
        if txn is not None and txn not in first_seen:
            first_seen[txn] = rowid
            first_order.append(txn)
    lost = [t for t in expected_order if t not in first_seen]
    lost_events = sum(len(truth[t]) for t in lost)
    if lost:
        bad(f"{len(lost)} committed transactions ({lost_events} events) never delivered: {lost[:20]}")
    delivered_order = [t for t in first_order if t in truth]
    if delivered_order != [t for t in expected_order if t in first_seen]:
        bad(f"first deliveries not in commit order: {delivered_order[:30]} vs {expected_order[:30]}")
    ends_in_order = [end_of[t] for t in expected_order if t in end_of]
    if any(b <= a for a, b in zip(ends_in_order, ends_in_order[1:])):
        bad("commit end LSNs (event ids) do not increase in commit order")

    # Per pk: seq increases in (deduplicated) delivery order; a delete repeats the last one.
    last_seq: dict[int, int] = {}
    seen_ids: set[str] = set()
    for r in rows:
        if r["id"] in seen_ids or r["tbl"] != "items" or r["type"] == "truncate":
            seen_ids.add(r["id"])
            continue
        seen_ids.add(r["id"])
        pk, seq = r["pk"], r["seq"]
        prev = last_seq.get(pk)
        if r["type"] == "delete":
            if prev is not None and seq != prev:
                bad(f"pk {pk}: delete of seq {seq} after seq {prev} (event {r['id']})")
        elif prev is not None and seq <= prev:
            bad(f"pk {pk}: seq {seq} delivered after seq {prev} (event {r['id']})")
        last_seq[pk] = seq

    # Duplicates: never within one process; a new process delivers exactly the
    # committed transactions above the position it started from, in order.
    duplicates = defaultdict(int)
    by_pid: dict[int, list[int]] = defaultdict(list)
    for pid, _end, txn, _rowid in deliveries:
        if txn is not None:
            by_pid[pid].append(txn)
    seen_txn: set[int] = set()
    for pid, _end, txn, _rowid in deliveries:
        if txn is None:
            continue
        if txn in seen_txn:
            duplicates[txn] += 1
        seen_txn.add(txn)
    known = [t for t in expected_order if t in end_of]
    index = {t: i for i, t in enumerate(known)}
    for inc in incarnations:
        got = by_pid.get(inc.pid, [])
        if len(got) != len(set(got)):
            bad(f"consumer {inc.pid} delivered a transaction twice in one process")
        if inc.overlapped:
            # Start unknown: a contiguous run of the commit order, leaving no gap behind.
            if got and got[0] in index:
                k = index[got[0]]
                first_row = min(r for p, _e, _t, r in deliveries if p == inc.pid)
                gap = [t for t in known[:k] if first_seen[t] > first_row]
                if got != known[k:k + len(got)] or gap:
                    bad(f"consumer {inc.pid} (started while the slot was held) delivered "
                        f"{got[:5]}..., a run of the commit order from #{k} with gap {gap[:5]}")
            continue
        start = inc.start_confirmed or 0
        should = [t for t in known if end_of[t] > start][: len(got)]
        if got != should:
            diff = next(i for i, (a, b) in enumerate(zip(got + [None], should + [None])) if a != b)
            bad(f"consumer {inc.pid} started at {format_lsn(start)} and delivered {got[diff:diff + 5]} at "
                f"its delivery #{diff}, expected {should[diff:diff + 5]} "
                f"(ends {[format_lsn(end_of[t]) for t in got[diff:diff + 3] if t in end_of]})")

    # No early acknowledgement.
    by_end = sorted((end_of[t], first_seen[t]) for t in end_of)
    end_keys = [e for e, _ in by_end]
    prefix_max: list[int] = []
    running = 0
    for _, rowid in by_end:
        running = max(running, rowid)
        prefix_max.append(running)
    logged = sorted((rowid, end) for end, rowid in by_end)
    logged_rowids = [rowid for rowid, _ in logged]
    logged_max_end: list[int] = []
    for _, end in logged:
        logged_max_end.append(max(end, logged_max_end[-1] if logged_max_end else 0))
    early = 0
    idle_past_log = 0
    for t, confirmed, nrows, _active in samples:
        i = bisect.bisect_right(end_keys, confirmed)
        if i and prefix_max[i - 1] > nrows:
            early += 1
            if early <= 3:
                culprit = next(e for e, r in by_end[:i] if r > nrows)
                bad(f"early acknowledgement at {t:.3f}: confirmed_flush_lsn {format_lsn(confirmed)} "
                    f"covers the transaction ending at {format_lsn(culprit)}, which was not yet in "
                    f"the log ({nrows} rows)")
        j = bisect.bisect_right(logged_rowids, nrows)
        if confirmed > (logged_max_end[j - 1] if j else 0):
            idle_past_log += 1

    unique_events = len(seen_ids)
    return {
        "violations": violations,
        "transactions_committed": len(expected_order),
        "transactions_aborted": len(aborted),
        "events_expected": sum(len(truth[t]) for t in expected_order),
        "events_delivered": len(rows),
        "events_unique": unique_events,
        "duplicates": len(rows) - unique_events,
        "duplicate_transactions": len(duplicates),
        "lost": lost_events,
        "lost_transactions": len(lost),
        "early_acks": early,
        "idle_acks_past_log": idle_past_log,
        "samples": len(samples),
        "last_end_lsn": format_lsn(max(end_of.values())) if end_of else None,
        "incarnations": [
            {"pid": inc.pid, "exit": inc.exit_code,
             "start": format_lsn(inc.start_confirmed) if inc.start_confirmed is not None else None,
             "end": format_lsn(inc.end_confirmed) if inc.end_confirmed is not None else None,
             "delivered": len(by_pid.get(inc.pid, []))}
            for inc in incarnations
        ],
    }
