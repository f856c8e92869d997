# cython: language_level=3, wraparound=False, cdivision=True
"""walex._hotpath: XLogData frames to the Events of a batch, in one compiled pass.

The optional compiled twin (Cython) of the pure-Python hot path, which stays
the reference and the fallback: :meth:`walex.pgoutput.decoder.Decoder.decode`,
then :meth:`walex.assembler.TransactionAssembler.feed` with the Event rules
of :mod:`walex.rows`. :mod:`walex.hotpath` chooses between them.

:meth:`HotPath.feed` takes one replication frame and handles it only when it
is the XLogData of a Begin, Insert, Update, Delete or Commit of a plain
(neither streamed nor two-phase) transaction, well formed, arriving in a state
where the pure path would accept it. It then gives exactly what the pure path
gives (the same Events, Transaction batches and ids) without building message
objects, and shares the assembler's state, so the two paths can take turns
inside one transaction. Everything else, malformed input and messages out of
place included, returns :data:`NOT_HANDLED` *before any state changed*: the
pure path then decodes the frame and raises its own DecodeError, or applies
the message. Rows are typed by :meth:`walex.relations.Table.load` (psycopg's
Transformer, user adapters included), never here.
"""

from cpython.datetime cimport datetime_new, import_datetime
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_Copy, PyDict_GetItem, PyDict_SetItem
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE, PyList_New, PyList_SET_ITEM
from cpython.object cimport Py_NE, PyObject, PyObject_RichCompareBool
from cpython.ref cimport Py_DECREF, Py_INCREF, Py_XDECREF
from cpython.long cimport PyLong_AsSsize_t
from cpython.unicode cimport PyUnicode_DecodeASCII
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy

import dataclasses
import datetime
from decimal import Decimal
from uuid import UUID
from types import MemberDescriptorType

from .event import Change, Event, EventType
from .pgoutput.decoder import _PG_EPOCH
from .pgoutput.messages import UNCHANGED_TOAST, BinaryValue, TupleData
from .pgoutput.decoder import Decoder
from .rawevent import RawEvent
from .relations import Table
from .assembler import TransactionAssembler, _Open
from .transactions import Transaction

__all__ = ["HotPath", "NOT_HANDLED"]

NOT_HANDLED = object()
"""What :meth:`HotPath.feed` returns for a frame the pure path must handle."""

import_datetime()

cdef object _NOT_HANDLED = NOT_HANDLED
cdef object _UNCHANGED = UNCHANGED_TOAST
cdef object _INSERT = EventType.INSERT
cdef object _UPDATE = EventType.UPDATE
cdef object _DELETE = EventType.DELETE
cdef object _UTC = _PG_EPOCH.tzinfo  # what _PG_EPOCH + a timedelta carries
cdef const char *_HEX = b"0123456789ABCDEF"


include "_hotpath_objects.pxi"  # _Maker, _Slots, _change_tuple, _immutable
include "_hotpath_stamps.pxi"  # _pg_timestamp, _event_id, _format_lsn
include "_hotpath_values.pxi"  # _plan, _typed_record: rows typed in C


# _Open's slots the per-row path, Commit and _batch read
cdef _Slots _OPEN = _Slots(_Open, ("changes", "emitted", "size", "spill", "xid", "origin",
                                   "commit_lsn", "commit_time"))
cdef enum:
    O_CHANGES, O_EMITTED, O_SIZE, O_SPILL, O_XID, O_ORIGIN, O_COMMIT_LSN, O_COMMIT_TIME
cdef _Slots _ASSEMBLER = _Slots(TransactionAssembler, ("_current", "_stream", "batch_size", "batch_bytes"))
cdef enum:
    A_CURRENT, A_STREAM, A_BATCH_SIZE, A_BATCH_BYTES
cdef _Slots _TABLE = _Slots(Table, ("subscribed", "raw"))
cdef _Slots _DECODER = _Slots(Decoder, ("in_stream",))


