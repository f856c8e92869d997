"""Peak RSS of a relay for several ``max_pending_bytes`` and destination windows.

    .venv/bin/python bench/memory.py --destination rabbitmq            # W1, 200k rows
    .venv/bin/python bench/memory.py --destination kafka --budgets 16,64 --windows 1,256

W1 (one transaction, bigint/int/text/timestamptz/numeric/jsonb) is written once;
then the ``walex`` consumer (bench/consumers/walex_consumer.py) drains its own
slot once per (destination, budget, window), the settings given through
``WALEX_MAX_PENDING_BYTES`` and ``WALEX_DESTINATION_WINDOW``. A broker slower
than PostgreSQL (RabbitMQ, Kafka on tansu) makes the reader wait on the budget,
so the peak shows what walex holds at most. Reported per run: the baseline (the
consumer's RSS once streaming began: interpreter, imports, clients connected),
the peak (VmHWM), their difference, and CPU us/row. ``--trace`` runs each with
``BENCH_TRACEMALLOC=1`` instead (several-fold slower): the consumer's traced
Python memory at its peak and the largest allocation sites.

Writes ``bench/results/memory-<time>.json`` and ``.md``; see bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import destinations  # noqa: E402
import harness as h  # noqa: E402

MiB = 1024 * 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000, help="W1 rows (default 200,000)")
    ap.add_argument("--budgets", default="16,64,256", help="max_pending_bytes in MiB, comma-separated")
    ap.add_argument("--windows", default="1,256", help="destination_window values, comma-separated")
    ap.add_argument("--destination", action="append", default=[], metavar="NAME=URL",
                    help="as bench/run.py's (nats, redis, rabbitmq, webhook, kafka)")
    ap.add_argument("--no-plain", action="store_true", help="skip walex without a destination")
    ap.add_argument("--trace", action="store_true", help="BENCH_TRACEMALLOC=1: where the memory is")
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    windows = [int(w) for w in args.windows.split(",")]
    levels = [lv for lv in destinations.parse(args.destination) if not lv.endswith("_ceiling")]
    plan: list[tuple[str, int, int]] = []
    if not args.no_plain:
        plan += [("walex", b, 1) for b in budgets]
    plan += [(lv, b, w) for lv in levels for b in budgets for w in windows]
    w1 = h.WORKLOADS["W1"]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs: list[dict[str, Any]] = []
    with h.Bench(max_slots=len(plan)) as b:
        b.prepare(w1, args.rows)
        slots = [f"mem_{lv.replace('+', '_')}_{bud}_{win}" for lv, bud, win in plan]
        b.create_slots(slots)
        info = b.run_workload(w1, args.rows)
        print(f"W1 {args.rows:,} rows, WAL {info['wal_bytes'] / 1e6:.1f} MB", flush=True)
        try:
            for (lv, budget, window), slot in zip(plan, slots):
                os.environ["WALEX_MAX_PENDING_BYTES"] = str(budget * MiB)
                os.environ["WALEX_DESTINATION_WINDOW"] = str(window)
                if args.trace:
                    os.environ["BENCH_TRACEMALLOC"] = "1"
                if lv in destinations.URLS:
                    destinations.prepare(lv, slot)
                try:
                    run = b.run_consumer(lv, slot, info["endpos"], {}, args.timeout)
                finally:
                    if lv in destinations.URLS:
                        destinations.cleanup(lv, slot)
                child = run.get("consumer", {})
                base = (child.get("ready_rss_kb") or 0) / 1024
                peak = run["peak_rss_kb"] / 1024
                row = {"level": lv, "budget_mib": budget, "window": window, "baseline_mb": base,
                       "peak_mb": peak, "grown_mb": peak - base, "wall_s": run["wall_s"],
                       "cpu_us_row": run["cpu_s"] / args.rows * 1e6, "rows": run.get("rows"),
                       "ok": run.get("rows") == args.rows, "traced_peak_mb": child.get("traced_peak_mb"),
                       "traced_top": child.get("traced_top"), "rc": run["rc"]}
                runs.append(row)
                print(f"{lv:<16} {budget:>4} MiB window {window:>4}: baseline {base:5.0f} MB, "
                      f"peak {peak:5.0f} MB (+{peak - base:4.0f}), {run['wall_s']:6.1f} s, "
                      f"{row['cpu_us_row']:5.1f} us/row"
                      + (f", traced peak {row['traced_peak_mb']:.0f} MB" if row["traced_peak_mb"] else "")
                      + ("" if row["ok"] else f"  FAILED rc={run['rc']} rows={run.get('rows')}"),
                      flush=True)
                if args.trace and row["traced_top"]:
                    print("    " + "\n    ".join(row["traced_top"]), flush=True)
                if not row["ok"] and run.get("output_tail"):
                    print("   | " + run["output_tail"].strip()[-1500:].replace("\n", "\n   | "))
        finally:
            b.drop_slots(slots)
    lines = ["| level | max_pending_bytes | window | baseline MB | peak MB | peak - baseline MB "
             "| wall s | CPU us/row |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['level']} | {r['budget_mib']} MiB | {r['window']} | {r['baseline_mb']:.0f} "
              f"| {r['peak_mb']:.0f} | {r['grown_mb']:.0f} | {r['wall_s']:.1f} | {r['cpu_us_row']:.1f} |"
              for r in runs]
    text = f"W1, {args.rows:,} rows in one transaction\n\n" + "\n".join(lines) + "\n"
    print(text)
    out = h.BENCH / "results"
    out.mkdir(exist_ok=True)
    (out / f"memory-{stamp}.json").write_text(json.dumps(
        {"args": vars(args), "workload": info, "runs": runs}, indent=1, default=str))
    (out / f"memory-{stamp}.md").write_text(text)
    return 0 if all(r["ok"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
