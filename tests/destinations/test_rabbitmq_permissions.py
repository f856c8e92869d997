"""A RabbitMQ user the broker refuses (ACCESS_REFUSED) is never retried forever.

On the machine's RabbitMQ (127.0.0.1:5672), each test makes a user of its own
with ``rabbitmqctl`` (add_user, set_permissions; deleted afterwards):

- a relay user without configure permission on an exchange that does not
  exist: ``start()`` fails with a ConfigError naming user, vhost, exchange and
  the ``rabbitmqctl set_permissions`` line, the password nowhere;
- a relay user without configure but with write on an exchange that exists:
  it publishes (the exchange is used as it is);
- a relay user without write: the publish is a permanent refusal
  (DestinationError, settled by ``on_error``), never retried, nothing
  acknowledged past it;
- a worker user that may not read its group's queues: ``Worker.start()``
  fails with a ConfigError naming the queue and the fix.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from support import collecting, run

from walex import ConfigError, DestinationError, Event, Events, WalEx
from walex.lsn import parse_lsn
from walex.workers import Worker, declare

from .brokers import check_stream, rabbitmq_delete, rabbitmq_queue, rabbitmq_stored, wait_count
from .conftest import require

PASSWORD = "Perm-pa55-6610"
TABLE = """
CREATE TABLE a (id int PRIMARY KEY, v int);
CREATE PUBLICATION pub FOR ALL TABLES;
"""


def rabbitmqctl(*args: str) -> None:
    done = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (args, done.stdout, done.stderr)


@contextmanager
def user(unique: str, configure: str, write: str, read: str) -> Iterator[str]:
    """A RabbitMQ user with these permissions on vhost '/'; its name."""
    if shutil.which("rabbitmqctl") is None:
        message = "rabbitmqctl is not installed: cannot make a user with restricted permissions"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    name = f"wp_{unique}"
    rabbitmqctl("add_user", name, PASSWORD)
    try:
        rabbitmqctl("set_permissions", "-p", "/", name, configure, write, read)
        yield name
    finally:
        rabbitmqctl("delete_user", name)


def url_of(name: str, port: int, exchange: str, extra: str = "") -> str:
    return f"amqp://{name}:{PASSWORD}@127.0.0.1:{port}/?exchange={exchange}&timeout=5{extra}"


def test_a_user_that_may_not_declare_a_missing_exchange_fails_at_start(
        admin: psycopg.Connection, dsn: str, unique: str) -> None:
    port = require("rabbitmq")
    admin.execute(TABLE)
    exchange = f"wp{unique}"

    async def main() -> None:
        with user(unique, "^$", ".*", ".*") as name:
            app = WalEx(dsn, publication="pub", destinations=[url_of(name, port, exchange)],
                        name=f"wp_{unique}")
            with pytest.raises(ConfigError) as info:
                await app.start()
            message = str(info.value)
            assert f"RabbitMQ user {name!r} may not declare the exchange {exchange!r}" in message
            assert "ACCESS_REFUSED" in message and "vhost '/'" in message
            assert (f"rabbitmqctl set_permissions -p / {name} '^({exchange})$' "
                    f"'^({exchange})$' ''") in message, message
            assert PASSWORD not in message and "***@127.0.0.1" in message

    run(main(), timeout=90)


def test_a_user_with_write_only_publishes_to_an_exchange_that_exists(
        admin: psycopg.Connection, dsn: str, unique: str) -> None:
    port = require("rabbitmq")
    admin.execute(TABLE)
    exchange, queue = f"wp{unique}", f"wp{unique}.all"

    async def main() -> None:
        await rabbitmq_queue(exchange, queue, port)  # declared by guest beforehand
        try:
            with user(unique, "^$", f"^{exchange}$", "^$") as name:
                async with collecting(dsn, destinations=[url_of(name, port, exchange)]) as rec:
                    admin.execute("INSERT INTO a VALUES (1, 1)")
                    [event] = await rec.wait_for(1)
                    stored = await wait_count(lambda: rabbitmq_stored(queue, port), 1)
                check_stream(stored, [event.id])
        finally:
            await rabbitmq_delete(exchange, queue, port)

    run(main(), timeout=90)


def test_a_publish_refused_for_want_of_write_follows_on_error(
        admin: psycopg.Connection, dsn: str, unique: str) -> None:
    port = require("rabbitmq")
    admin.execute(TABLE)
    exchange, queue = f"wp{unique}", f"wp{unique}.all"

    def check(message: str, name: str) -> None:
        assert (f"RabbitMQ refused user {name!r} to publish to the exchange {exchange!r} in "
                "vhost '/'") in message, message
        assert "ACCESS_REFUSED" in message
        assert f"rabbitmqctl set_permissions -p / {name} '^$' '^({exchange})$' ''" in message
        assert PASSWORD not in message

    async def main() -> None:
        await rabbitmq_queue(exchange, queue, port)
        try:
            with user(unique, f"^{exchange}$", "^$", "^$") as name:
                url = url_of(name, port, exchange)
                # on_error="stop" (the default): the app stops, nothing acknowledged
                with pytest.raises(DestinationError) as info:
                    async with collecting(dsn, destinations=[url]) as rec:
                        admin.execute("INSERT INTO a VALUES (1, 1)")
                        await rec._until(lambda: False, 60, "the app to stop")
                check(str(info.value), name)
                app = rec.app
                assert app is not None and app.destinations.retries == 0  # never retried
                [event] = rec.events
                assert app.ack.flushed < parse_lsn(event.lsn)
                # a dead-letter callable settles each refusal, and the stream goes on (a
                # temporary slot: the new app starts after the first row)
                dead: list[tuple[list[str], BaseException]] = []

                def dead_letter(events: list[Event], exc: BaseException) -> None:
                    dead.append(([e.id for e in events], exc))

                async with collecting(dsn, destinations=[url], on_error=dead_letter) as rec:
                    app = rec.app
                    assert app is not None
                    admin.execute("INSERT INTO a VALUES (2, 2)")
                    admin.execute("INSERT INTO a VALUES (3, 3)")
                    await rec._until(lambda: len(dead) >= 2, 60, "both refusals settled")
                    assert app.destinations.retries == 0
                assert [ids for ids, _exc in dead] == [[e.id] for e in rec.events]
                check(str(dead[0][1]), name)
            assert await rabbitmq_stored(queue, port) == []
        finally:
            await rabbitmq_delete(exchange, queue, port)

    run(main(), timeout=120)


def test_a_worker_that_may_not_read_its_queues_fails_at_start(unique: str) -> None:
    port = require("rabbitmq")
    exchange, group = f"wp{unique}", "g"
    queue = f"{exchange}.{group}.0"
    events = Events()
    events.on_event("a")(lambda items: None)

    async def main() -> None:
        await declare(f"amqp://guest:guest@127.0.0.1:{port}/?exchange={exchange}&group={group}")
        try:
            # configure and write on everything; read on the exchange only
            with user(unique, ".*", ".*", f"^{exchange}$") as name:
                worker = Worker(url_of(name, port, exchange, f"&group={group}"), [events])
                with pytest.raises(ConfigError) as info:
                    await worker.start()
                message = str(info.value)
                assert (f"RabbitMQ user {name!r} was refused access to queue {queue!r} of group "
                        f"'g' (exchange {exchange!r}) in vhost '/'") in message, message
                assert "ACCESS_REFUSED" in message
                q = f"^{exchange}\\.g\\."
                assert (f"rabbitmqctl set_permissions -p / {name} '{q}' '{q}' "
                        f"'{q}|^({exchange})$'") in message, message
                assert PASSWORD not in message
        finally:
            await rabbitmq_delete(exchange, queue, port)

    run(main(), timeout=90)
