"""The ways a NATS worker's messages reach its lanes (walex.workers.natsdirect): cut from the
socket's chunks before nats-py's read loop (direct, walex.workers.natstap), from nats-py's
read loop through walex's cut and parser hook (read loop: the tap off), and through the
pull subscriptions' queues and ``fetch`` (the fallback, for a nats-py walex did not check),
against the machine's nats-server. Each hands every event once, in order per partition,
one per call, with the same stream sequences and delivery counts; each gives back what it
holds when the worker stops, and delivers a message again to the next worker after a
failed call. The cut hands the lanes the frames nats-py's own parser would, however the
bytes are split into chunks, and leaves every other frame to nats-py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from support import run, until
from workers.conftest import require
from workers.test_worker import Broker, Calls, made_up, relay, worker_running

from walex import Event
from walex.workers import Worker, current_lease
from walex.workers import natsdirect as natsdirect_module
from walex.workers.nats import NatsConsumer
from walex.workers.natsdirect import Inboxes, Raw

WAYS = ["direct", "read loop", "subscription"]
PARTITIONS = 3
COUNT = 60


def _way(way: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if way == "subscription":  # a client the direct way was not checked for
        monkeypatch.setattr(natsdirect_module, "usable", lambda nc, sids: False)
    elif way == "read loop":  # the chunks through nats-py's read loop, not tapped
        monkeypatch.setattr(NatsConsumer, "tap", False)


@pytest.mark.parametrize("way", WAYS)
def test_both_ways_hand_every_event_once_in_order(unique: str, way: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _way(way, monkeypatch)
    b = Broker("nats", unique)
    calls = Calls()
    seen: list[tuple[int, str, int | None, int | None]] = []  # partition, id, sequence, attempt

    async def record(batch: list[Event]) -> None:
        lease = current_lease()
        assert lease is not None
        seen.extend((lease.partition, e.id, lease.sequence, lease.attempt) for e in batch)
        await calls.handler("item")(batch)

    calls.events.on_event("item")(record)
    # transactions of 1 to 4 rows over the partitions
    batches = [[made_up(i + k) for k in range(1 + i % 4)] for i in range(0, COUNT, 4)]
    events = [e for batch in batches for e in batch]

    async def main() -> tuple[Worker, Any, Any]:
        await relay(b, batches, partitions=PARTITIONS)
        worker = Worker(b.source(partitions=PARTITIONS), [calls.events])
        async with worker_running(worker):
            await until(lambda: len(calls.flat("item")) >= len(events), "every event handled", 60)
            inboxes = worker.consumer.inboxes  # type: ignore[attr-defined]
            nc = worker.consumer.destination.nc
            queued = sum(lane.psub.delivered for lane in worker.consumer.lanes)  # type: ignore[attr-defined]
        assert queued >= len(events)  # the subscriptions' counts see both ways' messages
        return worker, inboxes, nc

    try:
        worker, inboxes, nc = run(main(), timeout=120)
    finally:
        asyncio.run(b.cleanup())
    if way != "subscription":
        assert isinstance(inboxes, Inboxes)
        # given back before the connection closed
        assert vars(nc).get("_process_msg") != inboxes._take
        assert "parse" not in vars(nc._ps)
        if way == "direct":  # chunks were cut before the read loop woke
            assert inboxes.tap is not None and inboxes.tap.chunks > 0
        else:
            assert inboxes.tap is None
    else:
        assert inboxes is None
    handled = calls.flat("item")
    assert sorted(e.id for e in handled) == sorted(e.id for e in events)  # each once
    assert all(len(batch) == 1 for batch in calls.of("item"))  # one message per call
    for p in range(PARTITIONS):  # stream order per partition, first deliveries
        mine = [(seq, event_id, attempt) for part, event_id, seq, attempt in seen if part == p]
        assert mine, f"partition {p} got nothing"
        assert [s for s, _, _ in mine] == sorted(s for s, _, _ in mine)
        assert [i for _, i, _ in mine] == sorted(i for _, i, _ in mine)
        assert all(attempt == 1 for _, _, attempt in mine)
    assert worker.redeliveries == 0 and worker.duplicates == 0


@pytest.mark.parametrize("way", WAYS)
def test_both_ways_give_back_and_redeliver(unique: str, way: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing call stops the first worker (its message given back, nak'ed at once); the
    next worker gets that message again, as its second delivery, then the rest in order."""
    _way(way, monkeypatch)
    b = Broker("nats", unique)
    first, second = Calls(), Calls()
    first.events.on_event("item")(first.handler("item", fail=lambda batch: batch[0].id ==
                                                 made_up(2).id))
    attempts: list[tuple[str, int | None]] = []

    async def note(batch: list[Event]) -> None:
        lease = current_lease()
        assert lease is not None
        attempts.append((batch[0].id, lease.attempt))

    second.events.on_event("item")(second.handler("item"))
    second.events.on_event("item")(note)

    async def main() -> Worker:
        await relay(b, [[made_up(i)] for i in range(5)], partitions=1)
        worker = Worker(b.source(partitions=1, ack_wait=60), [first.events], max_retries=0)
        async with worker_running(worker):
            await asyncio.wait_for(worker._stopped.wait(), 30)  # the failure stopped it
        assert isinstance(worker._error, Exception)
        other = Worker(b.source(partitions=1, ack_wait=60), [second.events])
        async with worker_running(other):
            # at once, not after ack_wait: the message was given back
            await until(lambda: len(second.flat("item")) >= 3, "the rest handed over", 20)
        return other

    try:
        other = run(main(), timeout=90)
    finally:
        asyncio.run(b.cleanup())
    assert [e.id for e in first.flat("item")] == [made_up(i).id for i in range(2)]
    assert [e.id for e in second.flat("item")] == [made_up(i).id for i in range(2, 5)]
    assert attempts[0] == (made_up(2).id, 2) and other.redeliveries == 1


