"""The event loop walex's own entry points run on.

``WalEx.run()``, ``Worker.run()`` and the ``walex`` commands create their
event loop with :func:`run_loop`. Its kind is the ``loop`` option (``WALEX_LOOP``):

- ``"auto"`` (the default): uvloop when it is installed (``pip install
  'walex[fast]'``), else asyncio's own loop, as uvicorn does;
- ``"asyncio"``: asyncio's own loop, uvloop installed or not;
- ``"uvloop"``: uvloop, and a :class:`~walex.errors.ConfigError` saying how
  to install it when it is not.

An app started inside a program's own loop (``async with app``,
``await app.start()``) runs on that loop: the option applies only where
walex creates the loop. Which loop was chosen is logged at DEBUG.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from .errors import ConfigError

__all__ = ["LOOPS", "check_loop", "loop_factory", "run_loop"]

log = logging.getLogger("walex")

T = TypeVar("T")

LOOPS = ("auto", "asyncio", "uvloop")

MISSING_UVLOOP = ("loop='uvloop' needs uvloop, which is not installed: pip install 'walex[fast]' "
                  "(or use loop='auto', the default, which takes uvloop only when it is there)")


def _choice(loop: str | None) -> str:
    """The loop asked for: ``loop``, else ``WALEX_LOOP``, else ``"auto"``; checked."""
    choice = loop if loop is not None else os.environ.get("WALEX_LOOP") or "auto"
    if choice not in LOOPS:
        where = "" if loop is not None else " (from WALEX_LOOP)"
        raise ConfigError(f"loop must be one of {', '.join(LOOPS)}, got {choice!r}{where}")
    return choice


def check_loop(loop: str | None) -> str:
    """The loop asked for, checked without importing uvloop; raises ConfigError if unusable."""
    choice = _choice(loop)
    if choice == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise ConfigError(MISSING_UVLOOP)
    return choice


def loop_factory(loop: str | None = None) -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    """The factory of the loop asked for (``None``: asyncio's own) and its description."""
    choice = _choice(loop)
    if choice == "asyncio":
        return None, "asyncio (loop='asyncio')"
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError(MISSING_UVLOOP) from None
        return None, "asyncio (loop='auto'; uvloop is not installed: pip install 'walex[fast]')"
    return uvloop.new_event_loop, f"uvloop {uvloop.__version__} (loop={choice!r})"


def run_loop(main: Callable[[], Coroutine[Any, Any, T]], loop: str | None = None) -> T:
    """Run ``main()`` on a new event loop of the kind ``loop`` asks for (see the module)."""
    factory, description = loop_factory(loop)
    log.debug("walex: event loop %s", description)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())
