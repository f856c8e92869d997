"""Backfill against hostile tables: keys of edge types (infinite and BC timestamps, BC
dates, numeric NaN, bytea, text that looks alike once its columns are joined), chunk
boundaries between every two rows, values over 1 MB, and writers changing the rows
(a small column, their large value left unchanged) while they are read."""

from __future__ import annotations

import asyncio
import random
import threading
from typing import Any

import psycopg

from support import run, until
from test_backfill import Copy, caught_up, table_rows
from walex import UNCHANGED_TOAST, Event, EventType, WalEx

KEYS = [  # (k1, k2, ts): texts that join alike, unicode, edge timestamps
    ("a", "bc", "infinity"), ("ab", "c", "-infinity"), ("a", "bc", "0044-03-15 12:00:00 BC"),
    ("a\tb", "c", "2000-01-01"), ("ab", "", "2000-01-01"), ("", "abc", "2000-01-01"),
    ("ä", "日本", "1970-01-01"), ("ä", "日本", "294276-12-31 23:59:59"),
    ("'; DROP TABLE edge; --", ")", "2000-01-01"), ("$1", "%s", "2000-01-01"),
]


class MergingCopy(Copy):
    """A copy that keeps a value the stream did not send again (an unchanged TOASTed one)."""

    async def apply(self, events: list[Event]) -> None:
        for e in events:
            if e.type is EventType.UPDATE and e.new_record is not None:
                old = self.rows.get(e.name, {}).get(self.key(e.name, e.new_record), {})
                e.new_record = {k: old.get(k, v) if v is UNCHANGED_TOAST else v
                                for k, v in e.new_record.items()}
        await super().apply(events)


def test_edge_keys_huge_values_and_writers(dsn: str, admin: psycopg.Connection) -> None:
    admin.execute("CREATE TABLE marker (id serial PRIMARY KEY)")
    admin.execute("CREATE TABLE edge (k1 text, k2 text, ts timestamptz, d date NOT NULL, "
                  "v int NOT NULL DEFAULT 0, big text, PRIMARY KEY (k1, k2, ts))")
    admin.execute("CREATE TABLE num (n numeric PRIMARY KEY, v int NOT NULL DEFAULT 0)")
    admin.execute("CREATE TABLE bin (b bytea PRIMARY KEY, v int NOT NULL DEFAULT 0, big bytea)")
    huge = "(SELECT string_agg(md5(random()::text || g::text), '') FROM generate_series(1, 40000) g)"
    for i, (k1, k2, ts) in enumerate(KEYS):
        admin.execute(f"INSERT INTO edge VALUES (%s, %s, %s, %s, 0, {huge if i % 3 == 0 else 'NULL'})",
                      (k1, k2, ts, "0100-02-03 BC" if i % 2 else "2024-02-29"))
    admin.execute("INSERT INTO num VALUES ('NaN'), (0), (-0.0001), (1e-20), (123456789012345678901234567890)")
    admin.execute(f"INSERT INTO bin SELECT decode(lpad(to_hex(g), 2, '0'), 'hex'), 0, "
                  f"CASE WHEN g % 4 = 0 THEN convert_to({huge}, 'UTF8') END "
                  "FROM generate_series(0, 15) g")
    admin.execute("INSERT INTO bin VALUES ('\\x00', 0, NULL) ON CONFLICT DO NOTHING")
    admin.execute("CREATE PUBLICATION pub FOR TABLE edge, num, bin, marker")
    stop = threading.Event()
    changes = {"n": 0}

    def writers() -> None:
        rnd = random.Random(7)
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.is_set():
                k1, k2, ts = rnd.choice(KEYS)
                conn.execute("UPDATE edge SET v = v + 1 WHERE (k1, k2, ts) = (%s, %s, %s)",
                             (k1, k2, ts))
                conn.execute("UPDATE num SET v = v + 1 WHERE n = 'NaN'")
                conn.execute("UPDATE bin SET v = v + 1 WHERE b = %s",
                             (bytes([rnd.randrange(16)]),))
                changes["n"] += 1

    async def main() -> tuple[Copy, list[Any]]:
        copy = MergingCopy({"edge": ("k1", "k2", "ts"), "num": ("n",), "bin": ("b",),
                     "marker": ("id",)})
        reads: list[Any] = []
        copy.events.on_read("all")(lambda events: reads.extend(events))
        app = WalEx(dsn, publication="pub", name="hostile", backfill_chunk_size=2,
                    modules=[copy.events])
        thread = threading.Thread(target=writers)
        async with app:
            thread.start()
            try:
                await until(lambda: changes["n"] > 5, "the writers to start")
                for table in ("edge", "num", "bin"):
                    job = await app.backfill(table)
                    assert job.state == "done", job
            finally:
                stop.set()
                await asyncio.to_thread(thread.join)
            await caught_up(admin, copy)
        return copy, reads

    copy, reads = run(main(), timeout=240)

    def canon(rows: dict[tuple[Any, ...], dict[str, Any]]) -> dict[str, str]:
        return {repr(k): repr(sorted(r.items())) for k, r in rows.items()}  # NaN != NaN: as text

    for table, keys in (("num", ("n",)), ("bin", ("b",))):
        assert canon(copy.rows[table]) == canon(table_rows(admin, table, keys)), table

    def text(ts: Any) -> str:  # 'infinity' and BC stay text in events; others as PostgreSQL says
        return ts if isinstance(ts, str) else admin.execute("SELECT %s::timestamptz::text",
                                                            (ts,)).fetchone()[0]

    want = {(k1, k2, ts): (d, v, big) for k1, k2, ts, d, v, big in admin.execute(
        "SELECT k1, k2, ts::text, d::text, v, md5(big) FROM edge")}
    got = {(r["k1"], r["k2"], text(r["ts"])): (
        r["d"] if isinstance(r["d"], str) else r["d"].isoformat(), r["v"],
        admin.execute("SELECT md5(%s)", (r["big"],)).fetchone()[0] if r["big"] else None)
        for r in copy.rows["edge"].values()}
    assert got == want
    ids = [e.id for e in reads]
    assert len(ids) == len(set(ids))  # one id per read
    assert all(e.type is EventType.READ for e in reads)
    assert any(e.new_record.get("big") and len(e.new_record["big"]) > 1_000_000 for e in reads)


def test_a_partitioned_table_published_by_its_root(dsn: str, admin: psycopg.Connection) -> None:
    """Rows are read from the root, their versions (xmin) too, across partitions."""
    admin.execute("CREATE TABLE marker (id serial PRIMARY KEY)")
    admin.execute("CREATE TABLE m (id int PRIMARY KEY, at int) PARTITION BY RANGE (id)")
    admin.execute("CREATE TABLE m_1 PARTITION OF m FOR VALUES FROM (0) TO (100)")
    admin.execute("CREATE TABLE m_2 PARTITION OF m FOR VALUES FROM (100) TO (200)")
    admin.execute("INSERT INTO m SELECT g, g FROM generate_series(0, 199) g")
    admin.execute("CREATE PUBLICATION pub FOR TABLE m, marker "
                  "WITH (publish_via_partition_root = true)")

    async def main() -> Copy:
        copy = Copy({"m": ("id",), "marker": ("id",)})
        app = WalEx(dsn, publication="pub", name="parted", backfill_chunk_size=30,
                    modules=[copy.events])
        async with app:
            job = await app.backfill("m")
            assert job.state == "done" and job.rows_done == 200
            await caught_up(admin, copy)
        return copy

    copy = run(main())
    assert copy.rows["m"] == table_rows(admin, "m", ("id",))
