"""A committed transaction's events, as handlers and destinations receive them.

:class:`Transaction` is what :mod:`walex.assembler` hands on (from the
replication stream) and what a worker builds from what a relay published
(:mod:`walex.workers`): this module imports only the event types, so a worker
dispatches transactions without the pgoutput row typing (psycopg).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from .event import Event
from .records import Record

__all__ = ["Transaction"]


@dataclass(slots=True, repr=False, eq=False)
class Transaction(Record):
    """A committed transaction's events: all of them, or one batch of a large one.

    ``end_lsn`` (the end of the commit record, what is acknowledged) is known
    on the ``last`` batch only; earlier batches carry 0. ``size``: bytes of the
    messages the events came from, until the pipeline sets it to what the events
    take in memory (what its ``max_pending_bytes`` counts, :mod:`walex.sizes`).
    """

    xid: int
    commit_lsn: int
    end_lsn: int
    commit_time: datetime
    events: list[Event]
    origin: str | None = None
    last: bool = True
    size: int = 0
