"""What tests/test_handoff_window.py and tests/test_max_batch_window.py share: an app on the
table ``item`` relaying to a Redis stream through a destination window, and what they read
of it."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from destinations.brokers import redis_delete
from destinations.conftest import require
from support import until

from walex import Event, Events, WalEx

_names = itertools.count(1)


def stream_fixture(prefix: str) -> Any:
    """A fixture giving each test a stream key prefix of its own (``<prefix><8 hex>``) on
    the local Redis, its streams removed after: ``stream = stream_fixture("hw")``."""

    @pytest.fixture
    def stream() -> Iterator[str]:
        require("redis")
        name = f"{prefix}{uuid.uuid4().hex[:8]}"
        yield name
        asyncio.run(redis_delete(f"{name}:*"))

    return stream


def commit_lsn(event: Event) -> int:
    return int(event.id.split("-")[0], 16)


def make_app(dsn: str, events: Events, stream: str, **options: Any) -> WalEx:
    """An app with ``events``, relaying table ``item`` to ``<stream>:item`` on the local
    Redis with a window of 64."""
    options.setdefault("name", f"walex_window_{next(_names)}")
    options.setdefault("status_interval", 0.2)
    return WalEx(dsn, publication="pub", subscriptions=["item"], modules=[events],
                 destinations=[f"redis://127.0.0.1:6379/0?stream={stream}:{{table}}&timeout=5"],
                 destination_window=64, **options)


def wait_confirmed(app: WalEx, what: str) -> None:
    """From a plain handler (the handlers' thread): wait until the app's lane holds no
    unconfirmed transaction (a length read, no iteration), at most 30 s."""
    lane = app.pipeline.window.lanes[0]
    deadline = time.monotonic() + 30
    while lane.queued:
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


async def redelivered(dsn: str, stream: str, slot: str, count: int, what: str) -> list[int]:
    """Restart on the durable ``slot``: the ids of the rows delivered again, once ``count``."""
    again: list[int] = []
    more = Events()

    @more.on_insert("item")
    def collect(items: list[Event]) -> None:
        again.extend(e.new_record["id"] for e in items)

    async with make_app(dsn, more, stream, durable_slot=True, slot_name=slot):
        await until(lambda: len(again) >= count, what)
    return again
