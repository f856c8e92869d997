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

from support import collecting, run, standby_of, until
from walex import Events, WalEx
from walex.embedded import Cluster, free_port
from walex.errors import ConfigError
from walex.lsn import parse_lsn
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

    async def main() -> tuple[str, str]:
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
            await until(lambda: app.gaps and health(app)[0] == 200, "healthy again on a new slot",
                        timeout=60)
            assert len(app.gaps) == 1 and "was released by the lag guard" in app.gaps[0], app.gaps
            admin.execute("INSERT INTO item VALUES (0, 'after')")
            await until(lambda: any(e.new_record and e.new_record["id"] == 0 for e in rec.events),
                        "a change after the release", timeout=30)
            return app.gaps[0], app.pipeline.slot_name

    with caplog.at_level(logging.INFO, logger="walex"):
        gap, slot = run(main(), timeout=120)
    messages = [r.getMessage() for r in caplog.records]
    assert any("over max_lag_bytes (250.0 KiB)" in m and "releasing" in m for m in messages)
    assert any("releasing temporary slot" in m and "never delivered" in m for m in messages)
    # the range lost is logged once, as recorded, and starts where the new slot starts
    assert [m for m in messages if "was released by the lag guard" in m] == [gap]
    after, before = re.search(r"committed after (\S+) and before (\S+) ", gap).groups()
    created = [m for m in messages if m.startswith(f"created temporary replication slot {slot!r}")]
    assert len(created) == 2 and created[1].endswith(f" at {before}"), created
    assert parse_lsn(after) <= parse_lsn(before)


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
            await until(lambda: health(app)[1]["status"] == "lagging", "unhealthy for the lag")
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


def test_livez_answers_200_while_start_waits_for_a_slot_held_elsewhere(
    dsn: str, admin: psycopg.Connection
) -> None:
    """A liveness probe must not restart an app whose start() waits (slot_wait_timeout) for a
    slot another consumer holds: /livez 200 ``starting``, /healthz 503 ``starting``."""
    admin.execute("CREATE TABLE item (id int PRIMARY KEY)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE item")
    options = {"publication": "pub", "durable_slot": True, "slot_name": "held_slot"}
    holder = WalEx(dsn, name="livez_holder", **options)
    waiting = WalEx(dsn, name="livez_waiting", metrics_port=0, slot_wait_timeout=120, **options)

    async def main() -> None:
        await holder.start()
        starting = asyncio.create_task(waiting.start())
        try:
            await until(lambda: waiting.observer.port is not None, "the endpoint served")
            url = f"http://127.0.0.1:{waiting.observer.port}"
            # start() retries the slot: well inside its 120 s wait
            await until(lambda: admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'livez_waiting'"
            ).fetchone()[0] > 0, "the waiting app connected")
            for _ in range(3):
                await asyncio.sleep(0.5)
                assert not starting.done(), starting
                status, body = await asyncio.to_thread(get, url + "/livez")
                assert status == 200 and json.loads(body)["status"] == "starting", (status, body)
                status, body = await asyncio.to_thread(get, url + "/healthz")
                assert status == 503 and json.loads(body)["status"] == "starting", (status, body)
            await holder.stop()  # the slot is free: the waiting app streams
            await asyncio.wait_for(starting, 60)
            await until(lambda: health(waiting)[0] == 200, "the waiting app streaming", timeout=30)
            status, body = await asyncio.to_thread(get, url + "/livez")
            assert status == 200 and json.loads(body)["status"] == "running", body
        finally:
            if not starting.done():
                starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            await holder.stop()
            await waiting.stop()

    run(main(), timeout=120)


