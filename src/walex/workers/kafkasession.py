"""The Kafka worker's consumer thread (:mod:`walex.workers.kafka`): one session's client.

Contract: :class:`KafkaSession` is the part of
:class:`~walex.workers.kafka.KafkaConsumer` that runs on the consumer's thread
(``_serve``) and in librdkafka's callbacks (errors, assignments, revocations,
losses), all of them on that thread. It shares with the event loop's side only
the state under ``lock`` (``assigned``, ``buffers``, ``busy``, ``done``,
``committed``, ``rewind``, ``failed``, ``closing``) and wakes the
loop through ``ready``; every entry point carries its session's ``token`` and
touches nothing once ``session`` is another (a client that outlived
``close()``). It reads records into ``buffers``, seeks back to what the loop
released, commits what the loop settled as handled (``done``), and on a
rebalance waits for the call in hand, commits it and drops the rest; a call of
the partitions that go (lost, or not returned in time) is cut off through the
lane (``cut_partitions``, :meth:`walex.workers.base.Lane.cut`): that call alone,
nothing of it committed, and the worker goes on with its other partitions. A
call that still runs ``revoke_limit`` after it was cancelled (a handler that
ignores the cancellation or blocks its thread) ends the process
(:data:`STUCK_EXIT`, a CRITICAL log naming the partitions and the fix): the
partitions are never handed to another worker while it runs. It
imports nothing of :mod:`walex.workers.kafka`; the consumer provides the
attributes annotated on the class.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import time
from collections import deque
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from ..destinations.base import Unavailable
from ..destinations.kafka import AUTHENTICATION

__all__ = ["STUCK_EXIT", "TP", "KafkaSession"]

log = logging.getLogger("walex.workers")

_BATCH = 500  # records taken from the client at once
_COMMIT_EVERY = 0.5  # seconds between commits of what was handled

TP = tuple[str, int]
# the exit code of a worker process whose handler call outlived its cancellation while its
# partitions were to go to another worker (KafkaSession._stuck)
STUCK_EXIT = 70


class KafkaSession:
    """The consumer thread's side of a Kafka worker (see the module's doc)."""

    # provided by the consumer (walex.workers.kafka.KafkaConsumer)
    url: Any
    destination: Any
    display: str
    group: str
    subscription: str
    timeout: float
    revoke_limit: float
    stale_after: float
    ticked: float
    stalls: int
    stall_reason: str
    lock: threading.Condition
    session: object
    ready: asyncio.Event
    loop: asyncio.AbstractEventLoop | None
    lane: Any  # walex.workers.kafka.KafkaLane
    assigned: set[TP]
    buffers: dict[TP, deque[Any]]
    busy: dict[TP, int]
    done: dict[TP, int]
    committed: dict[TP, int]
    sent: dict[TP, int]
    commit_failing: bool
    rewind: dict[TP, int]
    failed: Exception | None
    closing: bool
    last_error: str | None
    partition_errors: dict[TP, tuple[int, str, float]]
    auth_error: str | None
    trouble_since: float | None
    next_probe: float

    def _wake(self) -> None:
        loop = self.loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self.ready.set)
            except RuntimeError:
                pass

    def _fail(self, exc: Exception, token: object) -> None:
        with self.lock:
            if self.session is not token:
                return
            if self.failed is None:
                self.failed = exc
        self._wake()

    # -- the consumer's thread -------------------------------------------

    def _on_error(self, err: Any, token: object) -> None:
        text = self.url.scrub(str(err.str()))
        log.debug("worker source %s: %s", self.display, text)
        if self.session is not token:
            return
        self.last_error = text
        if self.trouble_since is None:
            self.trouble_since = time.monotonic()
        if err.code() in AUTHENTICATION:
            self.auth_error = text
        if err.fatal():
            self._fail(Unavailable(f"the Kafka consumer failed: {text}"), token)

    def _serve(self, client: Any, token: object, stopping: threading.Event) -> None:
        try:
            client.subscribe([self.subscription],
                             on_assign=lambda c, p: self._on_assign(c, p, token),
                             on_revoke=lambda c, p: self._give_up(c, p, True, token),
                             on_lost=lambda c, p: self._give_up(c, p, False, token))
            last_commit = time.monotonic()
            next_look = 0.0
            while not stopping.is_set():
                self._tick(token)
                self._seek(client, token)
                messages = client.consume(_BATCH, 0.2)
                self._receive(messages, token)
                if time.monotonic() - last_commit >= _COMMIT_EVERY:
                    self._commit(client, None, wait=False, token=token)
                    last_commit = time.monotonic()
                if self.trouble_since is not None and self.failed is None and \
                        self.session is token:
                    self._probe(client, token)
                if self.partition_errors and time.monotonic() >= next_look:
                    next_look = time.monotonic() + 2.0
                    self._look_again(client, token)
        except Exception as exc:
            log.error("worker source %s: the Kafka consumer stopped: %s", self.display,
                      self.destination.describe(exc))
            self._fail(self.destination.unavailable("the Kafka consumer stopped", exc), token)
        finally:
            with self.lock:
                if self.session is token:
                    self.closing = True
            try:
                self._commit(client, None, wait=True, token=token)
            finally:
                try:
                    client.close()  # leaves the group: its partitions go to the others now
                except Exception as exc:
                    log.debug("closing the Kafka consumer: %s", self.destination.describe(exc))

    def _tick(self, token: object) -> None:
        """A turn of the consumer thread: after one stalled for most of the session timeout
        (the process frozen: no heartbeat went out either), the call in hand is cut off and
        the leases of records handed out before say lost (``KafkaLane.stale``), before the
        turn counts, as the group may have given their partitions away meanwhile."""
        now = time.monotonic()
        gap = now - self.ticked
        if gap > self.stale_after and self.session is token:
            with self.lock:
                keys = set(self.assigned)
            reason = (f"the Kafka consumer did not run for {gap:.1f}s (the process frozen?), "
                      f"most of session.timeout.ms: the group may have given the partitions "
                      "to another worker")
            self.stall_reason = reason
            self.stalls += 1
            if keys and any(self.busy.get(k) for k in keys):
                log.warning("worker group %r: %s; the call in hand is cut off (its lease says "
                            "lost, nothing of it is committed)", self.group, reason)
                self._cut(self.lane, self.loop, keys, reason)
        self.ticked = now

    def _probe(self, client: Any, token: object) -> None:
        """After an error of the client (it reconnects by itself, silently): do the brokers
        answer? None for ``timeout`` seconds is a lost connection, as for the other sources:
        :class:`Unavailable` (the worker says so, reports itself reconnecting, and connects
        again)."""
        now = time.monotonic()
        since = self.trouble_since
        if since is None or now < self.next_probe:
            return
        self.next_probe = now + 1.0
        try:
            # within half the stall limit: a wait this long is no sign of a frozen process
            client.list_topics(timeout=max(0.5, min(self.timeout, 5.0, self.stale_after / 2)))
        except KafkaException as exc:
            if now - since >= self.timeout:
                detail = self.last_error or self.destination.describe(exc)
                self._fail(Unavailable(f"no Kafka broker of {self.url.servers} answered for "
                                       f"{self.timeout:g}s: {self.url.scrub(detail)}"), token)
            return
        if self.trouble_since == since and self.session is token:
            self.trouble_since = None  # they answer: the error passed

    def _receive(self, messages: list[Any], token: object) -> None:
        if not messages:
            return
        added = False
        with self.lock:
            if self.session is not token:
                return
            errors = self.partition_errors
            for m in messages:
                err = m.error()
                if err is not None:
                    self.last_error = self.url.scrub(str(err.str()))
                    if err.fatal():
                        self.failed = Unavailable(f"the Kafka consumer failed: {self.last_error}")
                    if err.code() == KafkaError._PARTITION_EOF:  # informational only
                        log.debug("worker source %s: %s", self.display, self.last_error)
                    else:
                        self._partition_error(m, err)
                    continue
                tp = (m.topic(), m.partition())
                if errors:
                    self._cleared(tp[0], tp[1], "records of it are read again")
                if tp not in self.assigned or tp in self.rewind:
                    continue  # revoked meanwhile, or to be read again
                self.buffers.setdefault(tp, deque()).append(m)
                added = True
        if added or self.failed is not None:
            self._wake()

    def _partition_error(self, message: Any, err: Any) -> None:
        """A topic's or partition's error the client handed over as a record (under the
        lock): a WARNING naming it and the fix, once until it clears, and ``trouble()``
        (``/healthz`` 503 ``stalled``) meanwhile: the partition is not read while it
        lasts (before, a DEBUG line and a silent stall)."""
        topic, partition = message.topic() or "?", message.partition()
        code = err.code()
        if partition is None or (code in _MISSING and topic.startswith("^")) or \
                "Subscribed topic not available" in (self.last_error or ""):
            partition = -1  # the topic's (or the pattern's: no topic matches it) as a whole
        key = (topic, partition)
        known = self.partition_errors.get(key)
        self.partition_errors[key] = (code, self.last_error or "",
                                      known[2] if known is not None and known[0] == code
                                      else time.monotonic())
        if known is not None and known[0] == code:
            log.debug("worker source %s: %s", self.display, self.last_error)
            return
        log.warning("worker group %r: the Kafka consumer reports %s for %s: %s; it reads "
                    "nothing of it until this clears: %s", self.group, err.name(),
                    _where(key), self.last_error, _fix(code))

    def _cleared(self, topic: str, partition: int, why: str) -> None:
        """The errors of a topic's partition (and of the topic as a whole) are over (under
        the lock)."""
        for key in [k for k in self.partition_errors
                    if k[1] in (partition, -1) and _names_topic(k[0], topic)]:
            code, _text, _since = self.partition_errors.pop(key)
            log.info("worker group %r: %s is consumed again (%s): the error %s is over",
                     self.group, _where(key), why, KafkaError(code).name())

    def _look_again(self, client: Any, token: object) -> None:
        """A topic or partition reported missing: cleared once the brokers list it again (an
        error of the moment, e.g. before the topic was made, may be the last word the
        client gave of a partition that has no record to send since)."""
        with self.lock:
            if self.session is not token:
                return
            missing = [k for k, (code, _t, _s) in self.partition_errors.items() if code in _MISSING]
        wait = max(0.5, min(self.timeout, 2.0, self.stale_after / 2))
        for name in sorted({k[0] for k in missing}):
            try:  # a pattern subscription's: all topics, for one that matches
                found = client.list_topics(None if name.startswith("^") else name, timeout=wait)
            except KafkaException:
                return
            for topic, meta in found.topics.items():
                if meta.error is not None or not _names_topic(name, topic):
                    continue
                with self.lock:
                    if self.session is not token:
                        return
                    for key in missing:
                        if key[0] == name and (key[1] < 0 or key[1] in meta.partitions):
                            self._cleared(topic, key[1], "the brokers list it again")

    def partition_trouble(self) -> str | None:
        """The oldest topic or partition error not cleared, as ``/healthz`` says it."""
        with self.lock:
            if not self.partition_errors:
                return None
            key, (code, text, since) = min(self.partition_errors.items(),
                                           key=lambda item: item[1][2])
            more = len(self.partition_errors) - 1
        return (f"the Kafka consumer reports {KafkaError(code).name()} for {_where(key)} "
                f"for {time.monotonic() - since:.0f}s ({text}){f' and {more} more' if more else ''}"
                f": {_fix(code)}")

    def _seek(self, client: Any, token: object) -> None:
        with self.lock:
            if self.session is not token:
                return
            rewind, self.rewind = self.rewind, {}
        for (topic, partition), offset in rewind.items():
            try:
                client.seek(TopicPartition(topic, partition, offset))
            except KafkaException as exc:  # not fetching yet: the committed offset holds
                log.debug("seeking %s[%d] to %d: %s", topic, partition, offset,
                          self.destination.describe(exc))

    def _commit(self, client: Any, only: set[TP] | None, wait: bool, token: object) -> None:
        """Commit what was handled and is not confirmed committed. Asynchronously (``wait``
        False): an offset whose commit is out is not sent again until the broker answered
        (:meth:`_on_commit`); synchronously: every offset not confirmed, its answer awaited.
        An offset counts as committed only once the broker confirmed it."""
        with self.lock:
            if self.session is not token:
                return
            offsets = [TopicPartition(t, p, o) for (t, p), o in self.done.items()
                       if (only is None or (t, p) in only) and self.committed.get((t, p)) != o
                       and (wait or self.sent.get((t, p)) != o)]
            if not wait:
                for tp in offsets:
                    self.sent[(tp.topic, tp.partition)] = tp.offset
        if not offsets:
            return
        try:
            answered = client.commit(offsets=offsets, asynchronous=not wait)
        except KafkaException as exc:
            with self.lock:
                for tp in offsets:
                    if self.sent.get((tp.topic, tp.partition)) == tp.offset:
                        del self.sent[(tp.topic, tp.partition)]
            log.warning("worker group %r: committing offsets failed (%s); those records may be "
                        "handled again", self.group, self.destination.describe(exc))
            return
        if wait:
            self._confirmed(answered or [], None, token)

    def _on_commit(self, err: Any, partitions: list[Any], token: object) -> None:
        """librdkafka's answer to a commit (on the consumer's thread)."""
        self._confirmed(partitions, err, token)

    def _confirmed(self, partitions: list[Any], err: Any, token: object) -> None:
        """Offsets the broker answered for: committed, or failed (then committed again by the
        next commit, and said once until one succeeds)."""
        failed = []
        with self.lock:
            if self.session is not token:
                return
            for tp in partitions:
                key = (tp.topic, tp.partition)
                if self.sent.get(key) == tp.offset:
                    del self.sent[key]
                error = err if err is not None else tp.error
                if error is not None:
                    failed.append(f"{tp.topic}[{tp.partition}]@{tp.offset}: {error}")
                elif key in self.assigned and tp.offset >= 0 and \
                        tp.offset >= self.committed.get(key, -1):
                    self.committed[key] = tp.offset
            warn = bool(failed) and not self.commit_failing
            if failed:
                self.commit_failing = True
            elif partitions:
                self.commit_failing = False
        if failed:
            log.log(logging.WARNING if warn else logging.DEBUG,
                    "worker group %r: the broker did not take the commit of %s; it is committed "
                    "again (until then those records would be handled again after a rebalance "
                    "or restart)", self.group, self.url.scrub("; ".join(failed)))

    def _on_assign(self, client: Any, partitions: list[Any], token: object) -> None:
        with self.lock:
            if self.session is not token:
                return  # the client of an earlier session: its records are not read
            for tp in partitions:
                key = (tp.topic, tp.partition)
                if self.partition_errors:
                    self._cleared(tp.topic, tp.partition, "assigned")
                self.assigned.add(key)
                self.buffers[key] = deque()
                self.busy[key] = 0
                self.done.pop(key, None)
                self.committed.pop(key, None)
                self.sent.pop(key, None)
                self.rewind.pop(key, None)
        log.info("worker group %r: assigned %s", self.group, _names(partitions))

    def _give_up(self, client: Any, partitions: list[Any], commit: bool, token: object) -> None:
        """Before partitions go to another worker: the call in hand returns, what was handled is
        committed, the rest is dropped."""
        keys = {(tp.topic, tp.partition) for tp in partitions}
        limit = time.monotonic() + self.revoke_limit
        cancelled = False
        with self.lock:
            if self.session is not token:  # a later session's partitions are not these
                log.info("worker group %r: %s %s (an earlier connection's)", self.group,
                         "released" if commit else "lost", _names(partitions))
                return
            for key in keys:
                self.buffers.get(key, deque()).clear()
            lane, loop = self.lane, self.loop
            if not commit and any(self.busy.get(k) for k in keys):
                # the group gave them away already (this worker missed its session): the call
                # in hand is cancelled (fencing, walex.workers.current_lease) and not committed
                cancelled = self._cut(lane, loop, keys, f"Kafka partitions {_names(partitions)} "
                                      "were lost (the group session timed out)")
            while self.session is token and not self.closing and \
                    any(self.busy.get(k) for k in keys):
                left = limit - time.monotonic()
                if left <= 0 and not cancelled:
                    # the group waits max.poll.interval.ms for this worker to give them up:
                    # the call is cancelled well before, and nothing of it committed
                    log.warning("worker group %r: a handler call for %s did not return within "
                                "%gs of a rebalance; it is cancelled and its records are "
                                "handled again", self.group, _names(partitions), self.revoke_limit)
                    cancelled = self._cut(lane, loop, keys, f"Kafka partitions "
                                          f"{_names(partitions)} are revoked and the call did "
                                          f"not return within {self.revoke_limit:g}s")
                    limit = time.monotonic() + self.revoke_limit
                    continue
                if left <= 0:
                    break
                self.lock.wait(min(left, 1.0))
                self.ticked = time.monotonic()  # waiting on the group's side: not stalled
            stuck = self.session is token and not self.closing and \
                any(self.busy.get(k) for k in keys)
        if stuck:
            self._stuck(client, keys, partitions, commit, token)
        if commit:
            self._commit(client, keys, wait=True, token=token)
        with self.lock:
            if self.session is not token:
                return
            for key in keys:
                self.partition_errors.pop(key, None)  # another worker's now
                self.assigned.discard(key)
                self.buffers.pop(key, None)
                self.busy.pop(key, None)
                self.done.pop(key, None)
                self.committed.pop(key, None)
                self.sent.pop(key, None)
                self.rewind.pop(key, None)
        log.info("worker group %r: %s %s", self.group, "released" if commit else "lost",
                 _names(partitions))

    def _stuck(self, client: Any, keys: set[TP], partitions: list[Any], commit: bool,
               token: object) -> None:
        """A call of partitions that go to another worker outlived its cancellation (a handler
        that ignores it, or blocks its thread): letting them go would have two workers handle
        them at once, and nothing ends the call, so the process ends, before the group can
        give them away (it waits ``max.poll.interval.ms``; this is at two thirds of it). What
        was handled is committed first; the call's records are handled again elsewhere."""
        log.critical(
            "worker group %r: a handler call for %s still runs %gs after it was cancelled, and "
            "its partitions must go to another worker (%s): the worker process exits (code %d) "
            "so that no two workers handle them at once; its records are handled again by the "
            "group. Fix the handler: let it end on cancellation (do not catch CancelledError, "
            "do not block the event loop; a plain handler on its thread should return once "
            "walex.workers.current_lease() says lost), or raise max.poll.interval.ms if calls "
            "are this slow", self.group, _names(partitions), self.revoke_limit,
            "revoked" if commit else "lost", STUCK_EXIT)
        try:
            self._commit(client, keys, wait=True, token=token)
        except Exception as exc:
            log.debug("committing before exiting: %s", self.destination.describe(exc))
        for handler in (*logging.getLogger().handlers, *log.handlers):
            try:
                handler.flush()
            except Exception:
                pass
        os._exit(STUCK_EXIT)

    def _cut(self, lane: Any, loop: asyncio.AbstractEventLoop | None, keys: set[TP],
             reason: str) -> bool:
        """Cut off the call in hand if it holds one of ``keys`` (on the loop): that call alone is
        cancelled, its lease lost, nothing of it committed; the lane goes on with the others."""
        if lane is None or loop is None:
            return False
        try:
            loop.call_soon_threadsafe(lane.cut_partitions, keys, reason)
        except RuntimeError:  # the loop is closed: no call runs
            return False
        return True


