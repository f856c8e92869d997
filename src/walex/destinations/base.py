"""What every destination shares: the abstract class, what it publishes (:class:`Outgoing`),
URLs, templates, backoff.

A destination module subclasses :class:`Destination` and implements the
contract of :mod:`walex.destinations`: :meth:`~Destination.open`,
:meth:`~Destination.publish` (returns only when the broker confirmed every
event durable; raises :class:`Unavailable` when it could not, so the caller
retries the whole batch) and :meth:`~Destination.close`. A permanent refusal
(a webhook answering 400, a redirect) raises
:class:`~walex.errors.DestinationError`, which the app's ``on_error`` settles
(``"stop"``: the app stops without acknowledging).

URLs are parsed once (:class:`DestinationURL`); its :attr:`~DestinationURL.display`
is the one text form of a destination or worker-source URL in every log line,
error, ``repr`` and metric label: the user name, password (a NATS token),
every query value but walex's own and a webhook's path are ``***`` there. Templates (:class:`Template`) take ``{schema}``,
``{table}``, ``{type}`` and ``{partition}``.
"""

from __future__ import annotations

import random
import re
import string
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple
from urllib.parse import parse_qsl, unquote, urlsplit

from ..errors import ConfigError, redact

__all__ = ["Destination", "DestinationURL", "Outgoing", "Template", "Unavailable", "backoff",
           "version_tuple"]

FIELDS = ("schema", "table", "type", "partition")

# The parameters of walex's own whose values a URL's display shows: names, numbers and
# flags, never secrets (every destination's and worker source's ``accepted``; a test
# keeps the two in step). Any other value, a webhook receiver's token say, is ``***``.
SHOWN = frozenset({
    "stream", "subject", "duplicate_window", "timeout", "exchange", "routing_key",
    "exchange_type", "mandatory", "maxlen", "partitions", "group", "ack_wait", "prefetch",
    "balance", "topic", "tombstones", "start", "chain", "ce_headers",
    "window",  # any URL's (walex.destinations.from_url takes it out first)
})
_WEBHOOK_SCHEMES = ("http", "https")
# a webhook's other parameters are the receiver's
_WEBHOOK_SHOWN = frozenset({"secret_env", "timeout", "window"})
_ENCODE = ("its host and port cannot be read (nothing of it is shown: it may hold a "
           "password). A user name or password holding / ? # @ : or % must be "
           "percent-encoded: urllib.parse.quote(password, safe='')")


class Outgoing(NamedTuple):
    """One encoded event, with what the destinations' templates and headers need."""

    id: str
    schema: str
    table: str
    type: str  # "insert", "update", "delete", "truncate"
    partition: int
    body: bytes  # the CloudEvent, JSON
    # the body's attributes a destination puts in headers (Kafka's ce_*) and keys,
    # kept so that nobody parses the body again; the same str objects the body was made of
    source: str  # "source": "/<db>/<schema>/<table>"
    time: str  # "time"
    key: str  # "partitionkey": "schema.table" or "schema.table/<subject>"
    subject: str | None  # "subject": the row's key (None: absent)


