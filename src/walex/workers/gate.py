"""How many handler calls a worker runs at once: its ``concurrency`` slots.

:class:`Gate` is what ``asyncio.Semaphore`` is to the worker, with the
uncontended entry a plain method: a free slot and nobody waiting is taken
without a coroutine (``asyncio.Semaphore``'s ``async with`` costs eight
Python calls, ``locked()``'s generator among them, on every call a NATS worker
makes: one per event). Otherwise the caller waits its turn (first come, first
served); a slot handed to a waiter that is cancelled before it resumes goes on
to the next one, so a cancelled call never keeps nor loses a slot.
"""

from __future__ import annotations

import asyncio
from collections import deque

__all__ = ["Gate"]


class Gate:
    """At most ``slots`` holders at a time: :meth:`enter` (or :meth:`enter_now`), then
    :meth:`leave` once, whatever happened in between."""

    def __init__(self, slots: int) -> None:
        self.free = slots
        self._waiters: deque[asyncio.Future[None]] = deque()

    def enter_now(self) -> bool:
        """Take a free slot if there is one and nobody waits for it."""
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return True
        return False

    async def enter(self) -> None:
        """Take a slot, waiting for one in turn."""
        if self.enter_now():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # its result: leave() handed this caller the slot
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.leave()  # handed the slot, then cancelled: it goes on
            elif waiter in self._waiters:  # (leave() drops a cancelled one it meets)
                self._waiters.remove(waiter)
            raise

    def leave(self) -> None:
        """Give the slot back: to the first caller still waiting, else free."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.free += 1
