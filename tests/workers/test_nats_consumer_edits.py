"""A partition's consumer deleted or edited by hand while the group's workers run.

A deleted consumer answers no pull request (the lane idled for ever, silently); a
``max_ack_pending`` raised lets a partition's messages out to several workers at once (the
order is lost); an ``ack_wait`` shortened lets the server hand a held message to another
worker long before the worker's lease ends. The worker looks at each lane's consumer every
``recheck_every`` seconds, busy or idle: a ConfigError naming the fix for the first two, a
reconnection that takes the new ``ack_wait`` for the third.
"""

from __future__ import annotations

import asyncio

import nats
import pytest
from support import run, until
from workers.test_worker import Broker, Calls, made_up, relay, worker_running

from walex.errors import ConfigError
from walex.workers import Worker


async def _edit(b: Broker, what: str) -> None:
    nc = await nats.connect(f"nats://127.0.0.1:{b.port}")
    try:
        js = nc.jetstream()
        if what == "deleted":
            await js.delete_consumer(f"WK_{b.unique}", f"g{b.unique}_0")
            return
        info = await js.consumer_info(f"WK_{b.unique}", f"g{b.unique}_0")
        change = {"max_ack_pending": 50} if what == "max_ack_pending" else {"ack_wait": 1.5}
        await js.add_consumer(f"WK_{b.unique}", info.config.evolve(**change))
    finally:
        await nc.close()


@pytest.mark.parametrize("prefetch", [1, 4])
@pytest.mark.parametrize("what", ["deleted", "max_ack_pending", "ack_wait"])
def test_a_consumer_deleted_or_edited_mid_run_is_noticed(unique: str, what: str,
                                                          prefetch: int) -> None:
    b = Broker("nats", unique)
    calls = Calls()
    calls.events.on_event("item")(calls.handler("item"))

    async def main() -> None:
        worker = Worker(b.source(partitions=1, prefetch=prefetch, ack_wait=3, group=f"g{unique}"),
                        [calls.events])
        worker.consumer.recheck_every = 0.5  # type: ignore[attr-defined]
        async with worker_running(worker):
            await relay(b, [[made_up(1)]], partitions=1)
            await until(lambda: len(calls.flat("item")) == 1, "the first event", 20)
            await _edit(b, what)
            if what == "ack_wait":  # reconnected, the lane keeps the consumer's new ack_wait
                await until(lambda: worker.reconnects >= 1 and worker.consumer.lanes and  # type: ignore[attr-defined]
                            worker.consumer.lanes[0].ack_wait == 1.5, "the new ack_wait", 20)  # type: ignore[attr-defined]
                await relay(b, [[made_up(2)]], partitions=1)
                await until(lambda: len(calls.flat("item")) == 2, "the second event", 20)
                return
            expected = (r"consumer 'g\w+_0' of stream 'WK_\w+' was deleted while the worker ran"
                        r".*--declare" if what == "deleted" else
                        r"consumer 'g\w+_0' .* max_ack_pending=50, and this worker has prefetch=")
            with pytest.raises(ConfigError, match=expected):
                await asyncio.wait_for(worker.wait(), 20)

    async def cleanup() -> None:
        await b.cleanup()
        nc = await nats.connect(f"nats://127.0.0.1:{b.port}")
        try:
            await nc.jetstream().delete_key_value(f"walex_leases_g{unique}")
        except Exception:  # prefetch=1 made none
            pass
        finally:
            await nc.close()

    try:
        run(main(), timeout=60)
    finally:
        asyncio.run(cleanup())
