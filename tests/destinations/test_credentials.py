"""Misconfiguration no retry cures stops walex with a ConfigError naming the fix.

Wrong credentials (a nats-server and a redis-server this test starts with a
password; the machine's RabbitMQ with a wrong password) and a RabbitMQ vhost
that does not exist: at start the relay (``WalEx.start``, ``walex run``) and
a worker (``Worker.start``, ``walex worker``) fail at once with the redacted
URL and the fix, never reconnecting forever; during a run, a broker that
comes back with other credentials stops the app the same way.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from support import collecting, run

from walex import ConfigError, WalEx
from walex.lsn import parse_lsn
from walex.workers import Worker

from .brokers import wait_count
from .conftest import require
from .servers import OwnNats, OwnRedis

PASSWORD = "Right-pa55-9173"
WRONG = "Wr0ng-pa55-4431"
TABLE = """
CREATE TABLE a (id int PRIMARY KEY, v int);
CREATE PUBLICATION pub FOR ALL TABLES;
"""
HANDLERS = """
from walex import Events
events = Events()

@events.on_event("a")
def record(items):
    pass
"""


class AuthNats(OwnNats):
    password = PASSWORD

    def command(self) -> list[str]:
        return [*super().command(), "--user", "walex", "--pass", self.password]


class AuthRedis(OwnRedis):
    password = PASSWORD

    def command(self) -> list[str]:
        return [*super().command(), "--requirepass", self.password]


def url_of(broker: str, port: int, password: str, unique: str, vhost: str = "") -> str:
    if broker == "nats":
        return f"nats://walex:{password}@127.0.0.1:{port}?stream=WC_{unique}&subject=wc{unique}.{{table}}"
    if broker == "redis":
        return f"redis://:{password}@127.0.0.1:{port}/0?stream=wc{unique}:{{table}}"
    return f"amqp://guest:{password}@127.0.0.1:{port}/{vhost}?exchange=wc{unique}"


FIXES = {
    "nats": ("Authorization Violation", "nats://USER:PASSWORD@host:4222"),
    "redis": ("Redis refused the login", "redis://[USER]:PASSWORD@host:6379/0"),
    "amqp": ("RabbitMQ refused the login of user 'guest'", "amqp://USER:PASSWORD@host:5672/vhost"),
    "vhost": ("refused to open the vhost 'missing_", "rabbitmqctl add_vhost missing_"),
}


def bad_url(case: str, tmp_path: Path, unique: str, servers: list) -> str:
    """A URL that no retry makes work, for ``case``; starts the server it needs."""
    if case == "nats":
        server = AuthNats(tmp_path).start()
        servers.append(server)
        return url_of("nats", server.port, WRONG, unique)
    if case == "redis":
        server = AuthRedis(tmp_path).start()
        servers.append(server)
        return url_of("redis", server.port, WRONG, unique)
    port = require("rabbitmq")
    if case == "amqp":
        return url_of("amqp", port, WRONG, unique)
    return url_of("amqp", port, "guest", unique, vhost=f"missing_{unique}")


def check(message: str, case: str, url: str) -> None:
    problem, fix = FIXES[case]
    assert problem in message and fix in message, message
    assert WRONG not in message and PASSWORD not in message
    if case == "vhost":  # guest:guest: the password is also the user name
        assert "guest" not in message
    assert "***@127.0.0.1" in message  # the URL, redacted


@pytest.mark.parametrize("case", list(FIXES))
def test_relay_start_fails_with_the_fix(dsn: str, admin: psycopg.Connection, tmp_path: Path,
                                        unique: str, case: str) -> None:
    admin.execute(TABLE)
    servers: list = []
    try:
        url = bad_url(case, tmp_path, unique, servers)

        async def main() -> None:
            app = WalEx(dsn, publication="pub", destinations=[url], name=f"wc_{unique}")
            try:
                await app.start()
            except ConfigError as exc:
                check(str(exc), case, url)
            else:
                await app.stop()
                pytest.fail("the app started: it would retry the destination forever")

        run(main(), timeout=60)
    finally:
        for server in servers:
            server.stop()


@pytest.mark.parametrize("case", ["nats", "amqp", "vhost"])
def test_worker_start_fails_with_the_fix(tmp_path: Path, unique: str, case: str) -> None:
    servers: list = []
    try:
        url = bad_url(case, tmp_path, unique, servers)
        from walex import Events

        events = Events()
        events.on_event("a")(lambda items: None)

        async def main() -> None:
            worker = Worker(url, [events])
            try:
                await worker.start()
            except ConfigError as exc:
                check(str(exc), case, url)
            else:
                await worker.stop()
                pytest.fail("the worker started: it would retry the broker forever")

        run(main(), timeout=60)
    finally:
        for server in servers:
            server.stop()


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k != "PYTHONPATH" and not k.startswith("WALEX_")}
    return {**env, "COLUMNS": "300", **extra}


@pytest.mark.parametrize("command", ["run", "worker"])
def test_the_commands_exit_non_zero_with_the_fix(dsn: str, admin: psycopg.Connection,
                                                 tmp_path: Path, unique: str,
                                                 command: str) -> None:
    admin.execute(TABLE)
    server = AuthNats(tmp_path).start()
    try:
        url = url_of("nats", server.port, WRONG, unique)
        (tmp_path / "cdc_handlers.py").write_text(HANDLERS)
        if command == "run":
            args = ["run", "--destination", url]
            env = clean_env(WALEX_URL=dsn, WALEX_PUBLICATION="pub", WALEX_NAME=f"wc_{unique}")
        else:
            args = ["worker", url, "cdc_handlers:events"]
            env = clean_env()
        done = subprocess.run([sys.executable, "-m", "walex.cli", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=90, env=env)
        assert done.returncode == 1, (done.stdout, done.stderr)
        check(done.stderr, "nats", url)
        assert WRONG not in done.stdout and "Traceback" not in done.stderr
    finally:
        server.stop()


def test_nats_back_with_other_credentials_stops_the_relay(dsn: str, admin: psycopg.Connection,
                                                          tmp_path: Path, unique: str) -> None:
    """The broker restarts with another password: the app stops with the ConfigError
    instead of reconnecting forever, and acknowledges nothing it did not deliver."""
    admin.execute(TABLE)
    server = AuthNats(tmp_path)
    server.start()
    url = url_of("nats", server.port, PASSWORD, unique)

    async def main() -> None:
        from .brokers import Stored

        async def stored() -> list[Stored]:
            import nats

            nc = await nats.connect(f"nats://walex:{server.password}@127.0.0.1:{server.port}",
                                    allow_reconnect=False)
            try:
                js = nc.jetstream()
                info = await js.stream_info(f"WC_{unique}")
                return [(str(i), {}, None) for i in range(info.state.messages)]
            finally:
                await nc.close()

        with pytest.raises(ConfigError) as info:
            async with collecting(dsn, destinations=[url]) as rec:
                app = rec.app
                assert app is not None
                admin.execute("INSERT INTO a VALUES (1, 1)")
                await wait_count(stored, 1)
                server.stop()
                server.password = "Changed-pa55-2202"
                server.start()
                admin.execute("INSERT INTO a VALUES (2, 2)")
                await rec._until(lambda: False, 60, "the app to stop")
        check(str(info.value), "nats", url)
        second = [e for e in rec.events if e.new_record["id"] == 2][0]
        assert rec.app is not None and rec.app.ack.flushed < parse_lsn(second.lsn)

    try:
        run(main(), timeout=120)
    finally:
        server.stop()


def test_redis_with_a_changed_password_stops_the_relay(dsn: str, admin: psycopg.Connection,
                                                       tmp_path: Path, unique: str) -> None:
    admin.execute(TABLE)
    server = AuthRedis(tmp_path)
    server.start()
    url = url_of("redis", server.port, PASSWORD, unique)

    async def main() -> None:
        import redis.asyncio as aioredis

        with pytest.raises(ConfigError) as info:
            async with collecting(dsn, destinations=[url]) as rec:
                app = rec.app
                assert app is not None
                admin.execute("INSERT INTO a VALUES (1, 1)")
                [first] = await rec.wait_for(1)
                await rec._until(lambda: app.ack.flushed > parse_lsn(first.lsn), 30,
                                 "the first acknowledged")
                client = aioredis.Redis(port=server.port, password=PASSWORD)
                try:  # what a restart with another password does to walex
                    await client.config_set("requirepass", "Changed-pa55-2202")
                    await client.execute_command("CLIENT", "KILL", "TYPE", "normal")
                finally:
                    await client.aclose()
                admin.execute("INSERT INTO a VALUES (2, 2)")
                await rec._until(lambda: False, 60, "the app to stop")
        check(str(info.value), "redis", url)
        second = [e for e in rec.events if e.new_record["id"] == 2][0]
        assert rec.app is not None and rec.app.ack.flushed < parse_lsn(second.lsn)

    try:
        run(main(), timeout=120)
    finally:
        server.stop()


def test_a_worker_stops_when_nats_comes_back_with_other_credentials(tmp_path: Path,
                                                                     unique: str) -> None:
    from walex import Events

    server = AuthNats(tmp_path)
    server.start()
    url = url_of("nats", server.port, PASSWORD, unique)
    events = Events()
    events.on_event("a")(lambda items: None)

    async def main() -> None:
        import asyncio

        from support import until

        from walex.workers import declare

        await declare(url)  # a worker does not create its stream
        worker = Worker(url, [events])
        await worker.start()
        try:
            await until(lambda: worker.connected, "the worker consuming", timeout=30)
            server.stop()
            server.password = "Changed-pa55-2202"
            server.start()
            with pytest.raises(ConfigError) as info:
                await asyncio.wait_for(worker.wait(), 60)
            check(str(info.value), "nats", url)
        finally:
            await worker.stop()

    try:
        run(main(), timeout=120)
    finally:
        server.stop()


def test_a_redis_user_without_xadd_stops_the_relay(dsn: str, admin: psycopg.Connection,
                                                   tmp_path: Path, unique: str) -> None:
    """An ACL user that may connect (PING) but not publish: a ConfigError, not an outage."""
    admin.execute(TABLE)
    server = OwnRedis(tmp_path)
    server.start()
    url = f"redis://reader:{PASSWORD}@127.0.0.1:{server.port}/0?stream=wc{unique}:{{table}}"

    async def main() -> None:
        import redis.asyncio as aioredis

        client = aioredis.Redis(port=server.port)
        try:
            await client.execute_command("ACL", "SETUSER", "reader", "on", f">{PASSWORD}",
                                         "+ping", "+client", "~*")
        finally:
            await client.aclose()
        with pytest.raises(ConfigError) as info:
            async with collecting(dsn, destinations=[url]) as rec:
                admin.execute("INSERT INTO a VALUES (1, 1)")
                await rec._until(lambda: False, 60, "the app to stop")
        message = str(info.value)
        assert "Redis refused a command to the URL's user" in message, message
        assert "ACL SETUSER USER +xadd ~KEYS" in message and PASSWORD not in message
        [event] = rec.events
        assert rec.app is not None and rec.app.ack.flushed < parse_lsn(event.lsn)

    try:
        run(main(), timeout=120)
    finally:
        server.stop()
