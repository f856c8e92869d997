"""A consumer process for the backfill tests (so it can be SIGKILLed, and its memory measured).

    python tests/backfill_worker.py DSN LOG.sqlite [--request TABLE] [--chunk N] [--sleep S]
        [--count-only] [--stream-table T]

Runs a WalEx app ``bf_worker`` on a durable slot with one handler that
writes every read event (id, pk) to a SQLite log, durably, before it
returns (``--count-only``: counts them in memory instead, for the memory
test). With ``--request TABLE`` it asks for a backfill of TABLE; without, it
carries on with the unfinished ones in the progress store. It exits 0 once
the progress store has no unfinished backfill of the app, printing the
number of read events, of events of ``--stream-table``, and its peak RSS in
kB.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sqlite3
import sys
import time

import psycopg

from walex import Event, Events, EventType, WalEx


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("dsn")
    parser.add_argument("log")
    parser.add_argument("--request")
    parser.add_argument("--chunk", type=int, default=100)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--count-only", action="store_true")
    parser.add_argument("--stream-table")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--pending", type=int, default=64)
    args = parser.parse_args()

    db = None
    if not args.count_only:
        db = sqlite3.connect(args.log, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE IF NOT EXISTS log (run INTEGER, id TEXT, pk INTEGER)")
        run = db.execute("SELECT coalesce(max(run), 0) + 1 FROM log").fetchone()[0]
    counts = {"read": 0, "stream": 0, "stream_during": 0}
    finished = {"backfill": False}

    events = Events()

    @events.on_event("all")
    async def record(batch: list[Event]) -> None:
        reads = [e for e in batch if e.type is EventType.READ]
        counts["read"] += len(reads)
        streamed = sum(1 for e in batch if e.name == args.stream_table)
        counts["stream"] += streamed
        if not finished["backfill"]:
            counts["stream_during"] += streamed
        if db is not None and reads:
            db.execute("BEGIN")
            db.executemany("INSERT INTO log VALUES (?, ?, ?)",
                           [(run, e.id, e.new_record["id"]) for e in reads])
            db.execute("COMMIT")
        if args.sleep:
            await asyncio.sleep(args.sleep)

    async def go() -> None:
        app = WalEx(args.dsn, publication="pub", name="bf_worker", durable_slot=True,
                    backfill_chunk_size=args.chunk, batch_size=args.batch_size,
                    max_pending_transactions=args.pending, modules=[events])
        async with app:
            print("READY", flush=True)
            if args.request:
                await app.backfill(args.request)
            with psycopg.connect(args.dsn, autocommit=True) as conn:
                while conn.execute("SELECT count(*) FROM walex_backfill WHERE app = 'bf_worker' "
                                   "AND state IN ('pending', 'running')").fetchone()[0]:
                    await asyncio.sleep(0.05)
            finished["backfill"] = True

    start = time.monotonic()
    asyncio.run(go())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"reads={counts['read']} stream={counts['stream']} "
          f"stream_during={counts['stream_during']} peak_kb={peak} "
          f"seconds={time.monotonic() - start:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
