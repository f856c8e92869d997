"""A Worker in the test's process, fed by a relay app in the same process.

What the worker's handlers receive is compared with what the relay's own
handlers received from PostgreSQL; the error policy, the acknowledgement
after the handler, dropped replays, a slow handler on JetStream and the
setups that cannot keep the order are checked against the real brokers.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest
from destinations.brokers import nats_delete
from destinations.conftest import require
from support import collecting, run, until
from test_types import same

from walex import Event, Events, EventType, Source, WalEx
from walex.destinations import Destinations
from walex.destinations.encoding import encode_event
from walex.errors import ConfigError, HandlerError
from walex.workers import Worker

TABLE = """
    CREATE TABLE item (id int PRIMARY KEY, seq int, price numeric, at timestamptz, doc jsonb,
                       raw bytea, note text);
    ALTER TABLE item REPLICA IDENTITY FULL;
    CREATE TABLE other (id int PRIMARY KEY);
    CREATE PUBLICATION pub FOR ALL TABLES;
"""


class Broker:
    """The URLs of one broker for one test, and the cleanup of what they created."""

    def __init__(self, kind: str, unique: str) -> None:
        self.kind = kind
        self.unique = unique
        self.port = require(kind)
        if kind == "nats":
            self.url = (f"nats://127.0.0.1:{self.port}?stream=WK_{unique}"
                        f"&subject=wk{unique}.{{schema}}.{{table}}.{{partition}}")
        else:
            self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/?exchange=wk{unique}"

    def source(self, partitions: int = 2, **params: Any) -> str:
        extra = "".join(f"&{k}={v}" for k, v in params.items())
        return f"{self.url}&partitions={partitions}{extra}"

    async def publish_raw(self, body: bytes, partitions: int = 1) -> None:
        """A message put on partition 0's subject or routing key, not by walex."""
        if self.kind == "nats":
            import nats

            nc = await nats.connect(f"nats://127.0.0.1:{self.port}")
            try:
                await nc.jetstream().publish(f"wk{self.unique}.public.item.0", body)
            finally:
                await nc.close()
            return
        import aio_pika

        connection = await aio_pika.connect(port=self.port)
        try:
            channel = await connection.channel()
            exchange = await channel.get_exchange(f"wk{self.unique}")
            key = "public.item.insert" + (".0" if partitions > 1 else "")
            await exchange.publish(aio_pika.Message(body, delivery_mode=2), routing_key=key)
        finally:
            await connection.close()

    async def cleanup(self) -> None:
        if self.kind == "nats":
            await nats_delete(f"WK_{self.unique}", self.port)
            return
        import aio_pika

        connection = await aio_pika.connect(port=self.port)
        try:
            channel = await connection.channel()
            for group in ("walex", "other"):
                for p in range(4):
                    await channel.queue_delete(f"wk{self.unique}.{group}.{p}")
            await channel.exchange_delete(f"wk{self.unique}")
        finally:
            await connection.close()


@pytest.fixture(params=["nats", "rabbitmq"])
def broker(request: pytest.FixtureRequest, unique: str) -> Any:
    b = Broker(request.param, unique)
    yield b
    asyncio.run(b.cleanup())


class Calls:
    """A handler module whose handlers record the lists they receive."""

    def __init__(self) -> None:
        self.events = Events()
        self.calls: list[tuple[str, list[Event]]] = []
        self.lock = threading.Lock()

    def handler(self, label: str, fail: Callable[[list[Event]], bool] | None = None,
                sync: bool = False) -> Callable[[list[Event]], Any]:
        def record(batch: list[Event]) -> None:
            if fail is not None and fail(batch):
                raise RuntimeError(f"{label} refuses {[e.id for e in batch]}")
            with self.lock:
                self.calls.append((label, list(batch)))

        if sync:
            return record

        async def record_async(batch: list[Event]) -> None:
            record(batch)

        return record_async

    def of(self, label: str) -> list[list[Event]]:
        with self.lock:
            return [batch for name, batch in self.calls if name == label]

    def flat(self, label: str) -> list[Event]:
        return [e for batch in self.of(label) for e in batch]


_SOURCE = Source(db="d", schema="public", table="item", columns={"id": "int4", "seq": "int4"},
                 primary_key=("id",))


