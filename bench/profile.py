"""Profile the walex level with py-spy: where does walex spend its CPU time?

    .venv/bin/python bench/profile.py                       # W1 and W3 at --scale 0.2
    .venv/bin/python bench/profile.py --workloads W2 --scale 0.1 --svg
    .venv/bin/python bench/profile.py --workloads W1 --destination nats  # the relay

Same set-up as run.py (throwaway cluster, slot created before the
workload), then the walex consumer runs under ``py-spy record --nonblocking
--function`` (idle samples excluded, so percentages are of CPU-busy
samples). Time spent in C code (psycopg's loaders, struct, the event loop's
selector) is charged to the Python function that called it.

Prints, per workload: self time by function, inclusive time by function, and
self time by file; writes them with the raw stacks to bench/results/.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402

RESULTS = h.BENCH / "results"
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


def short_file(path: str) -> str:
    """``walex/pipeline.py``, ``psycopg/...``, ``asyncio/...``, ``bench:x.py``, ``C:_json.c``."""
    for marker in ("/src/walex/", "/site-packages/walex/"):
        if marker in path:
            return "walex/" + path.split(marker, 1)[1]
    if path.endswith(".so") or ".so." in path:
        name = path.rsplit("/", 1)[-1]
        if "psycopg_binary" in path:
            return "C:psycopg_binary"
        if name.startswith("libpython"):
            return "C:libpython"
        if name.startswith("libc.so"):
            return "C:libc"
        return "C:" + name.split(".")[0]
    if path.endswith((".c", ".h")):
        return "C:" + path.rsplit("/", 1)[-1]
    if "/site-packages/" in path:
        return path.split("/site-packages/", 1)[1]
    if "/bench/" in path:
        return "bench:" + path.rsplit("/", 1)[1]
    m = re.search(r"/lib/python3\.\d+/(.*)$", path)
    return m.group(1) if m else path


Frame = tuple[str, str]  # (function, short file)

IDLE = {"epoll_wait", "select", "poll", "EpollSelector.select", "__futex_abstimed_wait_common",
        "pthread_cond_wait", "pthread_cond_timedwait", "do_futex_wait", "sem_clockwait"}


FREE = {"_PyObject_Free", "PyObject_Free", "free", "munmap", "mpd_del", "_PyMem_RawFree",
        "cfree", "_int_free"}


def parse_raw(text: str) -> list[tuple[list[Frame], int]]:
    """py-spy raw output: ``frame;frame;... count`` lines, root first."""
    stacks = []
    for line in text.splitlines():
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        frames: list[Frame] = []
        for frame in stack.split(";"):
            m = _FRAME.match(frame)
            if not frame:
                frames.append(("(no Python frame)", "-"))
            elif m is None:
                frames.append((frame, "?"))
            else:
                func, file = m.group("func"), short_file(m.group("file"))
                if func.startswith("0x"):
                    func = "(unresolved)"
                frames.append((func, file))
        stacks.append((frames, int(count)))
    return stacks


def is_python(frame: Frame) -> bool:
    return not frame[1].startswith("C:") and frame[1] not in ("-", "?")


def category(frames: list[Frame]) -> str:
    """What a busy sample was doing, by layer (first rule that matches)."""
    files = [f for _, f in frames]
    funcs = [fn for fn, _ in frames]
    leaf_fn, leaf_file = frames[-1]
    py = [f for f in frames if is_python(f) and f[1] != "<string>"]  # <string>: dataclass __init__
    py_file = py[-1][1] if py else "-"
    if any("importlib" in f for f in files):
        return "start-up: imports"
    if any(fn.startswith(("gc_collect", "collect_with_callback")) for fn in funcs):
        return "cyclic garbage collector (gc_collect_main)"
    if "dealloc" in leaf_fn or leaf_fn in FREE:
        return "freeing objects (deallocation)"
    if ("C:orjson" in files or "C:_json.c" in files or py_file.startswith("json/")
            or py_file.startswith("orjson") or py_file == "walex/pgtypes.py"):
        return "json/jsonb loading (orjson or json, via psycopg's json loader)"
    if "C:psycopg_binary" in files or py_file.startswith("psycopg/types"):
        return "psycopg loaders (C) incl. Decimal/datetime construction"
    if py_file == "walex/pgoutput/decoder.py":
        return "walex pgoutput decoder (decoder.py)"
    if py_file == "walex/relations.py":
        return "walex Table.load (relations.py, excl. psycopg)"
    if py_file in ("walex/assembler.py", "walex/transactions.py", "walex/event.py", "walex/rows.py"):
        return "walex events: dicts, Event objects, ids, batches (rows.py, assembler.py)"
    if py_file == "walex/spill.py":
        return "walex spilling streamed transactions (spill.py)"
    if py_file in ("walex/pipeline.py", "walex/replication/stream.py", "walex/ack.py",
                   "walex/replication/frames.py"):
        return "walex reader loop: frames, copy data (pipeline.py, stream.py)"
    if py_file in ("walex/dispatch.py", "walex/handlers.py"):
        return "walex dispatch and handler selection"
    if py_file.startswith("bench:"):
        return "the benchmark's handler (touching every field)"
    if py_file.startswith(("asyncio/", "selectors.py")):
        return "asyncio event loop"
    if leaf_file == "-":
        return "no Python frame (interpreter start/exit)"
    return f"other ({py_file})"


def aggregate(stacks: list[tuple[list[Frame], int]]) -> dict[str, Any]:
    busy = [(f, c) for f, c in stacks if f and f[-1][0] not in IDLE]
    total = sum(c for _, c in busy)
    self_t: collections.Counter[str] = collections.Counter()
    py_self: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    cats: collections.Counter[str] = collections.Counter()
    steady_total = 0
    for frames, count in busy:
        cat = category(frames)
        cats[cat] += count
        if cat.startswith(("start-up", "no Python frame")):
            continue  # the function tables describe the steady state
        steady_total += count
        func, file = frames[-1]
        self_t[f"{func} ({file})"] += count
        py = [f for f in frames if is_python(f)]
        if py:
            py_self[f"{py[-1][0]} ({py[-1][1]})"] += count
        for name in {f"{fn} ({fl})" for fn, fl in frames if (fn, fl) != ("(unresolved)", fl)}:
            incl[name] += count
    idle = sum(c for _, c in stacks) - total
    return {"samples": total, "steady": steady_total, "idle": idle, "self": self_t, "py_self": py_self,
            "inclusive": incl, "categories": cats}


def table(counter: collections.Counter[str], total: int, title: str, top: int,
          unit: str = "% of busy samples") -> str:
    lines = [f"| {title} | {unit} |", "|---|---|"]
    for name, count in counter.most_common(top):
        lines.append(f"| `{name}` | {100 * count / total:.1f} |")
    return "\n".join(lines)


def category_table(cats: collections.Counter[str], total: int) -> str:
    startup = cats.get("start-up: imports", 0) + cats.get("no Python frame (interpreter start/exit)", 0)
    steady = max(1, total - startup)
    lines = ["| where the time goes (layer) | % of busy samples | % excluding start-up |",
             "|---|---|---|"]
    for name, count in cats.most_common():
        excl = "-" if name.startswith(("start-up", "no Python frame")) else f"{100 * count / steady:.1f}"
        lines.append(f"| {name} | {100 * count / total:.1f} | {excl} |")
    return "\n".join(lines)


def profile_workload(b: h.Bench, name: str, args: argparse.Namespace, pyspy: str) -> str:
    w = h.WORKLOADS[name]
    rows = w.rows(args.scale)
    print(f"== {name}: {w.desc.format(rows=rows)}", flush=True)
    b.prepare(w, rows)
    slot = f"prof_{name.lower()}"
    b.create_slots([slot])
    info = b.run_workload(w, rows)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    raw = RESULTS / f"profile-{name}-{stamp}.raw.txt"
    wrap = [pyspy, "record", "--function", "--full-filenames", "--rate", str(args.rate),
            *(["--native"] if args.native else ["--nonblocking"]),
            "--format", "raw", "--output", str(raw), "--"]
    level = f"walex+{args.destination}" if args.destination else "walex"
    if args.destination:
        import destinations

        destinations.prepare(level, slot)
    try:
        run = b.run_consumer(level, slot, info["endpos"], {}, args.timeout, wrap=wrap)
    finally:
        if args.destination:
            destinations.cleanup(level, slot)
    if args.svg:
        svg = RESULTS / f"profile-{name}-{stamp}.svg"
        slot2 = f"prof_{name.lower()}_svg"
        print("   (a second run for the flame graph: needs a new slot and workload)", flush=True)
        b.prepare(w, rows)
        b.create_slots([slot2])
        info2 = b.run_workload(w, rows)
        b.run_consumer(level, slot2, info2["endpos"], {}, args.timeout,
                       wrap=[pyspy, "record", "--nonblocking", "--rate", str(args.rate),
                             "--output", str(svg), "--"])
    b.drop_slots([slot])
    if run.get("rows") != rows:
        raise RuntimeError(f"walex consumer handled {run.get('rows')} of {rows} rows: "
                           f"{run.get('output_tail', '')}")
    agg = aggregate(parse_raw(raw.read_text()))
    mode = "native, blocking" if args.native else "Python only, nonblocking"
    head = (f"### {name}: {w.desc.format(rows=rows)}\n\n"
            f"walex under py-spy ({args.rate} Hz, {mode}; sampling slows it down): "
            f"{run['wall_s']:.2f} s wall, {rows / run['wall_s']:,.0f} rows/s, CPU {run['cpu_s']:.2f} s. "
            f"Raw stacks: `{raw.relative_to(h.BENCH)}`.")
    return report(head, agg, args.native, args.top)


def report(head: str, agg: dict[str, Any], native: bool, top: int) -> str:
    total = agg["samples"] or 1
    steady = agg["steady"] or 1
    unit = "% excluding start-up"
    parts = [head + f" {agg['samples']} busy samples ({agg['steady']} after start-up).",
             category_table(agg["categories"], total)]
    if native:
        parts.append(table(agg["py_self"], steady,
                           "self time by Python function, C callees included", top, unit))
    parts += [table(agg["self"], steady, "self time (leaf frame)", top, unit),
              table(agg["inclusive"], steady, "inclusive time", top, unit)]
    return "\n\n".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="W1,W3")
    ap.add_argument("--scale", type=float, default=0.2)
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--svg", action="store_true", help="also record a flame graph (second run)")
    ap.add_argument("--no-native", dest="native", action="store_false",
                    help="Python frames only, nonblocking (less overhead, C time charged to callers)")
    ap.add_argument("--destination", metavar="NAME",
                    help="profile walex+NAME, the relay to a destination (nats, redis, rabbitmq, "
                         "webhook, kafka; as run.py --destination)")
    ap.add_argument("--summarize", nargs="+", type=Path, metavar="RAW",
                    help="only summarize existing raw stack files (bench/results/*.raw.txt)")
    args = ap.parse_args()
    if args.summarize:
        for raw in args.summarize:
            agg = aggregate(parse_raw(raw.read_text()))
            print(report(f"### {raw.name}\n\n", agg, True, args.top) + "\n")
        return 0
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        ap.error("py-spy not found: pip install -e '.[bench]'")
    RESULTS.mkdir(exist_ok=True)
    if args.destination:
        import destinations

        destinations.parse([args.destination])
    parts = []
    with h.Bench() as b:
        for name in args.workloads.split(","):
            parts.append(profile_workload(b, name, args, pyspy))
    text = "\n\n".join(parts) + "\n"
    out = RESULTS / f"profile-{time.strftime('%Y%m%d-%H%M%S')}.md"
    out.write_text(text)
    print(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
