"""NATS workers with ``prefetch`` > 1 under network faults: a paused path, a cut, a broker restart.

The workers, their SQLite log of calls and handled events, the publisher and the
checks are those of :mod:`workers.test_nats_batches` (every change handled, per row
in order, a duplicate the same event, no two completed calls of one partition
overlapping across workers); here the network misbehaves:

- **paused**: worker ``a`` talks to nats-server through a proxy, ``b`` directly. While
  ``a`` is in a call, the proxy holds every byte both ways (nothing dropped) for
  longer than the lease: ``b`` takes the partitions and handles the call's events,
  ``a``'s call is cancelled, never completed; on resume the held bytes (``a``'s late
  acknowledgements among them) reach the server, and ``a`` comes back and handles
  again. (Resumed while ``b`` still counts a partition's pending messages, the late
  acknowledgements can reorder a row: the limit natsbatch's docstring states, seen
  once in 22 runs that resumed then; not a case tested here.)
- **cut**: the proxy resets ``a``'s connections at a point of its byte stream
  (``partition_after``) while it handles: ``a`` reconnects and handles again;
- **restarted**: two workers on a nats-server of the test's own, killed (SIGKILL) and
  started again on the same port and store while they handle: both reconnect, take
  leases again, and handle everything.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from pathlib import Path

import pytest
import workers.test_nats_batches as nb
from chaos.proxy import Proxy
from destinations.servers import OwnNats

from walex.destinations import Destinations

EVENTS = 8000  # ~16 s of publishing: the faults happen while it goes on


def start(group: nb.Group, name: str, source: str, env: dict[str, str]) -> None:
    """Start one worker of ``group`` on its own source URL (through a proxy or not)."""
    names, default = group.names, group.source
    group.names, group.source = [name], source
    try:
        group.start({name: env})
    finally:
        group.names, group.source = names, default


def via(group: nb.Group, port: int) -> str:
    """The group's source URL on another port (a proxy's, a server's of the test's own)."""
    return group.source.replace(f"127.0.0.1:{group.port}?", f"127.0.0.1:{port}?", 1)


def calls_of(group: nb.Group, worker: str, after: float) -> list[tuple]:
    return [r for r in group.rows("calls") if r[1] == worker and r[3] is not None and r[3] > after]


def handled_by(group: nb.Group, worker: str) -> bool:
    return any(r[4] == worker for r in group.rows("handled"))


def publish_through_outages(group: nb.Group) -> threading.Thread:
    """Publish as :meth:`~workers.test_nats_batches.Group.publish` does, but a batch that
    fails (the server is down) is published again on a new connection, until it is stored."""
    async def main() -> None:
        deadline = time.monotonic() + 90
        destinations = None
        at = 0
        while at < nb.EVENTS:
            try:
                if destinations is None:
                    destinations = Destinations([group.url], nb.PARTITIONS)
                    await destinations.open()
                await destinations.publish([nb.change(i) for i in range(at, at + 100)])
                at += 100
                await asyncio.sleep(0.2)
            except Exception:
                if time.monotonic() > deadline:
                    raise
                if destinations is not None:
                    try:
                        await asyncio.wait_for(destinations.close(), 10)
                    except Exception:  # the connection is gone already
                        pass
                    destinations = None
                await asyncio.sleep(0.2)
        if destinations is not None:
            await destinations.close()
        group.published.set()

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("mode", ["frozen", "busy"])
def test_a_paused_path_holds_a_worker_s_bytes_beyond_its_lease(
        tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """``frozen``: ``a`` waits in a call when the path pauses, until ``b`` handled the call's
    events and the call is cancelled. ``busy``: the path pauses while ``a`` is in one of its
    calls (which ends, its acknowledgement held back with the rest). Both resume once ``b``
    has handled on every partition since the pause (it counted every partition's pending
    messages before ``a``'s late bytes arrive). Resumed while ``b`` still counts, ``a``'s
    acknowledgements held back beyond its lease can make ``b``'s counts agree while a
    message of ``a`` is still pending: the limit natsbatch documents (seen once in 22 runs
    that resumed 2 to 5 s after the pause), not tested here."""
    monkeypatch.setattr(nb, "EVENTS", EVENTS)
    group = nb.Group(tmp_path, unique, ["a", "b"])
    proxy = Proxy("127.0.0.1", group.port).start()
    frozen = Path(f"{group.db}.frozen")
    frozen.write_text("")  # a's handler waits in a call only once the test removes it
    call = ""
    try:
        start(group, "a", via(group, proxy.port),
              {"WORKER_FREEZE_AFTER": "1"} if mode == "frozen" else {})
        group.publish()
        group.wait(lambda: handled_by(group, "a"), "a to handle", 30)
        start(group, "b", group.source, {})
        if mode == "frozen":
            frozen.unlink()
            group.wait(lambda: frozen.exists() and frozen.read_text(),
                       "a's call to begin its wait", 30)
            proxy.pause()
            call, first_id = frozen.read_text().split()
            group.wait(lambda: any(r[1] == first_id and r[4] == "b"
                                   for r in group.rows("handled")),
                       "b to handle the paused call's first event", 40)
            group.wait(lambda: group.rows("calls")[int(call) - 1][5] is not None,
                       "a's call in hand to be cancelled", 30)
        else:
            group.wait(lambda: handled_by(group, "b"), "b to handle", 30)
            time.sleep(random.uniform(0, 1))
            # in one of a's calls: its acknowledgement, written after it, is held back
            group.wait(lambda: any(r[1] == "a" and r[4] is None and r[5] is None
                                   for r in group.rows("calls")), "a to be in a call", 30)
            proxy.pause()
        paused = time.time()
        group.wait(lambda: len({r[2] for r in calls_of(group, "b", paused)}) == nb.PARTITIONS,
                   "b to handle on every partition since the pause", 40)
        proxy.resume()
        resumed = time.time()
        group.wait(lambda: calls_of(group, "a", resumed), "a to handle again after the resume", 40)
        group.wait(group.complete, f"{EVENTS} changes handled", 50)
    finally:
        group.stop()
        proxy.stop()
        asyncio.run(group.cleanup())
    group.check()
    if mode == "frozen":
        row = group.rows("calls")[int(call) - 1]
        assert row[1] == "a" and row[4] is None and row[5] is not None, row
        assert not any(r[5] == int(call) for r in group.rows("handled")), \
            "the paused call applied its events"
        assert "lost partition" in group.log("a").read_text()


def test_a_cut_connection_is_made_again_and_nothing_is_lost(
        tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nb, "EVENTS", EVENTS)
    group = nb.Group(tmp_path, unique, ["a", "b"])
    proxy = Proxy("127.0.0.1", group.port).start()
    try:
        start(group, "a", via(group, proxy.port), {})
        group.publish()
        group.wait(lambda: handled_by(group, "a"), "a to handle", 30)
        start(group, "b", group.source, {})
        group.wait(lambda: handled_by(group, "b"), "b to handle", 30)
        # at a point of a's stream of acknowledgements and requests, wherever it falls
        proxy.partition_after(random.randrange(1, 20000))
        group.wait(lambda: proxy.partitioned, "a's connection to be cut", 30)
        time.sleep(random.uniform(0, 1.5))  # below or beyond the lease's margin
        proxy.heal()  # the cut connections are reset
        healed = time.time()
        group.wait(lambda: calls_of(group, "a", healed), "a to handle again after the cut", 40)
        group.wait(group.complete, f"{EVENTS} changes handled", 50)
    finally:
        group.stop()
        proxy.stop()
        asyncio.run(group.cleanup())
    group.check()
    assert proxy.resets >= 1 and proxy.connections >= 2, (proxy.resets, proxy.connections)


def test_workers_come_back_after_the_server_restarts(
        tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nb, "EVENTS", EVENTS)
    server = OwnNats(tmp_path).start()
    group = nb.Group(tmp_path, unique, ["a", "b"])
    group.url = group.url.replace(f"127.0.0.1:{group.port}?", f"127.0.0.1:{server.port}?", 1)
    group.source = via(group, server.port)
    group.port = server.port
    killed_at = 0.0
    try:
        group.start({})
        group.wait(lambda: "consumes" in group.log("b").read_text(), "b to subscribe", 30)
        publishing = publish_through_outages(group)
        group.wait(lambda: handled_by(group, "a") and handled_by(group, "b"),
                   "both workers to handle", 30)
        server.stop()  # SIGKILL: the publisher retries until the server is back
        killed_at = time.time()
        time.sleep(random.uniform(0.2, 2))
        server.start()
        group.wait(lambda: calls_of(group, "a", killed_at) and calls_of(group, "b", killed_at),
                   "both workers to handle after the restart", 45)
        publishing.join(60)
        group.wait(group.complete, f"{EVENTS} changes handled", 50)
    finally:
        group.stop()
        asyncio.run(group.cleanup())
        server.stop()
    group.check()
