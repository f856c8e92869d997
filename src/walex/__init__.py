"""walex: simple and reliable Postgres Change Data Capture for Python.

Point it at a database with ``wal_level=logical`` and a publication; every
committed INSERT, UPDATE, DELETE and TRUNCATE reaches your handlers as a typed
:class:`Event`, and PostgreSQL is told a transaction is done only after every
handler finished it.
"""

from .app import WalEx
from .errors import (
    ConfigError, DecodeError, DestinationError, HandlerError, ReplicationError, SetupError, SlotInUseError,
    SlotLostError,
    WalExError,
)
from .event import UNCHANGED_TOAST, Change, Event, EventType, Source
from .handlers import Events
from .transactions import Transaction
from .workers import Worker

__all__ = [
    "WalEx", "Worker", "Events", "Event", "EventType", "Change", "Source", "Transaction",
    "UNCHANGED_TOAST", "WalExError", "ConfigError", "SetupError", "ReplicationError",
    "SlotInUseError", "SlotLostError", "DecodeError", "HandlerError", "DestinationError",
]
