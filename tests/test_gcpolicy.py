"""walex.gcpolicy: the GC's young threshold raised while apps stream, and given back."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from walex import gcpolicy


@pytest.fixture(autouse=True)
def default_thresholds() -> Iterator[None]:
    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    yield
    gc.set_threshold(*before)


def test_raised_while_held_and_restored_by_the_last_release() -> None:
    gcpolicy.hold(10_000)
    assert gc.get_threshold() == (10_000, 10, 10)
    gcpolicy.hold(20_000)  # a second app
    assert gc.get_threshold() == (20_000, 10, 10)
    gcpolicy.release(20_000)
    assert gc.get_threshold()[0] >= 10_000  # the first app still streams
    gcpolicy.release(10_000)
    assert gc.get_threshold() == (700, 10, 10)
    gcpolicy.release(10_000)  # a release without hold changes nothing
    assert gc.get_threshold() == (700, 10, 10)


def test_never_lowers_never_enables_and_keeps_a_change_made_meanwhile() -> None:
    gc.set_threshold(50_000, 5, 5)
    gcpolicy.hold(10_000)
    assert gc.get_threshold() == (50_000, 5, 5)
    gcpolicy.release(10_000)
    assert gc.get_threshold() == (50_000, 5, 5)

    gc.set_threshold(0, 10, 10)  # automatic collection disabled by the user: left so
    gcpolicy.hold(10_000)
    assert gc.get_threshold() == (0, 10, 10)
    gcpolicy.release(10_000)
    assert gc.get_threshold() == (0, 10, 10)

    gc.set_threshold(700, 10, 10)
    gcpolicy.hold(10_000)
    gc.set_threshold(3_000, 10, 10)  # the user's own change while streaming
    gcpolicy.release(10_000)
    assert gc.get_threshold() == (3_000, 10, 10)

    gc.set_threshold(700, 10, 10)
    gcpolicy.hold(0)  # gc_threshold=0: the GC is left alone
    assert gc.get_threshold() == (700, 10, 10)
    gcpolicy.release(0)
    assert gc.get_threshold() == (700, 10, 10)
