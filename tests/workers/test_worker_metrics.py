"""A worker's ``metrics_port``: Prometheus metrics, ``/healthz`` and ``/livez``, as an app's.

Concern: :mod:`walex.observe.workers`. A relay app (in the test's process,
streaming from PostgreSQL) publishes a known workload to a real NATS
JetStream; a ``walex worker --metrics-port`` process handles it with a
handler that fails once; the scraped counters must say what happened, and
a replay of the same events must show as duplicates. A worker whose broker
is not there answers ``/livez`` 200 and ``/healthz`` 503.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from support import collecting, run
from test_observe import get, wait_until
from workers.test_worker import Broker

from walex import Events
from walex.destinations.encoding import encode_event
from walex.embedded import free_port
from walex.errors import ConfigError
from walex.workers import Worker

HANDLERS = """
from walex import Events
events = Events()
failed = []

@events.on_event("item")
def flaky(batch):
    if any(e.type == "delete" for e in batch) and not failed:
        failed.append(1)
        raise RuntimeError("injected, once")

@events.on_event("other")
async def other(batch):
    pass
"""


def samples(text: str) -> dict[str, float]:
    """``{'name{labels}': value}`` of the worker's metrics, the worker and group labels dropped."""
    found = {}
    for line in text.splitlines():
        if line.startswith("walex_worker_"):
            key, value = line.rsplit(" ", 1)
            name, _, labels = key.partition("{")
            pairs = sorted(p for p in re.findall(r'\w+="[^"]*"', labels)
                           if not p.startswith(("worker=", "group=")))
            found[name + ("{" + ",".join(pairs) + "}" if pairs else "")] = float(value)
    return found


