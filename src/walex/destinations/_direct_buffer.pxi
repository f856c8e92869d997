# The buffer, strings as orjson writes them, and the checks of the plain forms of
# walex.destinations._direct (included there: it declares the names used here).

# -- the buffer ------------------------------------------------------------------
#
# In C: the writers are forced inline (the C compiler declines to inline them into
# _direct, a large function, and a call with its memcpy costs ~40 instructions where a
# copy of a constant size inlined is a few moves). They return -1 with MemoryError set
# when the buffer cannot grow.

cdef extern from *:
    """
    typedef struct {
        char *p;
        Py_ssize_t n;
        Py_ssize_t cap;
        char *stack;  /* the caller's stack storage: p while it is big enough */
    } walex_Buf;

    #if defined(__GNUC__) || defined(__clang__)
    #define WALEX_INLINE static inline __attribute__((always_inline))
    #define WALEX_COLD static __attribute__((noinline, cold))
    #else
    #define WALEX_INLINE static inline
    #define WALEX_COLD static
    #endif

    /* memcpy for the short copies most are here (a key, a column's name, a value): a
       libc call costs more than the copy itself; two overlapping loads and stores
       instead (n known to the compiler: memcpy, expanded in place) */
    WALEX_INLINE void walex_copy(char *d, const char *s, Py_ssize_t n) {
    #if defined(__GNUC__) || defined(__clang__)
        if (__builtin_constant_p(n)) {
            memcpy(d, s, n);
            return;
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
    }

    WALEX_COLD int walex_grow(walex_Buf *b, Py_ssize_t extra) {
        Py_ssize_t cap = b->cap * 2;
        char *p;
        while (cap < b->n + extra)
            cap *= 2;
        if (b->p == b->stack) {
            p = (char *)PyMem_Malloc(cap);
            if (p == NULL) {
                PyErr_NoMemory();
                return -1;
            }
            memcpy(p, b->p, b->n);
        } else {
            p = (char *)PyMem_Realloc(b->p, cap);
            if (p == NULL) {
                PyErr_NoMemory();
                return -1;
            }
        }
        b->p = p;
        b->cap = cap;
        return 0;
    }

    WALEX_INLINE int walex_put(walex_Buf *b, const char *s, Py_ssize_t n) {
        if (b->n + n > b->cap && walex_grow(b, n) < 0)
            return -1;
        walex_copy(b->p + b->n, s, n);
        b->n += n;
        return 0;
    }

    /* a copy of the buffer's own bytes [at, at + n) (written before: at + n <= b->n) to
       its end; the source found after a growth (which may move the buffer) */
    WALEX_INLINE int walex_put_own(walex_Buf *b, Py_ssize_t at, Py_ssize_t n) {
        if (b->n + n > b->cap && walex_grow(b, n) < 0)
            return -1;
        walex_copy(b->p + b->n, b->p + at, n);
        b->n += n;
        return 0;
    }

    WALEX_INLINE int walex_put_bytes(walex_Buf *b, PyObject *s) {
        return walex_put(b, PyBytes_AS_STRING(s), PyBytes_GET_SIZE(s));
    }

    WALEX_INLINE int walex_put_char(walex_Buf *b, char c) {
        if (b->n + 1 > b->cap && walex_grow(b, 1) < 0)
            return -1;
        b->p[b->n++] = c;
        return 0;
    }

    WALEX_INLINE int walex_put_quoted(walex_Buf *b, const char *s, Py_ssize_t n) {
        if (b->n + n + 2 > b->cap && walex_grow(b, n + 2) < 0)
            return -1;
        b->p[b->n] = '"';
        walex_copy(b->p + b->n + 1, s, n);
        b->p[b->n + n + 1] = '"';
        b->n += n + 2;
        return 0;
    }
    """
    ctypedef struct Buf "walex_Buf":
        char *p
        Py_ssize_t n
        Py_ssize_t cap
        char *stack
    int _grow "walex_grow" (Buf *b, Py_ssize_t extra) except -1
    int _put "walex_put" (Buf *b, const char *s, Py_ssize_t n) except -1
    int _put_own "walex_put_own" (Buf *b, Py_ssize_t at, Py_ssize_t n) except -1  # not _put(b, b.p + at, n)
    int _put_bytes "walex_put_bytes" (Buf *b, bytes s) except -1
    int _put_char "walex_put_char" (Buf *b, char c) except -1
    int _put_quoted "walex_put_quoted" (Buf *b, const char *s, Py_ssize_t n) except -1  # no escape needed


