"""Webhook destination, against a local HTTP server; signatures checked with standardwebhooks."""

from __future__ import annotations

import base64
import json
import logging
import os

import psycopg
import pytest
from standardwebhooks.webhooks import Webhook
from support import collecting, run, until

from walex import ConfigError, DestinationError, Event, Events, WalEx
from walex.lsn import parse_lsn

from .brokers import check_stream
from .receiver import Receiver
from .test_nats import TABLES, workload

SECRET = "whsec_" + base64.b64encode(b"walex test secret 1").decode()
OLD_SECRET = "whsec_" + base64.b64encode(b"walex test secret 0").decode()


@pytest.fixture(autouse=True)
def secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WALEX_TEST_WEBHOOK_SECRET", f"{SECRET} {OLD_SECRET}")


def received(hook: Receiver) -> list[tuple[str, dict, object]]:
    """Events of the accepted requests, verified, once per webhook-id, in order."""
    seen, out = set(), []
    for _path, headers, body, _status in hook.accepted():
        for secret in (SECRET, OLD_SECRET):  # every secret of the rotation signs it
            Webhook(secret).verify(body, headers)
        if headers["webhook-id"] in seen:
            continue
        seen.add(headers["webhook-id"])
        events = json.loads(body)
        assert isinstance(events, list) and headers["webhook-id"] == events[0]["id"]
        assert headers["content-type"] == "application/cloudevents-batch+json"
        assert len({e["source"] for e in events}) == 1  # one table per request
        out.extend((e["id"], e, headers["webhook-id"]) for e in events)
    return out


def test_one_signed_request_per_transaction_and_table(admin: psycopg.Connection, dsn: str) -> None:
    admin.execute(TABLES)

    async def main() -> tuple[list[Event], Receiver]:
        with Receiver() as hook:
            url = hook.url("/in/{table}", "secret_env=WALEX_TEST_WEBHOOK_SECRET&team=a")
            # destination_window=1: one transaction per publish (a window groups them)
            async with collecting(dsn, destinations=[url], batch_size=7,
                                  destination_window=1) as rec:
                n = workload(admin)
                events = await rec.wait_for(n)
                await rec._until(lambda: rec.app.transactions_handled >= 5, 30, "five transactions")
            return events, hook

    events, hook = run(main())
    stored = received(hook)
    check_stream(stored, [e.id for e in events])
    paths = [path for path, _h, _b, _s in hook.requests]
    # 20 inserts in batches of 7; two inserts; the update of both tables; the deletes; the truncate
    a, bc = "/in/a?team=a", "/in/b.c?team=a"
    assert paths == [a, a, a, bc, a, bc, a, bc]
    assert all(h["user-agent"].startswith("walex/") for _p, h, _b, _s in hook.requests)


