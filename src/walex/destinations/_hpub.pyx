# cython: language_level=3, wraparound=False, boundscheck=False
"""walex.destinations._hpub: the HPUB frames of a JetStream batch, compiled (optional).

The twin of :func:`walex.destinations.hpub.frames` and :func:`~walex.destinations.hpub.sizes`,
which stay the pure-Python path: the same arguments, the same results
(``tests/destinations/test_nats_frames.py`` builds batches both ways). Each frame is written into one bytes object of its exact
size (no format string parsed per message), and the frames are joined into chunks of
about 64 KiB as the pure twin joins them.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.stdio cimport snprintf
from libc.string cimport memcpy

__all__ = ["frames", "sizes"]

DEF CHUNK = 64 * 1024

cdef bytes HEAD = b"NATS/1.0\r\nNats-Msg-Id: "
cdef bytes STREAM = b"\r\nNats-Expected-Stream: "
cdef bytes LAST_SEQ = b"\r\nNats-Expected-Last-Sequence: "
cdef bytes LAST_ID = b"\r\nNats-Expected-Last-Msg-Id: "
cdef bytes END = b"\r\n\r\n"


cdef inline char *_put(char *out, const char *data, Py_ssize_t size) noexcept:
    memcpy(out, data, size)
    return out + size


cdef inline char *_put_bytes(char *out, bytes data) noexcept:
    return _put(out, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))


cdef inline bint _plain(const char *text, Py_ssize_t size) noexcept:
    """Printable ASCII without a space, at least one character (the pure twin's regex)."""
    cdef Py_ssize_t i
    if size == 0:
        return False
    for i in range(size):
        if not 0x21 <= <unsigned char>text[i] <= 0x7e:
            return False
    return True


def frames(list batch, dict subjects, subject_of, bytes prefix, bytes stream,
           Py_ssize_t first, chain):
    cdef list chunks = []
    cdef list part = []
    cdef Py_ssize_t size = 0, payload = 0, i, n = len(batch), end = len(batch) - 1
    cdef Py_ssize_t ident_size, previous_size = 0, block, total, frame_size, reply_size
    cdef const char *ident
    cdef const char *previous = NULL
    cdef long long last_seq = 0
    cdef char seq_text[24]
    cdef char reply_text[24]
    cdef char head_text[48]
    cdef int seq_size, head_size
    cdef bytes body, subject, data, previous_bytes = None
    cdef tuple item
    cdef object event_id, key
    cdef char *out
    cdef bint chained = chain is not None, answered
    if chained:
        last_seq = chain[0]
        previous_bytes = chain[1]
        previous = PyBytes_AS_STRING(previous_bytes)
        previous_size = PyBytes_GET_SIZE(previous_bytes)
    for i in range(n):
        item = <tuple>batch[i]
        event_id = <object>PyTuple_GET_ITEM(item, 0)
        body = <bytes>PyTuple_GET_ITEM(item, 5)
        if type(event_id) is not str:
            return None
        ident = PyUnicode_AsUTF8AndSize(event_id, &ident_size)
        if not _plain(ident, ident_size):
            return None
        key = item[1:5]
        found = subjects.get(key)
        if found is None:
            found = subject_of(key, item)
        subject = <bytes>found
        # the header block
        block = PyBytes_GET_SIZE(HEAD) + ident_size + PyBytes_GET_SIZE(STREAM) \
            + PyBytes_GET_SIZE(stream) + PyBytes_GET_SIZE(END)
        seq_size = 0
        if chained:
            seq_size = snprintf(seq_text, sizeof(seq_text), "%lld", last_seq + i)
            block += PyBytes_GET_SIZE(LAST_SEQ) + seq_size + PyBytes_GET_SIZE(LAST_ID) \
                + previous_size
        total = block + PyBytes_GET_SIZE(body)
        answered = not chained or i == end
        reply_size = 0
        if answered:
            reply_size = snprintf(reply_text, sizeof(reply_text), "%zd",
                                  first + i if not chained else first)
        head_size = snprintf(head_text, sizeof(head_text), " %zd %zd\r\n", block, total)
        frame_size = 5 + PyBytes_GET_SIZE(subject) + head_size + total + 2
        if answered:
            frame_size += 1 + PyBytes_GET_SIZE(prefix) + reply_size
        data = PyBytes_FromStringAndSize(NULL, frame_size)
        out = PyBytes_AS_STRING(data)
        out = _put(out, b"HPUB ", 5)
        out = _put_bytes(out, subject)
        if answered:
            out = _put(out, b" ", 1)
            out = _put_bytes(out, prefix)
            out = _put(out, reply_text, reply_size)
        out = _put(out, head_text, head_size)
        out = _put_bytes(out, HEAD)
        out = _put(out, ident, ident_size)
        out = _put_bytes(out, STREAM)
        out = _put_bytes(out, stream)
        if chained:
            out = _put_bytes(out, LAST_SEQ)
            out = _put(out, seq_text, seq_size)
            out = _put_bytes(out, LAST_ID)
            out = _put(out, previous, previous_size)
            previous, previous_size = ident, ident_size  # kept alive by event_id (in batch)
        out = _put_bytes(out, END)
        out = _put_bytes(out, body)
        _put(out, b"\r\n", 2)
        part.append(data)
        size += frame_size
        payload += PyBytes_GET_SIZE(body)
        if size >= CHUNK:
            chunks.append(b"".join(part))
            part = []
            size = 0
    if part:
        chunks.append(b"".join(part))
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
