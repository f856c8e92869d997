# Included by _hotpath.pyx (one module): the commit time, the LSN text and the Event id
# the hot path stamps events with, as walex.pgoutput.decoder and walex.transactions make them.
# Uses the names _hotpath.pyx imports and cimports before including it.

cdef object _pg_timestamp(int64_t micros):
    """As walex.pgoutput.decoder.pg_timestamp (``_PG_EPOCH + timedelta(microseconds=micros)``);
    None where that one raises (a result outside the years 1 to 9999). The date is the
    proleptic Gregorian one of the day count (the civil-from-days rule), the datetime built
    with the epoch's tzinfo."""
    cdef int64_t days = micros // 86400000000, rest = micros % 86400000000
    if rest < 0:  # floor division
        rest += 86400000000
        days -= 1
    if days > 3000000 or days < -3000000:  # far past the years 1..9999 either way
        return None
    # days since 0000-03-01 in 400-year eras of 146097 days (2000-01-01 is day 730425)
    cdef int64_t z = days + 730425
    cdef int64_t era = (z if z >= 0 else z - 146096) // 146097
    cdef int64_t doe = z - era * 146097  # day of the era, 0..146096
    cdef int64_t yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    cdef int64_t doy = doe - (365 * yoe + yoe // 4 - yoe // 100)  # from March 1st
    cdef int64_t mp = (5 * doy + 2) // 153
    cdef int day = <int>(doy - (153 * mp + 2) // 5 + 1)
    cdef int month = <int>(mp + 3 if mp < 10 else mp - 9)
    cdef int64_t year = yoe + era * 400 + (1 if month <= 2 else 0)
    if year < 1 or year > 9999:
        return None
    cdef int64_t seconds = rest // 1000000
    return datetime_new(<int>year, month, day, <int>(seconds // 3600), <int>(seconds // 60 % 60),
                        <int>(seconds % 60), <int>(rest % 1000000), _UTC)


cdef str _event_id(uint64_t commit_lsn, object position):
    """``f"{commit_lsn:016X}-{position:08X}"``, the Event id of assembler.py's _stamp."""
    if position > 0xFFFFFFFF or position < 0:
        return f"{commit_lsn:016X}-{position:08X}"
    return _event_id_at(commit_lsn, position)


cdef extern from "Python.h":
    object _unicode_new "PyUnicode_New" (Py_ssize_t size, unsigned int maxchar)
    unsigned char *_unicode_ascii "PyUnicode_1BYTE_DATA" (object text)


cdef str _event_id_at(uint64_t commit_lsn, Py_ssize_t position):
    """:func:`_event_id` of a position held in C: an ASCII str written in place."""
    cdef int k
    cdef uint64_t p
    cdef unsigned char *text
    if position < 0 or <uint64_t>position > <uint64_t>4294967295ULL:
        return f"{commit_lsn:016X}-{position:08X}"
    p = <uint64_t>position
    ident = _unicode_new(25, 127)
    text = _unicode_ascii(ident)
    for k in range(16):
        text[15 - k] = _HEX[(commit_lsn >> (4 * k)) & 15]
    text[16] = 45  # '-'
    for k in range(8):
        text[24 - k] = _HEX[(p >> (4 * k)) & 15]
    return ident


cdef inline int _hex32(char *text, uint32_t value) noexcept:
    """``f"{value:X}"`` into ``text``; how many characters."""
    cdef int digits = 1, k
    while digits < 8 and (value >> (4 * digits)) != 0:
        digits += 1
    for k in range(digits):
        text[digits - 1 - k] = _HEX[(value >> (4 * k)) & 15]
    return digits


cdef str _format_lsn(uint64_t lsn):
    """walex.lsn.format_lsn: ``"16/B374D848"``."""
    cdef char text[17]  # at most "FFFFFFFF/FFFFFFFF"
    cdef int n = _hex32(text, <uint32_t>(lsn >> 32))
    text[n] = 47  # '/'
    n += 1 + _hex32(text + n + 1, <uint32_t>(lsn & 0xFFFFFFFF))
    return PyUnicode_DecodeASCII(text, n, NULL)
