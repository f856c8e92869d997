"""What every Python consumer of the benchmark shares (standard library only).

A consumer is started by ``bench/run.py`` as its own process with the
arguments below. It drains its own slot, touches every field of every change
it gets (so lazy decoding cannot win by doing nothing), stops once the
workload is fully handled, and writes one JSON result file (stdout is left to
the libraries, some of which print).

Stop rule: the runner records ``endpos = pg_current_wal_lsn()`` after the
workload and then commits one row into the marker table. A consumer that
sees commits stops after handling a commit whose end LSN is >= endpos (the
last workload commit, or the marker's); one that only sees rows or batches
(walex, the PyPI peers) stops at the marker row. Either way every workload
row was handled.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from typing import Any


def parse_args(description: str, flags: tuple[str, ...] = ()) -> argparse.Namespace:
    """The common arguments, plus boolean ``flags`` of a particular consumer."""
    ap = argparse.ArgumentParser(description=description)
    for flag in flags:
        ap.add_argument(flag, action="store_true")
    ap.add_argument("--dsn", required=True, help="libpq connection string")
    ap.add_argument("--slot", required=True)
    ap.add_argument("--publication", required=True)
    ap.add_argument("--endpos", required=True, help="LSN such as 0/1A2B3C4D")
    ap.add_argument("--marker-table", default="bench_marker")
    ap.add_argument("--result", required=True, help="JSON file to write")
    ap.add_argument("--lag", action="store_true", help="record commit->handler lag per event")
    ap.add_argument("--destination", action="append", default=[],
                    help="walex only: also publish every event to this URL")
    return ap.parse_args()


def parse_lsn(text: str) -> int:
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def touch_mapping(record: Any) -> int:
    """Read every key and value of a row (dict-like or iterable of pairs)."""
    n = 0
    if record is None:
        return 0
    items = record.items() if hasattr(record, "items") else record
    for key, value in items:
        if key is not None and value is not None:
            n += 1
    return n


class Result:
    """Collects counters and timestamps (epoch seconds) and writes the JSON."""

    def __init__(self, level: str, args: argparse.Namespace) -> None:
        self.args = args
        self.data: dict[str, Any] = {
            "level": level, "slot": args.slot, "rows": 0, "marker_seen": False,
            "t_ready": None, "t_first_row": None, "t_end": None,
        }
        self.lags: list[float] = []

    def ready(self) -> None:
        self.data["t_ready"] = time.time()
        self.data["ready_rss_kb"] = vmhwm_kb(field="VmRSS:")  # the baseline: imports, clients

    def first_row(self) -> None:
        if self.data["t_first_row"] is None:
            self.data["t_first_row"] = time.time()

    def end(self) -> None:
        self.data["t_end"] = time.time()

    def write(self, **extra: Any) -> None:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.data.update(extra)
        self.data["self_cpu_s"] = ru.ru_utime + ru.ru_stime
        self.data["self_maxrss_kb"] = ru.ru_maxrss  # includes the parent's image before exec
        self.data["vmhwm_kb"] = vmhwm_kb()
        if self.lags:
            self.data["lag"] = lag_stats(self.lags)
        with open(self.args.result, "w") as fh:
            json.dump(self.data, fh, default=str)


def vmhwm_kb(pid: str = "self", field: str = "VmHWM:") -> int | None:
    """Peak resident set of this process image (VmHWM), unlike ru_maxrss not inflated
    by the memory of the parent that forked it (``field="VmRSS:"``: the current one)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def lag_stats(lags: list[float]) -> dict[str, float]:
    s = sorted(lags)
    return {
        "n": len(s), "p50_ms": 1000 * percentile(s, 0.50), "p90_ms": 1000 * percentile(s, 0.90),
        "p99_ms": 1000 * percentile(s, 0.99), "max_ms": 1000 * s[-1], "min_ms": 1000 * s[0],
    }
