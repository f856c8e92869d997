"""A NATS worker (``prefetch`` > 1) whose lease rounds keep failing says so, once, and
says so again when they work.

Workers hold partitions by leases in the JetStream key-value bucket
``walex_leases_<group>`` (:mod:`walex.workers.natslease`). On a nats-server of the
test's own with two users, ``admin`` (declares the stream and consumer, publishes, runs
worker ``a``) and ``worker`` (runs worker ``b``), one partition: ``a`` holds it, ``b``
holds nothing (its share is 0). A config reload (SIGHUP) denies ``worker`` publishing to
``$KV.walex_leases_<group>.>``: the server drops ``b``'s lease writes and every round of
``b`` fails (unanswered) -- before this WARNING, silently: ``b`` lost no lease, so nothing
else told. After the leases' ttl and a round, one WARNING names the worker, the bucket,
the last error and what to check; no log record holds a password. Once a reload lifts the
denial, one INFO says the leases work again, and ``b`` takes the partition ``a`` gives
back on stopping and handles what is published then.

(A worker denied from its start, or holding leases when the denial comes, is loud
already: its start fails, or its lapsed leases make it reconnect, each with a WARNING.)
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from destinations.servers import OwnNats
from support import run
from workers.test_worker import made_up

from walex import Events
from walex.destinations import Destinations
from walex.observe.workers import worker_health
from walex.workers import Worker

ADMIN_PASSWORD = "adm-Pw-7f3c91"
WORKER_PASSWORD = "wrk-Pw-5b8e22"
ACK_WAIT = 2  # the leases' ttl: the WARNING comes after 2 s of failed rounds


class AuthNats(OwnNats):
    """nats-server with JetStream and users, from a config file the test rewrites and
    reloads (all in the file: a reload drops what only flags gave, JetStream included)."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.conf = folder / "nats.conf"

    def write(self, denied: list[str]) -> None:
        deny = ", ".join(f'"{subject}"' for subject in denied)
        self.conf.write_text(
            f"listen: 127.0.0.1:{self.port}\n"
            f'jetstream {{store_dir: "{self.folder}/jetstream"}}\n'
            "authorization {\n  users = [\n"
            f'    {{user: admin, password: "{ADMIN_PASSWORD}"}}\n'
            f'    {{user: worker, password: "{WORKER_PASSWORD}", permissions: '
            f'{{publish: {{allow: [">"], deny: [{deny}]}}, subscribe: {{allow: [">"]}}}}}}\n'
            "  ]\n}\n")

    def reload(self, denied: list[str]) -> None:
        self.write(denied)
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    def command(self) -> list[str]:
        return [super().command()[0], "-c", str(self.conf)]


async def until(check, what: str, timeout: float) -> float:  # type: ignore[no-untyped-def]
    """Wait for ``check()``; the seconds it took."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"no {what} within {timeout:g}s")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


class Setup:
    """The server, the group's source URLs, the publisher and what each worker handled."""

    def __init__(self, tmp_path: Path, unique: str, caplog: pytest.LogCaptureFixture,
                 denied: bool) -> None:
        self.unique, self.caplog = unique, caplog
        self.group = f"g{unique}"
        self.bucket = f"walex_leases_{self.group}"
        self.server = AuthNats(tmp_path)
        self.server.write([f"$KV.{self.bucket}.>"] if denied else [])
        self.handled: dict[str, list[int]] = {"a": [], "b": []}
        caplog.set_level(logging.DEBUG, logger="walex")

    def source(self, user: str, password: str) -> str:
        return (f"nats://{user}:{password}@127.0.0.1:{self.server.port}?stream=LW_{self.unique}"
                f"&subject=lw{self.unique}.{{schema}}.{{table}}.{{partition}}&partitions=1"
                f"&group={self.group}&ack_wait={ACK_WAIT}&prefetch=8")

    @property
    def admin(self) -> str:
        return self.source("admin", ADMIN_PASSWORD)

    def deny(self, denied: bool) -> None:
        self.server.reload([f"$KV.{self.bucket}.>"] if denied else [])

    def handler(self, name: str) -> Events:
        events = Events()
        events.on_event("item")(
            lambda batch: self.handled[name].extend(e.new_record["id"] for e in batch))
        return events

    def records(self, level: int, text: str) -> list[logging.LogRecord]:
        return [r for r in self.caplog.records if r.levelno == level and text in r.getMessage()]

    async def publish(self, first: int, last: int) -> None:
        destinations = Destinations([self.admin.split("&partitions=")[0]], 1)  # the relay's
        await destinations.open()
        try:
            await destinations.publish([made_up(i) for i in range(first, last)])
        finally:
            await destinations.close()

    def no_password(self) -> None:
        for record in self.caplog.records:
            message = record.getMessage()
            assert WORKER_PASSWORD not in message and ADMIN_PASSWORD not in message, message


