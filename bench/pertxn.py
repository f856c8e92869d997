"""Client cost per transaction of walex's whole in-process path on W2 (single-row transactions).

    .venv/bin/python bench/pertxn.py                       # CPU us per transaction, async and plain
    .venv/bin/python bench/pertxn.py --callgrind           # instructions per transaction (valgrind)
    .venv/bin/python bench/pertxn.py --txns 50000 --reps 5 --handlers async
    .venv/bin/python bench/pertxn.py --max-batch 5000      # handlers batching across transactions
    .venv/bin/python bench/pertxn.py --destination nats    # relaying too (a local broker, as run.py)
    .venv/bin/python bench/pertxn.py --destination nats --handlers none   # a relay alone
    .venv/bin/python bench/pertxn.py --destination nats --handlers marker # a relay, a handler elsewhere

Unlike ``replay.py`` (frames -> Events only), this drives the real
``Pipeline`` tasks: the reader (``_read_session``: frame loop, compiled hot
path, queue, byte budget), the dispatcher (``run_dispatcher``,
``Dispatcher.dispatch``, the plain handlers' thread) and the acknowledger,
with a handler touching every field of every event, as
``consumers/walex_consumer.py`` does, once ``async def`` and once a plain
function. The W2 frames (``INSERT`` of one row per transaction into the
benchmark's ``bench_rows``) are recorded once from a throwaway PostgreSQL 18
(``replay.record``) and kept in ``bench/results/``; the only stand-in is the
replication *transport*: ``read()`` hands out the recorded frames 1024 at a
time (what ``ReplicationConnection.read`` returns when the consumer is
behind), yielding to the event loop between reads. No socket, no server while
measuring, so it is repeatable on a busy machine: CPU time (process-wide, the
handler thread included) is the best of ``--reps``.

``--callgrind`` runs this script under ``valgrind --tool=callgrind`` twice,
with ``--txns`` and 3x ``--txns`` transactions, and reports the difference in
instructions divided by the extra transactions: start-up, imports and the
recording drop out.

``--destination NAME`` (``nats``, ``redis``, ``rabbitmq``, ``webhook``, ``kafka``
or a URL, as ``run.py --destination``) makes the app publish every event
there too: a transaction counts once the broker confirmed it, the CPU is the
process's (the broker's client included, the broker not), and the line also
says how many transactions went out per publish (``Lane.groups``).

``--handlers`` names the handlers measured, one run each: ``async`` and ``plain``
(one handler on every table, as above), ``none`` (no handler: a relay alone, as
``walex relay`` runs one) or ``marker`` (one async handler on a table the
workload never changes, ``bench_marker``: the benchmark's relay, ``run.py``'s
``walex+NAME`` levels, whose handler waits for the marker row; no call is
made).

``--gc-threshold N`` sets the cyclic GC's generation-0 threshold while measuring
as an app does while it streams (``gc_threshold``, 100,000 by default,
:mod:`walex.gcpolicy`); left out, Python's own 700 stays, as in the figures of
``PROFILE.md`` before 2026-12-07. With a relay, whose window holds batches until
the broker confirmed them, the young collections then cost ~4k instructions per
one-row transaction that the app does not pay.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from walex import Event, Events, WalEx, gcpolicy  # noqa: E402

_LEN = struct.Struct("!I")


def frames_file(txns: int) -> Path:
    return HERE / "results" / f"w2-frames-{txns}.bin"


def record_frames(txns: int) -> list[bytes]:
    """W2's frames (one Relation, then Begin/Insert/Commit per transaction), recorded once."""
    path = frames_file(txns)
    if not path.exists():
        import psycopg
        from replay import record

        from walex.embedded import Cluster, embedded_bindir

        with Cluster(embedded_bindir()) as cluster, \
                psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            frames = record(conn, "W2", txns)
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"".join(_LEN.pack(len(f)) + f for f in frames))
    data = path.read_bytes()
    frames, pos = [], 0
    while pos < len(data):
        (n,) = _LEN.unpack_from(data, pos)
        frames.append(data[pos + 4:pos + 4 + n])
        pos += 4 + n
    return frames


class RecordedTransport:
    """Stands in for ``ReplicationConnection``: recorded frames in, status updates dropped."""

    def __init__(self, frames: list[bytes], chunk: int = 1024) -> None:
        self.frames = frames
        self.chunk = chunk
        self.pos = 0
        self.streaming = True
        self.status_sent = 0

    async def read(self) -> list[bytes]:
        await asyncio.sleep(0)  # the socket wait of a read that finds data buffered
        if self.pos >= len(self.frames):
            await asyncio.get_running_loop().create_future()  # the end: wait for ever
        chunk = self.frames[self.pos:self.pos + self.chunk]
        self.pos += len(chunk)
        return chunk

    async def send_status(self, write: int, flush: int, apply: int, reply: bool = False) -> None:
        self.status_sent += 1

    async def close(self) -> None:
        self.streaming = False


