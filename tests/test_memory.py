"""Memory is bounded in bytes (``max_pending_bytes``), whatever the row width.

Concern: a consumer whose handler is slower than PostgreSQL holds at most
about ``max_pending_bytes`` of row data for its handlers, plus its baseline,
even when a single transaction of wide rows (40 kB, stored uncompressed) is
far larger; batches are cut by bytes as well as by ``batch_size``; the reader
stops reading while the queued bytes exceed the budget; every row is still
delivered and acknowledged, and a row wider than the budget still gets
through (alone in its batch).

The consumer of the RSS test runs in a subprocess (this file run as a script),
so the peak resident set measured (``VmHWM`` in ``/proc/<pid>/status``) is its
own. The bound asserted is generous (a correctness check, not a benchmark):
before the byte budget existed, the same run peaked at 250-500 MB above the
baseline.
"""

from __future__ import annotations

import asyncio
import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from support import collecting, run, until

from walex import ConfigError, Event, Events, WalEx
from walex.config import file_values, load_settings, read_toml

MiB = 1024 * 1024
ROW_CHARS = 40_000  # a 40 kB text value per row


def wide_table(admin: psycopg.Connection, name: str = "wide") -> None:
    """A table whose ``payload`` is stored out of line and never compressed."""
    admin.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, payload text)")
    admin.execute(f"ALTER TABLE {name} ALTER COLUMN payload SET STORAGE EXTERNAL")
    admin.execute(f"CREATE PUBLICATION pub FOR TABLE {name}")


def insert_wide(admin: psycopg.Connection, first: int, last: int, chars: int = ROW_CHARS,
                name: str = "wide") -> None:
    """Rows ``first..last`` in one transaction, each with ``chars`` of md5-chain text."""
    admin.execute(
        f"""WITH blob AS (SELECT string_agg(md5(i::text), '') AS b
                          FROM generate_series(1, %(n)s::int / 32 + 1) i)
            INSERT INTO {name} SELECT g, left(g || ':' || b, %(n)s::int)
            FROM generate_series(%(first)s::int, %(last)s::int) g, blob""",
        {"n": chars, "first": first, "last": last},
    )


def confirmed_flush(admin: psycopg.Connection, slot: str) -> int:
    row = admin.execute(
        "SELECT confirmed_flush_lsn - '0/0'::pg_lsn FROM pg_replication_slots WHERE slot_name = %s",
        (slot,)).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def proc_status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


