"""walex: simple and reliable Postgres Change Data Capture for Python.

Point it at a database with ``wal_level=logical`` and a publication; every
committed INSERT, UPDATE, DELETE and TRUNCATE reaches your handlers as a typed
:class:`Event`, and PostgreSQL is told a transaction is done only after every
handler finished it.

``import walex`` loads only the errors: each public name below is imported
from its module when first used (PEP 562), so a program loads what it uses
(``WalEx`` the streaming path, ``Worker`` the workers) and never the CLI's
libraries.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .errors import (
    ConfigError, DecodeError, DestinationError, HandlerError, ReplicationError, SetupError, SlotInUseError,
    SlotLostError, StoppedError, WalExError,
)

if TYPE_CHECKING:
    from .app import WalEx
    from .event import UNCHANGED_TOAST, Change, Event, EventType, Source
    from .handlers import Events
    from .transactions import Transaction
    from .workers import Worker

__all__ = [
    "WalEx", "Worker", "Events", "Event", "EventType", "Change", "Source", "Transaction",
    "UNCHANGED_TOAST", "WalExError", "ConfigError", "SetupError", "ReplicationError",
    "SlotInUseError", "SlotLostError", "DecodeError", "HandlerError", "DestinationError",
    "StoppedError",
]

# public name -> the module that defines it, imported on first use
_LAZY = {
    "WalEx": "app", "Worker": "workers", "Events": "handlers", "Transaction": "transactions",
    "Event": "event", "EventType": "event", "Change": "event", "Source": "event",
    "UNCHANGED_TOAST": "event",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'walex' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next access is a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