def touch(events: list[Event]) -> int:
    """Every field of every event, as consumers/walex_consumer.py's handler."""
    values = 0
    for e in events:
        _ = (e.name, e.type, e.source.schema, e.source.table, e.source.columns, e.lsn, e.id)
        _ = e.timestamp
        rec = e.new_record
        if rec is not None:
            for v in rec.values():
                values += v is not None
        rec = e.old_record
        if rec is not None:
            for v in rec.values():
                values += v is not None
        ch = e.changes
        if ch:
            for c in ch.values():
                _ = (c.old_value, c.new_value)
    return values


def _plain(handler: str) -> bool | str | None:
    """run_once's ``plain`` for a ``--handlers`` name."""
    return {"none": None, "marker": "marker"}.get(handler, handler == "plain")


async def recorded_app(module: Events, name: str, destination: str | None,
                       frames: list[bytes], chunk: int) -> tuple[WalEx, Any]:
    """An app of ``module`` (publishing to ``destination`` too) whose pipeline reads the
    recorded ``frames``, ``chunk`` at a time, its destinations open: for ``run_once`` here
    and in ``perrow.py``."""
    app = WalEx(url="postgresql://bench@localhost/bench", publication="replay_pub",
                subscriptions=["*"], modules=[module], name=name, durable_slot=True,
                destinations=[destination] if destination else [])
    p = app.pipeline
    if destination:
        await app.destinations.open()
    p.repl = RecordedTransport(frames, chunk)  # type: ignore[assignment]
    # no backfill task runs here: the stream must not wait for it to say what to replay
    # (an app's task says "nothing" at once when there is no progress store)
    p.backfill._install(None)
    p.relations.db = "bench"
    gc.collect()
    return app, p


async def run_once(frames: list[bytes], txns: int, plain: bool | str | None, chunk: int,
                   max_batch: int | None = None, destination: str | None = None,
                   gc_threshold: int = 0) -> tuple[float, int, int]:
    """CPU seconds for ``txns`` transactions through reader -> dispatcher -> handler -> ack."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    seen = [0]

    def handle(events: list[Event]) -> None:
        touch(events)
        seen[0] += len(events)
        if seen[0] >= txns:
            loop.call_soon_threadsafe(done.set)

    module = Events()
    if plain is None:  # --handlers none: a relay, as walex relay runs one (raw rows)
        pass
    elif plain == "marker":  # a relay whose one handler takes a table the workload never
        async def on_marker(events: list[Event]) -> None:  # changes (run.py's walex+NAME)
            raise AssertionError(f"the marker handler got {events!r}")
        module.on_event("bench_marker")(on_marker)
    elif plain:
        module.on_event("all", max_batch=max_batch)(handle)
    else:
        async def handle_async(events: list[Event]) -> None:
            handle(events)
        module.on_event("all", max_batch=max_batch)(handle_async)
    app, p = await recorded_app(module, "pertxn", destination, frames, chunk)
    if gc_threshold:  # as WalEx.start does while streaming (walex.gcpolicy)
        gcpolicy.hold(gc_threshold)
    t0 = time.process_time()
    tasks = [loop.create_task(p.run_reader()), loop.create_task(p.run_dispatcher()),
             loop.create_task(p.run_acknowledger())]
    async def handled() -> None:  # no handler to tell: the transactions handled
        while p.transactions_handled < txns:
            await asyncio.sleep(0.001)

    calls = plain is not None and plain != "marker"  # a handler called for every event
    waiting = loop.create_task(done.wait() if calls else handled())
    await asyncio.wait([waiting, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        if task.done():
            task.result()  # raise what stopped it
    while p.transactions_handled < txns:  # with a destination: its last confirmations
        await asyncio.sleep(0.001 if destination else 0)
    seconds = time.process_time() - t0
    gcpolicy.release(gc_threshold)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    app.dispatcher.close()
    groups = 0
    if destination:
        window = getattr(p, "window", None)
        groups = sum(lane.groups for lane in window.lanes) if window is not None else txns
        await app.destinations.close()
        assert app.destinations.events_published == txns, app.destinations.events_published
    assert p.transactions_handled == txns and p.events_handled == txns, (
        p.transactions_handled, p.events_handled, txns)
    assert p.ack.flushed > 0
    return seconds, txns, groups


@contextmanager
def fresh_target(destination: str | None, run: str) -> Iterator[str | None]:
    """The URL of a fresh stream, queue or key named ``run`` at ``destination`` (``NAME`` or
    ``NAME=URL``, as run.py takes it), removed afterwards; None without a destination."""
    if not destination:
        yield None
        return
    import destinations as targets

    targets.prepare(destination, run)
    try:
        yield targets.url_for(destination, run)
    finally:
        targets.cleanup(destination, run)


def callgrind_total(argv: list[str], keep: Path | None = None) -> int:
    """Instructions of ``python argv`` under callgrind (the out file copied to ``keep``)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, *argv],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONHASHSEED": "0"},  # the same dict layouts every run
        )
        if keep is not None:
            keep.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(out, keep)
        for line in out.read_text().splitlines():
            if line.startswith("summary:") or line.startswith("totals:"):
                return int(line.split()[1])
    raise RuntimeError(f"callgrind reported no total for {argv}")