def _names_topic(name: str, topic: str) -> bool:
    """Whether ``name`` (a topic, or a pattern subscription: ``^...``) takes ``topic``."""
    if name == topic:
        return True
    if not name.startswith("^"):
        return False
    try:
        return re.match(name, topic) is not None
    except re.error:
        return False


def _where(key: TP) -> str:
    return f"topic {key[0]!r}" if key[1] < 0 else f"{key[0]}[{key[1]}]"


_MISSING = (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC,
            KafkaError._UNKNOWN_PARTITION)


def _fix(code: int) -> str:
    """What to do about a topic's or partition's consumer error."""
    if code in _MISSING:
        return ("the topic or partition does not exist (deleted, or not created yet): check the "
                "topic in the source URL against the relay's, and create the topic "
                "(kafka-topics.sh --create) or have the broker create it as the relay first "
                "publishes (auto.create.topics.enable)")
    if code in (KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED):
        return ("the worker's user may not read it: grant it Read and Describe on the topic and "
                "Read on the consumer group")
    if code in (KafkaError.UNSUPPORTED_COMPRESSION_TYPE, KafkaError._BAD_COMPRESSION):
        return ("its records are compressed with a codec this worker's client or the broker "
                "cannot read: have the relay use a compression.type both support (zstd needs "
                "brokers 2.1+), or upgrade the broker")
    return "check the broker's log for this topic and partition, and the worker's permissions"


def _names(partitions: list[Any]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"