def test_a_bulk_load_elsewhere_is_no_lag_and_releases_nothing(
    dsn: str, admin: psycopg.Connection
) -> None:
    """Lag is what walex was sent (or could have been) and has not confirmed: an uncommitted
    bulk INSERT into an unpublished table, with the handler idle, neither turns /healthz
    ``lagging`` nor makes max_lag_release drop the temporary slot; no published row is lost."""
    admin.execute("CREATE TABLE item (id int PRIMARY KEY)")
    admin.execute("CREATE TABLE bulk (id int, pad text)")
    admin.execute("CREATE PUBLICATION pub FOR TABLE item")

    async def main() -> tuple[list[int], list[tuple[int, Any]], list[str], int]:
        async with collecting(dsn, subscriptions=["item"], status_interval=0.3,
                              max_lag_bytes="1MB", max_lag_release=True) as rec:
            app = rec.app
            assert app is not None
            await until(lambda: health(app)[0] == 200, "healthy at first")
            loading = asyncio.get_running_loop().run_in_executor(None, _bulk_load, dsn)
            seen: list[tuple[int, Any]] = []
            pk = 0
            while not loading.done():
                pk += 1
                admin.execute("INSERT INTO item VALUES (%s)", (pk,))
                seen.append(_sample(app))
                await asyncio.sleep(0.1)
            wal = await loading
            await rec.wait_for(pk, timeout=60)
            for _ in range(10):  # and once the load committed (its changes are not published)
                await asyncio.sleep(0.3)
                seen.append(_sample(app))
            ids = [e.new_record["id"] for e in rec.events if e.new_record]
            assert app.pipeline.stats.lag_releases == 0
            return ids, seen, list(app.gaps), wal

    ids, seen, gaps, wal = run(main(), timeout=300)
    assert wal > 20_000_000  # the load wrote far more WAL than max_lag_bytes
    assert ids == list(range(1, len(ids) + 1)) and len(ids) > 3
    assert not gaps, gaps
    assert [s for s in seen if s[1] != "streaming"] == []


def _sample(app: WalEx) -> tuple[int, Any]:
    status, body = health(app)
    if status == 200:
        return status, body["status"]
    p, a = app.pipeline, app.pipeline.ack
    return status, (body, a.received, a.flushed, a.last_sent, a.after_flight, p.idle, p.held_back,
                    len(p.queue.items), p.in_hand, p.assembler.idle, p.stats.server_wal_end)


def _bulk_load(dsn: str) -> int:
    """A large INSERT into an unpublished table, left uncommitted for a while, then committed;
    the bytes of WAL it wrote."""
    with psycopg.connect(dsn) as conn:
        before = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        conn.execute("INSERT INTO bulk SELECT g, repeat('x', 40) FROM generate_series(1, 400000) g")
        time.sleep(2)  # uncommitted, with its WAL written
        conn.commit()
        after = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", [before]).fetchone()[0]
    return int(after)


def test_the_slot_monitor_notices_a_silent_partition_and_reconnects(
    pg_cluster: Any, drop_database: Any,
) -> None:
    """The network goes silent (a proxy drops every byte): the monitor's poll times out,
    says so and /healthz reports it; once the network is back the monitor reconnects and
    the lag guard and health checks work again."""
    if pg_cluster.cluster is None:
        pytest.skip("needs a throwaway cluster, not WALEX_TEST_DSN")
    sys.path.insert(0, str(Path(__file__).parent / "chaos"))
    from proxy import Proxy

    cluster = pg_cluster.cluster
    dbname = f"monitor_partition_{os.getpid()}"
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {dbname}")
    dsn = cluster.dsn(dbname)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE item (id int PRIMARY KEY)")
        conn.execute("CREATE PUBLICATION pub FOR TABLE item")
    proxy = Proxy("127.0.0.1", cluster.port).start()
    via_proxy = psycopg.conninfo.make_conninfo(dsn, port=proxy.port)

    async def main() -> None:
        async with collecting(via_proxy, status_interval=0.5, max_lag_bytes="1GB",
                              reconnect_max_attempts=1000, reconnect_backoff_max=2) as rec:
            app = rec.app
            assert app is not None
            stats = app.pipeline.stats
            await until(lambda: health(app)[0] == 200 and app.observer.monitor is not None,
                        "healthy, the monitor running")
            await until(lambda: stats.server_wal_end > 0, "a first poll")
            proxy.partition()
            await until(lambda: stats.monitor_error is not None, "the monitor noticing", timeout=90)
            assert "connection for the slot monitor" in stats.monitor_error, stats.monitor_error
            assert health(app)[0] == 503
            proxy.heal()
            await until(lambda: stats.monitor_error is None and health(app)[0] == 200,
                        "the monitor polling again, healthy", timeout=120)
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("INSERT INTO item VALUES (1)")
            await rec.wait_for(1, timeout=60)

    try:
        with_logs = logging.getLogger("walex")
        records: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
        with_logs.addHandler(handler)
        level = with_logs.level
        with_logs.setLevel(logging.INFO)
        try:
            run(main(), timeout=300)
        finally:
            with_logs.removeHandler(handler)
            with_logs.setLevel(level)
        assert any("connection for the slot monitor lost (the server did not answer" in m
                   for m in records), records
        assert any("slot monitor poll failed" in m for m in records), records
        assert any("the slot monitor reaches the server again" in m for m in records), records
    finally:
        proxy.stop()
        drop_database(dbname)  # its temporary slot's walsender may still be active


