"""``/healthz`` of NATS workers (``prefetch`` > 1) while their nats-server is frozen.

Two workers share one partition by leases (:mod:`walex.workers.natslease`): ``a`` holds
it, ``b`` holds nothing (its share is 0). The test's own nats-server is frozen
(SIGSTOP): the connections stay open, nothing answers. ``a``'s lease is not renewed in
time, its lane is revoked and it reconnects (``reconnecting``); ``b`` lost nothing and
its connection looks alive (nats-py's pings notice a silent server only after minutes),
but its lease rounds fail: once they have failed for longer than the leases last it
answers 503 ``stalled`` with the reason, not 200 ``consuming``. Thawed (SIGCONT), both
answer 200 again and the events published then are handled.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from pathlib import Path

import pytest
from destinations.servers import OwnNats
from support import run
from workers.test_worker import made_up

from walex import Events
from walex.destinations import Destinations
from walex.observe.workers import worker_health
from walex.workers import Worker

ACK_WAIT = 2  # the leases' ttl


async def _until(check, what: str, timeout: float) -> float:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, f"no {what} within {timeout:g}s"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


def test_healthz_says_stalled_while_the_lease_rounds_fail_on_a_frozen_server(
        tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch) -> None:
    server = OwnNats(tmp_path)
    url = (f"nats://127.0.0.1:{server.port}?stream=LF_{unique}"
           f"&subject=lf{unique}.{{schema}}.{{table}}.{{partition}}")
    source = f"{url}&partitions=1&group=g{unique}&ack_wait={ACK_WAIT}&prefetch=4"
    handled: dict[str, list[int]] = {"a": [], "b": []}
    host = {"name": "a"}  # lease ids begin with the host name: "a-..." ranks first
    monkeypatch.setattr(socket, "gethostname", lambda: host["name"])

    def handler(name: str) -> Events:
        events = Events()
        events.on_event("item")(
            lambda batch: handled[name].extend(e.new_record["id"] for e in batch))
        return events

    async def publish(first: int, last: int) -> None:
        destinations = Destinations([url], 1)
        await destinations.open()
        try:
            await destinations.publish([made_up(i) for i in range(first, last)])
        finally:
            await destinations.close()

    async def main() -> None:
        await Worker(source, [handler("a")]).consumer.declare()
        a = Worker(source, [handler("a")])
        await a.start()
        host["name"] = "b"
        b = Worker(source, [handler("b")])
        await b.start()
        assert server.proc is not None
        try:
            await publish(0, 10)
            await _until(lambda: len(handled["a"]) + len(handled["b"]) == 10, "handling", 20)
            await _until(lambda: worker_health(a)[0] == 200 and worker_health(b)[0] == 200,
                         "both healthy", 10)
            server.proc.send_signal(signal.SIGSTOP)
            try:
                took = await _until(lambda: worker_health(b)[0] == 503, "503 from b", 15)
                assert took > ACK_WAIT * 0.9, f"503 after {took:.1f}s, within the leases' ttl"
                code, body = worker_health(b)
                assert body["status"] == "stalled", body  # connected, kept from consuming
                assert f"lease rounds in bucket 'walex_leases_g{unique}'" in body["reason"], body
                await _until(lambda: worker_health(a)[0] == 503, "503 from a", 15)
            finally:
                server.proc.send_signal(signal.SIGCONT)
            await _until(lambda: worker_health(a)[0] == 200 and worker_health(b)[0] == 200,
                         "both healthy after the thaw", 30)
            await publish(10, 20)
            await _until(lambda: len(set(handled["a"]) | set(handled["b"])) == 20,
                         "handling after the thaw", 30)
        finally:
            await asyncio.wait_for(b.stop(), 30)
            await asyncio.wait_for(a.stop(), 30)

    with server:
        run(main(), timeout=120)
