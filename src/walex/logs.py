"""Log output walex sets up itself: a password-scrubbing formatter and a default handler.

A program that configured no logging still sees what :meth:`WalEx.run
<walex.WalEx.run>` does (the line saying what it streams from where, errors),
on stderr, as uvicorn does; a program that configured logging gets nothing
added. ``walex run`` uses the same formatter for its text logs.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import redact

__all__ = ["RedactingFormatter", "default_logging"]

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RedactingFormatter(logging.Formatter):
    """The usual one-line format, with passwords scrubbed."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__(FORMAT)
        self.secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record), *self.secrets)


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
