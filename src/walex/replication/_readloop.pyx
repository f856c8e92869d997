# cython: language_level=3, boundscheck=False, wraparound=False
"""The compiled twin of the frame-gathering loop of ``ReplicationConnection.read``.

It calls libpq directly (``PQgetCopyData`` with async=1, ``PQfreemem``,
``PQconsumeInput``) on psycopg's own connection, through function addresses that
``walex.replication.readloop`` took from the libpq psycopg already loaded: no link-time
dependency on libpq and no libpq headers (the four prototypes are declared here).
``gather`` takes the frames :meth:`read`'s Python loop takes, in the same order, and says
what that loop would do next; every decision about errors and the end of the stream
stays in Python.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport uintptr_t

ctypedef int (*get_copy_data_t)(void *conn, char **buffer, int async_) noexcept nogil
ctypedef int (*consume_input_t)(void *conn) noexcept nogil
ctypedef void (*freemem_t)(void *ptr) noexcept nogil
ctypedef int (*socket_t)(const void *conn) noexcept nogil

# what gather() says the caller does next
READY = 1  # return the frames
WAIT = 0  # no frame yet: wait for the socket, consume_input, gather again
END = -1  # PQgetCopyData said -1: the end of the copy (results checked in Python)
COPY_FAILED = -2  # PQgetCopyData said -2: "receiving copy data failed"
CONSUME_FAILED = -3  # PQconsumeInput said 0: "consuming input failed"


cdef class ReadLoop:
    """libpq's functions, by address; ``gather`` runs the loop on one PGconn*."""

    cdef get_copy_data_t _get_copy_data
    cdef consume_input_t _consume_input
    cdef freemem_t _freemem
    cdef socket_t _socket

    def __cinit__(self, uintptr_t get_copy_data, uintptr_t consume_input,
                  uintptr_t freemem, uintptr_t socket):
        if not (get_copy_data and consume_input and freemem and socket):
            raise ValueError("a libpq function address is NULL")
        self._get_copy_data = <get_copy_data_t>get_copy_data
        self._consume_input = <consume_input_t>consume_input
        self._freemem = <freemem_t>freemem
        self._socket = <socket_t>socket

    def socket(self, uintptr_t conn) -> int:
        """PQsocket(conn): what psycopg's ``pgconn.socket`` says, if this is its libpq."""
        if not conn:
            raise ValueError("NULL PGconn")
        return self._socket(<const void *>conn)

    def gather(self, uintptr_t conn, list frames, Py_ssize_t per_turn, Py_ssize_t most) -> int:
        """Append to ``frames`` what ``read``'s Python loop appends: frames from libpq's
        buffer; when it has none left, frames present and fewer than ``per_turn`` and the
        socket not tried since the last frame, one PQconsumeInput and on. READY when
        ``frames`` is to be returned (``most`` reached, the socket had no more or a turn's
        worth came), WAIT when no frame came (``frames`` empty), else END,
        COPY_FAILED or CONSUME_FAILED (the libpq call's error is on the connection)."""
        cdef void *c = <void *>conn
        cdef char *buf
        cdef int nbytes
        cdef Py_ssize_t count = len(frames)
        cdef Py_ssize_t tried = -1  # count when libpq last read the socket without a wait
        cdef object frame
        if not c:
            raise ValueError("NULL PGconn")
        while True:
            buf = NULL
            nbytes = self._get_copy_data(c, &buf, 1)
            if nbytes > 0:
                try:
                    frame = PyBytes_FromStringAndSize(buf, nbytes)
                finally:
                    self._freemem(buf)
                frames.append(frame)
                count += 1
                if count >= most:
                    return READY
                continue
            if buf != NULL:  # libpq allocates only for a frame; never leak one regardless
                self._freemem(buf)
            if nbytes == 0:
                if count:
                    if tried == count or count >= per_turn:
                        return READY
                    tried = count
                    if self._consume_input(c) != 1:
                        return CONSUME_FAILED
                    continue
                return WAIT
            if nbytes == -2:
                return COPY_FAILED
            return END
