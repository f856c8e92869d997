"""Which of walex, the walsender and the broker run, sampled from outside every millisecond.

    .venv/bin/python bench/stallwatch.py OUT.json WALEX_PID WALSENDER_PID BROKER_PID

Started by ``bench/loopwatch.py`` (``BENCH_LOOPWATCH``) once it knows the pids, and
stopped by SIGTERM, when it writes ``OUT.json``: per state of the three (``R``:
running or waiting for a CPU, ``S``: asleep, for the broker any of its threads
running), how many samples. A separate process, so that sampling takes nothing from
walex's GIL. Also the share of the machine's CPU time that nobody used
(``/proc/stat`` idle) over the same time, so that a joint sleep of the three can be
told apart from a machine busy with other work.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections import Counter


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return "R" if f.read().rsplit(b")", 1)[1].split()[0] == b"R" else "S"
    except (OSError, IndexError):
        return "?"


def _any_thread(pid: int) -> str:
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"R":
                    return "R"
        return "S"
    except (OSError, IndexError):
        return "?"


def _idle() -> tuple[int, int]:
    with open("/proc/stat", "rb") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return fields[3] + fields[4], sum(fields)


def main() -> None:
    out, walex, walsender, broker = sys.argv[1], *map(int, sys.argv[2:5])
    counts: Counter[str] = Counter()
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    samples = 0
    start = time.perf_counter()
    idle0, total0 = _idle()
    while not stop:
        key = _state(walex) + _state(walsender) + (_any_thread(broker) if broker > 0 else "-")
        counts[key] += 1
        samples += 1
        time.sleep(0.001)
    idle1, total1 = _idle()
    with open(out, "w") as f:
        json.dump({"samples": samples, "seconds": time.perf_counter() - start,
                   "machine_idle": (idle1 - idle0) / max(1, total1 - total0),
                   "states (walex, walsender, broker)": dict(counts.most_common())}, f)


if __name__ == "__main__":
    main()
