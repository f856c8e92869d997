"""Metrics, health, the lag guard, tracing and log context (walex.observe), on real servers."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from support import collecting, run, until
from walex import Events, WalEx
from walex.embedded import Cluster, free_port
from walex.errors import ConfigError
from walex.observe.health import health

WALEX = [sys.executable, "-m", "walex.cli"]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return 0, ""


def samples(text: str) -> dict[str, float]:
    """``{'name{labels}': value}`` of a Prometheus text exposition, app and slot labels dropped."""
    found = {}
    for line in text.splitlines():
        if line.startswith("walex_"):
            key, value = line.rsplit(" ", 1)
            name, _, labels = key.partition("{")
            pairs = sorted(p for p in re.findall(r'\w+="[^"]*"', labels)
                           if not p.startswith(("app=", "slot=")))
            found[name + ("{" + ",".join(pairs) + "}" if pairs else "")] = float(value)
    return found


def start_app(tmp_path: Path, body: str, *args: str) -> subprocess.Popen[str]:
    (tmp_path / "ops_app.py").write_text(textwrap.dedent(body))
    return subprocess.Popen(
        [*WALEX, "run", "ops_app:app", *args], cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )


def wait_until(predicate: Any, what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_metrics_carry_the_counts_of_a_known_workload(
    dsn: str, admin: psycopg.Connection, tmp_path: Path
) -> None:
    admin.execute("CREATE TABLE item (id int PRIMARY KEY, label text)")
    admin.execute("CREATE TABLE other (id int PRIMARY KEY)")
    admin.execute("CREATE SCHEMA audit")
    admin.execute("CREATE TABLE audit.item (id int PRIMARY KEY)")  # another table, same name
    admin.execute("CREATE PUBLICATION pub FOR ALL TABLES")
    port = free_port()
    proc = start_app(tmp_path, f"""
        import logging
        from walex import WalEx, Events
        events = Events()
        failed = []

        @events.on_event("item")
        def flaky(batch):
            logging.getLogger("ops_app").info("handling %d item events", len(batch))
            if any(e.type == "delete" for e in batch) and not failed:
                failed.append(1)
                raise RuntimeError("injected, once")

        app = WalEx({dsn!r}, publication="pub", modules=[events], max_retries=2,
                    retry_backoff=0, status_interval=0.5)
    """, "--metrics-port", str(port), "--log-format", "json")
    try:
        wait_until(lambda: get(f"http://127.0.0.1:{port}/healthz")[0] == 200, "/healthz 200")
        with admin.transaction():
            admin.execute("INSERT INTO item SELECT g, 'x' FROM generate_series(1, 5) g")
        admin.execute("UPDATE item SET label = 'y' WHERE id <= 2")
        admin.execute("DELETE FROM item WHERE id = 5")
        admin.execute("INSERT INTO other SELECT generate_series(1, 4)")
        admin.execute("INSERT INTO audit.item SELECT generate_series(1, 3)")

        def scraped() -> dict[str, float] | None:
            status, text = get(f"http://127.0.0.1:{port}/metrics")
            found = samples(text) if status == 200 else {}
            return found if found.get("walex_transactions_total") == 5 else None

        found = wait_until(scraped, "5 transactions in /metrics")
        assert found['walex_events_total{table="public.item",type="insert"}'] == 5
        assert found['walex_events_total{table="public.item",type="update"}'] == 2
        assert found['walex_events_total{table="public.item",type="delete"}'] == 1
        assert found['walex_events_total{table="public.other",type="insert"}'] == 4
        assert found['walex_events_total{table="audit.item",type="insert"}'] == 3
        assert sum(v for k, v in found.items() if k.startswith("walex_events_total")) == 15
        assert found["walex_handler_errors_total"] == 1
        assert found["walex_handler_retries_total"] == 1
        assert found["walex_handler_failures_total"] == 0
        assert found["walex_commit_to_handler_seconds_count"] == 5
        assert found['walex_commit_to_handler_seconds_bucket{le="+Inf"}'] == 5
        assert found["walex_streaming"] == 1 and found["walex_standby"] == 0
        assert found["walex_received_lsn"] >= found["walex_acknowledged_lsn"] > 0
        assert found["walex_pending_bytes"] == 0 and "walex_lag_bytes" in found
        status, body = get(f"http://127.0.0.1:{port}/healthz")
        health = json.loads(body)
        assert status == 200 and health["status"] == "streaming", health
        assert get(f"http://127.0.0.1:{port}/nothing")[0] == 404
    finally:
        _, err = stop(proc)
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    retry = [entry for entry in lines if "retry 1/2" in entry["message"]]
    assert retry and {"slot", "lsn", "xid"} <= set(retry[0]), retry
    own = [entry for entry in lines if entry["logger"] == "ops_app"]
    assert len(own) == 5 and all(entry["slot"].endswith("_walex_" + entry["slot"][-8:])
                                 for entry in own), own
    assert all(isinstance(entry["xid"], int) and "/" in entry["lsn"] for entry in own)


@pytest.fixture(scope="module")
def own_cluster(pg_cluster: Any) -> Iterator[Cluster]:
    """A cluster this module may stop and start."""
    if pg_cluster.cluster is None:
        pytest.skip("stops the server: needs a throwaway cluster, not WALEX_TEST_DSN")
    with Cluster(pg_cluster.cluster.bindir) as cluster:
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            conn.execute("CREATE TABLE item (id int PRIMARY KEY)")
            conn.execute("CREATE PUBLICATION pub FOR ALL TABLES")
        yield cluster


def test_healthz_turns_503_while_the_server_is_away(own_cluster: Cluster, tmp_path: Path) -> None:
    port = free_port()
    proc = start_app(tmp_path, f"""
        from walex import Events, WalEx
        app = WalEx({own_cluster.dsn()!r}, publication="pub", durable_slot=True,
                    slot_name="health_slot", status_interval=0.5, reconnect_max_attempts=1000,
                    reconnect_backoff_max=0.5)
    """, "--metrics-port", str(port))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: get(url + "/healthz")[0] == 200, "/healthz 200")
        own_cluster.stop("fast")
        status, body = wait_until(
            lambda: (lambda r: r if r[0] == 503 else None)(get(url + "/healthz")), "/healthz 503")
        answer = json.loads(body)
        assert answer["status"] in ("reconnecting", "unreachable"), answer
        assert answer["reason"], answer
        assert get(url + "/livez")[0] == 200  # alive, reconnecting: not a reason to restart it
        own_cluster.restart()
        wait_until(lambda: get(url + "/healthz")[0] == 200, "/healthz 200 again", timeout=60)
        found = samples(get(url + "/metrics")[1])
        assert found["walex_reconnects_total"] >= 1 and found["walex_streaming"] == 1
    finally:
        if not own_cluster.running:
            own_cluster.restart()
        _, err = stop(proc)
    assert proc.returncode == 0, err


def test_lag_guard_reports_and_releases_a_temporary_slot(
    dsn: str, admin: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    admin.execute("CREATE TABLE item (id int PRIMARY KEY, payload text)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE item")
    gate = asyncio.Event()
    slow = Events()

    @slow.on_event("item")
    async def blocked(events: list[Any]) -> None:
        await gate.wait()

    async def main() -> None:
        async with collecting(dsn, modules=[slow], status_interval=0.3, max_lag_bytes="256kB",
                              max_lag_release=True) as rec:
            app = rec.app
            assert app is not None
            await until(lambda: health(app)[0] == 200, "healthy at first")
            [(pid,)] = admin.execute("SELECT active_pid FROM pg_replication_slots").fetchall()
            admin.execute("INSERT INTO item SELECT g, repeat(md5(g::text), 8) "
                          "FROM generate_series(1, 20000) g")
            await until(lambda: app.pipeline.stats.lag_releases == 1, "the lag guard release",
                        timeout=30)
            # PostgreSQL ended the walsender, and dropped the temporary slot with it
            await until(lambda: admin.execute(
                "SELECT count(*) FROM pg_replication_slots WHERE active_pid = %s", (pid,)
            ).fetchone() == (0,), "the old walsender gone")
            gate.set()
            await until(lambda: health(app)[0] == 200, "healthy again on a new slot", timeout=60)
            assert app.gaps and "was dropped with the lost connection" in app.gaps[0]
            admin.execute("INSERT INTO item VALUES (0, 'after')")
            await until(lambda: any(e.new_record and e.new_record["id"] == 0 for e in rec.events),
                        "a change after the release", timeout=30)

    with caplog.at_level(logging.INFO, logger="walex"):
        run(main(), timeout=120)
    messages = [r.getMessage() for r in caplog.records]
    assert any("over max_lag_bytes (250.0 KiB)" in m and "releasing" in m for m in messages)
    assert any("releasing temporary slot" in m and "never delivered" in m for m in messages)


def test_healthz_reports_lag_over_the_limit(dsn: str, admin: psycopg.Connection) -> None:
    admin.execute("CREATE TABLE item (id int PRIMARY KEY, payload text)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE item")
    gate = asyncio.Event()
    slow = Events()

    @slow.on_event("item")
    async def blocked(events: list[Any]) -> None:
        await gate.wait()

    async def main() -> None:
        async with collecting(dsn, modules=[slow], metrics_port=0, status_interval=0.3,
                              max_lag_bytes="128kB") as rec:
            app = rec.app
            assert app is not None
            url = f"http://127.0.0.1:{app.observer.port}/healthz"
            admin.execute("INSERT INTO item SELECT g, repeat(md5(g::text), 8) "
                          "FROM generate_series(1, 5000) g")
            await until(lambda: health(app)[0] == 503, "unhealthy for the lag")
            status, body = await asyncio.to_thread(get, url)
            answer = json.loads(body)
            assert status == 503 and answer["status"] == "lagging", answer
            assert "over max_lag_bytes (128000)" in answer["reason"]
            gate.set()
            await until(lambda: health(app)[0] == 200, "healthy once caught up", timeout=30)
            assert (await asyncio.to_thread(get, url))[0] == 200

    run(main(), timeout=90)


_EXPORTER: Any = None


def test_spans_per_batch_parent_the_handlers_spans(dsn: str, admin: psycopg.Connection) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    global _EXPORTER
    if _EXPORTER is None:  # the global provider can be set once per process; walex uses it
        _EXPORTER = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    exporter = _EXPORTER
    exporter.clear()
    tracer = trace.get_tracer("test")
    admin.execute("CREATE TABLE item (id int PRIMARY KEY)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE item")

    traced = Events()

    @traced.on_insert("item")
    def handler(events: list[Any]) -> None:  # a thread: the span context follows
        with tracer.start_as_current_span("handler work"):
            pass

    async def main() -> None:
        async with collecting(dsn, modules=[traced], tracing=True) as rec:
            admin.execute("INSERT INTO item VALUES (1), (2)")
            await rec.wait_for(2)
            await until(lambda: len(exporter.get_finished_spans()) >= 2, "two spans")

    run(main())
    spans = {s.name: s for s in exporter.get_finished_spans()}
    batch, work = spans["process pub"], spans["handler work"]
    assert batch.kind == trace.SpanKind.CONSUMER
    assert batch.attributes["messaging.system"] == "postgresql"
    assert batch.attributes["messaging.operation.type"] == "process"
    assert batch.attributes["messaging.batch.message_count"] == 2
    assert batch.attributes["walex.tables"] == ("public.item",)  # schema.table, as metrics
    assert work.parent is not None and work.parent.span_id == batch.context.span_id


def test_an_option_without_its_extra_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("prometheus_client", "opentelemetry")
                        else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'walex\[metrics\]'"):
        WalEx("postgresql://localhost/db", publication="pub", metrics_port=9187)
    with pytest.raises(ConfigError, match=r"pip install 'walex\[otel\]'"):
        WalEx("postgresql://localhost/db", publication="pub", tracing=True)


def test_import_walex_imports_no_optional_package() -> None:
    code = ("import sys, walex; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('typer', 'rich', 'prometheus_client', 'opentelemetry')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