def test_healthz_of_an_app_streaming_from_a_standby(pg_cluster: Any) -> None:
    """PostgreSQL 16+ decodes on a standby; pg_current_wal_lsn() fails there (in recovery):
    the slot monitor reads the last WAL replayed, and /healthz says streaming, not
    'unreachable'."""
    if pg_cluster.cluster is None or pg_cluster.major_version < 16:
        pytest.skip("needs a throwaway cluster of PostgreSQL 16+")
    with Cluster(pg_cluster.cluster.bindir) as primary, standby_of(primary) as standby:
        with psycopg.connect(primary.dsn("postgres"), autocommit=True) as conn:
            conn.execute("CREATE TABLE item (id int PRIMARY KEY)")
            conn.execute("CREATE PUBLICATION pub FOR TABLE item")
        with psycopg.connect(standby, autocommit=True) as conn:
            wait_until(lambda: conn.execute(
                "SELECT 1 FROM pg_publication WHERE pubname = 'pub'").fetchone(),
                "the publication replayed on the standby")

        async def main() -> tuple[int, dict[str, Any]]:
            async with collecting(standby, metrics_port=0, status_interval=0.3) as rec:
                app = rec.app
                with psycopg.connect(primary.dsn("postgres"), autocommit=True) as conn:
                    conn.execute("INSERT INTO item VALUES (1)")
                await rec.wait_for(1, timeout=30)
                await until(lambda: app.pipeline.stats.server_wal_end > 0
                            or app.pipeline.stats.monitor_error is not None, "a monitor poll")
                await asyncio.sleep(1)  # a few more polls
                return health(app)

        code, body = run(main(), timeout=120)
    assert code == 200 and body["status"] == "streaming", body


def test_events_of_tables_past_the_first_thousand_share_one_series(
    dsn: str, admin: psycopg.Connection
) -> None:
    """1003 published tables, one row each in one transaction, then more rows in the first
    and the last: /metrics has a ``walex_events_total`` series for each of the first 1000
    tables seen and one ``table="(other)"`` per type for the rest (on main one per table,
    a scrape growing without bound with the tables), and both keep counting."""
    MAX_TABLES, OTHER_TABLES = 1000, "(other)"  # noqa: N806 (walex.observe.families')
    tables = MAX_TABLES + 3
    admin.execute(f"DO $$ BEGIN FOR i IN 1..{tables} LOOP "
                  "EXECUTE format('CREATE TABLE t%s (id int PRIMARY KEY)', i); END LOOP; END $$")
    admin.execute("CREATE PUBLICATION pub FOR ALL TABLES")
    port = free_port()

    def scrape() -> dict[str, float]:
        status, text = get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200, text
        return {k: v for k, v in samples(text).items() if k.startswith("walex_events_total")}

    async def main() -> None:
        async with collecting(dsn, metrics_port=port, status_interval=0.5) as rec:
            admin.execute(f"DO $$ BEGIN FOR i IN 1..{tables} LOOP "
                          "EXECUTE format('INSERT INTO t%s VALUES (1)', i); END LOOP; END $$")
            await until(lambda: len(rec.events) >= tables, "one event per table", timeout=60)
            found = await asyncio.to_thread(scrape)
            assert len(found) == MAX_TABLES + 1, len(found)
            other = f'walex_events_total{{table="{OTHER_TABLES}",type="insert"}}'
            assert found[other] == 3
            first = rec.events[0].table
            assert found[f'walex_events_total{{table="{first}",type="insert"}}'] == 1
            admin.execute(f"INSERT INTO t1 VALUES (2); INSERT INTO t{tables} VALUES (2)")
            await until(lambda: len(rec.events) >= tables + 2, "two more events")
            again = await asyncio.to_thread(scrape)
            assert len(again) == MAX_TABLES + 1 and again[other] == 4, again.get(other)
            assert again['walex_events_total{table="public.t1",type="insert"}'] == 2

    run(main(), timeout=180)
