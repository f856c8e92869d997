"""WAL positions (LSNs): 64-bit integers, written ``"16/B374D848"`` by PostgreSQL.

walex keeps LSNs as ``int`` everywhere and formats them only for people.
"""

from __future__ import annotations

from .errors import ConfigError

__all__ = ["format_lsn", "parse_lsn"]


def format_lsn(lsn: int) -> str:
    """Format an LSN the way PostgreSQL prints it (``pg_lsn`` text form)."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    """Parse the ``pg_lsn`` text form ``"X/Y"`` (hexadecimal halves)."""
    high, sep, low = text.strip().partition("/")
    try:
        if not sep:
            raise ValueError(text)
        hi, lo = int(high, 16), int(low, 16)
    except ValueError:
        raise ConfigError(f"{text!r} is not an LSN; expected the form '16/B374D848'") from None
    if not (0 <= hi <= 0xFFFFFFFF and 0 <= lo <= 0xFFFFFFFF):
        raise ConfigError(f"{text!r} is out of range for an LSN")
    return hi << 32 | lo
