"""Is the app healthy? The answers of ``/healthz`` and ``/livez``, from what the app knows.

``health`` is healthy only while the app streams, its slot is not lost, every
destination delivered (none has failed every attempt for longer than
``Destinations.unhealthy_after``), the monitor could reach the server at its
last poll, and the lag (the server's
WAL end minus the position acknowledged to it) is within ``max_lag_bytes``.
``liveness`` is alive while the app runs at all: reconnecting, or waiting as
a standby, included. Each returns the HTTP status and a JSON-able body whose
``reason`` says why when it is not 200.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..lsn import format_lsn

if TYPE_CHECKING:
    from ..app import WalEx

__all__ = ["acknowledged", "lag_bytes", "health", "liveness"]


def acknowledged(app: WalEx) -> int:
    """The flush position last sent to the server (before the first: the start position)."""
    ack = app.pipeline.ack
    return ack.last_sent if ack.last_sent >= 0 else ack.flushed


def lag_bytes(app: WalEx) -> int | None:
    """Server WAL end (latest seen on the stream or by the monitor) minus acknowledged."""
    acked = acknowledged(app)
    if acked <= 0:
        return None  # nothing known yet (not streamed from the slot so far)
    end = max(app.pipeline.ack.received, app.pipeline.stats.server_wal_end)
    return max(0, end - acked)


def _running(app: WalEx) -> bool:
    return bool(app._tasks) and not app._stopping


def liveness(app: WalEx) -> tuple[int, dict[str, Any]]:
    stats = app.pipeline.stats
    if stats.standby:
        return 200, {"status": "standby", "slot": app.slot_name}
    if not _running(app):
        return 503, {"status": "stopped", "reason": "the app is not running"}
    return 200, {"status": "running", "slot": app.slot_name}


def health(app: WalEx) -> tuple[int, dict[str, Any]]:
    p, stats, settings = app.pipeline, app.pipeline.stats, app.settings
    body: dict[str, Any] = {"slot": app.slot_name}
    lag = lag_bytes(app)
    body["lag_bytes"] = lag
    body["acknowledged_lsn"] = format_lsn(acknowledged(app))
    if stats.standby:
        reason = (f"standby: slot {app.slot_name!r} is held by another instance; taking over "
                  "when it is free")
        return 503, {"status": "standby", "reason": reason, **body}
    if not _running(app):
        return 503, {"status": "stopped", "reason": "the app is not running", **body}
    repl = p.repl
    if repl is None or not repl.streaming:
        return 503, {"status": "reconnecting",
                     "reason": f"not streaming: reconnecting to {settings.display_target()}",
                     **body}
    if stats.slot_wal_status == "lost":
        return 503, {"status": "slot_lost",
                     "reason": f"slot {app.slot_name!r} was invalidated (wal_status = 'lost')",
                     **body}
    trouble = getattr(app.destinations, "trouble", None)  # an app with destinations
    reason = trouble() if trouble is not None else None
    if reason is not None:
        return 503, {"status": "destination_failing", "reason": reason, **body}
    if stats.monitor_error is not None:
        return 503, {"status": "unreachable",
                     "reason": f"cannot query the server: {stats.monitor_error}", **body}
    limit = settings.max_lag_bytes
    if limit is not None and lag is not None and lag > limit:
        return 503, {"status": "lagging",
                     "reason": f"lag of {lag} bytes is over max_lag_bytes ({int(limit)})", **body}
    return 200, {"status": "streaming", **body}
