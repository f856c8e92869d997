"""Choosing destinations: the option, the environment variable, schemes, missing clients."""

from __future__ import annotations

import sys

import pytest

from walex import ConfigError, WalEx
from walex.config import load_settings
from walex.destinations import SCHEMES, Destination, Destinations, from_url, load_class

NATS = "nats://u:n4tspw@127.0.0.1:4222?stream=S"
REDIS = "redis://127.0.0.1:6379/0?stream=walex:{table}"


def test_environment_variable_takes_a_comma_list_or_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WALEX_DESTINATIONS", f"{NATS}, {REDIS}")
    settings = load_settings(publication="p")
    assert settings.destination_urls() == [NATS, REDIS]
    assert "n4tspw" not in repr(settings)
    with_comma = "redis://127.0.0.1:6379/0?stream=walex:{schema},{table}"
    monkeypatch.setenv("WALEX_DESTINATIONS", f'["{with_comma}"]')  # JSON keeps the comma
    assert load_settings(publication="p").destination_urls() == [with_comma]
    monkeypatch.setenv("WALEX_DESTINATIONS", "[not json")
    with pytest.raises(ConfigError, match="destinations: is not a JSON list of URLs"):
        load_settings(publication="p")


def test_every_bad_url_is_reported_without_its_password() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(publication="p", partitions=0,
                      destinations=["mqtt://u:k4fk4pw@h:1883", "nats://u:n4tspw@h?stream=a b"])
    text = str(info.value)
    assert "unknown scheme 'mqtt'" in text and "may not contain white space" in text
    assert "partitions" in text
    assert "k4fk4pw" not in text and "n4tspw" not in text


def test_a_missing_client_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "aio_pika", None)  # as if aio-pika were not installed
    monkeypatch.delitem(sys.modules, "walex.destinations.rabbitmq", raising=False)
    with pytest.raises(ConfigError, match=r"needs the aio-pika client.*pip install 'walex\[rabbitmq\]'"):
        from_url("amqp://guest:guest@localhost/")


def test_one_scheme_table_for_destinations_and_worker_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each scheme's destination class, and its worker source's, which publishes through it."""
    from walex.workers import consumer_from_url
    from walex.workers.base import Consumer

    for scheme in SCHEMES.values():
        destination = load_class("walex.destinations", scheme, scheme.destination, "test")
        assert issubclass(destination, Destination)
        if scheme.consumer is not None:
            consumer = load_class("walex.workers", scheme, scheme.consumer, "test")
            # the destination class itself, or its worker-side variant (which creates nothing)
            assert issubclass(consumer, Consumer) and issubclass(consumer.destination_class,
                                                                 destination)
    monkeypatch.setitem(sys.modules, "aio_pika", None)  # as if aio-pika were not installed
    for module in ("walex.destinations.rabbitmq", "walex.workers.rabbitmq"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ConfigError, match=r"worker source amqp://127.0.0.1/\?exchange=x needs the "
                                          r"aio-pika client.*pip install 'walex\[rabbitmq\]'"):
        consumer_from_url("amqp://127.0.0.1/?exchange=x")


def test_destinations_cannot_change_at_runtime() -> None:
    app = WalEx("postgresql://u@h/db", publication="p", destinations=[REDIS], partitions=4)
    assert isinstance(app.destinations, Destinations) and app.destinations.partitions == 4
    with pytest.raises(ConfigError, match="destinations cannot change"):
        app.config.replace("destinations", [])
    assert not WalEx("postgresql://u@h/db", publication="p").destinations  # none: no publishing