def made_up(i: int, seq: int = 0, pk: int | None = None) -> Event:
    """A change of row ``pk`` (default ``i``) as a relay publishes it; ids increase with ``i``."""
    return Event("item", EventType.INSERT if seq == 0 else EventType.UPDATE, _SOURCE,
                 {"id": i if pk is None else pk, "seq": seq}, None, None,
                 dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc), "0/10", f"{16 + i:016X}-00000000")


async def relay(broker: Broker, batches: list[list[Event]], partitions: int = 2) -> None:
    """Publish like a relay does: each batch through the destination, confirmed."""
    destinations = Destinations([broker.url], partitions)
    await destinations.open()
    try:
        for batch in batches:
            await destinations.publish(batch)
    finally:
        await destinations.close()


@asynccontextmanager
async def worker_running(worker: Worker) -> AsyncIterator[Worker]:
    """Declare the worker's group (and stream or exchange), then run the worker."""
    await worker.consumer.declare()
    await worker.start()
    try:
        yield worker
    finally:
        await asyncio.wait_for(worker.stop(), 30)


def test_worker_handlers_receive_the_in_process_events(
    broker: Broker, admin: psycopg.Connection, dsn: str,
) -> None:
    """Same events, same filters, same values; each call one transaction, in order per row."""
    admin.execute(TABLE)
    calls = Calls()
    calls.events.on_event("item")(calls.handler("item"))
    calls.events.on_update("item", unwatched_fields=["note"])(calls.handler("updates", sync=True))
    calls.events.on_insert("item", where=lambda e: e.new_record["seq"] == 0)(calls.handler("where"))
    calls.events.on_event("other")(calls.handler("other"))

    async def main() -> list[Event]:
        async with collecting(dsn, destinations=[broker.url], partitions=2) as rec:
            worker = Worker(broker.source(), [calls.events])
            async with worker_running(worker):
                admin.execute("""
                    INSERT INTO item SELECT g, 0, g * 1.25, '2024-02-29 12:00+05', '{"g": 1}',
                                            '\\x00ff', 'n' FROM generate_series(1, 6) g;
                    INSERT INTO other VALUES (1), (2);
                """)
                with admin.transaction():
                    admin.execute("UPDATE item SET seq = seq + 1, price = price * 2")
                    admin.execute("UPDATE item SET note = 'only the note' WHERE id <= 3")
                admin.execute("DELETE FROM item WHERE id = 6")
                admin.execute("TRUNCATE other")
                expected = await rec.wait_for(6 + 2 + 6 + 3 + 1 + 1, timeout=30)
                await until(lambda: len(calls.flat("item")) >= 16, "the worker's item events", 30)
                await until(lambda: len(calls.flat("other")) >= 3, "the worker's other events", 30)
                await asyncio.sleep(0.3)  # nothing more may come
                assert worker.events_handled == 6 + 2 + 6 + 3 + 1 + 1
        return expected

    expected = run(main(), timeout=120)
    by_id = {e.id: e for e in expected}
    got = calls.flat("item")
    assert sorted(e.id for e in got) == sorted(e.id for e in expected if e.name == "item")
    for event in got + calls.flat("other"):
        theirs = by_id[event.id]
        assert (event.name, event.type, event.lsn, event.timestamp, event.source) == \
            (theirs.name, theirs.type, theirs.lsn, theirs.timestamp, theirs.source)
        for part in ("new_record", "old_record"):
            mine, other = getattr(event, part), getattr(theirs, part)
            assert (mine is None) == (other is None)
            if mine is not None:
                assert all(same(mine[k], other[k]) for k in other) and list(mine) == list(other)
        assert event.changes == theirs.changes
    # the same filters as in-process: updates that changed only the note are dropped
    assert sorted(e.id for e in calls.flat("updates")) == sorted(
        e.id for e in expected if e.type == "update" and set(e.changes or {}) != {"note"})
    assert len(calls.flat("where")) == 6
    # each call: events of one transaction; per row, in commit order
    for batch in calls.of("item"):
        assert len({e.id.split("-")[0] for e in batch}) == 1
        assert [e.id for e in batch] == sorted(e.id for e in batch)
    per_row: dict[int, list[str]] = {}
    for event in got:
        if event.type != "truncate":
            per_row.setdefault(event.record["id"], []).append(event.id)  # type: ignore[index]
    assert all(ids == sorted(ids) for ids in per_row.values())
    [truncate] = [e for e in calls.flat("other") if e.type == "truncate"]
    assert truncate.new_record is None and truncate.source.table == "other"


