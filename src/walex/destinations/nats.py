"""NATS JetStream: ``nats://[user:pass@]host:port?stream=NAME&subject=walex.{schema}.{table}``.

Each event is published to the subject its template gives, with the header
``Nats-Msg-Id`` = ``event.id``, and counts as durable when the stream's
PubAck arrived (the header ``Nats-Expected-Stream`` makes sure it is that
stream). The stream drops a message whose id it stored within its duplicate
window, so a replay after a crash stores nothing twice as long as walex is
back within the window.

When the stream does not exist, walex creates it (file storage, limits
retention) with the subjects ``<fixed prefix>.>`` of the template (``walex.>``
for ``walex.{schema}.{table}``) and a duplicate window of
``duplicate_window`` seconds (default 120, the server's default). An existing
stream is used as it is. Parameters: ``stream`` (required), ``subject``
(default ``walex.{schema}.{table}``, and ``walex.{schema}.{table}.{partition}``
when the app has ``partitions`` > 1, so workers can consume each partition),
``duplicate_window``, ``timeout``
(seconds to wait for the connection and for the acks of a batch, default
10), ``chain`` (default true; false: a PubAck per message, see below). A
schema or table name's ``.``, ``*``, ``>`` and white space become ``_`` in a
subject. ``tls://`` connects with TLS; a bare user name
(``nats://TOKEN@host``) is a token.

A PubAck error retrying cannot cure is a :class:`~walex.errors.DestinationError`
for the app's ``on_error``: an event over the server's ``max_payload``
(checked before the batch is sent), over the stream's ``max_msg_size``
(10054), a subject no stream takes (no responders while the stream exists
with other subjects) or another stream holds (10060). A full stream with
``discard=new`` (10077) is retried ``full_attempts`` times (8), then a
refusal too. Wrong credentials are a :class:`~walex.errors.ConfigError`.

The PubAcks come to one subscription of the connection (a reply subject
per message, :mod:`walex.destinations.pubacks`) and are counted there, with
no future or parsed PubAck per message; only an error is parsed. With a
checked nats-py, a plain PubAck is counted as the client's parser hands it
over, before the client builds a message of it for the subscription.

Once a PubAck showed the stream's last message (sequence and id: the last
message of a batch, when its PubAck is not a duplicate's), the next batch
is *chained* (:meth:`~walex.destinations.hpub.Frames.chained`): every
message names the message before it as the stream's last, and only the last
one asks for a PubAck, which at the expected sequence says the whole batch
is stored. Anything else (an error, a duplicate's PubAck, another sequence)
breaks the chain: the batch is published again with a PubAck per message,
and the next ``2**breaks - 1`` batches (at most 63) are not chained.

A window's lane may hand groups over *ahead* (:meth:`NatsDestination.send_ahead`,
:mod:`walex.destinations.window`): while the last group confirmed was a chain
that held, the next one goes chained on the predicted end of the one before it
(its base sequence plus its length, its last id), up to :attr:`depth` in
flight, each with its own answer (:meth:`~walex.destinations.pubacks.PubAcks.expect_one`)
and timer. Such a group is stored only if every group before it was stored
whole, and is never sent another way: any failure (a break, an error, a
timeout, the connection lost) voids the predicted end and what was sent on it
(:meth:`NatsDestination.landed`), and the lane publishes again from there, one
group at a time, the way above.

The frames of a batch are built by walex (:mod:`walex.destinations.hpub`,
half nats-py's CPU per message) and handed to the client's write buffer when
the installed nats-py is one whose internals that relies on were checked;
otherwise each message goes through ``Client.publish``. Both store the same
messages.

The client's own reconnection is off: a lost connection fails the batch,
which walex publishes again on a new connection (with backoff), so a
message is never left in a client buffer while the batch counts as done.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import ssl
import string
from typing import Any

import nats
from nats.js.api import StreamConfig
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError

from ..errors import ConfigError, DestinationError, WalExError
from .base import Destination, DestinationURL, Outgoing, Template, Unavailable
from .hpub import CHAINED_EXTRA, Frames, batch_sizes, usable
from .pubacks import EXPECTED_STREAM as _EXPECTED_STREAM
from .pubacks import PubAcks, stored_at

__all__ = ["NatsDestination"]

log = logging.getLogger("walex.destinations")

_WINDOW = 4096  # messages in flight at most (the client's async publish limit)
# (server, digest of the credentials) a server took from a connection of this process ->
# its refusals of them since: the first few are retried (a server reloading its
# authorization refuses valid users for a moment: seen when a reload raced a reconnect),
# then they are what a changed server's are, a ConfigError (whichever object connects)
_ACCEPTED: dict[tuple[str, str], int] = {}
_REFUSALS_RETRIED = 3


def _taken(server: str, credentials: dict[str, Any]) -> tuple[str, str]:
    return server, hashlib.sha256(repr(sorted(credentials.items())).encode()).hexdigest()
# JetStream's error codes of a PubAck that retrying at once cannot cure
_TOO_LARGE = 10054  # message size exceeds the stream's max_msg_size
_OTHER_STREAM = 10060  # the subject belongs to another stream than Nats-Expected-Stream
_STORE_FAILED = 10077  # the stream is full (max_msgs, max_bytes ...) with discard=new
# bytes of the headers besides the id and stream name (NATS/1.0, Nats-Msg-Id, Nats-Expected-Stream)
_HEADERS = 64
_MAX_MISSES = 6  # after chains that failed in a row, the next 1, 3 ... 63 batches go unchained
_SEQ_DIGITS = 20  # at most, of the Nats-Expected-Last-Sequence value (a uint64)
_STREAM_NAME = re.compile(r"^[^\s.*>/\\]+$")
_NOT_IN_TOKEN = re.compile(r"[\s.*>]")


_NOT_IN_SUBJECT = re.compile(r"[\s*>\x00-\x1f\x7f]")


def check_subject_template(template: str, where: str, fix: str) -> None:
    """A :class:`ConfigError` when the subject template's own text (what is not a field)
    holds a wildcard (``*``, ``>``), white space or a control character, or a token is
    empty: a relay would publish to subjects a worker cannot filter apart (JetStream
    stores ``walex.>`` as a literal subject) or that the server refuses at every attempt
    (``walex.{table} x``, ``walex.{table}.``); a worker's filters would take more than the
    relay's subjects, or drop what no subject can hold."""
    literal = "".join(text for text, _n, _s, _c in string.Formatter().parse(template))
    bad = _NOT_IN_SUBJECT.search(literal)
    what = repr(bad.group()) if bad is not None else "an empty token" \
        if "" in template.split(".") else None
    if what is not None:
        raise ConfigError(
            f"{where}: the subject template {template!r} holds {what}: a subject's tokens "
            "are fields ({schema}, {table}, {type}, {partition}) and fixed text, none empty, "
            f"without wildcards ('*', '>'), white space or control characters; {fix}, e.g. "
            "'walex.{schema}.{table}.{partition}'"
        )


