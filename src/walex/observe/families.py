"""Metric families with an owner's labels, as both collectors build them.

A collector (the app's :mod:`.metrics`, a worker's :mod:`.workers`) reads its
counters when scraped and yields Prometheus families that all carry the
owner's labels (``app``/``slot``, ``worker``/``group``), some with one or two
labels more (a table and type, a partition, a destination). Needs
``prometheus-client`` (walex[metrics]); imported only by a collector.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from .stats import Buckets

__all__ = ["Families", "MAX_TABLES", "OTHER_TABLES"]

_KINDS = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily}
MAX_TABLES = 1000  # tables with walex_events_total series of their own (Families.events)
OTHER_TABLES = "(other)"  # the table label of the events of the tables past them


class Families:
    """Builds families labelled ``names`` = ``base`` (plus any ``extra`` labels)."""

    def __init__(self, names: list[str], base: list[str]) -> None:
        self.names = names
        self.base = base

    def counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(name, doc, labels=self.names)
        family.add_metric(self.base, value)
        return family

    def gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=self.names)
        family.add_metric(self.base, value)
        return family

    def histogram(self, name: str, doc: str, buckets: Buckets) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, doc, labels=self.names)
        family.add_metric(self.base, buckets.cumulative(), buckets.sum)
        return family

    def labelled(self, kind: str, name: str, doc: str, extra: list[str],
                 values: Iterable[tuple[tuple[Any, ...], float]]) -> Any:
        """A counter or gauge with the ``extra`` labels: ``values`` gives (their values, figure)."""
        family = _KINDS[kind](name, doc, labels=[*self.names, *extra])
        for labels, value in values:
            family.add_metric([*self.base, *map(str, labels)], value)
        return family

    def events(self, name: str, counts: dict[tuple[str, str, str], int]) -> CounterMetricFamily:
        """Events handled, by table (``schema.table``, as ``Event.table``) and type.

        The first :data:`MAX_TABLES` tables seen have series of their own; the events of
        any later one are summed, per type, under ``table="(other)"``. A table keeps its
        place (``counts`` only grows, in the order tables were first seen), so every
        series stays a counter; a scrape stays small with tens of thousands of tables.
        """
        tables: dict[tuple[str, str], str] = {}
        other: dict[str, int] = {}
        values = []
        for (schema, table, kind), count in list(counts.items()):
            label = tables.get((schema, table))
            if label is None:
                label = tables[(schema, table)] = (
                    f"{schema}.{table}" if len(tables) < MAX_TABLES else OTHER_TABLES)
            if label is OTHER_TABLES:
                other[kind] = other.get(kind, 0) + count
            else:
                values.append(((label, kind), count))
        values.extend(((OTHER_TABLES, kind), count) for kind, count in other.items())
        return self.labelled("counter", name, "Events handled, by table (schema.table) and type.",
                             ["table", "type"], values)
