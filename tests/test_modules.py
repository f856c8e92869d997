"""Handler modules: how an app finds them, and what one module may hold.

Concern: ``modules=[...]`` as ``Events`` objects and import strings
(``"pkg.module"``: every ``Events`` in it; ``"pkg.module:attr"``), discovery by
convention (``name="pkg"`` and subscription ``user`` use every ``Events`` of
``pkg.events.user`` if that module exists), each ``Events`` used once, and a
module that fails to import (or a package on the way to it) is a
``ConfigError`` naming it and the cause, never skipped. Also two fixes of the
original: any number of handlers of each kind in one module, and the events
of a transaction delivered in WAL order.

The handler modules are written to a temporary folder as a package with a
unique name; each records its calls in its own ``CALLS`` list.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from support import Recorder, collecting, run

from walex import ConfigError, Event, Events, WalEx

SCHEMA = """
CREATE TABLE "user" (id int PRIMARY KEY, name text);
CREATE TABLE todo (id int PRIMARY KEY, title text);
CREATE TABLE tag (id int PRIMARY KEY);
CREATE PUBLICATION pub FOR TABLE "user", todo, tag;
"""


def handler_module(*labels: str, table: str = "all") -> str:
    """Source of a module with one ``Events`` per label, each with an on_insert handler."""
    lines = ["from walex import Events", "CALLS = []"]
    for label in labels:
        lines += [
            f"{label} = Events()",
            f"@{label}.on_insert({table!r})",
            f"def {label}_insert(items):",
            f"    CALLS.append(({label!r}, [(e.name, e.new_record['id']) for e in items]))",
        ]
    return "\n".join(lines) + "\n"


Package = Callable[[dict[str, str]], str]


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Package]:
    """Write files of a package with a unique name; returns that name."""
    name = f"wxmods_{uuid.uuid4().hex[:10]}"
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(files: dict[str, str]) -> str:
        for relative, source in {"__init__.py": "", **files}.items():
            path = tmp_path / name / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(source.replace("{pkg}", name))
        importlib.invalidate_caches()
        return name

    yield write
    for module in [m for m in sys.modules if m == name or m.startswith(f"{name}.")]:
        del sys.modules[module]


def calls(module: str) -> list[tuple[str, list[tuple[str, int]]]]:
    return sys.modules[module].CALLS  # type: ignore[no-any-return]


async def handled(rec: Recorder, transactions: int) -> None:
    deadline = time.monotonic() + 15
    while rec.app is not None and rec.app.transactions_handled < transactions:
        assert time.monotonic() < deadline, f"timed out waiting for {transactions} transactions"
        await asyncio.sleep(0.01)


def test_explicit_objects_and_import_strings(admin: psycopg.Connection, dsn: str,
                                             package: Package) -> None:
    admin.execute(SCHEMA)
    pkg = package({
        "custom/__init__.py": "",
        "custom/user.py": handler_module("first", "second", table="user"),
        "other.py": handler_module("events", table="user"),
    })
    rec, obj = Recorder(), Events()
    obj.on_insert("user")(rec.handler("object"))
    modules: list[Any] = [obj, f"{pkg}.custom.user", f"{pkg}.other:events",
                          f"{pkg}.other", obj, f"{pkg}.other:events"]

    async def main() -> None:
        async with collecting(dsn, subscriptions=["user"], modules=modules, recorder=rec):
            admin.execute("""INSERT INTO "user" VALUES (1, 'a')""")
            await rec.wait_for(1)
            await handled(rec, 1)
            assert rec.app is not None and len(rec.app.modules) == 1 + 4  # "all" recorder + 4
        assert [[e.id for e in c] for c in rec.calls_of("object")] == [[rec.events[0].id]]
        assert calls(f"{pkg}.custom.user") == [("first", [("user", 1)]), ("second", [("user", 1)])]
        assert calls(f"{pkg}.other") == [("events", [("user", 1)])]

    run(main())


def test_discovery_by_convention(admin: psycopg.Connection, dsn: str, package: Package) -> None:
    admin.execute(SCHEMA)
    pkg = package({
        "events/__init__.py": "",
        "events/user.py": handler_module("users", "more_users", table="user"),
        "events/todo.py": handler_module("todos", table="todo"),
        "events/unrelated.py": handler_module("unrelated"),
    })

    async def main() -> None:
        # "public.todo" finds events/todo.py; "tag" has no module, which is fine; the module
        # named explicitly as well is used once
        async with collecting(dsn, subscriptions=["user", "public.todo", "tag"], name=pkg,
                              modules=[f"{pkg}.events.user"]) as rec:
            admin.execute("""INSERT INTO "user" VALUES (1, 'a'); INSERT INTO todo VALUES (2, 'b');
                             INSERT INTO tag VALUES (3)""")
            await rec.wait_for(3)
            await handled(rec, 1)
        assert calls(f"{pkg}.events.user") == [
            ("users", [("user", 1)]), ("more_users", [("user", 1)]),
        ]
        assert calls(f"{pkg}.events.todo") == [("todos", [("todo", 2)])]
        assert f"{pkg}.events.unrelated" not in sys.modules

    run(main())


@pytest.mark.parametrize("files", [
    {},  # no events subpackage
    {"events.py": "X = 1"},  # a plain module, not a package of handler modules
    {"events/__init__.py": ""},  # no module for the subscription
], ids=["no-events-package", "events-is-a-module", "no-table-module"])
def test_convention_finds_nothing_quietly(package: Package, files: dict[str, str]) -> None:
    pkg = package(files)
    app = WalEx("postgresql://localhost/x", publication="pub", subscriptions=["user"], name=pkg)
    assert app.modules == []
    assert WalEx("postgresql://localhost/x", publication="pub", name="no_such_package_xyz").modules == []


BROKEN: list[tuple[dict[str, str], list[str], str]] = [
    ({"events/__init__.py": "", "events/user.py": "raise RuntimeError('boom')"}, [],
     "importing '{pkg}.events.user' failed: RuntimeError('boom')"),
    ({"events/__init__.py": "", "events/user.py": "import missing_dep_xyz"}, [],
     "importing '{pkg}.events.user' failed: ModuleNotFoundError(\"No module named 'missing_dep_xyz'\")"),
    ({"events/__init__.py": "", "events/user.py": "def broken(:\n"}, [],
     "importing '{pkg}.events.user' failed: SyntaxError("),
    ({"events/__init__.py": "raise RuntimeError('broken package')", "events/user.py": ""}, [],
     "importing '{pkg}.events' failed: RuntimeError('broken package')"),
    ({"events.py": "raise RuntimeError('broken module')"}, [],
     "importing '{pkg}.events' failed: RuntimeError('broken module')"),
    ({"events/__init__.py": "import missing_dep_xyz", "events/user.py": ""}, [],
     "importing '{pkg}.events' failed: ModuleNotFoundError(\"No module named 'missing_dep_xyz'\")"),
    ({"events/__init__.py": "", "events/user.py": "X = 1"}, [],
     "'{pkg}.events.user' holds no walex.Events handler module"),
    ({}, ["{pkg}.nope"],
     "cannot import '{pkg}.nope': no module named '{pkg}.nope' (is the package installed"),
    ({"custom.py": handler_module("events")}, ["{pkg}.custom:nope"],
     "module '{pkg}.custom' has no attribute 'nope'"),
    ({"custom.py": "import missing_dep_xyz"}, ["{pkg}.custom:events"],
     "importing '{pkg}.custom' failed: ModuleNotFoundError(\"No module named 'missing_dep_xyz'\")"),
    ({"custom.py": "events = 42"}, ["{pkg}.custom:events"],
     "'{pkg}.custom:events' holds no walex.Events handler module"),
    ({}, ["{pkg} custom"], "'{pkg} custom' is not an import string like 'package.module:attribute'"),
]


@pytest.mark.parametrize(("files", "modules", "message"), BROKEN,
                         ids=[f"case{i}" for i in range(len(BROKEN))])
def test_module_that_cannot_be_used_is_an_error(package: Package, files: dict[str, str],
                                                modules: list[str], message: str) -> None:
    pkg = package(files)
    with pytest.raises(ConfigError) as info:
        WalEx("postgresql://localhost/x", publication="pub", subscriptions=["user"], name=pkg,
              modules=[m.replace("{pkg}", pkg) for m in modules])
    assert message.replace("{pkg}", pkg) in str(info.value)


def test_every_module_that_cannot_be_used_in_one_error(package: Package) -> None:
    pkg = package({
        "boom.py": "raise RuntimeError('boom')",
        "dep.py": "import missing_dep_xyz",
        "good.py": handler_module("events"),
        "events/__init__.py": "",
        "events/user.py": "raise RuntimeError('convention boom')",
        "events/todo.py": "X = 1",
    })
    with pytest.raises(ConfigError) as info:
        WalEx("postgresql://localhost/x", publication="pub", subscriptions=["user", "todo"],
              name=pkg, modules=[f"{pkg}.boom", f"{pkg}.good:events", f"{pkg}.dep:events",
                                 f"{pkg}.nope", 42])
    assert str(info.value).splitlines() == [
        "6 handler modules cannot be used:",
        f"  - importing '{pkg}.boom' failed: RuntimeError('boom')",
        f"  - importing '{pkg}.dep' failed: ModuleNotFoundError(\"No module named 'missing_dep_xyz'\")",
        f"  - cannot import '{pkg}.nope': no module named '{pkg}.nope' (is the package installed, "
        "or its folder on sys.path / PYTHONPATH?)",
        "  - modules must hold walex.Events objects or import strings, got 42",
        f"  - importing '{pkg}.events.user' failed: RuntimeError('convention boom')",
        f"  - '{pkg}.events.todo' holds no walex.Events handler module",
    ]


def test_module_of_the_wrong_kind_is_an_error() -> None:
    with pytest.raises(ConfigError) as info:
        WalEx("postgresql://localhost/x", publication="pub", modules=[Events(), 42])
    assert str(info.value) == "modules must hold walex.Events objects or import strings, got 42"


# -- what one module may hold ------------------------------------------------------------

def test_several_handlers_of_each_kind_in_one_module(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(SCHEMA)
    rec, events = Recorder(), Events()
    for kind in ("insert", "update", "delete", "truncate", "event"):
        decorator = getattr(events, f"on_{kind}")
        decorator("todo")(rec.handler(f"{kind}1"))
        decorator("todo")(rec.handler(f"{kind}2", sync=True))
    events.on_insert(rec.handler("bare_insert"))  # used bare: every table

    async def main() -> None:
        async with collecting(dsn, modules=[events], recorder=rec):
            admin.execute("INSERT INTO todo VALUES (1, 'a')")
            admin.execute("UPDATE todo SET title = 'b'")
            admin.execute("DELETE FROM todo")
            admin.execute("TRUNCATE todo")
            await rec.wait_for(4)
            await handled(rec, 4)
        kinds = {label: [[e.type.value for e in c] for c in rec.calls_of(label)]
                 for label in {c.label for c in rec.calls} - {"__all__"}}
        assert kinds == {
            "insert1": [["insert"]], "insert2": [["insert"]],
            "update1": [["update"]], "update2": [["update"]],
            "delete1": [["delete"]], "delete2": [["delete"]],
            "truncate1": [["truncate"]], "truncate2": [["truncate"]],
            "event1": [["insert"], ["update"], ["delete"], ["truncate"]],
            "event2": [["insert"], ["update"], ["delete"], ["truncate"]],
            "bare_insert": [["insert"]],
        }
        threads = {c.label: c.thread for c in rec.calls}
        assert threads["insert1"] == "MainThread" and threads["insert2"] != "MainThread"

    run(main())


def describe(events: list[Event]) -> list[tuple[str, str, int]]:
    return [(e.type.value, e.name, (e.new_record or e.old_record or {})["id"]) for e in events]


def test_events_of_a_transaction_in_wal_order(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(SCHEMA)
    admin.execute("""ALTER TABLE "user" REPLICA IDENTITY FULL""")
    rec, events = Recorder(), Events()
    events.on_event("todo")(rec.handler("todo"))
    events.on_insert("tag")(rec.handler("tags"))

    async def main() -> None:
        async with collecting(dsn, modules=[events], recorder=rec):
            with admin.transaction():
                admin.execute("""INSERT INTO "user" VALUES (1, 'a')""")
                admin.execute("INSERT INTO todo VALUES (1, 'x')")
                admin.execute("""UPDATE "user" SET name = 'b' WHERE id = 1""")
                admin.execute("INSERT INTO todo VALUES (2, 'y')")
                admin.execute("DELETE FROM todo WHERE id = 1")
                admin.execute("""INSERT INTO "user" VALUES (2, 'c')""")
                admin.execute("UPDATE todo SET title = 'z' WHERE id = 2")
            admin.execute("INSERT INTO tag SELECT g FROM generate_series(1, 300) g")
            received = await rec.wait_for(7 + 300)
            await handled(rec, 2)
        assert describe(received[:7]) == [
            ("insert", "user", 1), ("insert", "todo", 1), ("update", "user", 1),
            ("insert", "todo", 2), ("delete", "todo", 1), ("insert", "user", 2),
            ("update", "todo", 2),
        ]
        assert [e.id for e in received] == sorted(e.id for e in received)
        assert len({e.id for e in received}) == len(received)
        assert [describe(c) for c in rec.calls_of("todo")] == [[
            ("insert", "todo", 1), ("insert", "todo", 2), ("delete", "todo", 1),
            ("update", "todo", 2),
        ]]
        [tags] = rec.calls_of("tags")
        assert [e.new_record["id"] for e in tags] == list(range(1, 301))

    run(main())
