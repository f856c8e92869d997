"""The CLI's rich consoles, made on first use.

``walex run`` and ``walex worker`` print through rich only to report an error;
typer does not import rich to run a command either (only for help and
tracebacks). So the CLI's modules import rich when they print: a relay started
from the command line does not load it (~120M instructions, some 20 ms of its
start). :func:`console` stands for ``rich.console.Console(**options)``, made
when an attribute is first read (``print``, ``file``, ``is_terminal``...);
:attr:`Lazy.console` is the console itself (for rich's ``Live`` and
``Progress``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["Lazy", "console", "escape"]


class Lazy:
    """A ``rich.console.Console(**options)`` made on first use; reads as that console."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._console: Console | None = None

    @property
    def console(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._options)
        return self._console

    def __getattr__(self, name: str) -> Any:  # only names Lazy itself lacks
        return getattr(self.console, name)


def console(**options: Any) -> Lazy:
    """A console with ``options`` (as ``rich.console.Console`` takes them), made on first use."""
    return Lazy(**options)


def escape(text: str) -> str:
    """``text`` with the brackets rich would read as markup escaped (``rich.markup.escape``)."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)
