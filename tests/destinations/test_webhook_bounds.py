"""Webhook bounds: a request body within ``group_bytes`` (1 MiB), ``Retry-After`` honoured.

A receiver behind nginx refuses bodies over its ``client_max_body_size``
(1 MiB by default) with 413, a refusal that stops the app. walex counted
only the events' bytes against its 1 MiB bound, not the JSON array's ``[``,
``]`` and the comma between events: a batch of events just under 1 MiB in
all went out as one body of 1 MiB plus a byte per event, and was refused.
A ``Retry-After`` given as an HTTP date (RFC 9110 allows both forms) was
ignored: the retry came after the usual backoff, a fraction of a second. One
event over the receiver's limit is a refusal whose message names the limit.
"""

from __future__ import annotations

import base64
import json
import time

import pytest
from support import run

from walex.destinations import from_url
from walex.destinations.base import Outgoing

from .receiver import Receiver

SECRET = "whsec_" + base64.b64encode(b"walex bounds secret").decode()
MIB = 1024 * 1024


def event(i: int, size: int) -> Outgoing:
    """An event whose JSON body is ``size`` bytes."""
    head = b'{"id":"%d","x":"' % i
    body = head + b"x" * (size - len(head) - 2) + b'"}'
    return Outgoing(str(i), "public", "a", "insert", 0, body, "/db/public/a", "t", "public.a", None)


@pytest.mark.parametrize("sizes", [[1048] * 1000, [1100] * 1500], ids=["whole", "cut"])
def test_every_request_fits_a_1_mib_receiver(monkeypatch: pytest.MonkeyPatch,
                                             sizes: list[int]) -> None:
    monkeypatch.setenv("WALEX_TEST_WEBHOOK_SECRET", SECRET)
    batch = [event(i, size) for i, size in enumerate(sizes)]
    # "whole": group_events events within the bound counted without the separators, so
    # one request; "cut": cut where the events alone reach the bound

    async def main(hook: Receiver) -> None:
        d = from_url(hook.url("/in"))
        await d.open()
        try:
            await d.publish(batch)
        finally:
            await d.close()

    with Receiver(max_body=MIB) as hook:
        run(main(hook), timeout=30)
    assert all(len(body) <= MIB for _p, _h, body, _s in hook.requests)
    ids = [e["id"] for _p, _h, body, _s in hook.accepted() for e in json.loads(body)]
    assert ids == [item.id for item in batch]


@pytest.mark.parametrize("form", ["seconds", "date"])
def test_retry_after_in_seconds_or_as_an_http_date_is_honoured(monkeypatch: pytest.MonkeyPatch,
                                                               form: str) -> None:
    """``Retry-After`` is a number of seconds or an HTTP date (RFC 9110): a date 30 s
    ahead asks for about 30 s, not the usual backoff of a fraction of a second."""
    from email.utils import formatdate

    from walex.destinations.base import Unavailable

    monkeypatch.setenv("WALEX_TEST_WEBHOOK_SECRET", SECRET)
    value = "30" if form == "seconds" else formatdate(time.time() + 30, usegmt=True)

    async def main(hook: Receiver) -> Unavailable:
        d = from_url(hook.url("/in"))
        await d.open()
        try:
            with pytest.raises(Unavailable) as info:
                await d.publish([event(1, 100)])
            return info.value
        finally:
            await d.close()

    with Receiver() as hook:
        hook.script([(503, {"retry-after": value})])
        refused = run(main(hook), timeout=30)
    assert refused.retry_after is not None and 28 <= refused.retry_after <= 31, refused.retry_after


def test_an_event_over_the_receivers_limit_is_a_refusal_naming_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One event larger than the receiver takes goes alone, and the 413 names the limit."""
    from walex import DestinationError

    monkeypatch.setenv("WALEX_TEST_WEBHOOK_SECRET", SECRET)

    async def main(hook: Receiver) -> None:
        d = from_url(hook.url("/in"))
        await d.open()
        try:
            with pytest.raises(DestinationError, match="client_max_body_size") as info:
                await d.publish([event(1, 100), event(2, MIB + 10)])
            assert f"{MIB + 12} bytes (1 event)" in str(info.value)
        finally:
            await d.close()

    with Receiver(max_body=MIB) as hook:
        run(main(hook), timeout=30)
    assert [s for _p, _h, _b, s in hook.requests] == [200, 413]
