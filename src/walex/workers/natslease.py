"""Partition leases of a NATS worker group, kept in a JetStream key-value bucket.

With ``prefetch`` above 1 (:mod:`walex.workers.natsbatch`) a partition's
consumer lets many messages out at once, to whichever client asks, so the
server no longer keeps one worker per partition by itself (and nats-server
2.9 has no pinned consumers). The worker that may pull a partition is the
one holding its lease here:

- the bucket ``walex_leases_<group>`` (history 1, ``max_age`` = the lease
  ``ttl``, the consumers' ``ack_wait`` when this module creates it; an
  existing bucket's own ``max_age`` is the ttl used) holds a key per
  partition, ``<stream>.p.<partition>``, whose value is the holder's id, and a
  key per live worker, ``<stream>.m.<worker id>`` (a stream name that is not a
  valid key is written as ``x`` and its hexadecimal UTF-8);
- taking a lease is ``create`` (stored only when the key is absent: never
  written, expired, or deleted; a deleted key's marker is replaced with a
  compare-and-set on its revision, so two takers cannot both win); keeping it
  is ``update`` with the last revision (compare-and-set) every ``ttl / 3``; a
  renewal refused for a wrong last revision means the lease is lost, at once;
- the safety argument: a put sent at local monotonic time ``s`` is stored by
  the server at or after ``s``, and the key (history 1, ``max_age`` ttl) is
  not removed before that store plus ``ttl``, so no other worker can create it
  before ``s + ttl``. A holder takes its lease as valid only until ``s + ttl -
  margin`` (``margin = ttl / 4``) of its last put the server CONFIRMED; at that
  moment (a timer, :meth:`Leases._expire`) the lane is revoked: the call in hand
  is cancelled, nothing more is acknowledged, no progress reported. The margin
  covers the drift of the two clocks' rates and the event loop's lateness in
  running the timer. The lane sends pull requests whose ``expires`` ends
  before its lease, so no request of a former holder stays open on the server
  once another may hold the partition;
- every round (``ttl / 3``, at most a second apart) a worker renews its member key and leases, counts
  the live members, aims at its share (``partitions // members``, one more for
  the first ``partitions % members`` workers by id), takes free
  partitions up to that (in an order rotated by its id, so workers do not all
  race for partition 0) and asks its lanes to give back the ones above it
  (:meth:`Leases.shed`: after the call in hand, the lane gives back what it
  holds, then :meth:`Leases.release` deletes the key, so another worker takes
  it in its next round rather than after ``ttl``). A worker that dies leaves its
  member key and leases to expire after ``ttl``;
- a bucket younger than ``ttl`` (deleted, by hand or by its limits, and made
  again; or made for the group's first start): every lease of the deleted one
  is gone at once, while each former holder still takes its own as valid for
  up to ``ttl - margin`` after its last confirmed renewal, sent before the
  deletion. So a worker takes no lease in a bucket until ``ttl`` after the
  bucket was made: at :meth:`Leases.open` its age is the server's time of the
  worker's member put less the bucket stream's ``created`` (both the server's
  clock), and a running worker that sees the stream's ``created`` change
  (:meth:`Leases._members`) drops what it held and waits ``ttl`` from then; a
  round that finds the bucket gone makes it again (:meth:`Leases._remake`: a
  worker holding no lease would idle for ever), and waits as long.
  Not at a group's first start: a bucket made within ``ttl`` after the group's
  consumers (``since``, the oldest one's ``created``) by the worker (or
  ``walex worker --declare``) that made those consumers is the group's first
  one; its maker says so in its description (:data:`FIRST`). A bucket made
  by a worker that found the consumers made, a deleted one made again even
  within ``ttl`` of the group's start, says :data:`AGAIN`, and is waited for.
  ``walex worker --declare`` makes the bucket with the consumers, so a first
  worker started later finds it as old as they are (:func:`open_bucket`);
- rounds failing (no answer, a permission missing) for longer than ``ttl``: one
  WARNING naming the bucket, the last error and what to check, one INFO once a
  round succeeds again (a worker holding nothing would otherwise idle silently).

The lease says who may pull and handle. The messages a former holder was
delivered and did not acknowledge are still pending on the server for it; the
lane handles nothing until they are all back (see
:mod:`walex.workers.natsbatch`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nats.js.errors import (
    KeyDeletedError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoStreamResponseError,
    NotFoundError,
)

__all__ = ["Leases", "bucket_name", "open_bucket", "reraise_cancel", "stream_key"]

log = logging.getLogger("walex.workers")

_KEY_SAFE = re.compile(r"^[-_=A-Za-z0-9]+$")


def reraise_cancel() -> None:
    """Raise CancelledError when the running task is being cancelled: nats-py answers a
    request or flush cancelled in flight with its TimeoutError."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def bucket_name(group: str) -> str:
    """The group's lease bucket (a group name is a valid bucket name: letters, digits, _ -)."""
    return f"walex_leases_{group}"


