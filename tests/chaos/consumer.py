"""The consumer program of the fault-injection suite: a WalEx app logging every event.

Run as its own process so it can be SIGKILLed, crash through a failpoint
(``WALEX_FAILPOINTS``) or exit on a handler error::

    python tests/chaos/consumer.py --dsn DSN --slot SLOT --log events.sqlite

Every handler call (one committed transaction) is written to a SQLite
database in one SQLite transaction, durably (WAL mode, ``synchronous=FULL``),
before the handler returns, so the log holds exactly what walex considered
handled: one row per event with its id, commit end LSN, position, table,
type, pk, seq and a hash of the TOAST-sized payload, plus the pid of the
process that handled it.

Prints ``READY`` on stdout once streaming began. Exit codes: 0 after SIGTERM
(clean stop), 3 when the app stopped with an error (a handler that kept
raising, a replication error walex gave up on), 137 from the ``exit``
failpoint.

Faults of the handler itself (so the tests need no other program):
``--fail-after N`` makes the call after N successful calls raise, on every
retry; ``--sleep-calls 10,40:5`` sleeps 5 s in the 10th and 40th call.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import os
import signal
import sqlite3
import sys
import threading
import time
from typing import Any

from walex import Event, Events, WalEx

SCHEMA = """
CREATE TABLE IF NOT EXISTS log (
    rowid INTEGER PRIMARY KEY,      -- delivery order
    call INTEGER NOT NULL,          -- handler call number within this process
    pid INTEGER NOT NULL,           -- the consumer process that handled it
    id TEXT NOT NULL,               -- event.id
    end_lsn INTEGER NOT NULL,       -- commit end LSN (prefix of event.id)
    pos INTEGER NOT NULL,           -- position in the transaction (suffix of event.id)
    lsn TEXT NOT NULL,              -- event.lsn (commit LSN)
    tbl TEXT NOT NULL,
    type TEXT NOT NULL,
    pk INTEGER,                     -- items.pk, or txns.txn_no for the marker row
    seq INTEGER,                    -- items.seq (the old one for a delete)
    vhash TEXT,                     -- md5 of items.payload, 'UNCHANGED_TOAST' if missing
    at REAL NOT NULL                -- wall clock time of the handler call
);
"""


def open_log(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(SCHEMA)
    return db


def _row(event: Event) -> tuple[Any, ...]:
    end_hex, pos_hex = event.id.split("-")
    rec = event.record or {}
    if event.name == "txns":
        pk, seq, vhash = rec.get("txn_no"), None, None
    elif event.name == "items":
        payload = rec.get("payload")
        if payload is None:
            vhash = None
        elif isinstance(payload, str):
            vhash = hashlib.md5(payload.encode()).hexdigest()
        else:  # walex.UNCHANGED_TOAST: a value walex could not fill in
            vhash = "UNCHANGED_TOAST"
        pk, seq = rec.get("pk"), rec.get("seq")
    else:
        pk = seq = vhash = None
    return (event.id, int(end_hex, 16), int(pos_hex, 16), event.lsn, event.name,
            event.type.value, pk, seq, vhash)


class Handler:
    def __init__(self, db: sqlite3.Connection, fail_after: int | None,
                 sleep_calls: dict[int, float]) -> None:
        self.db = db
        self.fail_after = fail_after
        self.sleep_calls = sleep_calls
        self.calls = 0
        self.pid = os.getpid()
        self.lock = threading.Lock()

    def __call__(self, events: list[Event]) -> None:  # a plain function: runs in a thread
        with self.lock:
            if self.fail_after is not None and self.calls == self.fail_after:
                raise RuntimeError(f"injected handler failure on call {self.calls + 1} "
                                   f"(events {events[0].id}..{events[-1].id})")
            self.calls += 1
            delay = self.sleep_calls.get(self.calls)
            if delay:
                logging.getLogger("chaos").warning(
                    "call %d: sleeping %.1fs in the handler", self.calls, delay)
                time.sleep(delay)
            now = time.time()
            rows = [(self.calls, self.pid, *_row(e), now) for e in events]
            db = self.db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(
                    "INSERT INTO log (call, pid, id, end_lsn, pos, lsn, tbl, type, pk, seq, vhash, at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")


def _sleep_calls(spec: str) -> dict[int, float]:
    if not spec:
        return {}
    calls, _, seconds = spec.partition(":")
    return {int(c): float(seconds or 5) for c in calls.split(",")}


async def main(args: argparse.Namespace) -> int:
    db = open_log(args.log)
    events = Events()
    events.on_event("all")(Handler(db, args.fail_after, _sleep_calls(args.sleep_calls)))
    app = WalEx(
        args.dsn, publication=args.publication, subscriptions=["*"], modules=[events],
        name=f"chaos_{args.slot}", durable_slot=True, slot_name=args.slot,
        status_interval=args.status_interval, max_pending_transactions=args.max_pending,
        reconnect_max_attempts=60, reconnect_backoff_max=1.0, retry_backoff=0.1,
        slot_wait_timeout=60,
    )
    await app.start()
    print("READY", flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: loop.create_task(app.stop()))
    try:
        await app.wait()
    except Exception as exc:
        logging.getLogger("chaos").error("consumer stopped by %s: %s", type(exc).__name__, exc)
        return 3
    finally:
        db.close()
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dsn", required=True)
    p.add_argument("--slot", required=True)
    p.add_argument("--log", required=True, help="SQLite file the events are written to")
    p.add_argument("--publication", default="chaos")
    p.add_argument("--status-interval", type=float, default=0.5)
    p.add_argument("--max-pending", type=int, default=64)
    p.add_argument("--fail-after", type=int, default=None)
    p.add_argument("--sleep-calls", default="")
    return p.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr,
        format=f"%(created).3f {os.getpid()} %(name)s %(levelname)s %(message)s",
    )
    sys.exit(asyncio.run(main(parse_args())))
