"""Redis Streams: ``redis://[user:pass@]host:port/db?stream=walex:{schema}.{table}&maxlen=N``.

Each event is one ``XADD`` entry with the fields ``id`` (``event.id``) and
``event`` (the CloudEvent JSON), to the stream its template names. A batch
(with a window, the batches of several transactions) goes in one pipeline,
without ``MULTI``: one round trip; it counts as durable when every ``XADD``
was answered, and a batch cut short is published again whole. Redis
acknowledges a write before it reaches the disk unless the server runs with
``appendonly yes`` and ``appendfsync always``: that setting decides what a
crash of Redis itself can lose.

Redis keeps no message ids: after a walex crash the last batches may be
added again (with the same ``id`` field), and a consumer drops them by id.
Parameters: ``stream`` (required; ``{schema}``, ``{table}``, ``{type}``,
``{partition}``), ``maxlen`` (trims each stream to about N entries,
``MAXLEN ~``), ``timeout`` (seconds, default 10). ``rediss://`` uses TLS.
"""

from __future__ import annotations

import logging
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    NoPermissionError,
    RedisError,
    ResponseError,
)

from ..errors import ConfigError, DestinationError
from .base import Destination, DestinationURL, Template, Unavailable
from .encoding import Outgoing

__all__ = ["RedisDestination"]

log = logging.getLogger("walex.destinations")


class RedisDestination(Destination):
    scheme = "redis"
    extra = "redis"
    accepted = ("stream", "maxlen", "timeout")

    def __init__(self, url: DestinationURL, partitions: int = 1) -> None:
        super().__init__(url, partitions)
        self.stream = Template(url.require("stream", "stream=walex:{schema}.{table}"),
                               "stream", url.display)
        self.maxlen = url.take_int("maxlen", None, minimum=1)
        self.timeout = url.take_float("timeout", 10.0, minimum=0.01)
        url.no_more_params(self.accepted)
        db = url.path.strip("/") or "0"
        if not db.isdigit():
            raise ConfigError(f"destination {url.display}: the path names the database by its "
                              f"number (redis://host:6379/0), not {db!r}")
        self.db = int(db)
        self.client: Any = None

    async def open(self) -> None:
        url = self.url
        self.client = aioredis.Redis(
            host=url.host or "127.0.0.1", port=url.port or 6379, db=self.db,
            username=url.username, password=url.password, ssl=url.scheme == "rediss",
            socket_timeout=self.timeout, socket_connect_timeout=self.timeout,
            retry=Retry(NoBackoff(), 0), client_name="walex",
        )
        try:
            await self.client.ping()
        except NoPermissionError as exc:  # logged in, but PING or CLIENT SETNAME not allowed
            await self.close()
            raise self.misconfigured(
                f"Redis refused a command to the URL's user ({self.describe(exc)})",
                "allow the user PING, CLIENT, MULTI, EXEC and XADD on the stream keys (ACL "
                "SETUSER USER +ping +client +multi +exec +xadd ~KEYS), or give a user that may",
            ) from None
        except (AuthenticationError, AuthenticationWrongNumberOfArgsError) as exc:
            await self.close()
            given = "a password" if url.password else "no password"
            raise self.misconfigured(
                f"Redis refused the login with {given} ({self.describe(exc)})",
                "put the user and password Redis accepts (requirepass, or an ACL user allowed "
                "PING and XADD) in the URL: redis://[USER]:PASSWORD@host:6379/0",
            ) from None
        except ResponseError as exc:
            await self.close()
            if "AUTH" not in str(exc):
                raise self.unavailable("cannot connect", exc) from None
            raise self.misconfigured(
                f"Redis refused the login ({self.describe(exc)})",
                "the server has no password set: remove it from the URL, or set one "
                "(requirepass or an ACL user)",
            ) from None
        except Exception as exc:
            await self.close()
            raise self.unavailable("cannot connect", exc) from None
        self.opened = True

    async def publish(self, batch: list[Outgoing]) -> None:
        client = self.client
        if client is None:
            raise Unavailable("not connected")
        render, maxlen = self.stream.render, self.maxlen
        # one round trip, no MULTI/EXEC: Redis answers each XADD (half the replies of a
        # transaction's QUEUED + EXEC); a batch cut short is published again, same ids
        pipe = client.pipeline(transaction=False)
        for item in batch:
            pipe.xadd(render(item), {"id": item.id, "event": item.body}, maxlen=maxlen,
                      approximate=True)
        try:
            await pipe.execute()
        except NoPermissionError as exc:  # an ACL user without MULTI, EXEC or XADD
            raise self.misconfigured(
                f"Redis refused a command to the URL's user ({self.describe(exc)})",
                "allow the user MULTI, EXEC and XADD on the stream keys (ACL SETUSER USER "
                "+multi +exec +xadd ~KEYS), or give a user that may",
            ) from None
        except ResponseError as exc:
            if "WRONGTYPE" in str(exc):
                raise DestinationError(
                    f"destination {self.display}: a stream key holds another type of value "
                    f"({self.describe(exc)}); give the stream template other names"
                ) from None
            raise self.unavailable("Redis refused the batch", exc) from None
        except (RedisError, OSError) as exc:
            raise self.unavailable("the batch was not confirmed", exc) from None

    async def close(self) -> None:
        client, self.client = self.client, None
        self.opened = False
        if client is not None:
            try:
                await client.aclose()
            except Exception as exc:  # closing a broken connection
                log.debug("closing redis connection to %s: %s", self.display, self.describe(exc))
