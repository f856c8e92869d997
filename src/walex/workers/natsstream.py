"""The relay's JetStream stream, seen from a NATS worker (:mod:`walex.workers.nats`): used as
it is, never created (unless declared), and the subject filters it must hold."""

from __future__ import annotations

from nats.js.errors import NotFoundError

from ..destinations.nats import NatsDestination
from ..errors import ConfigError

__all__ = ["_SourceStream", "_covers"]


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