cdef inline void _init(Buf *b, char *stack, Py_ssize_t size) noexcept:
    b.p = stack
    b.stack = stack
    b.n = 0
    b.cap = size


cdef inline void _free(Buf *b) noexcept:
    if b.p != b.stack:
        PyMem_Free(b.p)
    b.p = b.stack


cdef int _put_int(Buf *b, Py_ssize_t v) except -1:
    cdef char digits[24]
    cdef int i = 24
    cdef bint negative = v < 0
    cdef unsigned long long u = <unsigned long long>(-v) if negative else <unsigned long long>v
    while True:
        i -= 1
        digits[i] = <char>(48 + u % 10)
        u //= 10
        if u == 0:
            break
    if negative:
        i -= 1
        digits[i] = b'-'
    return _put(b, digits + i, 24 - i)


# -- strings as orjson writes them -----------------------------------------------

cdef inline bint _cont(unsigned char c) noexcept:
    return (c & 0xC0) == 0x80


cdef Py_ssize_t _utf8_length(const unsigned char *s, Py_ssize_t n) noexcept:
    """The length of the valid UTF-8 sequence at ``s`` (Python's rules: no overlong form,
    no surrogate, nothing beyond U+10FFFF), or 0."""
    cdef unsigned char c = s[0]
    if 0xC2 <= c <= 0xDF:
        return 2 if n >= 2 and _cont(s[1]) else 0
    if 0xE0 <= c <= 0xEF:
        if n < 3 or not _cont(s[1]) or not _cont(s[2]):
            return 0
        if (c == 0xE0 and s[1] < 0xA0) or (c == 0xED and s[1] > 0x9F):
            return 0
        return 3
    if 0xF0 <= c <= 0xF4:
        if n < 4 or not _cont(s[1]) or not _cont(s[2]) or not _cont(s[3]):
            return 0
        if (c == 0xF0 and s[1] < 0x90) or (c == 0xF4 and s[1] > 0x8F):
            return 0
        return 4
    return 0


cdef inline bint _plain8(const unsigned char *s) noexcept:
    """Whether the eight bytes at ``s`` are ASCII from ' ' on, none '"' or '\\' (each
    written as it is when ``_words``): the usual bit tricks on a 64-bit word, exact
    for "any byte": a byte of 0x80 or more, below 0x20, or equal to '"' or '\\'."""
    cdef uint64_t w, q, e
    memcpy(&w, s, 8)
    q = w ^ 0x2222222222222222ULL
    e = w ^ 0x5C5C5C5C5C5C5C5CULL
    return ((w | ((w - 0x2020202020202020ULL) & ~w)
             | ((q - 0x0101010101010101ULL) & ~q)
             | ((e - 0x0101010101010101ULL) & ~e)) & 0x8080808080808080ULL) == 0


cdef int _put_string(Buf *b, const unsigned char *s, Py_ssize_t n) except -1:
    """``s`` (UTF-8) as a JSON string; raises _Unfit if it is not valid UTF-8."""
    cdef Py_ssize_t i = 0, start, step
    cdef unsigned char c
    _put_char(b, b'"')
    while i < n:
        start = i
        while i < n:  # a run written as it is
            if _words:
                while i + 8 <= n and _plain8(s + i):
                    i += 8
                if i >= n:
                    break
            c = s[i]
            if c < 0x80:
                if not _as_is[c]:
                    break
                i += 1
            else:
                step = _utf8_length(s + i, n - i)
                if step == 0:
                    raise _Unfit
                i += step
        if i > start:
            _put(b, <const char *>s + start, i - start)
        if i < n:
            c = s[i]
            _put(b, _esc[c], _esc_len[c])
            i += 1
    _put_char(b, b'"')
    return 0