def test_failing_handler_stops_the_worker_and_another_gets_the_message(broker: Broker) -> None:
    """Under on_error="stop" nothing is acknowledged: the next worker receives the change."""
    bad, good = Calls(), Calls()
    bad.events.on_event("item")(bad.handler("item", fail=lambda batch: True))
    good.events.on_event("item")(good.handler("item"))
    event = made_up(1)

    async def main() -> None:
        failing = Worker(broker.source(), [bad.events], max_retries=1, retry_backoff=0.01)
        await failing.consumer.declare()
        await failing.start()
        await relay(broker, [[event]])
        with pytest.raises(HandlerError, match="refuses"):
            await asyncio.wait_for(failing.wait(), 30)
        assert not bad.calls
        async with worker_running(Worker(broker.source(), [good.events])):
            await until(lambda: bool(good.calls), "the second worker's call", 30)
        assert [e.id for e in good.flat("item")] == [event.id]

    run(main(), timeout=120)


def test_skip_and_dead_letter_acknowledge(broker: Broker) -> None:
    """A failure disposed of by the policy is acknowledged: the group does not see it again."""
    calls = Calls()
    calls.events.on_event("item")(calls.handler(
        "item", fail=lambda batch: any(e.record["id"] == 13 for e in batch)))  # type: ignore[index]
    dead: list[tuple[list[str], str]] = []

    def dead_letter(events: list[Event], exc: BaseException) -> None:
        dead.append(([e.id for e in events], str(exc)))

    async def main() -> None:
        worker = Worker(broker.source(partitions=1), [calls.events], on_error=dead_letter,
                        max_retries=0)
        async with worker_running(worker):
            await relay(broker, [[made_up(i)] for i in (12, 13, 14)], partitions=1)
            await until(lambda: len(calls.flat("item")) == 2 and len(dead) == 1,
                        "two handled and one dead-lettered", 30)
        again = Calls()
        again.events.on_event("item")(again.handler("item"))
        async with worker_running(Worker(broker.source(partitions=1), [again.events])):
            await relay(broker, [[made_up(15)]], partitions=1)
            await until(lambda: bool(again.calls), "the next change", 30)
            await asyncio.sleep(0.5)
        assert [e.record["id"] for e in again.flat("item")] == [15]  # type: ignore[index]

    run(main(), timeout=120)
    assert [e.record["id"] for e in calls.flat("item")] == [12, 14]  # type: ignore[index]
    assert dead[0][0] == [made_up(13).id] and "refuses" in dead[0][1]


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_message_that_is_not_a_walex_event(broker: Broker, policy: str) -> None:
    calls = Calls()
    calls.events.on_event("item")(calls.handler("item"))
    event = made_up(1)

    async def main() -> None:
        worker = Worker(broker.source(partitions=1), [calls.events], on_error=policy)
        async with worker_running(worker):
            await broker.publish_raw(b"{not json")
            await broker.publish_raw(encode_event(event).body)
            if policy == "stop":
                with pytest.raises(HandlerError, match="is not a walex CloudEvent"):
                    await asyncio.wait_for(worker.wait(), 30)
                assert not calls.calls
            else:
                await until(lambda: bool(calls.calls), "the next message", 30)
                assert [e.id for e in calls.flat("item")] == [event.id]
                assert worker.dispatcher.failures == 1

    run(main(), timeout=60)


def test_a_replay_is_dropped_by_id(unique: str) -> None:
    """A relay that publishes a batch again after a crash: the worker handles it once."""
    b = Broker("rabbitmq", unique)
    calls = Calls()
    calls.events.on_event("item")(calls.handler("item"))
    events = [made_up(i) for i in range(3)]

    async def main() -> None:
        worker = Worker(b.source(partitions=1), [calls.events])
        async with worker_running(worker):
            for event in events[:2] + events[:2] + events[2:]:  # the first two again
                await b.publish_raw(encode_event(event).body)
            await until(lambda: worker.duplicates == 2 and len(calls.flat("item")) == 3,
                        "three handled, two dropped", 30)
        assert [e.id for e in calls.flat("item")] == [e.id for e in events]

    try:
        run(main(), timeout=60)
    finally:
        asyncio.run(b.cleanup())


