"""Fixtures of the fault-injection suite: a cluster of its own, the run summary.

``chaos_cluster`` is a private :class:`~walex.embedded.Cluster` per server
version (the bin dir of ``pg_cluster``), so restarts and settings changes
never disturb the other tests. Every scenario's figures are collected,
written to ``tests/chaos/last_run.json`` (after each scenario, so an
interrupted run leaves what it did) and printed at the end of the session.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness import RESULTS, SUMMARY  # noqa: E402
from walex.embedded import Cluster  # noqa: E402


@pytest.fixture(scope="module")
def chaos_cluster(pg_cluster: Any) -> Iterator[Cluster]:
    if pg_cluster.cluster is None:
        pytest.skip("the chaos suite restarts servers: it needs a throwaway cluster, not WALEX_TEST_DSN")
    with Cluster(pg_cluster.cluster.bindir) as cluster:
        yield cluster


@pytest.fixture
def seed() -> int:
    return int(os.environ.get("WALEX_CHAOS_SEED") or random.randrange(1 << 30))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("walex chaos runs")
    tr.write_line(f"{'scenario':<22}{'pg':>4}{'faults':>8}{'events':>9}{'dups':>7}"
                  f"{'lost':>6}{'early':>7}{'procs':>7}{'recon':>7}{'secs':>7}  violations")
    for r in RESULTS:
        tr.write_line(
            f"{r['scenario']:<22}{r['server']:>4}{r['faults']:>8}{r['events_delivered']:>9}"
            f"{r['duplicates']:>7}{r['lost']:>6}{r['early_acks']:>7}{r['consumer_processes']:>7}"
            f"{r['reconnects']:>7}{r['seconds']:>7}  {len(r['violations'])}"
        )
    tr.write_line(f"summary written to {SUMMARY}")
