"""A destination unreachable for a while: nothing is lost, nothing is acknowledged early.

For each broker the test makes the broker unreachable itself: it kills a
``nats-server`` or ``redis-server`` it started on a free port (restarted on
the same port and data), partitions the TCP proxy of the fault suite in front
of RabbitMQ, or shuts the webhook endpoint down. Meanwhile transactions
commit; the handlers get them, but the slot's ``confirmed_flush_lsn`` stays
below them. Once the broker is back every event is there, in order, and
duplicates (a batch stored but not confirmed before the cut) carry the id of
the first copy.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from support import collecting, run

from walex.lsn import parse_lsn

from .brokers import (
    Stored, check_stream, nats_stored, rabbitmq_delete, rabbitmq_queue, rabbitmq_stored,
    redis_stored,
)
from .conftest import require
from .receiver import Receiver
from .servers import OwnNats, OwnRedis

sys.path.insert(0, str(Path(__file__).parents[1] / "chaos"))
from proxy import Proxy  # noqa: E402

SECRET = "whsec_" + base64.b64encode(b"outage").decode()


@dataclass
class Outage:
    url: str
    down: Callable[[], None]
    up: Callable[[], None]
    read: Callable[[], Awaitable[list[Stored]]]
    deduplicates: bool  # the broker drops a replayed message id itself


@contextmanager
def outage(broker: str, tmp: Path, unique: str) -> Iterator[Outage]:
    if broker == "nats":
        with OwnNats(tmp) as server:
            yield Outage(f"nats://127.0.0.1:{server.port}?stream=WT&subject=wt.{{table}}&timeout=1",
                         server.stop, server.start, lambda: nats_stored("WT", server.port), True)
    elif broker == "redis":
        with OwnRedis(tmp) as server:
            yield Outage(f"redis://127.0.0.1:{server.port}/0?stream=wt:{{table}}&timeout=1",
                         server.stop, server.start, lambda: redis_stored("wt:*", server.port), False)
    elif broker == "rabbitmq":
        port = require("rabbitmq")
        proxy = Proxy("127.0.0.1", port).start()
        exchange, queue = f"wt{unique}", f"wt{unique}.q"
        asyncio.run(rabbitmq_queue(exchange, queue, port))
        try:
            yield Outage(f"amqp://guest:guest@127.0.0.1:{proxy.port}/?exchange={exchange}&timeout=1",
                         proxy.partition, proxy.heal, lambda: rabbitmq_stored(queue, port), False)
        finally:
            proxy.stop()
            asyncio.run(rabbitmq_delete(exchange, queue, port))
    else:
        hooks = [Receiver().__enter__()]
        port = hooks[0].port

        def down() -> None:
            hooks[-1].__exit__()

        def up() -> None:
            hooks.append(Receiver(port).__enter__())

        async def read() -> list[Stored]:
            out = []
            for hook in hooks:
                for _path, headers, body, _status in hook.accepted():
                    out.extend((e["id"], e, headers["webhook-id"]) for e in json.loads(body))
            return out

        try:
            yield Outage(hooks[0].url(query="secret_env=WALEX_TEST_OUTAGE_SECRET&timeout=1"),
                         down, up, read, False)
        finally:
            hooks[-1].__exit__()


def confirmed(admin: psycopg.Connection, slot: str) -> int:
    row = admin.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots "
                        "WHERE slot_name = %s", (slot,)).fetchone()
    return parse_lsn(row[0]) if row and row[0] else 0


@pytest.mark.parametrize("window", [1, 64])  # 64: pipelined (walex.destinations.window)
@pytest.mark.parametrize("broker", ["nats", "redis", "rabbitmq", "webhook"])
def test_broker_down_loses_nothing_and_acknowledges_nothing_early(
    broker: str, window: int, admin: psycopg.Connection, dsn: str, tmp_path: Path, unique: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WALEX_TEST_OUTAGE_SECRET", SECRET)
    admin.execute("CREATE TABLE a (id int PRIMARY KEY, v int); CREATE PUBLICATION pub FOR ALL TABLES")
    slot = f"outage_{unique}"

    async def main(out: Outage) -> tuple[list[Any], list[Stored]]:
        async with collecting(dsn, destinations=[out.url], durable_slot=True, slot_name=slot,
                              status_interval=0.5, destination_window=window) as rec:
            app = rec.app
            assert app is not None
            admin.execute("INSERT INTO a VALUES (1, 1), (2, 1), (3, 1)")
            await rec._until(lambda: app.transactions_handled == 1, 30, "the first transaction")
            await asyncio.to_thread(out.down)
            admin.execute("INSERT INTO a VALUES (4, 2), (5, 2)")
            admin.execute("UPDATE a SET v = 3 WHERE id = 1")
            # the handlers have the first transaction cut off (with a window, all of them:
            # handlers run ahead of the confirmations, acknowledgement does not)
            cut = (await rec.wait_for(5 if window == 1 else 6))[3]
            await rec._until(lambda: app.destinations.retries >= 2, 60, "two failed attempts")
            await asyncio.sleep(2)  # four status intervals
            assert app.transactions_handled == 1
            assert app.ack.flushed < parse_lsn(cut.lsn)
            assert confirmed(admin, slot) < parse_lsn(cut.lsn), "acknowledged before the broker had it"
            await asyncio.to_thread(out.up)
            await rec._until(lambda: app.transactions_handled == 3, 90, "the broker to be back")
            events = await rec.wait_for(6)
            deadline = asyncio.get_running_loop().time() + 10
            while confirmed(admin, slot) < parse_lsn(events[-1].lsn):
                assert asyncio.get_running_loop().time() < deadline, "never acknowledged"
                await asyncio.sleep(0.1)
        return events, await out.read()

    with outage(broker, tmp_path, unique) as out:
        events, stored = run(main(out), timeout=240)
    ids = [e.id for e in events]
    first: dict[str, Any] = {}
    for message_id, doc, _extra in stored:
        if message_id in first:
            assert not out.deduplicates, f"{broker} stored {message_id} twice"
            assert first[message_id][1] == doc, "a duplicate differs from the first copy"
        else:
            first[message_id] = (message_id, doc, _extra)
    check_stream(list(first.values()), ids)
