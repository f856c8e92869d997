"""Backfills in a consumer process of their own (tests/backfill_worker.py): a SIGKILL
mid-way resumes after the last completed chunk; a large table in bounded memory."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest


WORKER = Path(__file__).with_name("backfill_worker.py")


def _worker(dsn: str, log: Path, *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, str(WORKER), dsn, str(log), *args],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "READY"
    return proc


def test_a_backfill_killed_midway_resumes_after_its_last_completed_chunk(
    dsn: str, admin: psycopg.Connection, tmp_path: Path,
) -> None:
    admin.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    admin.execute("INSERT INTO t SELECT g, 'v' FROM generate_series(1, 3000) g")
    admin.execute("CREATE PUBLICATION pub FOR TABLE t")
    log = tmp_path / "log.sqlite"
    first = _worker(dsn, log, "--request", "t", "--chunk", "100", "--sleep", "0.02")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            row = admin.execute("SELECT to_regclass('walex_backfill') IS NOT NULL").fetchone()
            if row[0]:  # the store exists; its row may not yet
                done = admin.execute("SELECT chunks_done >= 8 FROM walex_backfill").fetchone()
                if done is not None and done[0]:
                    break
            time.sleep(0.02)
    finally:
        first.kill()  # SIGKILL
        first.wait()
    state, done_at_kill, last_key = admin.execute(
        "SELECT state, rows_done, last_key FROM walex_backfill").fetchone()
    assert state == "running" and 800 <= done_at_kill < 3000
    second = _worker(dsn, log, "--chunk", "100")
    try:
        out, _ = second.communicate(timeout=120)
    finally:
        second.kill()
    assert second.returncode == 0, out

    with sqlite3.connect(log) as db:
        runs = {run: [pk for (pk,) in db.execute("SELECT pk FROM log WHERE run = ? ORDER BY rowid",
                                                 (run,))] for run in (1, 2)}
    assert set(runs[1]) | set(runs[2]) == set(range(1, 3001))  # every row, none lost
    assert min(runs[2]) == int(last_key[0]) + 1  # resumed right after the last completed chunk
    assert len(runs[1]) - done_at_kill <= 300  # handled, not marked: at most a few chunks again
    state, rows_done = admin.execute("SELECT state, rows_done FROM walex_backfill").fetchone()
    assert (state, rows_done) == ("done", 3000)


def _figures(out: str) -> dict[str, float]:
    return {k: float(v) for k, v in (part.split("=") for part in out.split())}


def test_a_large_backfill_runs_in_bounded_memory_while_the_stream_flows(
    dsn: str, admin: psycopg.Connection, tmp_path: Path,
) -> None:
    rows = 200_000
    admin.execute("CREATE TABLE big (id int PRIMARY KEY, payload text)")
    admin.execute("CREATE TABLE small (id int PRIMARY KEY, payload text)")
    admin.execute("CREATE TABLE s (id serial PRIMARY KEY)")
    admin.execute(f"INSERT INTO big SELECT g, repeat(md5(g::text), 6) FROM generate_series(1, {rows}) g")
    admin.execute("INSERT INTO small SELECT g, repeat(md5(g::text), 6) FROM generate_series(1, 2000) g")
    admin.execute("CREATE PUBLICATION pub FOR TABLE big, small, s")
    options = ["--count-only", "--chunk", "2000", "--batch-size", "500", "--pending", "4",
               "--stream-table", "s"]

    def backfill(table: str) -> dict[str, float]:
        proc = _worker(dsn, tmp_path / "unused", "--request", table, *options)
        try:
            while proc.poll() is None:  # the stream goes on during the backfill
                admin.execute("INSERT INTO s DEFAULT VALUES")
                time.sleep(0.01)
            out, _ = proc.communicate(timeout=300)
        finally:
            proc.kill()
        assert proc.returncode == 0, out
        return _figures(out)

    baseline = backfill("small")  # the same process, 2,000 rows (about 0.4 MB of payload)
    # 200,000 rows: about 40 MB of payload, some 200 MB as events if they were all held
    # (as they are with --chunk 200000 --pending 4000: peak RSS 190 MB over the baseline)
    large = backfill("big")
    assert large["reads"] == rows
    assert large["stream_during"] > 0  # streamed events were handled while the backfill ran
    assert large["peak_kb"] - baseline["peak_kb"] < 30_000, (baseline, large)


@pytest.mark.parametrize("shape", ["int", "composite"])
def test_rows_read_again_after_a_sigkill_carry_the_ids_they_had(
    dsn: str, admin: psycopg.Connection, tmp_path: Path, shape: str,
) -> None:
    """A backfill process is SIGKILLed in the middle of a chunk (its reads handled in
    batches of 10, some of the chunk's logged, none of it marked done), and started again:
    it reads again the rows handled since the last chunk marked done. Each such row must
    come under the id it had (on main the ids held the new high watermark's position, so
    consumers could not drop the copies), except rows that changed in between: another
    version, with other values, under another id. ``composite``: a key of texts, an
    infinite timestamp and the id, in the order of the ids."""
    if shape == "int":
        admin.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        admin.execute("INSERT INTO t SELECT g, 'v' FROM generate_series(1, 3000) g")
    else:
        admin.execute("CREATE TABLE t (k1 text, k2 text, ts timestamptz, id int, v text, "
                      "PRIMARY KEY (k1, k2, ts, id))")
        admin.execute("INSERT INTO t SELECT 'ä' || lpad((g / 10)::text, 4, '0'), "
                      "lpad((g % 10)::text, 2, '0'), 'infinity', g, 'v' "
                      "FROM generate_series(1, 3000) g")
    admin.execute("CREATE PUBLICATION pub FOR TABLE t")
    log = tmp_path / "log.sqlite"

    def logged_past(key: int) -> list[int]:
        with sqlite3.connect(log, timeout=30) as db:
            try:
                return [pk for (pk,) in db.execute("SELECT pk FROM log WHERE pk > ?", (key,))]
            except sqlite3.OperationalError:
                return []

    first = _worker(dsn, log, "--request", "t", "--chunk", "100", "--batch-size", "10",
                    "--sleep", "0.01")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            row = admin.execute("SELECT to_regclass('walex_backfill') IS NOT NULL").fetchone()
            if row[0]:
                done = admin.execute("SELECT chunks_done, last_key FROM walex_backfill").fetchone()
                if done is not None and done[0] >= 3 and len(logged_past(int(done[1][-1]))) >= 25:
                    break
            time.sleep(0.01)
    finally:
        first.kill()  # SIGKILL
        first.wait()
    state, last_key = admin.execute("SELECT state, last_key FROM walex_backfill").fetchone()
    assert state == "running"
    again = sorted(logged_past(int(last_key[-1])))  # handled, not marked done: read again
    assert again, "the kill came when every handled chunk was marked done"
    changed = again[:5]
    admin.execute("UPDATE t SET v = 'changed' WHERE id = ANY(%s)", (changed,))
    second = _worker(dsn, log, "--chunk", "100", "--batch-size", "10")
    try:
        out, _ = second.communicate(timeout=120)
    finally:
        second.kill()
    assert second.returncode == 0, out

    with sqlite3.connect(log) as db:
        handled = db.execute("SELECT pk, id FROM log ORDER BY rowid").fetchall()
        ids = {run: dict(db.execute("SELECT pk, id FROM log WHERE run = ?", (run,)).fetchall())
               for run in (1, 2)}
    # ids increase in the order handled, across the restart but for the copies (the rows
    # read again under their ids come first, in their order): a consumer that drops every
    # id not above the highest it saw drops only copies, and gets every row
    highest, kept = "", {}
    for pk, rid in handled:
        if rid > highest:
            highest, kept[pk] = rid, rid
        else:
            assert ids[1].get(pk) == rid, f"row {pk} under {rid}, below {highest}, not a copy"
    assert set(kept) == set(range(1, 3001))
    assert set(ids[1]) | set(ids[2]) == set(range(1, 3001))  # every row, none lost
    twice = sorted(set(ids[1]) & set(ids[2]))
    assert set(again) <= set(twice)
    other = {pk: (ids[1][pk], ids[2][pk]) for pk in twice
             if ids[1][pk] != ids[2][pk] and pk not in changed}
    assert not other, f"{len(other)} unchanged rows read again under new ids: {list(other.items())[:3]}"
    assert all(ids[1][pk] != ids[2][pk] for pk in changed)  # another version, another id
    assert len(set(ids[2].values())) == len(ids[2])  # one id per row of a run
