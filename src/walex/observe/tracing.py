"""OpenTelemetry spans (``tracing=True``, needs walex[otel]), after the messaging conventions.

One ``CONSUMER`` span per handled batch, ``process <publication>``, around
every handler and function call of the batch: a handler's own spans (an
instrumented HTTP client, a database driver) become its children, as the
span is current in the handler's task or thread. One ``PRODUCER`` span per
destination publish, ``send <destination>``, made by :meth:`Tracer.publish`;
:meth:`Tracer.inject` writes the W3C ``traceparent`` into a message's
headers, so the service that receives the change continues the trace.

walex only uses the OpenTelemetry API: the program configures the SDK and an
exporter (OTLP, console...); without one the spans are no-ops.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import propagate, trace

from ..event import WALEX_VERSION
from ..lsn import format_lsn

if TYPE_CHECKING:
    from ..config import WalExSettings
    from ..transactions import Transaction

__all__ = ["Tracer"]


class Tracer:
    def __init__(self, settings: WalExSettings, slot: str) -> None:
        self.tracer = trace.get_tracer("walex", WALEX_VERSION)
        self.publication = settings.publication
        self.slot = slot
        self.app = settings.name

    @contextmanager
    def batch(self, txn: Transaction) -> Iterator[Any]:
        events = txn.events
        attributes: dict[str, Any] = {
            "messaging.system": "postgresql",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": self.publication,
            "messaging.consumer.group.name": self.slot,
            "messaging.batch.message_count": len(events),
            "walex.app": self.app,
            "walex.slot": self.slot,
            "walex.lsn": format_lsn(txn.commit_lsn),
            "walex.xid": txn.xid,
            "walex.last_batch": txn.last,
            "walex.tables": sorted({f"{s}.{t}" for s, t in {(e.source.schema, e.name)
                                                             for e in events}}),
        }
        if len(events) == 1:
            attributes["messaging.message.id"] = events[0].id
        if events:
            attributes["db.namespace"] = events[0].source.db
        with self.tracer.start_as_current_span(
            f"process {self.publication}", kind=trace.SpanKind.CONSUMER, attributes=attributes,
        ) as span:
            yield span

    @contextmanager
    def publish(self, system: str, destination: str, count: int) -> Iterator[Any]:
        """A span around one destination publish of ``count`` events."""
        with self.tracer.start_as_current_span(
            f"send {destination}", kind=trace.SpanKind.PRODUCER, attributes={
                "messaging.system": system,
                "messaging.operation.type": "send",
                "messaging.operation.name": "send",
                "messaging.destination.name": destination,
                "messaging.batch.message_count": count,
                "walex.slot": self.slot,
            },
        ) as span:
            yield span

    @staticmethod
    def inject(headers: dict[str, str]) -> dict[str, str]:
        """Add the current trace context (``traceparent``) to a message's headers."""
        propagate.inject(headers)
        return headers
