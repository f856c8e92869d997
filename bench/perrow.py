"""Client cost per row of walex's whole in-process path on W1 (one large INSERT transaction).

    .venv/bin/python bench/perrow.py                         # CPU us per row, async handler and relay
    .venv/bin/python bench/perrow.py --callgrind             # instructions per row (valgrind)
    .venv/bin/python bench/perrow.py --modes async --rows 50000 --reps 5
    .venv/bin/python bench/perrow.py --modes relay --destination nats

The W1 twin of ``pertxn.py``: the real ``Pipeline`` tasks (reader, hot path,
dispatcher, acknowledger) fed recorded frames by ``pertxn.RecordedTransport``
(no socket, no server while measuring but a destination's broker). Two modes:

* ``async``: an ``async def`` handler on every table touching every field of
  every event (``pertxn.touch``, as ``consumers/walex_consumer.py``), rows typed;
* ``relay``: no handler, every event published to ``--destination`` (default
  ``nats``, the local broker as ``run.py`` uses it): the rows kept as sent
  (walex.rawevent) and written by the direct CloudEvents encoder, as ``walex relay``.

The W1 frames (a Relation, Begin, one Insert per row, Commit) are recorded once
from a throwaway PostgreSQL 18 (``replay.record``) and kept in ``bench/results/``.
CPU time is the process's, best of ``--reps``. ``--callgrind`` runs this script
under ``valgrind --tool=callgrind`` with ``--rows`` and 3x ``--rows`` rows and
reports the difference in instructions per extra row: start-up, imports, the
recording and the per-transaction work drop out. ``--keep-out DIR`` keeps the
two callgrind files (for ``callgrind_annotate``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import marshal
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from pertxn import callgrind_total, fresh_target, recorded_app, touch  # noqa: E402

from walex import Event, Events, gcpolicy  # noqa: E402


def record_frames(rows: int) -> list[bytes]:
    """W1's frames for ``rows`` rows (one transaction), recorded once and kept."""
    path = HERE / "results" / f"w1-frames-{rows}.marshal"
    if not path.exists():
        import psycopg
        from replay import record

        from walex.embedded import Cluster, embedded_bindir

        with Cluster(embedded_bindir()) as cluster, \
                psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            frames = record(conn, "W1", rows)
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(marshal.dumps(frames))
    return marshal.loads(path.read_bytes())  # in C: little per-row cost outside walex


async def run_once(frames: list[bytes], rows: int, relay: bool, chunk: int,
                   destination: str | None) -> float:
    """CPU seconds for the W1 transaction of ``rows`` rows through reader -> dispatcher -> ack."""
    loop = asyncio.get_running_loop()
    module = Events()
    if not relay:
        async def handle(events: list[Event]) -> None:
            touch(events)
        module.on_event("all")(handle)
    app, p = await recorded_app(module, "perrow", destination, frames, chunk)
    gcpolicy.hold(app.settings.gc_threshold)  # as WalEx.start does while it streams
    if app.settings.gc_freeze:
        gc.freeze()
    t0 = time.process_time()
    tasks = [loop.create_task(p.run_reader()), loop.create_task(p.run_dispatcher()),
             loop.create_task(p.run_acknowledger())]
    while p.transactions_handled < 1:
        await asyncio.sleep(0.001)
        for task in tasks:
            if task.done():
                task.result()  # raise what stopped it
    seconds = time.process_time() - t0
    gcpolicy.release(app.settings.gc_threshold)
    gc.unfreeze()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    app.dispatcher.close()
    if destination:
        await app.destinations.close()
        assert app.destinations.events_published == rows, app.destinations.events_published
    assert p.events_handled == rows, (p.events_handled, rows)
    return seconds


def measure(frames: list[bytes], rows: int, relay: bool, reps: int, chunk: int,
            destination: str | None) -> float:
    best = float("inf")
    for rep in range(reps):
        with fresh_target(destination, f"perrow{os.getpid()}r{rep}") as url:
            best = min(best, asyncio.run(run_once(frames, rows, relay, chunk, url)))
    return best


def callgrind(args: argparse.Namespace, mode: str) -> float:
    """Instructions per row: two runs under callgrind, their difference."""
    counts = [callgrind_total(
        [__file__, "--rows", str(n), "--reps", "1", "--modes", mode, "--chunk", str(args.chunk),
         "--destination", args.destination, "--quiet"],
        Path(args.keep_out) / f"{mode}-{n}.out" if args.keep_out else None)
        for n in (args.rows, 3 * args.rows)]
    return (counts[1] - counts[0]) / (2 * args.rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000, help="rows of the W1 transaction")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--modes", default="async,relay")
    parser.add_argument("--chunk", type=int, default=1024, help="frames per read()")
    parser.add_argument("--destination", default="nats",
                        help="the relay's destination: NAME (nats, redis, ...) or NAME=URL, as run.py")
    parser.add_argument("--callgrind", action="store_true")
    parser.add_argument("--keep-out", default=None, help="with --callgrind: keep the callgrind files here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    import destinations as targets

    destination = targets.parse([args.destination])[0]  # the level walex+NAME
    if args.quiet:  # a run under callgrind
        relay = args.modes == "relay"
        measure(record_frames(args.rows), args.rows, relay, args.reps, args.chunk,
                destination if relay else None)
        return
    from walex import hotpath
    print(f"walex {'compiled' if hotpath.compiled_available() and not os.environ.get('WALEX_PURE_PYTHON') else 'pure-Python'} "
          f"hot path, Python {sys.version.split()[0]}")
    for mode in args.modes.split(","):
        relay = mode == "relay"
        if args.callgrind:
            for n in (args.rows, 3 * args.rows):
                record_frames(n)  # outside valgrind
            print(f"{mode}: {callgrind(args, mode):,.0f} instructions per row "
                  f"(callgrind, {args.rows} vs {3 * args.rows} rows"
                  f"{', to ' + args.destination if relay else ''})", flush=True)
            continue
        seconds = measure(record_frames(args.rows), args.rows, relay, args.reps, args.chunk,
                          destination if relay else None)
        print(f"{mode}: {seconds / args.rows * 1e6:.2f} us CPU per row (best of {args.reps}, "
              f"{args.rows:,} rows{', to ' + args.destination if relay else ''})", flush=True)


if __name__ == "__main__":
    main()
