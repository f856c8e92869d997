"""Configuration: one pydantic-settings model for keyword arguments, a URL and ``WALEX_*``.

Precedence: keyword arguments, then ``WALEX_*`` environment variables, then
defaults; inside the connection, explicit keys (``hostname``, ``port``, ...)
win over the parts of ``url``. Every problem is reported at once in one
:class:`~walex.errors.ConfigError`, and the password never appears in it, in
``repr`` or in a log line (it is a ``SecretStr``; a URL is shown redacted).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .errors import ConfigError, redact

__all__ = ["WalExSettings", "load_settings"]

_SLOT_NAME = re.compile(r"^[a-z0-9_]{1,63}$")


def _split(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


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
    sslmode: str | None = None
    sslrootcert: str | None = None

    # what to stream
    publication: str = Field(min_length=1, max_length=63)
    subscriptions: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["*"])
    modules: Annotated[list[Any], NoDecode] = Field(default_factory=list)
    name: str = Field(default="walex", min_length=1)

    # the slot
    durable_slot: bool = False
    slot_name: str | None = None

    failover: bool = False  # PostgreSQL 17+: the slot survives a failover to a standby
    recreate_lost_slot: bool = False  # an invalidated durable slot is recreated (a reported gap)
    slot_wait_timeout: float = Field(default=30.0, ge=0)  # a durable slot held by another process

    # the protocol
    streaming: bool = False
    status_interval: float = Field(default=10.0, gt=0, le=60)
    heartbeat_interval: float | None = Field(default=None, gt=0)
    max_pending_transactions: int = Field(default=64, ge=1)  # batches queued for handlers
    batch_size: int = Field(default=1000, ge=1)  # most events per handler call
    spill_dir: str | None = None  # where streamed transactions spill; default: temp dir
    reconnect_max_attempts: int = Field(default=10, ge=0)
    reconnect_backoff_max: float = Field(default=30.0, gt=0)

    # handlers
    message_middleware: Any = None
    on_error: Any = "stop"  # "stop", "skip" or a dead-letter callable(events, exc)
    max_retries: int = Field(default=3, ge=0)
    retry_backoff: float = Field(default=0.5, ge=0)
    function_concurrency: int = Field(default=16, ge=1)
    shutdown_grace: float = Field(default=30.0, ge=0)

    @field_validator("subscriptions", "modules", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return _split(value)

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
        raise ValueError("must be 'stop', 'skip' or a dead-letter callable(events, exception)")

    @field_validator("message_middleware")
    @classmethod
    def _middleware(cls, value: Any) -> Any:
        if value is not None and not callable(value):
            raise ValueError("must be a callable(message, app)")
        return value

    @field_validator("publication")
    @classmethod
    def _publication(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError("a publication name cannot contain a NUL character")
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
            "dbname": self.database, "sslmode": self.sslmode, "sslrootcert": self.sslrootcert,
        }
        try:
            return make_conninfo(base, **{k: v for k, v in keys.items() if v is not None})
        except Exception as exc:
            raise ConfigError(f"invalid database url: {redact(str(exc), base)}") from None

    def secret(self) -> str | None:
        """The password, wherever it was given, so it can be scrubbed from messages."""
        if self.password:
            return self.password.get_secret_value()
        if self.url:
            return conninfo_to_dict(self.conninfo()).get("password")  # type: ignore[return-value]
        return None

    def display_target(self) -> str:
        """``user@host:port/db`` for logs and errors, without the password."""
        params = conninfo_to_dict(self.conninfo())
        return (
            f"{params.get('user', '')}@{params.get('host', 'localhost')}:"
            f"{params.get('port', 5432)}/{params.get('dbname', '')}"
        )


def load_settings(**options: Any) -> WalExSettings:
    """Build settings, turning every validation problem into one ConfigError."""
    try:
        return WalExSettings(**options)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"]) or "configuration"
            problems.append(f"  - {where}: {error['msg']}")
        raise ConfigError(
            f"invalid walex configuration ({len(problems)} problem"
            f"{'s' if len(problems) > 1 else ''}):\n" + "\n".join(problems)
        ) from None
