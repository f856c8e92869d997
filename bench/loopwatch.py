"""A timeline of a relay's event loop: where it waits, and why (branch relaywait).

``consumers/walex_consumer.py`` installs it when ``BENCH_LOOPWATCH`` names a file:

    BENCH_LOOPWATCH=/tmp/w.json .venv/bin/python bench/run.py --reps 1 --scale 0.2 \\
        --workloads W1 --levels walex --no-peers --no-plot --destination nats

Every ``select`` of the app's event loop (asyncio's selector, uvloop is not
watched) is timed and labelled with the state at its entry: whether the
reader waits for the replication socket (``sock``), for room in the queue
(``room``) or for something else (``-``); whether the dispatcher waits for a
batch (``idle``), for room in the window (``full``) or not (``-``); how many
groups the lane has in flight (chains awaiting their PubAck, a batch awaiting
its PubAcks); and the bytes waiting unread in the replication socket's receive
queue (``FIONREAD``). Every 2 ms of loop time a sample is kept: the CPU
seconds so far of this process, of the walsender (its pid from the replication
connection) and of the broker (the server process whose socket is the
destination connection's peer), the queue's and the window's bytes and counts.

Also the length of every loop turn between two selects (by bucket, and those over
10 ms with their time), every ``Window.take`` (:func:`prepare`, before the app
starts), the run-queue waits of walex and the walsender (``/proc/PID/schedstat``)
and the bytes walex's socket to the broker holds unsent (``TIOCOUTQ``). Once the
pids are known, ``stallwatch.py`` samples from another process which of the three
runs (``FILE.states``).

At the end (:meth:`Watch.dump`) the file gets the samples and the totals, and a
summary of the time in ``select`` per state is printed on stderr.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import socket
import struct
import sys
import termios
import time
from collections import defaultdict
from typing import Any

_CLK = os.sysconf("SC_CLK_TCK")


def _cpu(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` so far; 0 when unknown."""
    if pid <= 0:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK
    except (OSError, IndexError, ValueError):
        return 0.0


def _waited(pid: int) -> float:
    """Seconds ``pid``'s main thread was runnable but waited for a CPU (schedstat)."""
    try:
        with open(f"/proc/{pid}/schedstat", "rb") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def _unread(fd: int) -> int:
    if fd < 0:
        return -1
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return -1


def _unsent(fd: int) -> int:
    if fd < 0:
        return -1
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except OSError:
        return -1


def _broker_pid(fd: int) -> int:
    """The pid of the local server process holding the peer end of socket ``fd``."""
    try:
        import psutil

        peer = socket.socket(fileno=os.dup(fd)).getpeername()[1]
        mine = os.getpid()
        for conn in psutil.net_connections("tcp"):
            if conn.laddr and conn.laddr.port == peer and conn.pid and conn.pid != mine:
                return conn.pid
    except Exception:  # no rights, or gone: no broker column
        pass
    return -1


