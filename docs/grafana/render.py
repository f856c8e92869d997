"""Draw docs/grafana/dashboard.png: the panels of walex-dashboard.json, from real scraped metrics.

Grafana does not run here, so this script plays its part: it starts a
throwaway PostgreSQL (the embedded wheel), runs a walex app with
``metrics_port``, drives a workload through three phases (steady, a slow
handler that builds up lag, recovery) with a handler that fails now and then
(retried), scrapes ``/metrics`` every second like Prometheus, and plots what
the dashboard's queries compute (rates over 5 s, quantiles from histogram
buckets) with matplotlib::

    .venv/bin/python docs/grafana/render.py      # needs walex[metrics,bench]
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import psycopg  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from walex import Events, WalEx  # noqa: E402
from walex.embedded import Cluster  # noqa: E402

OUT = Path(__file__).with_name("dashboard.png")
PHASES = [(0, 25, "steady"), (25, 45, "slow handler"), (45, 75, "recovered")]
DURATION = PHASES[-1][1]
WINDOW = 5  # seconds, the rate() window


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k not in ("app", "slot")))
            found[(sample.name, labels)] = sample.value
    return found


def main() -> None:
    state = {"slow": False, "calls": 0}
    events = Events()

    @events.on_event("orders")
    async def orders(batch: list[Any]) -> None:
        if state["slow"]:
            await asyncio.sleep(0.05)

    @events.on_event("customers")
    async def customers(batch: list[Any]) -> None:
        state["calls"] += 1
        if state["calls"] % 40 == 0:
            raise RuntimeError("flaky downstream")  # retried once, then fine

    series: list[tuple[float, dict[Any, float]]] = []
    with Cluster() as cluster:
        dsn = cluster.dsn()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE orders (id serial PRIMARY KEY, total numeric, note text)")
            conn.execute("CREATE TABLE customers (id serial PRIMARY KEY, name text)")
            conn.execute("CREATE PUBLICATION shop FOR ALL TABLES")
        app = WalEx(dsn, publication="shop", modules=[events], name="shop", durable_slot=True,
                    metrics_port=0, status_interval=1, max_retries=2, retry_backoff=0.01,
                    max_lag_bytes="2MiB")
        stop = threading.Event()
        start = time.monotonic()

        def workload() -> None:
            rng = random.Random(7)
            with psycopg.connect(dsn, autocommit=True) as conn:
                while not stop.is_set():
                    elapsed = time.monotonic() - start
                    state["slow"] = 25 <= elapsed < 45
                    with conn.transaction():
                        rows = rng.randint(1, 12)
                        conn.execute("INSERT INTO orders (total, note) SELECT random() * 100, "
                                     "repeat('x', 200) FROM generate_series(1, %s)", (rows,))
                        if rng.random() < 0.3:
                            conn.execute("UPDATE orders SET total = total + 1 WHERE id = "
                                         "(SELECT max(id) FROM orders)")
                        if rng.random() < 0.2:
                            conn.execute("INSERT INTO customers (name) VALUES ('c')")
                    time.sleep(0.004 + 0.003 * abs(((elapsed % 20) - 10) / 10))

        async def run() -> None:
            async with app:
                url = f"http://127.0.0.1:{app.observer.port}/metrics"
                writer = threading.Thread(target=workload)
                writer.start()
                try:
                    while (now := time.monotonic() - start) < DURATION:
                        series.append((now, await asyncio.to_thread(scrape, url)))
                        await asyncio.sleep(1)
                finally:
                    stop.set()
                    await asyncio.to_thread(writer.join)

        asyncio.run(run())
    plot(series)


def rate(series: list[tuple[float, dict[Any, float]]], key: Any) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i in range(WINDOW, len(series)):
        (t0, a), (t1, b) = series[i - WINDOW], series[i]
        xs.append(t1)
        ys.append((b.get(key, 0) - a.get(key, 0)) / (t1 - t0))
    return xs, ys


def quantile(series: list[tuple[float, dict[Any, float]]], q: float) -> tuple[list[float], list[float]]:
    """histogram_quantile(q, rate(..._bucket[5s])), with linear interpolation in the bucket."""
    xs, ys = [], []
    for i in range(WINDOW, len(series)):
        (_, a), (t1, b) = series[i - WINDOW], series[i]
        buckets = sorted(
            (float(dict(labels)["le"]), b[(name, labels)] - a.get((name, labels), 0))
            for name, labels in b if name == "walex_commit_to_handler_seconds_bucket")
        total = buckets[-1][1]
        if total <= 0:
            continue
        rank, lower, below = q * total, 0.0, 0.0
        for upper, count in buckets:
            if count >= rank:
                upper = upper if upper != float("inf") else lower
                share = (rank - below) / (count - below) if count > below else 1
                xs.append(t1)
                ys.append(lower + (upper - lower) * share)
                break
            lower, below = upper, count
    return xs, ys


def plot(series: list[tuple[float, dict[Any, float]]]) -> None:
    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.titleweight": "bold"})
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.2))
    fig.patch.set_facecolor("#111217")
    for ax in axes.flat:
        ax.set_facecolor("#181b1f")
        ax.tick_params(colors="#ccccdc")
        ax.title.set_color("#ccccdc")
        for spine in ax.spines.values():
            spine.set_color("#2c3235")
        ax.grid(color="#2c3235", linewidth=0.6)
        for start, end, name in PHASES[1:2]:
            ax.axvspan(start, end, color="#ff9830", alpha=0.08)
        ax.set_xlim(0, DURATION)
    keys = sorted({k for _, sample in series for k in sample if k[0] == "walex_events_total"},
                  key=lambda k: k[1])
    ax = axes[0, 0]
    for key in keys:
        labels = dict(key[1])
        ax.plot(*rate(series, key), label=f"{labels['table']} {labels['type']}")
    ax.set_title("Events handled per second, by table and type")
    ax.legend(facecolor="#181b1f", labelcolor="#ccccdc", edgecolor="#2c3235")

    ax = axes[0, 1]
    lag = [(t, s.get(("walex_lag_bytes", ()), 0) / 1048576) for t, s in series]
    pending = [(t, s.get(("walex_pending_bytes", ()), 0) / 1048576) for t, s in series]
    ax.plot(*zip(*lag), label="lag (server WAL end - acknowledged)", color="#f2495c")
    ax.plot(*zip(*pending), label="pending (received, not handled)", color="#5794f2")
    ax.axhline(2, color="#ff9830", linestyle="--", linewidth=1, label="max_lag_bytes")
    ax.set_title("Lag, MiB")
    ax.legend(facecolor="#181b1f", labelcolor="#ccccdc", edgecolor="#2c3235")

    ax = axes[0, 2]
    for q, color in ((0.5, "#73bf69"), (0.95, "#fade2a"), (0.99, "#f2495c")):
        xs, ys = quantile(series, q)
        ax.plot(xs, ys, label=f"p{int(q * 100)}", color=color)
    ax.set_yscale("log")
    ax.set_title("Commit to handler, seconds")
    ax.legend(facecolor="#181b1f", labelcolor="#ccccdc", edgecolor="#2c3235")

    ax = axes[1, 0]
    ax.plot(*rate(series, ("walex_transactions_total", ())), color="#b877d9")
    ax.set_title("Transactions per second")

    ax = axes[1, 1]
    for name, label, color in (("walex_handler_errors_total", "errors", "#f2495c"),
                               ("walex_handler_retries_total", "retries", "#fade2a"),
                               ("walex_handler_failures_total", "given up", "#8e8e8e")):
        ax.plot(*rate(series, (name, ())), label=label, color=color)
    ax.set_title("Handler errors and retries per second")
    ax.legend(facecolor="#181b1f", labelcolor="#ccccdc", edgecolor="#2c3235")

    ax = axes[1, 2]
    health = [(t, 1 if s.get(("walex_lag_bytes", ()), 0) <= 2 * 1048576 else 0) for t, s in series]
    streaming = [(t, s.get(("walex_streaming", ()), 0)) for t, s in series]
    ax.step(*zip(*streaming), where="post", label="streaming", color="#73bf69")
    ax.step(*zip(*health), where="post", label="/healthz 200 (lag within limit)", color="#5794f2",
            linestyle="--")
    ax.set_ylim(-0.1, 1.3)
    ax.set_title("Streaming and health")
    ax.legend(facecolor="#181b1f", labelcolor="#ccccdc", edgecolor="#2c3235", loc="lower right")

    for ax in axes[1]:
        ax.set_xlabel("seconds (shaded: the handler is slow)", color="#ccccdc")
    fig.suptitle("walex dashboard: docs/grafana/walex-dashboard.json panels, drawn from metrics "
                 "scraped off a running app", color="#ccccdc", fontsize=11)
    fig.tight_layout()
    fig.savefig(OUT, dpi=90, facecolor=fig.get_facecolor())
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
