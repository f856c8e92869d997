"""Disk spill for transactions that must be held whole before their commit.

A streamed transaction (protocol 2+) arrives in chunks while it is still in
progress; its events may be delivered only after Stream Commit, and some may
be removed by a subtransaction's Stream Abort. :class:`Spill` keeps at most
``batch_size`` of them in memory and writes the rest, pickled in batches
with their subtransaction id, to an anonymous temporary file (deleted by the
OS when closed, even after a crash).

Items must be plain data that unpickles in any process (the raw decoded
changes, not typed values: a value's class may be made at run time, such as
a composite's named tuple). What is needed to interpret them and cannot be
pickled (a table definition with its loaders) stays in memory, registered
with :meth:`Spill.keep` and referred to by number.

Invariant: :meth:`Spill.replay` yields every item appended, in order, except
those of aborted subtransactions, reading back one batch at a time.
"""

from __future__ import annotations

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
        self.kept: list[Any] = []  # objects items refer to by number, never written
        self._kept_numbers: dict[int, int] = {}
        self._file: IO[bytes] | None = None
        self.spilled = 0
        self._batches = 0

    def append(self, subxid: int, item: Any) -> None:
        self.memory.append((subxid, item))
        if len(self.memory) >= self.batch_size:
            import pickle  # imported by the first spill: most processes never spill

            if self._file is None:
                self._file = tempfile.TemporaryFile(prefix="walex-spill-", dir=self.directory)
            pickle.dump(self.memory, self._file, protocol=pickle.HIGHEST_PROTOCOL)
            self.spilled += len(self.memory)
            self._batches += 1
            self.memory = []

    def keep(self, obj: Any) -> int:
        """The number under which ``obj`` stays in memory (the same for the same object)."""
        number = self._kept_numbers.get(id(obj))
        if number is None:
            number = self._kept_numbers[id(obj)] = len(self.kept)
            self.kept.append(obj)
        return number

    def abort(self, subxid: int) -> None:
        """Drop everything a subtransaction did (a subtransaction id is never reused)."""
        self.aborted.add(subxid)
        self.memory = [entry for entry in self.memory if entry[0] != subxid]

    def replay(self) -> Iterator[Any]:
        aborted = self.aborted
        try:
            if self._file is not None:
                import pickle

                self._file.seek(0)
                for _ in range(self._batches):
                    for subxid, item in pickle.load(self._file):
                        if subxid not in aborted:
                            yield item
            for subxid, item in self.memory:
                if subxid not in aborted:
                    yield item
        finally:
            self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.memory = []
        self.kept = []
        self._kept_numbers = {}