def test_retries_on_5xx_429_and_timeouts_then_delivers(admin: psycopg.Connection, dsn: str,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    admin.execute(TABLES)

    async def main() -> tuple[list[Event], Receiver]:
        with Receiver() as hook:
            hook.script([500, (429, {"retry-after": "1"}), ("hang", 2), 503])
            url = hook.url(query="secret_env=WALEX_TEST_WEBHOOK_SECRET&timeout=0.5")
            async with collecting(dsn, destinations=[url], destination_window=1) as rec:
                app = rec.app
                admin.execute("INSERT INTO a VALUES (1, 1), (2, 2)")
                admin.execute("INSERT INTO a VALUES (3, 3)")
                first = await rec.wait_for(2)  # the handler has the first transaction
                await rec._until(lambda: app.destinations.retries >= 2, 30, "two retries")
                assert app.transactions_handled == 0 and app.ack.flushed < parse_lsn(first[0].lsn)
                await rec._until(lambda: app.transactions_handled == 2, 60, "both transactions")
                events = await rec.wait_for(3)
            return events, hook

    with caplog.at_level(logging.WARNING, logger="walex.destinations"):
        events, hook = run(main())
    check_stream(received(hook), [e.id for e in events])
    statuses = [s for _p, _h, _b, s in hook.requests]
    assert statuses[:2] == [500, 429] and 503 in statuses and statuses[-1] == 200
    ids = [h["webhook-id"] for _p, h, _b, _s in hook.requests]
    assert set(ids) == {events[0].id, events[2].id}  # a retry carries the same webhook-id
    assert "answered 500" in caplog.text and "answered 429" in caplog.text
    assert "was not answered within timeout=0.5s" in caplog.text  # the hang, cut off


@pytest.mark.parametrize("answer, message", [
    (410, "refused request .* with 410"),
    ((302, {"location": "https://elsewhere.example/x"}), "does not follow redirects"),
])
def test_a_refusal_stops_the_app_unacknowledged(admin: psycopg.Connection, dsn: str,
                                                answer: object, message: str) -> None:
    admin.execute(TABLES)

    async def main() -> None:
        with Receiver() as hook:
            hook.script([answer])
            with pytest.raises(DestinationError, match=message):
                async with collecting(dsn, destinations=[hook.url()]) as rec:
                    admin.execute("INSERT INTO a VALUES (1, 1)")
                    [event] = await rec.wait_for(1)
                    await rec._until(lambda: False, 15, "the app to stop")
            assert rec.app is not None and rec.app.transactions_handled == 0
            assert rec.app.ack.flushed < parse_lsn(event.lsn)

    run(main())


@pytest.mark.parametrize("policy", ["skip", "dead_letter"])
def test_a_refusal_follows_on_error_when_it_is_not_stop(admin: psycopg.Connection, dsn: str,
                                                        policy: str) -> None:
    admin.execute(TABLES)
    dead: list[tuple[list[str], BaseException]] = []

    def dead_letter(events: list[Event], exc: BaseException) -> None:
        dead.append(([e.id for e in events], exc))

    async def main() -> tuple[list[Event], Receiver]:
        with Receiver() as hook:
            hook.script([410])  # the first request is refused for good, the next accepted
            on_error = "skip" if policy == "skip" else dead_letter
            async with collecting(dsn, destinations=[hook.url()], on_error=on_error,
                                  destination_window=1) as rec:
                app = rec.app
                admin.execute("INSERT INTO a VALUES (1, 1)")
                admin.execute("INSERT INTO a VALUES (2, 2)")
                events = await rec.wait_for(2)
                await rec._until(lambda: app.transactions_handled == 2, 30, "both transactions")
                await rec._until(lambda: app.ack.flushed > parse_lsn(events[1].lsn), 30,
                                 "the second acknowledged")
                assert app.destinations.refusals == 1 and app.dispatcher.failures == 1
            return events, hook

    events, hook = run(main())
    assert [s for _p, _h, _b, s in hook.requests] == [410, 200]  # not retried
    assert [e for e, _event, _id in received(hook)] == [events[1].id]
    if policy == "dead_letter":
        [(ids, exc)] = dead
        assert ids == [events[0].id] and isinstance(exc, DestinationError)
        assert "410" in str(exc)


def test_secret_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    def make(url: str) -> None:
        WalEx("postgresql://u@h/db", publication="p", destinations=[url])

    with pytest.raises(ConfigError, match="needs the parameter secret_env"):
        make("https://hooks.example.com/x")
    with pytest.raises(ConfigError, match="MISSING_SECRET .*is not set"):
        make("https://hooks.example.com/x?secret_env=MISSING_SECRET")
    monkeypatch.setenv("BAD_SECRET", "whsec_not*base64!")
    with pytest.raises(ConfigError, match="not base64") as info:
        make("https://hooks.example.com/x?secret_env=BAD_SECRET")
    assert "not*base64" not in str(info.value)
    with pytest.raises(ConfigError, match="uses {nope}"):
        make("https://hooks.example.com/{nope}?secret_env=WALEX_TEST_WEBHOOK_SECRET")
    app = WalEx("postgresql://u@h/db", publication="p",
                destinations=["https://hooks.example.com/x?secret_env=WALEX_TEST_WEBHOOK_SECRET"])
    assert os.environ["WALEX_TEST_WEBHOOK_SECRET"] not in repr(app.destinations)


def test_an_http_url_loads_no_certificates(monkeypatch: pytest.MonkeyPatch) -> None:
    """http:// never speaks TLS: opening it reads no CA file (loading certifi's took ~90 ms
    at each open), so a CA file that does not exist does not stop it; https:// reads it."""
    from walex.destinations import from_url
    from walex.destinations.encoding import Outgoing

    monkeypatch.setenv("SSL_CERT_FILE", "/nonexistent/walex-test-ca.pem")
    item = Outgoing("e1", "public", "t", "insert", 0, b'{"id":"e1"}', "/db/public/t",
                    "2024-01-01T00:00:00Z", "public.t/1", "1")

    async def main() -> Receiver:
        with Receiver() as hook:
            destination = from_url(hook.url("/in", "secret_env=WALEX_TEST_WEBHOOK_SECRET"))
            await destination.open()
            try:
                await destination.publish([item])
            finally:
                await destination.close()
            secure = from_url("https://127.0.0.1:9/in?secret_env=WALEX_TEST_WEBHOOK_SECRET")
            with pytest.raises(FileNotFoundError):
                await secure.open()
            return hook

    hook = run(main())
    assert [json.loads(body)[0]["id"] for _p, _h, body, _s in hook.accepted()] == ["e1"]


def test_a_group_is_cut_into_requests_per_table_and_bounds() -> None:
    """How a window's group becomes requests (WebhookDestination._requests): one per table,
    in order of first appearance, each within the bounds of events and bytes (one event
    alone may exceed them), with the range id of its first and last event; a group of one
    table within the bounds is one request of the whole group."""
    from walex.destinations import from_url
    from walex.destinations.encoding import Outgoing

    def item(i: int, table: str, body: bytes = b"{}") -> Outgoing:
        return Outgoing(f"id{i}", "public", table, "insert", 0, body, f"/db/public/{table}",
                        "t", f"public.{table}", None)

    d = from_url("http://127.0.0.1:9/in/{table}?secret_env=WALEX_TEST_WEBHOOK_SECRET")
    d.grouped = True

    def requests(batch: list[Outgoing]) -> list[tuple[str, str, list[str]]]:
        return [(url, rid, [o.id for o in items]) for url, rid, items in d._requests(batch)]

    a = [item(i, "a") for i in range(5)]
    assert requests(a) == [("http://127.0.0.1:9/in/a", "id0_id4", [o.id for o in a])]
    assert requests(a[:1]) == [("http://127.0.0.1:9/in/a", "id0", ["id0"])]
    mixed = [item(0, "a"), item(1, "b"), item(2, "a"), item(3, "b"), item(4, "a")]
    assert requests(mixed) == [("http://127.0.0.1:9/in/a", "id0_id4", ["id0", "id2", "id4"]),
                               ("http://127.0.0.1:9/in/b", "id1_id3", ["id1", "id3"])]
    d.group_events = 2  # (a class attribute, set on this instance only)
    assert [r[2] for r in requests(a)] == [["id0", "id1"], ["id2", "id3"], ["id4"]]
    assert [r[2] for r in requests(mixed)] == [["id0", "id2"], ["id4"], ["id1", "id3"]]
    d.group_events, d.group_bytes = 1000, 11  # "[xxxx,xxxx]": two of 4 bytes fit in 11
    sized = [item(0, "a", b"x" * 4), item(1, "a", b"x" * 4), item(2, "a", b"x" * 30),
             item(3, "a", b"x" * 2)]
    assert [r[1:] for r in requests(sized)] == [("id0_id1", ["id0", "id1"]), ("id2", ["id2"]),
                                                ("id3", ["id3"])]
    d.grouped = False  # a window of 1: the first event's id
    assert [r[1] for r in requests(sized)] == ["id0", "id2", "id3"]


def test_a_relay_alone_then_a_handler_registered_while_it_streams(
        admin: psycopg.Connection, dsn: str) -> None:
    """A relay with a window and no handler (the batches taken are done for the handlers at
    once: walex.windowed) publishes and acknowledges each transaction; a handler registered
    while it streams gets every transaction taken after that, each one acknowledged only
    once the handler returned and the endpoint confirmed it."""
    admin.execute(TABLES)
    module = Events()
    seen: list[tuple[int, int, int]] = []  # (id, commit LSN, position acknowledged when called)

    async def main() -> tuple[WalEx, Receiver]:
        with Receiver() as hook:
            app = WalEx(dsn, publication="pub", subscriptions=["*"], modules=[module],
                        name="walex_test_relay_alone", destinations=[hook.url()],
                        destination_window=64)
            async with app:
                for i in range(30):
                    admin.execute("INSERT INTO a VALUES (%s, 0)", (i,))
                await until(lambda: app.transactions_handled == 30, "30 transactions relayed", 30)
                assert app.pipeline.dispatcher.handlers == []

                @module.on_event("all")
                async def handler(events: list[Event]) -> None:
                    for e in events:
                        seen.append((e.new_record["id"], parse_lsn(e.lsn), app.ack.flushed))

                for i in range(30, 60):
                    admin.execute("INSERT INTO a VALUES (%s, 0)", (i,))
                await until(lambda: app.transactions_handled == 60, "60 transactions", 30)
                await until(lambda: app.ack.flushed >= app.ack.received, "all acknowledged", 30)
            return app, hook

    app, hook = run(main())
    assert [i for i, _c, _f in seen] == list(range(30, 60))
    assert all(flushed < commit for _i, commit, flushed in seen)  # none acknowledged before
    ids = [e["id"] for _u, _h, body, _s in hook.accepted() for e in json.loads(body)]
    assert len(set(ids)) == 60 and app.destinations.events_published == 60
