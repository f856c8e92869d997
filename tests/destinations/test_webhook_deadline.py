"""A webhook's ``timeout`` bounds the whole request, not each read.

An endpoint on the test's event loop answers the first request with a
``content-length`` of 10,000 and then drips the body a byte every 0.2 s
(each read gets its byte well within the timeout, the whole answer takes
half an hour); the next requests are answered at once. walex must give up
on the first within ``timeout`` and publish the batch again.
"""

from __future__ import annotations

import asyncio
import base64

import psycopg
import pytest
from support import collecting, run, until

from walex.lsn import parse_lsn

SECRET = "whsec_" + base64.b64encode(b"walex deadline secret").decode()


class DrippingEndpoint:
    def __init__(self) -> None:
        self.requests = 0
        self.dripped = 0  # body bytes sent to the first request
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self.tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> DrippingEndpoint:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.decode("latin-1").split("\r\n"):
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value.strip())
                await reader.readexactly(length)
                self.requests += 1
                if self.requests == 1:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10000\r\n\r\n")
                    for _ in range(10000):
                        writer.write(b"x")
                        await writer.drain()
                        self.dripped += 1
                        await asyncio.sleep(0.2)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def test_a_dripped_answer_is_cut_off_at_the_timeout_and_retried(
        admin: psycopg.Connection, dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WALEX_TEST_DEADLINE_SECRET", SECRET)
    admin.execute("CREATE TABLE a (id int PRIMARY KEY, v int)")
    admin.execute("CREATE PUBLICATION pub FOR ALL TABLES")

    async def main() -> None:
        async with DrippingEndpoint() as hook:
            url = (f"http://127.0.0.1:{hook.port}/hook?secret_env=WALEX_TEST_DEADLINE_SECRET"
                   "&timeout=1")
            async with collecting(dsn, destinations=[url]) as rec:
                app = rec.app
                assert app is not None
                admin.execute("INSERT INTO a VALUES (1, 1)")
                [event] = await rec.wait_for(1)
                # the dripped answer never completes in this test's time; a second request
                # comes only if walex gave the first up
                await until(lambda: hook.requests >= 2, "the request sent again", timeout=45)
                await until(lambda: app.ack.flushed > parse_lsn(event.lsn),
                            "the transaction acknowledged", timeout=45)
                assert hook.dripped >= 1  # the first answer was under way, a byte at a time
                assert app.destinations.retries >= 1

    run(main(), timeout=120)
