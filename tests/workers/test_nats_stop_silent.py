"""A worker with ``prefetch`` > 1 stopped while nats-server has gone silent (frozen).

Stopping, the worker gives its leases back (a KV delete per partition) and its member
key; a silent server answers none, so each waits for the requests' timeout (5 s). They
went one after the other (one lock for every key), so a stopping worker took that long
per partition, up to its leases' validity (``ack_wait * 3/4``): about 28 s here with 8
partitions and the default ack_wait of 30 s, past a typical stop grace period (with
ack_wait=120, about 95 s). Now they go at once: a stop takes a few timeouts, whatever
the number of partitions.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from destinations.servers import OwnNats
from support import run, until
from workers.test_worker import Calls, made_up

from walex.destinations import Destinations
from walex.workers import Worker


def test_a_worker_stops_in_time_while_the_server_is_silent(tmp_path: Path) -> None:
    server = OwnNats(tmp_path).start()
    url = f"nats://127.0.0.1:{server.port}?stream=NS&subject=ns.{{schema}}.{{table}}.{{partition}}"
    calls = Calls()
    calls.events.on_event("item")(calls.handler("item"))

    async def main() -> float:
        worker = Worker(url + "&partitions=8&prefetch=4", [calls.events])
        await worker.consumer.declare()
        await worker.start()
        destinations = Destinations([url], 8)
        await destinations.open()
        await destinations.publish([made_up(i) for i in range(1, 30)])
        await destinations.close()
        await until(lambda: len(calls.flat("item")) == 29, "every event handled", 20)
        await until(lambda: len(worker.consumer.leases.held) == 8,  # type: ignore[attr-defined]
                    "the 8 leases", 10)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)  # silent: the connection stays open
        started = time.monotonic()
        await asyncio.wait_for(worker.stop(), 60)
        return time.monotonic() - started

    try:
        took = run(main(), timeout=100)
    finally:
        if server.proc is not None:
            server.proc.send_signal(signal.SIGCONT)
        server.stop()
    assert took < 20, f"stopping took {took:.1f}s"
