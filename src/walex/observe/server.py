"""A minimal HTTP/1.1 server on the event loop: ``/metrics``, ``/healthz``, ``/livez``.

GET (or HEAD) only; one request per connection; a request that does not
arrive whole within :data:`READ_TIMEOUT` seconds is dropped, one with a line
over :data:`LINE_LIMIT` bytes is answered 400, and a client that does not
take its answer within :data:`ANSWER_TIMEOUT` seconds is cut off (so a slow
or hostile client never holds a connection, nor its answer's memory, for
long; each connection is served on its own, so it never delays the others).
At most :data:`MAX_CLIENTS` connections are served at once: a new one
beyond cuts the oldest, so clients holding connections open cannot take the
process' file descriptors (its PostgreSQL connections need some) nor lock
out a health check. Stopping the server cuts the connections still served.
``/readyz`` is ``/healthz``.
Served from the event loop that streams (or, for a worker, consumes), so an
answer shows that loop is responsive, and every figure is read between two
steps of the pipeline. What it serves comes from its owner, an app's
:class:`~walex.observe.Observer` or a worker's
(:mod:`walex.observe.workers`): a Prometheus registry, and the health and
liveness answers as ``(status, body)``, the body prefixed with ``identity``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError

__all__ = ["HttpServer"]

log = logging.getLogger("walex")

READ_TIMEOUT = 5.0  # seconds a client has to send its request line and headers
ANSWER_TIMEOUT = 10.0  # seconds it has to take the answer (Prometheus' default scrape_timeout)
LINE_LIMIT = 16384  # bytes of a request line or header line
MAX_CLIENTS = 32  # connections served at once; a new one beyond cuts the oldest

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            503: "Service Unavailable"}


Answer = Callable[[], tuple[int, dict[str, Any]]]


class HttpServer:
    def __init__(self, identity: dict[str, Any], registry: Any, health: Answer,
                 liveness: Answer) -> None:
        self.identity = identity  # {"app": name}, {"worker": name, "group": group}
        self.registry = registry  # prometheus_client's CollectorRegistry
        self.health = health
        self.liveness = liveness
        self.server: asyncio.Server | None = None
        # connections being served, oldest first
        self.clients: dict[asyncio.StreamWriter, None] = {}

    async def start(self, host: str, port: int) -> int:
        try:
            self.server = await asyncio.start_server(self._serve, host, port, limit=LINE_LIMIT)
        except socket.gaierror as exc:  # before OSError: it is one
            raise ConfigError(
                f"metrics_host {host!r}: cannot resolve it ({exc.strerror}); give an address "
                "of this machine, e.g. 0.0.0.0 or 127.0.0.1"
            ) from None
        except OSError as exc:
            raise ConfigError(
                f"metrics_port {port}: cannot listen on {host}:{port} ({exc.strerror}); "
                "choose a free port"
            ) from None
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for client in list(self.clients):  # stopped: nothing more is answered
                client.transport.abort()
            try:
                await asyncio.wait_for(self.server.wait_closed(), 2)
            except TimeoutError:  # pragma: no cover - a client holding its connection
                pass
            self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cut = True  # dropped without an answer, or the answer not taken in time
        if len(self.clients) >= MAX_CLIENTS:  # many held open (slowloris): cut the oldest
            oldest = next(iter(self.clients))
            del self.clients[oldest]
            oldest.transport.abort()
        self.clients[writer] = None
        try:
            try:
                async with asyncio.timeout(READ_TIMEOUT):
                    request = await reader.readline()
                    while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                        pass  # headers: not needed
            except ValueError:  # a line over LINE_LIMIT (StreamReader's LimitOverrunError)
                method, answer = "GET", (400, "text/plain",
                                         f"request line or header over {LINE_LIMIT} bytes\n".encode())
            else:
                method, _, rest = request.decode("latin-1").partition(" ")
                path = rest.split(" ", 1)[0].split("?", 1)[0]
                answer = self._answer(method, path)
            status, ctype, body = answer
            head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
            async with asyncio.timeout(ANSWER_TIMEOUT):
                writer.write(head.encode() + (body if method != "HEAD" else b""))
                await writer.drain()
                if status == 400:  # the rest of its request unread: take it, or the answer is lost
                    writer.write_eof()
                    while await reader.read(LINE_LIMIT):
                        pass
            cut = False
        except (TimeoutError, ConnectionError):
            pass
        except Exception:  # never let a request end the app
            log.exception("walex: the metrics endpoint failed to answer a request")
        finally:
            self.clients.pop(writer, None)
            if cut:
                writer.transport.abort()  # close() would wait for the client to take the rest
            else:
                writer.close()

    def _answer(self, method: str, path: str) -> tuple[int, str, bytes]:
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"GET only\n"
        if path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        answer: tuple[int, dict[str, Any]] | None = None
        if path in ("/healthz", "/readyz"):
            answer = self.health()
        elif path == "/livez":
            answer = self.liveness()
        if answer is None:
            return 404, "text/plain", b"/metrics, /healthz, /readyz or /livez\n"
        status, data = answer
        data = {**self.identity, **data}
        return status, "application/json", json.dumps(data).encode() + b"\n"
