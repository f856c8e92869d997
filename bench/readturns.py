"""The replication stream reader's own cost per W1 row, on a real walsender socket.

    .venv/bin/python bench/readturns.py                    # loop turns and CPU per row
    .venv/bin/python bench/readturns.py --callgrind        # instructions per row (valgrind)

A throwaway PostgreSQL 18 (the embedded wheel) gets W1's table and two slots: the
first sees a transaction of ``--rows`` rows, the second (made after it) one of
twice as many. A child process streams a slot with walex's
:class:`~walex.replication.stream.ReplicationConnection` and only reads: every
frame through ``read()`` (in ``asyncio.timeout``, as the pipeline) until the first
Commit, no decoding, no status update (so a slot streams the same again). It
reports the ``read()`` calls, the waits for the socket (loop turns through
``select``) and its CPU. ``--callgrind`` runs the child under
``valgrind --tool=callgrind`` on both slots (the least of ``--reps`` runs each) and
reports the difference in instructions over the extra rows: start-up and the
connection drop out. ``read()`` gathers frames with the compiled loop
(``walex.replication._readloop``) when it is built; ``WALEX_PURE_PYTHON=1`` in the
environment measures the Python loop. Under valgrind the child is far slower than
the walsender, so the socket always holds data: the case of a reader that is behind,
where the loop turns per row count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from operator import itemgetter
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from pertxn import callgrind_total  # noqa: E402

_KIND = itemgetter(slice(25, 26))  # the pgoutput message's kind, in C per frame


def prepare(dsn: str, rows: int) -> None:
    import psycopg
    from workloads import reset_tables, workload_sql

    with psycopg.connect(dsn, autocommit=True) as conn:
        reset_tables(conn, "bench_rows", "turns_pub")
        conn.execute("SELECT pg_create_logical_replication_slot('turns_a', 'pgoutput')")
        conn.execute(workload_sql("W1", rows))
        conn.execute("SELECT pg_create_logical_replication_slot('turns_b', 'pgoutput')")
        conn.execute(workload_sql("W1", 2 * rows))


async def stream(dsn: str, slot: str) -> dict[str, float]:
    from walex.replication.stream import ReplicationConnection

    repl = await ReplicationConnection.connect(dsn)
    await repl.start(slot, 0, {"proto_version": "1", "publication_names": "turns_pub"})
    waits = 0
    wait = repl._wait_readable

    async def counted() -> None:
        nonlocal waits
        waits += 1
        await wait()

    repl._wait_readable = counted  # type: ignore[method-assign]
    reads = frames = 0
    cpu = time.process_time()
    done = False
    while not done:
        async with asyncio.timeout(10):  # as walex.pipeline reads
            got = await repl.read()
        reads += 1
        frames += len(got)
        done = b"C" in map(_KIND, got)  # an XLogData Commit (a keepalive has no byte 25)
    cpu = time.process_time() - cpu
    await repl.close()
    loop = "compiled" if repl._read_loop is not None else "Python"
    return {"frames": frames, "reads": reads, "waits": waits, "cpu": cpu, "loop": loop}


def child(args: argparse.Namespace) -> None:
    print(json.dumps(asyncio.run(stream(args.dsn, args.slot))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--callgrind", action="store_true")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--keep-out", default=None, help="with --callgrind: keep the files here")
    parser.add_argument("--dsn", help=argparse.SUPPRESS)
    parser.add_argument("--slot", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.slot:
        child(args)
        return
    from walex.embedded import Cluster, embedded_bindir

    with Cluster(embedded_bindir()) as cluster:
        dsn = cluster.dsn()
        prepare(dsn, args.rows)
        me = [str(Path(__file__).resolve()), "--dsn", dsn]
        for slot, rows in (("turns_a", args.rows), ("turns_b", 2 * args.rows)):
            runs = [json.loads(subprocess.run([sys.executable, *me, "--slot", slot], check=True,
                                              capture_output=True, text=True).stdout)
                    for _ in range(args.reps)]
            best = min(runs, key=lambda r: r["cpu"])
            print(f"{slot} ({rows} rows, {best['loop']} frame loop): frames {best['frames']}, read() calls "
                  f"{best['reads']}, socket waits {best['waits']} (best of {args.reps}: "
                  f"{best['cpu'] * 1e6 / rows:.2f} us CPU per row; waits per 1000 rows "
                  f"{[round(r['waits'] * 1000 / rows, 1) for r in runs]})")
        if args.callgrind:
            keep = Path(args.keep_out) if args.keep_out else None
            totals = [min(callgrind_total([*me, "--slot", slot],
                                          keep / f"callgrind.{slot}" if keep else None)
                              for _ in range(args.reps))
                      for slot in ("turns_a", "turns_b")]
            print(f"callgrind: {totals[0]:,} and {totals[1]:,} instructions; "
                  f"{(totals[1] - totals[0]) / args.rows:,.0f} per extra row")


if __name__ == "__main__":
    main()