cdef int _put_str(Buf *b, object text) except -1:
    cdef Py_ssize_t n
    cdef const char *s = PyUnicode_AsUTF8AndSize(text, &n)
    return _put_string(b, <const unsigned char *>s, n)


# -- the writers -----------------------------------------------------------------

cdef inline bint _digit(char c) noexcept:
    return b'0' <= c <= b'9'


cdef inline bint _two(const char *s, int low, int high) noexcept:
    """Whether s[0:2] are digits of a number in low..high."""
    if not (_digit(s[0]) and _digit(s[1])):
        return False
    cdef int v = (s[0] - 48) * 10 + (s[1] - 48)
    return low <= v <= high


cdef bint _day(const char *s) noexcept:
    """Whether s[0:10] is YYYY-MM-DD (a year 0001 to 9999)."""
    return (_digit(s[0]) and _digit(s[1]) and _digit(s[2]) and _digit(s[3])
            and not (s[0] == b'0' and s[1] == b'0' and s[2] == b'0' and s[3] == b'0')
            and s[4] == b'-' and _two(s + 5, 1, 12) and s[7] == b'-' and _two(s + 8, 1, 31))


cdef int _timestamp(Buf *b, const char *s, Py_ssize_t n, bint tz) except -1:
    """Write the ISO form of a timestamp's text if it is the plain form; 0 if it is not."""
    cdef Py_ssize_t end = n - 3 if tz else n, digits, i
    if end < 19 or not _day(s) or s[10] != b' ' or not _two(s + 11, 0, 23) or s[13] != b':' \
            or not _two(s + 14, 0, 59) or s[16] != b':' or not _two(s + 17, 0, 59):
        return 0
    if tz and not (s[end] == b'+' and s[end + 1] == b'0' and s[end + 2] == b'0'):
        return 0
    digits = 0
    if end > 19:
        if s[19] != b'.' or end - 20 < 1 or end - 20 > 6:
            return 0
        for i in range(20, end):
            if not _digit(s[i]):
                return 0
        digits = end - 20
    _put_char(b, b'"')
    _put(b, s, 10)
    _put_char(b, b'T')
    _put(b, s + 11, 8)
    for i in range(digits):
        if s[20 + i] != b'0':
            _put(b, s + 19, 1 + digits)
            _put(b, b"000000", 6 - digits)
            break
    if tz:
        _put_bytes(b, _UTC_OFFSET)
    _put_char(b, b'"')
    return 1


cdef bint _numeric(const char *s, Py_ssize_t n) noexcept:
    """NaN, Infinity, -Infinity, or -?(0|[1-9][0-9]*)(.[0-9]+)?"""
    cdef Py_ssize_t i = 0
    if n == 3 and s[0] == b'N' and s[1] == b'a' and s[2] == b'N':
        return True
    if n > 0 and s[0] == b'-':
        i = 1
    if n - i == 8 and memcmp(s + i, b"Infinity", 8) == 0:
        return True
    if i >= n or not _digit(s[i]):
        return False
    if s[i] == b'0':
        i += 1
    else:
        while i < n and _digit(s[i]):
            i += 1
    if i == n:
        return True
    if s[i] != b'.' or i + 1 == n:
        return False
    i += 1
    while i < n:
        if not _digit(s[i]):
            return False
        i += 1
    return True


cdef bint _uuid(const char *s, Py_ssize_t n) noexcept:
    cdef Py_ssize_t i
    cdef char c
    if n != 36:
        return False
    for i in range(36):
        c = s[i]
        if i == 8 or i == 13 or i == 18 or i == 23:
            if c != b'-':
                return False
        elif not (_digit(c) or b'a' <= c <= b'f'):
            return False
    return True


cdef inline bint _hex_lower(unsigned char c) noexcept:
    return (48 <= c <= 57) or (97 <= c <= 102)


