"""What the subscriptions reach, said out loud: at start, at runtime, as the stream goes.

Subscriptions and handler tables are names (``"user"``, ``"s.user"``,
``"*"``), matched against the name a table has in the stream. Three ways
for them to miss a table without a word are checked here:

- a subscription added while the app runs gets the check :func:`start
  <walex.WalEx.start>` makes (:func:`check_subscriptions`), synchronously, so
  ``app.config.add("subscriptions", ...)`` raises the same
  :class:`~walex.errors.SetupError` and the old configuration stays;
- a handler for a table no subscription covers (or, at start, that matches
  no published table) can never fire: :func:`unreachable` says which;
- a table renamed while the app runs keeps its relation id but not its name:
  :func:`renamed` says what the new name no longer matches.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import psycopg

from .checks import CHECK_TIMEOUT, Preflight, preflight
from .errors import SetupError, redact
from .handlers import Handler, table_matcher
from .lookups import within

if TYPE_CHECKING:
    from .config import WalExSettings
    from .relations import Table

__all__ = ["check_subscriptions", "unreachable", "renamed"]


def check_subscriptions(settings: WalExSettings, specs: list[str]) -> Preflight:
    """Check ``specs`` as ``start()`` does, now, from synchronous code.

    Runs on its own connection and event loop in a helper thread, so it
    works from any thread, the app's event loop included (which it blocks
    for the time of a connection and a few queries). Raises
    :class:`~walex.errors.SetupError`.
    """

    async def check() -> Preflight:
        try:
            conn = await psycopg.AsyncConnection.connect(settings.app_conninfo(), autocommit=True)
        except psycopg.Error as exc:
            raise SetupError(
                f"cannot check the subscriptions {specs!r}: cannot connect to "
                f"{settings.display_target()}: {redact(str(exc), settings.secret())}"
            ) from None
        async with conn:
            try:
                return await within(conn, preflight(conn, settings.publication, specs), CHECK_TIMEOUT)
            except psycopg.Error as exc:
                raise SetupError(
                    f"checking the subscriptions {specs!r} on {settings.display_target()} "
                    f"failed: {redact(str(exc), settings.secret())}"
                ) from None

    with ThreadPoolExecutor(1, thread_name_prefix=f"walex-{settings.name}-check") as pool:
        return pool.submit(lambda: asyncio.run(check())).result()


def _overlaps(handler_table: str, spec: str) -> bool:
    """Whether some table can match both a handler's table and a subscription."""
    if spec == "*" or handler_table == "all":
        return True
    h_schema, _, h_table = handler_table.rpartition(".")
    s_schema, _, s_table = spec.rpartition(".")
    return h_table == s_table and (not h_schema or not s_schema or h_schema == s_schema)


def unreachable(
    handlers: Iterable[Handler], subscriptions: list[str],
    published: set[tuple[str, str]] | None = None,
) -> list[tuple[Handler, str]]:
    """The handlers that cannot fire, each with a sentence saying why.

    ``published`` (the publication's tables, when just read) also flags a
    handler whose table is subscribed but matches no published table.
    """
    found = []
    subscribed = [table_matcher(spec) for spec in subscriptions]
    for handler in handlers:
        if handler.table == "all":
            continue
        if not any(_overlaps(handler.table, spec) for spec in subscriptions):
            found.append((handler, (
                f"{describe(handler)} can never fire: no subscription covers its table "
                f"(subscriptions: {subscriptions!r}). Fix: subscribe to {handler.table!r}, or "
                "correct the table name of the handler."
            )))
        elif published is not None and not any(
            handler.matches_table(s, t) and any(m(s, t) for m in subscribed) for s, t in published
        ):
            found.append((handler, (
                f"{describe(handler)} does not fire: no table of the publication matches it, so "
                "it fires only once such a table is published (is the table name right?)"
            )))
    return found


def describe(handler: Handler) -> str:
    kinds = "/".join(sorted(t.value for t in handler.types))
    return f"handler {handler.name} ({kinds} of {handler.table!r})"


def renamed(before: Table, after: Table, handlers: Iterable[Handler],
            subscriptions: list[str]) -> tuple[bool, str]:
    """What a rename seen in the stream changes: (whether that is a loss, the message)."""
    what = (f"table {before.qualified_name} (relation id {after.relation_id}) is now named "
            f"{after.qualified_name}")
    if before.subscribed and not after.subscribed:
        return True, (
            f"{what}: subscriptions {subscriptions!r} do not name it any more, so its changes are "
            "not delivered from here on (subscriptions and handlers follow table names, as the "
            f"start check does). Fix: subscribe to {after.qualified_name!r} "
            f"(app.config.add(\"subscriptions\", [{after.qualified_name!r}])) and move its "
            "handlers to the new name."
        )
    if not after.subscribed:
        return False, f"{what}; it is not subscribed"
    lost = [h for h in handlers if h.table != "all"
            and h.matches_table(before.schema, before.name)
            and not h.matches_table(after.schema, after.name)]
    if lost:
        return True, (
            f"{what}: it is still subscribed, but {', '.join(describe(h) for h in lost)} no "
            f"longer match{'es' if len(lost) == 1 else ''} it and get{'s' if len(lost) == 1 else ''} "
            f"none of its changes from here on. Fix: register "
            f"{'it' if len(lost) == 1 else 'them'} for {after.qualified_name!r}."
        )
    return False, f"{what}; it is subscribed under its new name"
