"""walex's own HPUB frames (walex.destinations.hpub) against nats-py's Client.publish: the
same batch published both ways to a real JetStream stream is stored identically."""

from __future__ import annotations

import base64
from typing import Any

import nats
import nats.aio.client
import pytest
from support import run

from walex.destinations import from_url
from walex.destinations.encoding import Outgoing
from walex.destinations import hpub
from walex.destinations.hpub import usable

from .brokers import nats_delete
from .conftest import require


def _batch(tag: str) -> list[Outgoing]:
    """Events of several subjects, types and partitions, sizes from empty to past a chunk,
    a table name with characters a subject token may not hold and one that is not ASCII."""
    batch = []
    tables = ["a", "b.c", "tä blé", "x*y>z"]
    for i in range(300):
        body = b'{"n":%d,"pad":"%b"}' % (i, b"x" * (i * 37 % 3000))
        if i == 7:
            body = b""
        if i == 150:
            body = b"y" * 200_000  # more than a chunk by itself
        batch.append(Outgoing(f"0/{tag}:{i}", "public", tables[i % 4],
                              ("insert", "update", "delete")[i % 3], i % 3, body,
                              f"/db/public/{tables[i % 4]}", "2026-12-06T00:00:00Z",
                              f"public.{tables[i % 4]}/{i}", str(i)))
    return batch


async def _stored(stream: str, port: int) -> list[tuple[str, bytes, bytes]]:
    nc = await nats.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(stream, seq)
            out.append((msg.subject, base64.b64decode(msg.hdrs or b""), msg.data or b""))
        return out
    finally:
        await nc.close()


def test_both_ways_store_identical_messages(unique: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    port = require("nats")
    stream = f"WF{unique}"
    url = (f"nats://127.0.0.1:{port}?stream={stream}"
           f"&subject=wf{unique}.{{schema}}.{{table}}.{{type}}.{{partition}}")

    async def publish(batches: list[list[Outgoing]], frames: bool) -> list[tuple[str, bytes, bytes]]:
        destination = from_url(url, partitions=3)
        await destination.open()
        try:
            assert (destination._frames is not None) is frames
            for batch in batches:
                await destination.publish(batch)
        finally:
            await destination.close()
        try:
            return await _stored(stream, port)
        finally:
            await nats_delete(stream, port)

    # a batch with an event id nats-py would rewrite goes through Client.publish whole
    odd = [Outgoing("0/odd:0", "public", "a", "insert", 0, b"{}", "/db/public/a",
                    "2026-12-06T00:00:00Z", "public.a", None),
           Outgoing(" 0/odd:1 ", "public", "a", "insert", 0, b"{}", "/db/public/a",
                    "2026-12-06T00:00:00Z", "public.a", None)]
    batches = [_batch("1"), odd, _batch("2")]

    async def main() -> None:
        try:
            ours = await publish(batches, frames=True)
            monkeypatch.setattr(nats.aio.client, "__version__", "2.5.0")  # not a checked one
            theirs = await publish(batches, frames=False)
        finally:
            await nats_delete(stream, port)
        assert len(ours) == sum(map(len, batches))
        assert ours == theirs
        subject, headers, data = ours[1]
        assert subject == f"wf{unique}.public.b_c.update.1"
        assert headers == (b"NATS/1.0\r\nNats-Msg-Id: 0/1:1\r\n"
                           b"Nats-Expected-Stream: " + stream.encode() + b"\r\n\r\n")
        assert data == batches[0][1].body
        assert ours[2][0] == f"wf{unique}.public.tä_blé.delete.2"

    run(main())


def test_only_checked_versions_take_the_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    port = require("nats")

    async def main() -> None:
        nc = await nats.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False)
        try:
            assert usable(nc)  # the nats-py walex is tested with
            for version in ("2.5.3", "3.0.0", "0.0.0", "1.9"):
                monkeypatch.setattr(nats.aio.client, "__version__", version)
                assert not usable(nc), version
            monkeypatch.setattr(nats.aio.client, "__version__", "2.6.0")
            assert usable(nc)
            monkeypatch.delattr(type(nc), "_send_command")
            assert not usable(nc)  # a client without the internals
        finally:
            await nc.close()

    run(main())


def test_the_caches_key_on_what_a_template_may_use() -> None:
    """hpub.Frames and the Redis destination key their caches on ``item[1:5]``."""
    assert Outgoing._fields[1:5] == ("schema", "table", "type", "partition")


