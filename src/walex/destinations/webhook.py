"""Webhooks: ``https://host/path?secret_env=NAME`` (``http://`` too, meant for local use).

One POST per transaction batch and table, whose body is a JSON array of the
table's CloudEvents in order (``Content-Type:
application/cloudevents-batch+json``, the CloudEvents HTTP batch mode),
signed the Standard Webhooks way:

- ``webhook-id``: the ``event.id`` of the first event in the request, the same
  on every retry and replay; under a window above 1 (whose groups depend on
  timing) ``<first id>_<last id>`` for a request of several events;
- ``webhook-timestamp``: Unix seconds of this attempt;
- ``webhook-signature``: ``v1,<base64 HMAC-SHA256 of "id.timestamp.body">``,
  one per secret, separated by spaces.

The secrets come from the environment variable ``secret_env`` names, never
from the URL: Standard Webhooks secrets (``whsec_`` followed by base64), several
separated by spaces or commas while one is rotated out. A 2xx answer makes the
events durable. 429, 408, 5xx, a timeout or a lost connection is retried with
backoff (honouring ``Retry-After``, in seconds or an HTTP date), forever, acknowledging nothing
meanwhile; requests of the batch that already succeeded are not sent again.
Any other answer, redirects included (they are not followed), is a
:class:`~walex.errors.DestinationError`, settled by the app's ``on_error``
(``"stop"``, the default: the app stops without acknowledging).

Parameters (taken out of the URL before it is called; any other query
parameter goes to the receiver): ``secret_env`` (required), ``timeout``
(seconds a whole request may take, connecting, sending and reading the
answer included, default 10). The URL may use the templates
(``https://hooks.example.com/{schema}/{table}``), each name percent-encoded.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import logging
import os
import re
import ssl
import time
from bisect import bisect_right
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from itertools import accumulate, count
from operator import add, itemgetter
from urllib.parse import quote, urlencode

import httpx

from ..errors import ConfigError, DestinationError
from ..event import WALEX_VERSION
from .base import Destination, DestinationURL, Outgoing, Template, Unavailable

__all__ = ["WebhookDestination", "sign"]

log = logging.getLogger("walex.destinations")

_LOCAL = ("localhost", "127.0.0.1", "::1")
_RETRIED = {408, 425, 429}


class _RedactURLs(logging.Filter):
    """Shows the URLs httpx logs (``HTTP Request: POST <url> ...``) as walex shows them:
    a token in a webhook's path or query stays out of the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and any(isinstance(arg, httpx.URL) for arg in args):
            record.args = tuple(_shown(arg) if isinstance(arg, httpx.URL) else arg for arg in args)
        return True


def _shown(url: httpx.URL) -> str:
    try:
        return DestinationURL(str(url)).display
    except ConfigError:
        return f"{url.scheme}://{url.host}/***"


_REDACT_URLS = _RedactURLs()


def _segment(name: str) -> str:
    return quote(name, safe="")


def _secrets(url: DestinationURL, variable: str) -> list[bytes]:
    raw = os.environ.get(variable)
    if not raw or not raw.strip():
        raise ConfigError(f"destination {url.display}: the environment variable {variable} "
                          "(secret_env) is not set; put the webhook signing secret in it "
                          "(whsec_ followed by base64)")
    keys = []
    for part in re.split(r"[\s,]+", raw.strip()):
        text = part.removeprefix("whsec_")
        try:
            key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except ValueError:
            key = b""
        if not key:
            raise ConfigError(f"destination {url.display}: a secret in {variable} is not base64; "
                              "a Standard Webhooks secret is whsec_ followed by base64")
        keys.append(key)
    return keys


def sign(keys: list[bytes], message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header: one ``v1,<signature>`` per key (of
    ``id.timestamp.body``, the body hashed where it is, not copied)."""
    prefix = f"{message_id}.{timestamp}.".encode()
    signatures = []
    for key in keys:
        mac = hmac.new(key, prefix, hashlib.sha256)
        mac.update(body)
        signatures.append("v1," + base64.b64encode(mac.digest()).decode())
    return " ".join(signatures)


def _retry_after(response: httpx.Response) -> float | None:
    """The seconds ``Retry-After`` asks to wait: a number of seconds or an HTTP date."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None  # neither: the usual backoff applies
    if when.tzinfo is None:  # (-0000: UTC)
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds())


