"""Disk spill for transactions that must be held whole before their commit.

A streamed transaction (protocol 2+) arrives in chunks while it is still in
progress; its events may be delivered only after Stream Commit, and some may
be removed by a subtransaction's Stream Abort. :class:`Spill` keeps at most
``batch_size`` of them in memory and writes the rest, pickled in batches
with their subtransaction id, to an anonymous temporary file (deleted by the
OS when closed, even after a crash).

Invariant: :meth:`Spill.replay` yields every item appended, in order, except
those of aborted subtransactions, reading back one batch at a time.
"""

from __future__ import annotations

import pickle
import tempfile
from collections.abc import Iterator
from typing import IO, Any

__all__ = ["Spill"]


class Spill:
    """An append-only sequence of ``(subxid, item)`` that overflows to disk."""

    def __init__(self, batch_size: int, directory: str | None = None) -> None:
        self.batch_size = batch_size
        self.directory = directory
        self.memory: list[tuple[int, Any]] = []
        self.aborted: set[int] = set()
        self._file: IO[bytes] | None = None
        self.spilled = 0
        self._batches = 0

    def append(self, subxid: int, item: Any) -> None:
        self.memory.append((subxid, item))
        if len(self.memory) >= self.batch_size:
            if self._file is None:
                self._file = tempfile.TemporaryFile(prefix="walex-spill-", dir=self.directory)
            pickle.dump(self.memory, self._file, protocol=pickle.HIGHEST_PROTOCOL)
            self.spilled += len(self.memory)
            self._batches += 1
            self.memory = []

    def abort(self, subxid: int) -> None:
        """Drop everything a subtransaction did (a subtransaction id is never reused)."""
        self.aborted.add(subxid)
        self.memory = [entry for entry in self.memory if entry[0] != subxid]

    def replay(self) -> Iterator[Any]:
        aborted = self.aborted
        if self._file is not None:
            self._file.seek(0)
            for _ in range(self._batches):
                for subxid, item in pickle.load(self._file):
                    if subxid not in aborted:
                        yield item
        for subxid, item in self.memory:
            if subxid not in aborted:
                yield item
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.memory = []
