"""The metrics endpoint against slow or hostile HTTP clients, on a real app and server."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import urllib.request

import psycopg
import pytest

from support import collecting, run
from walex.observe import families, server


def exchange(port: int, request: bytes, *, rcvbuf: int | None = None, idle: float = 0) -> bytes:
    """Send ``request`` on a fresh connection, wait ``idle`` seconds unread, then read to the end."""
    with socket.socket() as sock:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(30)
        sock.connect(("127.0.0.1", port))
        sock.sendall(request)
        time.sleep(idle)
        received = bytearray()
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        return bytes(received)


def healthz(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=5) as response:
        return int(response.status)


def test_an_oversized_request_line_or_header_is_answered_400_without_a_traceback(
    dsn: str, admin: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    admin.execute("CREATE TABLE item (id int PRIMARY KEY)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE item")
    caplog.set_level(logging.INFO, logger="walex")

    async def main() -> None:
        async with collecting(dsn, metrics_port=0) as rec:
            port = rec.app.observer.port
            huge = b"a" * 200_000
            for request in (b"GET /healthz?token=" + huge + b" HTTP/1.1\r\n\r\n",
                            b"GET /healthz HTTP/1.1\r\nX-Junk: " + huge + b"\r\n\r\n"):
                answer = await asyncio.to_thread(exchange, port, request)
                assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer[:200]
                assert b"over 16384 bytes" in answer
            assert await asyncio.to_thread(healthz, port) == 200  # still serving

    run(main(), timeout=60)
    failed = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not failed, [r.getMessage() for r in failed]


def test_a_client_that_does_not_read_its_answer_is_cut_off(
    dsn: str, admin: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scraper that stops reading a big /metrics (thousands of tables) must not hold its
    connection and the buffered answer forever: it is cut off after ANSWER_TIMEOUT."""
    admin.execute("CREATE TABLE item (id int PRIMARY KEY)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE item")
    monkeypatch.setattr(server, "ANSWER_TIMEOUT", 1.0, raising=False)
    # every table its own series (1000 by default), so that /metrics is big
    monkeypatch.setattr(families, "MAX_TABLES", 100_000)

    async def main() -> None:
        async with collecting(dsn, metrics_port=0) as rec:
            app = rec.app
            port = app.observer.port
            # what 60 000 tables' events would count: /metrics of several megabytes
            for i in range(60_000):
                app.pipeline.stats.events[("public", f"table_with_a_long_name_{i:06}", "INSERT")] = i
            stuck = asyncio.create_task(asyncio.to_thread(
                exchange, port, b"GET /metrics HTTP/1.1\r\n\r\n", rcvbuf=4096, idle=4))
            await asyncio.sleep(1)
            assert await asyncio.to_thread(healthz, port) == 200  # others are served meanwhile
            received = await stuck
            head, _, body = received.partition(b"\r\n\r\n")
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            assert length > 8_000_000
            assert len(body) < length, "the stalled client kept its connection to the end"

    run(main(), timeout=60)


def test_stopping_the_app_cuts_the_connections_still_being_served(
    dsn: str, admin: psycopg.Connection
) -> None:
    """A client that has not finished its request (slowloris) is cut off when the app stops,
    not left connected to a stopped app until its read deadline."""
    admin.execute("CREATE TABLE item (id int PRIMARY KEY)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE item")

    def closed_after(sock: socket.socket) -> float:
        sock.settimeout(30)
        try:
            while sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
        return time.monotonic()

    async def main() -> None:
        with socket.socket() as sock:
            async with collecting(dsn, metrics_port=0) as rec:
                port = rec.app.observer.port
                sock.connect(("127.0.0.1", port))
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
                await asyncio.sleep(0.3)
                watching = asyncio.create_task(asyncio.to_thread(closed_after, sock))
            stopped = time.monotonic()  # the app's stop() has returned
            closed = await watching
            assert closed < stopped + 0.5, f"left connected {closed - stopped:.1f}s after stop()"

    run(main(), timeout=60)


def test_a_metrics_host_that_does_not_resolve_is_named(dsn: str, admin: psycopg.Connection) -> None:
    admin.execute("CREATE PUBLICATION pub FOR ALL TABLES")
    from walex import WalEx
    from walex.errors import ConfigError

    app = WalEx(dsn, publication="pub", name="badhost", metrics_port=0,
                metrics_host="no-such-host.invalid")

    async def main() -> None:
        with pytest.raises(ConfigError) as raised:
            await app.start()
        message = str(raised.value)
        assert message.startswith("metrics_host 'no-such-host.invalid': cannot resolve it"), message
        assert "metrics_port" not in message and "free port" not in message, message
        assert app.observer.server is None  # nothing left started

    run(main(), timeout=60)


def test_many_connections_held_open_neither_pile_up_nor_lock_out_healthz(
    dsn: str, admin: psycopg.Connection
) -> None:
    """Hundreds of half-sent requests (slowloris) must not each hold a file descriptor of the
    app until their read deadline: beyond a bound the oldest are cut, and /healthz answers."""
    admin.execute("CREATE TABLE item (id int PRIMARY KEY)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE item")

    def still_open(sock: socket.socket) -> bool:
        sock.setblocking(False)
        try:
            return sock.recv(1) != b""
        except BlockingIOError:
            return True
        except ConnectionResetError:
            return False

    async def main() -> None:
        async with collecting(dsn, metrics_port=0) as rec:
            port = rec.app.observer.port
            def hold() -> socket.socket:
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # never finished
                return sock

            held = await asyncio.to_thread(lambda: [hold() for _ in range(300)])
            try:
                assert await asyncio.to_thread(healthz, port) == 200
                await asyncio.sleep(0.5)
                open_ = sum(still_open(sock) for sock in held)
                assert open_ <= 40, f"{open_} of 300 half-sent requests still held by the app"
            finally:
                for sock in held:
                    sock.close()

    run(main(), timeout=60)
