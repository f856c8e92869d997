"""Level ``walex``: a WalEx app end to end, as a user would write it.

A durable slot (created by the runner before the workload) and one
``on_event("all")`` handler that touches every field of every event: name,
type, source, every value of new_record and old_record, every Change,
timestamp, lsn, id. The handler is ``async def`` (runs on the event loop);
``--sync-handler`` makes it a plain function, which walex runs in a thread.
The app runs on asyncio's own event loop; ``--uvloop`` (level
``walex_uvloop``) runs it on uvloop instead (``walex[fast]``), the loop
``WalEx.run()`` takes when uvloop is installed. ``--max-batch`` (level
``walex_batch``) registers the async handler with ``max_batch=5000``: the
events of the transactions queued while it runs come in one call.

With ``--destination URL`` (levels ``walex+NAME``, bench/destinations.py)
every event is published there, and the app is a relay as ``walex relay``
runs one: the handler takes the marker table only, so the workload's rows go
to the destination without being typed for a handler (walex.rawevent: their
JSON is written from the text PostgreSQL sent). ``BENCH_RELAY_TOUCH=1`` in the
environment puts the handler on every table again (a relay beside a handler
that reads every value: how these levels ran before 2026-12-07). The run ends
only when the marker's transaction is acknowledged, which walex does once
every destination confirmed it and everything before it.

It stops when the handler got the marker row (committed right after endpos):
a handler sees batches of events, not commits, and ``Event.id`` carries the
commit LSN, so the marker is the reliable end.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
import time

from _common import Result, parse_args

from walex import Event, Events, WalEx
from walex.lifecycle import run_loop


async def trace_peak(data: dict) -> None:
    """``BENCH_TRACEMALLOC=1``: trace Python's allocations once streaming began; keep the
    largest sites (file:line) of the largest snapshot, taken whenever the traced memory grew
    by a tenth. Slows walex several-fold: for finding what holds memory, not for timing."""
    import tracemalloc

    tracemalloc.start(1)
    best = 0
    try:
        while True:
            await asyncio.sleep(0.2)
            current, peak = tracemalloc.get_traced_memory()
            data["traced_peak_mb"] = peak / 1e6
            if current > best * 1.1:
                best = current
                stats = tracemalloc.take_snapshot().statistics("lineno")
                data["traced_mb"] = current / 1e6
                data["traced_top"] = [f"{s.size / 1e6:7.2f} MB {s.count:8} "
                                      f"{s.traceback[0].filename.split('/')[-1]}:{s.traceback[0].lineno}"
                                      for s in stats[:15]]
    finally:
        tracemalloc.stop()


def main() -> int:
    # what-if knob for experiments, not a user setting: BENCH_GC=off disables the cyclic GC,
    # BENCH_GC=stats records time per generation (combinable: BENCH_GC=freeze,stats), BENCH_GC=freeze moves everything alive once streaming began (imports, settings,
    # connections) into the permanent generation, so full collections skip it
    gc_mode = os.environ.get("BENCH_GC", "").split(",")  # e.g. "freeze,stats"
    if "off" in gc_mode:
        gc.disable()
    gc_time = [0.0, 0.0, 0.0]
    gc_count = [0, 0, 0]
    if "stats" in gc_mode:  # time spent in each generation's collections
        started = [0.0]

        def on_gc(phase: str, info: dict) -> None:
            if phase == "start":
                started[0] = time.perf_counter()
            else:
                gc_time[info["generation"]] += time.perf_counter() - started[0]
                gc_count[info["generation"]] += 1
        gc.callbacks.append(on_gc)
    args = parse_args(__doc__.splitlines()[0], ("--sync-handler", "--uvloop", "--max-batch"))
    marker = args.marker_table
    sync = args.sync_handler
    res = Result("walex" + ("_sync" if sync else "") + ("_uvloop" if args.uvloop else "")
                 + ("_batch" if args.max_batch else ""), args)
    done = asyncio.Event()
    lags = res.lags
    lag = args.lag
    counters = {"rows": 0, "values": 0, "calls": 0}
    marker_lsn: list[str] = []  # the marker's commit LSN, once seen

    def handle(events: list[Event]) -> None:
        counters["calls"] += 1
        rows = values = 0
        now = time.time() if lag else 0.0
        for e in events:
            if e.name == marker:
                res.data["marker_seen"] = True
                marker_lsn.append(e.lsn)
                continue
            rows += 1
            _ = (e.type, e.source.schema, e.source.table, e.source.columns, e.lsn, e.id)
            ts = e.timestamp
            if lag:
                lags.append(now - ts.timestamp())
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
        if rows:
            res.first_row()
        counters["rows"] += rows
        counters["values"] += values
        if res.data["marker_seen"]:
            if not args.destination:  # else: once the broker confirmed it (run())
                res.end()
            loop.call_soon_threadsafe(done.set)  # type: ignore[union-attr]

    events_mod = Events()
    # a relay: the handler takes the marker only, unless asked to read every value
    taken = marker if args.destination and not os.environ.get("BENCH_RELAY_TOUCH") else "all"
    if sync:
        events_mod.on_event(taken)(handle)
    else:
        async def handle_async(events: list[Event]) -> None:
            handle(events)
        events_mod.on_event(taken, **({"max_batch": 5000} if args.max_batch else {}))(handle_async)

    loop: asyncio.AbstractEventLoop | None = None

    async def run() -> None:
        nonlocal loop
        loop = asyncio.get_running_loop()
        app = WalEx(
            url=args.dsn, publication=args.publication, subscriptions=["*"],
            modules=[events_mod], name="bench", durable_slot=True, slot_name=args.slot,
            destinations=args.destination,
        )
        loopwatch = None
        if os.environ.get("BENCH_LOOPWATCH") and args.destination:  # where the loop waits
            sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
            import loopwatch  # bench/loopwatch.py

            loopwatch.prepare()
        await app.start()
        watch = None
        if loopwatch is not None:
            watch = loopwatch.install(app, os.environ["BENCH_LOOPWATCH"])
        tracer = None
        if os.environ.get("BENCH_TRACEMALLOC"):  # what-if knob: where the memory is, at its peak
            tracer = asyncio.create_task(trace_peak(res.data))
        if "freeze" in gc_mode:
            gc.freeze()
        res.ready()
        waiter = asyncio.create_task(app.wait())
        finished = asyncio.create_task(done.wait())
        await asyncio.wait([waiter, finished], return_when=asyncio.FIRST_COMPLETED)
        if waiter.done():
            finished.cancel()
            waiter.result()  # raises the error that stopped the app
            raise RuntimeError("walex stopped before the end LSN")
        if args.destination:  # the marker acknowledged: every destination confirmed it
            from walex.lsn import parse_lsn

            end = parse_lsn(marker_lsn[0])
            while app.ack.flushed <= end and not waiter.done():
                await asyncio.sleep(0.001)
            res.end()
        if watch is not None:
            watch.dump()
        waiter.cancel()
        if tracer is not None:
            tracer.cancel()
        t_stop = time.time()
        await app.stop()
        res.data["stop_s"] = time.time() - t_stop
        res.data["transactions_handled"] = app.transactions_handled
        res.data["events_published"] = app.destinations.events_published
        if taken == marker:  # a relay: the rows are those published, less the marker
            counters["rows"] = app.destinations.events_published - len(marker_lsn)

    logging.basicConfig(level=logging.WARNING)
    run_loop(run, "uvloop" if args.uvloop else "asyncio")
    res.data.update(counters)
    if "stats" in gc_mode:
        res.data["gc_s"] = gc_time
        res.data["gc_collections"] = gc_count
    res.data["rows"] = counters["rows"]
    res.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
