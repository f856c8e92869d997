"""Which loop gathers the replication frames: compiled (libpq called directly), or Python.

``walex.replication._readloop`` (Cython, built at install when Cython and a C compiler are
there) is the twin of the Python loop in :meth:`ReplicationConnection.read
<walex.replication.stream.ReplicationConnection.read>`: the same frames, in the same
order, in the same reads, and the same errors (``tests/replication/test_readloop.py``).
It calls ``PQgetCopyData``, ``PQfreemem`` and ``PQconsumeInput`` of the libpq psycopg
itself uses, on psycopg's own ``PGconn*`` (``pgconn.pgconn_ptr``), without psycopg
creating, copying and freeing a memoryview per frame. That libpq is found already loaded,
never loaded here:

- psycopg's pure-Python implementation: the functions of its ctypes library
  (``psycopg.pq._pq_ctypes``);
- ``psycopg_binary``: the libpq bundled in ``psycopg_binary.libs``, as mapped in this
  process (``/proc/self/maps``);
- ``psycopg_c``: the one libpq mapped in this process (none or several: not used).

Anything else (another implementation, a libpq not found or not loaded, a symbol missing,
the module not built, ``PQsocket`` disagreeing with ``pgconn.socket``) leaves the Python
loop, which is always correct, with one DEBUG line saying why. ``WALEX_PURE_PYTHON=1``
(read when a connection opens) forces the Python loop.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path
from typing import Any

from psycopg import pq

try:
    from ._readloop import ReadLoop
except ImportError:  # not built: the Python loop serves
    ReadLoop = None

__all__ = ["CONSUME_FAILED", "COPY_FAILED", "END", "READY", "WAIT", "compiled_available", "read_loop"]

# what ReadLoop.gather says the caller does next (the same names in _readloop.pyx)
READY, WAIT, END, COPY_FAILED, CONSUME_FAILED = 1, 0, -1, -2, -3

log = logging.getLogger("walex")

_FUNCTIONS = ("PQgetCopyData", "PQconsumeInput", "PQfreemem", "PQsocket")
_found: tuple[Any, str] | None = None  # (the ReadLoop or None, why not) once looked for


def compiled_available() -> bool:
    """Whether ``walex.replication._readloop`` was built."""
    return ReadLoop is not None


def _mapped_libpqs() -> list[Path]:
    paths = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(None, 5)
            if len(fields) == 6:
                path = Path(fields[5].strip())
                if path.name.startswith(("libpq.so", "libpq-")):
                    paths.add(path)
    return sorted(paths)


def _addresses() -> tuple[int, ...] | str:
    """The four functions' addresses in psycopg's libpq, or why not."""
    impl = pq.__impl__
    if impl == "python":
        from psycopg.pq import _pq_ctypes

        funcs = [getattr(_pq_ctypes, name, None) for name in _FUNCTIONS]
        if any(func is None for func in funcs):
            return "psycopg's ctypes libpq lacks one of " + ", ".join(_FUNCTIONS)
        return tuple(ctypes.cast(func, ctypes.c_void_p).value or 0 for func in funcs)
    if impl == "binary":
        import psycopg_binary

        libs = Path(psycopg_binary.__file__).resolve().parent.parent / "psycopg_binary.libs"
        found = [path for path in _mapped_libpqs() if path.parent == libs]
        where = f"in {libs}"
    elif impl == "c":
        found = _mapped_libpqs()
        where = "in this process"
    else:
        return f"unknown psycopg implementation {impl!r}"
    if len(found) != 1:
        return f"{len(found)} libpq mapped {where} (one expected)"
    try:  # RTLD_NOLOAD: a handle to the library loaded already, never a load
        lib = ctypes.CDLL(str(found[0]), mode=os.RTLD_LAZY | os.RTLD_NOLOAD)
        return tuple(ctypes.cast(getattr(lib, name), ctypes.c_void_p).value or 0
                     for name in _FUNCTIONS)
    except (OSError, AttributeError) as exc:
        return f"{found[0]}: {exc}"


def read_loop(pgconn: Any) -> Any | None:
    """The compiled loop for this connection (its ``gather``), or None for the Python loop."""
    global _found
    if os.environ.get("WALEX_PURE_PYTHON"):
        return None
    if _found is None:
        if ReadLoop is None:
            _found = (None, "walex.replication._readloop is not built")
        else:
            try:
                addresses = _addresses()
            except Exception as exc:  # noqa: BLE001 - any surprise: the Python loop
                addresses = f"{type(exc).__name__}: {exc}"
            if isinstance(addresses, str):
                _found = (None, addresses)
            elif not all(addresses):
                _found = (None, "a libpq function address is NULL")
            else:
                _found = (ReadLoop(*addresses), "")
        if _found[0] is None:
            log.debug("replication reads use the Python loop: %s", _found[1])
    loop = _found[0]
    if loop is None:
        return None
    ptr = pgconn.pgconn_ptr
    if not ptr or loop.socket(ptr) != pgconn.socket:
        log.debug("replication reads use the Python loop: libpq's PQsocket disagrees with "
                  "psycopg's connection")
        return None
    return loop
