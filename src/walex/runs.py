"""Runs of plain handler calls: several transactions' calls in one hand-off to the handlers' thread.

Used by both dispatcher loops (:mod:`walex.handoff` for the queued batches,
:mod:`walex.windowed` for the batches taken into a destination window): the
transactions that each go to exactly one plain (non-async) handler, or to
none, are handed to the handlers' thread as one run
(:meth:`walex.threads.Workers.run_handlers`), at most :data:`RUN` at once.
Contract: :func:`hand_run` says how many calls finished and what the next one
raised; the caller records the finished ones handled (in order), then has the
failing one go through :func:`recover_call` (retries and the error policy, as any
failed call), then calls the later ones, or not if the policy stopped the app.
No call starts once ``stopping()`` is true but the first of a run.
"""

from __future__ import annotations

from typing import Any

from .logs import TRANSACTION
from .transactions import Transaction

__all__ = ["RUN", "hand_run", "recover_call"]

RUN = 256  # most transactions handed to the handlers' thread at once


async def hand_run(p: Any, txns: Any, todos: list[Any], stopping: Any) -> tuple[int, Any]:
    """Hand the calls of ``todos`` (plans of kind PLAIN or NOTHING of ``txns[0]``,
    ``txns[1]``, ...) to the handlers' thread as one run
    (:meth:`~walex.threads.Workers.run_handlers`): how many finished, and what the next
    one raised, if it did. No call starts once ``stopping()`` (the first is always made).
    The caller records the finished ones, then has a failure go through :func:`recover_call`."""
    slot = p.slot_name
    calls = []
    for i, todo in enumerate(todos):
        txn = txns[i]
        calls.append((todo[1], todo[2], (slot, txn.commit_lsn, txn.xid)))
    p.in_hand = txns[0]
    return await p.dispatcher.workers.run_handlers(calls, TRANSACTION, stopping)


async def recover_call(p: Any, txn: Transaction, todo: Any, failure: BaseException) -> None:
    """The single call ``todo`` of ``txn``, made in a run, raised ``failure``: retries and
    the error policy (:meth:`~walex.dispatch.Dispatcher.recover`); raises HandlerError
    under "stop"."""
    p.in_hand = txn
    token = TRANSACTION.set((p.slot_name, txn.commit_lsn, txn.xid))
    try:
        await p.dispatcher.recover(txn, todo, failure)
    finally:
        TRANSACTION.reset(token)
