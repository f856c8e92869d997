"""Workers are tested against the brokers of the destination tests (see its conftest)."""

from destinations.conftest import require, unique  # noqa: F401 - the fixture, shared

__all__ = ["require", "unique"]