def _frames(lane: int, other: int) -> tuple[bytes, list[tuple[bytes, bytes, bytes | None]]]:
    """A stream of frames for the sid ``lane`` (with and without a reply subject and
    headers) and for ``other``, with a ``+OK`` between them; and the lane's frames."""
    stream, mine = b"", []
    for i in range(12):
        body = b'{"n":%d,"pad":"%b"}' % (i, b"x" * (i * 7))
        if i % 4 == 0:
            headers = b"NATS/1.0\r\nNats-Msg-Id: m%d\r\n\r\n" % i
            reply = b"$JS.ACK.S.C.1.%d.%d.1700000000000000000.%d" % (i + 1, i + 1, 11 - i)
            stream += b"HMSG wk.a.%d %d %b %d %d\r\n%b%b\r\n" % (
                i, lane, reply, len(headers), len(headers) + len(body), headers, body)
            mine.append((reply, body, headers))
        elif i % 4 == 1:
            reply = b"_INBOX.r%d" % i
            stream += b"MSG wk.a.%d %d %b %d\r\n%b\r\n" % (i, lane, reply, len(body), body)
            mine.append((reply, body, None))
        elif i % 4 == 2:
            stream += b"MSG wk.a.%d %d %d\r\n%b\r\n" % (i, lane, len(body), body)
            mine.append((b"", body, None))
        else:  # another subscription's, then a +OK
            headers = b"NATS/1.0 408 Request Timeout\r\n\r\n"
            stream += b"HMSG wk.b %d %d %d\r\n%b\r\n+OK\r\n" % (
                other, len(headers), len(headers), headers)
    return stream, mine


def test_the_cut_hands_the_lanes_what_nats_py_parser_does() -> None:
    """nats-py's own parser (the reference: every frame through it) and walex's cut with the
    parser hook, fed the same bytes in chunks split at every offset, give the lane the
    same frames in the same order and the other subscription its own."""
    import nats

    port = require("nats")

    async def main() -> None:
        nc = await nats.connect(f"nats://127.0.0.1:{port}")
        try:
            lane_sub = await nc.subscribe("wk.nothing.a")  # never published to
            other_sub = await nc.subscribe("wk.nothing.b")
            got: list[Raw] = []
            inboxes = Inboxes.install(nc, {lane_sub._id: got.append}, taps=False)
            assert inboxes is not None
            stream, mine = _frames(lane_sub._id, other_sub._id)
            others = stream.count(b"HMSG wk.b")

            async def others_got() -> list[Any]:
                msgs = [await other_sub.next_msg(timeout=5) for _ in range(others)]
                assert other_sub.pending_msgs == 0
                return [(m.subject, m.headers, m.data) for m in msgs]

            await inboxes._parse(stream)  # nats-py's parse, frame by frame through _take
            reference = [(r.reply, r.data, r.headers) for r in got]
            assert reference == mine
            reference_others = await others_got()
            assert reference_others and all(o == reference_others[0] for o in reference_others)
            received = nc.stats["in_msgs"]
            for split in range(1, len(stream)):
                got.clear()
                await inboxes.parse(stream[:split])
                await inboxes.parse(stream[split:])
                assert [(r.reply, r.data, r.headers) for r in got] == reference, split
                assert await others_got() == reference_others, split
                assert not nc._ps.buf and not inboxes._carry
            assert nc.stats["in_msgs"] - received == (len(stream) - 1) * (len(mine) + others)
            inboxes.release()
            assert "parse" not in vars(nc._ps)
        finally:
            await nc.close()

    run(main(), timeout=60)


