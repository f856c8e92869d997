"""Pipelining across transactions (``destination_window``): faster, and no guarantee weaker.

With a window above 1 the handlers and the publishes run ahead of the
confirmations, a lane publishes the queued transactions as one group, and the
acknowledgement still waits, in order, for every destination's confirmation.
The tests run many one-row transactions (updates cycling over ten keys, so
the order per key is checked by the values) against real brokers: one behind
the fault suite's TCP proxy, cut off while the window is full, and brokers
the test starts and kills mid-stream.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from support import collecting, run

from walex.lsn import parse_lsn

from .brokers import (
    Stored, nats_delete, nats_stored, rabbitmq_delete, rabbitmq_queue, rabbitmq_stored, redis_delete,
    redis_stored,
)
from .conftest import require
from .servers import OwnNats, OwnRedis
from .test_outage import confirmed

sys.path.insert(0, str(Path(__file__).parents[1] / "chaos"))
from proxy import Proxy  # noqa: E402

KEYS = 10
INSERT_KEYS = f"INSERT INTO k SELECT i, 0 FROM generate_series(0, {KEYS - 1}) i"
SETUP = """
    CREATE TABLE k (id int PRIMARY KEY, v int);
    CREATE TABLE other (id int PRIMARY KEY);
    CREATE PUBLICATION pub FOR ALL TABLES;
"""


def write(dsn: str, updates: int) -> None:
    """``updates`` one-row transactions: key ``i % KEYS`` gets v + 1."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(updates):
            conn.execute("UPDATE k SET v = v + 1 WHERE id = %s", (i % KEYS,))


def check_keys(stored: list[Stored], updates: int) -> dict[str, dict[str, Any]]:
    """Every change stored (first copies), in order per key; a duplicate is the first copy
    again (same id, same content). Returns the first copies by id."""
    first: dict[str, dict[str, Any]] = {}
    values: dict[int, list[int]] = {key: [] for key in range(KEYS)}
    for message_id, doc, _extra in stored:
        if message_id in first:
            assert first[message_id] == doc, f"{message_id}: a duplicate differs from the first copy"
            continue
        first[message_id] = doc
        record = doc["data"]["new_record"]
        values[record["id"]].append(record["v"])
    for key, seen in values.items():
        count = updates // KEYS + (1 if key < updates % KEYS else 0)
        assert seen == list(range(count + 1)), f"key {key}: values stored {seen}"
    ids = list(first)
    assert ids == sorted(ids), "first copies out of commit order"
    return first


