"""A secret in a destination or worker-source URL never reaches a log, an error or a metric.

The secrets: userinfo (a password, a NATS token), query values that are not
walex's own (a webhook receiver's token) and a webhook's path (Slack-style
URLs carry their token there). Against a real PostgreSQL, a local webhook
endpoint and the machine's NATS and RabbitMQ.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import urllib.request

import psycopg
import pytest
from support import collecting, run, until

from walex import ConfigError, DestinationError, Events
from walex.destinations import from_url
from walex.workers import Worker

from .conftest import require
from .receiver import Receiver

SECRET = "whsec_" + base64.b64encode(b"walex redaction secret").decode()
PATH_TOKEN = "T0PATHsecret81"
QUERY_TOKEN = "Q9querySECRET27"
PASSWORD = "UserPa55secret64"
SECRETS = (PATH_TOKEN, QUERY_TOKEN, PASSWORD)


def clean(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret} shown in: {text[:2000]}"


def test_webhook_tokens_stay_out_of_logs_errors_and_metrics(
        admin: psycopg.Connection, dsn: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("WALEX_TEST_REDACTION_SECRET", SECRET)
    admin.execute("CREATE TABLE a (id int PRIMARY KEY, v int)")
    admin.execute("CREATE PUBLICATION pub FOR ALL TABLES")
    texts: list[str] = []

    async def main() -> None:
        with Receiver() as hook:
            hook.script([500, 200, 410])  # a retry, a delivery, then a refusal for good
            url = hook.url(f"/services/{PATH_TOKEN}/hook",
                           f"token={QUERY_TOKEN}&secret_env=WALEX_TEST_REDACTION_SECRET")
            url = url.replace("http://", f"http://hook:{PASSWORD}@")
            shown = f"http://***@127.0.0.1:{hook.port}/***?token=***&secret_env=WALEX_TEST_REDACTION_SECRET"
            with pytest.raises(DestinationError) as info:
                async with collecting(dsn, destinations=[url], metrics_port=0,
                                      metrics_host="127.0.0.1") as rec:
                    app = rec.app
                    assert app is not None
                    texts.append(repr(app.destinations))
                    admin.execute("INSERT INTO a VALUES (1, 1)")
                    await until(lambda: len(hook.accepted()) == 1, "the first delivered",
                                timeout=30)
                    await until(lambda: app.transactions_handled == 1, "the first handled")
                    metrics = await asyncio.to_thread(
                        lambda: urllib.request.urlopen(
                            f"http://127.0.0.1:{app.observer.port}/metrics", timeout=10
                        ).read().decode())
                    texts.append(metrics)
                    assert shown in metrics  # the label: scheme, host, port, names
                    admin.execute("INSERT INTO a VALUES (2, 2)")
                    await rec._until(lambda: False, 30, "the refusal to stop the app")
            texts.append(str(info.value))
            assert shown in str(info.value)
            assert [p for p, _h, _b, _s in hook.requests][0].startswith(f"/services/{PATH_TOKEN}")

    with caplog.at_level(logging.DEBUG):
        run(main(), timeout=90)
    assert "HTTP Request: POST" in caplog.text  # httpx's own line, with the URL redacted
    assert "publishing the batch" in caplog.text  # walex's retry warning
    clean(caplog.text)
    for text in texts:
        clean(text)


def test_a_nats_token_and_an_amqp_password_stay_out_of_worker_logs_and_reprs(
        caplog: pytest.LogCaptureFixture, unique: str) -> None:
    """A worker source refused by the broker: its error, logs and repr show no secret."""
    nats_port = require("nats")
    amqp_port = require("rabbitmq")
    events = Events()
    events.on_event("a")(lambda items: None)
    nats_url = f"nats://{PASSWORD}@127.0.0.1:{nats_port}?stream=WX_{unique}"
    amqp_url = f"amqp://guest:{PASSWORD}@127.0.0.1:{amqp_port}/?exchange=wx{unique}"
    texts = [repr(from_url(nats_url)), from_url(nats_url).display, repr(from_url(amqp_url))]
    assert from_url(nats_url).display == f"nats://***@127.0.0.1:{nats_port}?stream=WX_{unique}"

    # a parameter that is not walex's: refused, its value not shown
    with pytest.raises(ConfigError, match="unknown parameter token") as info:
        Worker(f"{amqp_url}&token={QUERY_TOKEN}", [events])
    texts.append(str(info.value))

    async def main() -> None:
        worker = Worker(amqp_url, [events])
        texts.append(repr(worker))
        try:
            await worker.start()
        except Exception as exc:  # a wrong password: the ConfigError with the fix
            texts.append(str(exc))
        else:
            await worker.stop()
            pytest.fail("the worker started with a wrong password (and would retry forever)")

    with caplog.at_level(logging.DEBUG):
        run(main(), timeout=60)
    clean(caplog.text)
    for text in texts:
        clean(text)


def test_the_shown_parameters_are_walex_own() -> None:
    """Every parameter a destination or source takes is shown; SHOWN holds no other."""
    from walex.destinations import SCHEMES, load_class
    from walex.destinations.base import SHOWN

    taken: set[str] = {"partitions", "group", "window"}  # (window: any URL's, from_url's)
    for scheme in {s for s in SCHEMES.values() if s.module != "webhook"}:
        taken |= set(load_class("walex.destinations", scheme, scheme.destination, "t").accepted)
        if scheme.consumer:
            taken |= set(load_class("walex.workers", scheme, scheme.consumer, "t").accepted)
    assert taken == SHOWN
