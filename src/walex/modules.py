"""Find the handler modules of an app: explicit objects, import strings, convention.

``modules=[events, "my_app.custom.user", "my_app.cdc:events"]`` names them
explicitly; with ``name="my_app"``, a subscription ``user`` also picks up
every :class:`~walex.Events` in ``my_app.events.user`` when that module
exists (WalEx's ``MyApp.Events.User`` convention). A module that exists but
fails to import is an error naming it and the cause, never skipped.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterable
from typing import Any

from .errors import ConfigError
from .handlers import Events

__all__ = ["resolve_modules", "import_object"]


def import_object(spec: str) -> Any:
    """Import ``"pkg.module"`` or ``"pkg.module:attribute"`` with a precise error."""
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name) or exc.name == module_name:
            raise ConfigError(
                f"cannot import {module_name!r}: no module named {exc.name!r} "
                "(is the package installed, or its folder on sys.path / PYTHONPATH?)"
            ) from None
        raise ConfigError(f"importing {module_name!r} failed: {exc!r}") from exc
    except Exception as exc:
        raise ConfigError(f"importing {module_name!r} failed: {exc!r}") from exc
    if not attribute:
        return module
    obj: Any = module
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"module {module_name!r} has no attribute {attribute!r}") from None
    return obj


def _events_in(obj: Any, spec: str) -> list[Events]:
    if isinstance(obj, Events):
        return [obj]
    found = [v for v in vars(obj).values() if isinstance(v, Events)] if hasattr(obj, "__dict__") else []
    if not found:
        raise ConfigError(f"{spec!r} holds no walex.Events handler module")
    return found


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _is_package(name: str) -> bool:
    """True for an importable package, found without importing anything."""
    if not name.isidentifier():
        return False
    spec = importlib.util.find_spec(name)
    return spec is not None and spec.submodule_search_locations is not None


def resolve_modules(modules: Iterable[Any], app_name: str, subscriptions: Iterable[str]) -> list[Events]:
    result: list[Events] = []
    for item in modules:
        if isinstance(item, Events):
            result.append(item)
        elif isinstance(item, str):
            result.extend(_events_in(import_object(item), item))
        else:
            raise ConfigError(f"modules must hold walex.Events objects or import strings, got {item!r}")
    package = app_name.replace("-", "_")
    if _is_package(package):
        for sub in subscriptions:
            if sub == "*":
                continue
            name = f"{package}.events.{sub.rpartition('.')[2].lower()}"
            if _module_exists(name):
                for events in _events_in(import_object(name), name):
                    if events not in result:
                        result.append(events)
    return result
