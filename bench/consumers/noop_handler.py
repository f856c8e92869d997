"""The handler of ``bench/workers.py``: does nothing with its events, only counts them.

``walex worker URL noop_handler:events --app-dir bench/consumers``. A daemon
thread writes ``<count> <first> <last> <cpu> <system share>`` (epoch seconds
of the first and last call; the process's CPU seconds, user and system,
between them; the system CPU's share of that, from ``os.times``) to
``$BENCH_WORKER_COUNT`` every 50 ms, so the bench reads how many events this
process handled without slowing the handler.
"""

from __future__ import annotations

import os
import threading
import time

from walex import Event, Events

events = Events()
_state = [0, 0.0, 0.0, 0.0, 0.0]  # events, first call, last call, CPU seconds at both
_first_times: list[os.times_result] = []  # user and system CPU at the first call


@events.on_event("all")
async def handle(batch: list[Event]) -> None:
    state = _state
    now, cpu = time.time(), time.process_time()
    if not state[0]:
        state[1], state[3] = now, cpu
        _first_times.append(os.times())
    state[0] += len(batch)
    state[2], state[4] = now, cpu


def _report(path: str) -> None:
    written = None
    while True:
        snapshot = tuple(_state)
        if snapshot != written:
            # the system CPU's share since the first call (os.times ticks: 10 ms)
            share = 0.0
            if _first_times:
                first, now = _first_times[0], os.times()
                spent = now.user - first.user + now.system - first.system
                share = (now.system - first.system) / spent if spent > 0 else 0.0
            with open(path + ".tmp", "w") as fh:
                fh.write(f"{snapshot[0]} {snapshot[1]} {snapshot[2]} {snapshot[4] - snapshot[3]} "
                         f"{share}")
            os.replace(path + ".tmp", path)
            written = snapshot
        time.sleep(0.05)


if os.environ.get("BENCH_WORKER_COUNT"):
    threading.Thread(target=_report, args=(os.environ["BENCH_WORKER_COUNT"],), daemon=True).start()