cdef bint _jsonb(Buf *b, const char *s, Py_ssize_t n) except -1:
    """The twin of ``direct.jsonb_compact``: jsonb text without PostgreSQL's spaces written
    to ``b`` (True), or nothing written (False) where that is not certain to be what the
    json loader and orjson.dumps give. The text is checked token by token and copied in
    runs: the compact form is the text without those spaces."""
    cdef Py_ssize_t i = 0, j, start, digits, mark = b.n, run = 0
    cdef int depth = 0, code
    cdef unsigned char c, d, e, last = 0  # the last byte kept: ',' ':' or another (0: none yet)
    while i < n:
        c = <unsigned char>s[i]
        if c == 34:  # '"': a string, kept as it is, its escapes checked
            j = i + 1
            while True:
                if j >= n:
                    b.n = mark
                    return False
                d = <unsigned char>s[j]
                if d == 34:
                    break
                if d < 32:
                    b.n = mark
                    return False
                if d == 92:  # backslash
                    if j + 1 >= n:
                        b.n = mark
                        return False
                    e = <unsigned char>s[j + 1]
                    if e == 117:  # \u00xx: the control characters PostgreSQL writes so
                        if (j + 5 >= n or s[j + 2] != b'0' or s[j + 3] != b'0'
                                or not _hex_lower(<unsigned char>s[j + 4])
                                or not _hex_lower(<unsigned char>s[j + 5])):
                            b.n = mark
                            return False
                        code = ((<unsigned char>s[j + 4] - 48 if s[j + 4] <= b'9'
                                 else <unsigned char>s[j + 4] - 87) * 16
                                + (<unsigned char>s[j + 5] - 48 if s[j + 5] <= b'9'
                                   else <unsigned char>s[j + 5] - 87))
                        if code >= 32 or code == 8 or code == 9 or code == 10 or code == 12 \
                                or code == 13:
                            b.n = mark
                            return False
                        j += 6
                        continue
                    if not (e == 34 or e == 92 or e == 98 or e == 102 or e == 110 or e == 114
                            or e == 116):
                        b.n = mark
                        return False
                    j += 2
                    continue
                j += 1
                if j - i == 9:  # a string longer than 8 bytes: the rest 8 at a time, while
                    # none is '"', a backslash, a control character or a byte >= 0x80
                    while j + 8 <= n and _plain8(<const unsigned char *>s + j):
                        j += 8
            i = j + 1
            last = 1
        elif c == 32:  # only PostgreSQL's, after a comma or a colon: the run so far copied
            if last != 44 and last != 58:
                b.n = mark
                return False
            if i > run:
                _put(b, s + run, i - run)
            run = i + 1
            i += 1
        elif c == 123 or c == 91:  # '{' '['
            depth += 1
            if depth > 64:
                b.n = mark
                return False
            last = c
            i += 1
        elif c == 125 or c == 93 or c == 44 or c == 58:  # '}' ']' ',' ':'
            if c == 125 or c == 93:
                depth -= 1
                if depth < 0:
                    b.n = mark
                    return False
            last = c
            i += 1
        elif c == 45 or 48 <= c <= 57:  # a number: an integer of at most 15 digits
            j = i + 1 if c == 45 else i
            start = j
            while j < n and 48 <= <unsigned char>s[j] <= 57:
                j += 1
            digits = j - start
            if (digits == 0 or digits > 15 or (s[start] == b'0' and (digits > 1 or c == 45))
                    or (j < n and (s[j] == b'.' or s[j] == b'e' or s[j] == b'E'))):
                b.n = mark
                return False
            i = j
            last = 1
        elif c == 116 and i + 4 <= n and memcmp(s + i, b"true", 4) == 0:
            i += 4
            last = 1
        elif c == 102 and i + 5 <= n and memcmp(s + i, b"false", 5) == 0:
            i += 5
            last = 1
        elif c == 110 and i + 4 <= n and memcmp(s + i, b"null", 4) == 0:
            i += 4
            last = 1
        else:
            b.n = mark
            return False
    if depth != 0:
        b.n = mark
        return False
    if n > run:
        _put(b, s + run, n - run)
    return True