class Unavailable(Exception):
    """The broker could not confirm the batch now; publishing it again may succeed.

    ``retry_after``: seconds the broker asked to wait (an HTTP ``Retry-After``).
    ``attempts``: a refusal that may pass (a full stream): after this many failed
    attempts in a row it is one for good, settled by ``on_error``.
    """

    def __init__(self, message: str, retry_after: float | None = None,
                 attempts: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.attempts = attempts


def backoff(attempt: int, base: float = 0.2, cap: float = 10.0) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based): exponential, jittered."""
    return min(cap, base * 2**attempt) * random.uniform(0.5, 1.0)


class DestinationURL:
    """A destination URL taken apart; its password is kept out of every text form."""

    def __init__(self, url: str) -> None:
        self.raw = url
        try:
            parts = urlsplit(url)
            # host:port[,host:port...]: a Kafka URL may name several bootstrap servers
            self.servers = parts.netloc.rpartition("@")[2]
            self.port = parts.port if "," not in self.servers else None
        except ValueError as exc:
            shown = url.split("://", 1)[0] + "://..." if "://" in url else "(not a URL)"
            if "@" in url:  # the "port" may be a password's start (a / ? # in it cut it there)
                raise ConfigError(f"destination {shown} is not a valid URL: {_ENCODE}") from None
            raise ConfigError(f"destination {shown} is not a valid URL: "
                              f"{redact(str(exc), url)}") from None
        if "@" not in parts.netloc and parts.scheme.lower() not in _WEBHOOK_SCHEMES and (
                "@" in parts.path or "@" in parts.fragment
                or any("@" in p.partition("=")[0] for p in parts.query.split("&"))):
            # user:pass/word@host read as host "user", port "pass", path "/word@host": the
            # password would be shown (and connected to) as a host and port
            shown = url.split("://", 1)[0] + "://..."
            raise ConfigError(f"destination {shown} is not a valid URL: {_ENCODE}")
        self.scheme = parts.scheme.lower()
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password is not None else None
        self.host = parts.hostname or ""
        self.path = parts.path
        self.query = parts.query
        self.secrets = [s for s in (self.password, parts.password) if s]
        # a bare user name in a NATS URL is a token: a secret too
        if self.scheme in ("nats", "tls") and self.username and self.password is None:
            self.secrets += [self.username, parts.username or ""]
        # what display hides is kept out of scrubbed text (a client's error) too: the
        # values of the parameters that are not walex's own, and a webhook's path
        shown = _WEBHOOK_SHOWN if self.scheme in _WEBHOOK_SCHEMES else SHOWN
        hidden = [value for key, value in parse_qsl(parts.query, keep_blank_values=True)
                  if key not in shown]
        hidden += [raw for key, sep, raw in (p.partition("=") for p in parts.query.split("&"))
                   if sep and key not in shown]
        if self.scheme in _WEBHOOK_SCHEMES and self.path not in ("", "/"):
            hidden += [self.path, unquote(self.path)]
            # token-like segments too (a rendered template path is not the path as given)
            hidden += [seg for seg in self.path.split("/")
                       if len(seg) >= 16 or (len(seg) >= 8 and not seg.isalpha())]
        # longest first, so a value is not left half shown by a shorter one inside it
        self.secrets += sorted({h for h in hidden if len(h) >= 4}, key=len, reverse=True)
        self.params: dict[str, str] = {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key in self.params:
                raise ConfigError(f"destination {self.display}: parameter {key!r} is given twice")
            self.params[key] = value

    @property
    def display(self) -> str:
        """The URL as shown in every log line, error, ``repr`` and metric label.

        Scheme, host and port as given; the user name and password (a NATS
        token) as ``***``; every query value as ``***`` except those of walex's
        own parameters (:data:`SHOWN`: names and numbers, never secrets); and
        a webhook's path as ``/***`` (Slack-style URLs carry their token
        there). E.g. ``https://hooks.example.com:443/***?token=***&timeout=5``.
        """
        netloc = self.host if ":" not in self.host else f"[{self.host}]"
        if "," in self.servers:
            netloc = self.servers
        elif self.port is not None:
            netloc += f":{self.port}"
        if self.username is not None or self.password is not None:
            netloc = f"***@{netloc}"
        webhook = self.scheme in _WEBHOOK_SCHEMES
        path = "/***" if webhook and self.path not in ("", "/") else self.path
        text = f"{self.scheme}://{netloc}{path}"
        if self.query:
            shown = _WEBHOOK_SHOWN if webhook else SHOWN
            text += "?" + "&".join(
                f"{key}={value if key in shown else '***'}" if sep else key
                for key, sep, value in (part.partition("=") for part in self.query.split("&"))
            )
        return text  # built without any secret: no literal replacing that could mangle it

    def scrub(self, text: str) -> str:
        """``text`` (a client's error message, say) without this URL's secrets."""
        return redact(text, *self.secrets)

    def take(self, name: str, default: str | None = None) -> str | None:
        """Remove and return a parameter."""
        return self.params.pop(name, default)

    def take_int(self, name: str, default: int | None, minimum: int = 0) -> int | None:
        raw = self.take(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise ConfigError(f"destination {self.display}: {name} must be an integer >= {minimum}, "
                              f"got {raw!r}")
        return value

    def take_float(self, name: str, default: float, minimum: float = 0.0) -> float:
        raw = self.take(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not value >= minimum or value == float("inf"):
            raise ConfigError(f"destination {self.display}: {name} must be a number >= {minimum:g}, "
                              f"got {raw!r}")
        return value

    def take_bool(self, name: str, default: bool) -> bool:
        raw = self.take(name)
        if raw is None:
            return default
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"destination {self.display}: {name} must be true or false, got {raw!r}")

    def require(self, name: str, example: str) -> str:
        value = self.take(name)
        if not value:
            raise ConfigError(f"destination {self.display} needs the parameter {name} "
                              f"(e.g. {example})")
        return value

    def no_more_params(self, accepted: tuple[str, ...]) -> None:
        """Every parameter was used: an unknown one is a typo, reported with the known ones."""
        if self.params:
            raise ConfigError(
                f"destination {self.display}: unknown parameter"
                f"{'s' if len(self.params) > 1 else ''} {', '.join(sorted(self.params))}; "
                f"known: {', '.join(accepted)}"
            )


class Template:
    """A name made from an event's ``{schema}``, ``{table}``, ``{type}`` and ``{partition}``.

    ``escape`` turns a schema or table name into something the broker accepts
    in that place (a NATS subject token, say); rendered names are cached.
    """

    def __init__(self, text: str, what: str, where: str, escape: Callable[[str], str] = str) -> None:
        self.text = text
        self.escape = escape
        self.fields: list[str] = []
        literal: list[str] = []
        try:
            for prefix, name, spec, conversion in string.Formatter().parse(text):
                literal.append(prefix)
                if name is None:
                    continue
                if name not in FIELDS or spec or conversion:
                    raise ConfigError(
                        f"destination {where}: {what} template {text!r} uses {{{name}}}; "
                        f"a template may use {', '.join('{' + f + '}' for f in FIELDS)}"
                    )
                self.fields.append(name)
        except ValueError as exc:
            raise ConfigError(f"destination {where}: {what} template {text!r} is not valid: "
                              f"{exc} (write a literal brace as {{{{ or }}}})") from None
        self.prefix = "".join(literal) if not self.fields else self._fixed_prefix()
        self._cache: dict[tuple[str, str, str, int], str] = {}

    def _fixed_prefix(self) -> str:
        """What every rendered name starts with: the text before the first field."""
        for prefix, name, _spec, _conv in string.Formatter().parse(self.text):
            if name is not None:
                return prefix.replace("{{", "{").replace("}}", "}")
        return self.text  # pragma: no cover - only called when there are fields

    @property
    def constant(self) -> bool:
        return not self.fields

    def render(self, item: Outgoing) -> str:
        key = (item.schema, item.table, item.type, item.partition)
        text = self._cache.get(key)
        if text is None:
            if len(self._cache) > 10_000:
                self._cache.clear()
            text = self._cache[key] = self.text.format(
                schema=self.escape(item.schema), table=self.escape(item.table),
                type=item.type, partition=item.partition,
            )
        return text


class Destination(ABC):
    """One destination URL: a broker connection and how to publish to it."""

    scheme: ClassVar[str]
    extra: ClassVar[str]  # the pip extra that installs the client
    accepted: ClassVar[tuple[str, ...]] = ()  # the URL parameters it understands
    # most events and bytes one publish carries when a window groups several
    # transactions' batches (walex.destinations.window); one batch alone may exceed them
    group_events: ClassVar[int] = 4096
    group_bytes: ClassVar[int] = 8 * 1024 * 1024
    # failed attempts in a row at a refusal that may pass (a full stream or queue, a Redis
    # out of memory: Unavailable(attempts=full_attempts)) before it is a refusal for good;
    # a destination object may be given its own
    full_attempts = 8

    def __init__(self, url: DestinationURL, partitions: int = 1) -> None:
        self.url = url
        self.partitions = partitions
        self.opened = False
        self.window: int | None = None  # window= of the URL; None: the app's destination_window

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url.display}>"

    @property
    def display(self) -> str:
        return self.url.display

    @abstractmethod
    async def open(self) -> None:
        """Connect (and create what is missing); raises :class:`Unavailable` if it cannot."""

    @abstractmethod
    async def publish(self, batch: list[Outgoing]) -> None:
        """Publish the batch in order; return only when every event is durable.

        Raises :class:`Unavailable` when that could not be confirmed (the
        caller reconnects and publishes the whole batch again) and
        :class:`~walex.errors.DestinationError` on a permanent refusal.
        """

    # groups a window's lane may have in flight at once (walex.destinations.window): above 1
    # only for a destination whose send_ahead makes sure a group handed over while others
    # await their confirmation is stored only if those are stored whole
    depth: ClassVar[int] = 1

    def pipelined(self) -> bool:
        """Whether a group may be handed over now with :meth:`send_ahead` (False unless a
        destination makes sure of :attr:`depth`'s promise: JetStream's chains)."""
        return False

    async def send_ahead(self, batch: list[Outgoing]) -> Any:
        """Hand ``batch`` over without waiting for its confirmation, stored only if every
        group handed over before it is stored whole; returns a flight whose ``answer``
        (a future) is done, within the destination's timeout, once :meth:`landed` can
        tell its outcome; None, having sent nothing, when it cannot go so. Raises
        :class:`Unavailable` when it could not be handed over."""
        return None

    def landed(self, flight: Any) -> Exception | None:
        """The outcome of a flight of :meth:`send_ahead` whose answer is done, asked in the
        order they were handed over: None when it is stored whole; otherwise why not
        (then no flight after it may be taken as stored)."""
        raise NotImplementedError

    @abstractmethod
    async def close(self) -> None:
        """Release the connection; never raises."""

    def unavailable(self, what: str, exc: BaseException | None = None) -> Unavailable:
        """An :class:`Unavailable` whose message holds no secret."""
        detail = f": {self.url.scrub(f'{type(exc).__name__}: {exc}')}" if exc is not None else ""
        return Unavailable(f"{what}{detail}")

    def describe(self, exc: BaseException) -> str:
        return self.url.scrub(f"{type(exc).__name__}: {exc}")

    def misconfigured(self, problem: str, fix: str) -> ConfigError:
        """A :class:`~walex.errors.ConfigError` for what retrying cannot cure (wrong
        credentials, a missing vhost): the redacted URL, the problem and the fix."""
        for secret in self.url.secrets:  # (the fix's example URL keeps its PASSWORD)
            if secret:
                fix = fix.replace(secret, "***")
        return ConfigError(f"{self.display}: {self.url.scrub(problem)}; {fix}. Retrying cannot "
                           "help, so walex stops")

    def info(self) -> dict[str, Any]:
        """What the destination is, for a status display."""
        return {"url": self.display}


def version_tuple(text: str) -> tuple[int, ...]:
    """A client's version as (major, minor), what walex checks before it relies on a client's
    internals (``"2.10.0"`` -> ``(2, 10)``, ``"7.0.0b1"`` -> ``(7, 0)``)."""
    parts = []
    for part in text.split(".")[:2]:
        digits = re.match(r"\d*", part)
        parts.append(int(digits.group()) if digits and digits.group() else 0)
    return tuple(parts)
