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
