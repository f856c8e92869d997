# Included by _hotpath.pyx (one module): building and reading walex's objects
# straight through their slots, as their constructors and attribute access do.
# Uses the names _hotpath.pyx imports and cimports before including it.

cdef extern from "Python.h":
    ctypedef struct _Type "PyTypeObject":
        PyObject *(*tp_alloc)(_Type *, Py_ssize_t) except NULL
        Py_ssize_t tp_itemsize
    ctypedef struct PyMemberDef:
        int type
        Py_ssize_t offset
    ctypedef struct PyMemberDescrObject:
        PyMemberDef *d_member
    void PyTuple_SET_ITEM_STEAL "PyTuple_SET_ITEM" (PyObject *, Py_ssize_t, PyObject *)

cdef extern from "structmember.h":
    int T_OBJECT_EX


cdef enum:  # _Maker.default_kinds
    _PLAIN, _FACTORY, _MISSING


cdef class _Maker:
    """Builds instances of a slots dataclass without running its generated ``__init__``.

    Equivalent to ``cls(*args)`` (fields not given take their default or
    default factory), by storing straight into the slots, which is what that
    ``__init__`` does, several times faster. Used only when the class is a
    plain one (object's ``__new__``, no ``__post_init__``, every field an
    object slot); otherwise it calls ``cls``.
    """

    cdef object cls
    cdef _Type *tp
    cdef Py_ssize_t offsets[16]
    cdef Py_ssize_t count
    cdef tuple defaults  # (value, is_factory) of each field
    # the same, for make's C loop: each field's default (held by defaults) and its kind
    cdef PyObject *default_values[16]
    cdef char default_kinds[16]  # _PLAIN, _FACTORY, or _MISSING (no default)
    cdef bint direct

    def __init__(self, cls):
        self.cls = cls
        self.tp = <_Type *>cls
        self.direct = False
        if not dataclasses.is_dataclass(cls):
            return
        fields = dataclasses.fields(cls)
        self.count = len(fields)
        defaults = []
        direct = (cls.__new__ is object.__new__ and not hasattr(cls, "__post_init__")
                  and self.count <= 16 and tuple(f.name for f in fields) == tuple(cls.__slots__))
        for i, f in enumerate(fields):
            if f.default_factory is not dataclasses.MISSING:
                defaults.append((f.default_factory, True))
            else:
                defaults.append((f.default, False))
            descr = cls.__dict__.get(f.name) if direct else None
            if type(descr) is not MemberDescriptorType or not f.init:
                direct = False
            else:
                member = (<PyMemberDescrObject *>descr).d_member
                if member.type != T_OBJECT_EX:
                    direct = False
                self.offsets[i] = member.offset
        self.defaults = tuple(defaults)
        if direct:
            for i, (value, factory) in enumerate(self.defaults):
                self.default_values[i] = <PyObject *>value
                self.default_kinds[i] = (_FACTORY if factory else
                                         _MISSING if value is dataclasses.MISSING else _PLAIN)
        self.direct = direct

    cdef object make(self, tuple args):
        cdef Py_ssize_t i, n = len(args)
        if not self.direct:
            return self.cls(*args)
        obj = <object>self.tp.tp_alloc(self.tp, 0)
        Py_DECREF(obj)  # tp_alloc gave a new reference, and so does <object>
        for i in range(self.count):
            if i < n:
                value = args[i]
            elif self.default_kinds[i] == _PLAIN:
                value = <object>self.default_values[i]
            elif self.default_kinds[i] == _FACTORY:
                value = (<object>self.default_values[i])()
            else:
                raise TypeError(f"{self.cls.__name__}() missing a value for field {i}")
            Py_INCREF(value)
            (<PyObject **>(<char *><PyObject *>obj + self.offsets[i]))[0] = <PyObject *>value
        return obj


cdef bint _change_direct = (  # a tuple subclass adding no fields: built like tuple.__new__ does
    issubclass(Change, tuple) and Change.__dictoffset__ == 0 and Change.__weakrefoffset__ == 0
    and Change.__basicsize__ == tuple.__basicsize__ and Change.__itemsize__ == tuple.__itemsize__
)
cdef object _tuple_new = tuple.__new__


cdef object _change_tuple(object old, object new):
    """``Change(old, new)``: the named tuple built as tuple.__new__ builds a subclass."""
    if not _change_direct:
        return _tuple_new(Change, (old, new))
    cdef _Type *tp = <_Type *>Change
    cdef PyObject *obj = tp.tp_alloc(tp, 2)
    Py_INCREF(old)
    Py_INCREF(new)
    PyTuple_SET_ITEM_STEAL(obj, 0, <PyObject *>old)
    PyTuple_SET_ITEM_STEAL(obj, 1, <PyObject *>new)
    result = <object>obj
    Py_DECREF(result)  # the reference tp_alloc gave
    return result


cdef Py_ssize_t _slot_offset(type cls, str name) except -1:
    """Where instances of ``cls`` keep their slot ``name`` (an object slot), or -1."""
    for klass in cls.__mro__:
        descr = klass.__dict__.get(name)
        if descr is not None:
            if type(descr) is MemberDescriptorType:
                member = (<PyMemberDescrObject *>descr).d_member
                if member.type == T_OBJECT_EX:
                    return member.offset
            return -1
    return -1


cdef class _Slots:
    """Direct access to the object slots of one class's instances: what
    ``getattr``/``setattr`` do for a slots class (the member descriptors), without
    the attribute lookup. Raises the AttributeError of ``getattr`` for an unset slot."""

    cdef type cls
    cdef tuple names
    cdef Py_ssize_t offsets[8]

    def __init__(self, type cls, tuple names):
        self.cls = cls
        self.names = names
        for i, name in enumerate(names):
            self.offsets[i] = _slot_offset(cls, name)
            if self.offsets[i] < 0:
                raise TypeError(f"{cls.__name__}.{name} is not an object slot; walex._hotpath "
                                "needs it as one (a __slots__ entry)")

    cdef inline object get(self, object obj, int i):
        cdef PyObject *value = (<PyObject **>(<char *><PyObject *>obj + self.offsets[i]))[0]
        if value == NULL:
            return getattr(obj, self.names[i])  # raises AttributeError
        return <object>value

    cdef inline void put(self, object obj, int i, object value) noexcept:
        cdef PyObject **slot = <PyObject **>(<char *><PyObject *>obj + self.offsets[i])
        cdef PyObject *old = slot[0]
        Py_INCREF(value)
        slot[0] = <PyObject *>value
        Py_XDECREF(old)


cdef object _Decimal = Decimal
cdef object _datetime = datetime.datetime
cdef object _date = datetime.date
cdef object _time = datetime.time
cdef object _timedelta = datetime.timedelta
cdef object _UUID = UUID


cdef inline bint _immutable(object value):
    """Whether ``value`` is of a type whose instances cannot change (exact types only:
    a loader's subclass might add mutable state), so two columns may share it."""
    t = type(value)
    return (t is int or t is str or t is _Decimal or t is _datetime or t is float or t is bool
            or t is _date or t is bytes or t is _UUID or t is _time or t is _timedelta)
