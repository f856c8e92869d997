"""``walex worker`` runs its handlers on uvloop when installed, on asyncio when asked.

Concern: :mod:`walex.lifecycle` for :meth:`walex.workers.Worker.run`. A relay
publishes one event to a real NATS JetStream; the worker process's handler
writes the type of its running loop and stops the worker with SIGINT.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from destinations.brokers import nats_delete
from workers.test_worker import Broker, made_up, relay

HANDLER = """
import asyncio, os, signal
from walex import Events
events = Events()

@events.on_event("item")
async def record(batch):
    loop = type(asyncio.get_running_loop())
    with open("loop.txt", "w") as f:
        f.write(f"{loop.__module__}.{loop.__qualname__}")
    os.kill(os.getpid(), signal.SIGINT)
"""


@pytest.mark.parametrize("loop", [None, "asyncio"])
def test_worker_runs_on_the_loop_asked_for(tmp_path: Path, unique: str, loop: str | None) -> None:
    if loop is None:
        pytest.importorskip("uvloop")
    broker = Broker("nats", unique)
    (tmp_path / "handlers.py").write_text(HANDLER)
    try:
        asyncio.run(relay(broker, [[made_up(1)]], partitions=1))
        command = [sys.executable, "-m", "walex.cli", "worker", broker.source(partitions=1),
                   "handlers:events", *(["--loop", loop] if loop else [])]
        env = {k: v for k, v in os.environ.items() if not k.startswith("WALEX_")}
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60,
                              env=env)
    finally:
        asyncio.run(nats_delete(f"WK_{unique}", broker.port))
    assert done.returncode == 0, done.stderr
    found = (tmp_path / "loop.txt").read_text()
    if loop is None:
        assert found == "uvloop.Loop"
    else:
        assert found.startswith("asyncio."), found