class Watch:
    def __init__(self, app: Any, path: str) -> None:
        self.app, self.path = app, path
        self.loop = asyncio.get_running_loop()
        self.pipeline = app.pipeline
        self.selects: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
        self.samples: list[tuple[Any, ...]] = []
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.slept = 0.0  # seconds in select so far
        self.left = 0.0  # when the last select returned
        # loop turns between two selects by length: (upper bound ms, turns, seconds)
        self.stretches = [[bound, 0, 0.0] for bound in (1, 5, 10, 20, 50, 1e9)]
        self.longest: list[tuple[float, float]] = []  # (seconds, at)
        self.pid = os.getpid()
        self.sampler: Any = None  # bench/stallwatch.py, once the pids are known
        self.walsender = -1
        self.broker = -1
        self.broker_fd = -1
        self.dest: Any = None
        selector = self.loop._selector  # type: ignore[attr-defined]
        self._select = selector.select
        selector.select = self.select

    def _find(self) -> None:
        repl = self.pipeline.repl
        if repl is not None and self.walsender < 0:
            self.walsender = repl.pgconn.backend_pid
        items = getattr(self.app.destinations, "items", [])
        if items and self.broker < 0:
            d = self.dest = items[0]
            sock = None
            nc = getattr(d, "nc", None)
            if nc is not None:
                writer = getattr(nc._transport, "_io_writer", None)
                sock = writer.transport.get_extra_info("socket") if writer else None
            client = getattr(d, "client", None)
            if sock is None and client is not None:  # redis: its one connection
                try:
                    sock = client.connection._writer.get_extra_info("socket")
                except Exception:
                    sock = None
            if sock is not None:
                self.broker_fd = sock.fileno()
                self.broker = _broker_pid(self.broker_fd)
        if self.walsender > 0 and self.broker_fd >= 0 and self.sampler is None:
            import subprocess

            self.sampler = subprocess.Popen([
                sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                             "stallwatch.py"),
                self.path + ".states", str(self.pid), str(self.walsender), str(self.broker)])

    def _flying(self) -> int:
        d = self.dest
        acks = getattr(d, "_acks", None)
        if acks is not None:
            return len(acks._ones) + (acks._left > 0)
        return -1

    def select(self, timeout: float | None = None) -> Any:
        p = self.pipeline
        repl, queue, window = p.repl, p.queue, p.window
        fd = repl._fd if repl is not None else -1
        reader = "sock" if fd >= 0 else "room" if queue._reader_waits else "-"
        disp = "idle" if queue._dispatcher_waits else \
            "full" if window is not None and window._waiting else "-"
        unread = _unread(repl.pgconn.socket) if repl is not None and repl.streaming else -1
        flying = self._flying()
        key = (f"reader={reader} dispatcher={disp} flying={flying} "
               f"unread={'y' if unread > 0 else 'n'}")
        start = time.perf_counter()
        if self.left:
            busy = start - self.left
            for bucket in self.stretches:
                if busy * 1000 < bucket[0]:
                    bucket[1] += 1
                    bucket[2] += busy
                    break
            if busy > 0.01:
                self.longest.append((round(busy, 4), round(start - self.t0, 4)))
        events = self._select(timeout)
        end = self.left = time.perf_counter()
        entry = self.selects[key]
        entry[0] += 1
        entry[1] += end - start
        entry[2] = max(entry[2], end - start)
        self.slept += end - start
        if end - self.last >= 0.002:
            self.last = end
            if self.walsender < 0 or (self.broker < 0 and self.broker_fd < 0):
                self._find()
            lane = window.lanes[0] if window is not None and window.lanes else None
            self.samples.append((
                round(end - self.t0, 5), time.process_time(), _cpu(self.walsender),
                _cpu(self.broker), queue.bytes, len(queue.items),
                window.held if window is not None else -1,
                len(window.entries) if window is not None else -1,
                len(lane.queued) if lane is not None else -1,
                lane.groups if lane is not None else -1,
                lane.overlapped if lane is not None else -1,
                flying, unread, _unsent(self.broker_fd), reader, disp,
                self.slept, _waited(self.pid), _waited(self.walsender),
            ))
        return events

    def dump(self) -> None:
        self.loop._selector.select = self._select  # type: ignore[attr-defined]
        states = None
        if self.sampler is not None:
            self.sampler.terminate()
            self.sampler.wait(5)
            with open(self.path + ".states") as f:
                states = json.load(f)
        total = sum(v[1] for v in self.selects.values())
        data = {"states": states, "selects": {k: v for k, v in sorted(self.selects.items())},
                "walsender": self.walsender, "broker": self.broker,
                "columns": ["t", "cpu", "walsender_cpu", "broker_cpu", "queue_bytes",
                            "queue_items", "window_held", "window_entries", "lane_queued",
                            "groups", "overlapped", "flying", "repl_unread", "broker_unsent",
                            "reader", "dispatcher", "slept", "runq_wait", "walsender_runq_wait"],
                "takes": [(round(a - self.t0, 4), round(b, 5), c, e) for a, b, c, e in TAKES],
                "stretches": self.stretches, "longest": self.longest,
                "samples": self.samples}
        with open(self.path, "w") as f:
            json.dump(data, f)
        out = sys.stderr
        print(f"loopwatch: {total:.3f}s in select over {len(self.selects)} states", file=out)
        for k, (n, s, most) in sorted(self.selects.items(), key=lambda kv: -kv[1][1]):
            if s > 0.001:
                print(f"  {s:7.3f}s {int(n):7d} selects, longest {most * 1000:6.1f}ms  {k}",
                      file=out)


TAKES: list[tuple[float, float, int, int]] = []  # Window.take calls: (at, seconds, batches, events)


def prepare() -> None:
    """Time every ``Window.take`` (before the app starts: its dispatcher binds the method)."""
    from walex.destinations.window import Window

    take = Window.take

    async def timed(self: Any, items: Any) -> Any:
        start = time.perf_counter()
        taken = await take(self, items)
        TAKES.append((start, time.perf_counter() - start, len(taken),
                      sum(len(e.outgoing) for e in taken)))
        return taken

    Window.take = timed  # type: ignore[method-assign]


def install(app: Any, path: str) -> Watch:
    return Watch(app, path)
