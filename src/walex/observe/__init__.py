"""Operating an app: metrics, health, the lag guard, tracing.

Contract:

- **Cheap on the hot path.** The pipeline keeps plain integer counters
  (transactions, events, pending bytes, the acknowledgement positions); the
  Prometheus collector (:mod:`.metrics`) reads them when scraped. Only per
  *batch* does an observed app do more: one histogram bucket for the time
  from commit to handler, one C-level ``Counter.update`` for the events per
  table and type, and, when tracing, one span. Nothing here runs per event in
  Python code, and nothing at all when ``metrics_port`` and ``tracing`` are off.
- **Optional dependencies.** ``prometheus-client`` (extra ``walex[metrics]``)
  for ``metrics_port``, ``opentelemetry-api`` (extra ``walex[otel]``) for
  ``tracing``; imported only when the option is on, and an option on without
  its package is a :class:`~walex.errors.ConfigError` naming the extra when
  the app is created. ``import walex`` imports neither.
- **Health from what the app knows.** ``/healthz`` answers 200 only while
  the app streams and its lag (the WAL sent to walex a poll ago and still
  not confirmed, :func:`.health.measure`) is within ``max_lag_bytes``;
  otherwise 503, always with a JSON body whose ``reason`` says why.
  ``/livez`` answers 200 while the app runs at all (starting, reconnecting
  or as a standby included). Both are served from the
  app's event loop, so a blocked loop fails them.
- **The monitor** polls the slot on a connection of its own every
  ``status_interval`` seconds (each poll with a deadline): the server's WAL
  end, the slot's ``wal_status`` and ``safe_wal_size``; it measures the lag. Beyond ``max_lag_bytes`` it logs
  (once per crossing), turns ``/healthz`` to 503 and, with
  ``max_lag_release`` on a temporary slot, ends the slot's walsender so
  PostgreSQL frees the WAL (the changes it held are a reported gap). The
  monitor never raises into the app: a failed poll is a health reason.
- **Destinations** report each publish with :meth:`Stats.record_publish`
  (count, seconds, success) and wrap it in :func:`.tracing.publish_span`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .stats import Stats

if TYPE_CHECKING:
    from ..app import WalEx
    from ..config import WalExSettings

__all__ = ["Observer", "Stats", "check_extras", "require_extra"]

log = logging.getLogger("walex")

_EXTRAS = {
    "metrics_port": ("prometheus_client", "prometheus-client", "metrics"),
    "tracing": ("opentelemetry", "opentelemetry-api", "otel"),
}


def require_extra(option: str) -> None:
    """A ConfigError naming the extra when ``option`` needs a package that is missing."""
    module, package, extra = _EXTRAS[option]
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"{option} needs the {package} package, which is not installed: "
            f"pip install 'walex[{extra}]'"
        )


def check_extras(settings: WalExSettings) -> None:
    """A ConfigError naming the extra when an option needs a package that is missing."""
    wanted = {"metrics_port": settings.metrics_port is not None, "tracing": settings.tracing}
    for option, on in wanted.items():
        if on:
            require_extra(option)


class Observer:
    """The metrics and health endpoint, the monitor and tracing of one app."""

    def __init__(self, app: WalEx) -> None:
        check_extras(app.settings)
        self.app = app
        self.stats: Stats = app.pipeline.stats
        self.server: Any = None  # .server.HttpServer
        self.monitor: asyncio.Task[None] | None = None
        self.port: int | None = None  # the bound port, once started

    async def start(self) -> None:
        """Serve /metrics and /healthz (before the slot is had: a standby answers too)."""
        settings = self.app.settings
        check_extras(settings)
        pipeline = self.app.pipeline
        pipeline.observer = None
        pipeline.counting = None
        if settings.metrics_port is not None or settings.tracing:
            tracer = None
            if settings.tracing:
                from .tracing import Tracer

                tracer = Tracer(settings, self.app.slot_name)
            self.stats.tracer = tracer
            pipeline.observer = self.stats.observing(self.app.slot_name, tracer)
            # metrics alone: counted by hooks, so the dispatcher keeps its runs (walex.handoff)
            pipeline.counting = self.stats if tracer is None else None
        if settings.metrics_port is not None:
            from .health import health, liveness
            from .metrics import registry  # prometheus_client, only when serving
            from .server import HttpServer

            app = self.app
            server = HttpServer({"app": settings.name}, registry(app),
                                lambda: health(app), lambda: liveness(app))
            self.port = await server.start(settings.metrics_host, settings.metrics_port)
            self.server = server  # only once it serves (a ConfigError leaves none)
            log.info("walex %r serves /metrics, /healthz and /livez on %s:%d",
                     settings.name, settings.metrics_host, self.port)

    def streaming(self) -> None:
        """The app streams: start the monitor when something reads what it finds."""
        s = self.app.settings
        if self.monitor is None and (s.metrics_port is not None or s.max_lag_bytes is not None):
            from .monitor import Monitor

            self.monitor = asyncio.get_running_loop().create_task(
                Monitor(self.app).run(), name=f"walex-{s.name}-monitor")

    async def stop(self) -> None:
        if self.monitor is not None:
            self.monitor.cancel()
            await asyncio.gather(self.monitor, return_exceptions=True)
            self.monitor = None
        if self.server is not None:
            await self.server.stop()
            self.server = None
