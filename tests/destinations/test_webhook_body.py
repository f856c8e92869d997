"""The body of a webhook request: the JSON array of its events' bodies, byte for byte.

walex puts the brackets on the first and last body and joins once (one copy of the
request's bytes, not three); whatever the number of events, the receiver gets exactly
``[body,body,...]``, signed, the events' own bodies left as they were, and a request sent
again (after a 500) carries the same bytes under the same id.
"""

from __future__ import annotations

import base64

import pytest
from standardwebhooks.webhooks import Webhook
from support import run

from walex.destinations import from_url
from walex.destinations.base import Unavailable
from walex.destinations.encoding import Outgoing

from .receiver import Receiver

SECRET = "whsec_" + base64.b64encode(b"walex body test").decode()


def _items(count: int) -> list[Outgoing]:
    return [Outgoing(f"e{i}", "public", "t", "insert", 0,
                     b'{"id":"e%d","d":"%s"}' % (i, b"\xc3\xa9" * i), "/db/public/t",
                     "2026-12-07T00:00:00Z", f"public.t/{i}", str(i))
            for i in range(count)]


@pytest.mark.parametrize("count", [1, 2, 3, 50])
def test_the_body_is_the_array_of_the_events_bodies(count: int,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WALEX_TEST_WEBHOOK_BODY_SECRET", SECRET)
    batch = _items(count)
    bodies = [item.body for item in batch]
    expected = b"[" + b",".join(bodies) + b"]"

    async def main(hook: Receiver) -> None:
        destination = from_url(hook.url("/in", "secret_env=WALEX_TEST_WEBHOOK_BODY_SECRET"))
        await destination.open()
        try:
            hook.script([500])  # the first attempt refused: sent again, the same bytes
            with pytest.raises(Unavailable):
                await destination.publish(batch)
            await destination.publish(batch)
        finally:
            await destination.close()

    with Receiver() as hook:
        run(main(hook))
    assert [item.body for item in batch] == bodies  # the events' bodies untouched
    assert [body for _p, _h, body, _s in hook.requests] == [expected, expected]
    ids = set()
    for _path, headers, body, _status in hook.requests:
        Webhook(SECRET).verify(body, headers)
        ids.add(headers["webhook-id"])
    assert len(ids) == 1


def _cut(sizes: list[int], most_events: int, most_bytes: int) -> list[int]:
    """The rule, one event at a time: the number of events of each request."""
    out, n, size = [], 0, 1  # "[", then each event with its "," or "]"
    for length in sizes:
        if n and (n >= most_events or size + length + 1 > most_bytes):
            out.append(n)
            n, size = 0, 1
        n += 1
        size += length + 1
    return out + [n] if n else out


def test_requests_are_cut_by_the_rule_for_any_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A group larger than the bounds is cut where the rule says (at most ``group_events``
    events, ``[``, the bodies and their separators within ``group_bytes``, one event alone
    whatever its size), for random sizes and bounds, bodies exactly at the limit included."""
    import random

    monkeypatch.setenv("WALEX_TEST_WEBHOOK_BODY_SECRET", SECRET)
    d = from_url("http://127.0.0.1:9/in/{table}?secret_env=WALEX_TEST_WEBHOOK_BODY_SECRET")
    rng = random.Random(7)
    for _ in range(300):
        sizes = [rng.choice([0, 1, 5, 30, 99, 100, 101, 400]) for _ in range(rng.randint(1, 60))]
        d.group_events = rng.choice([1, 2, 3, 7, 1000])
        d.group_bytes = rng.choice([1, 2, 50, 101, 102, 103, 250, 10_000])
        items = [Outgoing(f"e{i}", "public", "t", "insert", 0, b"x" * size, "/db/public/t",
                          "t", "public.t", None) for i, size in enumerate(sizes)]
        got = [len(part) for _url, _id, part in d._requests(items)]
        assert got == _cut(sizes, d.group_events, d.group_bytes), (sizes, d.group_events,
                                                                   d.group_bytes)
        for _url, rid, part in d._requests(items):
            body = b"[" + b",".join(o.body for o in part) + b"]"
            assert len(part) == 1 or (len(part) <= d.group_events
                                      and len(body) <= d.group_bytes)
            assert rid == part[0].id
