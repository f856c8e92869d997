"""A relay's NATS subject template whose own text holds a wildcard, white space, a control
character or an empty token is a ConfigError at once.

JetStream stores a message published to ``walex.>`` or ``walex.*`` as a literal subject
(which no worker's filter can tell from the others), and refuses ``walex.{table} x`` or
``walex.{table}.`` at every attempt, which the relay retried for ever.
"""

from __future__ import annotations

import pytest

from walex.destinations import from_url
from walex.errors import ConfigError

HOSTILE = {
    "walex.>": "'>'",
    "walex.*": "'\\*'",
    "walex.{schema}.>": "'>'",
    "walex.{table}.*.{partition}": "'\\*'",
    "walex.{table} x": "' '",
    "walex.{table}%09x": "'\\\\t'",
    "walex.{table}%00": "'\\\\x00'",
    "walex.{table}.": "an empty token",
    "walex..{table}": "an empty token",
}


@pytest.mark.parametrize("subject", sorted(HOSTILE))
def test_hostile_subject_templates_are_config_errors(subject: str) -> None:
    with pytest.raises(ConfigError, match=rf"destination .* subject template .* holds "
                                          rf"{HOSTILE[subject]}: .*give subject=") as caught:
        from_url(f"nats://user:sekret@h:4222?stream=S&subject={subject}", partitions=2)
    assert "sekret" not in str(caught.value)


@pytest.mark.parametrize("subject", ["walex.{schema}.{table}.{partition}",
                                     "w.{schema}.{table}.{type}.{partition}",
                                     "walex.{schema}.{table}", "a-b_c.{table}", "fixed.one"])
def test_usual_templates_are_taken(subject: str) -> None:
    dest = from_url(f"nats://h:4222?stream=S&subject={subject}", partitions=2)
    assert dest.subject.text == subject
