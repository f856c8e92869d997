"""The workload of the fault-injection suite, and its ground truth.

Tables (both published, both ``REPLICA IDENTITY FULL``)::

    items(pk int primary key, seq bigint, payload text)   -- the data
    txns(txn_no int primary key, ops jsonb)               -- one row per transaction

Every workload transaction ends by inserting its ``txns`` row, whose ``ops``
is the exact list of events walex must deliver for it, in order:
``[type, table, pk, seq, vhash]`` (``vhash`` = md5 of the payload, the old
row's for a delete; the marker itself is the last event). As the marker
commits or not together with the changes, ``SELECT * FROM txns`` after the
run is the ground truth, even when a server crash left a COMMIT in doubt.

Shapes of transactions (seeded random):

- plain: 1-5 inserts / updates (with or without a new 12 kB payload, so
  unchanged TOAST values must be filled in from the old row) / deletes;
- overlapping: connection A keeps a transaction open across several
  transactions of connection B, then commits: A's changes are delivered
  after B's, in commit order (A and B use disjoint pks so they never wait);
- savepoints: ``SAVEPOINT``, poison changes (``seq = -1``, pks >= 1000),
  ``ROLLBACK TO SAVEPOINT`` (must never be delivered); or ``RELEASE`` of
  real changes (must be delivered);
- aborted: a whole transaction rolled back (its marker never commits);
- truncate: ``TRUNCATE items`` (only when A is idle).

``seq`` comes from one counter and only grows, so per pk, seq increases in
commit order. :attr:`Workload.commit_order` lists txn numbers in the order
their COMMIT was sent (one thread, one commit at a time: that is the commit
order); filtered by the ground truth it is the expected delivery order.
"""

from __future__ import annotations

import hashlib
import json
import random
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

SCHEMA = """
CREATE TABLE items (pk int PRIMARY KEY, seq bigint NOT NULL, payload text);
ALTER TABLE items REPLICA IDENTITY FULL;
CREATE TABLE txns (txn_no int PRIMARY KEY, ops jsonb NOT NULL);
ALTER TABLE txns REPLICA IDENTITY FULL;
CREATE PUBLICATION chaos FOR TABLE items, txns;
"""

A_PKS = range(0, 40)  # connection A (long, overlapping transactions)
B_PKS = range(100, 220)  # connection B
POISON_PK = 1000  # rows inserted in rolled-back savepoints start here
Op = list[Any]  # [type, table, pk, seq, vhash]


def md5(text: str | None) -> str | None:
    return None if text is None else hashlib.md5(text.encode()).hexdigest()


def setup(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)


@dataclass
class _Side:
    """One connection and the rows it owns: pk -> (seq, payload hash)."""

    pks: range
    rows: dict[int, tuple[int, str | None]] = field(default_factory=dict)
    conn: psycopg.Connection | None = None
    open_ops: list[Op] | None = None  # A: the transaction kept open
    open_txn: int = 0
    open_for: int = 0  # how many more B transactions A stays open


