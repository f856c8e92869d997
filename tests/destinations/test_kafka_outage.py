"""Kafka: the network to the broker lost mid-publish, records waiting in the producer.

tansu advertises a port of a TCP relay of the test's (:class:`Cuttable`), so every
connection of the producer goes through it; cutting it closes them and refuses new
ones, as a broker unreachable for a while. The producer's queue holds 4 records, so
a publish's later records enter it only once earlier ones left it.

librdkafka drops a queued record whose ``message.timeout.ms`` passed and sends the
records behind it once the broker is back: the partition then holds a later record
without the earlier one, and the batch published again puts the earlier one after
it (the first copy of each id out of order). walex leaves no such timeout to the
client (``message.timeout.ms=0``): its own ``timeout`` fails the publish, closes
the producer (what it held dropped) and publishes the batch again on a new one.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path

import pytest
from support import run

from walex.destinations.base import DestinationURL, Unavailable
from walex.destinations.encoding import Outgoing
from walex.destinations.kafka import KafkaDestination

from .kafka_support import create_topic, stored
from .servers import OwnTansu, free_port


class Cuttable:
    """A TCP relay from a port of its own to tansu's; :meth:`cut` drops every connection
    and refuses new ones until :meth:`mend`."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self.listener: socket.socket | None = None
        self.links: list[socket.socket] = []
        self.lock = threading.Lock()

    def mend(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.close()
        with self.lock:
            links, self.links = self.links, []
        for link in links:
            try:
                link.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            link.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:  # tansu gone (the test's end)
                client.close()
                continue
            with self.lock:
                if self.listener is not listener:
                    client.close()
                    server.close()
                    return
                self.links += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):  # the other pump's recv ends, then it closes both too
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


class RelayedTansu(OwnTansu):
    """tansu telling clients to connect to ``advertised`` (the relay's port)."""

    def __init__(self, folder: Path, advertised: int) -> None:
        super().__init__(folder)
        self.advertised = advertised

    def command(self) -> list[str]:
        command = super().command()
        at = command.index("--advertised-listener-url")
        command[at + 1] = f"tcp://127.0.0.1:{self.advertised}"
        return command


def _batch(n: int) -> list[Outgoing]:
    """``n`` changes of one row (one key, so one partition), in order."""
    return [Outgoing(f"0/1000:{i:04d}", "public", "t", "update", 0,
                     b'{"id":"0/1000:%04d"}' % i, "/db/public/t", "2026-12-07T08:00:00Z",
                     "public.t/1", "1") for i in range(n)]


@pytest.mark.parametrize("outage", [3.5, 9.0])
def test_broker_unreachable_mid_publish_keeps_the_order_of_first_copies(
        tmp_path: Path, outage: float) -> None:
    """An outage longer than ``timeout`` (2 s; librdkafka's record timeout before) but
    shorter than the publish's deadline (7 s), and one longer than both: the first copy of
    each id in the partition is in order, and none is missing."""
    relay = Cuttable(0)
    with RelayedTansu(tmp_path, relay.port) as broker:
        relay.target = broker.port
        relay.mend()
        try:
            create_topic(broker.port, "wo.t", 1)
            url = (f"kafka://127.0.0.1:{relay.port}?topic=wo.{{table}}&timeout=2"
                   "&queue.buffering.max.messages=4&linger.ms=0"
                   "&reconnect.backoff.ms=50&reconnect.backoff.max.ms=200")
            warm, *batch = _batch(13)

            async def main() -> int:
                dest = KafkaDestination(DestinationURL(url))
                await dest.open()
                try:
                    await dest.publish([warm])  # the producer id, the partition's leader
                    relay.cut()
                    loop = asyncio.get_running_loop()
                    loop.call_later(outage, relay.mend)
                    attempts = 0
                    while True:  # as a lane does: the whole batch again on a new producer
                        attempts += 1
                        try:
                            await dest.publish(batch)
                            return attempts
                        except Unavailable:
                            await dest.close()
                            while True:
                                try:
                                    await dest.open()
                                    break
                                except Unavailable:
                                    await asyncio.sleep(0.2)
                finally:
                    await dest.close()

            attempts = run(main(), timeout=90)
            ids = [i for i, _doc, _m in stored(broker.port, "wo.t")]
        finally:
            relay.cut()
    first: list[str] = []
    for i in ids:
        if i not in first:
            first.append(i)
    assert first == [o.id for o in (warm, *batch)], ids
    if outage < 7:  # within the publish's deadline: the records waited in the producer, sent
        # once the broker was back, the publish confirmed at its first attempt
        assert attempts == 1 and ids == first, (attempts, ids)
    else:  # the publish failed, the batch went again on a new producer
        assert attempts >= 2, attempts