def test_slow_handler_keeps_its_jetstream_message(unique: str) -> None:
    """A call longer than ack_wait: progress reports keep the message from going out again."""
    b = Broker("nats", unique)
    calls = Calls()

    async def slow(batch: list[Event]) -> None:
        await asyncio.sleep(3)
        calls.calls.append(("item", batch))

    calls.events.on_event("item")(slow)
    other = Calls()
    other.events.on_event("item")(other.handler("item"))

    async def main() -> Worker:
        first = Worker(b.source(partitions=1, ack_wait=1), [calls.events])
        second = Worker(b.source(partitions=1, ack_wait=1), [other.events])
        async with worker_running(first):
            await relay(b, [[made_up(1)]], partitions=1)
            await asyncio.sleep(0.5)  # the first worker has the message
            async with worker_running(second):
                await until(lambda: bool(calls.calls), "the slow call", 30)
                await asyncio.sleep(1.5)
        return first

    try:
        first = run(main(), timeout=60)
    finally:
        asyncio.run(b.cleanup())
    assert not other.calls and first.redeliveries == 0


def test_setups_that_cannot_keep_the_order(broker: Broker) -> None:
    calls = Calls()
    calls.events.on_event("item")(calls.handler("item"))

    async def main() -> None:
        # a consumer or queue of the group already set up otherwise
        if broker.kind == "nats":
            import nats
            from nats.js.api import ConsumerConfig

            nc = await nats.connect(f"nats://127.0.0.1:{broker.port}")
            js = nc.jetstream()
            await js.add_stream(name=f"WK_{broker.unique}", subjects=[f"wk{broker.unique}.>"])
            await js.add_consumer(f"WK_{broker.unique}", ConsumerConfig(
                durable_name="walex_0", filter_subject=f"wk{broker.unique}.*.*.0", max_ack_pending=10))
            await nc.close()
            expected = r"consumer 'walex_0' .* max_ack_pending=10.*nats consumer rm"
        else:
            import aio_pika

            connection = await aio_pika.connect(port=broker.port)
            channel = await connection.channel()
            await channel.declare_exchange(f"wk{broker.unique}", aio_pika.ExchangeType.TOPIC,
                                           durable=True)
            for p in range(2):
                await channel.declare_queue(f"wk{broker.unique}.walex.{p}", durable=True)
            await connection.close()
            expected = r"queue 'wk\w+\.walex\.\d' exists with other settings.*x-single-active-consumer"
        worker = Worker(broker.source(), [calls.events])
        with pytest.raises(ConfigError, match=expected):
            await worker.start()
        await worker.stop()

    run(main(), timeout=60)


def test_bad_sources_are_config_errors() -> None:
    events = Events()
    events.on_event("t")(lambda batch: None)
    cases = {
        "redis://:pw@127.0.0.1:6379/0?stream=walex:{table}": "Redis Streams is supported as a "
                                                               "destination only.*per-row order",
        "https://hooks.example.com/x": "a webhook is a destination only",
        "mqtt://k:1883": "unknown scheme 'mqtt'",
        "nats://u:pw@h:4222?stream=S&partitions=3&subject=walex.{table}":
            r"partitions=3 the subject template 'walex.\{table\}' must contain \{partition\}",
        "nats://h?stream=S&partitions=2&subject=w.{table}-{partition}": "mixes {partition}",
        "nats://h?stream=S&group=a.b": "group 'a.b' may use",
        "amqp://h?exchange=&partitions=2": "need a named exchange",
        "amqp://h?exchange=x&exchange_type=fanout": "needs a topic exchange",
        "amqp://h?exchange=x&prefetch=0": "prefetch must be an integer >= 1",
        "nats://h?stream=S&ack_wait=x": "ack_wait must be a number",
        "nats://h?stream=S&bogus=1": "unknown parameter bogus; known: partitions, group, ack_wait",
    }
    for url, message in cases.items():
        with pytest.raises(ConfigError, match=message) as caught:
            Worker(url, [events])
        assert "pw" not in str(caught.value)
    with pytest.raises(ConfigError, match="has no handler"):
        Worker("nats://h?stream=S", [Events()])
    with pytest.raises(ConfigError, match="on_error must be"):
        Worker("nats://h?stream=S", [events], on_error="ignore")
    with pytest.raises(ConfigError, match="concurrency must be an integer >= 1"):
        Worker("nats://h?stream=S", [events], concurrency=0)


