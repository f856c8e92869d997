"""Hostile subject templates in a NATS worker's source URL are ConfigErrors.

A wildcard in the template's own text made a filter take more than the relay's subjects
(``walex.>``, ``walex.{table}.*.{partition}``); white space or a control character was
dropped from the filter (``walex.{table} x`` filtered as ``walex.*``); an empty token
made a filter the server refuses at every attempt, so the worker retried for ever.
"""

from __future__ import annotations

import pytest

from walex import Events
from walex.errors import ConfigError
from walex.workers import Worker

HOSTILE = {
    "walex.>": "'>'",
    "walex.{schema}.>": "'>'",
    "walex.{table}.*.{partition}&partitions=2": "'\\*'",
    "walex.{table}*": "'\\*'",
    "walex.{table} x": "' '",
    "walex.{table}%09x": "'\\\\t'",
    "walex.{table}%00": "'\\\\x00'",
    "walex.{table}.": "an empty token",
    "walex.{table}..{partition}&partitions=2": "an empty token",
}


@pytest.mark.parametrize("subject", sorted(HOSTILE))
def test_hostile_subject_templates_are_config_errors(subject: str) -> None:
    events = Events()
    events.on_event("t")(lambda batch: None)
    with pytest.raises(ConfigError, match=rf"subject template .* holds {HOSTILE[subject]}: "
                                          r".*give the relay's subject=") as caught:
        Worker(f"nats://user:sekret@h:4222?stream=S&subject={subject}", [events])
    assert "sekret" not in str(caught.value)


@pytest.mark.parametrize("subject", ["walex.{schema}.{table}.{partition}&partitions=2",
                                     "w.{schema}.{table}.{type}.{partition}&partitions=3",
                                     "walex.{schema}.{table}", "a-b_c.{table}"])
def test_the_relay_s_templates_are_taken(subject: str) -> None:
    events = Events()
    events.on_event("t")(lambda batch: None)
    Worker(f"nats://h:4222?stream=S&subject={subject}", [events])