def test_the_tap_leaves_a_chunk_to_the_read_loop_while_it_holds_bytes() -> None:
    """A chunk comes to the tap while nats-py's read loop has bytes it has not parsed yet (the
    first half of another subscription's frame): it goes to the read loop, after those
    bytes, not cut ahead of them; once the read loop is idle again, the next chunk is cut
    at once."""
    import nats

    port = require("nats")

    async def main() -> None:
        nc = await nats.connect(f"nats://127.0.0.1:{port}")
        try:
            lane_sub = await nc.subscribe("wk.nothing.a")
            other_sub = await nc.subscribe("wk.nothing.b")
            got: list[Raw] = []
            inboxes = Inboxes.install(nc, {lane_sub._id: got.append})
            assert inboxes is not None and inboxes.tap is not None
            tap = inboxes.tap
            stream, mine = _frames(lane_sub._id, other_sub._id)
            first = stream.index(b"MSG wk.a.1 ")  # the second frame
            other = stream.index(b"HMSG wk.b ")  # the fourth, the other subscription's
            half = stream.index(b"\r\n", other) + 5  # cut in two after its control line
            await until(lambda: tap.reader._waiter is not None, "the read loop waiting")
            tap.data_received(stream[:half])  # three whole frames (cut here), then half of one
            assert [r.data for r in got] == [m[1] for m in mine[:3]] and tap.chunks == 0
            tap.data_received(stream[half:])  # the read loop has not run: all to it
            assert len(got) == 3 and tap.reader._buffer
            await until(lambda: len(got) == len(mine), "the read loop's frames")
            assert [(r.reply, r.data, r.headers) for r in got] == mine
            await other_sub.next_msg(timeout=5)
            await until(lambda: tap.reader._waiter is not None and not tap.reader._buffer,
                        "the read loop idle")
            got.clear()
            tap.data_received(stream[:first])  # whole frames, the read loop idle: cut here
            assert [(r.reply, r.data, r.headers) for r in got] == mine[:1] and tap.chunks == 1
            inboxes.release()
            assert tap.transport.get_protocol() is tap.protocol
            await nc.flush(timeout=5)  # the connection works on after the tap is gone
        finally:
            await nc.close()

    run(main(), timeout=60)


def test_a_lane_frame_cut_in_two_by_the_chunks_is_cut_with_the_next_one() -> None:
    """A chunk ends within a lane's frame (a batch's messages span several chunks): the
    frame's head is held by walex's cut, not handed to nats-py's parser (which would then
    take every following chunk whole, frame by frame), and the next chunk's frames are cut
    at once with it, at every offset of the frame, in order; what is held goes to nats-py's
    parser when the hook is removed."""
    import nats

    port = require("nats")

    async def main() -> None:
        nc = await nats.connect(f"nats://127.0.0.1:{port}")
        try:
            lane_sub = await nc.subscribe("wk.nothing.a")
            other_sub = await nc.subscribe("wk.nothing.b")
            got: list[Raw] = []
            inboxes = Inboxes.install(nc, {lane_sub._id: got.append})
            assert inboxes is not None and inboxes.tap is not None
            tap = inboxes.tap
            stream, mine = _frames(lane_sub._id, other_sub._id)
            lane_frames = stream[:stream.index(b"HMSG wk.b ")]  # three whole frames
            await until(lambda: tap.reader._waiter is not None, "the read loop waiting")
            for split in range(1, len(lane_frames)):
                got.clear()
                chunks = tap.chunks
                tap.data_received(lane_frames[:split])
                tap.data_received(lane_frames[split:])
                assert [(r.reply, r.data, r.headers) for r in got] == mine[:3], split
                assert tap.chunks == chunks + 2 and not tap.reader._buffer, split
                assert not nc._ps.buf and not inboxes._carry, split
            got.clear()
            tap.data_received(lane_frames[:10])  # held: the hook goes, nats-py's parser has it
            assert inboxes._carry == lane_frames[:10] and not got
            inboxes.release()
            assert nc._ps.buf == lane_frames[:10] and not inboxes._carry
            await nc._ps.parse(lane_frames[10:])  # (the read loop's next chunk)
            assert [(r.reply, r.data, r.headers) for r in got] == []  # _take is gone:
            assert lane_sub.pending_msgs == 3  # nats-py's own took the three frames
        finally:
            await nc.close()

    run(main(), timeout=60)


def test_after_another_subscription_s_frame_the_lane_frames_are_cut_again() -> None:
    """A chunk of lane frames with another subscription's frame and a ``+OK`` among them:
    nats-py's parser is handed those two alone, and every lane frame after them is cut
    (none goes through nats-py's parser and ``_process_msg``)."""
    import nats

    port = require("nats")

    async def main() -> None:
        nc = await nats.connect(f"nats://127.0.0.1:{port}")
        try:
            lane_sub = await nc.subscribe("wk.nothing.a")
            other_sub = await nc.subscribe("wk.nothing.b")
            got: list[Raw] = []
            inboxes = Inboxes.install(nc, {lane_sub._id: got.append}, taps=False)
            assert inboxes is not None
            stream, mine = _frames(lane_sub._id, other_sub._id)
            through_nats_py: list[int] = []
            hooked = nc._process_msg

            async def counting(sid: int, *args: Any) -> None:
                through_nats_py.append(sid)
                await hooked(sid, *args)

            nc._process_msg = counting
            await inboxes.parse(stream)
            assert [(r.reply, r.data, r.headers) for r in got] == mine
            assert through_nats_py == [other_sub._id] * stream.count(b"HMSG wk.b")
            assert (await other_sub.next_msg(timeout=5)).data == b""
            nc._process_msg = hooked
            inboxes.release()
        finally:
            await nc.close()

    run(main(), timeout=60)
