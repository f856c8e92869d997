"""RabbitMQ refusals: a message over the broker's size limit, a full queue, a long key.

Against the machine's RabbitMQ (127.0.0.1:5672) and a real PostgreSQL:

- a row over the broker's ``max_message_size``: the broker closes the channel
  (PRECONDITION_FAILED), every attempt alike, so it is a refusal
  (DestinationError naming the event and the fix, settled by ``on_error``),
  never published again forever; the limit is set with ``rabbitmqctl eval``
  for the test and restored in any case (it is the whole broker's);
- a queue with ``x-max-length`` and ``x-overflow reject-publish``, full: the
  broker nacks the messages; walex retries that ``full_attempts`` times (it
  passes when the consumers catch up), then it is a refusal naming the full
  queue and its fixes. Nothing is acknowledged past the refused row.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from support import collecting, run

from walex import DestinationError
from walex.lsn import parse_lsn

from .brokers import rabbitmq_delete, rabbitmq_stored, wait_count
from .conftest import require

TABLE = """
CREATE TABLE a (id int PRIMARY KEY, v text);
CREATE PUBLICATION pub FOR ALL TABLES;
"""
LIMIT = 1024 * 1024  # the broker's max_message_size during the test


def rabbitmqctl(*args: str) -> str:
    done = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done.stdout


@contextmanager
def max_message_size(limit: int) -> Iterator[None]:
    """The broker's max_message_size set to ``limit``, the setting before restored."""
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not installed: cannot set the broker's max_message_size")
    before = rabbitmqctl("eval", "application:get_env(rabbit, max_message_size).").strip()
    assert before.startswith("{ok,"), before
    rabbitmqctl("eval", f"application:set_env(rabbit, max_message_size, {limit}).")
    try:
        yield
    finally:
        value = before.removeprefix("{ok,").removesuffix("}")
        rabbitmqctl("eval", f"application:set_env(rabbit, max_message_size, {value}).")


async def queue(exchange: str, name: str, port: int, **arguments: object) -> None:
    import aio_pika

    connection = await aio_pika.connect(port=port)
    try:
        channel = await connection.channel()
        ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        q = await channel.declare_queue(name, durable=True, arguments=arguments)
        await q.bind(ex, "#")
    finally:
        await connection.close()


MESSAGES = {
    "max_message_size": "over the broker's max_message_size of 1048576 bytes",
    "full": "a queue they are routed to is full",
}


@pytest.mark.parametrize("case", list(MESSAGES))
def test_a_refusal_stops_the_app_unacknowledged(admin: psycopg.Connection, dsn: str,
                                                unique: str, case: str) -> None:
    port = require("rabbitmq")
    admin.execute(TABLE)
    exchange, name = f"rr{unique}", f"rr{unique}.q"
    url = f"amqp://guest:guest@127.0.0.1:{port}/?exchange={exchange}&timeout=5"

    async def main() -> None:
        if case == "full":  # room for the first row only, new messages refused
            await queue(exchange, name, port, **{"x-max-length": 1,
                                                  "x-overflow": "reject-publish"})
        else:
            await queue(exchange, name, port)
        size = 2 * LIMIT if case == "max_message_size" else 10
        with pytest.raises(DestinationError, match=MESSAGES[case]) as info:
            async with collecting(dsn, destinations=[url]) as rec:
                rec.app.destinations.items[0].full_attempts = 2  # type: ignore[union-attr]
                admin.execute("INSERT INTO a VALUES (0, 'fits')")
                await wait_count(lambda: rabbitmq_stored(name, port), 1)
                admin.execute("INSERT INTO a VALUES (1, repeat('x', %s))", (size,))
                await rec._until(lambda: False, 40, "the app to stop")
        app = rec.app
        assert app is not None
        event = [e for e in rec.events if e.new_record["id"] == 1][0]
        assert app.ack.flushed < parse_lsn(event.lsn)  # nothing acknowledged past it
        if case == "max_message_size":
            assert event.id in str(info.value) and "public.a" in str(info.value)
        first = [e.id for e in rec.events if e.new_record["id"] == 0]
        assert [m[0] for m in await rabbitmq_stored(name, port)] == first

    try:
        if case == "max_message_size":
            with max_message_size(LIMIT):
                run(main(), timeout=90)
        else:
            run(main(), timeout=90)
    finally:
        run(rabbitmq_delete(exchange, name, port))


def test_a_routing_key_over_255_bytes_is_a_refusal(admin: psycopg.Connection, dsn: str,
                                                   unique: str) -> None:
    """A routing key longer than AMQP's short string (a long routing_key template) is the
    same at every attempt: a refusal naming the event and the fix, not a retry forever."""
    port = require("rabbitmq")
    admin.execute(TABLE)
    exchange, name = f"rr{unique}", f"rr{unique}.q"
    template = "k" * 260 + ".{table}"
    url = (f"amqp://guest:guest@127.0.0.1:{port}/?exchange={exchange}&timeout=5"
           f"&routing_key={template}")

    async def main() -> None:
        await queue(exchange, name, port)
        with pytest.raises(DestinationError, match="over AMQP's 255: shorten the routing_key"):
            async with collecting(dsn, destinations=[url]) as rec:
                admin.execute("INSERT INTO a VALUES (1, 'x')")
                await rec._until(lambda: False, 40, "the app to stop")
        app = rec.app
        assert app is not None
        event = rec.events[0]
        assert app.ack.flushed < parse_lsn(event.lsn)
        assert await rabbitmq_stored(name, port) == []

    try:
        run(main(), timeout=90)
    finally:
        run(rabbitmq_delete(exchange, name, port))
