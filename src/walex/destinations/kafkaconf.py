"""The Kafka clients' settings, shared by the destination and the worker: the URL's
librdkafka settings (:func:`client_settings`), checked by the client itself
(:func:`validate`), the ones walex owns, and how delivery errors are told apart
(:data:`PERMANENT`: retrying cannot cure them; :data:`AUTHENTICATION`)."""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from ..errors import ConfigError
from .base import DestinationURL

__all__ = ["AUTHENTICATION", "FIXED", "GAPLESS", "NO_TOPIC", "NOT_ALLOWED", "OWN", "OWN_TIMEOUTS",
           "PERMANENT", "RETRIES", "TOO_LARGE", "client_settings", "validate"]

log = logging.getLogger("walex.destinations")

OWN = ("topic", "tombstones", "timeout", "ce_headers")  # walex's parameters; the others are librdkafka's
FIXED = frozenset({"bootstrap.servers", "enable.idempotence", "acks", "request.required.acks"})
GAPLESS = "enable.gapless.guarantee"  # walex's: groups ahead rely on it (walex.destinations.kafka)
OWN_TIMEOUTS = frozenset({"message.timeout.ms", "delivery.timeout.ms"})  # walex's timeout= instead
# a record given up after a number of retries is no permanent error: gapless would not stop the
# later records of its partition from being stored past it (order per key): walex's timeout= instead
RETRIES = frozenset({"retries", "message.send.max.retries"})

# delivery errors retrying cannot cure: the batch goes to on_error
PERMANENT = frozenset(getattr(KafkaError, name) for name in (
    "MSG_SIZE_TOO_LARGE", "RECORD_LIST_TOO_LARGE", "INVALID_RECORD", "INVALID_MSG_SIZE",
    "TOPIC_AUTHORIZATION_FAILED", "CLUSTER_AUTHORIZATION_FAILED", "_UNKNOWN_TOPIC",
    "UNKNOWN_TOPIC_OR_PART", "TOPIC_EXCEPTION", "_INVALID_ARG", "POLICY_VIOLATION",
    "INVALID_REQUIRED_ACKS",
) if hasattr(KafkaError, name))
TOO_LARGE = frozenset(getattr(KafkaError, n) for n in (
    "MSG_SIZE_TOO_LARGE", "RECORD_LIST_TOO_LARGE", "INVALID_MSG_SIZE") if hasattr(KafkaError, n))
NO_TOPIC = frozenset({KafkaError._UNKNOWN_TOPIC, KafkaError.UNKNOWN_TOPIC_OR_PART})
NOT_ALLOWED = frozenset({KafkaError.TOPIC_AUTHORIZATION_FAILED,
                         KafkaError.CLUSTER_AUTHORIZATION_FAILED})
AUTHENTICATION = frozenset({KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED})


class _Quiet:
    """librdkafka's log lines at debug level: what matters is raised, with the URL's secrets out."""

    def __init__(self, url: DestinationURL) -> None:
        self.url = url

    def log(self, level: int, fmt: str, *args: Any) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("librdkafka: %s", self.url.scrub(fmt % args if args else fmt))


def client_settings(url: DestinationURL, what: str, keep: tuple[str, ...] = (),
                    fixed: frozenset[str] = FIXED) -> dict[str, Any]:
    """The librdkafka settings a URL gives: its hosts, SASL user and the parameters left
    (but ``keep``); a setting of ``fixed`` is walex's own, an error naming it."""
    servers = url.servers or "127.0.0.1:9092"
    settings: dict[str, Any] = {"bootstrap.servers": servers, "logger": _Quiet(url)}
    if url.username is not None:
        settings["sasl.username"] = url.username
        settings["sasl.password"] = url.password or ""
    for name in list(url.params):
        if name in keep:
            continue
        if name in fixed:
            raise ConfigError(f"{what} {url.display}: {name} is set by walex (the URL's hosts, an "
                              "idempotent producer with acks=all reporting failed records, "
                              "records given up by walex's timeout=, the worker's group and "
                              "offsets); remove it")
        settings[name] = url.params.pop(name)
    return settings


def validate(client: Any, settings: dict[str, Any], what: str, url: DestinationURL) -> None:
    """Let librdkafka check the settings now (a client without brokers connects nowhere):
    a misspelt or invalid setting is a :class:`~walex.errors.ConfigError` when the URL is given."""
    offline = {k: v for k, v in settings.items() if k != "bootstrap.servers"}
    try:
        made = client(offline)
    except (KafkaException, ValueError, TypeError) as exc:
        raise ConfigError(f"{what} {url.display}: the Kafka client refused its settings: "
                          f"{url.scrub(str(exc.args[0].str() if isinstance(exc, KafkaException) else exc))}"
                          ) from None
    if hasattr(made, "close"):
        made.close()
