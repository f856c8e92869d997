"""The lifecycle ``WalEx`` and ``Worker`` share, and the event loop walex creates.

:class:`Lifecycle` is the base of :class:`~walex.WalEx` and
:class:`~walex.workers.Worker`: each defines ``start()`` and ``stop()`` and
keeps ``_stopped`` (set once stopped) and ``_error`` (what stopped it); the
base gives them :meth:`~Lifecycle.wait`, ``async with`` and
:meth:`~Lifecycle.run`, which runs until SIGINT/SIGTERM on a loop of its own.

``run()`` and the ``walex`` commands create that loop with :func:`run_loop`.
Its kind is the ``loop`` option (``WALEX_LOOP``):

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
import signal
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine
from typing import Any, Self, TypeVar

from .errors import ConfigError
from .logs import default_logging

__all__ = ["LOOPS", "Lifecycle", "check_loop", "loop_factory", "run_loop"]

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


class Lifecycle(ABC):
    """Started and stopped by the subclass; waited for, used with ``async with``, or run."""

    _stopped: asyncio.Event  # set once stop() finished
    _error: BaseException | None  # what stopped it, raised by wait(), __aexit__ and run()
    _began = False  # start() was called once: wait() before it would wait for ever

    @abstractmethod
    async def start(self) -> None:
        """Start; returns once running."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop cleanly; sets ``_stopped``."""

    @abstractmethod
    def _run_options(self) -> tuple[str | None, str | None]:
        """For :meth:`run`: the ``loop`` option, and the secret its log lines must not show."""

    async def wait(self) -> None:
        """Wait until stopped; raises the error that stopped it, if any."""
        if not self._began:
            raise ConfigError(f"{self!r} was never started, so wait() would wait for ever: "
                              "await its start() first (or use run(), or 'async with')")
        await self._stopped.wait()
        if self._error is not None:
            raise self._error

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
        if self._error is not None and exc_info[0] is None:
            raise self._error

    def run(self) -> None:
        """Run until SIGINT/SIGTERM (clean stop) or a failure (raised), on a loop of its own.

        The loop is the ``loop`` option's (see the module). If the program
        configured no logging, walex logs INFO and above to stderr meanwhile,
        so a script shows what it does and where.
        """
        loop, secret = self._run_options()
        with default_logging(secret):
            run_loop(self._run_until_signal, loop)

    async def _run_until_signal(self) -> None:
        """Start, then wait; SIGINT/SIGTERM stop it, and end a start still under way.

        The signals are caught from before ``start()``: one that comes while it
        is still under way (connecting, or a standby waiting for its slot)
        cancels it, and it closes what it had opened; run() then returns.
        """
        loop = asyncio.get_running_loop()
        starting = loop.create_task(self.start())
        stopping: list[asyncio.Task[None]] = []

        def on_signal(sig: signal.Signals) -> None:
            if stopping:
                return
            if not starting.done():
                log.info("%r stopped by %s while starting", self, sig.name)
                stopping.append(starting)
                starting.cancel()
            else:
                stopping.append(loop.create_task(self.stop()))

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            try:
                await starting
            except asyncio.CancelledError:
                if stopping and stopping[0] is starting:
                    return  # a signal ended the start: a clean stop
                raise
            await self.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