def measure(frames: list[bytes], txns: int, plain: bool | str | None, reps: int, chunk: int,
            max_batch: int | None = None, destination: str | None = None,
            gc_threshold: int = 0) -> tuple[float, int]:
    """Best CPU seconds of ``reps`` runs, and the publishes (groups) of the last run."""
    best, groups = float("inf"), 0
    for rep in range(reps):
        with fresh_target(destination, f"pertxn{os.getpid()}r{rep}") as url:
            seconds, _n, groups = asyncio.run(
                run_once(frames, txns, plain, chunk, max_batch, url, gc_threshold))
        best = min(best, seconds)
    return best, groups


def callgrind(args: argparse.Namespace, handler: str) -> float:
    """Instructions per transaction: two runs under callgrind, their difference."""
    counts = [callgrind_total(
        [__file__, "--txns", str(n), "--reps", "1", "--frames", str(args.frames),
         "--handlers", handler, "--chunk", str(args.chunk), "--quiet",
         *(["--max-batch", str(args.max_batch)] if args.max_batch else []),
         *(["--destination", args.destination] if args.destination else []),
         "--gc-threshold", str(args.gc_threshold)]) for n in (args.txns, 3 * args.txns)]
    return (counts[1] - counts[0]) / (2 * args.txns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--txns", type=int, default=20_000, help="transactions per run")
    parser.add_argument("--frames", type=int, default=60_000,
                        help="transactions recorded (runs take the first --txns)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--handlers", default="async,plain",
                        help="comma-separated: async, plain, none (a relay alone), marker "
                             "(a relay with a handler on another table)")
    parser.add_argument("--chunk", type=int, default=1024, help="frames per read()")
    parser.add_argument("--max-batch", type=int, default=None,
                        help="register the handlers with max_batch=N (batching across transactions)")
    parser.add_argument("--destination", default=None,
                        help="publish to NAME (nats, redis, ...) or NAME=URL too, as run.py --destination")
    parser.add_argument("--gc-threshold", type=int, default=0,
                        help="generation 0's GC threshold while measuring, as an app sets it "
                             "while streaming (its gc_threshold, 100000 by default); 0 (the "
                             "default here): Python's own (700)")
    parser.add_argument("--callgrind", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    all_frames = record_frames(max(args.frames, args.txns))
    destination = None
    if args.destination:
        import destinations as targets

        destination = targets.parse([args.destination])[0]  # the level walex+NAME
    if args.quiet:  # a run under callgrind
        plain = _plain(args.handlers)
        frames = all_frames[:1 + 3 * args.txns]  # the Relation, then B/I/C per transaction
        measure(frames, args.txns, plain, args.reps, args.chunk, args.max_batch, destination,
                args.gc_threshold)
        return
    from walex import hotpath
    print(f"walex {'compiled' if hotpath.compiled_available() and not os.environ.get('WALEX_PURE_PYTHON') else 'pure-Python'} "
          f"hot path, Python {sys.version.split()[0]}")
    for handler in args.handlers.split(","):
        if args.callgrind:
            print(f"{handler} handler: {callgrind(args, handler):,.0f} instructions per transaction "
                  f"(callgrind, {args.txns} vs {3 * args.txns} transactions)", flush=True)
            continue
        frames = all_frames[:1 + 3 * args.txns]
        seconds, groups = measure(frames, args.txns, _plain(handler),
                                  args.reps, args.chunk,
                                  args.max_batch, destination, args.gc_threshold)
        relay = (f", {destination}: {groups:,} publishes, {args.txns / max(groups, 1):.1f} "
                 "transactions each" if destination else "")
        print(f"{handler} handler: {seconds / args.txns * 1e6:.2f} us CPU per transaction "
              f"(best of {args.reps}, {args.txns:,} transactions{relay})", flush=True)


if __name__ == "__main__":
    main()