@pytest.mark.skipif(hpub.compiled_frames is None,
                    reason="walex.destinations._hpub not built (no Cython or C compiler at install)")
def test_the_compiled_frames_are_the_pure_frames() -> None:
    """walex.destinations._hpub.frames, the twin of hpub.frames: the same chunks and body
    bytes for plain and chained batches (sizes from empty to past a chunk), and both
    refuse an id that is not plain printable ASCII."""
    import os

    assert hpub._frames is (hpub.frames if os.environ.get("WALEX_PURE_PYTHON")
                            else hpub.compiled_frames)

    def subject_of(subjects: dict[Any, bytes]) -> Any:
        def render(key: Any, item: Outgoing) -> bytes:
            subject = subjects[key] = ".".join(map(str, key)).replace(" ", "_").encode()
            return subject
        return render

    batch = _batch("tw")
    for chain in (None, (1, b"0/tw:prev"), (2**40, b"x")):
        for first in (0, 7, 10**12):
            for part in (batch, batch[:1], batch[140:160], []):
                built = []
                for frames in (hpub.frames, hpub.compiled_frames):
                    subjects: dict[Any, bytes] = {}
                    built.append(frames(part, subjects, subject_of(subjects), b"_INBOX.r.",
                                        b"STREAM", first, chain))
                assert built[0] == built[1], (chain, first, len(part))
    for bad in ("0/a b", "0/é", "", "0/\x7f", "0/\t"):
        odd = batch[:3] + [batch[3]._replace(id=bad)]
        for frames in (hpub.frames, hpub.compiled_frames):
            subjects = {}
            assert frames(odd, subjects, subject_of(subjects), b"p.", b"S", 0, None) is None


@pytest.mark.skipif(hpub.compiled_frames is None,
                    reason="walex.destinations._hpub not built (no Cython or C compiler at install)")
def test_the_compiled_frames_of_runs_of_one_subject_are_the_pure_frames() -> None:
    """A relay's batches come in runs of one table's events (the same key objects): the
    compiled twin takes a run's subject from the message before it. Runs of the same
    objects, keys equal but not the same objects, a key changing in one field only, a
    subject_of that empties the cache midway, negative reply numbers and chain sequences:
    the same chunks as the pure twin, and subject_of called for the same keys."""
    schema, table, kind = "public", "bench_rows", "insert"
    batch = []
    for i in range(2_000):  # several chunks
        # every 300th message a key equal to the run's, not the same objects
        key = ((schema, table, kind, 0) if i % 300 else
               ("".join(["pub", "lic"]), "".join(["bench", "_rows"]), "".join(["ins", "ert"]), 0))
        if 500 <= i < 520:
            key = (schema, table, "update", 0)  # one field changes
        if 900 <= i < 910:
            key = (schema, table, kind, 1 + i % 2)  # the partition alternates
        body = b'{"row":%d,"pad":"%b"}' % (i, b"p" * (i % 97))
        batch.append(Outgoing(f"0000000A{i:08X}-{i:08X}", *key, body, f"/db/{schema}/{table}",
                              "2026-12-07T00:00:00Z", f"{schema}.{table}/{i}", str(i)))

    def subject_of(subjects: dict[Any, bytes], calls: list[Any], clear_at: int) -> Any:
        def render(key: Any, item: Outgoing) -> bytes:
            calls.append(key)
            if len(calls) == clear_at:
                subjects.clear()  # as Frames' cache does past 10,000 subjects
            subject = subjects[key] = ".".join(map(str, key)).encode()
            return subject
        return render

    for chain in (None, (5, b"0/prev"), (-3, b"x")):
        for first in (0, -2, 10**12):
            for clear_at in (0, 2, 3):
                built, called = [], []
                for frames in (hpub.frames, hpub.compiled_frames):
                    subjects: dict[Any, bytes] = {}
                    calls: list[Any] = []
                    built.append(frames(batch, subjects, subject_of(subjects, calls, clear_at),
                                        b"_INBOX.r.", b"STREAM", first, chain))
                    called.append(calls)
                assert built[0] == built[1], (chain, first, clear_at)
                assert called[0] == called[1]
                assert len(built[0][0]) > 2  # several chunks


@pytest.mark.skipif(hpub.compiled_sizes is None,
                    reason="walex.destinations._hpub not built (no Cython or C compiler at install)")