def test_for_app_takes_the_apps_handlers_and_policy() -> None:
    events = Events()
    events.on_event("t")(lambda batch: None)

    def dead_letter(batch: list[Event], exc: BaseException) -> None:
        return None

    app = WalEx("postgresql://u@h/db", publication="p", modules=[events], name="billing",
                on_error=dead_letter, max_retries=7)
    worker = Worker.for_app("amqp://h?exchange=x&partitions=4", app, concurrency=2)
    assert worker.modules == [events] and worker.name == "billing"
    assert worker.dispatcher.on_error is dead_letter and worker.dispatcher.max_retries == 7
    assert worker.concurrency == 2 and worker.consumer.partitions == 4
    assert worker.consumer.queues == [f"x.walex.{p}" for p in range(4)]  # type: ignore[attr-defined]
    assert worker.consumer.bindings[3] == "*.*.*.3"  # type: ignore[attr-defined]


def test_broker_cut_off_and_back(broker: Broker) -> None:
    """The worker's connection goes silent, then is reset: it reconnects and loses nothing."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "chaos"))
    from proxy import Proxy

    calls = Calls()
    calls.events.on_event("item")(calls.handler("item"))
    proxy = Proxy("127.0.0.1", broker.port).start()
    source = broker.source(ack_wait=2) if broker.kind == "nats" else broker.source()
    source = source.replace(f":{broker.port}", f":{proxy.port}")
    rows = range(1, 7)

    async def main() -> Worker:
        worker = Worker(source, [calls.events])
        async with worker_running(worker):
            await relay(broker, [[made_up(pk, 0)] for pk in rows])
            await until(lambda: len(calls.flat("item")) >= 6, "the first changes", 30)
            proxy.partition()
            await relay(broker, [[made_up(seq * 10 + pk, seq, pk) for pk in rows]
                                 for seq in (1, 2, 3)])
            await asyncio.sleep(1.5)
            proxy.heal()  # the silent connections are reset
            await until(lambda: len({e.id for e in calls.flat("item")}) >= 24,
                        "every change after the cut", 60)
        return worker

    try:
        worker = run(main(), timeout=120)
    finally:
        proxy.stop()
    assert worker.reconnects >= 1
    first: dict[str, Event] = {}
    for event in calls.flat("item"):
        first.setdefault(event.id, event)
    per_row: dict[int, list[int]] = {}
    for event in first.values():
        per_row.setdefault(event.record["id"], []).append(event.record["seq"])  # type: ignore[index]
    assert per_row == {i: [0, 1, 2, 3] for i in rows}


def test_relay_defaults_carry_the_partition() -> None:
    """With partitions > 1 the relay's default subject and routing key end in {partition},
    so a worker given the same URL consumes each partition apart."""
    from walex.destinations import from_url

    nats_url, amqp_url = "nats://h?stream=S", "amqp://h?exchange=x"
    assert from_url(nats_url, 1).subject.text == "walex.{schema}.{table}"  # type: ignore[attr-defined]
    assert from_url(nats_url, 4).subject.text == "walex.{schema}.{table}.{partition}"  # type: ignore[attr-defined]
    assert from_url(amqp_url, 4).routing_key.text == "{schema}.{table}.{type}.{partition}"  # type: ignore[attr-defined]
    events = Events()
    events.on_event("t")(lambda batch: None)
    worker = Worker(f"{nats_url}&partitions=4", [events])
    assert worker.consumer.filters == [f"walex.*.*.{p}" for p in range(4)]  # type: ignore[attr-defined]
    # one partition: every message, in the stream's order, whatever the relay's partitions
    assert Worker(nats_url, [events]).consumer.filters == ["walex.*.*"]  # type: ignore[attr-defined]
    worker = Worker("nats://h?stream=S&subject=cdc.{partition}.{table}", [events])
    assert worker.consumer.filters == ["cdc.*.*"]  # type: ignore[attr-defined]


def test_cli_worker_targets_and_errors(tmp_path: Any) -> None:
    """``walex worker URL target``: an app, an Events or a module; a bad source exits 1."""
    import subprocess
    import sys

    from walex.cli_worker import build_worker

    (tmp_path / "cdc_app.py").write_text(
        "from walex import Events, WalEx\n"
        "events = Events()\n"
        "events.on_event('item')(lambda batch: None)\n"
        "more = Events()\n"
        "more.on_insert('other')(lambda batch: None)\n"
        "app = WalEx('postgresql://u@h/db', publication='p', modules=[events], name='cdc',\n"
        "            on_error='skip', max_retries=1)\n"
        "not_handlers = 42\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        url = "amqp://h?exchange=x&partitions=2"
        from_app = build_worker(url, "cdc_app:app", {"concurrency": 2})
        assert from_app.name == "cdc" and from_app.dispatcher.on_error == "skip"
        assert from_app.dispatcher.max_retries == 1 and from_app.concurrency == 2
        assert len(build_worker(url, "cdc_app:events", {}).modules) == 1
        assert len(build_worker(url, "cdc_app", {}).modules) == 2
        with pytest.raises(ConfigError, match="is not a walex.WalEx app, a walex.Events"):
            build_worker(url, "cdc_app:not_handlers", {})
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("cdc_app", None)
    script = [sys.executable, "-m", "walex.cli", "worker", "redis://:s3cret@h:6379/0?stream=x",
              "cdc_app:app"]
    done = subprocess.run(script, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "Redis Streams is supported as a destination only" in done.stderr
    assert "s3cret" not in done.stderr + done.stdout and "Traceback" not in done.stderr
    script = [sys.executable, "-m", "walex.cli", "worker", "amqp://u:s3cret@h/?exchange=x"]
    done = subprocess.run(script, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "needs the handlers" in done.stderr and "--declare" in done.stderr
    # --declare with a broker that is not there: a clear error, the password kept out
    script = [sys.executable, "-m", "walex.cli", "worker", "--declare",
              "amqp://u:s3cret@127.0.0.1:1/?exchange=x&timeout=2"]
    done = subprocess.run(script, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "cannot declare on" in done.stderr, done.stderr
    assert "s3cret" not in done.stderr + done.stdout and "Traceback" not in done.stderr


def test_partitions_must_be_the_relays(unique: str) -> None:
    """A worker told 2 partitions, fed by a relay with 4: it stops and says so, acknowledging
    nothing, rather than leave partitions 2 and 3 to nobody."""
    b = Broker("nats", unique)
    calls = Calls()
    calls.events.on_event("item")(calls.handler("item"))

    async def main() -> None:
        worker = Worker(b.source(partitions=2), [calls.events])
        async with worker_running(worker):
            await relay(b, [[made_up(pk) for pk in range(1, 9)]], partitions=4)
            with pytest.raises(ConfigError, match=r"published with partitions=4, and this worker "
                                                  r"has partitions=2.*&partitions=4"):
                await asyncio.wait_for(worker.wait(), 30)
        assert not calls.calls
        right = Worker(b.source(partitions=4), [calls.events])
        async with worker_running(right):
            await until(lambda: len(calls.flat("item")) == 8, "every change", 30)

    try:
        run(main(), timeout=60)
    finally:
        asyncio.run(b.cleanup())


def test_a_running_worker_holds_the_gc_threshold(unique: str) -> None:
    """While a worker runs, the cyclic GC's generation-0 threshold is at least its
    ``gc_threshold`` (as an app's while it streams, walex.gcpolicy), seen from its handler;
    the thresholds come back when it stops; ``gc_threshold=0`` leaves them alone."""
    import gc

    b = Broker("nats", unique)
    before = gc.get_threshold()
    young = before[0] + 54_321
    seen: list[tuple[int, int, int]] = []

    async def note(batch: list[Event]) -> None:
        seen.append(gc.get_threshold())

    events = Events()
    events.on_event("item")(note)

    async def main() -> None:
        await relay(b, [[made_up(0)], [made_up(1)]], partitions=1)
        async with worker_running(Worker(b.source(partitions=1), [events],
                                         gc_threshold=young)):
            await until(lambda: len(seen) >= 1, "the first event handled", 30)
        assert gc.get_threshold() == before
        async with worker_running(Worker(b.source(partitions=1, group="other"), [events],
                                         gc_threshold=0)):
            await until(lambda: len(seen) >= 3, "the events handled again", 30)

    try:
        run(main(), timeout=90)
    finally:
        asyncio.run(b.cleanup())
    assert seen[0] == (young, *before[1:])
    assert seen[-1] == before and gc.get_threshold() == before