class Consumer:
    """This file run as a script: a WalEx app in its own process, talking JSON lines."""

    def __init__(self, dsn: str, slot: str, rows: int, options: dict[str, Any]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, dsn, slot, str(rows), json.dumps(options)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")

    def message(self, timeout: float) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the consumer said nothing for {timeout}s") from None
        assert line, f"the consumer exited with {self.proc.wait()}"
        return json.loads(line)

    def finish(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return self.proc.wait(timeout=60)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_wide_rows_and_a_slow_handler_stay_within_max_pending_bytes(
    dsn: str, admin: psycopg.Connection
) -> None:
    rows, budget = 10_000, 16 * MiB  # 400 MB of rows in one transaction, 16 MiB budget
    wide_table(admin)
    slot = "memory_bound"
    consumer = Consumer(dsn, slot, rows, {"max_pending_bytes": budget})
    try:
        assert consumer.message(timeout=60) == {"ready": True}
        baseline_kb = proc_status_kb(consumer.proc.pid, "VmRSS")
        insert_wide(admin, 1, rows)
        committed = int(admin.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()[0])
        report = consumer.message(timeout=240)
        peak_kb = proc_status_kb(consumer.proc.pid, "VmHWM")
        deadline = time.monotonic() + 60
        while confirmed_flush(admin, slot) < committed and time.monotonic() < deadline:
            time.sleep(0.1)
        acknowledged = confirmed_flush(admin, slot)
        assert consumer.finish() == 0
    finally:
        consumer.kill()
    assert report["rows"] == rows and report["distinct"] == rows and report["bad"] == 0
    assert acknowledged >= committed  # the whole transaction was acknowledged
    grown_mb = (peak_kb - baseline_kb) / 1024
    # the budget, the batch being assembled and the one in hand, read buffers,
    # allocator slack: far below the 250+ MB the event-count bound allowed
    assert grown_mb < budget / MiB + 100, (
        f"peak RSS grew by {grown_mb:.0f} MB over the {baseline_kb // 1024} MB baseline "
        f"with max_pending_bytes={budget // MiB} MiB (largest batch: {report['largest_batch']} rows)"
    )
    assert report["largest_batch"] < 1000  # cut by bytes, not by batch_size


async def pass_on(message: Any, app: WalEx) -> None:
    """A message middleware that hands every message on."""
    await app.process_message(message)


@pytest.mark.parametrize("middleware", [None, pass_on], ids=["reader", "middleware"])
def test_batches_are_cut_by_bytes_and_a_row_wider_than_the_budget_goes_alone(
    dsn: str, admin: psycopg.Connection, middleware: Any
) -> None:
    wide_table(admin)
    budget = 100_000  # batches of about 12.5 kB: two 10 kB rows

    async def main() -> list[list[Event]]:
        async with collecting(dsn, subscriptions=["wide"], max_pending_bytes=budget,
                              batch_size=1000, message_middleware=middleware) as rec:
            # one row first: the memory per wire byte is learnt from a batch (walex.sizes),
            # the first one is cut as if a row took eight times its wire size
            insert_wide(admin, 0, 0, chars=10_000)
            await rec.wait_for(1, timeout=30)
            with admin.transaction():
                insert_wide(admin, 1, 20, chars=10_000)
                insert_wide(admin, 21, 23, chars=150_000)  # each wider than the whole budget
                insert_wide(admin, 24, 45, chars=10_000)
            await rec.wait_for(46, timeout=30)
            return rec.calls_of("__all__")[1:]

    batches = run(main())
    ids = [e.new_record["id"] for b in batches for e in b]
    assert ids == list(range(1, 46))
    assert [len(b) for b in batches] == [2] * 10 + [1, 1, 1] + [2] * 11
    assert [len(e.new_record["payload"]) for b in batches[10:13] for e in b] == [150_000] * 3


def test_the_reader_waits_while_queued_batches_exceed_max_pending_bytes(
    dsn: str, admin: psycopg.Connection
) -> None:
    wide_table(admin)
    budget = 100_000
    release = asyncio.Event()
    events = Events()

    @events.on_insert("wide")
    async def held(batch: list[Event]) -> None:
        await release.wait()

    async def main() -> None:
        async with collecting(dsn, subscriptions=["wide"], modules=[events], batch_size=2,
                              max_pending_bytes=budget, max_pending_transactions=64,
                              status_interval=0.2) as rec:
            insert_wide(admin, 1, 100, chars=10_000)  # 50 batches of 2 rows, 20 kB each
            committed = int(admin.execute(
                "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()[0])
            pipeline = rec.app.pipeline
            try:
                await rec.wait_for(1)  # the first batch is in hand (one row: see above)
                queued = -1
                while queued != pipeline.queue.qsize():  # until the reader stopped queueing
                    queued = pipeline.queue.qsize()
                    await asyncio.sleep(0.5)
                # what is queued or in hand: the budget, and the batch that crossed it
                assert queued + 1 <= budget // 20_000 + 1, f"{queued} batches queued"
                assert 0 < pipeline.pending_bytes <= budget + 25_000
                assert rec.app.ack.flushed < committed
            finally:
                release.set()
            await rec.wait_for(100, timeout=30)
            await until(lambda: rec.app.ack.flushed >= committed, "the acknowledgement")
            assert pipeline.pending_bytes == 0
        assert [e.new_record["id"] for e in rec.events] == list(range(1, 101))

    run(main())


def test_a_streamed_transaction_is_read_back_in_batches_cut_by_bytes(
    dsn: str, admin: psycopg.Connection
) -> None:
    wide_table(admin)
    # small enough that the server streams the transaction while it is in progress
    admin.execute(f"ALTER DATABASE {admin.info.dbname} SET logical_decoding_work_mem = '64kB'")

    async def main() -> tuple[list[list[Event]], int]:
        async with collecting(dsn, subscriptions=["wide"], streaming=True, batch_size=10,
                              max_pending_bytes=100_000) as rec:
            insert_wide(admin, 0, 0, chars=10_000)  # not streamed: the ratio learnt from it
            await rec.wait_for(1, timeout=30)
            insert_wide(admin, 1, 60, chars=10_000)
            await rec.wait_for(61, timeout=30)
            return rec.calls_of("__all__")[1:], rec.app.pipeline.assembler.spilled_events

    batches, spilled = run(main())
    assert spilled >= 50  # it did arrive streamed, and went to disk by tens
    assert [e.new_record["id"] for b in batches for e in b] == list(range(1, 61))
    assert [len(b) for b in batches] == [2] * 30


def test_max_pending_bytes_from_keywords_environment_and_toml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert load_settings(publication="p").max_pending_bytes == 64 * MiB  # the default
    assert load_settings(publication="p", max_pending_bytes=5_000_000).max_pending_bytes == 5_000_000
    config = tmp_path / "walex.toml"
    config.write_text('publication = "p"\nmax_pending_bytes = "8MiB"\n')
    with file_values(read_toml(config)):
        assert load_settings().max_pending_bytes == 8 * MiB
        monkeypatch.setenv("WALEX_MAX_PENDING_BYTES", "500MB")
        assert load_settings().max_pending_bytes == 500_000_000
    for bad in ("0", "lots", -1):
        with pytest.raises(ConfigError) as info:
            load_settings(publication="p", max_pending_bytes=bad)
        assert "max_pending_bytes: must be a size in bytes" in str(info.value)
        assert "'64MiB'" in str(info.value)


# -- the consumer process ---------------------------------------------------


def _consume(dsn: str, slot: str, rows: int, options: dict[str, Any]) -> None:
    events = Events()
    seen: set[int] = set()
    stats = {"rows": 0, "bad": 0, "largest_batch": 0}

    @events.on_insert("wide")
    async def slow(batch: list[Event]) -> None:
        await asyncio.sleep(0.001 * len(batch))  # a slow handler: 1 ms per row
        stats["rows"] += len(batch)
        stats["largest_batch"] = max(stats["largest_batch"], len(batch))
        for event in batch:
            pk, payload = event.new_record["id"], event.new_record["payload"]
            seen.add(pk)
            if len(payload) != ROW_CHARS or not payload.startswith(f"{pk}:"):
                stats["bad"] += 1

    async def main() -> None:
        app = WalEx(url=dsn, publication="pub", subscriptions=["wide"], modules=[events],
                    name="memory", durable_slot=True, slot_name=slot, status_interval=0.5,
                    **options)
        async with app:
            failed = asyncio.ensure_future(app.wait())
            print(json.dumps({"ready": True}), flush=True)
            while stats["rows"] < rows and not failed.done():
                await asyncio.sleep(0.05)
            if failed.done():
                failed.result()
            print(json.dumps({**stats, "distinct": len(seen)}), flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
            failed.cancel()

    asyncio.run(main())


if __name__ == "__main__":
    _consume(sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]))
