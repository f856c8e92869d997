"""Brokers for the destination tests: the machine's servers, or ones a test starts.

NATS (JetStream) on 127.0.0.1:4222, Redis on 6379 and RabbitMQ on 5672
(guest/guest) are expected to run. A test whose broker is unreachable is
skipped, except under ``CI=true``, where it fails: CI must not pass by
skipping. Each test uses names of its own (stream, queue, key), removed
afterwards, so tests never see each other's messages.
"""

from __future__ import annotations

import os
import socket
import uuid

import pytest

BROKERS = {"nats": 4222, "redis": 6379, "rabbitmq": 5672}


def reachable(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require(broker: str) -> int:
    """The broker's port; skips (fails under CI=true) when it is not running."""
    port = BROKERS[broker]
    if not reachable(port):
        message = f"{broker} is not running on 127.0.0.1:{port}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message} (CI=true: a missing broker fails the run)")
        pytest.skip(message)
    return port


@pytest.fixture
def unique() -> str:
    """A name part no other test uses."""
    return uuid.uuid4().hex[:10]
