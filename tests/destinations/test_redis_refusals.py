"""What Redis refuses at every attempt is not retried forever: out of memory, a maxlen.

Against a redis-server this test starts (with ``maxmemory``) and a real
PostgreSQL: once Redis holds more than its ``maxmemory``, every ``XADD`` is
refused (OOM). walex publishes the batch again ``full_attempts`` times (it
passes when memory is freed), then it is a refusal naming the fixes, settled by
``on_error`` (``"stop"``): nothing acknowledged past the refused row.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from support import collecting, run

from walex import DestinationError
from walex.lsn import parse_lsn

from .brokers import wait_count
from .conftest import require
from .servers import OwnRedis

TABLE = """
CREATE TABLE a (id int PRIMARY KEY, v text);
CREATE PUBLICATION pub FOR ALL TABLES;
"""


class NoEviction(OwnRedis):
    def command(self) -> list[str]:
        return [*super().command(), "--maxmemory-policy", "noeviction"]


def test_out_of_memory_becomes_a_refusal_naming_the_fix(admin: psycopg.Connection, dsn: str,
                                                        tmp_path: Path, unique: str) -> None:
    admin.execute(TABLE)
    server = NoEviction(tmp_path)
    server.start()
    stream = f"wm{unique}"
    url = f"redis://127.0.0.1:{server.port}/0?stream={stream}&timeout=5"

    async def main() -> None:
        import redis.asyncio as aioredis

        client = aioredis.Redis(port=server.port)

        async def stored() -> list[tuple[str, dict, str]]:
            entries = await client.xrange(stream)
            return [(fields[b"id"].decode(), {}, entry) for entry, fields in entries]

        try:
            with pytest.raises(DestinationError, match="for want of memory") as info:
                async with collecting(dsn, destinations=[url]) as rec:
                    rec.app.destinations.items[0].full_attempts = 2  # type: ignore[union-attr]
                    admin.execute("INSERT INTO a VALUES (0, 'fits')")
                    await wait_count(stored, 1)
                    # Redis now holds more than its maxmemory: it refuses every write
                    await client.set("filler", b"x" * (4 * 1024 * 1024))
                    await client.config_set("maxmemory", "1mb")
                    admin.execute("INSERT INTO a VALUES (1, 'refused')")
                    await rec._until(lambda: False, 40, "the app to stop")
            assert "maxmemory" in str(info.value) and "maxlen=N" in str(info.value)
            app = rec.app
            assert app is not None
            event = [e for e in rec.events if e.new_record["id"] == 1][0]
            assert app.ack.flushed < parse_lsn(event.lsn)  # nothing acknowledged past it
            assert len(await stored()) == 1
        finally:
            await client.aclose()

    try:
        run(main(), timeout=90)
    finally:
        server.stop()


def test_a_maxlen_redis_cannot_take_is_a_config_error(unique: str) -> None:
    """A maxlen over a signed 64-bit integer made Redis refuse every XADD ("value is not
    an integer or out of range"), retried for ever: it is a ConfigError when the app is
    made; the largest one Redis takes trims as asked."""
    import redis

    from walex import ConfigError
    from walex.destinations import from_url
    from walex.destinations.base import Outgoing

    port = require("redis")
    stream = f"wm{unique}"
    url = f"redis://127.0.0.1:{port}/0?stream={stream}&timeout=5&maxlen="
    with pytest.raises(ConfigError, match="maxlen must be at most 9223372036854775807"):
        from_url(url + str(2**63))
    item = Outgoing("1", "public", "a", "insert", 0, b"{}", "/db/public/a", "t", "public.a", None)

    async def main() -> None:
        d = from_url(url + str(2**63 - 1))
        await d.open()
        try:
            await d.publish([item])
        finally:
            await d.close()

    client = redis.Redis(port=port)
    try:
        run(main(), timeout=30)
        assert client.xlen(stream) == 1
    finally:
        client.delete(stream)
        client.close()


class Restarted(OwnRedis):
    """A redis-server that, once started again, is over its ``maxmemory`` at once."""

    full = False

    def command(self) -> list[str]:
        extra = ["--maxmemory", "1", "--maxmemory-policy", "noeviction"] if self.full else []
        return [*super().command(), *extra]


def test_a_refusal_after_an_outage_is_retried_as_many_times(
        admin: psycopg.Connection, dsn: str, tmp_path: Path, unique: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """The attempts a full refusal gets are counted in a row: an outage's attempts before
    it (Redis stopped, then back out of memory) do not make the first OOM final."""
    import logging
    import time

    admin.execute(TABLE)
    server = Restarted(tmp_path)
    server.start()
    stream = f"wo{unique}"
    url = f"redis://127.0.0.1:{server.port}/0?stream={stream}&timeout=2"
    caplog.set_level(logging.WARNING, logger="walex.destinations")

    def oom_retries() -> int:
        return sum("for want of memory" in r.getMessage() and "again in" in r.getMessage()
                   for r in caplog.records)

    async def main() -> None:
        with pytest.raises(DestinationError, match="for want of memory") as info:
            async with collecting(dsn, destinations=[url]) as rec:
                app = rec.app
                assert app is not None
                fanout = app.destinations
                fanout.items[0].full_attempts = 3  # type: ignore[union-attr]
                server.stop()
                admin.execute("INSERT INTO a VALUES (1, 'after the outage')")
                await rec._until(lambda: fanout.retries >= 4, 30, "the outage's retries")
                assert oom_retries() == 0
                server.full = True
                server.start()
                deadline = time.monotonic() + 40
                await rec._until(lambda: time.monotonic() > deadline, 45, "the app to stop")
        assert "3 attempts in a row" in str(info.value)
        assert oom_retries() == 2  # on main: 0, the first OOM was final

    try:
        run(main(), timeout=120)
    finally:
        server.stop()
