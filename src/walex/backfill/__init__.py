"""Existing rows as ``read`` events: the initial snapshot and backfills.

Contract:

- ``WalEx(..., snapshot="initial")``: when the app's first session creates
  its slot (a durable slot's first start; every start of a temporary one),
  every subscribed table is backfilled. ``await app.backfill("table",
  where=None)`` and ``walex backfill TABLE [--where SQL]`` backfill one table
  (or the rows matching a condition) at any time while the app streams.
- A backfill delivers each existing row once as an event of type
  ``EventType.READ`` (``new_record`` set, typed exactly as an insert of the
  row would be), through the same handlers (``on_read``, ``on_event``),
  filters and acknowledgement as streamed events. It never overwrites a
  newer change: a row changed in the stream while its chunk is read reaches
  handlers from the stream, not from the chunk (the watermark protocol,
  :mod:`.watermarks`; read again with a later chunk when the stream's change
  lacked a column, an unchanged TOASTed value). At the end, a handler that applies read, insert,
  update and delete events to a copy holds what the table holds.
- Rows are read in chunks of ``backfill_chunk_size`` in key order (keyset
  pagination on the primary key, the replica identity index, or as a
  fallback a unique index on NOT NULL columns; a table without any is a
  :class:`~walex.errors.SetupError`), on a connection of their own, while the
  stream flows. A chunk also ends once its rows hold a quarter of
  ``max_pending_bytes`` in memory (counted as :mod:`walex.sizes` counts streamed
  batches), the rows it reads again for a TOASTed value included (within half
  of it, the rest left to later chunks): memory holds about two chunks plus
  the handlers' queue.
  A change of the key (its columns, or their types or collations, which decide
  the order) starts the job over from the first row.
- A condition (``where``) is one SQL expression, checked before it is used
  (:func:`.runner.check_condition`). ``app.cancel_backfill(table)`` and
  ``walex backfill TABLE --cancel`` cancel a job.
- Progress is stored per app and table in the database (:mod:`.store`) once
  a chunk's events were handled: a backfill stopped or killed resumes after
  its last completed chunk (at-least-once: the chunks handled since the last
  mark may be delivered again, never skipped), and ``walex status`` shows it.
- Read event ids, ``<commit LSN of the chunk's high watermark>-R<index>``,
  never collide with streamed ids and increase in stream order with them. The
  reads of chunks not yet marked done when a run stopped (a crash, a lost
  standby lock) are replayed by the next run where they went out, under the
  same ids, when the slot sends their high watermark again (:mod:`.replay`);
  rows changed since, and chunks whose watermark the slot no longer sends, are
  read anew under new ids, with current values. With ``standby=True`` only
  the instance holding the lock runs jobs; one that loses it stops its job.
- Needs PostgreSQL 14+ (pgoutput's ``messages`` option, turned on for every
  stream; a ``message_middleware`` therefore also sees
  :class:`~walex.pgoutput.messages.LogicalMessage` s).

Modules: :mod:`.target` (table, key, columns), :mod:`.chunks` (reading and
typing a chunk), :mod:`.watermarks` (the stream side), :mod:`.keys` (keys
compared as PostgreSQL compares them), :mod:`.store`
(progress), :mod:`.report` (progress for people), :mod:`.runner` (the
jobs), :mod:`.requests` (asking, cancelling), :mod:`.replay` (reads of a
stopped run sent again), :mod:`.visibility` (commits not yet visible),
:mod:`.command` (``walex backfill``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .runner import Backfills
    from .store import Job

__all__ = ["Backfills", "Job"]


def __getattr__(name: str) -> Any:
    """``Backfills`` and ``Job`` imported when first asked for (PEP 562): importing
    :mod:`.command` or :mod:`.report` (the CLI) loads neither the runner nor psycopg."""
    module = {"Backfills": "runner", "Job": "store"}.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next access is a plain module attribute
    return value
