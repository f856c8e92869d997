"""Client CPU of walex's hot path alone, pure Python against compiled, on recorded WAL.

    .venv/bin/python bench/replay.py                    # W1-W4 shapes, 20k rows each
    .venv/bin/python bench/replay.py --rows 50000 --reps 7
    .venv/bin/python bench/replay.py --keep 64 --gc-threshold 700   # a full queue, Python's GC

The last two columns are a relay's reader and encoder: the compiled path with
each batch encoded to CloudEvents (``encode``), the rows typed and then
encoded, against the rows kept as sent (walex.rawevent) and written by the
direct encoder.

Starts a throwaway PostgreSQL 18, runs the benchmark's workloads (the tables
and SQL of ``workloads.py``, as ``run.py`` does; W2 as single-row INSERT
transactions, not through pgbench), records the pgoutput messages with
``pg_logical_slot_peek_binary_changes``, then feeds
them, as XLogData frames, through the reader's two paths in this process:
pure Python (``Decoder.decode`` + ``TransactionAssembler.feed``) and compiled
(``walex._hotpath``, the pure path for the frames it hands back). No socket,
no handler, no asyncio: CPU time per row of turning frames into typed Events
and batches, the best of ``--reps`` runs, so other load on the machine matters
much less than in ``run.py``. A calibration line gives this machine's Python
speed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import struct
import sys
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import WORKLOADS, prepare_rows, reset_tables, row_insert_sql, workload_sql  # noqa: E402

from walex import hotpath  # noqa: E402
from walex.embedded import Cluster, embedded_bindir  # noqa: E402
from walex.destinations.encoding import encode  # noqa: E402
from walex.lookups import LookupConnection  # noqa: E402
from walex.pgoutput import Decoder, Relation, Type  # noqa: E402
from walex.pgtypes import TypeCatalog  # noqa: E402
from walex.relations import RelationCache  # noqa: E402
from walex.assembler import TransactionAssembler  # noqa: E402

_HEADER = struct.Struct("!cQQq")


def calibration() -> float:
    """Seconds of CPU for a fixed pure-Python loop (10**7 multiply-adds), best of 3."""
    best = float("inf")
    for _ in range(3):
        t0 = time.process_time()
        s = 0
        for i in range(10**7):
            s += i * i
        best = min(best, time.process_time() - t0)
    return best


def record(conn: psycopg.Connection, workload: str, rows: int) -> list[bytes]:
    """The workload's pgoutput messages, as XLogData frames."""
    reset_tables(conn, WORKLOADS[workload].table, "replay_pub")
    prepare_rows(conn, workload, rows)
    conn.execute("SELECT pg_create_logical_replication_slot('replay', 'pgoutput')")
    if workload == "W2":
        for i in range(rows):
            conn.execute(row_insert_sql(i))
    else:
        conn.execute(workload_sql(workload, rows))
    data = conn.execute(
        "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes('replay', NULL, NULL, "
        "'proto_version', '1', 'publication_names', 'replay_pub')").fetchall()
    frames = []
    for lsn_text, payload in data:
        hi, lo = lsn_text.split("/")
        lsn = int(hi, 16) << 32 | int(lo, 16)
        frames.append(_HEADER.pack(b"w", lsn, lsn + len(payload), 0) + bytes(payload))
    return frames


async def feed(frames: list[bytes], compiled: bool, conn: psycopg.AsyncConnection,
               keep: int = 0, raw: bool = False, relay: bool = False) -> tuple[float, int]:
    """CPU seconds to turn ``frames`` into batches, and the number of events.

    ``keep``: the last that many batches stay alive, as in a full queue. ``raw``: every
    table's rows kept as sent (walex.rawevent), as for a relay; ``relay``: each batch
    encoded to CloudEvents too (walex.destinations.encoding), as a relay does."""
    lookups = LookupConnection()
    lookups.use(conn, None, None)
    catalog = TypeCatalog(lookups)
    relations = RelationCache(catalog, "bench", lambda schema, table: True,
                              (lambda schema, table: True) if raw else None)
    assembler = TransactionAssembler(relations)
    decoder = Decoder()
    hot = hotpath.hot_path(assembler, decoder) if compiled else None
    events = 0
    kept: collections.deque = collections.deque(maxlen=max(keep, 1))
    NOT_HANDLED = hotpath.NOT_HANDLED
    header = struct.Struct("!xQQ").unpack_from
    t0 = time.process_time()
    for frame in frames:
        batches = hot.feed(frame) if hot is not None else NOT_HANDLED
        if batches is NOT_HANDLED:
            start, _ = header(frame)
            msg = decoder.decode(frame[25:], start)
            if type(msg) is Relation:
                await relations.update(msg)
                continue
            if type(msg) is Type:
                await catalog.resolve([msg.type_oid])
                continue
            batches = assembler.feed(msg, start)
        if batches is not None:
            for txn in batches:
                events += len(txn.events)
                if relay:
                    encode(txn.events)
                if keep:
                    kept.append(txn)
    return time.process_time() - t0, events


async def measure(frames: list[bytes], compiled: bool, reps: int, dsn: str,
                  keep: int = 0, raw: bool = False, relay: bool = False) -> tuple[float, int]:
    best, events = float("inf"), 0
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for _ in range(reps):
            gc.collect()
            seconds, events = await feed(frames, compiled, conn, keep, raw, relay)
            best = min(best, seconds)
    return best, events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--w2-rows", type=int, default=5_000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--workloads", default="W1,W2,W3,W4")
    parser.add_argument("--keep", type=int, default=0,
                        help="batches kept alive, as in a full queue (walex's default holds 64)")
    parser.add_argument("--gc-threshold", type=int, default=10_000,
                        help="the GC's generation-0 threshold: walex's gc_threshold while streaming "
                             "(default 10000); 700 is Python's own")
    args = parser.parse_args()
    gc.set_threshold(args.gc_threshold, *gc.get_threshold()[1:])
    if not hotpath.compiled_available():
        sys.exit("walex._hotpath is not built (pip install -e . with Cython and a C compiler)")
    print(f"gc threshold {gc.get_threshold()}, {args.keep} batches kept alive")
    print(f"calibration: {calibration():.3f} s CPU for `for i in range(10**7): s += i * i` "
          f"(Python {sys.version.split()[0]})")
    print("| workload | rows | pure us/row | compiled us/row | compiled / pure "
          "| relay: typed + encode us/row | relay: raw + direct us/row |")
    print("|---|---|---|---|---|---|---|")
    with Cluster(embedded_bindir()) as cluster, \
            psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        for workload in args.workloads.split(","):
            rows = args.w2_rows if workload == "W2" else args.rows
            frames = record(conn, workload, rows)
            pure, n = asyncio.run(measure(frames, False, args.reps, cluster.dsn(), args.keep))
            fast, m = asyncio.run(measure(frames, True, args.reps, cluster.dsn(), args.keep))
            typed, k = asyncio.run(measure(frames, True, args.reps, cluster.dsn(), args.keep,
                                           relay=True))
            raw, r = asyncio.run(measure(frames, True, args.reps, cluster.dsn(), args.keep,
                                         raw=True, relay=True))
            assert n == m == k == r == rows, (n, m, k, r, rows)
            print(f"| {workload} | {rows:,} | {pure / rows * 1e6:.2f} | {fast / rows * 1e6:.2f} "
                  f"| {fast / pure:.2f} | {typed / rows * 1e6:.2f} | {raw / rows * 1e6:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
