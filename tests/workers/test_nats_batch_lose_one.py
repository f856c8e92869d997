"""A NATS worker (``prefetch`` > 1) that loses one partition's lease gives up that partition
alone: the other partitions' calls go on, and the worker stays connected.

Worker ``a`` holds both partitions by leases (:mod:`walex.workers.natslease`) and is
inside a call for each (``concurrency=2``), both waiting on the test. The test takes
partition 1's lease over in the bucket (a put from another client, as a worker that
found the key expired would): ``a``'s next renewal is refused and it loses that lease.
Its partition 1 call is cancelled (its lease says lost, nothing acknowledged); its
partition 0 call is not touched: it returns when the test lets it and is acknowledged
once. ``a`` never reconnects; once the taken-over key expires it takes partition 1 again
and handles its event (the same id) then. On main the lost lease revoked the lane:
``a`` reconnected and cancelled partition 0's call too (redelivered, handled twice).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from support import run
from workers.test_worker import Broker, made_up, relay, worker_running

from walex import Event, Events
from walex.workers import Worker, current_lease
from walex.workers.natslease import bucket_name, stream_key

ACK_WAIT = 3  # the leases' ttl


def test_one_lost_lease_cuts_off_that_partition_alone(unique: str) -> None:
    b = Broker("nats", unique)
    calls: list[tuple[int, str, str]] = []  # partition, event id, how it ended
    inside: dict[int, asyncio.Event] = {}
    gates: dict[int, asyncio.Event] = {}
    events = Events()

    async def handle(batch: list[Event]) -> None:
        lease = current_lease()
        assert lease is not None
        p = lease.partition
        first = p not in inside
        if first:
            inside[p] = asyncio.Event()
            gates[p] = asyncio.Event()
        try:
            if first:
                inside[p].set()
                await gates[p].wait()
        except asyncio.CancelledError:
            calls.append((p, batch[0].id, "cancelled"))
            raise
        calls.append((p, batch[0].id, "returned"))

    events.on_event("item")(handle)
    source = b.source(2, ack_wait=ACK_WAIT, prefetch=8, group=f"g{unique}")
    batch = [made_up(i) for i in range(1, 9)]  # rows of both partitions

    async def until(check: Any, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, f"{what}; calls: {calls}"
            await asyncio.sleep(0.05)

    async def main() -> int:
        import nats

        a = Worker(source, [events], name="a", concurrency=2)
        async with worker_running(a):
            await until(lambda: a.consumer.leases is not None and
                        len(a.consumer.leases.held) == 2, "a holding both leases")
            await relay(b, [batch])
            await until(lambda: 0 in inside and 1 in inside and inside[0].is_set() and
                        inside[1].is_set(), "a inside a call of each partition")
            nc = await nats.connect(f"nats://127.0.0.1:{b.port}", connect_timeout=5)
            try:
                kv = await nc.jetstream(timeout=5).key_value(bucket_name(f"g{unique}"))
                await kv.put(f"{stream_key(f'WK_{unique}')}.p.1", b"intruder")
            finally:
                await nc.close()
            await until(lambda: any(c[0] == 1 and c[2] == "cancelled" for c in calls),
                        "partition 1's call cut off")
            gates[0].set()
            await until(lambda: any(c[0] == 0 and c[2] == "returned" for c in calls),
                        "partition 0's call returned")
            # partition 1 again once the taken-over key expired: its events handled
            ids = {e.id for e in batch}
            await until(lambda: {c[1] for c in calls if c[2] == "returned"} >= {
                c[1] for c in calls}, "every call's first event handled", 60)
            await until(lambda: a.events_handled >= len(ids), "every event handled", 60)
            await asyncio.sleep(ACK_WAIT + 1)  # anything cut off or not acknowledged: again
            return a.reconnects

    try:
        reconnects = run(main(), timeout=120)
    finally:
        asyncio.run(b.cleanup())
        asyncio.run(_drop_bucket(b.port, f"g{unique}"))
    zero = [c for c in calls if c[0] == 0]
    assert all(c[2] == "returned" for c in zero), f"partition 0's call was cut off: {calls}"
    assert reconnects == 0, f"a reconnected ({reconnects}) after one lease was lost: {calls}"
    cut = next(c for c in calls if c[0] == 1 and c[2] == "cancelled")
    assert any(c[1] == cut[1] and c[2] == "returned" for c in calls), calls
    # partition 0's events handled once each (nothing of it went back to the broker)
    zero_ids = [c[1] for c in zero]
    assert len(zero_ids) == len(set(zero_ids)), calls


async def _drop_bucket(port: int, group: str) -> None:
    import nats

    nc = await nats.connect(f"nats://127.0.0.1:{port}", connect_timeout=5)
    try:
        await nc.jetstream(timeout=5).delete_key_value(bucket_name(group))
    except Exception:
        pass
    finally:
        await nc.close()