async def until_confirmed(admin: psycopg.Connection, slot: str, lsn: int, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while confirmed(admin, slot) < lsn:
        assert loop.time() < deadline, "the slot never reached the last transaction"
        await asyncio.sleep(0.1)


def test_acknowledgement_never_passes_what_a_cut_off_destination_confirmed(
    admin: psycopg.Connection, dsn: str, unique: str,
) -> None:
    """Redis takes everything; RabbitMQ, behind a TCP proxy, is cut off mid-stream while the
    window is full: the slot's confirmed_flush_lsn, polled meanwhile, stays at what
    RabbitMQ stored; once healed, both hold every change, in order per key."""
    rport, aport = require("redis"), require("rabbitmq")
    admin.execute(SETUP)
    slot, updates = f"window_{unique}", 400
    exchange, queue = f"ww{unique}", f"ww{unique}.q"
    asyncio.run(rabbitmq_queue(exchange, queue, aport))
    proxy = Proxy("127.0.0.1", aport).start()
    urls = [f"redis://127.0.0.1:{rport}/0?stream=ww{unique}:{{table}}",
            f"amqp://guest:guest@127.0.0.1:{proxy.port}/?exchange={exchange}&timeout=1"]

    async def main() -> tuple[list[Any], int]:
        async with collecting(dsn, destinations=urls, durable_slot=True, slot_name=slot,
                              status_interval=0.2, destination_window=32) as rec:
            app = rec.app
            assert app is not None
            admin.execute(INSERT_KEYS)
            writing = asyncio.ensure_future(asyncio.to_thread(write, dsn, updates))
            await rec._until(lambda: len(rec.events) >= 150, 60, "150 changes handled")
            await asyncio.to_thread(proxy.partition)
            loop = asyncio.get_running_loop()
            highest, end = 0, loop.time() + 3  # fifteen status intervals, cut off
            while loop.time() < end:
                highest = max(highest, confirmed(admin, slot))
                await asyncio.sleep(0.05)
            at_rabbitmq = {i for i, _d, _x in await rabbitmq_stored(queue, aport)}
            handled = list(rec.events)
            early = [e.id for e in handled if parse_lsn(e.lsn) < highest and e.id not in at_rabbitmq]
            assert not early, f"acknowledged before RabbitMQ had them: {early[:5]}"
            assert any(parse_lsn(e.lsn) >= highest for e in handled), \
                "the handlers did not run ahead of the acknowledgement"
            await asyncio.to_thread(proxy.heal)
            await writing
            events = await rec.wait_for(KEYS + updates, 120)
            await until_confirmed(admin, slot, parse_lsn(events[-1].lsn), 120)
            return events, highest

    try:
        events, _highest = run(main(), timeout=300)
        for stored in (asyncio.run(redis_stored(f"ww{unique}:*", rport)),
                       asyncio.run(rabbitmq_stored(queue, aport))):
            first = check_keys(stored, updates)
            assert list(first) == [e.id for e in events]
    finally:
        proxy.stop()
        asyncio.run(rabbitmq_delete(exchange, queue, aport))
        asyncio.run(redis_delete(f"ww{unique}:*", rport))


@pytest.mark.parametrize("broker", ["nats", "redis"])
def test_broker_killed_mid_stream_with_a_window_loses_nothing(
    broker: str, admin: psycopg.Connection, dsn: str, tmp_path: Path, unique: str,
) -> None:
    """The broker is SIGKILLed while the window holds unconfirmed transactions and started
    again: every change is there, in order per key, replays with the same ids and content
    (none at all in JetStream, which drops a replayed Nats-Msg-Id)."""
    admin.execute(SETUP)
    slot, updates = f"window_{unique}", 300
    server = (OwnNats if broker == "nats" else OwnRedis)(tmp_path).start()
    if broker == "nats":
        url = f"nats://127.0.0.1:{server.port}?stream=WW&subject=ww.{{table}}&timeout=1"
        read: Any = lambda: nats_stored("WW", server.port)  # noqa: E731
    else:
        url = f"redis://127.0.0.1:{server.port}/0?stream=ww:{{table}}&timeout=1"
        read = lambda: redis_stored("ww:*", server.port)  # noqa: E731

    async def main() -> list[Any]:
        async with collecting(dsn, destinations=[url], durable_slot=True, slot_name=slot,
                              status_interval=0.2, destination_window=64) as rec:
            app = rec.app
            assert app is not None
            admin.execute(INSERT_KEYS)
            writing = asyncio.ensure_future(asyncio.to_thread(write, dsn, updates))
            await rec._until(lambda: len(rec.events) >= 100, 60, "100 changes handled")
            await asyncio.to_thread(server.stop)
            await rec._until(lambda: app.destinations.retries >= 2, 60, "two failed attempts")
            await asyncio.to_thread(server.start)
            await writing
            events = await rec.wait_for(KEYS + updates, 120)
            await until_confirmed(admin, slot, parse_lsn(events[-1].lsn), 120)
            return events

    try:
        events = run(main(), timeout=300)
        stored = asyncio.run(read())
    finally:
        server.stop()
    first = check_keys(stored, updates)
    assert list(first) == [e.id for e in events]
    if broker == "nats":
        assert len(stored) == len(first), "JetStream stored a replayed message id twice"


def test_handlers_run_ahead_and_a_lane_publishes_the_queued_transactions_at_once(
    admin: psycopg.Connection, dsn: str, tmp_path: Path, unique: str,
) -> None:
    """With the broker down, the handlers get every transaction (up to the window) and none
    is acknowledged; once it is back the lane publishes them in a few groups, not one
    publish per transaction."""
    admin.execute(SETUP)
    slot, updates = f"window_{unique}", 40

    async def main(server: OwnNats) -> tuple[list[Any], int]:
        url = f"nats://127.0.0.1:{server.port}?stream=WW&subject=ww.{{table}}&timeout=1"
        async with collecting(dsn, destinations=[url], durable_slot=True, slot_name=slot,
                              status_interval=0.2, destination_window=64) as rec:
            app = rec.app
            assert app is not None
            admin.execute(INSERT_KEYS)
            await rec._until(lambda: app.transactions_handled >= 1, 60, "the rows stored")
            await asyncio.to_thread(server.stop)
            await asyncio.to_thread(write, dsn, updates)
            events = await rec.wait_for(KEYS + updates, 60)  # none waits for a confirmation
            await asyncio.sleep(1)  # five status intervals
            assert confirmed(admin, slot) < parse_lsn(events[KEYS].lsn)
            assert app.ack.flushed < parse_lsn(events[KEYS].lsn)
            await asyncio.to_thread(server.start)
            await until_confirmed(admin, slot, parse_lsn(events[-1].lsn), 120)
            groups = app.pipeline.window.lanes[0].groups
            return events, groups

    with OwnNats(tmp_path) as server:
        events, groups = run(main(server), timeout=240)
        stored = asyncio.run(nats_stored("WW", server.port))
    first = check_keys(stored, updates)
    assert list(first) == [e.id for e in events] and len(stored) == len(first)
    assert groups < updates // 2, f"{groups} publishes for {updates + 1} transactions"


async def _refusing_other(server: OwnRedis, prefix: str) -> str:
    """The URL of a relay to ``<prefix>:{table}`` on ``server``, whose stream key for table
    ``other`` holds a string: Redis refuses its events for good (WRONGTYPE)."""
    import redis.asyncio as aioredis

    client = aioredis.Redis(port=server.port)
    await client.set(f"{prefix}:other", "not a stream")
    await client.aclose()
    return f"redis://127.0.0.1:{server.port}/0?stream={prefix}:{{table}}&timeout=1"


async def _grouped_while_down(admin: psycopg.Connection, rec: Any, server: OwnRedis,
                              group: list[str]) -> list[Any]:
    """k 0 stored; Redis stopped; k 1 (published alone, retried) and the ``group``
    statements committed meanwhile, so that they wait and then go as one group; Redis
    started again once an attempt failed. Returns the four events."""
    app = rec.app
    admin.execute("INSERT INTO k VALUES (0, 0)")
    await rec._until(lambda: app.transactions_handled >= 1, 60, "the first stored")
    await asyncio.to_thread(server.stop)
    admin.execute("INSERT INTO k VALUES (1, 0)")  # published alone, retried
    for statement in group:
        admin.execute(statement)
    events = await rec.wait_for(4, 60)
    await rec._until(lambda: app.destinations.retries >= 1, 60, "a failed attempt")
    await asyncio.to_thread(server.start)
    return events


def test_a_refusal_in_a_group_settles_that_transaction_only(
    admin: psycopg.Connection, dsn: str, tmp_path: Path,
) -> None:
    """Redis refuses the events of ``other`` for good (its stream key holds a string); they
    are queued in one group with events of ``k``. Under on_error="skip" the group goes
    again one transaction at a time: the refused one is skipped, the others delivered."""
    admin.execute(SETUP)
    slot = "window_refusal"

    async def main(server: OwnRedis) -> list[Any]:
        url = await _refusing_other(server, "wr")
        async with collecting(dsn, destinations=[url], durable_slot=True, slot_name=slot,
                              status_interval=0.2, destination_window=64,
                              on_error="skip") as rec:
            app = rec.app
            assert app is not None
            events = await _grouped_while_down(admin, rec, server, [
                "INSERT INTO other VALUES (1)",  # these two wait, then go as a group
                "INSERT INTO k VALUES (2, 0)"])
            await until_confirmed(admin, slot, parse_lsn(events[-1].lsn), 120)
            assert app.destinations.refusals == 1 and app.dispatcher.failures == 1
            return events

    with OwnRedis(tmp_path) as server:
        events = run(main(server), timeout=240)
        stored = asyncio.run(redis_stored("wr:k", server.port))
    ids = [e.id for e in events if e.name == "k"]
    assert sorted({i for i, _d, _x in stored}) == ids  # the k events, duplicates aside
    # the refused group (Redis added its k event before refusing) went again one
    # transaction at a time: that k event is stored twice, with the same id
    assert len(stored) > len(ids)


def test_a_refusal_under_stop_leaves_the_group_s_earlier_transactions_acknowledged(
    admin: psycopg.Connection, dsn: str, tmp_path: Path,
) -> None:
    """A group of ``k`` then ``other`` (whose stream key Redis refuses for good) goes again
    one transaction at a time; under on_error="stop" the app stops at ``other``, with the
    ``k`` transaction before it confirmed and recorded, not left to be sent again."""
    from walex import DestinationError

    admin.execute(SETUP)
    slot = "window_refusal_stop"

    async def main(server: OwnRedis) -> tuple[list[Any], int]:
        url = await _refusing_other(server, "ws2")
        app: Any = None
        with pytest.raises(DestinationError, match="the stream key 'ws2:other' holds"):
            async with collecting(dsn, destinations=[url], durable_slot=True, slot_name=slot,
                                  status_interval=0.2, destination_window=64,
                                  on_error="stop") as rec:
                app = rec.app
                assert app is not None
                events = await _grouped_while_down(admin, rec, server, [
                    "INSERT INTO k VALUES (2, 0)",  # these two wait, then go as
                    "INSERT INTO other VALUES (1)"])  # one group: k first
                await app.wait()
        return events, app.pipeline.ack.flushed

    with OwnRedis(tmp_path) as server:
        events, flushed = run(main(server), timeout=240)
    k2, other = events[2], events[3]
    assert (k2.name, other.name) == ("k", "other")
    assert parse_lsn(k2.lsn) < flushed <= parse_lsn(other.lsn)


def test_webhook_requests_carry_several_transactions_signed_with_one_id_per_request(
    admin: psycopg.Connection, dsn: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The one-row transactions queued while a request is retried go out together, at most
    ``group_events`` (here 8) events per request, each request signed and named by the
    range of ids it carries; the retry of a request repeats its id and its body."""
    from standardwebhooks.webhooks import Webhook

    from walex.destinations.webhook import WebhookDestination

    from .receiver import Receiver

    secret = "whsec_" + base64.b64encode(b"window").decode()
    monkeypatch.setenv("WALEX_TEST_WINDOW_SECRET", secret)
    monkeypatch.setattr(WebhookDestination, "group_events", 8)
    admin.execute(SETUP)
    updates = 20

    async def main(hook: Receiver) -> list[Any]:
        url = hook.url(query="secret_env=WALEX_TEST_WINDOW_SECRET&timeout=0.5")
        async with collecting(dsn, destinations=[url], destination_window=64) as rec:
            app = rec.app
            assert app is not None
            admin.execute(INSERT_KEYS)  # its request hangs past the timeout: retried
            await rec._until(lambda: app.pipeline.window is not None
                             and app.pipeline.window.lanes[0].groups >= 1, 30, "a first request")
            await asyncio.to_thread(write, dsn, updates)  # queued meanwhile
            events = await rec.wait_for(KEYS + updates, 60)
            await rec._until(lambda: app.transactions_handled == 1 + updates, 60, "all confirmed")
            return events

    with Receiver() as hook:
        # the first transaction's two requests (10 events): the first hangs twice, then both
        # go;
        # then the first request of the transactions queued meanwhile fails once
        hook.script([("hang", 2), ("hang", 2), 200, 200, 500])
        events = run(main(hook), timeout=180)
    requests = hook.requests
    for _path, headers, body, status in requests:
        if status:
            Webhook(secret).verify(body, headers)
    stored: list[Stored] = []
    seen: set[str] = set()
    for _path, headers, body, _status in hook.accepted():
        docs = json.loads(body)
        assert len(docs) <= 8 or len({d["walexlsn"] for d in docs}) == 1
        if len(docs) > 1:
            assert headers["webhook-id"] == f"{docs[0]['id']}_{docs[-1]['id']}"
        stored.extend((d["id"], d, headers["webhook-id"]) for d in docs if d["id"] not in seen)
        seen.update(d["id"] for d in docs)
    assert [i for i, _d, _x in stored] == [e.id for e in events]
    check_keys(stored, updates)
    failed = [(h["webhook-id"], b) for _p, h, b, s in requests if s == 500]
    assert len(failed) == 1
    retried = [(h["webhook-id"], b) for _p, h, b, s in requests if h["webhook-id"] == failed[0][0]]
    assert len(retried) == 2 and retried[0][1] == retried[1][1]
    assert len({d["walexlsn"] for d in json.loads(failed[0][1])}) > 1, \
        "the retried request did not carry several transactions"


def test_what_waits_in_any_window_is_bounded_by_max_pending_bytes(
    admin: psycopg.Connection, dsn: str, tmp_path: Path,
) -> None:
    """With the broker down and a window far larger than the budget, wide one-row
    transactions stop being read once the batches waiting for confirmation hold
    ``max_pending_bytes``; nothing is lost when the broker is back."""
    admin.execute("CREATE TABLE w (id int PRIMARY KEY, t text); CREATE PUBLICATION pub FOR ALL TABLES")
    rows, budget, width = 200, 1024 * 1024, 40_000

    async def main(server: OwnRedis) -> tuple[list[Any], int, int]:
        url = f"redis://127.0.0.1:{server.port}/0?stream=wm:{{table}}&timeout=1"
        async with collecting(dsn, destinations=[url], destination_window=100_000,
                              max_pending_bytes=budget, max_pending_transactions=10_000,
                              durable_slot=True, slot_name="window_memory") as rec:
            app = rec.app
            assert app is not None
            await asyncio.to_thread(server.stop)

            def insert() -> None:
                with psycopg.connect(dsn, autocommit=True) as conn:
                    for i in range(rows):
                        conn.execute("INSERT INTO w VALUES (%s, repeat(md5(%s::text), %s))",
                                     (i, i, width // 32))

            await asyncio.to_thread(insert)
            await rec._until(lambda: app.destinations.retries >= 3, 60, "three failed attempts")
            # the encoded messages held unconfirmed stop at a quarter of the budget
            await rec._until(lambda: len(rec.events) >= budget // 4 // width, 60,
                             "a quarter of the budget's worth")
            await asyncio.sleep(2)  # the reader would go on here if nothing held it
            held, most = len(rec.events), app.pipeline.queue.bytes
            await asyncio.to_thread(server.start)
            events = await rec.wait_for(rows, 120)
            await until_confirmed(admin, "window_memory", parse_lsn(events[-1].lsn), 120)
            return events, held, most

    with OwnRedis(tmp_path) as server:
        events, held, most = run(main(server), timeout=300)
        stored = asyncio.run(redis_stored("wm:*", server.port))
    assert held < rows // 2, f"{held} of {rows} wide transactions handled with the broker down"
    assert most <= budget + 2 * width, f"{most} bytes held for a budget of {budget}"
    assert sorted({i for i, _d, _x in stored}) == [e.id for e in events]


def test_encoded_messages_held_unconfirmed_are_bounded_by_a_quarter_of_the_budget(
    admin: psycopg.Connection, dsn: str, tmp_path: Path,
) -> None:
    """With the broker down, the encoded messages a window holds unconfirmed stay within a
    quarter of ``max_pending_bytes`` (the handlers, held back with them, stop there), even
    where the rows' own bytes are still within the budget; nothing is lost afterwards."""
    admin.execute("CREATE TABLE w (id int PRIMARY KEY, t text); CREATE PUBLICATION pub FOR ALL TABLES")
    rows, budget, width = 2000, 1024 * 1024, 1_000

    async def main(server: OwnRedis) -> tuple[list[Any], int, int]:
        url = f"redis://127.0.0.1:{server.port}/0?stream=wh:{{table}}&timeout=1"
        async with collecting(dsn, destinations=[url], destination_window=100_000,
                              max_pending_bytes=budget, max_pending_transactions=10_000,
                              durable_slot=True, slot_name="window_held") as rec:
            app = rec.app
            assert app is not None
            await asyncio.to_thread(server.stop)

            def insert() -> None:
                with psycopg.connect(dsn, autocommit=True) as conn:
                    for i in range(rows):
                        conn.execute("INSERT INTO w VALUES (%s, repeat(md5(%s::text), %s))",
                                     (i, i, width // 32))

            await asyncio.to_thread(insert)
            await rec._until(lambda: app.destinations.retries >= 3, 60, "three failed attempts")
            await asyncio.sleep(2)  # the handlers would go on here if nothing held them
            handled, held = len(rec.events), app.pipeline.window.held
            await asyncio.to_thread(server.start)
            events = await rec.wait_for(rows, 120)
            await until_confirmed(admin, "window_held", parse_lsn(events[-1].lsn), 120)
            return events, handled, held

    with OwnRedis(tmp_path) as server:
        events, handled, held = run(main(server), timeout=300)
        stored = asyncio.run(redis_stored("wh:*", server.port))
    assert held <= budget // 4 + 4 * width, f"{held} bytes of messages held for {budget // 4}"
    assert handled < budget // 4 // width + 50, f"{handled} of {rows} handled with the broker down"
    assert sorted({i for i, _d, _x in stored}) == [e.id for e in events]


def test_jetstream_answers_are_counted_per_batch_and_an_error_answer_fails_it(
    admin: psycopg.Connection, dsn: str, unique: str,
) -> None:
    """The PubAcks of a batch come to one subscription (walex.destinations.pubacks): a batch
    is confirmed with every answer in, replays are counted as duplicates, and a message the
    stream refuses (larger than its max_msg_size) fails the batch, with the server's reason."""
    from nats.js.api import StreamConfig

    from walex.destinations import from_url
    from walex.destinations.base import Unavailable
    from walex.destinations.encoding import encode
    from walex.errors import DestinationError

    port = require("nats")
    admin.execute(SETUP)
    stream = f"WP_{unique}"

    async def main() -> None:
        import nats

        async with collecting(dsn) as rec:
            admin.execute(INSERT_KEYS)
            events = await rec.wait_for(KEYS)
        nc = await nats.connect(f"nats://127.0.0.1:{port}")
        try:
            await nc.jetstream().add_stream(StreamConfig(
                name=stream, subjects=[f"wp{unique}.>"], max_msg_size=2000))
        finally:
            await nc.close()
        destination = from_url(f"nats://127.0.0.1:{port}?stream={stream}&subject=wp{unique}.{{table}}")
        await destination.open()
        try:
            batch = encode(events)
            await destination.publish(batch)
            await destination.publish(batch[:4])
            assert destination.duplicates == 4  # type: ignore[attr-defined]
            wide = batch[0]._replace(id="wide", body=b'{"pad": "' + b"x" * 5000 + b'"}')
            with pytest.raises((Unavailable, DestinationError), match=stream):
                await destination.publish([batch[1], wide])
            await destination.publish(batch[4:])  # the connection goes on
            assert destination.duplicates == 4 + KEYS - 4  # type: ignore[attr-defined]
        finally:
            await destination.close()
        stored = await nats_stored(stream, port)
        assert [i for i, _d, _x in stored] == [e.id for e in events]

    try:
        run(main())
    finally:
        asyncio.run(nats_delete(stream, port))


def test_stop_with_the_broker_down_leaves_the_window_unacknowledged(
    admin: psycopg.Connection, dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """stop() gives the published transactions shutdown_grace to be confirmed; with the
    broker down they are cut off, unacknowledged, and a restart delivers them."""
    admin.execute(SETUP)
    slot = "window_stop"

    async def main(server: OwnRedis) -> tuple[list[Any], int]:
        url = f"redis://127.0.0.1:{server.port}/0?stream=ws:{{table}}&timeout=1"
        options: dict[str, Any] = dict(durable_slot=True, slot_name=slot, status_interval=0.2,
                                       destination_window=64, shutdown_grace=1)
        async with collecting(dsn, destinations=[url], **options) as rec:
            app = rec.app
            assert app is not None
            admin.execute(INSERT_KEYS)
            await rec._until(lambda: app.transactions_handled == 1, 60, "the rows stored")
            await asyncio.to_thread(server.stop)
            await asyncio.to_thread(write, dsn, 5)
            events = await rec.wait_for(KEYS + 5, 60)  # handled, waiting in the window
            await rec._until(lambda: app.destinations.retries >= 1, 60, "a failed attempt")
        held = confirmed(admin, slot)
        await asyncio.to_thread(server.start)
        async with collecting(dsn, destinations=[url], **options) as rec:
            again = await rec.wait_for(5, 60)
            await until_confirmed(admin, slot, parse_lsn(again[-1].lsn), 60)
        assert [e.id for e in again] == [e.id for e in events[KEYS:]]
        return events, held

    with OwnRedis(tmp_path) as server:
        events, held = run(main(server), timeout=240)
        stored = asyncio.run(redis_stored("ws:*", server.port))
    assert held < parse_lsn(events[KEYS].lsn)
    assert "cut off" in caplog.text
    check_keys(stored, 5)


def test_window_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """``destination_window`` and ``window=`` are checked when the app is made; ``window=``
    is taken out of the URL before the broker's module (or a webhook's receiver) sees it."""
    from walex import ConfigError, WalEx

    def make(url: str, **options: Any) -> Any:
        return WalEx("postgresql://u@h/db", publication="p", destinations=[url], **options)

    with pytest.raises(ConfigError, match="destination_window"):
        make("redis://127.0.0.1:6379/0?stream=s", destination_window=0)
    with pytest.raises(ConfigError, match="window must be an integer >= 1"):
        make("redis://127.0.0.1:6379/0?stream=s&window=0")
    with pytest.raises(ConfigError, match="window must be an integer >= 1, got 'many'"):
        make("nats://127.0.0.1:4222?stream=S&window=many")
    app = make("redis://127.0.0.1:6379/0?stream=s&window=8", destination_window=1)
    [destination] = app.destinations.items
    assert destination.window == 8 and app.destinations.pipelined
    app = make("redis://127.0.0.1:6379/0?stream=s", destination_window=1)
    assert not app.destinations.pipelined
    monkeypatch.setenv("WALEX_TEST_WINDOW_SECRET", "whsec_" + base64.b64encode(b"w").decode())
    app = make("https://hooks.example.com/x?secret_env=WALEX_TEST_WINDOW_SECRET&window=4&team=a")
    [hook] = app.destinations.items
    assert hook.window == 4 and hook.target.text == "https://hooks.example.com/x?team=a"


def test_a_lost_replication_connection_waits_for_the_window_before_resuming(
    admin: psycopg.Connection, dsn: str, tmp_path: Path,
) -> None:
    """The walsender is terminated mid-stream while the broker is down and the window holds
    unconfirmed transactions: walex waits for their confirmations before it reconnects
    (resuming earlier would hand the handlers those transactions again), so the handlers
    get each change once and the broker every change in order."""
    admin.execute(SETUP)
    slot, updates = "window_reconnect", 300

    async def main(server: OwnNats) -> list[Any]:
        url = f"nats://127.0.0.1:{server.port}?stream=WR&subject=wr.{{table}}&timeout=1"
        async with collecting(dsn, destinations=[url], durable_slot=True, slot_name=slot,
                              status_interval=0.2, destination_window=64) as rec:
            app = rec.app
            assert app is not None
            admin.execute(INSERT_KEYS)
            writing = asyncio.ensure_future(asyncio.to_thread(write, dsn, updates))
            await rec._until(lambda: len(rec.events) >= 100, 60, "100 changes handled")
            await asyncio.to_thread(server.stop)
            await rec._until(lambda: app.destinations.retries >= 1, 60, "a failed attempt")
            admin.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                          "WHERE slot_name = %s", (slot,))
            await asyncio.sleep(2)  # a reconnect would be done by now
            await asyncio.to_thread(server.start)
            await writing
            await rec._until(lambda: app.pipeline.sessions >= 2, 60, "a reconnect")
            events = await rec.wait_for(KEYS + updates, 120)
            await until_confirmed(admin, slot, parse_lsn(events[-1].lsn), 120)
            await asyncio.sleep(1)  # a change handed over twice would be here by now
            assert len(rec.events) == len(events)
            return events

    with OwnNats(tmp_path) as server:
        events = run(main(server), timeout=300)
        stored = asyncio.run(nats_stored("WR", server.port))
    ids = [e.id for e in events]
    assert len(set(ids)) == len(ids), "a change reached the handlers twice"
    first = check_keys(stored, updates)
    assert list(first) == ids and len(stored) == len(first)


@pytest.mark.parametrize("broker", ["nats", "redis", "rabbitmq"])
def test_relay_sigkilled_with_a_full_window_loses_nothing(
    broker: str, admin: psycopg.Connection, dsn: str, tmp_path: Path, unique: str,
) -> None:
    """``walex run`` with a window, fed one-row transactions as fast as PostgreSQL commits
    them, is SIGKILLed twice mid-stream and started again: every change is at the broker,
    in order per key, a replay with the same id and content (none in JetStream)."""
    import signal
    import threading

    from .test_crash import relay, streaming, wait

    admin.execute(SETUP)
    admin.execute(INSERT_KEYS)  # before the slot: the updates alone are relayed
    slot, updates = f"window_{unique}", 600
    if broker == "nats":
        port = require("nats")
        url = f"nats://127.0.0.1:{port}?stream=WK_{unique}&subject=wk{unique}.{{table}}"
        read: Any = lambda: nats_stored(f"WK_{unique}", port)  # noqa: E731
        cleanup: Any = lambda: nats_delete(f"WK_{unique}", port)  # noqa: E731
    elif broker == "redis":
        port = require("redis")
        url = f"redis://127.0.0.1:{port}/0?stream=wk{unique}:{{table}}"
        read = lambda: redis_stored(f"wk{unique}:*", port)  # noqa: E731
        cleanup = lambda: redis_delete(f"wk{unique}:*", port)  # noqa: E731
    else:
        port = require("rabbitmq")
        exchange, queue = f"wk{unique}", f"wk{unique}.q"
        asyncio.run(rabbitmq_queue(exchange, queue, port))
        url = f"amqp://guest:guest@127.0.0.1:{port}/?exchange={exchange}"
        read = lambda: rabbitmq_stored(queue, port)  # noqa: E731
        cleanup = lambda: rabbitmq_delete(exchange, queue, port)  # noqa: E731
    (tmp_path / "walex.toml").write_text(
        f"url = {json.dumps(dsn)}\npublication = \"pub\"\ndurable_slot = true\n"
        f"slot_name = \"{slot}\"\nstatus_interval = 0.5\ndestination_window = 128\n"
        f"destinations = [{json.dumps(url)}]\n"
    )
    log = tmp_path / "relay.log"
    proc = relay(["--config", "walex.toml"], tmp_path, {})
    try:
        wait(lambda: streaming(admin, slot), "the relay to stream", 60, log)
        done = threading.Event()

        def writer() -> None:
            with psycopg.connect(dsn, autocommit=True) as conn:
                for i in range(updates):
                    conn.execute("UPDATE k SET v = v + 1 WHERE id = %s", (i % KEYS,))
                    time.sleep(0.002)  # spread over the relays' lives, not before them
            done.set()

        def started(n: int) -> None:
            """Wait for the n-th relay to stream: each is killed mid-stream, never while it
            starts (a signal before its loop runs ends it as the default action does)."""
            wait(lambda: log.read_text().count("streaming publication") >= n,
                 f"relay {n} to stream", 60, log)

        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        for n, kill_at in enumerate((updates // 4, updates // 2), start=1):
            started(n)
            wait(lambda: admin.execute("SELECT sum(v) FROM k").fetchone()[0] >= kill_at,
                 f"{kill_at} updates", 120, log)
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            proc = relay(["--config", "walex.toml"], tmp_path, {})
        thread.join(120)
        assert done.is_set(), "the writer did not finish"
        started(3)  # it may wait for the slot the killed walsender holds (wal_sender_timeout)
        wait(lambda: len({i for i, _d, _x in asyncio.run(read())}) >= updates,
             f"{updates} changes at the broker", 180, log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-4000:]
        stored = asyncio.run(read())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        asyncio.run(cleanup())
    first: dict[str, dict[str, Any]] = {}
    values: dict[int, list[int]] = {key: [] for key in range(KEYS)}
    for message_id, doc, _extra in stored:
        if message_id in first:
            assert first[message_id] == doc, f"{message_id}: a duplicate differs from the first copy"
            continue
        first[message_id] = doc
        values[doc["data"]["new_record"]["id"]].append(doc["data"]["new_record"]["v"])
    for key, seen in values.items():
        assert seen == list(range(1, updates // KEYS + 1)), f"key {key}: values stored {seen}"
    assert list(first) == sorted(first), "first copies out of commit order"
    if broker == "nats":
        assert len(stored) == len(first), "JetStream stored a replayed message id twice"


def test_stop_with_batches_taken_together_lets_only_the_call_in_hand_finish(
    admin: psycopg.Connection, dsn: str, tmp_path: Path,
) -> None:
    """The dispatcher takes every queued transaction the window has room for at once and
    publishes them together; a stop() while the handler has the first of them in hand lets
    only that call finish: the later ones reach no handler and are not acknowledged, and a
    restart delivers them again with the same ids."""
    from walex import Event, Events, WalEx

    admin.execute(SETUP)
    slot, rows = "window_stop_taken", 12
    seen: list[tuple[int, str, str]] = []  # row, event id, event lsn

    async def main(server: OwnRedis) -> tuple[list[str], list[str], int, str]:
        url = f"redis://127.0.0.1:{server.port}/0?stream=wt:{{table}}&timeout=5"
        gates = [asyncio.Event(), asyncio.Event()]  # the first two calls wait for these
        started = [asyncio.Event(), asyncio.Event()]
        events = Events()

        @events.on_insert("other")
        async def handle(items: list[Event]) -> None:
            call = len(seen)
            seen.append((items[0].new_record["id"], items[0].id, items[0].lsn))
            if call < 2:
                started[call].set()
                await gates[call].wait()

        app = WalEx(dsn, publication="pub", subscriptions=["other"], modules=[events],
                    name="walex_window_taken", destinations=[url], durable_slot=True,
                    slot_name=slot, status_interval=0.2, destination_window=64)
        await app.start()
        try:
            admin.execute("INSERT INTO other VALUES (0)")
            await asyncio.wait_for(started[0].wait(), 30)  # the dispatcher holds row 0
            for i in range(1, rows + 1):  # queued meanwhile: taken together after it
                admin.execute("INSERT INTO other VALUES (%s)", [i])
            end = int(admin.execute("SELECT pg_current_wal_lsn() - '0/0'").fetchone()[0])
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while app.ack.received < end or app.pipeline.queue.qsize() < rows:
                assert loop.time() < deadline, "the transactions were never queued"
                await asyncio.sleep(0.01)
            gates[0].set()
            await asyncio.wait_for(started[1].wait(), 30)  # row 1 in hand, 2..12 taken with it
            # rows 1..12 taken together (row 0's entry too while Redis had not confirmed it)
            assert len(app.pipeline.window) in (rows, rows + 1)
            stopping = asyncio.ensure_future(app.stop())
            while not app.pipeline.closing:
                await asyncio.sleep(0.01)
            gates[1].set()
            await asyncio.wait_for(stopping, 30)
        finally:
            gates[0].set()
            gates[1].set()
            await app.stop()
        first = [event_id for _row, event_id, _lsn in seen]
        assert [row for row, _id, _lsn in seen] == [0, 1]
        assert app.transactions_handled == 2
        held = confirmed(admin, slot)
        seen.clear()
        gates[0].set()
        gates[1].set()
        again = WalEx(dsn, publication="pub", subscriptions=["other"], modules=[events],
                      name="walex_window_taken_again", destinations=[url], durable_slot=True,
                      slot_name=slot, destination_window=64)
        started[0].set()
        await again.start()
        try:
            deadline = asyncio.get_running_loop().time() + 30
            while len(seen) < rows - 1:
                assert asyncio.get_running_loop().time() < deadline, f"redelivered {seen}"
                await asyncio.sleep(0.01)
        finally:
            await again.stop()
        return first, [event_id for _row, event_id, _lsn in seen], held, seen[0][2]

    with OwnRedis(tmp_path) as server:
        first, again, held, row2_lsn = run(main(server), timeout=180)
        stored = asyncio.run(redis_stored("wt:*", server.port))
    assert [row for row, _id, _lsn in seen] == list(range(2, rows + 1))
    assert not set(first) & set(again)
    assert held < parse_lsn(row2_lsn), "acknowledged past the transactions given back"
    ids = [message_id for message_id, _doc, _extra in stored]
    assert sorted(set(ids)) == sorted(first + again)  # published, some maybe twice, none lost
