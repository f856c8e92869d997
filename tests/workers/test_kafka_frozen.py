"""A Kafka broker that stops answering without closing a connection (a frozen host, a
network that drops everything), seen from a worker.

librdkafka notices a request without an answer only after ``socket.timeout.ms``
(60 s unless set); the worker's probe then took ``timeout`` more. A worker's
network calls keep walex's ``timeout`` as the other sources do: with
``timeout=2`` the worker says it lost the brokers within seconds, and consumes
again once they answer.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import psycopg
from destinations.kafka_support import GROUP, create_topic
from destinations.servers import OwnTansu
from support import collecting, run

from walex import Event, Events
from walex.workers import Worker

sys.path.insert(0, str(Path(__file__).parents[1] / "chaos"))
from proxy import Proxy  # noqa: E402

TABLE = "CREATE TABLE item (id int PRIMARY KEY, seq int); CREATE PUBLICATION pub FOR ALL TABLES"


class ProxiedTansu(OwnTansu):
    """tansu telling clients to connect to ``advertised`` (the proxy's port)."""

    def __init__(self, folder: Path, advertised: int) -> None:
        super().__init__(folder)
        self.advertised = advertised

    def command(self) -> list[str]:
        command = super().command()
        command[command.index("--advertised-listener-url") + 1] = \
            f"tcp://127.0.0.1:{self.advertised}"
        return command


def test_a_frozen_broker_is_noticed_within_the_timeout(
    admin: psycopg.Connection, dsn: str, tmp_path: Path,
) -> None:
    admin.execute(TABLE)
    proxy = Proxy("127.0.0.1", 0).start()
    try:
        with ProxiedTansu(tmp_path, proxy.port) as broker:
            proxy.target = ("127.0.0.1", broker.port)
            create_topic(broker.port, "wz.item", 1)
            direct = f"kafka://127.0.0.1:{broker.port}?topic=wz.{{table}}"
            source = f"kafka://127.0.0.1:{proxy.port}?topic=wz.{{table}}&timeout=2&{GROUP}"
            got: list[Event] = []
            events = Events()
            events.on_event("item")(got.extend)

            async def until(check: object, what: str, timeout: float = 30) -> float:
                loop = asyncio.get_running_loop()
                start = loop.time()
                while not check():  # type: ignore[operator]
                    assert loop.time() < start + timeout, what
                    await asyncio.sleep(0.05)
                return loop.time() - start

            async def main() -> None:
                async with collecting(dsn, destinations=[direct]), \
                        Worker(f"{source}&group=frozen", [events]) as worker:
                    admin.execute("INSERT INTO item VALUES (1, 0)")
                    await until(lambda: len(got) == 1, "the first row")
                    proxy.pause()  # every byte held: no error, no answer
                    noticed = await until(lambda: not worker.connected,
                                          "the worker never noticed the frozen broker", 25)
                    assert noticed < 12, noticed  # timeout=2: a request, then the probe
                    proxy.resume()
                    admin.execute("INSERT INTO item VALUES (2, 0)")
                    await until(lambda: any(e.record["id"] == 2 for e in got), "the row after", 40)
                    assert worker.connected

            run(main(), timeout=90)
    finally:
        proxy.stop()