def test_worker_metrics_count_what_it_handled(
    admin: psycopg.Connection, dsn: str, tmp_path: Path, unique: str
) -> None:
    broker = Broker("nats", unique)
    admin.execute("""
        CREATE TABLE item (id int PRIMARY KEY, label text);
        CREATE TABLE other (id int PRIMARY KEY);
        CREATE PUBLICATION pub FOR ALL TABLES;
    """)
    (tmp_path / "handlers.py").write_text(HANDLERS)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALEX_")}
    subprocess.run([sys.executable, "-m", "walex.cli", "worker", "--declare",  # the stream first
                    broker.source(partitions=2)], cwd=tmp_path, env=env, check=True, timeout=60)
    proc = subprocess.Popen(
        [sys.executable, "-m", "walex.cli", "worker", broker.source(partitions=2),
         "handlers:events", "--metrics-port", str(port), "--max-retries", "2"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def scrape() -> dict[str, float]:
        status, text = get(f"http://127.0.0.1:{port}/metrics")
        return samples(text) if status == 200 else {}

    def handled(found: dict[str, float]) -> float:
        return sum(v for k, v in found.items() if k.startswith("walex_worker_events_total"))

    async def main() -> None:
        async with collecting(dsn, destinations=[broker.url], partitions=2) as rec:
            with admin.transaction():
                admin.execute("INSERT INTO item SELECT g, 'x' FROM generate_series(1, 5) g")
            admin.execute("UPDATE item SET label = 'y' WHERE id <= 2")
            admin.execute("DELETE FROM item WHERE id = 5")
            admin.execute("INSERT INTO other SELECT generate_series(1, 4)")
            events = await rec.wait_for(12, timeout=30)
        found = await asyncio.to_thread(
            wait_until, lambda: (f := scrape()) and handled(f) == 12 and f, "12 events in /metrics")
        assert found['walex_worker_events_total{table="public.item",type="insert"}'] == 5
        assert found['walex_worker_events_total{table="public.item",type="update"}'] == 2
        assert found['walex_worker_events_total{table="public.item",type="delete"}'] == 1
        assert found['walex_worker_events_total{table="public.other",type="insert"}'] == 4
        assert found["walex_worker_handler_errors_total"] == 1
        assert found["walex_worker_handler_retries_total"] == 1
        assert found["walex_worker_handler_failures_total"] == 0
        assert found["walex_worker_duplicates_total"] == 0
        assert found["walex_worker_undecodable_total"] == 0
        assert found["walex_worker_reconnects_total"] == 0
        assert found["walex_worker_redeliveries_total"] == 0
        assert found["walex_worker_connected"] == 1
        calls = found["walex_worker_calls_total"]
        assert calls == 12  # on NATS one event per call
        assert found["walex_worker_handler_seconds_count"] == calls
        assert found['walex_worker_handler_seconds_bucket{le="+Inf"}'] == calls
        assert found["walex_worker_commit_to_handler_seconds_count"] == calls
        partitions = {k for k in found if k.startswith("walex_worker_last_handled_lsn")}
        assert partitions == {'walex_worker_last_handled_lsn{partition="0"}',
                              'walex_worker_last_handled_lsn{partition="1"}'}
        last = max(int(e.id.partition("-")[0], 16) for e in events)
        assert max(found[k] for k in partitions) == last  # the last transaction's commit LSN
        assert all(found[k.replace("last_handled_lsn", "last_commit_timestamp_seconds")] > 0
                   for k in partitions)
        assert found['walex_worker_pending_messages{partition="0"}'] == 0
        assert found['walex_worker_pending_messages{partition="1"}'] == 0
        status, body = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/healthz")
        health = json.loads(body)
        assert status == 200 and health["status"] == "consuming" and health["worker"] == \
            "walex-worker" and health["group"] == "walex" and health["partitions"] == 2, health
        assert (await asyncio.to_thread(get, f"http://127.0.0.1:{port}/livez"))[0] == 200

        for event in events[:3]:  # a replay, without the message ids JetStream drops it by
            await broker.publish_raw(encode_event(event, 2).body)
        found = await asyncio.to_thread(
            wait_until, lambda: (f := scrape()).get("walex_worker_duplicates_total") == 3 and f,
            "3 duplicates in /metrics")
        assert handled(found) == 12 and found["walex_worker_calls_total"] == 12

    try:
        wait_until(lambda: get(f"http://127.0.0.1:{port}/healthz")[0] == 200, "/healthz 200")
        run(main(), timeout=120)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        asyncio.run(broker.cleanup())
    assert proc.returncode == 0, err
    assert f"worker 'walex-worker' serves /metrics, /healthz and /livez on 0.0.0.0:{port}" in err
    assert get(f"http://127.0.0.1:{port}/livez")[0] == 0  # gone with the worker


def test_worker_health_while_its_broker_is_not_there() -> None:
    events = Events()
    events.on_event("item")(lambda batch: None)
    worker = Worker(f"nats://127.0.0.1:{free_port()}?stream=NOWHERE", [events], metrics_port=0)

    async def main() -> None:
        await worker.start()  # an unreachable broker is retried in the background
        try:
            port = worker.observer.port
            status, body = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/healthz")
            assert status == 503 and json.loads(body)["status"] == "reconnecting", body
            status, body = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/livez")
            assert status == 200 and json.loads(body)["status"] == "running", body
            found = samples((await asyncio.to_thread(get, f"http://127.0.0.1:{port}/metrics"))[1])
            assert found["walex_worker_connected"] == 0
        finally:
            await worker.stop()
        assert (await asyncio.to_thread(get, f"http://127.0.0.1:{port}/livez"))[0] == 0

    run(main(), timeout=60)


def test_worker_metrics_without_the_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "prometheus_client" else real(name, *a))
    events = Events()
    events.on_event("item")(lambda batch: None)
    with pytest.raises(ConfigError, match=r"metrics_port needs the prometheus-client package, "
                                          r"which is not installed: pip install 'walex\[metrics\]'"):
        Worker("nats://127.0.0.1:4222?stream=S", [events], metrics_port=9187)
    with pytest.raises(ConfigError, match="metrics_port must be a port number"):
        Worker("nats://127.0.0.1:4222?stream=S", [events], metrics_port=-1)
