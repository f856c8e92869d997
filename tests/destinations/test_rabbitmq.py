"""RabbitMQ destination, against the machine's broker (127.0.0.1:5672, guest/guest)."""

from __future__ import annotations

import asyncio
import logging

import psycopg
import pytest
from support import collecting, run

from walex import ConfigError, WalEx
from walex.destinations import from_url
from walex.lsn import parse_lsn

from .brokers import check_stream, rabbitmq_delete, rabbitmq_queue, rabbitmq_stored, wait_count
from .conftest import require
from .test_nats import TABLES, workload


def test_rows_arrive_once_in_order_persistent(admin: psycopg.Connection, dsn: str,
                                              unique: str) -> None:
    port = require("rabbitmq")
    admin.execute(TABLES)
    exchange, queue = f"wt{unique}", f"wt{unique}.all"
    url = f"amqp://guest:guest@127.0.0.1:{port}/?exchange={exchange}"

    async def main() -> None:
        await rabbitmq_queue(exchange, queue, port)
        try:
            async with collecting(dsn, destinations=[url], batch_size=7) as rec:
                n = workload(admin)
                events = await rec.wait_for(n)
                stored = await wait_count(lambda: rabbitmq_stored(queue, port), n)
            check_stream(stored, [e.id for e in events])
            keys = [key for _id, _doc, (key, _mode, _ctype) in stored]
            assert keys[0] == "public.a.insert" and keys[-1] == "public.b_c.truncate"
            assert {(mode, ctype) for _i, _d, (_k, mode, ctype) in stored} == {
                (2, "application/cloudevents+json")}  # persistent
        finally:
            await rabbitmq_delete(exchange, queue, port)

    run(main())


def test_unroutable_events_wait_for_a_queue(admin: psycopg.Connection, dsn: str, unique: str,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """No queue bound: the broker returns the message; walex retries, acknowledges nothing,
    and delivers once a queue is bound."""
    port = require("rabbitmq")
    admin.execute(TABLES)
    exchange, queue = f"wt{unique}", f"wt{unique}.late"
    url = f"amqp://guest:guest@127.0.0.1:{port}/?exchange={exchange}&routing_key={{table}}"

    async def main() -> None:
        try:
            async with collecting(dsn, destinations=[url]) as rec:
                app = rec.app
                assert app is not None
                admin.execute("INSERT INTO a VALUES (1, 1)")
                [event] = await rec.wait_for(1)
                await rec._until(lambda: app.destinations.retries >= 2, 30, "two retries")
                assert app.transactions_handled == 0
                assert app.ack.flushed < parse_lsn(event.lsn)
                await rabbitmq_queue(exchange, queue, port)
                await rec._until(lambda: app.transactions_handled == 1, 30, "the publish")
                stored = await rabbitmq_stored(queue, port)
                check_stream(stored[:1], [event.id])  # (a retry before the binding may add one)
                assert {i for i, _d, _x in stored} == {event.id}
        finally:
            await rabbitmq_delete(exchange, queue, port)

    with caplog.at_level(logging.WARNING, logger="walex.destinations"):
        run(main())
    assert "returned event" in caplog.text and "as unroutable" in caplog.text
    # the userinfo is never shown (the password here is also the user name)
    assert f"amqp://***@127.0.0.1:{port}/?exchange={exchange}" in caplog.text
    assert "guest" not in caplog.text


def test_bad_urls() -> None:
    with pytest.raises(ConfigError, match="exchange_type must be one of"):
        WalEx("postgresql://u@h/db", publication="p", destinations=["amqp://h?exchange_type=x"])
    with pytest.raises(ConfigError, match="mandatory must be true or false"):
        WalEx("postgresql://u@h/db", publication="p", destinations=["amqp://h?mandatory=maybe"])
    assert from_url("amqp://u:p4ss@h/%2F").vhost == "/"  # type: ignore[attr-defined]
    assert from_url("amqp://u:p4ss@h/prod").vhost == "prod"  # type: ignore[attr-defined]
    assert "p4ss" not in repr(from_url("amqp://u:p4ss@h/prod"))
