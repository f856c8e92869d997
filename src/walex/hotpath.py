"""Which hot path a session's reader uses: compiled, or pure Python.

The pure-Python path is the reference: each XLogData payload is decoded into a
message (:mod:`walex.pgoutput.decoder`) and fed to the
:class:`~walex.assembler.TransactionAssembler`, which builds the Events
(:mod:`walex.rows`). The compiled path, ``walex._hotpath`` (Cython, built at
install when Cython and a C compiler are there), does the same for the frames
that carry nearly all the traffic, Begin, Insert, Update, Delete and Commit of
plain transactions, in one pass from the frame to the Events, and hands every
other frame back to the pure path. Both give identical Events, batches and
errors (``tests/test_hotpath.py``).

``WALEX_PURE_PYTHON=1`` in the environment (read when a session starts) forces
the pure path, as it forces the pure-Python TupleData parser.
"""

from __future__ import annotations

import os
from typing import Any

from .pgoutput import Decoder
from .assembler import TransactionAssembler

__all__ = ["NOT_HANDLED", "compiled_available", "hot_path"]

try:
    from ._hotpath import NOT_HANDLED, HotPath
except ImportError:  # not built: the pure-Python path serves
    HotPath = None
    NOT_HANDLED = object()


def compiled_available() -> bool:
    """Whether ``walex._hotpath`` was built."""
    return HotPath is not None


def hot_path(assembler: TransactionAssembler, decoder: Decoder) -> Any | None:
    """The compiled path for one session, or None for the pure-Python path.

    The result's ``feed(frame)`` takes a replication frame and returns the
    batches it completed, None, or :data:`NOT_HANDLED` (the pure path must
    handle that frame; nothing changed); after a handled frame its ``end`` is
    the frame's WAL end.
    """
    if HotPath is None or os.environ.get("WALEX_PURE_PYTHON"):
        return None
    return HotPath(assembler, decoder)