class Workload:
    """Writes transactions until stopped; survives server restarts."""

    def __init__(self, dsn: str, seed: int, *, pace: float = 0.02, toast_ratio: float = 0.15) -> None:
        self.dsn = dsn
        self.rng = random.Random(seed)
        self.pace = pace
        self.toast_ratio = toast_ratio
        self.a = _Side(A_PKS)
        self.b = _Side(B_PKS)
        self.seq = 0
        self.txn_no = 0
        self.commit_order: list[int] = []
        self.aborted: list[int] = []
        self.errors = 0
        self.stats = {"plain": 0, "overlap": 0, "savepoint_rollback": 0, "savepoint_release": 0,
                      "aborted": 0, "truncate": 0, "toast": 0}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failure: BaseException | None = None

    # -- running ---------------------------------------------------------

    def start(self) -> Workload:
        self._thread = threading.Thread(target=self._run, name="chaos-workload", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)
            assert not self._thread.is_alive(), "workload thread did not stop"
        if self.failure is not None:
            raise self.failure

    def run_for(self, transactions: int) -> None:
        """Run synchronously until ``transactions`` more were committed (or tried)."""
        target = self.txn_no + transactions
        while self.txn_no < target:
            self._step_safely()
        self._finish_open()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._step_safely()
                time.sleep(self.rng.uniform(0, 2 * self.pace))
            self._finish_open()
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.failure = exc

    def _step_safely(self) -> None:
        try:
            self._connect()
            self._step()
        except psycopg.OperationalError:
            # The server went away (restart): an open A transaction is lost,
            # a COMMIT may be in doubt; the ground truth (txns) tells later.
            self.errors += 1
            self._disconnect()
            time.sleep(0.2)
            self._resync()

    def _finish_open(self) -> None:
        for _ in range(100):
            try:
                self._connect()
                if self.a.open_ops is not None:
                    self._commit(self.a)
                return
            except psycopg.OperationalError:
                self.errors += 1
                self._disconnect()
                time.sleep(0.2)
                self._resync()
        raise RuntimeError("workload could not reconnect to finish")

    # -- connections -----------------------------------------------------

    def _connect(self) -> None:
        for side in (self.a, self.b):
            if side.conn is None or side.conn.closed:
                side.conn = psycopg.connect(self.dsn, connect_timeout=5)

    def _disconnect(self) -> None:
        for side in (self.a, self.b):
            if side.conn is not None:
                try:
                    side.conn.close()
                except Exception:  # noqa: BLE001
                    pass
                side.conn = None
            side.open_ops = None

    def _resync(self) -> None:
        """Rebuild the row model from the database (after a lost connection)."""
        for _ in range(300):
            try:
                with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn:
                    rows = conn.execute("SELECT pk, seq, md5(payload) FROM items").fetchall()
                break
            except psycopg.OperationalError:
                time.sleep(0.2)
        else:
            raise RuntimeError("workload: the server did not come back")
        for side in (self.a, self.b):
            side.rows = {pk: (seq, h) for pk, seq, h in rows if pk in side.pks}

    # -- transactions ----------------------------------------------------

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def _payload(self) -> str | None:
        if self.rng.random() < self.toast_ratio:
            self.stats["toast"] += 1
            return secrets.token_hex(6000)  # 12 kB, incompressible: stored out of line
        return self.rng.choice([None, "small-" + secrets.token_hex(8)])

    def _change(self, side: _Side, ops: list[Op]) -> None:
        """One random insert, update or delete on ``side``'s rows."""
        conn = side.conn
        assert conn is not None
        free = [pk for pk in side.pks if pk not in side.rows]
        roll = self.rng.random()
        if (roll < 0.4 or not side.rows) and free:
            pk, seq, payload = self.rng.choice(free), self._next_seq(), self._payload()
            conn.execute("INSERT INTO items VALUES (%s, %s, %s)", (pk, seq, payload))
            side.rows[pk] = (seq, md5(payload))
            ops.append(["insert", "items", pk, seq, md5(payload)])
        elif roll < 0.85 or not free:
            pk = self.rng.choice(sorted(side.rows))
            seq = self._next_seq()
            if self.rng.random() < 0.5:  # payload untouched: TOAST not resent
                conn.execute("UPDATE items SET seq = %s WHERE pk = %s", (seq, pk))
                vhash = side.rows[pk][1]
            else:
                payload = self._payload()
                conn.execute("UPDATE items SET seq = %s, payload = %s WHERE pk = %s", (seq, payload, pk))
                vhash = md5(payload)
            side.rows[pk] = (seq, vhash)
            ops.append(["update", "items", pk, seq, vhash])
        else:
            pk = self.rng.choice(sorted(side.rows))
            old_seq, old_hash = side.rows.pop(pk)
            conn.execute("DELETE FROM items WHERE pk = %s", (pk,))
            ops.append(["delete", "items", pk, old_seq, old_hash])

    def _poison(self, side: _Side) -> None:
        """Changes made inside a savepoint that is rolled back."""
        conn = side.conn
        assert conn is not None
        conn.execute("INSERT INTO items VALUES (%s, -1, %s)",
                     (POISON_PK + self.rng.randrange(1000), secrets.token_hex(6000)))
        if side.rows:
            conn.execute("UPDATE items SET seq = -1 WHERE pk = %s", (self.rng.choice(sorted(side.rows)),))
            conn.execute("DELETE FROM items WHERE pk = %s", (self.rng.choice(sorted(side.rows)),))

    def _begin(self, side: _Side) -> tuple[int, list[Op]]:
        self.txn_no += 1
        return self.txn_no, []

    def _commit(self, side: _Side, txn: int | None = None, ops: list[Op] | None = None) -> None:
        if txn is None:
            txn, ops = side.open_txn, side.open_ops
            side.open_ops = None
        assert ops is not None and side.conn is not None
        ops = ops + [["insert", "txns", txn, None, None]]
        side.conn.execute("INSERT INTO txns VALUES (%s, %s)", (txn, Jsonb(ops)))
        self.commit_order.append(txn)  # before COMMIT: an in-doubt commit keeps its place
        side.conn.commit()

    def _step(self) -> None:
        a, b = self.a, self.b
        rng = self.rng
        # Connection A: open a long transaction, add to it, or commit it.
        if a.open_ops is None and rng.random() < 0.15:
            a.open_txn, a.open_ops = self._begin(a)
            a.open_for = rng.randint(1, 6)
            self.stats["overlap"] += 1
        if a.open_ops is not None:
            if rng.random() < 0.7:
                self._change(a, a.open_ops)
            a.open_for -= 1
            if a.open_for <= 0:
                if not a.open_ops:
                    self._change(a, a.open_ops)
                self._commit(a)
                return
        # Connection B: one whole transaction.
        txn, ops = self._begin(b)
        conn = b.conn
        assert conn is not None
        roll = rng.random()
        if roll < 0.03 and a.open_ops is None:
            conn.execute("TRUNCATE items")
            ops.append(["truncate", "items", None, None, None])
            a.rows.clear()
            b.rows.clear()
            self.stats["truncate"] += 1
            if rng.random() < 0.5:
                self._change(b, ops)
        elif roll < 0.08:
            for _ in range(rng.randint(1, 3)):
                self._change(b, [])
            conn.rollback()
            self.aborted.append(txn)
            self._resync_side(b)
            self.stats["aborted"] += 1
            return
        elif roll < 0.25:
            self._change(b, ops)
            before = dict(b.rows)
            conn.execute("SAVEPOINT s1")
            if rng.random() < 0.6:
                self._poison(b)
                for _ in range(rng.randint(0, 2)):
                    self._change(b, [])  # tracked in the model, then undone
                conn.execute("ROLLBACK TO SAVEPOINT s1")
                b.rows = before
                self.stats["savepoint_rollback"] += 1
            else:
                for _ in range(rng.randint(1, 3)):
                    self._change(b, ops)
                conn.execute("RELEASE SAVEPOINT s1")
                self.stats["savepoint_release"] += 1
            self._change(b, ops)
        else:
            for _ in range(rng.randint(1, 5)):
                self._change(b, ops)
            self.stats["plain"] += 1
        self._commit(b, txn, ops)

    def _resync_side(self, side: _Side) -> None:
        assert side.conn is not None
        rows = side.conn.execute("SELECT pk, seq, md5(payload) FROM items").fetchall()
        side.conn.rollback()
        side.rows = {pk: (seq, h) for pk, seq, h in rows if pk in side.pks}


def ground_truth(dsn: str) -> dict[int, list[Op]]:
    """txn_no -> the events it must produce, from the committed ``txns`` rows."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT txn_no, ops FROM txns").fetchall()
    return {txn: ops if isinstance(ops, list) else json.loads(ops) for txn, ops in rows}