def test_the_compiled_sizes_are_the_pure_sizes() -> None:
    """walex.destinations._hpub.sizes, the twin of hpub.sizes (the max_payload check and
    the longest id of a batch): the same answers, the first message over the limit."""
    import os

    assert hpub.batch_sizes is (hpub.sizes if os.environ.get("WALEX_PURE_PYTHON")
                                else hpub.compiled_sizes)
    batch = _batch("sz")
    batch[5] = batch[5]._replace(id="0/" + "i" * 90)
    batch[9] = batch[9]._replace(body=b"x" * 5000)
    batch[12] = batch[12]._replace(body=b"y" * 7000)
    for part in (batch, batch[:1], batch[6:], []):
        for overhead in (0, 77):
            for limit in (0, 100, 5050, 5100, 10**6):
                expected = hpub.sizes(part, overhead, limit)
                assert hpub.compiled_sizes(part, overhead, limit) == expected, (len(part), limit)
    largest, longest, over = hpub.sizes(batch, 10, 6000)
    assert over == 12 and longest == 92 and largest == 7000 + len(batch[12].id) + 10
    assert hpub.sizes(batch, 10, 0)[2] == -1


def test_frames_go_to_the_socket_only_when_nothing_is_pending() -> None:
    """hpub.Frames.send writes straight to the connection's transport when nats-py has
    nothing pending and the socket keeps up (one copy less than the flusher's join);
    otherwise through the client's pending buffer, behind what is there: a subscriber
    sees every command in the order it was handed over."""
    port = require("nats")

    async def main() -> None:
        nc = await nats.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False)
        other = await nats.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False)
        try:
            sub = await other.subscribe("wfdirect.x")
            await other.flush()
            frames = hpub.Frames(nc, "S", "_INBOX.r.")
            assert hpub.usable(nc)
            await nc.flush()

            def pub(n: int) -> bytes:
                return b"PUB wfdirect.x %d\r\n%b\r\n" % (len(str(n)), str(n).encode())

            socket = hpub.writable(nc)
            assert socket is not None  # connected, nothing pending
            await frames.send([pub(0), pub(1)], 2, 2)
            assert nc._pending == [] and nc._pending_data_size == 0  # not through the client
            await nc.publish("wfdirect.x", b"2")  # pending until the flusher runs
            assert nc._pending and hpub.writable(nc) is None
            await frames.send([pub(3)], 1, 1)  # behind it, through the pending buffer
            assert nc._pending[-1] == pub(3)
            await nc.flush()
            low, high = socket.get_write_buffer_limits()
            socket.set_write_buffer_limits(high=0)  # as if the socket lagged: pending again
            try:
                assert hpub.writable(nc) is None
                await frames.send([pub(4)], 1, 1)
                assert nc._pending == [pub(4)]
            finally:
                socket.set_write_buffer_limits(high=high, low=low)
            await nc.flush()
            assert hpub.writable(nc) is socket
            await frames.send([pub(5)], 1, 1)
            await nc.flush()
            got = [(await sub.next_msg(timeout=5)).data for _ in range(6)]
            assert got == [b"0", b"1", b"2", b"3", b"4", b"5"]
            assert nc.stats["out_msgs"] >= 6
        finally:
            await nc.close()
            await other.close()

    run(main())


@pytest.mark.skipif(hpub.compiled_frames is None,
                    reason="walex.destinations._hpub not built (no Cython or C compiler at install)")
def test_an_id_with_a_character_not_plain_at_any_offset_is_refused_by_both() -> None:
    """The compiled twin checks ids eight bytes at a time: a space, a control character,
    DEL, a byte of 0x80 or more (é, U+2028) at each offset of ids of 1 to 24 characters is
    refused by both twins; the edges of the plain range ('!' and '~') are taken by both,
    with the same frames."""
    batch = _batch("edge")[:2]

    def subject_of(subjects: dict[Any, bytes]) -> Any:
        def render(key: Any, item: Outgoing) -> bytes:
            subject = subjects[key] = b"s.x"
            return subject
        return render

    for length in range(1, 25):
        for at in range(length):
            for char, plain in ((" ", False), ("\x00", False), ("\x1f", False), ("\x7f", False),
                                ("é", False), ("\u2028", False), ("!", True), ("~", True)):
                ident = "a" * at + char + "b" * (length - at - 1)
                odd = [batch[0], batch[1]._replace(id=ident)]
                built = []
                for frames in (hpub.frames, hpub.compiled_frames):
                    subjects: dict[Any, bytes] = {}
                    built.append(frames(odd, subjects, subject_of(subjects), b"p.", b"S", 0,
                                        (5, b"prev")))
                assert built[0] == built[1], (length, at, char)
                assert (built[0] is not None) == plain, (length, at, char)
