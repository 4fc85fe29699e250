"""What the public endpoints parse from others: sender addresses and token responses."""

from __future__ import annotations

import math
from typing import Any

import pytest

from memberhub.integrations.hub import token_fields
from memberhub.integrations.inbound import _source_allowed

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("source", "allowed", "expected"),
    [
        ("203.0.113.7", ["203.0.113.0/24"], True),
        ("::ffff:203.0.113.7", ["203.0.113.0/24"], True),  # a dual-stack listener's IPv4
        ("198.51.100.1", ["203.0.113.0/24"], False),
        ("2001:db8::1", ["2001:db8::/32"], True),
        ("not-an-address", ["203.0.113.0/24"], False),
        (None, ["203.0.113.0/24"], False),
        ("198.51.100.1", [], True),
        ("203.0.113.7", ["garbage", "203.0.113.7"], True),  # a bad entry is skipped
    ],
)
def test_source_allowlist(source: str | None, allowed: list[str], expected: bool) -> None:
    assert _source_allowed(source, allowed) is expected


def test_token_fields_take_what_rfc_6749_names() -> None:
    answer = {
        "access_token": "at-1",
        "refresh_token": "rt-1",
        "expires_in": 3600,
        "token_type": "Bearer",
        "scope": "contacts",
    }
    assert token_fields(answer, now=NOW) == {
        "access_token": "at-1",
        "refresh_token": "rt-1",
        "expires_at": int(NOW) + 3600,
        "token_type": "Bearer",
        "scope": "contacts",
    }
    assert token_fields({"access_token": "at", "expires_in": "60"}, now=NOW)["expires_at"] == (
        int(NOW) + 60
    )


@pytest.mark.parametrize("lifetime", [math.inf, math.nan, -5, 10**30, True, "soon"])
def test_token_lifetimes_that_make_no_sense_are_left_out(lifetime: Any) -> None:
    assert token_fields({"access_token": "at", "expires_in": lifetime}, now=NOW) == {
        "access_token": "at"
    }


@pytest.mark.parametrize(
    "answer", [[], None, "token", {}, {"access_token": ""}, {"access_token": 5}]
)
def test_answers_without_an_access_token_are_refused(answer: Any) -> None:
    with pytest.raises(ValueError, match="token response"):
        token_fields(answer, now=NOW)