def stream_key(stream: str) -> str:
    """A stream name as the first token of its keys: itself, or ``x`` and its hex."""
    return stream if _KEY_SAFE.match(stream) else "x" + stream.encode().hex()


@dataclass(eq=False)
class Held:
    """A lease this worker holds."""

    partition: int
    revision: int
    valid_until: float  # local monotonic time the lease ends at, for this worker
    timer: asyncio.TimerHandle | None = None
    shedding: bool = False  # asked to give it back (above the target)


# the bucket's description, set when it is made: whether its maker had just made the
# group's consumers (the group's first bucket), or found them and the bucket missing (a
# deleted bucket made again, whose former holders may still take their leases as valid)
FIRST = "walex lease bucket, made with the group's consumers"
AGAIN = "walex lease bucket, made while the group's consumers existed"


async def open_bucket(js: Any, bucket: str, ttl: float, first: bool = False) -> Any:
    """The lease bucket, made when missing, the one place its parameters are set;
    ``first``: the caller made the group's consumers just now (else a bucket it makes
    counts as made again, :meth:`Leases._age`). A concurrent creation is fine (whatever
    the other made is used). ``walex worker --declare`` makes it too, so that a group's
    first worker, started later, finds it as old as the group's consumers."""
    try:
        return await js.key_value(bucket)
    except Exception:  # missing: create it
        pass
    try:
        return await js.create_key_value(bucket=bucket, history=1, ttl=ttl,
                                         description=FIRST if first else AGAIN)
    except Exception:  # made meanwhile by another worker (maybe the other description)
        reraise_cancel()
        return await js.key_value(bucket)


