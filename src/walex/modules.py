"""Find the handler modules of an app: explicit objects, import strings, convention.

``modules=[events, "my_app.custom.user", "my_app.cdc:events"]`` names them
explicitly; with ``name="my_app"``, a subscription ``user`` (or
``"public.user"``) also picks up every :class:`~walex.Events` in
``my_app.events.user`` when that module exists (WalEx's
``MyApp.Events.User`` convention). A module that exists but fails to import
(itself, or a package on the way to it) is a
:class:`~walex.errors.ConfigError` naming it and the cause, never skipped;
one error names every module that cannot be used. Each :class:`~walex.Events`
is used once, however many ways it was named.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterable
from typing import Any

from .errors import ConfigError, WalExError
from .handlers import Events

__all__ = ["resolve_modules", "import_object"]


def import_object(spec: str) -> Any:
    """Import ``"pkg.module"`` or ``"pkg.module:attribute"`` with a precise error."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not all(part.isidentifier() for part in module_name.split(".")):
        raise ConfigError(f"{spec!r} is not an import string like 'package.module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if _is_prefix(exc.name, module_name):
            raise ConfigError(
                f"cannot import {module_name!r}: no module named {exc.name!r} "
                "(is the package installed, or its folder on sys.path / PYTHONPATH?)"
            ) from None
        raise ConfigError(f"importing {module_name!r} failed: {exc!r}") from exc
    except WalExError as exc:
        raise ConfigError(f"importing {module_name!r} failed: {exc}") from exc
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


def _is_prefix(missing: str | None, name: str) -> bool:
    """Whether ``missing`` is ``name`` or one of its parent packages."""
    return bool(missing) and (name == missing or name.startswith(f"{missing}."))


def _module_exists(name: str) -> bool:
    """Whether ``name`` can be imported; finding it imports its parent packages.

    A parent that is missing means no; a parent that fails to import is an
    error naming it, not a silent no.
    """
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError as exc:
        if _is_prefix(exc.name, name) or exc.name is None:
            return False
        raise ConfigError(f"importing {name.rpartition('.')[0]!r} failed: {exc!r}") from exc
    except WalExError as exc:
        raise ConfigError(f"importing {name.rpartition('.')[0]!r} failed: {exc}") from exc
    except Exception as exc:
        raise ConfigError(f"importing {name.rpartition('.')[0]!r} failed: {exc!r}") from exc


def _is_package(name: str) -> bool:
    """True for an importable package (a dotted name imports its parents)."""
    if not all(part.isidentifier() for part in name.split(".")) or not _module_exists(name):
        return False
    spec = importlib.util.find_spec(name)
    return spec is not None and spec.submodule_search_locations is not None


def _events_of(item: Any) -> list[Events]:
    if isinstance(item, Events):
        return [item]
    if isinstance(item, str):
        return _events_in(import_object(item), item)
    raise ConfigError(f"modules must hold walex.Events objects or import strings, got {item!r}")


def _convention_modules(app_name: str, subscriptions: Iterable[str], problems: list[str]) -> list[str]:
    """``<app>.events.<table>`` for each subscription whose module exists."""
    package = app_name.replace("-", "_")
    names: list[str] = []
    try:
        if not _is_package(package):
            return names
    except ConfigError as exc:
        problems.append(str(exc))
        return names
    for sub in subscriptions:
        if sub == "*":
            continue
        name = f"{package}.events.{sub.rpartition('.')[2].lower()}"
        try:
            if _module_exists(name):
                names.append(name)
        except ConfigError as exc:
            problems.append(str(exc))
    return names


def resolve_modules(modules: Iterable[Any], app_name: str, subscriptions: Iterable[str]) -> list[Events]:
    """Every ``Events`` of the app; one ConfigError naming every module that cannot be used."""
    result: list[Events] = []
    problems: list[str] = []

    def use(item: Any) -> None:
        try:
            found = _events_of(item)
        except ConfigError as exc:
            problems.append(str(exc))
        else:
            result.extend(e for e in found if not any(e is r for r in result))

    for item in modules:
        use(item)
    for name in _convention_modules(app_name, subscriptions, problems):
        use(name)
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} handler modules cannot be used:\n"
                          + "\n".join(f"  - {p}" for p in problems))
    return result
