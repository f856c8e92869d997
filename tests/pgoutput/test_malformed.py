"""The decoder on malformed input: a message or a DecodeError, nothing else.

The contract (``walex.pgoutput.decoder``): any bytes either decode to one
message that consumed every byte, or raise :class:`walex.errors.DecodeError`
whose text names the message tag and the LSN; never ``IndexError``,
``struct.error``, ``UnicodeDecodeError``, ``OverflowError``, ``MemoryError``...
and a failed decode leaves the decoder's stream state alone.

Inputs are mutations of the real messages in ``fixtures/`` (each with the
stream state it was captured in) plus random bytes.
"""

from __future__ import annotations

import struct
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from walex.errors import DecodeError
from walex.lsn import format_lsn
from walex.pgoutput import Message, StreamAbort, StreamStart, StreamStop
from walex.pgoutput.decoder import TAG_NAMES, Decoder

from .capture import load_fixtures


def _real_messages() -> list[tuple[bytes, bool, int]]:
    """Unique (payload, in_stream, lsn) of every fixture message."""
    seen: dict[tuple[bytes, bool], int] = {}
    for cap in load_fixtures():
        decoder = Decoder()
        for lsn, data in cap.messages:
            seen.setdefault((data, decoder.in_stream), lsn)
            decoder.decode(data, lsn)
    return [(data, in_stream, lsn) for (data, in_stream), lsn in seen.items()]


REAL = _real_messages()
TAGS = sorted(TAG_NAMES)
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)
_MICROS = timedelta(microseconds=1)
DATETIME_MICROS = ((datetime.min.replace(tzinfo=timezone.utc) - _EPOCH) // _MICROS,
                   (datetime.max.replace(tzinfo=timezone.utc) - _EPOCH) // _MICROS)

real_messages = st.sampled_from(REAL)
lsns = st.integers(min_value=0, max_value=2**64 - 1)


def decode(data: bytes, lsn: int, in_stream: bool) -> Message | None:
    """Decode; return the message or None after checking the DecodeError it raised."""
    decoder = Decoder()
    decoder.in_stream = in_stream
    try:
        msg = decoder.decode(data, lsn)
    except DecodeError as err:
        text = str(err)
        assert err.lsn == lsn and format_lsn(lsn) in text, text
        if data:
            tag = chr(data[0])
            assert err.tag == tag and repr(tag) in text, text
            if tag in TAG_NAMES:
                assert TAG_NAMES[tag] in text, text
        assert decoder.in_stream is in_stream, "a failed decode changed the stream state"
        return None
    except Exception as exc:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{type(exc).__name__}: {exc} escaped the decoder for "
                    f"{data[:64].hex()} ({len(data)} bytes, in_stream={in_stream})")
    expected = {StreamStart: True, StreamStop: False}.get(type(msg), in_stream)
    assert decoder.in_stream is expected
    return msg


def test_fixtures_hold_every_tag_in_both_states() -> None:
    assert {chr(data[0]) for data, _, _ in REAL} == set(TAG_NAMES)
    assert {in_stream for _, in_stream, _ in REAL} == {False, True}


def test_every_truncation_is_rejected() -> None:
    """Every proper prefix of every real message is a DecodeError.

    The one exception is by design: the first 9 bytes of a protocol 4 Stream
    Abort (25 bytes) are a valid protocol 2 Stream Abort.
    """
    for data, in_stream, lsn in REAL:
        for length in range(len(data)):
            msg = decode(data[:length], lsn, in_stream)
            if msg is not None:
                assert type(msg) is StreamAbort and len(data) == 25 and length == 9, (
                    data.hex(), length, msg)


def test_one_trailing_byte_is_rejected() -> None:
    for data, in_stream, lsn in REAL:
        for extra in (b"\x00", b"\xff", data[-1:]):
            assert decode(data + extra, lsn, in_stream) is None, data.hex()


def test_empty_message() -> None:
    with pytest.raises(DecodeError, match="empty pgoutput message at LSN 0/1A2B") as info:
        Decoder().decode(b"", 0x1A2B)
    assert info.value.lsn == 0x1A2B


