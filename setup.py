"""Build the optional compiled parts of walex.

Everything else is declared in pyproject.toml. The extensions are optional:
a machine without a C compiler, Python headers or Cython still installs walex,
which then runs its pure-Python code (identical results, tested both ways).
Set ``WALEX_NO_EXTENSIONS=1`` to skip building them.

- ``walex.pgoutput._tuple`` (C): the decoder's per-column TupleData loop;
- ``walex._hotpath`` (Cython): XLogData frames to Events for the common
  messages (Begin, Insert, Update, Delete, Commit), see its docstring;
- ``walex._json`` (Cython): the json/jsonb value loader (twin of
  ``walex.pgtypes.py_json_loads``);
- ``walex._encode`` (Cython): the CloudEvents encoder's fast path (twin of
  ``_fast_event`` in ``walex.destinations.encoding``);
- ``walex._sizes`` (Cython): an event's deep size in memory (twin of
  ``py_event_bytes`` / ``py_value_bytes`` in ``walex.sizes``);
- ``walex.destinations._hpub`` (Cython): a JetStream batch's HPUB frames (twin of
  ``frames`` in ``walex.destinations.hpub``);
- ``walex.destinations._resp`` (Cython): a batch's Redis ``XADD`` commands in
  one buffer (twin of ``py_xadd_commands`` in ``walex.destinations.redis``);
- ``walex.destinations._direct`` (Cython): a RawEvent's CloudEvent written from
  its raw rows (twin of ``py_direct_event`` in ``walex.destinations.direct``);
- ``walex.destinations._krecords`` (Cython): a batch's records handed to the Kafka
  producer (twin of ``py_records`` in ``walex.destinations.krecords``);
- ``walex.replication._readloop`` (Cython): the replication reader's frame loop on
  psycopg's libpq, called by address (twin of ``_read_python`` in
  ``walex.replication.stream``; no libpq headers or link needed).
"""

import os

from setuptools import Extension, setup

extensions = []
if not os.environ.get("WALEX_NO_EXTENSIONS"):
    extensions.append(
        Extension("walex.pgoutput._tuple", ["src/walex/pgoutput/_tuple.c"], optional=True)
    )
    try:
        from Cython.Build import cythonize
    except ImportError:  # no Cython: the pure-Python hot path serves
        pass
    else:
        compiled = [Extension("walex._hotpath", ["src/walex/_hotpath.pyx"],
                              depends=["src/walex/_hotpath_objects.pxi",
                                       "src/walex/_hotpath_stamps.pxi",
                                       "src/walex/_hotpath_values.pxi",
                                       "src/walex/_hotpath_tuples.pxi"]),
                    Extension("walex._json", ["src/walex/_json.pyx"]),
                    Extension("walex._encode", ["src/walex/_encode.pyx"],
                              depends=["src/walex/destinations/_rfc3339.pxi"]),
                    Extension("walex._sizes", ["src/walex/_sizes.pyx"]),
                    Extension("walex.destinations._hpub", ["src/walex/destinations/_hpub.pyx"]),
                    Extension("walex.destinations._resp", ["src/walex/destinations/_resp.pyx"]),
                    Extension("walex.destinations._direct", ["src/walex/destinations/_direct.pyx"],
                              depends=["src/walex/destinations/_direct_buffer.pxi",
                                       "src/walex/destinations/_direct_values.pxi",
                                       "src/walex/destinations/_rfc3339.pxi"]),
                    Extension("walex.destinations._krecords",
                              ["src/walex/destinations/_krecords.pyx"]),
                    Extension("walex.destinations._longnum",
                              ["src/walex/destinations/_longnum.pyx"]),
                    Extension("walex.replication._readloop",
                              ["src/walex/replication/_readloop.pyx"])]
        for ext in cythonize(compiled,
                             compiler_directives={"language_level": 3}, quiet=True):
            ext.optional = True  # cythonize does not carry it over
            extensions.append(ext)

setup(ext_modules=extensions)