cdef _Maker _make_event = _Maker(Event)
# a RawEvent (walex.rawevent): Event's slots but its rows', and its own raw slot
cdef _Slots _EVENT = _Slots(Event, ("name", "type", "source", "timestamp", "lsn", "id"))
cdef _Slots _EVENT_ROWS = _Slots(Event, ("new_record", "old_record", "changes"))
cdef _Type *_EVENT_TYPE = <_Type *>Event
cdef _Slots _RAW = _Slots(RawEvent, ("raw",))
cdef _Type *_RAW_TYPE = <_Type *>RawEvent
cdef str _KEY_KIND = "K", _OLD_KIND = "O", _NO_KIND = ""
cdef _Maker _make_row = _Maker(TupleData)
cdef _Maker _make_transaction = _Maker(Transaction)
cdef _Maker _make_open = _Maker(_Open)


include "_hotpath_tuples.pxi"  # _be32, _be64, _row, _tuple, _values, _differ, _record


cdef class HotPath:
    """Feeds a session's frames to its :class:`~walex.assembler.TransactionAssembler`.

    One per session, beside the session's Decoder (whose stream state it reads).
    """

    cdef object assembler, relations, decoder
    cdef readonly object end  # WAL end of the last frame handled (for AckTracker.saw)
    cdef readonly Py_ssize_t pos  # after feed_frames: the index of the first frame not handled
    cdef object _error  # raised by a frame after feed_frames completed batches, raised next call
    cdef Py_ssize_t _error_pos
    # stamp of the open transaction the events are built for
    cdef object _stamped  # the _Open the fields below belong to
    cdef uint64_t _commit_lsn
    cdef object _commit_time, _lsn_text, _id  # _id: of the event being built
    # the Begin this path handled last: its _Open and raw timestamp
    cdef object _begun
    cdef int64_t _begun_ts
    # the table of the last change
    cdef object _table, _names, _name, _source, _load, _load_plain, _keys
    cdef Py_ssize_t _width  # the table's column count
    cdef object _relkey  # its relation id, the int object the relation cache is keyed by
    cdef uint32_t _relid  # the same in C
    cdef dict _template  # {column: None} in column order, copied for each record
    cdef bytes _kinds  # the table's column kinds (_plan), None: its rows typed by Table.load
    cdef list _loads  # each column's loader's load (_plan)
    cdef dict _plans  # relation id: (table, _plan of it), so a switch of tables reuses it
    cdef dict _tables  # the relation cache's tables by relation id

    def __init__(self, assembler, decoder):
        if not isinstance(assembler, TransactionAssembler) or not isinstance(decoder, Decoder):
            raise TypeError("HotPath takes a TransactionAssembler and a Decoder")
        self.assembler = assembler
        self.relations = assembler.relations
        self._tables = self.relations._tables
        self._plans = {}
        self.decoder = decoder
        self.end = 0

    def feed(self, bytes frame):
        """Handle one frame: the batches it completes, None, or :data:`NOT_HANDLED`."""
        return self._feed(frame)

    def feed_frames(self, list frames, Py_ssize_t pos, Py_ssize_t max_batches, Py_ssize_t max_bytes):
        """Handle ``frames[pos:]`` in order, as :meth:`feed` each, until the first frame
        :meth:`feed` would not handle, or until the batches completed number
        ``max_batches`` or their sizes add up to more than ``max_bytes`` (what the
        queue takes without waiting: the reader stops building batches it could
        not queue). Returns the completed batches (a list, or None); ``pos`` is
        then the index of the first frame not handled, ``end`` the WAL end of the
        last handled one. One call instead of a Python loop over the frames. An
        error a frame raises comes after the batches completed before it: with
        the next call, from that frame's index.
        """
        cdef Py_ssize_t n = PyList_GET_SIZE(frames), size = 0
        cdef list out = None
        if self._error is not None:  # what the frame at _error_pos raised, after batches before it
            error, self._error = self._error, None
            if pos == self._error_pos:
                raise error
        while pos < n:
            frame = <object>PyList_GET_ITEM(frames, pos)
            if type(frame) is not bytes:
                break
            try:
                result = self._feed(frame)
            except Exception as exc:  # raised before any state changed, as feed()
                if out is None:
                    raise
                # the batches completed before this frame first; the next call raises it
                self._error, self._error_pos = exc, pos
                break
            if result is _NOT_HANDLED:
                break
            pos += 1
            if result is not None:
                if out is None:
                    out = result
                else:
                    out.extend(result)
                for txn in result:
                    size += <Py_ssize_t>txn.size
                if PyList_GET_SIZE(out) >= max_batches or size > max_bytes:
                    break
        self.pos = pos
        return out

    cdef object _feed(self, bytes frame):
        cdef const unsigned char *buf = <const unsigned char *>PyBytes_AS_STRING(frame)
        cdef Py_ssize_t size = PyBytes_GET_SIZE(frame)
        if size < 26 or buf[0] != 119:  # not XLogData ('w'), or an empty payload
            return _NOT_HANDLED
        if _DECODER.get(self.decoder, 0):  # in_stream
            return _NOT_HANDLED
        cdef unsigned char tag = buf[25]
        cdef object result
        if tag == 73 or tag == 85 or tag == 68:  # 'I', 'U', 'D'
            result = self._change(buf + 25, size - 25, tag, _be64(buf + 1))
        elif tag == 66:  # 'B'
            result = self._begin(buf + 25, size - 25)
        elif tag == 67:  # 'C'
            result = self._commit(buf + 25, size - 25)
        else:
            return _NOT_HANDLED
        if result is not _NOT_HANDLED:
            self.end = _be64(buf + 9)
        return result

    # -- Begin and Commit ------------------------------------------------

    cdef object _begin(self, const unsigned char *data, Py_ssize_t size):
        assembler = self.assembler
        if size != 21 or assembler._current is not None:
            return _NOT_HANDLED
        cdef int64_t ts = <int64_t>_be64(data + 9)
        commit_time = _pg_timestamp(ts)
        if commit_time is None:
            return _NOT_HANDLED
        txn = _make_open.make((_be32(data + 17), _be64(data + 1), commit_time))
        assembler._current = txn
        self._begun = txn
        self._begun_ts = ts
        return None

    cdef object _commit(self, const unsigned char *data, Py_ssize_t size):
        assembler = self.assembler
        txn = _ASSEMBLER.get(assembler, A_CURRENT)
        if size != 26 or type(txn) is not _Open or _OPEN.get(txn, O_SPILL) is not None:
            return _NOT_HANDLED
        cdef int64_t ts = <int64_t>_be64(data + 18)
        cdef uint64_t commit_lsn = _be64(data + 2)
        if txn is self._begun and ts == self._begun_ts:
            commit_time = _OPEN.get(txn, O_COMMIT_TIME)
            same = commit_lsn == <uint64_t>_OPEN.get(txn, O_COMMIT_LSN)
        else:
            commit_time = _pg_timestamp(ts)
            if commit_time is None:
                return _NOT_HANDLED
            same = (commit_lsn == <uint64_t>_OPEN.get(txn, O_COMMIT_LSN)
                    and commit_time == _OPEN.get(txn, O_COMMIT_TIME))
        assembler._current = None
        self._begun = None
        return [self._batch(txn, commit_lsn, commit_time, _be64(data + 10), not same)]

    # -- changes ---------------------------------------------------------

    cdef object _change(self, const unsigned char *data, Py_ssize_t size, unsigned char tag, uint64_t start):
        assembler = self.assembler
        txn = _ASSEMBLER.get(assembler, A_CURRENT)
        if (type(txn) is not _Open or _ASSEMBLER.get(assembler, A_STREAM) is not None
                or _OPEN.get(txn, O_SPILL) is not None):
            return _NOT_HANDLED
        # Parse the whole message first (what Decoder._insert/_update/_delete accept).
        cdef Py_ssize_t pos = 5, position, new_count = -1, old_count = -1
        cdef bint new_plain = True, old_plain = True
        cdef unsigned char kind = 0, old_kind = 0
        cdef object new = None, old = None
        if size < 6:
            return _NOT_HANDLED
        cdef uint32_t relid = _be32(data + 1)
        # the last table's id: the relation cache's own key object, found by identity (no
        # new int, no comparison)
        relation_id = self._relkey if relid == self._relid and self._relkey is not None else relid
        # the table (RelationCache.get, in C; no side effect): a raw table's rows sent whole
        # as text are kept as raw rows (walex.rawrow), as its RawEvents keep them
        cdef PyObject *found = PyDict_GetItem(self._tables, relation_id)
        table = <object>found if found != NULL else None
        cdef bint as_raw = type(table) is Table and _TABLE.get(table, 1) is True
        kind = data[5]
        # a subscribed typed table's new row typed in C straight into its record (when
        # _typed_record is sure of every value; else parsed and typed as before)
        cdef bint typed = (not as_raw and type(table) is Table and bool(_TABLE.get(table, 0))
                           and (tag == 73 or (tag == 85 and kind == 78)))
        if typed:
            if table is not self._table:
                self._use(table, relation_id, relid)
            typed = self._kinds is not None
        if tag == 73:  # Insert: 'N' tuple
            if kind != 78:
                return _NOT_HANDLED
            pos = 6
        elif tag == 85:  # Update: ['K'|'O' tuple] 'N' tuple
            if kind == 75 or kind == 79:
                old_kind = kind
                pos = 6
                old = (_row(data, size, &pos, &old_plain, &old_count) if as_raw
                       else _tuple(data, size, &pos, &old_plain))
                if old is None or pos >= size:
                    return _NOT_HANDLED
                kind = data[pos]
            if kind != 78:
                return _NOT_HANDLED
            pos += 1
        if tag != 68:  # the new row, at pos: typed in C (an Insert, an Update without an old
            # row) when _typed_record is sure of it (it moves pos only then), else parsed
            if typed:
                new = _typed_record(data, size, &pos, self._kinds, self._loads, self._names)
                typed = new is not None
            if not typed:
                new = (_row(data, size, &pos, &new_plain, &new_count) if as_raw
                       else _tuple(data, size, &pos, &new_plain))
        else:  # Delete: 'K'|'O' tuple
            if kind != 75 and kind != 79:
                return _NOT_HANDLED
            old_kind = kind
            pos = 6
            old = (_row(data, size, &pos, &old_plain, &old_count) if as_raw
                   else _tuple(data, size, &pos, &old_plain))
            new = old  # only checked for None below
        if new is None or pos != size:
            return _NOT_HANDLED

        # From here on, as TransactionAssembler._change with walex.rows.
        lsn = start
        if table is None:
            table = self.relations.get(relid, chr(tag), lsn)  # raises its DecodeError
        if _TABLE.get(table, 0) if type(table) is Table else table.subscribed:
            if table is not self._table:
                self._use(table, relation_id, relid)
            if txn is not self._stamped:
                self._stamped = txn
                self._commit_lsn = txn.commit_lsn
                self._commit_time = txn.commit_time
                self._lsn_text = _format_lsn(self._commit_lsn)
            changes = _OPEN.get(txn, O_CHANGES)
            emitted = _OPEN.get(txn, O_EMITTED)
            if type(emitted) is int and type(changes) is list:  # the position in C
                position = PyLong_AsSsize_t(emitted)
                self._id = _event_id_at(self._commit_lsn, position + PyList_GET_SIZE(changes))
            else:
                self._id = _event_id(self._commit_lsn, emitted + len(changes))
            if typed:  # the record made already
                event = self._event(_INSERT if tag == 73 else _UPDATE, new, None, None)
            elif type(table) is Table and _TABLE.get(table, 1) is True and (
                    (type(new) is bytes and new_count == self._width) if tag != 68 else True) and (
                    old is None or (type(old) is bytes and old_count == self._width)):
                event = self._raw(tag, new, old, old_kind, lsn, table)
            elif as_raw:  # a raw row after all typed (its width): as lists, as the pure path
                if tag == 68:
                    old = _values(old)
                    new = old
                else:
                    new = _values(new)
                    if old is not None:
                        old = _values(old)
                if tag == 73:
                    event = self._insert(new, new_plain, lsn)
                elif tag == 85:
                    event = self._update(new, new_plain, old, old_plain, old_kind, lsn)
                else:
                    event = self._delete(old, old_plain, old_kind, lsn)
            elif tag == 73:
                event = self._insert(new, new_plain, lsn)
            elif tag == 85:
                event = self._update(new, new_plain, old, old_plain, old_kind, lsn)
            else:
                event = self._delete(old, old_plain, old_kind, lsn)
        else:
            event = None
            changes = _OPEN.get(txn, O_CHANGES)
        changes.append(event)
        # the frame's size (payload and its 25-byte XLogData header), as the pure path
        # counts it towards batch_bytes and the pipeline's max_pending_bytes
        held = _OPEN.get(txn, O_SIZE) + (size + 25)
        _OPEN.put(txn, O_SIZE, held)
        if (len(changes) >= _ASSEMBLER.get(assembler, A_BATCH_SIZE)
                or held >= _ASSEMBLER.get(assembler, A_BATCH_BYTES)):
            return [self._batch(txn, _OPEN.get(txn, O_COMMIT_LSN), _OPEN.get(txn, O_COMMIT_TIME),
                                0, False)]
        return None

    cdef void _use(self, object table, object relation_id, uint32_t relid) except *:
        """Make ``table`` the table of the changes that follow (its names, loaders, plan)."""
        self._table = table
        self._names = table.column_names
        self._name = table.name
        self._source = table.source
        self._load = table.load
        self._load_plain = table.load_plain
        self._width = len(table.type_oids)
        self._keys = table.key_indexes
        self._template = dict.fromkeys(self._names)
        key = table.relation_id
        self._relkey = key if type(key) is int and key == relation_id else None
        self._relid = relid
        self._kinds = self._loads = None
        if (type(table) is Table and type(self._names) is list and len(self._template) == self._width
                and PyList_GET_SIZE(self._names) == self._width):
            cached = self._plans.get(key)  # as many as the relation cache has ids
            if cached is not None and (<tuple>cached)[0] is table:
                plan = (<tuple>cached)[1]
            else:
                plan = _plan(table)
                self._plans[key] = (table, plan)
            if plan is not None:
                self._kinds, self._loads = plan

    cdef dict _record(self, object values):
        """``dict(zip(names, values))``: a copy of the template, its values replaced."""
        cdef list names = self._names
        cdef dict template = self._template
        cdef Py_ssize_t i, n = PyList_GET_SIZE(names)
        if len(values) != n or len(template) != n:
            return _record(names, values)
        cdef dict record = PyDict_Copy(template)
        for i in range(n):
            PyDict_SetItem(record, <object>PyList_GET_ITEM(names, i), values[i])
        return record

    cdef object _load_row(self, list values, bint plain, str tag, object lsn):
        """``Table.load(TupleData(values, plain), tag, lsn)``: for a plain row of the
        table's width, its ``load_plain`` called directly (no TupleData, no Python
        frame); ``Table.load`` for any other row, and to raise its DecodeError."""
        if plain and PyList_GET_SIZE(values) == self._width:
            try:
                return self._load_plain(values)
            except Exception:
                pass  # Table.load fails the same way, and names the column
        return self._load(_make_row.make((values, plain)), tag, lsn)

    cdef object _raw(self, unsigned char tag, object new, object old, unsigned char old_kind,
                     object lsn, object table):
        """A RawEvent: the rows kept as sent, typed when read (walex.rawevent)."""
        if tag == 73:
            kind, old = _INSERT, None
        elif tag == 85:
            kind = _UPDATE
        else:
            kind, new = _DELETE, None
        obj = <object>_RAW_TYPE.tp_alloc(_RAW_TYPE, 0)
        Py_DECREF(obj)  # tp_alloc gave a new reference, and so does <object>
        _EVENT.put(obj, 0, self._name)
        _EVENT.put(obj, 1, kind)
        _EVENT.put(obj, 2, self._source)
        _EVENT.put(obj, 3, self._commit_time)
        _EVENT.put(obj, 4, self._lsn_text)
        _EVENT.put(obj, 5, self._id)
        # the rows as raw rows (walex.rawrow: one bytes object each, not tracked by the
        # collector)
        _RAW.put(obj, 0, (table, new, old,
                          _KEY_KIND if old_kind == 75 else _OLD_KIND if old_kind == 79 else _NO_KIND,
                          lsn))
        return obj

    cdef object _event(self, object kind, object new_record, object old_record, object changes):
        """``Event(name, kind, source, new_record, old_record, changes, time, lsn, id)``:
        stored straight into its slots (as _Maker.make, without the argument tuple)."""
        if not _make_event.direct:
            return _make_event.make((self._name, kind, self._source, new_record, old_record,
                                     changes, self._commit_time, self._lsn_text, self._id))
        obj = <object>_EVENT_TYPE.tp_alloc(_EVENT_TYPE, 0)
        Py_DECREF(obj)  # tp_alloc gave a new reference, and so does <object>
        _EVENT.put(obj, 0, self._name)
        _EVENT.put(obj, 1, kind)
        _EVENT.put(obj, 2, self._source)
        _EVENT_ROWS.put(obj, 0, new_record)
        _EVENT_ROWS.put(obj, 1, old_record)
        _EVENT_ROWS.put(obj, 2, changes)
        _EVENT.put(obj, 3, self._commit_time)
        _EVENT.put(obj, 4, self._lsn_text)
        _EVENT.put(obj, 5, self._id)
        return obj

    cdef object _insert(self, list new, bint plain, object lsn):
        values = self._load_row(new, plain, "Insert", lsn)
        return self._event(_INSERT, self._record(values), None, None)

    cdef object _update(self, list raw_new, bint new_plain, object raw_old, bint old_plain,
                        unsigned char old_kind, object lsn):
        cdef list names = self._names
        cdef Py_ssize_t i, n
        new_values = self._load_row(raw_new, new_plain, "Update", lsn)
        old_record = changes = None
        if raw_old is not None:
            if (old_kind == 79 and new_plain and old_plain and PyList_GET_SIZE(raw_new) == self._width
                    and PyList_GET_SIZE(raw_old) == self._width):  # 'O': the common FULL case
                return self._whole_row_update(raw_new, new_values, raw_old, lsn)
            old_values = self._load_row(raw_old, old_plain, "Update", lsn)
            if old_kind == 75:  # 'K'
                old_record = _key_record(names, self._keys, old_values)
                # An unchanged TOASTed key is not resent, but the old key holds its value.
                for i in self._keys:
                    if raw_new[i] is _UNCHANGED and raw_old[i] is not _UNCHANGED:
                        new_values[i] = old_values[i]
            elif new_plain and old_plain:  # the common case: every value was sent
                changes = {}
                n = PyList_GET_SIZE(names)
                for i in range(n):
                    if _differ(raw_new[i], raw_old[i]):
                        changes[<object>PyList_GET_ITEM(names, i)] = _change_tuple(
                            old_values[i], new_values[i])
                old_record = self._record(old_values)
            else:
                changes = {}
                n = PyList_GET_SIZE(raw_new)
                for i in range(n):
                    raw = <object>PyList_GET_ITEM(raw_new, i)
                    if raw is _UNCHANGED:
                        if raw_old[i] is not _UNCHANGED:
                            new_values[i] = old_values[i]  # not resent: same as before
                    elif raw != raw_old[i] and raw_old[i] is not _UNCHANGED:
                        changes[names[i]] = _change_tuple(old_values[i], new_values[i])
                old_record = self._record(old_values)
        return self._event(_UPDATE, self._record(new_values), old_record, changes)

    cdef object _whole_row_update(self, list raw_new, object new_values, list raw_old, object lsn):
        """The Event of an update that sent every value of the new and the old row.

        As the pure path's, except that a column sent unchanged is typed once: the old
        record holds the new record's value when it is immutable (see _immutable), which
        no handler can tell from a value typed twice but for ``is``; the other old values
        are typed from the old row (a mutable value is never shared)."""
        cdef list names = self._names
        cdef Py_ssize_t i, n = PyList_GET_SIZE(names)
        cdef list partial = raw_old[:]  # the old row, None where the new value serves
        cdef bint shared = False
        for i in range(n):
            raw = <object>PyList_GET_ITEM(raw_old, i)
            if (raw is not None and not _differ(<object>PyList_GET_ITEM(raw_new, i), raw)
                    and _immutable(new_values[i])):
                partial[i] = None
                shared = True
        loaded = self._load_row(partial, True, "Update", lsn)
        if shared:
            old_values = list(loaded)
            for i in range(n):
                if PyList_GET_ITEM(partial, i) == <PyObject *>None and PyList_GET_ITEM(raw_old, i) != <PyObject *>None:
                    old_values[i] = new_values[i]
        else:
            old_values = loaded
        changes = {}
        for i in range(n):
            if _differ(<object>PyList_GET_ITEM(raw_new, i), <object>PyList_GET_ITEM(raw_old, i)):
                changes[<object>PyList_GET_ITEM(names, i)] = _change_tuple(old_values[i], new_values[i])
        return self._event(_UPDATE, self._record(new_values), self._record(old_values), changes)

    cdef object _delete(self, list raw_old, bint plain, unsigned char old_kind, object lsn):
        old_values = self._load_row(raw_old, plain, "Delete", lsn)
        if old_kind == 75:  # 'K'
            old_record = _key_record(self._names, self._keys, old_values)
        else:
            old_record = self._record(old_values)
        return self._event(_DELETE, None, old_record, None)

    # -- batches ---------------------------------------------------------

    cdef object _batch(self, txn, commit_lsn, commit_time, end_lsn, bint restamp):
        """As TransactionAssembler._batch: hand on the changes collected so far.

        Events built here are stamped already; ``restamp`` when the Commit's
        LSN or time differ from the Begin's. Events of the pure path (a
        Truncate in the same transaction) still have an empty id.
        """
        cdef list changes = _OPEN.get(txn, O_CHANGES)
        first, size = _OPEN.get(txn, O_EMITTED), _OPEN.get(txn, O_SIZE)
        _OPEN.put(txn, O_CHANGES, [])
        _OPEN.put(txn, O_EMITTED, first + len(changes))
        _OPEN.put(txn, O_SIZE, 0)
        cdef list events = []
        cdef Py_ssize_t i, n = PyList_GET_SIZE(changes)
        cdef uint64_t lsn = commit_lsn
        lsn_text = None
        for i in range(n):
            event = <object>PyList_GET_ITEM(changes, i)
            if event is None:
                continue
            if restamp or not event.id:
                if lsn_text is None:
                    lsn_text = _format_lsn(lsn)
                event.timestamp = commit_time
                event.lsn = lsn_text
                event.id = _event_id(lsn, first + i)
            events.append(event)
        batch = _make_transaction.make(
            (_OPEN.get(txn, O_XID), commit_lsn, end_lsn, commit_time, events,
             _OPEN.get(txn, O_ORIGIN), end_lsn != 0, size))
        return batch


def _direct_construction():
    """Which classes are built straight into their slots (for tests)."""
    made = {m.cls.__name__: m.direct for m in (_make_event, _make_row, _make_transaction, _make_open)}
    made["Change"] = _change_direct
    return made


def _stamps(int64_t micros, uint64_t lsn):
    """``_pg_timestamp(micros)`` and ``_format_lsn(lsn)`` (for tests)."""
    return _pg_timestamp(micros), _format_lsn(lsn)


def _ids(uint64_t commit_lsn, object position):
    """``_event_id`` of ``position`` and ``_event_id_at`` of it held in C (for tests)."""
    return _event_id(commit_lsn, position), _event_id_at(commit_lsn, position)
