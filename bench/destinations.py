"""Levels ``walex+NAME``: the walex level publishing every event to a destination too.

``bench/run.py --destination NAME=URL`` (repeatable) adds the level
``walex+NAME``: the same consumer, with ``destinations=[URL]``. Every run gets
targets of its own (a stream, an exchange and queue, keys), made before and
removed after it, so no run finds another's messages (or their ids inside a
NATS duplicate window). ``URL`` may be one of these shortcuts for the
machine's brokers:

- ``nats``: ``nats://127.0.0.1:4222?stream=<run>&subject=<run>.{schema}.{table}``
- ``redis``: ``redis://127.0.0.1:6379/0?stream=<run>:{schema}.{table}``
- ``rabbitmq``: ``amqp://guest:guest@127.0.0.1:5672/?exchange=<run>``, with a
  durable queue ``<run>`` bound to it (publisher confirms then mean "on disk")
- ``webhook``: a local HTTP endpoint the runner starts, answering 204

A full URL is used as given; ``RUN`` in it is replaced by the run's name.

Each ``--destination NAME`` also adds the level ``NAME_ceiling``
(``consumers/ceiling_consumer.py``): the same payloads (walex's CloudEvents of
the same WAL, same ids and targets) published by the broker's official
client alone, as fast as it can, with the same durability; its wall time is
the publishing time only. The table reads each ``walex+NAME`` against it.
"""

from __future__ import annotations

import asyncio
import base64
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SHORTCUTS = {
    "nats": "nats://127.0.0.1:4222?stream=RUN&subject=RUN.{schema}.{table}",
    "redis": "redis://127.0.0.1:6379/0?stream=RUN:{schema}.{table}",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672/?exchange=RUN",
    "webhook": "http://127.0.0.1:PORT/RUN?secret_env=BENCH_WEBHOOK_SECRET",
}
URLS: dict[str, str] = {}  # level -> URL (with RUN)
CEILINGS: dict[str, str] = {}  # walex+NAME -> NAME_ceiling


def parse(specs: list[str]) -> list[str]:
    """Register ``NAME=URL`` specs; returns the levels they add."""
    levels = []
    for spec in specs:
        name, _, url = spec.partition("=")
        url = SHORTCUTS.get(url or name, url)
        if not url:
            raise SystemExit(f"--destination {spec!r}: give NAME=URL or one of {', '.join(SHORTCUTS)}")
        URLS[f"walex+{name}"] = url
        URLS[f"{name}_ceiling"] = url
        CEILINGS[f"walex+{name}"] = f"{name}_ceiling"
        levels += [f"walex+{name}", f"{name}_ceiling"]
    return levels


class _Receiver(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real endpoint

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(204)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


_server: ThreadingHTTPServer | None = None


def _webhook_port() -> int:
    global _server
    if _server is None:
        os.environ.setdefault("BENCH_WEBHOOK_SECRET", "whsec_" + base64.b64encode(b"bench").decode())
        _server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
        threading.Thread(target=_server.serve_forever, daemon=True).start()
    return int(_server.server_address[1])


def url_for(level: str, run: str) -> str:
    url = URLS[level].replace("RUN", run)
    if "PORT" in url:
        url = url.replace("PORT", str(_webhook_port()))
    return url


def prepare(level: str, run: str) -> None:
    url = url_for(level, run)
    if url.startswith("amqp"):
        asyncio.run(_rabbitmq(run, create=True))


def cleanup(level: str, run: str) -> None:
    url = url_for(level, run)
    try:
        if url.startswith("nats"):
            asyncio.run(_nats_delete(run))
        elif url.startswith("redis"):
            asyncio.run(_redis_delete(run))
        elif url.startswith("amqp"):
            asyncio.run(_rabbitmq(run, create=False))
    except Exception as exc:  # a bench run does not fail on cleanup
        print(f"   cleanup of {run} failed: {exc!r}")


async def _nats_delete(run: str) -> None:
    import nats

    nc = await nats.connect("nats://127.0.0.1:4222", allow_reconnect=False)
    try:
        await nc.jetstream().delete_stream(run)
    finally:
        await nc.close()


async def _redis_delete(run: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis()
    try:
        keys = await client.keys(f"{run}:*")
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def _rabbitmq(run: str, create: bool) -> None:
    import aio_pika

    connection = await aio_pika.connect("amqp://guest:guest@127.0.0.1:5672/")
    try:
        channel = await connection.channel()
        if create:
            exchange = await channel.declare_exchange(run, aio_pika.ExchangeType.TOPIC, durable=True)
            queue = await channel.declare_queue(run, durable=True)
            await queue.bind(exchange, "#")
        else:
            await channel.queue_delete(run)
            await channel.exchange_delete(run)
    finally:
        await connection.close()
