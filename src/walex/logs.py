"""Log output walex sets up itself: a password-scrubbing formatter and a default handler.

A program that configured no logging still sees what :meth:`WalEx.run
<walex.WalEx.run>` does (the line saying what it streams from where, errors),
on stderr, as uvicorn does; a program that configured logging gets nothing
added. ``walex run`` uses the same formatter for its text logs.

While a batch is handled, :data:`TRANSACTION` holds its slot, commit LSN and
xid; it is a context variable, so it follows the batch into handler threads
and tasks, and every line logged meanwhile (walex's retries and failures, the
handlers' own lines) carries them: :func:`transaction_fields` gives them to a
formatter (``[slot=... lsn=... xid=...]`` in text, keys in JSON lines).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from .errors import redact
from .lsn import format_lsn

__all__ = ["RedactingFormatter", "default_logging", "TRANSACTION", "transaction_fields"]

# (slot, commit LSN, xid) of the batch being handled
TRANSACTION: ContextVar[tuple[str, int, int] | None] = ContextVar("walex_transaction", default=None)


def transaction_fields() -> dict[str, str | int] | None:
    """``{"slot", "lsn", "xid"}`` of the batch being handled here, if any."""
    current = TRANSACTION.get()
    if current is None:
        return None
    slot, lsn, xid = current
    return {"slot": slot, "lsn": format_lsn(lsn), "xid": xid}

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RedactingFormatter(logging.Formatter):
    """The usual one-line format, with passwords scrubbed."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__(FORMAT)
        self.secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = transaction_fields()
        if fields is not None:
            line, nl, rest = text.partition("\n")  # before a traceback
            text = f"{line} [slot={fields['slot']} lsn={fields['lsn']} xid={fields['xid']}]{nl}{rest}"
        return redact(text, *self.secrets)


@contextmanager
def default_logging(secret: str | None) -> Iterator[None]:
    """Inside, walex's INFO lines go to stderr if the program configured no logging."""
    log = logging.getLogger("walex")
    if log.hasHandlers():
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter([secret] if secret else []))
    level = log.level
    log.addHandler(handler)
    if level == logging.NOTSET:
        log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
