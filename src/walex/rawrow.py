"""A raw row: one row of a change as PostgreSQL sent it, kept as one ``bytes`` object.

A :class:`~walex.rawevent.RawEvent` keeps each of its rows as the TupleData of the
pgoutput message, byte for byte: the column count (two bytes, big-endian), then per
column ``n`` (NULL) or ``t``, a four-byte big-endian length and the text. Only rows sent
whole as text are kept so (no unchanged TOAST value ``u``, no binary value ``b``): the
compiled hot path takes the slice of the frame, the pure-Python one packs the values it
decoded (:func:`pack_row`), and both give the same bytes. One object per row instead of
one per value and a tuple: what the relay allocates and frees per row.

The readers find the columns again: :func:`row_values` (the rows typed when read, the
pure direct encoder, the tests), the compiled direct encoder in C.
"""

from __future__ import annotations

from typing import Any

__all__ = ["pack_row", "row_values"]


def pack_row(values: Any) -> bytes:
    """The TupleData of a row whose values are all ``bytes`` (text) or ``None``."""
    parts = [len(values).to_bytes(2, "big")]
    for value in values:
        if value is None:
            parts.append(b"n")
        else:
            parts.append(b"t" + len(value).to_bytes(4, "big"))
            parts.append(value)
    return b"".join(parts)


def row_values(row: bytes) -> tuple[bytes | None, ...]:
    """The values of a raw row (``bytes`` or ``None`` per column); ValueError if it is not
    one :func:`pack_row` could give."""
    size = len(row)
    if size < 2:
        raise ValueError("a raw row shorter than its column count")
    count = int.from_bytes(row[:2], "big")
    pos = 2
    values: list[bytes | None] = []
    append = values.append
    for _ in range(count):
        if pos >= size:
            raise ValueError("a raw row shorter than its columns")
        kind = row[pos]
        if kind == 110:  # 'n'
            append(None)
            pos += 1
        elif kind == 116 and pos + 5 <= size:  # 't'
            end = pos + 5 + int.from_bytes(row[pos + 1:pos + 5], "big")
            if end > size:
                raise ValueError("a raw row's value overruns it")
            append(row[pos + 5:end])
            pos = end
        else:
            raise ValueError("a raw row holds a value neither text nor NULL")
    if pos != size:
        raise ValueError("a raw row longer than its columns")
    return tuple(values)
