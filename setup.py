"""Build the optional C accelerator of the pgoutput decoder.

Everything else is declared in pyproject.toml. ``optional=True``: a machine
without a C compiler or Python headers still installs walex, which then runs
its pure-Python decoder (identical results, tested both ways). Set
``WALEX_NO_EXTENSIONS=1`` to skip building it.
"""

import os

from setuptools import Extension, setup

extensions = []
if not os.environ.get("WALEX_NO_EXTENSIONS"):
    extensions.append(
        Extension("walex.pgoutput._tuple", ["src/walex/pgoutput/_tuple.c"], optional=True)
    )

setup(ext_modules=extensions)
