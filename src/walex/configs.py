"""Runtime configuration: WalEx's ``Configs.add_config/remove_config/replace_config``.

``app.config.add("subscriptions", ["todo"])``, ``.remove("subscriptions",
"todo")`` and ``.replace("password", "new")`` validate the whole new
configuration with the same model as the constructor (so a bad value raises
:class:`~walex.errors.ConfigError` and nothing changes), check an added
subscription against the database as ``start()`` does while the app runs (a
:class:`~walex.errors.SetupError`, and nothing changes), then apply it:
subscriptions and modules from the next transaction, without a restart (a
transaction under way -- its batches read or handed over in part, or a
streamed one still open -- ends under the old ones); the handler options
(``on_error``, ``max_retries``, ``retry_backoff``) for every failure from
then on, and ``function_concurrency`` at once, counting the calls running
already;
connection options (``password``, ``url``,
...) and ``message_middleware`` at the next reconnect; ``backfill_chunk_size``
from the next backfill. ``name``, the slot, the publication, the protocol
options, the destinations and the backfill progress store (``backfill_table``)
cannot change. The module-level
functions address a running app by its ``name``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import load_settings
from .errors import ConfigError

if TYPE_CHECKING:
    from .app import WalEx

__all__ = ["RuntimeConfig", "add_config", "remove_config", "replace_config", "get_config"]

_FIXED = {"name", "durable_slot", "slot_name", "publication", "streaming", "failover",
          "destinations", "partitions", "destination_window", "backfill_table",
          # the queue, its budget and the assembler are made with the app
          "max_pending_bytes", "max_pending_transactions", "batch_size", "spill_dir",
          "status_interval"}
# taken when the app starts: changed while it runs, they would be shown and not used
_AT_START = {"metrics_port", "metrics_host", "tracing", "gc_threshold", "gc_freeze"}


class RuntimeConfig:
    """The configuration of one app, changeable while it runs."""

    def __init__(self, app: WalEx) -> None:
        self._app = app

    def get(self, key: str) -> Any:
        settings = self._app.settings
        _check_key(key, settings)
        return getattr(settings, key)

    def add(self, key: str, values: Any) -> None:
        """Append to a list option (``subscriptions``, ``modules``)."""
        current = self._list(key)
        extra = values if isinstance(values, (list, tuple)) else [values]
        self._set(key, current + [v for v in extra if v not in current])

    def remove(self, key: str, value: Any) -> None:
        """Remove one value from a list option."""
        current = self._list(key)
        if value not in current:
            raise ConfigError(f"{value!r} is not in {key} ({current!r})")
        self._set(key, [v for v in current if v != value])

    def replace(self, key: str, value: Any) -> None:
        """Replace an option's value."""
        self._set(key, value)

    def _list(self, key: str) -> list[Any]:
        value = self.get(key)
        if not isinstance(value, list):
            raise ConfigError(f"{key} is not a list option; use replace()")
        return list(value)

    def _set(self, key: str, value: Any) -> None:
        settings = self._app.settings
        _check_key(key, settings)
        if key in _FIXED:
            raise ConfigError(f"{key} cannot change while the app exists; create a new app")
        if key in _AT_START and self._app._tasks:
            raise ConfigError(f"{key} cannot change while the app runs (it is taken at start); "
                              "stop the app, change it, and start it again")
        options = {k: getattr(settings, k) for k in settings.model_fields_set | {key}}
        options[key] = value
        new = load_settings(**options)
        app = self._app
        app._apply_settings(new)
        app.dispatcher.configure(
            new.on_error, new.max_retries, new.retry_backoff, new.function_concurrency
        )


def _check_key(key: Any, settings: Any) -> None:
    """A ConfigError unless ``key`` names an option (a list or a dict raised TypeError)."""
    if not isinstance(key, str) or key not in type(settings).model_fields:
        raise ConfigError(f"unknown configuration key {key!r}; the keys are the options of "
                          "WalEx(...), e.g. 'subscriptions', 'modules', 'on_error'")


def _config(name: str) -> RuntimeConfig:
    from .app import get_app

    return get_app(name).config


def add_config(name: str, key: str, values: Any) -> None:
    _config(name).add(key, values)


def remove_config(name: str, key: str, value: Any) -> None:
    _config(name).remove(key, value)


def replace_config(name: str, key: str, value: Any) -> None:
    _config(name).replace(key, value)


def get_config(name: str, key: str) -> Any:
    return _config(name).get(key)
