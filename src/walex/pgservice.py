"""The connection parameters a libpq service (``service=name``) gives, for messages.

libpq reads a service's section from the user's service file
(``servicefile`` in the connection string, else ``PGSERVICEFILE``, else
``~/.pg_service.conf``) and, when it is not there, from ``pg_service.conf``
in ``PGSYSCONFDIR``; the first file holding the section is the only one read.
Its ``key=value`` lines fill what the connection string leaves out, before the
``PG*`` variables and the defaults. :func:`service_params` reads them the same
way so that messages name the server libpq connects to; the system file of a
libpq built with another configuration directory and no ``PGSYSCONFDIR`` is
not found (the caller then names the service instead). Callers must not show
``password`` (only ``user``, ``host``, ``hostaddr``, ``port`` and ``dbname``
are shown).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["service_files", "service_params"]


def service_files(servicefile: str | None = None) -> list[Path]:
    """The service files libpq looks in, in its order."""
    files = []
    user = servicefile or os.environ.get("PGSERVICEFILE")
    if user:
        files.append(Path(user))
    else:
        try:
            files.append(Path.home() / ".pg_service.conf")
        except RuntimeError:  # no home directory: libpq skips the file too
            pass
    if os.environ.get("PGSYSCONFDIR"):
        files.append(Path(os.environ["PGSYSCONFDIR"]) / "pg_service.conf")
    return files


def _section(path: Path, service: str) -> dict[str, str] | None:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    found: dict[str, str] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            if found is not None:
                break  # the next section: the service's ends here
            if line[1:].split("]", 1)[0] == service:
                found = {}
        elif found is not None and "=" in line:
            key, value = line.split("=", 1)
            found.setdefault(key, value)
    return found


def service_params(service: str, servicefile: str | None = None) -> dict[str, str] | None:
    """The parameters of ``service`` as libpq reads them; ``None`` when no file has it."""
    for path in service_files(servicefile):
        params = _section(path, service)
        if params is not None:
            return params
    return None
