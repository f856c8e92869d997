"""Connection strings in messages: the target a connection reaches, and libpq's complaint
about a malformed string without any text of it (it may hold the password).

Contract: nothing here returns a part of the string it was given, except through
:func:`walex.errors.redact` with the whole string as the secret.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import redact

__all__ = ["format_target", "conninfo_problem", "hint", "misplaced_at"]


def format_target(user: str | None, host: str | None, port: str | int | None,
                  dbname: str | None) -> str:
    """``user@host:port/db``; with a connection's ``info``, the target it is connected to."""
    return f"{user or ''}@{host or ''}:{port or ''}/{dbname or ''}"


# libpq quotes the text it could not parse, which may be part of the password: every
# quoted part of its message is hidden, but for the few that are its own literal text
_QUOTED = re.compile(r'"[^"]*"')
_LIBPQ_LITERALS = [('missing "***" after', 'missing "=" after'),
                   ('separator "***"', 'separator "="'), ('matching "***"', 'matching "]"'),
                   ('(expected "***" or "***")', '(expected ":" or "/")')]


def conninfo_problem(exc: BaseException, raw: str) -> str:
    """libpq's complaint about the connection string ``raw``, without any text of ``raw``."""
    lines = str(exc).strip().splitlines()
    message = _QUOTED.sub('"***"', lines[0] if lines else "libpq cannot parse it")
    for hidden, literal in _LIBPQ_LITERALS:
        message = message.replace(hidden, literal)
    return f"{redact(message, raw)} (text not repeated: it may hold the password){hint(raw)}"


def hint(raw: str) -> str:
    if "://" in raw:
        return ("; percent-encode special characters of a password in a URL ('%' as %25, "
                "'@' as %40, '/' as %2F, ' ' as %20, ...) or give it apart (password=..., "
                "WALEX_PASSWORD)")
    return "; quote a value holding spaces in a key=value string: password='a b'"


def misplaced_at(raw: str, params: dict[str, Any]) -> str | None:
    """Why an '@' of ``raw`` cannot be meant as parsed (a password with '@' or '/' unencoded)."""
    hosts = str(params.get("host", ""))
    if any("@" in h and not h.startswith("/") for h in hosts.split(",")):
        return "its host holds an '@' (an '@' of the password is not percent-encoded)"
    if "://" in raw:
        path = raw.split("://", 1)[1].split("?", 1)[0].partition("/")[2]
        if "@" in path:
            return ("an '@' follows a '/': a '/' of the password, or an '@' of the database "
                    "name, is not percent-encoded")
    return None