def _token(name: str) -> str:
    return _NOT_IN_TOKEN.sub("_", name)


def _covers(pattern: str, subject: str) -> bool:
    """Whether a stream subject (``*`` one token, ``>`` the rest) takes ``subject``."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


class NatsDestination(Destination):
    scheme = "nats"
    extra = "nats"
    accepted = ("stream", "subject", "duplicate_window", "timeout", "chain")
    depth = 2  # chained groups a window's lane may have in flight (send_ahead)
    role, subject_fix = "destination", "give subject="  # what a bad subject template's error says

    def __init__(self, url: DestinationURL, partitions: int = 1) -> None:
        super().__init__(url, partitions)
        self.stream = url.require("stream", "stream=WALEX")
        if not _STREAM_NAME.match(self.stream):
            raise ConfigError(f"destination {url.display}: stream name {self.stream!r} may not "
                              "contain white space, '.', '*', '>', '/' or '\\'")
        default = "walex.{schema}.{table}" + (".{partition}" if partitions > 1 else "")
        template = url.take("subject") or default
        check_subject_template(template, f"{self.role} {url.display}", self.subject_fix)
        self.subject = Template(template, "subject", url.display, _token)
        prefix = self.subject.prefix
        if self.subject.constant:
            self.stream_subjects = [self.subject.text]
        elif prefix.endswith("."):  # its tokens checked above (none empty, no wildcard)
            self.stream_subjects = [prefix + ">"]
        else:
            raise ConfigError(
                f"destination {url.display}: subject template {self.subject.text!r} must start "
                "with fixed tokens, like 'walex.{schema}.{table}', so that walex can create "
                "the stream for the subjects 'walex.>'"
            )
        self.duplicate_window = url.take_float("duplicate_window", 120.0, minimum=0.001)
        self.timeout = url.take_float("timeout", 10.0, minimum=0.01)
        # chained batches (one PubAck each, see the module's docstring); False: a PubAck
        # per message always (chain=false)
        self.chained = url.take_bool("chain", True)
        url.no_more_params(self.accepted)
        self.server = f"{url.scheme}://{url.host or '127.0.0.1'}:{url.port or 4222}"
        self.nc: Any = None
        self.js: Any = None
        self._closed: asyncio.Event | None = None
        self._acks: PubAcks | None = None
        self._frames: Frames | None = None  # None: Client.publish (hpub.usable said no)
        self.duplicates = 0  # messages the stream recognised as already stored
        # chained batches (Frames.chained): the stream's last message as the last PubAck
        # showed it, (sequence, id); None while unknown (then a PubAck per message)
        self._last: tuple[int, str] | None = None
        # the base of a chain sent ahead: the predicted end of the last chain handed over,
        # set only while every chain since the last group confirmed held (the last confirmed
        # was a chain); None otherwise (then nothing is sent ahead)
        self._tip: tuple[int, str] | None = None
        self._epoch = 0  # counts voids: a chain sent before the last void cannot be confirmed
        self._misses = 0  # chains that failed in a row
        self._unchained = 0  # batches to go with a PubAck per message after one failed
        self.chains = self.chains_failed = 0  # batches sent as a chain, and those that failed

    async def open(self) -> None:
        url = self.url
        closed = self._closed = asyncio.Event()

        async def on_error(exc: Exception) -> None:
            log.debug("nats %s: %s", url.display, self.describe(exc))

        answers: list[PubAcks] = []

        async def on_closed() -> None:
            closed.set()
            for acks in answers:  # no answer comes any more: the chains in flight failed
                acks.abandon(Unavailable("the connection closed before the chain's PubAck"))

        credentials: dict[str, Any] = {}
        if url.username is not None and url.password is not None:
            credentials = {"user": url.username, "password": url.password}
        elif url.username:
            credentials = {"token": url.username}
        try:
            # one attempt (the client would otherwise retry a refused server by itself)
            self.nc = await asyncio.wait_for(nats.connect(
                servers=[self.server], name="walex", allow_reconnect=False,
                max_reconnect_attempts=1, reconnect_time_wait=0.05,
                connect_timeout=max(1, round(self.timeout)),
                tls=ssl.create_default_context() if url.scheme == "tls" else None,
                error_cb=on_error, closed_cb=on_closed, disconnected_cb=on_closed,
                **credentials,
            ), timeout=self.timeout + 1)
        except Exception as exc:
            taken = _taken(self.server, credentials)
            refused = _ACCEPTED.get(taken)
            if "authorization violation" in str(exc).lower() and refused is not None \
                    and refused < _REFUSALS_RETRIED:
                _ACCEPTED[taken] = refused + 1
                raise self.unavailable(
                    "the server refused the credentials it took before (Authorization "
                    "Violation: its authorization may be being reloaded); trying again, "
                    f"{_REFUSALS_RETRIED - refused - 1} more time(s) before walex stops",
                ) from None
            if "authorization violation" in str(exc).lower():
                given = "token" if "token" in credentials else "user name and password" \
                    if credentials else "no credentials"
                raise self.misconfigured(
                    f"the server refused the connection (Authorization Violation) with the "
                    f"{given} the URL gives",
                    "put credentials the server's authorization accepts in the URL: "
                    "nats://USER:PASSWORD@host:4222 or nats://TOKEN@host:4222",
                ) from None
            raise self.unavailable("cannot connect", exc) from None
        _ACCEPTED[_taken(self.server, credentials)] = 0
        self.js = self.nc.jetstream(timeout=self.timeout, publish_async_max_pending=_WINDOW)
        try:
            await self._ensure_stream()
            acks = self._acks = PubAcks(self.nc.new_inbox() + ".")
            answers.append(acks)
            sub = await self.nc.subscribe(acks.prefix + "*", cb=acks.received)
            acks.direct(self.nc, getattr(sub, "_id", -1))  # plain PubAcks straight from the parser
            self._frames = Frames(self.nc, self.stream, self._acks.prefix) \
                if usable(self.nc) else None
        except (Unavailable, WalExError):  # a refusal, or (a worker's) a missing stream
            await self.close()
            raise
        except Exception as exc:
            await self.close()
            raise self.unavailable("cannot subscribe to the PubAcks", exc) from None
        self.opened = True

    async def _ensure_stream(self) -> None:
        try:
            info = await self.js.stream_info(self.stream)
        except NotFoundError:
            info = None
        except Exception as exc:
            raise self.unavailable("JetStream does not answer (is it enabled, -js?)", exc) from None
        if info is not None:
            return
        try:
            await self.js.add_stream(StreamConfig(
                name=self.stream, subjects=self.stream_subjects,
                duplicate_window=self.duplicate_window,
            ))
        except Exception as exc:
            await self._overlap()
            raise self.unavailable(
                f"cannot create stream {self.stream!r} for subjects {self.stream_subjects}", exc
            ) from None
        log.info("created JetStream stream %r for subjects %s (duplicate window %gs) on %s",
                 self.stream, self.stream_subjects, self.duplicate_window, self.url.display)

    async def _overlap(self) -> None:
        """Raise :class:`DestinationError` when another stream holds this one's subjects
        (JetStream refuses overlapping streams: retrying cannot help)."""
        try:
            other = await self.js.find_stream_name_by_subject(self.stream_subjects[0])
        except Exception:  # none holds them, or no answer: the retry tells
            return
        if other and other != self.stream:
            raise DestinationError(
                f"destination {self.url.display}: cannot create stream {self.stream!r} for "
                f"subjects {self.stream_subjects}: stream {other!r} already holds them "
                f"(JetStream streams may not overlap). Use stream={other}, or delete stream "
                f"{other!r} if nothing else needs it (nats stream rm {other})"
            )

    async def publish(self, batch: list[Outgoing]) -> None:
        for start in range(0, len(batch), _WINDOW):
            await self._publish(batch[start:start + _WINDOW])

    async def _publish(self, batch: list[Outgoing]) -> None:
        nc, acks, closed = self.nc, self._acks, self._closed
        if nc is None or acks is None or closed is None or closed.is_set():
            raise Unavailable("not connected")
        largest, longest_id = self._check_sizes(batch)
        last, self._last = self._last, None  # unknown until this batch is answered
        if last is not None and len(batch) > 1 and self._fits(last, largest, longest_id):
            if self._unchained:
                self._unchained -= 1
            elif await self._chain(batch, last):
                return
        await self._each(batch)

    def _fits(self, last: tuple[int, str], largest: int, longest_id: int) -> bool:
        """Whether a batch may go as a chain on ``last``: chains on, walex's frames, and each
        message's headers with a sequence number and the previous message's id more within
        the server's max_payload (``largest``: the largest message with its plain headers)."""
        limit = self.nc.max_payload or 0
        extra = CHAINED_EXTRA + _SEQ_DIGITS + max(longest_id, len(last[1]))
        return (self._frames is not None and self.chained
                and (not limit or largest + extra <= limit))

    async def _chain(self, batch: list[Outgoing], last: tuple[int, str]) -> bool:
        """Publish ``batch`` chained (:meth:`Frames.chained`) on ``last`` and wait for its
        answer: True when its one PubAck says every message is stored; False when the
        chain broke (a message refused or a duplicate, another publisher's message in
        between), the caller then publishes the batch again with a PubAck per message,
        which tells what each message's fate was (those stored already are duplicates by
        their ids), or when an id is not plain (nothing sent). Raises
        :class:`Unavailable` on a timeout or a lost connection."""
        flight = await self._hand_over(batch, last)
        if flight is None:
            return False  # an id nats-py would rewrite: Client.publish, one by one
        try:
            await flight.answer  # done within the timeout (its timer), or at a close
        except asyncio.CancelledError:
            self._void()
            raise
        failure = self.landed(flight)
        if failure is None:
            return True
        if isinstance(flight.answer.result(), Unavailable):
            raise failure  # a timeout or a lost connection: not the chain's fault
        return False

    def pipelined(self) -> bool:
        """Whether a group may be handed over ahead now (:meth:`send_ahead`): connected,
        chains on, the last group confirmed a chain and every chain sent since chained on
        it (no failure since), and no batch is to go unchained after a break."""
        return self._tip is not None and not self._unchained and self._frames is not None

    async def send_ahead(self, batch: list[Outgoing]) -> _Flight | None:
        """Hand ``batch`` over chained on the predicted end of the chain handed over before
        (:attr:`_tip`), without waiting for any answer; its outcome is :meth:`landed`'s once
        the returned flight's ``answer`` is done (within the timeout). None, having sent
        nothing: it cannot go so (:meth:`pipelined` says no, an id is not plain, more
        than one publish's messages, a message too large chained); raises
        :class:`Unavailable` when the client refused the frames (the chain state void)."""
        tip, nc = self._tip, self.nc
        if tip is None or self._unchained or nc is None or len(batch) > _WINDOW:
            return None
        limit = nc.max_payload or 0
        largest, longest_id, over = batch_sizes(batch, _HEADERS + len(self.stream), limit)
        if over >= 0 or not self._fits(tip, largest, longest_id):
            return None
        return await self._hand_over(batch, tip)

    async def _hand_over(self, batch: list[Outgoing], last: tuple[int, str]) -> _Flight | None:
        """The frames of ``batch`` chained on ``last`` handed to the client, with a number
        for the last message's answer and a timer; None when an id is not plain."""
        acks, frames = self._acks, self._frames
        assert acks is not None and frames is not None
        reply, answer = acks.expect_one()
        epoch, self._tip = self._epoch, None  # unknown while the frames are handed over
        try:
            if not await frames.chained(batch, self.subject.render, reply, *last):
                acks.drop(reply)
                return None
        except Exception as exc:
            acks.drop(reply)
            self._void()
            raise self.unavailable("publishing failed", exc) from None
        self.chains += 1
        end = (last[0] + len(batch), batch[-1].id)
        if epoch == self._epoch:  # (a close meanwhile voided it: never confirmed)
            self._tip = end
        timer = asyncio.get_running_loop().call_later(
            self.timeout, acks.drop, reply,
            Unavailable(f"no PubAck within {self.timeout:g}s for a chain of {len(batch)}"))
        return _Flight(answer, end, len(batch), epoch, timer)

    def landed(self, flight: _Flight) -> Exception | None:
        """The outcome of a chain whose answer is done, taken in the order they were handed
        over: None when its PubAck at the predicted sequence says it is stored whole (the
        stream's last message is its end); otherwise why not, and the chain state is void
        (every chain sent after it fails too: its outcome is not looked at, it is published
        again). A chain handed over before a void is never confirmed."""
        flight.timer.cancel()
        answer = flight.answer.result()
        if flight.epoch != self._epoch:  # (and so not looked at)
            return answer if isinstance(answer, Unavailable) else \
                Unavailable("chained on a chain that failed")
        if not isinstance(answer, BaseException) and stored_at(answer) == flight.end[0]:
            self._misses = 0
            self._last = flight.end
            return None
        self._void()
        if isinstance(answer, Unavailable):
            return answer
        self.chains_failed += 1
        self._misses = min(self._misses + 1, _MAX_MISSES)
        self._unchained = 2 ** self._misses - 1  # the next ones not chained, so that a
        # stream other publishers write to does not take every batch twice
        why = self.describe(answer) if isinstance(answer, BaseException) else "its PubAck"
        log.debug("nats %s: a chained batch of %d was not stored whole (%s); publishing it "
                  "again with a PubAck per message", self.url.display, flight.size, why)
        return Unavailable(f"a chain of {flight.size} was not stored whole ({why})")

    def _void(self) -> None:
        """Forget the stream's last message and every chain's predicted end: what is in
        flight is never confirmed, the next batch goes with a PubAck per message."""
        self._tip = self._last = None
        self._epoch += 1

    async def _answered(self, done: asyncio.Future[None]) -> None:
        """Wait for the batch's PubAcks (``done``), the connection's loss or the timeout."""
        closed = self._closed
        assert closed is not None
        lost = asyncio.ensure_future(closed.wait())
        try:
            finished, _ = await asyncio.wait([done, lost], timeout=self.timeout,
                                             return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
        if done not in finished:
            what = "the connection closed" if closed.is_set() else f"no PubAck within {self.timeout:g}s"
            raise Unavailable(f"{what} before every message of the batch was acknowledged")

    async def _each(self, batch: list[Outgoing]) -> None:
        """Publish ``batch`` with a PubAck per message."""
        nc, acks, render = self.nc, self._acks, self.subject.render
        assert nc is not None and acks is not None
        self._void()  # no chain is sent ahead of an unchained batch
        first, done = acks.expect(len(batch))
        prefix, stream, frames = acks.prefix, self.stream, self._frames
        try:
            # Core publishes with a reply subject each (what JetStream answers with its
            # PubAck); the client buffers them and writes many in one system call. The
            # frames are built here when the client allows (walex.destinations.hpub).
            if frames is None or not await frames.publish(batch, render, first):
                for n, item in enumerate(batch, first):
                    await nc.publish(render(item), item.body, reply=f"{prefix}{n}",
                                     headers={"Nats-Msg-Id": item.id, _EXPECTED_STREAM: stream})
        except Exception as exc:
            raise self.unavailable("publishing failed", exc) from None
        await self._answered(done)
        if acks.failure is not None:  # the message it answered for: refused for good, or for now
            raise await self._refusal(batch[acks.failed_at], acks.failure)
        self.duplicates += acks.duplicates
        if frames is not None:  # the stream's last message, if its PubAck shows it
            seq = stored_at(acks.last)
            self._last = None if seq is None else (seq, batch[-1].id)

    def _check_sizes(self, batch: list[Outgoing]) -> tuple[int, int]:
        """A message over the server's max_payload is refused before anything is sent.

        (The server would close the connection on it, and the client raises
        after it registered the PubAck it waits for.) Returns the largest size
        and the longest event id.
        """
        nc = self.nc
        limit = nc.max_payload if nc is not None else 0
        largest, longest_id, over = batch_sizes(batch, _HEADERS + len(self.stream), limit or 0)
        if over >= 0:
            item = batch[over]
            size = len(item.body) + len(item.id) + _HEADERS + len(self.stream)
            raise DestinationError(
                f"destination {self.display}: event {item.id} ({item.schema}.{item.table}) "
                f"is {size} bytes with its headers, over the server's max_payload of {limit}; "
                "raise max_payload in the nats-server configuration, or leave the large "
                "column out of the publication"
            )
        return largest, longest_id

    async def _refusal(self, item: Outgoing, exc: BaseException) -> Exception:
        """What the failed PubAck of ``item`` is: for good (DestinationError) or for now
        (Unavailable)."""
        subject = self.subject.render(item)
        what = f"stream {self.stream!r} refused event {item.id} (subject {subject!r})"
        if isinstance(exc, APIError) and exc.err_code == _TOO_LARGE:
            return DestinationError(
                f"destination {self.display}: {what}: {exc.description} (the stream's "
                "max_msg_size); raise the stream's max_msg_size or leave the large column "
                "out of the publication"
            )
        if isinstance(exc, APIError) and exc.err_code == _OTHER_STREAM:
            return DestinationError(
                f"destination {self.display}: {what}: the subject is stored by another stream "
                f"({exc.description}); give walex a subject template only {self.stream!r} covers"
            )
        if isinstance(exc, APIError) and exc.err_code == _STORE_FAILED:
            # a stream at its limits with discard=new: consumers or max_age may free room,
            # so this is retried a while; then it goes to on_error, never dropped silently
            return Unavailable(
                f"{what}: {exc.description} (the stream is full and has discard=new); raise "
                "its limits (max_msgs, max_bytes, max_msgs_per_subject) or let it discard old "
                "messages",
                attempts=self.full_attempts,
            )
        if isinstance(exc, NoStreamResponseError):
            subjects = await self._stream_subjects()
            if subjects is not None and not any(_covers(s, subject) for s in subjects):
                return DestinationError(
                    f"destination {self.display}: no stream takes subject {subject!r}: stream "
                    f"{self.stream!r} has the subjects {subjects}; add {self.stream_subjects} "
                    "to them or give walex a subject template they cover"
                )
            return Unavailable(f"{what}: no answer from JetStream (no responders); the stream "
                               "is missing or JetStream is not ready")
        return self.unavailable(f"stream {self.stream!r} refused a message", exc)

    async def _stream_subjects(self) -> list[str] | None:
        """The subjects of the stream when it exists and answers; None otherwise."""
        js = self.js
        if js is None:
            return None
        try:
            info = await js.stream_info(self.stream)
        except Exception:  # missing, or JetStream not answering: not a refusal for good
            return None
        return list(info.config.subjects or [])

    async def close(self) -> None:
        nc, acks = self.nc, self._acks
        self.nc, self.js, self._acks, self._frames = None, None, None, None
        self.opened = False
        self._void()
        if acks is not None:
            acks.abandon(Unavailable("the connection was closed before the chain's PubAck"))
            acks.release()
        if nc is not None:
            try:
                await nc.close()
            except Exception as exc:  # closing a broken connection
                log.debug("closing nats connection to %s: %s", self.url.display, self.describe(exc))


class _Flight:
    """A chain handed over (:meth:`NatsDestination.send_ahead`): ``answer`` is done with its
    last message's answer, or an :class:`Unavailable` (its timer, the connection lost)."""

    __slots__ = ("answer", "end", "epoch", "size", "timer")

    def __init__(self, answer: asyncio.Future[bytes | BaseException], end: tuple[int, str],
                 size: int, epoch: int, timer: asyncio.TimerHandle) -> None:
        self.answer = answer
        self.end = end  # the stream's last message once it is stored: (sequence, id)
        self.size = size
        self.epoch = epoch
        self.timer = timer
