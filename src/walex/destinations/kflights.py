"""The Kafka destination's groups handed over ahead: their failed records, their ends.

:class:`Failures` records the failed delivery reports of one group (the producer calls
back only for those: ``delivery.report.only.error``). Its bound ``delivered`` is the
callback of every record of the group, and the client (confluent-kafka) holds a
reference to that callback per record until the record's report was served (its
per-message state: the callback taken at ``produce``, released once the report was
served, after the call of a failed record's). So the records of a group not yet
reported are the references to its callback beyond those the group's :class:`Flight`
holds itself (:func:`held`): the group's end is told with no call into Python for a
record that succeeded, whatever the partitions of its records.

:func:`watch` serves the producer's reports on the event loop while groups are in
flight, and gives each flight its outcome (its ``answer``), in order: None once every
record of it was reported (its failures then tell), or an
:class:`~walex.destinations.base.Unavailable` when its deadline passed first or the
producer failed (a fatal error) or was closed.
"""

from __future__ import annotations

import asyncio
import sys
from collections import deque
from collections.abc import Callable
from typing import Any

from ..errors import DestinationError
from .base import Unavailable

__all__ = ["FIRST_PAUSE", "LONGEST_PAUSE", "Failures", "Flight", "held", "watch"]

FIRST_PAUSE = 0.0005  # seconds between the first two services of the reports on the loop
LONGEST_PAUSE = 0.002  # ... and the longest (the publish of a group uses them too)


class Failures:
    """The failed delivery reports of one batch or group: ``error`` is a record refused
    for good (:attr:`refused`, the first one) if any, else the first failure."""

    __slots__ = ("classify", "first", "refused")

    def __init__(self, classify: Callable[[Any, str], Exception]) -> None:
        self.classify = classify
        self.first: Exception | None = None
        self.refused: DestinationError | None = None

    @property
    def error(self) -> Exception | None:
        return self.refused if self.refused is not None else self.first

    def delivered(self, err: Any, msg: Any) -> None:
        if err is None:
            return
        if self.first is not None and self.refused is not None:
            return
        error = self.classify(err, msg.topic() if msg is not None else "?")
        if self.first is None:
            self.first = error
        if self.refused is None and isinstance(error, DestinationError):
            self.refused = error


def held(flight: Flight) -> int:
    """The references to the flight's callback (the same call for the base and the checks)."""
    return sys.getrefcount(flight.callback)


class Flight:
    """A group handed over ahead: ``answer`` is done with its outcome (see :func:`watch`).

    ``callback`` (``failures.delivered``, one bound method for every record of the
    group) is held by the flight alone but for the client's per-record references:
    ``base`` is :func:`held` before any record was produced."""

    __slots__ = ("answer", "base", "callback", "count", "counted", "deadline", "failures",
                 "size")

    def __init__(self, failures: Failures, answer: asyncio.Future[Exception | None],
                 deadline: float, size: int) -> None:
        self.failures = failures
        self.callback = failures.delivered
        self.base = held(self)
        self.answer = answer
        self.deadline = deadline
        self.size = size  # the batch's items
        self.count = 0  # the records produced (the batch's, and tombstones)
        self.counted = True  # False: the references do not count its records (see kafka)

    def outstanding(self) -> int:
        """Records of the group not yet reported."""
        return held(self) - self.base


async def watch(producer: Any, flights: deque[Flight], poll: Callable[[Any], None],
                failed: Callable[[], str | None], timeout: float) -> None:
    """Serve ``producer``'s reports on the event loop while ``flights`` (appended to by
    the destination, in order) is not empty; each front flight done is taken off with
    its outcome. ``failed()`` says why the producer cannot go on (None: it can). The
    pause between two services doubles from :data:`FIRST_PAUSE` up to
    :data:`LONGEST_PAUSE` (the thread of a publish's flush would fight the event loop,
    busy handing the next group over, for the GIL at each report)."""
    loop = asyncio.get_running_loop()
    pause = FIRST_PAUSE
    while flights:
        poll(producer)
        why = failed()
        empty = not len(producer)  # every record reported: every flight is done
        now = loop.time()
        while flights:
            flight = flights[0]
            if why is not None:
                outcome: Exception | None = Unavailable(f"the producer failed: {why}")
            elif empty or (flight.counted and flight.outstanding() == 0):  # (below 0
                # would be a miscount: then only an empty producer tells)
                outcome = None
            elif now >= flight.deadline:
                outcome = Unavailable(f"{flight.outstanding()} of {flight.count} records were "
                                      f"not confirmed within {timeout:g}s")
            else:
                break
            flights.popleft()
            if not flight.answer.done():
                flight.answer.set_result(outcome)
            pause = FIRST_PAUSE
        if flights:
            await asyncio.sleep(pause)
            pause = min(pause * 2, LONGEST_PAUSE)
