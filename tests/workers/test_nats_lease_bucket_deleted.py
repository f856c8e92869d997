"""The lease bucket of a NATS worker group deleted while two workers hold its leases.

Workers with ``prefetch`` > 1 pull a partition only while they hold its lease in the
key-value bucket ``walex_leases_<group>`` (:mod:`walex.workers.natslease`). Deleted (by
hand, ``nats kv rm``), every lease in it is gone at once, while each holder still takes
its own as valid for up to ``ttl * 3/4`` after its last confirmed renewal. A worker that
makes the bucket again (it reconnects when its leases lapse) found it empty: on main it
took every partition at once, those another worker still believed its own included, and
both handled one partition concurrently.

Two worker processes of :mod:`workers.test_nats_batches` (every change handled, per row
in order, no two completed calls of one partition overlapping across workers) share four
partitions; the bucket is deleted twice, with nats-py's JetStream API, while they handle.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import nats
import pytest
from nats.js.errors import NotFoundError

from walex.workers.natslease import Leases, bucket_name
import workers.test_nats_batches as nb
from destinations.conftest import require

EVENTS = 6000  # ~12 s of publishing: the deletions happen while it goes on


async def _delete(port: int, bucket: str) -> None:
    """Delete the bucket, once a worker has made it (again)."""
    nc = await nats.connect(f"nats://127.0.0.1:{port}", connect_timeout=5)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                await nc.jetstream(timeout=10).delete_key_value(bucket)
                return
            except NotFoundError:
                assert time.monotonic() < deadline, f"no worker made {bucket!r} again"
                await asyncio.sleep(0.1)
    finally:
        await nc.close()


def test_a_deleted_lease_bucket_lets_no_partition_be_handled_twice_at_once(
        tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nb, "EVENTS", EVENTS)
    group = nb.Group(tmp_path, unique, ["a", "b"])
    bucket = f"walex_leases_g{unique}"
    try:
        group.start({})
        group.publish()
        group.wait(lambda: {r[4] for r in group.rows("handled")} == {"a", "b"},
                   "both workers to handle", 30)
        for _ in range(3):
            asyncio.run(_delete(group.port, bucket))
            deleted = time.time()
            group.wait(lambda: {r[1] for r in group.rows("calls") if r[3] and r[3] > deleted}
                       == {"a", "b"}, "both workers to handle again after the deletion", 40)
        group.wait(group.complete, f"{EVENTS} changes handled", 60)
    finally:
        group.stop()
        asyncio.run(group.cleanup())
    group.check()
    for name in group.names:
        assert "lost partition" in group.log(name).read_text()


def test_a_bucket_made_again_gives_no_lease_a_former_holder_still_takes_as_valid(
        unique: str) -> None:
    """The leases themselves, two workers' :class:`Leases` on the same nats-server: ``one``
    holds both partitions; the bucket is deleted; ``two`` starts and makes the bucket again.
    No lease may be granted to one of them while the other still takes it as valid (on
    main ``two`` took both at once, ``one`` believing its own for up to ``ttl * 3/4``).
    Then they share the partitions."""
    port = require("nats")
    ttl = 2.0
    group, stream = f"g{unique}", f"S{unique}"
    clashes: list[str] = []

    async def main() -> None:
        ncs = [await nats.connect(f"nats://127.0.0.1:{port}", connect_timeout=5)
               for _ in range(3)]
        leases: dict[str, Leases] = {}
        tasks: list[asyncio.Future[None]] = []  # the leases given back (a lane's shed)

        def granted(name: str, partition: int) -> None:
            for other, theirs in leases.items():
                if other != name and theirs.valid(partition):
                    clashes.append(f"{name} got partition {partition} while {other} held it "
                                   f"for {theirs.remaining(partition):.2f}s more")

        def make(name: str, nc: object) -> Leases:
            made = leases[name] = Leases(nc, group, stream, 2, ttl,
                                         granted=lambda p: granted(name, p),
                                         lost=lambda p, why: None,
                                         shed=lambda p: tasks.append(asyncio.ensure_future(
                                             leases[name].release(p))),
                                         name=name)
            return made

        try:
            one = make("one", ncs[0])
            await one.open()
            await _wait(lambda: len(one.held) == 2, "one to hold both partitions", 3 * ttl)
            await asyncio.sleep(0.3)  # a renewal later: one takes them as valid ~ttl*3/4
            await ncs[2].jetstream(timeout=10).delete_key_value(bucket_name(group))
            two = make("two", ncs[1])
            await two.open()  # makes the bucket again
            await _wait(lambda: len(one.held) == 1 and len(two.held) == 1,
                        "the two to share the partitions", 4 * ttl)
            await one.close()
            await two.close()
        finally:
            try:
                await ncs[2].jetstream(timeout=10).delete_key_value(bucket_name(group))
            except NotFoundError:
                pass
            for nc in ncs:
                await nc.close()

    asyncio.run(asyncio.wait_for(main(), 40))
    assert not clashes, clashes


async def _wait(check, what: str, timeout: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"no {what} within {timeout:g}s"
        await asyncio.sleep(0.05)


def test_a_group_declared_long_before_its_first_worker_takes_its_partitions_at_once(
        unique: str) -> None:
    """``walex worker --declare`` with a prefetch makes the group's lease bucket too: a
    first worker started more than ``ack_wait`` later finds a bucket as old as the
    consumers and takes its partitions at once. Without it, that worker made the bucket
    itself, younger than the consumers by more than ``ttl``, could not tell it from a
    deleted one made again, and took no partition for ``ttl``."""
    from walex import Events
    from walex.workers import Worker

    events = Events()
    events.on_event("item")(lambda batch: None)
    source = nb._source(unique, 8) + "&ack_wait=3"

    async def main() -> None:
        await Worker(source, [events]).consumer.declare()
        await asyncio.sleep(4)  # the group's consumers (and bucket) older than ack_wait
        worker = Worker(source, [events])
        await worker.start()
        try:
            leases = worker.consumer.leases
            assert leases is not None
            deadline = time.monotonic() + 2.0  # well within ttl (3 s)
            while len(leases.held) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert sorted(leases.held) == [0, 1], (
                f"a first worker after --declare held {sorted(leases.held)} after 2 s")
        finally:
            await asyncio.wait_for(worker.stop(), 30)

    asyncio.run(main())


def test_a_bucket_deleted_within_ttl_of_the_groups_start_is_not_taken_for_its_first(
        unique: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A group declared, its first worker ``a`` holding both partitions at once (the bucket
    was made with the consumers); the bucket is deleted at once, well within ``ttl`` of the
    group's start, and worker ``b`` starts and makes it again. ``b`` must take no lease
    ``a`` still takes as valid. On main a bucket made within ``ttl`` of the group's
    consumers counted as the group's first whoever made it: ``b`` took both partitions
    while ``a`` held them (until its next round)."""
    from walex import Events
    from walex.workers import Worker

    # a's rounds 3 s apart (ttl / 3): b opens well before a's next round sees the deletion
    monkeypatch.setattr(Leases, "round_every", 10.0)
    events = Events()
    events.on_event("item")(lambda batch: None)
    source = nb._source(unique, 8) + "&ack_wait=9"
    port = require("nats")
    clashes: list[str] = []

    async def main() -> None:
        await Worker(source, [events]).consumer.declare()
        a = Worker(source, [events], name="a")
        b = Worker(source, [events], name="b")
        await a.start()
        try:
            la = a.consumer.leases
            assert la is not None
            await _wait(lambda: sorted(la.held) == [0, 1], "a to hold both partitions", 5)
            nc = await nats.connect(f"nats://127.0.0.1:{port}", connect_timeout=5)
            try:
                await nc.jetstream(timeout=10).delete_key_value(bucket_name(f"g{unique}"))
            finally:
                await nc.close()
            await b.start()
            lb = b.consumer.leases
            assert lb is not None
            deadline = time.monotonic() + 6  # past a's next round: it has dropped its leases
            while time.monotonic() < deadline:
                clashes.extend(f"b holds partition {p} while a takes it as valid for "
                               f"{la.remaining(p):.2f}s more" for p in lb.held if la.valid(p))
                await asyncio.sleep(0.01)
            assert not la.held, f"a still holds {sorted(la.held)} after the deletion"
            # ttl after the bucket was made again, b takes partitions (a reconnected meanwhile:
            # it lost its leases, so its lanes were revoked)
            await _wait(lambda: bool(lb.held), "b to take a partition", 20)
        finally:
            await asyncio.wait_for(a.stop(), 30)
            await asyncio.wait_for(b.stop(), 30)

    asyncio.run(asyncio.wait_for(main(), 60))
    assert not clashes, clashes[:5]