_SOURCE = itemgetter(Outgoing._fields.index("source"))  # item.source, in C
_BODY = itemgetter(Outgoing._fields.index("body"))


def _request_id(items: list[Outgoing], ranged: bool) -> str:
    if ranged and len(items) > 1:
        return f"{items[0].id}_{items[-1].id}"
    return items[0].id


class WebhookDestination(Destination):
    scheme = "https"
    extra = "webhooks"
    accepted = ("secret_env", "timeout")
    group_events = 1000  # most events per request
    # the most bytes of a request's body, the JSON array's brackets and commas included (one
    # event alone may exceed it): 1 MiB, the default limit of nginx (client_max_body_size 1m)
    group_bytes = 1024 * 1024

    def __init__(self, url: DestinationURL, partitions: int = 1) -> None:
        super().__init__(url, partitions)
        variable = url.require("secret_env", "secret_env=WALEX_WEBHOOK_SECRET")
        self.timeout = url.take_float("timeout", 10.0, minimum=0.01)
        self.keys = _secrets(url, variable)
        netloc = url.raw.split("//", 1)[1].split("/", 1)[0].split("?", 1)[0]
        query = f"?{urlencode(url.params)}" if url.params else ""
        self.target = Template(f"{url.scheme}://{netloc}{url.path}{query}", "url", url.display,
                               _segment)
        self.client: httpx.AsyncClient | None = None
        self._batch: str | None = None  # the first id of the batch being published
        self._delivered: set[str] = set()  # its requests already answered 2xx
        self.grouped = False  # set by a window above 1: requests carry range ids
        self._tls: ssl.SSLContext | None = None
        # a URL of at most {schema} and {table} is the same for every event of a table:
        # events are grouped by their source (one str per table) and the URL made once
        self._per_table = set(self.target.fields) <= {"schema", "table"}
        self.requests = 0

    async def open(self) -> None:
        client_log = logging.getLogger("httpx")
        if _REDACT_URLS not in client_log.filters:
            client_log.addFilter(_REDACT_URLS)
        if self.url.scheme == "http" and self.url.host not in _LOCAL and not self.requests:
            log.warning("destination %s sends events unencrypted over http://; use https:// "
                        "beyond this machine", self.display)
        if self._tls is None:  # made once: loading the CA certificates takes ~90 ms
            # http:// never speaks TLS (redirects are not followed): a bare context, verifying
            # everything and trusting nothing, instead of the certificates httpx would load
            self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT) if self.url.scheme == "http" \
                else httpx.create_ssl_context()
        self.client = httpx.AsyncClient(  # (timeout bounds each request whole, in _post)
            timeout=self.timeout + 1, follow_redirects=False, verify=self._tls,
            headers={"user-agent": f"walex/{WALEX_VERSION}"},
        )
        self.opened = True

    def _requests(self, batch: list[Outgoing]) -> Iterator[tuple[str, str, list[Outgoing]]]:
        """(url, webhook-id, events) per table (and rendered URL), in the order of first
        appearance, at most ``group_events`` events and ``group_bytes`` bytes of body (the
        JSON array, brackets and commas included) per request, but for one event alone.

        The id is the first event's; a request of a window's group (which may hold
        the events of several transactions, grouped as they came) carries
        ``<first id>_<last id>`` when it holds more than one event, so the same id
        always means the same events, however a replay groups them."""
        render = self.target.render
        most_events, most_bytes, ranged = self.group_events, self.group_bytes, self.grouped
        tables: list[tuple[str, list[Outgoing]]]
        if self._per_table:
            first = batch[0].source
            if batch[-1].source is first and all(map(first.__eq__, map(_SOURCE, batch))):
                # one table (a window's group of one table's transactions): no dict, and
                # one request when within the bounds (a lane's group is, but for one
                # transaction larger than them), the sizes summed in C
                if len(batch) <= most_events and \
                        sum(map(len, map(_BODY, batch))) + len(batch) + 1 <= most_bytes:
                    yield render(batch[0]), _request_id(batch, ranged), batch
                    return
                tables = [(render(batch[0]), batch)]
            else:
                by_source: dict[str, list[Outgoing]] = {}
                for item in batch:
                    items = by_source.get(item.source)
                    if items is None:
                        items = by_source[item.source] = []
                    items.append(item)
                tables = [(render(items[0]), items) for items in by_source.values()]
        else:
            groups: dict[tuple[str, str, str], list[Outgoing]] = {}
            for item in batch:
                groups.setdefault((render(item), item.schema, item.table), []).append(item)
            tables = [(target, items) for (target, _s, _t), items in groups.items()]
        for target, items in tables:
            # ends[k]: the bytes of items[:k] in a body, each event with its "," or "]"
            # (summed in C: no Python step per event); a request from ``start`` takes the
            # events while "[" and theirs fit in most_bytes, at most most_events, one at least
            ends = list(map(add, accumulate(map(len, map(_BODY, items)), initial=0), count()))
            start, total = 0, len(items)
            while start < total:
                stop = min(total, start + most_events,
                           max(start + 1, bisect_right(ends, ends[start] + most_bytes - 1) - 1))
                yield target, _request_id(items[start:stop], ranged), items[start:stop]
                start = stop

    async def publish(self, batch: list[Outgoing]) -> None:
        client = self.client
        if client is None:
            raise Unavailable("not connected")
        if batch[0].id != self._batch:
            self._batch, self._delivered = batch[0].id, set()
        for target, message_id, items in self._requests(batch):
            if message_id in self._delivered:
                continue
            await self._post(client, target, message_id, items)
            self._delivered.add(message_id)
        self._batch = None  # all done: a later publish of these events sends them again

    async def _post(self, client: httpx.AsyncClient, target: str, message_id: str,
                    items: list[Outgoing]) -> None:
        # the JSON array in one copy of the bodies: the brackets go on the first and last
        # body (small copies) rather than around the joined request (two copies of up
        # to group_bytes, callgrind: ~1.2k instructions a row)
        bodies = list(map(_BODY, items))
        bodies[0] = b"[" + bodies[0]
        bodies[-1] += b"]"
        body = b",".join(bodies)
        timestamp = int(time.time())
        headers = {
            "content-type": "application/cloudevents-batch+json",
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self.keys, message_id, timestamp, body),
        }
        self.requests += 1
        try:
            # httpx's timeout bounds each read, not the request: an endpoint that drips its
            # answer a byte at a time would hold the batch for ever; this bounds all of it
            async with asyncio.timeout(self.timeout):
                response = await client.post(target, content=body, headers=headers)
        except TimeoutError:
            raise Unavailable(f"request {message_id} was not answered within "
                              f"timeout={self.timeout:g}s") from None
        except httpx.HTTPError as exc:
            raise self.unavailable(f"request {message_id} failed", exc) from None
        status = response.status_code
        if 200 <= status < 300:
            return
        if status in _RETRIED or status >= 500:
            raise Unavailable(f"the endpoint answered {status} to request {message_id}",
                              retry_after=_retry_after(response))
        if 300 <= status < 400:
            location = self.url.scrub(response.headers.get("location", "?"))
            raise DestinationError(
                f"destination {self.display} answered {status} (redirect to {location}); "
                "walex does not follow redirects: put the final URL in the destination"
            )
        if status == 413:  # over the receiver's body limit: that request is never taken
            raise DestinationError(
                f"destination {self.display} refused request {message_id} of {len(body)} bytes "
                f"({len(items)} event{'s' if len(items) > 1 else ''}) as too large (413): raise "
                "the receiver's body limit (nginx: client_max_body_size, 1m by default) above "
                "the largest event, or leave the large column out of the publication"
            )
        detail = self.url.scrub(response.text[:200].strip())
        raise DestinationError(
            f"destination {self.display} refused request {message_id} with {status}"
            f"{': ' + detail if detail else ''}. Fix the endpoint; under on_error=\"stop\" "
            "nothing was acknowledged and walex resumes from this transaction when restarted"
        )

    async def close(self) -> None:
        client, self.client = self.client, None
        self.opened = False
        if client is not None:
            try:
                await client.aclose()
            except Exception as exc:  # pragma: no cover - closing never fails in practice
                log.debug("closing the HTTP client of %s: %s", self.display, self.describe(exc))
