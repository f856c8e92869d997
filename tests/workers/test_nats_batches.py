"""NATS workers with ``prefetch`` > 1: batches, one worker per partition at a time, by lease.

Worker processes (``walex worker URL?...&prefetch=64 handlers:events``) share
4 partitions; the test publishes thousands of changes of 40 rows (each row's
changes in order, ``seq`` 0, 1, 2 ...) while they run. An async handler
records every call (worker, partition, start and end, wall clock) and every
event it handled in one SQLite log shared by the processes. Checked:

- every change handled; per row, the first handlings in ``seq`` order, and a
  change handled twice has the same event id;
- no two completed calls of one partition overlap in time, across workers;
- a worker SIGKILLed while it stalls in a call (its handler committed, nothing
  acknowledged): the others take its partitions after the lease's ttl and
  handle its events again;
- a worker SIGSTOPped in a call beyond its lease: another takes the partition;
  on SIGCONT the frozen call is cancelled (the handler sees the cancellation),
  never completed, and its events are handled by the other worker;
- a consumer made for another prefetch is a ConfigError naming the fix, and
  ``walex worker --declare`` with the prefetch updates it; hostile values are
  ConfigErrors.
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

import pytest
from destinations.conftest import require
from support import run
from workers.test_worker import made_up

from walex import Event
from walex.destinations import Destinations
from walex.errors import ConfigError
from walex.workers import Worker, consumer_from_url

SCRIPT = Path(sys.executable).parent / "walex"
WALEX = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "walex.cli"]
PARTITIONS, KEYS, EVENTS, ACK_WAIT = 4, 40, 3000, 3

HANDLERS = '''
import asyncio, os, sqlite3, time
from walex import Events
from walex.workers import current_lease

events = Events()
_conn = None
NAME = os.environ["WORKER_NAME"]


def log():
    global _conn
    if _conn is None:
        _conn = sqlite3.connect(os.environ["WORKER_LOG"], isolation_level=None, timeout=60,
                                check_same_thread=False)  # one call at a time uses it
        _conn.execute("PRAGMA journal_mode=WAL")
    return _conn


def mark(path, text):
    with open(path + ".tmp", "w") as out:
        out.write(text)
    os.replace(path + ".tmp", path)


def begin(lease, batch):
    conn = log()
    call = conn.execute("INSERT INTO calls (worker, partition, started, first_id, last_id, size) "
                        "VALUES (?, ?, ?, ?, ?, ?)", (NAME, lease.partition, time.time(),
                                                      batch[0].id, batch[-1].id,
                                                      len(batch))).lastrowid
    mine = conn.execute("SELECT count(*) FROM handled WHERE worker = ?", (NAME,)).fetchone()[0]
    return call, mine


def apply(call, batch):
    conn = log()
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany("INSERT INTO handled (event_id, pk, seq, worker, call) VALUES (?, ?, ?, ?, ?)",
                     [(e.id, e.record["id"], e.record["seq"], NAME, call) for e in batch])
    conn.execute("COMMIT")


def end(call, column):
    log().execute(f"UPDATE calls SET {column} = ? WHERE n = ?", (time.time(), call))


@events.on_event("item")
async def handle(batch):
    # the log on a thread: the worker's event loop keeps renewing its leases meanwhile
    call, mine = await asyncio.to_thread(begin, current_lease(), batch)
    freeze = int(os.environ.get("WORKER_FREEZE_AFTER", "0"))
    if freeze and mine >= freeze and not os.path.exists(os.environ["WORKER_LOG"] + ".frozen"):
        mark(os.environ["WORKER_LOG"] + ".frozen", f"{call} {batch[0].id}")
        try:
            await asyncio.sleep(60)  # the test freezes the process meanwhile
        except asyncio.CancelledError:
            end(call, "cancelled")
            raise
    await asyncio.to_thread(apply, call, batch)
    stall = int(os.environ.get("WORKER_STALL_AFTER", "0"))
    if stall and mine >= stall:
        mark(os.environ["WORKER_LOG"] + ".stalled", batch[-1].id)
        await asyncio.sleep(3600)  # handled and logged, never acknowledged: killed here
    await asyncio.to_thread(end, call, "ended")
'''


def change(i: int) -> Event:
    """Change i: row i % KEYS, seq i // KEYS; transactions of 10 changes (ids grow with i)."""
    event = made_up(i, i // KEYS, pk=i % KEYS)
    event.id = f"{16 + i // 10:016X}-{i % 10:08X}"
    return event


def env_base() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("WALEX_") and k != "PYTHONPATH"}


