"""Failpoints: deliberate faults at named places, for the fault-injection tests.

Off unless the environment variable ``WALEX_FAILPOINTS`` is set when walex is
imported, e.g. ``WALEX_FAILPOINTS="after_dispatch=exit@5,before_status=sleep:3"``:
at the named point, on the Nth hit (default: every hit), do the action:

- ``exit``: end the process at once (``os._exit(137)``, like SIGKILL);
- ``raise``: raise ``RuntimeError``;
- ``sleep:S``: block the event loop for S seconds (a stalled process);
- ``swallow:S``: block S seconds and swallow a Ctrl-C (KeyboardInterrupt) that
  comes meanwhile, as a library that catches it would;
- ``skip``: tell the caller to skip what it was about to do.

Points: ``after_dispatch`` (handlers finished, before the acknowledgement is
recorded), ``before_status`` (before a status update is sent; ``skip`` drops
it), ``after_frames`` (a batch of frames was read), ``status_check`` (``walex status``
is about to read the server's state).

Invariant: with ``WALEX_FAILPOINTS`` unset, :func:`hit` is never reached from
the hot paths (they check :data:`ACTIVE` first) and does nothing.
"""

from __future__ import annotations

import os
import time

__all__ = ["ACTIVE", "hit"]


def _parse(spec: str) -> dict[str, tuple[str, float, int]]:
    points: dict[str, tuple[str, float, int]] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, action = item.partition("=")
        action, _, nth = action.partition("@")
        verb, _, arg = action.partition(":")
        if verb not in ("exit", "raise", "sleep", "swallow", "skip"):
            raise ValueError(f"WALEX_FAILPOINTS: unknown action {verb!r} in {item!r}")
        points[name.strip()] = (verb, float(arg or 0), int(nth or 0))
    return points


_POINTS = _parse(os.environ.get("WALEX_FAILPOINTS", ""))
_HITS: dict[str, int] = {}
ACTIVE = bool(_POINTS)


def hit(name: str) -> bool:
    """Count a hit of ``name`` and act; returns True when the caller should skip."""
    point = _POINTS.get(name)
    if point is None:
        return False
    verb, arg, nth = point
    count = _HITS[name] = _HITS.get(name, 0) + 1
    if nth and count != nth:
        return False
    if verb == "exit":
        os._exit(137)
    if verb == "raise":
        raise RuntimeError(f"failpoint {name} hit {count}")
    if verb == "sleep":
        time.sleep(arg)
        return False
    if verb == "swallow":
        try:
            time.sleep(arg)
        except KeyboardInterrupt:
            pass
        return False
    return True
