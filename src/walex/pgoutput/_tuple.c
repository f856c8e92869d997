/*
 * walex.pgoutput._tuple: the pgoutput TupleData parser in C.
 *
 * An optional accelerator of walex.pgoutput.decoder.Decoder._tuple, which
 * stays the reference implementation and is used whenever this module is not
 * built. Both must give identical results on every input: the test suite runs
 * the decoder tests against each.
 *
 * parse_tuple(data: bytes, pos: int, unchanged: object, binary: type)
 *     -> (values: list, plain: bool, end: int)
 * values holds per column None ('n'), `unchanged` ('u'), bytes ('t') or
 * binary(bytes) ('b'); plain is true when only 'n' and 't' occurred.
 * Malformed input raises ValueError, never reads outside `data`.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

static uint32_t be32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

static PyObject *
parse_tuple(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "parse_tuple(data: bytes, pos: int, unchanged, binary)");
        return NULL;
    }
    const unsigned char *buf = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t size = PyBytes_GET_SIZE(args[0]);
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred())
        return NULL;
    PyObject *unchanged = args[2], *binary = args[3];
    if (pos < 0 || pos + 2 > size) {
        PyErr_SetString(PyExc_ValueError, "tuple data is cut short before its column count");
        return NULL;
    }
    Py_ssize_t count = ((Py_ssize_t)buf[pos] << 8) | buf[pos + 1];
    pos += 2;
    PyObject *values = PyList_New(count);
    if (values == NULL)
        return NULL;
    int plain = 1;
    for (Py_ssize_t i = 0; i < count; i++) {
        if (pos >= size) {
            PyErr_Format(PyExc_ValueError, "tuple data is cut short at column %zd of %zd", i + 1, count);
            goto fail;
        }
        unsigned char kind = buf[pos++];
        PyObject *item;
        if (kind == 't' || kind == 'b') {
            if (pos + 4 > size) {
                PyErr_Format(PyExc_ValueError, "tuple data is cut short at column %zd of %zd", i + 1, count);
                goto fail;
            }
            uint32_t length = be32(buf + pos);
            pos += 4;
            if ((int32_t)length < 0 || (Py_ssize_t)length > size - pos) {
                PyErr_Format(PyExc_ValueError, "column value of %ld bytes overruns the message",
                             (long)(int32_t)length);
                goto fail;
            }
            item = PyBytes_FromStringAndSize((const char *)buf + pos, (Py_ssize_t)length);
            pos += (Py_ssize_t)length;
            if (item == NULL)
                goto fail;
            if (kind == 'b') {
                PyObject *wrapped = PyObject_CallOneArg(binary, item);
                Py_DECREF(item);
                if (wrapped == NULL)
                    goto fail;
                item = wrapped;
                plain = 0;
            }
        } else if (kind == 'n') {
            item = Py_NewRef(Py_None);
        } else if (kind == 'u') {
            item = Py_NewRef(unchanged);
            plain = 0;
        } else {
            PyErr_Format(PyExc_ValueError, "unknown column kind '%c' (0x%02x) in tuple data",
                         (int)kind, (unsigned int)kind);
            goto fail;
        }
        PyList_SET_ITEM(values, i, item);
    }
    return Py_BuildValue("(NOn)", values, plain ? Py_True : Py_False, pos);

fail:
    Py_DECREF(values);
    return NULL;
}

static PyMethodDef methods[] = {
    {"parse_tuple", (PyCFunction)(void (*)(void))parse_tuple, METH_FASTCALL,
     "Parse pgoutput TupleData at pos: (values, plain, end)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "walex.pgoutput._tuple",
    "C parser of pgoutput TupleData (optional accelerator).", -1, methods,
};

PyMODINIT_FUNC
PyInit__tuple(void)
{
    return PyModule_Create(&module);
}
