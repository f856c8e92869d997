"""The walex exception tree.

Every error walex raises on purpose is a :class:`WalExError`; each message names
what is wrong and, where there is one, the fix. Messages never contain a
password: anything built from user configuration passes through
:func:`redact` first.

::

    WalExError
    ├── ConfigError           invalid or missing configuration
    ├── SetupError            the database is not ready for CDC (wal_level,
    │                         publication, tables, privileges, credentials)
    ├── ReplicationError      the replication connection failed or broke
    │   ├── SlotInUseError    a durable slot is held by another process
    │   └── SlotLostError     a durable slot was invalidated; changes are gone
    ├── DecodeError           bytes from the server are not valid pgoutput,
    │                         or a worker's message is not a walex CloudEvent
    ├── HandlerError          a handler or per-event function failed
    ├── StoppedError          stop() came while start() was still waiting
    │                         (a standby waiting for its slot): never started
    ├── BackfillCancelledError  a backfill was cancelled before it finished
    └── DestinationError      a destination refused events for good (a webhook
                              answering 4xx, a redirect); a broker that is
                              down is retried, not an error
"""

from __future__ import annotations

import re

__all__ = [
    "WalExError",
    "ConfigError",
    "SetupError",
    "ReplicationError",
    "SlotInUseError",
    "SlotLostError",
    "DecodeError",
    "HandlerError",
    "StoppedError",
    "BackfillCancelledError",
    "DestinationError",
    "redact",
]


class WalExError(Exception):
    """Base class of every error raised by walex."""


class ConfigError(WalExError, ValueError):
    """The configuration given to walex is invalid."""


class SetupError(WalExError):
    """PostgreSQL is not set up for change data capture as configured."""


class ReplicationError(WalExError):
    """The replication stream could not be started or was interrupted.

    ``retriable`` is true when reconnecting may help (a lost connection, a
    restarting server, a terminated walsender); ``answered`` is false when the
    server was not reached at all (refused, timed out).
    """

    def __init__(self, message: str, *, retriable: bool = False, answered: bool = True) -> None:
        super().__init__(message)
        self.retriable = retriable
        self.answered = answered


class SlotInUseError(ReplicationError):
    """A durable replication slot is active for another process."""


class SlotLostError(ReplicationError):
    """A durable slot was invalidated (``wal_status = 'lost'``): WAL it needed is gone."""


class DecodeError(WalExError):
    """A pgoutput message could not be decoded.

    Attributes name the message tag and the WAL position it arrived at, so a
    report can be matched against ``pg_waldump`` or the server log.
    """

    def __init__(self, message: str, *, tag: str = "", lsn: int = 0) -> None:
        super().__init__(message)
        self.tag = tag
        self.lsn = lsn


class HandlerError(WalExError):
    """A handler or a per-event function raised."""


class StoppedError(WalExError):
    """``stop()`` was called while ``start()`` waited: as a standby for the slot, or for
    the handler calls the last ``stop()`` cut off to return. The app never streamed.

    Raised by that ``start()`` once it closed what it had opened; ``stop()``
    itself returns normally.
    """


class BackfillCancelledError(WalExError):
    """The backfill awaited was cancelled (``app.cancel_backfill()``, ``walex backfill
    --cancel``) before it finished: its rows were delivered in part."""


class DestinationError(WalExError):
    """A destination refused the events in a way retrying cannot cure."""


_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)([^@\s]*)(@)")
_KV_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def redact(text: str, *secrets: str | None) -> str:
    """Return ``text`` with passwords removed.

    Removes the password part of a URL, ``password=...`` pairs of a libpq
    connection string and every literal secret given.
    """
    text = _URL_PASSWORD.sub(r"\1***\3", text)
    text = _KV_PASSWORD.sub(r"\1***", text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text