@pytest.mark.parametrize("tag", [b"\x00", b"Z", b"w", b"\xff"])
def test_unknown_tag(tag: bytes) -> None:
    with pytest.raises(DecodeError, match="unknown pgoutput message tag") as info:
        Decoder().decode(tag + b"\x00" * 20, 0x16_B374D848)
    assert info.value.tag == tag.decode("latin-1")
    assert "16/B374D848" in str(info.value)


@FUZZ
@given(real_messages, st.binary(min_size=1, max_size=40))
def test_trailing_garbage(message: tuple[bytes, bool, int], garbage: bytes) -> None:
    data, in_stream, lsn = message
    msg = decode(data + garbage, lsn, in_stream)
    if msg is not None:  # only a protocol 2 Stream Abort can grow into a valid protocol 4 one
        assert type(msg) is StreamAbort and len(data) == 9 and len(garbage) == 16


@FUZZ
@given(real_messages, st.data())
def test_flipped_bytes(message: tuple[bytes, bool, int], data: st.DataObject) -> None:
    raw, in_stream, lsn = message
    mutated = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(raw) - 1))
        mutated[index] ^= data.draw(st.integers(1, 255))
    decode(bytes(mutated), lsn, in_stream)


@FUZZ
@given(real_messages, st.sampled_from(TAGS) | st.integers(0, 255).map(chr), st.booleans())
def test_tag_changed(message: tuple[bytes, bool, int], tag: str, in_stream: bool) -> None:
    raw, _, lsn = message
    decode(tag.encode("latin-1") + raw[1:], lsn, in_stream)


@FUZZ
@given(real_messages, st.data())
def test_length_fields_corrupted(message: tuple[bytes, bool, int], data: st.DataObject) -> None:
    """Overwrite 2 or 4 bytes with extreme values: counts and lengths of any size."""
    raw, in_stream, lsn = message
    width = data.draw(st.sampled_from([2, 4, 8]))
    if len(raw) <= width:
        return
    index = data.draw(st.integers(1, len(raw) - width))
    value = data.draw(st.sampled_from([0, 1, 2**(8 * width) - 1, 2**(8 * width - 1) - 1,
                                       2**(8 * width - 1)]))
    mutated = raw[:index] + value.to_bytes(width, "big") + raw[index + width:]
    decode(mutated, lsn, in_stream)


@FUZZ
@given(st.binary(max_size=300), lsns, st.booleans())
@example(b"T\xff\xff\xff\xff\x00", 0, False)  # 4 billion relation ids
@example(b"I\x00\x00\x40\x00N\xff\xff", 0, False)  # 65535 columns, none there
@example(b"B" + struct.pack("!Qqi", 1, 2**63 - 1, 7), 2**64 - 1, False)  # year 294247
@example(b"R\x00\x00\x40\x00\xc3\x28\x00t\x00d\x00\x00", 0, False)  # invalid UTF-8
def test_random_bytes(data: bytes, lsn: int, in_stream: bool) -> None:
    decode(data, lsn, in_stream)


@FUZZ
@given(st.sampled_from(TAGS), st.binary(max_size=120), lsns, st.booleans())
def test_known_tag_random_body(tag: str, body: bytes, lsn: int, in_stream: bool) -> None:
    decode(tag.encode() + body, lsn, in_stream)


@FUZZ
@given(st.integers(0, 2**64 - 1), st.integers(-2**63, 2**63 - 1), st.integers(0, 2**32 - 1))
@example(0, DATETIME_MICROS[1], 1)
@example(0, DATETIME_MICROS[1] + 1, 1)
@example(0, DATETIME_MICROS[0], 1)
@example(0, DATETIME_MICROS[0] - 1, 1)
def test_begin_any_field_values(final_lsn: int, micros: int, xid: int) -> None:
    """Every LSN and xid is fine; a timestamp datetime cannot hold is a DecodeError."""
    msg = decode(b"B" + struct.pack("!QqI", final_lsn, micros, xid), 0, False)
    if msg is not None:
        assert (msg.final_lsn, msg.xid) == (final_lsn, xid)
    else:  # beyond datetime's years 1-9999
        assert not DATETIME_MICROS[0] <= micros <= DATETIME_MICROS[1]