class Group:
    """Worker processes of one group, their log, and the publisher."""

    def __init__(self, tmp: Path, unique: str, names: list[str]) -> None:
        self.port = require("nats")
        self.unique = unique
        self.tmp = tmp
        self.url = (f"nats://127.0.0.1:{self.port}?stream=NB_{unique}"
                    f"&subject=nb{unique}.{{schema}}.{{table}}.{{partition}}")
        self.source = (f"{self.url}&partitions={PARTITIONS}&ack_wait={ACK_WAIT}&prefetch=64"
                       f"&group=g{unique}")
        self.db = tmp / "log.sqlite"
        (tmp / "handlers.py").write_text(HANDLERS)
        with sqlite3.connect(self.db) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("CREATE TABLE calls (n INTEGER PRIMARY KEY AUTOINCREMENT, worker TEXT, "
                         "partition INT, started REAL, ended REAL, cancelled REAL, first_id TEXT, "
                         "last_id TEXT, size INT)")
            conn.execute("CREATE TABLE handled (n INTEGER PRIMARY KEY AUTOINCREMENT, event_id "
                         "TEXT, pk INT, seq INT, worker TEXT, call INT)")
        self.names = names
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.published = threading.Event()

    def log(self, name: str) -> Path:
        return self.tmp / f"{name}.log"

    def start(self, env: dict[str, dict[str, str]]) -> None:
        subprocess.run([*WALEX, "worker", "--declare", self.source], cwd=self.tmp, timeout=60,
                       check=True, env=env_base())
        for name in self.names:
            with open(self.log(name), "ab") as out:
                self.procs[name] = subprocess.Popen(
                    [*WALEX, "worker", self.source, "handlers:events", *os.environ.get("NB_WORKER_ARGS", "").split()], cwd=self.tmp, stdout=out,
                    stderr=out, stdin=subprocess.DEVNULL,
                    env={**env_base(), "WORKER_LOG": str(self.db), "WORKER_NAME": name,
                         **env.get(name, {})})
        for name in self.names:
            self.wait(lambda name=name: "consumes" in self.log(name).read_text(),
                      f"{name} to subscribe", 60)

    def publish(self) -> threading.Thread:
        """Publish EVENTS changes (event i: row i % KEYS, seq i // KEYS) as a relay does."""
        async def main() -> None:
            destinations = Destinations([self.url], PARTITIONS)
            await destinations.open()
            try:
                for at in range(0, EVENTS, 100):
                    await destinations.publish([change(i) for i in range(at, at + 100)])
                    await asyncio.sleep(0.2)  # a stream of ~6 s: the workers share it
            finally:
                await destinations.close()
            self.published.set()

        thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
        thread.start()
        return thread

    def rows(self, table: str) -> list[tuple]:
        with sqlite3.connect(self.db, timeout=60) as conn:
            return conn.execute(f"SELECT * FROM {table} ORDER BY n").fetchall()

    def wait(self, check, what: str, timeout: float) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {n}\n{self.log(n).read_text()[-3000:]}"
                                  for n in self.names if self.log(n).exists())
                raise AssertionError(f"timed out waiting for {what}\n{tails}")
            time.sleep(0.05)

    def complete(self) -> bool:
        return self.published.is_set() and \
            len({(r[2], r[3]) for r in self.rows("handled")}) >= EVENTS

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
        for name, proc in self.procs.items():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    async def cleanup(self) -> None:
        import nats

        nc = await nats.connect(f"nats://127.0.0.1:{self.port}", connect_timeout=5)
        try:
            js = nc.jetstream(timeout=10)
            for call in (js.delete_stream(f"NB_{self.unique}"),
                         js.delete_key_value(f"walex_leases_g{self.unique}")):
                try:
                    await call
                except Exception:
                    pass
        finally:
            await nc.close()

    def check(self) -> dict[str, int]:
        """Nothing lost, per row in order, duplicates the same, no overlap per partition."""
        first: dict[str, tuple[int, int]] = {}
        per_row: dict[int, list[int]] = defaultdict(list)
        by_worker: dict[str, int] = defaultdict(int)
        for _n, event_id, pk, seq, worker, _call in self.rows("handled"):
            by_worker[worker] += 1
            if event_id in first:
                assert first[event_id] == (pk, seq), f"{event_id} handled twice, differently"
                continue
            first[event_id] = (pk, seq)
            per_row[pk].append(seq)
        assert sorted(per_row) == list(range(KEYS))
        for pk, seqs in per_row.items():
            assert seqs == list(range(EVENTS // KEYS)), f"row {pk}: handled in the order {seqs}"
        assert len(first) == EVENTS
        calls: dict[int, list[tuple[float, float, str]]] = defaultdict(list)
        for _n, worker, partition, started, ended, _cancelled, *_rest in self.rows("calls"):
            if ended is not None:
                calls[partition].append((started, ended, worker))
        for partition, spans in calls.items():
            spans.sort()
            for (s1, e1, w1), (s2, e2, w2) in zip(spans, spans[1:]):
                assert e1 <= s2, f"partition {partition}: {w1}'s call {s1}..{e1} overlaps " \
                                 f"{w2}'s {s2}..{e2}"
        return dict(by_worker)


def test_three_workers_share_the_partitions_in_batches(tmp_path: Path, unique: str) -> None:
    group = Group(tmp_path, unique, ["w0", "w1", "w2"])
    try:
        group.start({})
        group.publish()
        group.wait(group.complete, f"{EVENTS} changes handled", 50)
    finally:
        group.stop()
        asyncio.run(group.cleanup())
    by_worker = group.check()
    sizes = [r[8] for r in group.rows("calls")]
    assert max(sizes) > 1, "every call had one event: no batches"
    assert len([w for w, n in by_worker.items() if n]) >= 2, f"not shared: {by_worker}"
    for name in group.names:
        assert group.procs[name].returncode == 0, group.log(name).read_text()[-3000:]


def test_a_killed_worker_s_partitions_go_to_the_others(tmp_path: Path, unique: str) -> None:
    group = Group(tmp_path, unique, ["w0", "w1", "w2"])
    stalled = Path(f"{group.db}.stalled")
    try:
        group.start({"w0": {"WORKER_STALL_AFTER": "20"}})
        group.publish()
        group.wait(stalled.exists, "w0 to stall after its handler committed", 50)
        group.procs["w0"].send_signal(signal.SIGKILL)
        group.procs["w0"].wait(30)
        killed_at = max(r[0] for r in group.rows("handled"))
        stalled_id = stalled.read_text()
        group.wait(lambda: group.complete() and any(
            r[1] == stalled_id and r[4] != "w0" for r in group.rows("handled")),
            "every change, and w0's last one again by another worker", 50)
    finally:
        group.stop()
        asyncio.run(group.cleanup())
    by_worker = group.check()
    after = {r[4] for r in group.rows("handled") if r[0] > killed_at}
    assert after and "w0" not in after, f"handled after the kill by {after}"
    assert by_worker["w0"] >= 20


def test_a_frozen_worker_is_cut_off_and_never_acknowledges(tmp_path: Path, unique: str) -> None:
    group = Group(tmp_path, unique, ["w0", "w1"])
    frozen = Path(f"{group.db}.frozen")
    try:
        group.start({"w0": {"WORKER_FREEZE_AFTER": "30"}})
        group.publish()
        group.wait(frozen.exists, "w0's call to begin its wait", 50)
        group.procs["w0"].send_signal(signal.SIGSTOP)
        call, first_id = frozen.read_text().split()
        # beyond the lease: the other worker handles the frozen call's events
        group.wait(lambda: any(r[1] == first_id and r[4] == "w1" for r in group.rows("handled")),
                   "w1 to handle the frozen call's first event", 50)
        group.procs["w0"].send_signal(signal.SIGCONT)
        group.wait(lambda: group.rows("calls")[int(call) - 1][5] is not None,
                   "w0's frozen call to be cancelled", 30)
        group.wait(group.complete, f"{EVENTS} changes handled", 50)
    finally:
        group.stop()
        asyncio.run(group.cleanup())
    group.check()
    row = group.rows("calls")[int(call) - 1]
    assert row[1] == "w0" and row[4] is None and row[5] is not None, row
    assert not any(r[5] == int(call) for r in group.rows("handled")), \
        "the frozen call applied its events"
    assert "lost partition" in group.log("w0").read_text()


def _source(unique: str, prefetch: int | None) -> str:
    port = require("nats")
    extra = f"&prefetch={prefetch}" if prefetch is not None else ""
    return (f"nats://127.0.0.1:{port}?stream=NB_{unique}&subject=nb{unique}.{{schema}}."
            f"{{table}}.{{partition}}&partitions=2&group=g{unique}{extra}")


def test_a_consumer_of_another_prefetch_is_refused_and_declare_updates_it(unique: str) -> None:
    from walex import Events

    events = Events()
    events.on_event("item")(lambda batch: None)

    async def main() -> None:
        import nats

        await Worker(_source(unique, None), [events]).consumer.declare()  # max_ack_pending=1
        with pytest.raises(ConfigError, match=r"max_ack_pending=1.*prefetch=64.*--declare"):
            await Worker(_source(unique, 64), [events]).start()
        await Worker(_source(unique, 64), [events]).consumer.declare()  # updated
        nc = await nats.connect(f"nats://127.0.0.1:{require('nats')}")
        try:
            js = nc.jetstream(timeout=10)
            for p in range(2):
                info = await js.consumer_info(f"NB_{unique}", f"g{unique}_{p}")
                assert info.config.max_ack_pending == 64
        finally:
            await nc.close()
        for prefetch in (None, 8):
            with pytest.raises(ConfigError, match=r"max_ack_pending=64.*--declare"):
                await Worker(_source(unique, prefetch), [events]).start()
        worker = Worker(_source(unique, 64), [events])
        await worker.start()
        await asyncio.wait_for(worker.stop(), 30)

    group = Group.__new__(Group)
    group.port, group.unique = require("nats"), unique
    try:
        run(main(), timeout=60)
    finally:
        asyncio.run(group.cleanup())


@pytest.mark.parametrize("value", ["0", "-1", "x", "1.5", "", "10001", "99999999999999999999"])
def test_hostile_prefetch_values_are_config_errors(value: str) -> None:
    url = ("nats://127.0.0.1:4222?stream=S&subject=s.{schema}.{table}.{partition}"
           f"&partitions=2&prefetch={value}")
    with pytest.raises(ConfigError, match="prefetch"):
        consumer_from_url(url)


def test_prefetch_is_a_nats_worker_option() -> None:
    consumer = consumer_from_url("nats://127.0.0.1:4222?stream=S&subject=s.{schema}.{table}."
                                 "{partition}&partitions=2&prefetch=64")
    assert consumer.prefetch == 64  # type: ignore[attr-defined]


def test_acknowledgements_of_a_batch_are_the_frames_of_each_message_in_order() -> None:
    """The ``+ACK``/``-NAK``/``+WPI`` of a batch go out as one bytes object: the same bytes as
    a ``PUB <reply> <n>`` frame per message, in order; a str reply (nats-py's Msg) is
    refused, so those messages go through the client's publish."""
    from walex.workers.natsbatch import pub_frames

    replies = [b"$JS.ACK.s.c.1.%d.%d.1700000000000000000.%d" % (i, i, 9 - i) for i in range(1, 9)]
    for body in (b"+ACK", b"-NAK", b"+WPI", b""):
        for n in (1, 2, len(replies)):
            assert pub_frames(replies[:n], body) == b"".join(
                b"PUB %b %d\r\n%b\r\n" % (r, len(body), body) for r in replies[:n])
    with pytest.raises(TypeError):
        pub_frames([replies[0], "$JS.ACK.s.c.1.2.2.0.0"], b"+ACK")  # type: ignore[list-item]