class Leases:
    """One worker's leases of one stream's partitions for a group.

    ``granted(p)`` is called when a lease is taken, ``lost(p, reason)`` when one
    ends without being given back (a renewal refused, or its validity passed),
    ``shed(p)`` when the worker holds more than its share and lane ``p`` should
    give it back (:meth:`release`) after the call in hand.
    """

    round_every = 1.0  # longest pause between two rounds (ttl / 3 when shorter)

    def __init__(self, nc: Any, group: str, stream: str, partitions: int, ttl: float,
                 granted: Callable[[int], None], lost: Callable[[int, str], None],
                 shed: Callable[[int], None], name: str = "",
                 scrub: Callable[[str], str] = lambda text: text, since: Any = None,
                 first: bool = False) -> None:
        # its own requests' timeout: a renewal not answered within ttl / 4 is as refused
        self.js = nc.jetstream(timeout=min(max(ttl / 4, 0.5), 5.0))
        self.bucket = bucket_name(group)
        self.prefix = stream_key(stream)
        self.partitions = partitions
        self.ttl = ttl
        self.id = f"{re.sub(r'[^-_A-Za-z0-9]', '_', name)[:32]}-{uuid.uuid4().hex[:12]}"
        self._granted, self._lost, self._shed = granted, lost, shed
        self.kv: Any = None
        self.held: dict[int, Held] = {}
        self.members: list[str] = []  # the live workers' ids, as the last round saw them
        self.stream_name = f"KV_{self.bucket}"
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        # one write per key at a time (renewal, release): a lock per partition
        self._locks: dict[int, asyncio.Lock] = {}
        self.rotation = zlib.crc32(self.id.encode()) % partitions
        self._scrub = scrub  # an error's text without the URL's secrets
        self.failing_since: float | None = None  # when the rounds began failing, in a row
        self._warned = False  # the failing rounds were told (a WARNING), once
        self.created: Any = None  # when the bucket's stream was made (the server's clock)
        self.since = since  # when the group's oldest consumer was made (the server's clock)
        self.first = first  # this worker made the group's consumers (a bucket it makes: FIRST)
        self.hold_until = 0.0  # local monotonic time before which no lease is taken

    @property
    def margin(self) -> float:
        return self.ttl / 4

    def key(self, partition: int) -> str:
        return f"{self.prefix}.p.{partition}"

    @property
    def member(self) -> str:
        return f"{self.prefix}.m.{self.id}"

    async def open(self) -> None:
        """Find or create the bucket (its ``max_age`` becomes the ttl), register, and run
        the rounds."""
        kv = await open_bucket(self.js, self.bucket, self.ttl, first=self.first)
        status = await kv.status()
        if status.ttl and abs(status.ttl - self.ttl) > 1e-3:
            log.warning("lease bucket %r has ttl=%gs (not the consumers' ack_wait=%gs): leases "
                        "last %gs", self.bucket, status.ttl, self.ttl, status.ttl)
            self.ttl = float(status.ttl)
        elif not status.ttl:
            raise RuntimeError(f"the lease bucket {self.bucket!r} has no ttl (max_age); delete it "
                               f"(nats kv rm {self.bucket}) and start the workers again")
        self.kv = kv
        try:
            revision = await kv.put(self.member, self.id.encode())
            await self._age(revision)
            await self.round()
        except Exception as exc:  # the worker tries again: say what to check meanwhile
            reraise_cancel()
            raise RuntimeError(
                f"the lease bucket {self.bucket!r} did not take this worker's writes "
                f"({self._scrub(f'{type(exc).__name__}: {exc}')}); check that NATS is "
                f"reachable and that the worker's user may publish to '$KV.{self.bucket}.>' "
                "and '$JS.API.>' (a publish the user may not make goes unanswered)") from None
        self._task = asyncio.get_running_loop().create_task(self._rounds(),
                                                             name=f"walex-leases-{self.bucket}")

    async def _age(self, revision: int) -> None:
        """A bucket made less than ``ttl`` ago: no lease taken before it is ``ttl`` old (a
        deleted bucket's former holders may still take theirs as valid). Its age is the
        server's time of this worker's member put (``revision``) less the stream's
        ``created``, both the server's clock."""
        info = await self.js.stream_info(self.stream_name)
        stored = await self.js.get_msg(self.stream_name, seq=revision)
        self.created = info.created
        if info.created is None or stored.time is None:
            return
        age = (stored.time - info.created).total_seconds()
        # the group's first bucket: made by the maker of the group's consumers, within ttl of
        # them (a bucket made again by a worker that found the consumers says AGAIN)
        first = self.since is not None and info.config is not None and \
            info.config.description == FIRST and \
            (info.created - self.since).total_seconds() < self.ttl
        if age < self.ttl and not first:
            self._hold(self.ttl - max(age, 0.0), f"is {max(age, 0.0):.1f}s old")

    async def _remake(self) -> None:
        """The bucket is gone (deleted): make it again, so the workers do not idle for ever
        (one that holds no lease never reconnects), and take no lease for ``ttl``."""
        try:
            self.kv = await open_bucket(self.js, self.bucket, self.ttl)
            self.created = (await self.js.stream_info(self.stream_name)).created
        except Exception as exc:  # no answer: the next round
            reraise_cancel()
            log.debug("making the lease bucket %r again: %r", self.bucket, exc)
            return
        for partition in list(self.held):
            self._end(partition, f"the lease bucket {self.bucket!r} was deleted")
        self._hold(self.ttl, "was deleted: this worker made it again")

    def _hold(self, seconds: float, why: str) -> None:
        self.hold_until = max(self.hold_until, time.monotonic() + seconds)
        log.info("worker %s: the lease bucket %r %s: it takes no partition for %.1fs (a worker "
                 "of a deleted bucket may still take its lease as valid until then)", self.id,
                 self.bucket, why, seconds)

    def valid(self, partition: int) -> bool:
        held = self.held.get(partition)
        return held is not None and time.monotonic() < held.valid_until

    def remaining(self, partition: int) -> float:
        held = self.held.get(partition)
        return 0.0 if held is None else held.valid_until - time.monotonic()

    async def _rounds(self) -> None:
        # at most a second apart: a worker that joins gets its share within a round or two
        # (workers started together first see one another only in their next round)
        every = min(self.ttl / 3, self.round_every)
        due = time.monotonic()
        while not self._stopped:
            reraise_cancel()  # nats-py may have taken a cancellation in for itself
            due = max(due + every, time.monotonic() + every / 4)  # a cadence, not a pause
            await asyncio.sleep(due - time.monotonic())
            try:
                await self.round()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # no answer: the leases' own timers end them in time
                reraise_cancel()  # nats-py turns a cancelled request into a timeout
                self._failed(exc)
                if isinstance(exc, (NoStreamResponseError, NotFoundError)):
                    await self._remake()  # the bucket was deleted
            else:
                self._succeeded()

    def _failed(self, exc: Exception) -> None:
        """A round failed: a WARNING, once, when they have failed for longer than ttl.

        Not sooner: a blip shorter than ttl costs no lease a round later renews (they
        last ttl - margin from the last confirmed renewal, each lost one told as it
        ends); after ttl every lease is gone and the worker handles nothing, which must
        not stay silent. The rounds are at most ttl / 3 apart: three failed at least.
        Once (until a round succeeds): a worker left failing logs nothing more."""
        now = time.monotonic()
        error = self._scrub(f"{type(exc).__name__}: {exc}")
        log.debug("lease round of %r failed: %s", self.bucket, error)
        if self.failing_since is None:
            self.failing_since = now
        elif not self._warned and now - self.failing_since > self.ttl:
            self._warned = True
            log.warning(
                "worker %s: its lease rounds in bucket %r have failed for %.1fs (leases last "
                "%gs; last error: %s): it takes no partition until a round succeeds (it holds "
                "%d now, each only while its renewals are confirmed). Check that NATS is "
                "reachable and that the worker's user may publish to '$KV.%s.>' and "
                "'$JS.API.>' (the server drops a publish the user may not make, so a missing "
                "permission shows as a timeout; the server's log names it)",
                self.id, self.bucket, now - self.failing_since, self.ttl, error, len(self.held),
                self.bucket)

    def trouble(self) -> str | None:
        """Once the rounds have failed for longer than the leases last (the WARNING said so):
        what ``/healthz`` reports; else None."""
        if not self._warned or self.failing_since is None:
            return None
        return (f"its lease rounds in bucket {self.bucket!r} have failed for "
                f"{time.monotonic() - self.failing_since:.0f}s: it takes no partition")

    def _succeeded(self) -> None:
        if self._warned:
            log.info("worker %s: its lease rounds in bucket %r work again (after %.1fs of "
                     "failures); it holds %d partition(s)", self.id, self.bucket,
                     time.monotonic() - (self.failing_since or time.monotonic()), len(self.held))
        self.failing_since = None
        self._warned = False

    async def round(self) -> None:
        """Renew; count the members; take free partitions up to the share, shed the rest."""
        kv = self.kv
        await kv.put(self.member, self.id.encode())
        for partition in list(self.held):
            await self._renew(partition)
        members = await self._members()
        if members != self.members:
            log.info("worker %s: %d worker(s) of group %r on stream %r: %s", self.id,
                     len(members), self.bucket[len("walex_leases_"):], self.prefix,
                     ", ".join(members))
        self.members = members
        # the share: partitions // members, one more for the first partitions % members
        # workers by id (the same ranks in every worker's view of the same members)
        rank = members.index(self.id) if self.id in members else len(members)
        target = self.partitions // len(members) + \
            (1 if rank < self.partitions % len(members) else 0)
        order = [(self.rotation + i) % self.partitions for i in range(self.partitions)]
        for partition in order:
            if len(self.held) >= target or time.monotonic() < self.hold_until:
                break
            if partition in self.held:
                continue
            await self._take(partition)
        keep = [p for p in order if p in self.held and not self.held[p].shedding]
        for partition in keep[target:]:
            self.held[partition].shedding = True
            log.info("worker %s gives partition %d back (%d workers share %d partitions)",
                     self.id, partition, len(self.members), self.partitions)
            self._shed(partition)

    async def _members(self) -> list[str]:
        """The ids of the live workers: the member keys the bucket holds (the stream's
        subjects), less those whose last entry is a delete marker."""
        head = f"$KV.{self.bucket}.{self.prefix}.m."
        info = await self.js.stream_info(self.stream_name, subjects_filter=head + ">")
        if info.created is not None and self.created is not None and \
                info.created != self.created:  # deleted and made again: its leases are gone
            self.created = info.created
            for partition in list(self.held):
                self._end(partition, f"the lease bucket {self.bucket!r} was deleted")
            self._hold(self.ttl, "was deleted and made again")
        live = []
        for subject in sorted((info.state.subjects or {}) if info.state is not None else {}):
            try:
                await self.kv.get(subject[len(f"$KV.{self.bucket}."):])
            except (KeyDeletedError, KeyNotFoundError):
                continue
            live.append(subject[len(head):])
        return live or [self.id]

    async def _take(self, partition: int) -> None:
        sent = time.monotonic()
        try:
            revision = await self.kv.create(self.key(partition), self.id.encode())
        except KeyWrongLastSequenceError:  # someone holds it
            return
        held = self.held[partition] = Held(partition, revision, sent + self.ttl - self.margin)
        self._arm(held)
        log.debug("worker %s took partition %d (revision %d)", self.id, partition, revision)
        self._granted(partition)

    def _lock(self, partition: int) -> asyncio.Lock:
        lock = self._locks.get(partition)
        if lock is None:
            lock = self._locks[partition] = asyncio.Lock()
        return lock

    async def _renew(self, partition: int) -> None:
        async with self._lock(partition):
            held = self.held.get(partition)
            if held is None:
                return
            sent = time.monotonic()
            try:
                revision = await self.kv.update(self.key(partition), self.id.encode(),
                                                last=held.revision)
            except KeyWrongLastSequenceError:
                self._end(partition, "its lease was taken over (renewal refused)")
                return
            except Exception as exc:  # not confirmed: the lease ends when it was to
                log.debug("renewing the lease of partition %d: %r", partition, exc)
                return
            if self.held.get(partition) is held:
                held.revision = revision
                held.valid_until = sent + self.ttl - self.margin
                self._arm(held)

    def _arm(self, held: Held) -> None:
        if held.timer is not None:
            held.timer.cancel()
        held.timer = asyncio.get_running_loop().call_later(
            max(held.valid_until - time.monotonic(), 0.0), self._expire, held)

    def _expire(self, held: Held) -> None:
        if self.held.get(held.partition) is held and time.monotonic() >= held.valid_until:
            self._end(held.partition, f"its lease was not renewed in time (ttl={self.ttl:g}s): "
                                      "another worker may take the partition")
        elif self.held.get(held.partition) is held:
            self._arm(held)

    def _end(self, partition: int, reason: str) -> None:
        held = self.held.pop(partition, None)
        if held is None:
            return
        if held.timer is not None:
            held.timer.cancel()
        log.warning("worker %s lost partition %d: %s", self.id, partition, reason)
        self._lost(partition, reason)

    async def release(self, partition: int) -> None:
        """Give the lease back (the lane gave back its messages): delete the key, so
        another worker can take it at once. Never raises."""
        async with self._lock(partition):
            held = self.held.pop(partition, None)
            if held is None:
                return
            if held.timer is not None:
                held.timer.cancel()
            if time.monotonic() >= held.valid_until:
                return
            try:
                await self.kv.delete(self.key(partition), last=held.revision)
            except Exception as exc:  # it expires after ttl
                log.debug("giving back the lease of partition %d: %r", partition, exc)

    async def stop(self) -> None:
        """Stop the rounds (no lease is taken or shed any more; held ones still count)."""
        self._stopped = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def close(self) -> None:
        """Stop the rounds, give back the leases still held and the member key. Never
        raises (what is not deleted expires)."""
        await self.stop()
        # all at once: a server gone silent answers none, and each waits for the requests'
        # timeout (one after the other, a stopping worker waited that long per partition, up
        # to the leases' validity, ttl * 3/4)
        await asyncio.gather(*(self.release(p) for p in list(self.held)), self._leave())

    async def _leave(self) -> None:
        if self.kv is not None:
            try:
                await self.kv.delete(self.member)
            except Exception as exc:
                log.debug("removing member %s: %r", self.id, exc)
