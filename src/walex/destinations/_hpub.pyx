# cython: language_level=3, wraparound=False, boundscheck=False
"""walex.destinations._hpub: the HPUB frames of a JetStream batch, compiled (optional).

The twin of :func:`walex.destinations.hpub.frames` and :func:`~walex.destinations.hpub.sizes`,
which stay the pure-Python path: the same arguments, the same results
(``tests/destinations/test_nats_frames.py`` builds batches both ways). The frames are
written straight into chunks of about 64 KiB, each chunk a bytes object of its exact size
(no format string parsed per message, no bytes object per frame, no join).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItemWithError
from cpython.list cimport PyList_GET_ITEM
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport PyObject
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.stdint cimport uint64_t
from libc.string cimport memcpy

__all__ = ["frames", "sizes"]

DEF CHUNK = 64 * 1024

# the headers' fixed parts, as C literals: copies of a size known to the C compiler
cdef extern from *:
    """
    #define WALEX_HPUB_HEAD "NATS/1.0\\r\\nNats-Msg-Id: "
    #define WALEX_HPUB_HEAD_N 23
    #define WALEX_HPUB_STREAM "\\r\\nNats-Expected-Stream: "
    #define WALEX_HPUB_STREAM_N 24
    #define WALEX_HPUB_LAST_SEQ "\\r\\nNats-Expected-Last-Sequence: "
    #define WALEX_HPUB_LAST_SEQ_N 31
    #define WALEX_HPUB_LAST_ID "\\r\\nNats-Expected-Last-Msg-Id: "
    #define WALEX_HPUB_LAST_ID_N 29
    #define WALEX_HPUB_END "\\r\\n\\r\\n"
    #define WALEX_HPUB_END_N 4
    """
    const char *HEAD "WALEX_HPUB_HEAD"
    enum: HEAD_N "WALEX_HPUB_HEAD_N"
    const char *STREAM "WALEX_HPUB_STREAM"
    enum: STREAM_N "WALEX_HPUB_STREAM_N"
    const char *LAST_SEQ "WALEX_HPUB_LAST_SEQ"
    enum: LAST_SEQ_N "WALEX_HPUB_LAST_SEQ_N"
    const char *LAST_ID "WALEX_HPUB_LAST_ID"
    enum: LAST_ID_N "WALEX_HPUB_LAST_ID_N"
    const char *END "WALEX_HPUB_END"
    enum: END_N "WALEX_HPUB_END_N"


cdef extern from *:
    """
    /* memcpy for the short copies of a frame (its subject, id, stream, the id before): a
       libc call costs more than the copy; two overlapping loads and stores instead
       (a size known to the compiler: memcpy, expanded in place) */
    static inline
    #if defined(__GNUC__) || defined(__clang__)
    __attribute__((always_inline))
    #endif
    char *walex_hpub_put(char *d, const char *s, Py_ssize_t n) {
    #if defined(__GNUC__) || defined(__clang__)
        if (__builtin_constant_p(n)) {
            memcpy(d, s, n);
            return d + n;
        }
    #endif
        if (n > 32) {
            memcpy(d, s, n);
        } else if (n >= 16) {
            uint64_t a, b, c, e;
            memcpy(&a, s, 8); memcpy(&b, s + 8, 8);
            memcpy(&c, s + n - 16, 8); memcpy(&e, s + n - 8, 8);
            memcpy(d, &a, 8); memcpy(d + 8, &b, 8);
            memcpy(d + n - 16, &c, 8); memcpy(d + n - 8, &e, 8);
        } else if (n >= 8) {
            uint64_t a, b;
            memcpy(&a, s, 8); memcpy(&b, s + n - 8, 8);
            memcpy(d, &a, 8); memcpy(d + n - 8, &b, 8);
        } else if (n >= 4) {
            uint32_t a, b;
            memcpy(&a, s, 4); memcpy(&b, s + n - 4, 4);
            memcpy(d, &a, 4); memcpy(d + n - 4, &b, 4);
        } else if (n > 0) {
            d[0] = s[0];
            d[n >> 1] = s[n >> 1];
            d[n - 1] = s[n - 1];
        }
        return d + n;
    }
    """
    char *_put "walex_hpub_put" (char *out, const char *data, Py_ssize_t size) noexcept


cdef inline char *_put_bytes(char *out, bytes data) noexcept:
    return _put(out, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))


cdef inline bint _plain(const char *text, Py_ssize_t size) noexcept:
    """Printable ASCII without a space, at least one character (the pure twin's regex).
    Eight bytes at a time: a byte of 0x80 or more has its top bit, one below 0x21 borrows
    in ``w - 0x21..`` (exact while no byte is 0x80 or more), 0x7f carries into the top bit
    in ``w + 0x01..`` (a carry out of a byte only from 0xff, refused anyway)."""
    cdef Py_ssize_t i = 0
    cdef uint64_t w
    if size == 0:
        return False
    while i + 8 <= size:
        memcpy(&w, text + i, 8)
        if (w | ((w - 0x2121212121212121ULL) & ~w) | (w + 0x0101010101010101ULL)) \
                & 0x8080808080808080ULL:
            return False
        i += 8
    while i < size:
        if not 0x21 <= <unsigned char>text[i] <= 0x7e:
            return False
        i += 1
    return True


cdef inline int _ndigits(unsigned long long v) noexcept:
    cdef int n = 1
    if v < 10:
        return 1
    if v < 100:
        return 2
    if v < 1000:
        return 3
    if v < 10000:
        return 4
    if v < 100000:
        return 5
    if v < 1000000:
        return 6
    v //= 1000000
    n = 7
    while v >= 10:
        v //= 10
        n += 1
    return n


cdef inline int _number_size(long long v) noexcept:
    """The length of ``b"%d" % v``."""
    if v < 0:
        return 1 + _ndigits(<unsigned long long>(-(v + 1)) + 1)
    return _ndigits(<unsigned long long>v)


cdef inline char *_number(char *out, long long v) noexcept:
    """``b"%d" % v`` written at ``out`` (what snprintf's ``%lld`` writes, without parsing a
    format per call)."""
    cdef unsigned long long u
    cdef int n, k
    if v < 0:
        out[0] = b'-'
        out += 1
        u = <unsigned long long>(-(v + 1)) + 1
    else:
        u = <unsigned long long>v
    n = _ndigits(u)
    for k in range(n - 1, -1, -1):
        out[k] = <char>(48 + u % 10)
        u //= 10
    return out + n


def frames(list batch, dict subjects, subject_of, bytes prefix, bytes stream,
           Py_ssize_t first, chain):
    """The twin of ``hpub.frames``. Two passes: the first checks the ids, finds the subjects
    and adds up each frame's size; the second writes the frames straight into chunks of
    their exact size (no bytes object per frame, no join). A message whose
    ``(schema, table, type, partition)`` are the very objects of the one before it takes
    that one's subject without a dict lookup (the events of a table come in runs)."""
    cdef Py_ssize_t n = len(batch), end = len(batch) - 1, i, j, start, count
    cdef Py_ssize_t size, payload = 0, ident_size, previous_size = 0, block, total
    cdef Py_ssize_t fixed = HEAD_N + STREAM_N \
        + PyBytes_GET_SIZE(stream) + END_N
    cdef Py_ssize_t linked = LAST_SEQ_N + LAST_ID_N
    cdef Py_ssize_t *frame_sizes
    cdef const char *ident
    cdef const char *previous = NULL
    cdef const char *first_previous = NULL
    cdef long long last_seq = 0
    cdef bytes body, subject, data, previous_bytes = None
    cdef tuple item
    cdef object event_id
    cdef PyObject *found
    cdef object subject_found = None, run = None  # the run's subject, and an item of the run
    cdef char *out
    cdef bint chained = chain is not None, answered
    if chained:
        last_seq = chain[0]
        previous_bytes = chain[1]
        first_previous = PyBytes_AS_STRING(previous_bytes)
    cdef list subject_list = [None] * n
    cdef list chunks = []
    if n == 0:
        return chunks, 0
    frame_sizes = <Py_ssize_t *>PyMem_Malloc(n * sizeof(Py_ssize_t))
    if frame_sizes == NULL:
        raise MemoryError()
    try:
        # pass 1: ids, subjects, sizes
        previous_size = PyBytes_GET_SIZE(previous_bytes) if chained else 0
        for i in range(n):
            item = <tuple>batch[i]
            event_id = <object>PyTuple_GET_ITEM(item, 0)
            body = <bytes>PyTuple_GET_ITEM(item, 5)
            if type(event_id) is not str:
                return None
            ident = PyUnicode_AsUTF8AndSize(event_id, &ident_size)
            if not _plain(ident, ident_size):
                return None
            if (run is not None
                    and PyTuple_GET_ITEM(item, 1) == PyTuple_GET_ITEM(<tuple>run, 1)
                    and PyTuple_GET_ITEM(item, 2) == PyTuple_GET_ITEM(<tuple>run, 2)
                    and PyTuple_GET_ITEM(item, 3) == PyTuple_GET_ITEM(<tuple>run, 3)
                    and PyTuple_GET_ITEM(item, 4) == PyTuple_GET_ITEM(<tuple>run, 4)):
                subject = <bytes>subject_found
            else:
                key = item[1:5]
                found = PyDict_GetItemWithError(subjects, key)
                if found == NULL:
                    subject = <bytes>subject_of(key, item)
                else:
                    subject = <bytes>found
                subject_found, run = subject, item
            subject_list[i] = subject
            block = fixed + ident_size
            if chained:
                block += linked + _number_size(last_seq + i) + previous_size
                previous_size = ident_size
            total = block + PyBytes_GET_SIZE(body)
            answered = not chained or i == end
            size = 5 + PyBytes_GET_SIZE(subject) + 1 + _number_size(block) + 1 \
                + _number_size(total) + 2 + total + 2
            if answered:
                size += 1 + PyBytes_GET_SIZE(prefix) \
                    + _number_size(first + i if not chained else first)
            frame_sizes[i] = size
            payload += PyBytes_GET_SIZE(body)
        # pass 2: the frames, written into chunks of about CHUNK bytes
        previous = first_previous
        previous_size = PyBytes_GET_SIZE(previous_bytes) if chained else 0
        start = 0
        while start < n:
            size = 0
            j = start
            while j < n:
                size += frame_sizes[j]
                j += 1
                if size >= CHUNK:
                    break
            data = PyBytes_FromStringAndSize(NULL, size)
            out = PyBytes_AS_STRING(data)
            for i in range(start, j):
                item = <tuple>PyList_GET_ITEM(batch, i)
                event_id = <object>PyTuple_GET_ITEM(item, 0)
                body = <bytes>PyTuple_GET_ITEM(item, 5)
                subject = <bytes>PyList_GET_ITEM(subject_list, i)
                ident = PyUnicode_AsUTF8AndSize(event_id, &ident_size)
                block = fixed + ident_size
                if chained:
                    block += linked + _number_size(last_seq + i) + previous_size
                total = block + PyBytes_GET_SIZE(body)
                answered = not chained or i == end
                out = _put(out, b"HPUB ", 5)
                out = _put_bytes(out, subject)
                if answered:
                    out = _put(out, b" ", 1)
                    out = _put_bytes(out, prefix)
                    out = _number(out, first + i if not chained else first)
                out = _put(out, b" ", 1)
                out = _number(out, block)
                out = _put(out, b" ", 1)
                out = _number(out, total)
                out = _put(out, b"\r\n", 2)
                out = _put(out, HEAD, HEAD_N)
                out = _put(out, ident, ident_size)
                out = _put(out, STREAM, STREAM_N)
                out = _put_bytes(out, stream)
                if chained:
                    out = _put(out, LAST_SEQ, LAST_SEQ_N)
                    out = _number(out, last_seq + i)
                    out = _put(out, LAST_ID, LAST_ID_N)
                    out = _put(out, previous, previous_size)
                    previous, previous_size = ident, ident_size  # kept alive by event_id (in batch)
                out = _put(out, END, END_N)
                out = _put_bytes(out, body)
                out = _put(out, b"\r\n", 2)
            if out != PyBytes_AS_STRING(data) + size:
                raise AssertionError("HPUB frames of another size than counted")
            chunks.append(data)
            start = j
    finally:
        PyMem_Free(frame_sizes)
    return chunks, payload


def sizes(list batch, Py_ssize_t overhead, Py_ssize_t limit):
    """The twin of ``hpub.sizes``: ``(largest, longest_id, over)``; items are Outgoing
    tuples (``id`` first, ``body`` sixth), anything else is read by attribute."""
    cdef Py_ssize_t largest = 0, longest_id = 0, ident, size, i
    for i in range(len(batch)):
        item = batch[i]
        if isinstance(item, tuple) and PyTuple_GET_SIZE(item) >= 6:
            ident = len(<object>PyTuple_GET_ITEM(item, 0))
            size = len(<object>PyTuple_GET_ITEM(item, 5))
        else:
            ident = len(item.id)
            size = len(item.body)
        if ident > longest_id:
            longest_id = ident
        size += ident + overhead
        if size > largest:
            largest = size
            if limit and size > limit:
                return largest, longest_id, i
    return largest, longest_id, -1