def test_failing_lease_rounds_warn_once_and_recover(
        tmp_path: Path, unique: str, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    t = Setup(tmp_path, unique, caplog, denied=False)
    bucket, handled, records = t.bucket, t.handled, t.records
    # the lease ids begin with the host name: "a-..." ranks before "b-...", so with one
    # partition and both workers live, a holds it and b holds nothing (b's share is 0)
    host = {"name": "a"}
    monkeypatch.setattr(socket, "gethostname", lambda: host["name"])

    async def main() -> None:
        await Worker(t.admin, [t.handler("a")]).consumer.declare()  # stream and consumer
        a = Worker(t.admin, [t.handler("a")])  # the admin's: never denied
        await a.start()
        host["name"] = "b"
        b = Worker(t.source("worker", WORKER_PASSWORD), [t.handler("b")])
        await b.start()
        try:
            await t.publish(0, 20)
            await until(lambda: len(handled["a"]) == 20, "a handling", 15)
            leases = b.consumer.leases  # type: ignore[attr-defined]
            assert not leases.held and len(leases.members) == 2, (leases.held, leases.members)
            assert worker_health(b)[0] == 200

            t.deny(True)  # b's lease rounds fail from now on
            took = await until(lambda: records(logging.WARNING, "lease rounds"),
                               "WARNING of the failing lease rounds", 10)
            assert took > ACK_WAIT, f"warned after {took:.1f}s, within the leases' ttl"
            code, body = worker_health(b)  # what /healthz answers
            assert code == 503 and body["status"] == "stalled", body
            assert f"lease rounds in bucket {bucket!r} have failed" in body["reason"], body
            await asyncio.sleep(2 * ACK_WAIT)  # more failed rounds: no second WARNING

            t.deny(False)
            await until(lambda: records(logging.INFO, "work again"), "INFO of leases back", 10)
            assert worker_health(b)[0] == 200
            await asyncio.wait_for(a.stop(), 20)  # gives its lease back: b takes it
            await t.publish(20, 40)
            await until(lambda: len(handled["b"]) == 20, "b handling", 15)
        finally:
            await asyncio.wait_for(b.stop(), 20)
            await asyncio.wait_for(a.stop(), 20)

    with t.server:
        run(main(), timeout=60)

    [warning] = records(logging.WARNING, "lease rounds")
    text = warning.getMessage()
    assert f"worker b-{os.getpid()}-" in text and repr(bucket) in text, text
    assert f"'$KV.{bucket}.>'" in text and "'$JS.API.>'" in text and "reachable" in text, text
    assert "last error: TimeoutError" in text, text
    assert len(records(logging.INFO, "work again")) == 1
    assert sorted(handled["a"]) == list(range(20)) and sorted(handled["b"]) == list(range(20, 40))
    assert not records(logging.WARNING, "lost partition")  # b held nothing, a was never denied
    t.no_password()


def test_a_worker_denied_its_lease_bucket_from_its_start_says_what_to_check(
        tmp_path: Path, unique: str, caplog: pytest.LogCaptureFixture) -> None:
    """Denied from the start, the worker's start fails and is tried again, each time with
    a WARNING; it names the lease bucket and the permissions to check (not only 'nats:
    timeout'), and the worker handles once the denial is lifted."""
    t = Setup(tmp_path, unique, caplog, denied=True)

    async def main() -> None:
        await Worker(t.admin, [t.handler("a")]).consumer.declare()
        b = Worker(t.source("worker", WORKER_PASSWORD), [t.handler("b")])
        await b.start()
        try:
            await until(lambda: t.records(logging.WARNING, "unreachable"), "WARNING", 10)
            t.deny(False)
            await t.publish(0, 20)
            await until(lambda: len(t.handled["b"]) == 20, "b handling", 20)
        finally:
            await asyncio.wait_for(b.stop(), 20)

    with t.server:
        run(main(), timeout=60)

    text = t.records(logging.WARNING, "unreachable")[0].getMessage()
    assert f"lease bucket {t.bucket!r}" in text, text
    assert f"'$KV.{t.bucket}.>'" in text and "'$JS.API.>'" in text and "reachable" in text, text
    t.no_password()


def test_a_worker_refused_for_a_moment_by_a_reloading_server_goes_on(
        tmp_path: Path, unique: str, caplog: pytest.LogCaptureFixture) -> None:
    """The server's authorization is reloaded without the worker's user, then with it
    again at once (as a reload racing a reconnect refuses a valid user for a moment): the
    server closes the worker's connection and refuses its next attempt. Credentials the
    server took before are retried a few times (then they stop the worker, as a server back
    with other credentials does): the worker must say so and handle again (on main the
    first refusal was a ConfigError and the worker stopped for good: seen in the suite)."""
    t = Setup(tmp_path, unique, caplog, denied=False)

    async def main() -> None:
        await Worker(t.admin, [t.handler("a")]).consumer.declare()
        b = Worker(t.source("worker", WORKER_PASSWORD), [t.handler("b")])
        await b.start()
        try:
            await t.publish(0, 10)
            await until(lambda: len(t.handled["b"]) == 10, "b handling", 20)
            t.server.conf.write_text(t.server.conf.read_text().split("    {user: worker")[0]
                                     + "  ]\n}\n")  # the admin alone
            assert t.server.proc is not None
            t.server.proc.send_signal(signal.SIGHUP)
            await until(lambda: t.records(logging.WARNING, "took before"), "the WARNING", 30)
            t.deny(False)  # both users again
            await t.publish(10, 20)
            await until(lambda: len(t.handled["b"]) == 20, "b handling again", 40)
            assert b._task is not None and not b._task.done(), "the worker stopped"
        finally:
            await asyncio.wait_for(b.stop(), 20)

    with t.server:
        run(main(), timeout=120)
    t.no_password()
