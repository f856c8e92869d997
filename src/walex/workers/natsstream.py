"""The relay's JetStream stream, seen from a NATS worker (:mod:`walex.workers.nats`): used as
it is, never created (unless declared), the subject filters it must hold, and the check
(:func:`verify`) that it can feed the worker, and the check of a partition's consumer
(:func:`refuse`)."""

from __future__ import annotations

import json
from typing import Any

from nats.js.api import AckPolicy
from nats.js.errors import NotFoundError

from ..destinations.nats import NatsDestination
from ..errors import ConfigError

__all__ = ["_SourceStream", "_covers", "refuse", "verify"]


def _covers(pattern: str, subject: str) -> bool:
    """Whether every subject ``subject`` (which may hold wildcards) matches ``pattern``."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or have[i] == ">":
            return False
        if token != "*" and (token != have[i] or have[i] == "*"):
            return False
    return len(have) == len(want)


class _SourceStream(NatsDestination):
    """The relay's stream, seen from a worker: used as it is, never created (unless declared)."""

    create = False  # declare() creates it as the relay does
    role, subject_fix = "worker source", "give the relay's subject="

    async def _ensure_stream(self) -> None:
        if self.create:
            await super()._ensure_stream()
            return
        try:
            await self.js.stream_info(self.stream)
        except NotFoundError:
            raise ConfigError(
                f"worker source {self.display}: stream {self.stream!r} does not exist, and a "
                f"worker does not create it{await self.holder(self.stream_subjects[0])}: start "
                f"the relay first (it creates the stream), or declare it with 'walex worker "
                f"--declare SOURCE_URL'"
            ) from None
        except Exception as exc:
            raise self.unavailable("JetStream does not answer (is it enabled, -js?)", exc) from None

    async def holder(self, subject: str) -> str:
        """The words naming the other stream that holds ``subject``, if one does; else ''."""
        try:
            other = await self.js.find_stream_name_by_subject(subject)
        except Exception:  # none, or no answer: nothing to add
            return ""
        if not other or other == self.stream:
            return ""
        return (f"; the subjects {subject!r} are in stream {other!r} (is the stream name "
                f"mistyped? stream={other})")


async def verify(dest: _SourceStream, filters: list[str], partitions: int, display: str,
                 template: str) -> None:
    """Raise :class:`ConfigError` when the stream cannot feed a worker of these subject
    ``filters`` (one per partition): its subjects do not hold them, or its newest message
    was published with other ``partitions`` or to a subject none of the filters takes (the
    worker would idle for ever)."""
    try:
        info = await dest.js.stream_info(dest.stream)
    except NotFoundError:
        raise ConfigError(f"worker source {display}: stream {dest.stream!r} was "
                          "deleted; start the relay (it creates the stream)") from None
    subjects = list(info.config.subjects or [])
    for wanted in filters:
        if not any(_covers(have, wanted) for have in subjects):
            raise ConfigError(
                f"worker source {display}: stream {dest.stream!r} holds the subjects "
                f"{subjects}, not {wanted!r} (this worker's filter from the subject template "
                f"{template!r}){await dest.holder(wanted)}: give the worker the relay's "
                "stream= and subject="
            )
    last = info.state.last_seq if info.state is not None else 0
    if not last:
        return
    try:
        newest = await dest.js.get_msg(dest.stream, seq=last)
    except NotFoundError:  # just removed (limits): the next look tells
        return
    try:
        theirs = json.loads(newest.data).get("walexpartitions")
    except (ValueError, TypeError, AttributeError):
        theirs = None
    taken = any(_covers(f, newest.subject) for f in filters)
    mine = partitions
    if isinstance(theirs, int) and theirs != mine and (mine > 1 or not taken):
        raise ConfigError(
            f"worker source {display}: the relay publishes to stream {dest.stream!r} "
            f"with partitions={theirs} (its newest message, on {newest.subject!r}), and this "
            f"worker has partitions={mine}: its source URL must say the relay's partitions "
            f"(&partitions={theirs}), or partitions are never handled"
        )
    if not taken:
        raise ConfigError(
            f"worker source {display}: the newest message of stream {dest.stream!r} is "
            f"on {newest.subject!r}, which none of this worker's filters ({filters[0]!r}"
            f"{', ...' if mine > 1 else ''}) takes: give the worker the relay's subject= and "
            "partitions="
        )


def refuse(display: str, stream: str, name: str, config: Any, subject: str,
           prefetch: int) -> None:
    """A :class:`ConfigError` when the consumer ``name`` (its ``config``) cannot keep the
    order for a worker of this partition's ``subject`` filter and ``prefetch``."""
    if config.filter_subject != subject or config.ack_policy != AckPolicy.EXPLICIT:
        raise ConfigError(
            f"worker source {display}: the consumer {name!r} of stream {stream!r} "
            f"exists with filter_subject={config.filter_subject!r}, ack_policy="
            f"{config.ack_policy}; a worker needs {subject!r} and explicit to keep the order. "
            f"Delete it (nats consumer rm {stream} {name}) or use another group="
        )
    if config.max_ack_pending != prefetch:
        raise ConfigError(
            f"worker source {display}: the consumer {name!r} of stream {stream!r} "
            f"has max_ack_pending={config.max_ack_pending}, and this worker has prefetch="
            f"{prefetch} (it needs max_ack_pending={prefetch}; the workers of a "
            f"group share one prefetch). Stop the group's workers, then run 'walex worker "
            f"--declare SOURCE_URL' with prefetch={prefetch} in the URL (it updates the "
            f"consumers), or delete it (nats consumer rm {stream} {name}), or give "
            f"this worker prefetch={config.max_ack_pending}"
        )
