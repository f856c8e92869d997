"""Configuration: one pydantic-settings model for keyword arguments, a URL, ``WALEX_*`` and TOML.

Precedence: keyword arguments, then ``WALEX_*`` environment variables, then
the values of a TOML file (``walex run --config``, see :func:`read_toml` and
:func:`file_values`), then defaults; inside the connection, explicit keys
(``hostname``, ``port``, ``sslmode``, ...) win over the parts of ``url``.
Every problem is reported at once in one :class:`~walex.errors.ConfigError`,
and the password never appears in it, in ``repr`` or in a log line (it is a
``SecretStr``; libpq's complaint about a malformed URL is shown without any
text it quotes from it). List options given as strings (``WALEX_*``) are JSON
lists or comma-separated. Messages name the target libpq uses, its ``PG*``
variables included (:meth:`WalExSettings.display_target`).

TLS: ``ssl=True`` asks for TLS with the server certificate and host name
verified (``sslmode=verify-full``, against ``sslrootcert``) unless ``sslmode``
says otherwise; ``ssl=False`` is ``sslmode=disable``; ``sslrootcert`` without
``sslmode`` also means ``verify-full``. Without any of these libpq's own
default applies (or the URL's ``sslmode``).

``message_middleware`` and a dead-letter ``on_error`` may be given as import
strings (``"pkg.module:function"``), so a TOML file or an environment
variable can name them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pydantic import ByteSize, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings, InitSettingsSource, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict,
)

from .conntext import conninfo_problem, format_target, hint, misplaced_at
from .errors import ConfigError

__all__ = ["WalExSettings", "load_settings", "read_toml", "file_values", "SSLMODES"]

_SLOT_NAME = re.compile(r"^[a-z0-9_]{1,63}$")
_STORE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?$")
_APP_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}$")
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")

# Values of a configuration file, below keyword arguments and WALEX_* variables.
_FILE_VALUES: ContextVar[dict[str, Any] | None] = ContextVar("walex_file_values", default=None)


# the number options, which refuse True and False
_NUMBERS = ("port", "partitions", "destination_window", "slot_wait_timeout", "slot_create_timeout",
            "status_interval", "heartbeat_interval", "max_pending_transactions",
            "max_pending_bytes", "batch_size", "reconnect_max_attempts", "reconnect_backoff_max",
            "backfill_chunk_size", "backfill_query_timeout", "max_retries", "retry_backoff",
            "function_concurrency", "shutdown_grace", "gc_threshold", "metrics_port",
            "max_lag_bytes")


def _no_items() -> list[Any]:
    """A new empty list: the default of a list option.

    A Python function, not ``list``: pydantic reads the signature of a
    ``default_factory`` when building the model, and a builtin's costs some 5 ms
    at import (``inspect`` parses its text signature with ``tokenize``'s regexes).
    """
    return []


def _split(value: Any) -> Any:
    """A list given as a string (``WALEX_*``): JSON (``["user", "todo"]``) or comma-separated."""
    if isinstance(value, str):
        if value.lstrip().startswith("["):
            try:
                items = json.loads(value)
            except ValueError:
                raise ValueError(
                    'starts with "[" but is not a JSON list of strings; write ["user", "todo"] '
                    "or user,todo"
                ) from None
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise ValueError('must be a JSON list of strings like ["user", "todo"], or user,todo')
            return items
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


# libpq options walex sets on its connections unless the URL gives them (ignored on
# Unix-domain sockets): a dead peer is noticed within about 30 s
_LIVENESS = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
             "keepalives_count": 3, "tcp_user_timeout": 30000}


class WalExSettings(BaseSettings):
    """Every option of a :class:`~walex.WalEx` instance."""

    model_config = SettingsConfigDict(
        env_prefix="WALEX_", extra="forbid", arbitrary_types_allowed=True,
        validate_default=True, hide_input_in_errors=True,
    )

    # connection: a URL, explicit keys, or both (keys win)
    url: SecretStr | None = None
    hostname: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    username: str | None = None
    password: SecretStr | None = None
    database: str | None = None
    ssl: bool | None = None  # True: TLS with certificate verification (verify-full)
    sslmode: str | None = None
    sslrootcert: str | None = None

    # what to stream
    publication: str = Field(min_length=1, max_length=63)
    subscriptions: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["*"])
    modules: Annotated[list[Any], NoDecode] = Field(default_factory=_no_items)
    name: str = "walex"

    # destinations: broker and webhook URLs every event is published to (walex.destinations)
    destinations: Annotated[list[SecretStr], NoDecode] = Field(default_factory=_no_items)
    partitions: int = Field(default=1, ge=1, le=65536)  # {partition}: hash of table and key
    # transactions published to a destination before their confirmation (window= in a URL
    # overrides it): acknowledgement still waits for the confirmations, in order
    destination_window: int = Field(default=1024, ge=1, le=1_000_000)

    # the slot
    durable_slot: bool = False
    slot_name: str | None = None

    failover: bool = False  # PostgreSQL 17+: the slot survives a failover to a standby
    # a durable slot invalidated, or dropped while the app streamed from it: recreated, the gap
    # reported (instead of an error)
    recreate_lost_slot: bool = False
    slot_wait_timeout: float = Field(default=30.0, ge=0)  # a durable slot held by another process
    # CREATE_REPLICATION_SLOT waits for the transactions that had written when it began
    slot_create_timeout: float = Field(default=120.0, gt=0)

    # the protocol
    streaming: bool = False
    status_interval: float = Field(default=10.0, gt=0, le=60)
    heartbeat_interval: float | None = Field(default=None, gt=0)
    max_pending_transactions: int = Field(default=64, ge=1)  # batches queued for handlers
    # bytes walex holds for handlers and destinations, in memory (walex.sizes): the typed
    # events queued, in hand or awaiting confirmation, a destination window's encoded
    # messages (a quarter), the batch being assembled: 64 MiB, "16MiB", "500MB"
    max_pending_bytes: ByteSize = Field(default=ByteSize(64 * 1024 * 1024), ge=1)
    batch_size: int = Field(default=1000, ge=1)  # most events per handler call
    spill_dir: str | None = None  # where streamed transactions spill; default: temp dir
    # rows typed when first read (walex.rawevent), the relay writing their JSON from the
    # text PostgreSQL sent: None (default) for an app with destinations and no handler
    raw_rows: bool | None = None
    reconnect_max_attempts: int = Field(default=10, ge=0)
    reconnect_backoff_max: float = Field(default=30.0, gt=0, allow_inf_nan=False)

    # existing rows as "read" events (walex.backfill)
    snapshot: Literal["never", "initial"] = "never"  # "initial": every table when the slot is made
    backfill_chunk_size: int = Field(default=10000, ge=1)  # rows per chunk (keyset pagination)
    backfill_table: str = "walex_backfill"  # the progress store, "table" or "schema.table"
    # seconds one exchange of a backfill's connection (a chunk's read included) may take:
    # past it the connection counts as lost and the chunk is read again on a new one
    backfill_query_timeout: float = Field(default=300.0, gt=0)

    # handlers
    message_middleware: Any = None
    on_error: Any = "stop"  # "stop", "skip" or a dead-letter callable(events, exc)
    max_retries: int = Field(default=3, ge=0)
    retry_backoff: float = Field(default=0.5, ge=0, allow_inf_nan=False)  # inf: no retry ever
    function_concurrency: int = Field(default=16, ge=1)
    shutdown_grace: float = Field(default=30.0, ge=0)
    # process-wide, while streaming: the cyclic GC's generation-0 threshold is at
    # least this (never lowered, restored at stop; 0: leave the GC alone). Rows
    # become objects that outlive the young collections, so with Python's 700 a
    # full collection comes every ~10k rows; see walex/gcpolicy.py
    gc_threshold: int = Field(default=100_000, ge=0)
    # process-wide: gc.freeze() once streaming began, so the cyclic GC's full
    # collections skip everything alive at start; for processes dedicated to walex
    gc_freeze: bool = False
    # the event loop run() and the walex commands create (walex.lifecycle): "auto" takes
    # uvloop when it is installed (walex[fast]), "asyncio" never does, "uvloop" insists
    loop: Literal["auto", "asyncio", "uvloop"] = "auto"

    # operating it (walex.observe): /metrics, /healthz and /livez on this port
    # (0: any free port), the lag limit, an active-passive standby, tracing
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"
    max_lag_bytes: ByteSize | None = Field(default=None, ge=1)
    max_lag_release: bool = False  # temporary slot: beyond max_lag_bytes, drop it (a gap)
    standby: bool = False  # a durable slot held by another instance: wait, then take over
    tracing: bool = False  # OpenTelemetry spans per batch (needs walex[otel])

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [init_settings]
        # pydantic-settings matches WALEX_* names in any case; with none set, its
        # per-field look-ups (a third of building the settings) would find nothing
        if any(name[:6].lower() == "walex_" for name in os.environ):
            sources.append(env_settings)
        values = _FILE_VALUES.get()
        if values:
            sources.append(InitSettingsSource(settings_cls, init_kwargs=dict(values)))
        return tuple(sources)

    @field_validator("subscriptions", "modules", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return _split(value)

    @field_validator(*_NUMBERS, mode="before")
    @classmethod
    def _not_a_flag(cls, value: Any) -> Any:
        # pydantic takes True as 1 for a number: function_concurrency=True meant one call
        # at a time, max_retries=True one retry, without a word
        if isinstance(value, bool):
            raise ValueError(f"a number is needed, not {value}")
        return value

    @field_validator("destinations", mode="before")
    @classmethod
    def _destination_list(cls, value: Any) -> Any:
        if isinstance(value, str):  # WALEX_DESTINATIONS: a JSON list, or comma-separated
            text = value.strip()
            if text.startswith("["):
                try:
                    return json.loads(text)
                except ValueError:
                    raise ValueError("is not a JSON list of URLs") from None
            return _split(text)
        return value

    @field_validator("destinations")
    @classmethod
    def _destinations(cls, value: list[SecretStr]) -> list[SecretStr]:
        if not value:
            return value
        from .destinations import check_url  # imports no broker client it does not need

        problems = []
        for url in value:
            try:
                check_url(url.get_secret_value())
            except ConfigError as exc:
                problems.append(str(exc))
        if problems:
            raise ValueError("; ".join(problems))
        return value

    def destination_urls(self) -> list[str]:
        """The destination URLs (with their passwords: never log them)."""
        return [url.get_secret_value() for url in self.destinations]

    @field_validator("url")
    @classmethod
    def _url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            raw = value.get_secret_value()
            scheme = raw.partition("://")[0] if "://" in raw else None
            if scheme is not None and scheme not in ("postgresql", "postgres"):
                raise ValueError("not a valid database url: it must start with postgresql://")
            try:
                params = conninfo_to_dict(raw)
            except Exception as exc:
                raise ValueError(f"not a valid database url: {conninfo_problem(exc, raw)}") from None
            port = str(params.get("port", ""))
            if not all(p.strip().isdigit() for p in port.split(",") if p.strip()):
                raise ValueError("not a valid database url: its port is not a number" + hint(raw))
            misplaced = misplaced_at(raw, params)
            if misplaced:
                raise ValueError(f"not a valid database url: {misplaced}" + hint(raw))
        return value

    @field_validator("max_pending_bytes", "max_lag_bytes", mode="wrap")
    @classmethod
    def _byte_size(cls, value: Any, handler: Any) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise ValueError(
                f"must be a size in bytes, at least 1: an integer, or a string such as "
                f"'64MiB' or '500MB' (got {value!r})"
            ) from None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _APP_NAME.match(value):
            raise ValueError(
                "an app name has 1-63 characters among ASCII letters, digits, '_', '-' and '.', "
                "and starts with a letter, digit or '_'"
            )
        return value

    @field_validator("loop")
    @classmethod
    def _loop(cls, value: str) -> str:
        from .lifecycle import check_loop

        try:
            check_loop(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("sslmode")
    @classmethod
    def _sslmode(cls, value: str | None) -> str | None:
        if value is not None and value not in SSLMODES:
            raise ValueError(f"must be one of {', '.join(SSLMODES)}")
        return value

    @model_validator(mode="after")
    def _ssl_consistent(self) -> WalExSettings:
        if self.ssl is True and self.sslmode in ("disable", "allow", "prefer"):
            raise ValueError(
                f"ssl=True asks for TLS but sslmode={self.sslmode!r} does not require it; "
                "use sslmode='verify-full' (the default with ssl=True), 'verify-ca' or 'require'"
            )
        if self.ssl is False and self.sslmode not in (None, "disable"):
            raise ValueError(f"ssl=False contradicts sslmode={self.sslmode!r}")
        if self.standby and not self.durable_slot:
            raise ValueError(
                "standby=True needs durable_slot=True (and the same slot_name on every "
                "instance): a temporary slot cannot be taken over"
            )
        if self.max_lag_release and (self.durable_slot or self.max_lag_bytes is None):
            raise ValueError(
                "max_lag_release=True drops a temporary slot that lags more than "
                "max_lag_bytes: it needs max_lag_bytes and durable_slot=False (a durable slot "
                "is never dropped by walex; watch it with walex status --max-lag)"
            )
        return self

    @field_validator("subscriptions")
    @classmethod
    def _subscriptions(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one table is needed; use '*' for every published table")
        for item in value:
            if item != "*" and (not item or item.count(".") > 1 or "\x00" in item):
                raise ValueError(f"{item!r} is not a table name, 'schema.table' or '*'")
        return value

    @field_validator("on_error")
    @classmethod
    def _on_error(cls, value: Any) -> Any:
        if value in ("stop", "skip") or callable(value):
            return value
        if isinstance(value, str) and ":" in value:
            value = _import_callable(value)
            if callable(value):
                return value
        raise ValueError(
            "must be 'stop', 'skip' or a dead-letter callable(events, exception) "
            "(or its import string 'package.module:function')"
        )

    @field_validator("message_middleware")
    @classmethod
    def _middleware(cls, value: Any) -> Any:
        if isinstance(value, str) and ":" in value:
            value = _import_callable(value)
        if value is not None and not callable(value):
            raise ValueError(
                "must be a callable(message, app) (or its import string 'package.module:function')"
            )
        return value

    @field_validator("publication")
    @classmethod
    def _publication(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError("a publication name cannot contain a NUL character")
        if len(value.encode()) > 63:
            raise ValueError("a publication name has at most 63 bytes")
        return value

    @field_validator("backfill_table")
    @classmethod
    def _backfill_table(cls, value: str) -> str:
        if not _STORE_NAME.match(value):
            raise ValueError("must be a table name or 'schema.table' of letters, digits and '_'")
        return value

    @field_validator("slot_name")
    @classmethod
    def _slot_name(cls, value: str | None) -> str | None:
        if value is not None and not _SLOT_NAME.match(value):
            raise ValueError(
                "a replication slot name has 1-63 characters among lower-case letters, "
                "digits and underscores"
            )
        return value

    def conninfo(self) -> str:
        """The libpq connection string (contains the password: never log it)."""
        base = self.url.get_secret_value() if self.url else ""
        keys = {
            "host": self.hostname, "port": self.port, "user": self.username,
            "password": self.password.get_secret_value() if self.password else None,
            "dbname": self.database, "sslmode": self.effective_sslmode(),
            "sslrootcert": self.sslrootcert,
        }
        try:
            conninfo = make_conninfo(base, **{k: v for k, v in keys.items() if v is not None})
            if "connect_timeout" not in conninfo_to_dict(conninfo) and not os.environ.get(
                "PGCONNECT_TIMEOUT"
            ):
                # libpq waits forever by default: a reconnect to a silent network must not hang
                conninfo = make_conninfo(conninfo, connect_timeout=10)
            given = conninfo_to_dict(conninfo)
            # a peer that goes silent without closing (a network partition) is noticed:
            # TCP keepalives on an idle connection, tcp_user_timeout on unanswered data
            conninfo = make_conninfo(conninfo, **{
                k: v for k, v in _LIVENESS.items()
                if k not in given and (k != "tcp_user_timeout" or pq.version() >= 120000)})
            # psycopg reads text as bytes from a SQL_ASCII connection (wal_level would be
            # b'logical'): walex's connections read UTF-8, as its replication stream does
            return make_conninfo(conninfo, client_encoding="UTF8")
        except Exception as exc:
            raise ConfigError(f"invalid database url: {conninfo_problem(exc, base)}") from None

    def app_conninfo(self) -> str:
        """:meth:`conninfo` for the app's own connections, named after the app.

        The app's ``name`` is the ``application_name`` that ``pg_stat_activity``
        and ``pg_stat_replication`` show, unless ``application_name`` (in the
        URL) or ``PGAPPNAME`` says otherwise.
        """
        return make_conninfo(self.conninfo(), fallback_application_name=self.name)

    def effective_sslmode(self) -> str | None:
        """The ``sslmode`` walex asks libpq for; ``None`` leaves it to the URL or libpq."""
        if self.sslmode is not None:
            return self.sslmode
        if self.ssl is False:
            return "disable"
        if self.ssl is None and self.sslrootcert is None:
            return None
        in_url = conninfo_to_dict(self.url.get_secret_value()).get("sslmode") if self.url else None
        if self.ssl is True and in_url not in ("require", "verify-ca", "verify-full"):
            return "verify-full"  # ssl=True: TLS, and the certificate verified
        return in_url or "verify-full"  # a root certificate is given to verify with

    def secret(self) -> str | None:
        """The password, wherever it was given, so it can be scrubbed from messages."""
        if self.password:
            return self.password.get_secret_value()
        if self.url:
            return conninfo_to_dict(self.conninfo()).get("password")  # type: ignore[return-value]
        return None

    def display_target(self) -> str:
        """``user@host:port/db`` for logs and errors, without the password.

        What libpq connects to: the parts the configuration leaves out come
        from its service file's entry (``service=name``, :mod:`walex.pgservice`),
        then libpq's ``PG*`` variables and defaults (``[local]`` is its Unix
        socket); ``service 'name'`` when the entry is not found.
        """
        params = conninfo_to_dict(self.conninfo())
        defaults = {
            o.keyword.decode(): o.val.decode(errors="replace")
            for o in pq.Conninfo.get_defaults() if o.val is not None
        }
        service = params.get("service")
        from_service: dict[str, str] = {}
        if service and service != defaults.get("service"):  # PGSERVICE's is in the defaults
            from .pgservice import service_params

            found = service_params(str(service), params.get("servicefile"))
            if found is None:  # libpq may still find it (its own system directory)
                return f"service {service!r}"
            from_service = found

        def get(key: str) -> str:
            return str(params.get(key) or from_service.get(key) or defaults.get(key) or "")

        user = get("user")
        return format_target(user, get("host") or get("hostaddr") or "[local]",
                             get("port"), get("dbname") or user)


def _import_callable(spec: str) -> Any:
    from .modules import import_object  # modules imports handlers; avoid a cycle at import

    try:
        return import_object(spec)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


def read_toml(path: str | Path) -> dict[str, Any]:
    """The options of a TOML configuration file (top-level keys, as for ``WalEx(...)``)."""
    import tomllib  # only a process given a file (walex run --config) reads TOML

    path = Path(path)
    try:
        with path.open("rb") as fh:
            values = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {str(path)!r} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {str(path)!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {str(path)!r} is not valid TOML: {exc}") from None
    return values


@contextmanager
def file_values(values: dict[str, Any]) -> Iterator[None]:
    """Settings built inside take ``values`` as a source below keywords and ``WALEX_*``."""
    token = _FILE_VALUES.set(values)
    try:
        yield
    finally:
        _FILE_VALUES.reset(token)


def load_settings(*, hints: dict[str, str] | None = None, **options: Any) -> WalExSettings:
    """Build settings, turning every validation problem into one ConfigError.

    ``hints`` says how the caller lets a missing option be given (for the
    CLI: ``{"publication": "-p/--publication"}``).
    """
    try:
        return WalExSettings(**options)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"]) or "configuration"
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "missing" and len(error["loc"]) == 1:
                message = _missing(where, (hints or {}).get(where))
            problems.append(f"  - {where}: {message}")
        raise ConfigError(
            f"invalid walex configuration ({len(problems)} problem"
            f"{'s' if len(problems) > 1 else ''}):\n" + "\n".join(problems)
        ) from None


def _missing(name: str, hint: str | None) -> str:
    if hint is None:
        in_file = _FILE_VALUES.get() is not None
        hint = f"{name} = ... in the configuration file" if in_file else f"{name}=..."
    return f"required: give {hint} or set WALEX_{name.upper()}"
