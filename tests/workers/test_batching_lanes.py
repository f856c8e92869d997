"""A ``max_batch`` handler on a worker with ``concurrency`` > 1: a lane acknowledges its
messages only after every handler call that had their events returned.

The dispatcher keeps a ``max_batch`` handler's events that do not fill a call until
the end of the dispatch (its ``flush``). With two partitions' calls at once, partition
0's transaction of three events (``max_batch=2``) is called as ``[e1, e2]``, ``e3``
kept meanwhile; partition 1's change ``f1`` arrives then, and its dispatch made the
call ``[e3, f1]`` of the kept ``e3``. On main partition 0's call found nothing left to
flush once ``[e1, e2]`` returned and acknowledged ``e3`` while ``[e3, f1]`` still ran;
that call then failed (``on_error="stop"``), and ``e3`` was never delivered again: lost.
Now a worker with a ``max_batch`` handler makes its calls one at a time: each change is
handled by a call that returned, or delivered again to the next worker.
"""

from __future__ import annotations

import asyncio
import datetime as dt

from support import run, until
from workers.test_worker import Broker, Calls

from walex import Event, Events, EventType, Source
from walex.destinations import Destinations
from walex.destinations.values import partition_of
from walex.errors import HandlerError
from walex.workers import Worker, declare

_SOURCE = Source(db="d", schema="public", table="item", columns={"id": "int4", "seq": "int4"},
                 primary_key=("id",))


def _row(pk: int, commit: int, position: int) -> Event:
    return Event("item", EventType.INSERT, _SOURCE, {"id": pk, "seq": 0}, None, None,
                 dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc), "0/10",
                 f"{commit:016X}-{position:08X}")


def test_a_kept_event_is_acknowledged_only_after_the_call_that_had_it(unique: str) -> None:
    broker = Broker("rabbitmq", unique)
    source = broker.source(2)
    zero = [pk for pk in range(1, 50) if partition_of(f"public.item/{pk}", 2) == 0][:3]
    one = next(pk for pk in range(1, 50) if partition_of(f"public.item/{pk}", 2) == 1)
    txn = [_row(pk, 0x100, n) for n, pk in enumerate(zero)]  # partition 0: e1 e2 e3
    f1 = _row(one, 0x200, 0)  # partition 1
    calls: list[list[str]] = []
    returned: set[str] = set()  # the events of A's calls that returned

    async def main() -> None:
        await declare(source)
        handlers = Events()
        mixed_started = asyncio.Event()

        @handlers.on_event("item", max_batch=2)
        async def handle(batch: list[Event]) -> None:
            ids = [e.id for e in batch]
            calls.append(ids)
            if txn[0].id in ids:  # [e1, e2]: returns once partition 1's call is under way
                try:  # (or after a while: with the calls one at a time, it never is)
                    await asyncio.wait_for(mixed_started.wait(), 3)
                except TimeoutError:
                    pass
            elif f1.id in ids:
                mixed_started.set()
                await asyncio.sleep(1.0)  # partition 0's call returns meanwhile
                raise RuntimeError("the call with f1 fails")
            returned.update(ids)

        a = Worker(source, [handlers], name="A", concurrency=2, max_retries=0)
        destinations = Destinations([broker.url], 2)
        await destinations.open()
        try:
            await a.start()
            await destinations.publish(txn)
            await until(lambda: bool(calls), "A's first call", 30)
            await destinations.publish([f1])
        finally:
            await destinations.close()
        try:
            await asyncio.wait_for(a.wait(), 30)
        except HandlerError:
            pass
        finally:
            await a.stop()
        b = Calls()
        b.events.on_event("item")(b.handler("item"))
        good = Worker(source, [b.events], name="B")
        await good.start()
        try:
            # every change: handled by a call of A that returned, else delivered again to B
            await until(lambda: returned | {e.id for e in b.flat("item")} >=
                        {e.id for e in [*txn, f1]},
                        f"each change handled by A or delivered again; A's calls {calls}", 30)
        finally:
            await good.stop()

    try:
        run(main(), timeout=120)
    finally:
        asyncio.run(broker.cleanup())
