"""The audit chain's seal: a canonical text that every backend reads back the same, and a key
derived from the master secret."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memberhub.audit.chain import (
    GENESIS_HASH,
    ChainHead,
    ChainKey,
    canonical_entry,
    canonical_json,
    canonical_number,
    entry_hash,
    legacy_entry_hash,
)
from memberhub.kit.crypto import SecretBox

SECRET = "a-master-secret-of-at-least-32-characters"


@dataclass(frozen=True)
class Entry:
    occurred_at: datetime
    actor: str
    action: str
    object_type: str
    object_id: str
    changes: dict[str, Any]
    request_id: str | None
    client_ip: str | None


ENTRY = Entry(
    occurred_at=datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
    actor="key_abc",
    action="program.update",
    object_type="program",
    object_id="1",
    changes={"alert_thresholds": {"before": 20.0, "after": -0.0}},
    request_id="req-1",
    client_ip="127.0.0.1",
)


def seal(entry: Entry, key: ChainKey | None = None) -> str:
    return entry_hash(entry, position=7, prev_hash=GENESIS_HASH, key=key or ChainKey(SECRET))


# --- numbers: their decimal value, whatever the notation --------------------------------


@pytest.mark.parametrize(
    ("written", "read_back"),
    [
        (-0.0, 0.0),  # jsonb has no negative zero
        (-0.0, 0),
        (20.0, 20),  # an integral float read back as written, or as an int
        (1e20, 10**20),  # jsonb writes exponents out in full
        (1e300, 10**300),
        (1e-7, Decimal("0.0000001")),
        (1.5, Decimal("1.50")),  # jsonb keeps the scale: 1.50
        (5e-324, Decimal("0." + "0" * 323 + "5")),  # written out in full
        (2**70, 2**70),
    ],
)
def test_a_number_has_one_canonical_text_however_it_is_read_back(
    written: float, read_back: float | Decimal
) -> None:
    assert canonical_number(written) == canonical_number(read_back)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0"),
        (-0.0, "0"),
        (20, "2e1"),
        (20.0, "2e1"),
        (-20.5, "-205e-1"),
        (0.1, "1e-1"),
        (123456789012345678901234567890, "12345678901234567890123456789e1"),
        (float("nan"), "NaN"),
        (float("-inf"), "-Infinity"),
    ],
)
def test_canonical_number_is_digits_and_a_power_of_ten(value: float, text: str) -> None:
    assert canonical_number(value) == text


def test_large_integers_keep_every_digit() -> None:
    assert canonical_number(10**40 + 1) != canonical_number(10**40)
    assert canonical_number(2**63 + 1) == "9223372036854775809"


def test_booleans_are_not_numbers() -> None:
    assert canonical_json([True, False, 1, 0]) == "[true,false,1,0]"


# --- objects, strings -----------------------------------------------------------------


def test_objects_are_written_with_sorted_keys_and_no_whitespace() -> None:
    # jsonb orders keys by length first; SQLite keeps them as written.
    assert canonical_json({"bb": 1, "a": [1, {"z": None, "y": "x"}]}) == (
        '{"a":[1,{"y":"x","z":null}],"bb":1}'
    )
    assert canonical_json({"bb": 1, "a": 2}) == canonical_json({"a": 2, "bb": 1})


def test_strings_are_ascii_with_escapes_even_a_lone_surrogate() -> None:
    assert canonical_json("é\u2028😀") == '"\\u00e9\\u2028\\ud83d\\ude00"'
    assert canonical_json("\ud800") == '"\\ud800"'
    assert canonical_json("é") != canonical_json("e\u0301")  # no normalisation: none happens


def test_values_that_are_not_json_are_refused() -> None:
    with pytest.raises(TypeError):
        canonical_json({1: "x"})
    with pytest.raises(TypeError):
        canonical_json({"when": datetime.now(UTC)})


def _as_jsonb_returns(value: Any) -> Any:
    """What PostgreSQL's jsonb gives back for a value written as JSON: keys reordered, each
    number a `numeric` (no negative zero, exponents written out) read back by a JSON reader."""
    if isinstance(value, dict):
        return {k: _as_jsonb_returns(value[k]) for k in sorted(value, key=lambda k: (len(k), k))}
    if isinstance(value, list):
        return [_as_jsonb_returns(v) for v in value]
    if isinstance(value, float):
        text = format(Decimal(repr(value)), "f")
        return json.loads(text.lstrip("-") if Decimal(text) == 0 else text)
    return value


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00")),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)


@given(json_values)
def test_canonical_text_survives_a_json_round_trip_and_jsonb(value: Any) -> None:
    canonical = canonical_json(value)
    assert canonical_json(json.loads(json.dumps(value))) == canonical
    assert canonical_json(_as_jsonb_returns(value)) == canonical
    assert canonical.isascii()


def _canonical_by_definition(value: Any) -> str:
    """The canonical text as the module docstring defines it, written plainly."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=True)
    if isinstance(value, int | float | Decimal):
        return canonical_number(value)
    if isinstance(value, dict):
        members = [f"{json.dumps(k)}:{_canonical_by_definition(value[k])}" for k in sorted(value)]
        return "{" + ",".join(members) + "}"
    return "[" + ",".join(_canonical_by_definition(item) for item in value) + "]"


@given(json_values | st.integers() | st.integers(min_value=10**17, max_value=10**19))
def test_canonical_text_is_the_definition(value: Any) -> None:
    """The writer takes shortcuts for the common types (an integer's digits without a
    Decimal, strings without `json.dumps`): the text is still the definition's."""
    assert canonical_json(value) == _canonical_by_definition(value)


# --- entries ----------------------------------------------------------------------------


def test_an_entry_seals_the_same_whichever_way_the_database_returns_it() -> None:
    from_postgres = replace(
        ENTRY,
        occurred_at=ENTRY.occurred_at.astimezone(timezone(timedelta(hours=8))),
        changes={"alert_thresholds": {"after": 0, "before": 20}},
    )
    assert seal(from_postgres) == seal(ENTRY)


@pytest.mark.parametrize(
    "edit",
    [
        {"changes": {"alert_thresholds": {"before": 20.0, "after": 0.5}}},
        {"actor": "key_other"},
        {"action": "program.delete"},
        {"object_type": "member"},
        {"object_id": "2"},
        {"request_id": None},
        {"client_ip": "10.0.0.1"},
        {"occurred_at": ENTRY.occurred_at + timedelta(microseconds=1)},
    ],
)
def test_any_edit_changes_the_seal(edit: dict[str, Any]) -> None:
    assert seal(replace(ENTRY, **edit)) != seal(ENTRY)


def test_the_seal_covers_the_position_and_the_link() -> None:
    key = ChainKey(SECRET)
    base = entry_hash(ENTRY, position=7, prev_hash=GENESIS_HASH, key=key)
    assert entry_hash(ENTRY, position=8, prev_hash=GENESIS_HASH, key=key) != base
    assert entry_hash(ENTRY, position=7, prev_hash="1" * 64, key=key) != base


def test_the_seal_is_an_hmac_no_one_without_the_secret_can_compute() -> None:
    text = canonical_entry(ENTRY, position=7, prev_hash=GENESIS_HASH)
    assert seal(ENTRY) != hashlib.sha256(text.encode()).hexdigest()
    assert seal(ENTRY) != legacy_entry_hash(ENTRY, GENESIS_HASH)
    assert seal(ENTRY, ChainKey("another-master-secret-of-32-characters")) != seal(ENTRY)


def test_the_chain_key_is_derived_for_its_own_purpose() -> None:
    key = ChainKey(SECRET)
    assert key.seal == f"hmac-sha256-v1:{key.key_id}"
    assert key.key_id != SecretBox(SECRET).key_id  # not the key that encrypts secrets
    assert SECRET not in repr(key)
    assert ChainKey(SECRET).seal == key.seal


def test_legacy_hash_is_the_one_entries_were_linked_with_before() -> None:
    content = {
        "prev_hash": GENESIS_HASH,
        "occurred_at": ENTRY.occurred_at.isoformat(),
        "actor": ENTRY.actor,
        "action": ENTRY.action,
        "object_type": ENTRY.object_type,
        "object_id": ENTRY.object_id,
        "changes": ENTRY.changes,
        "request_id": ENTRY.request_id,
        "client_ip": ENTRY.client_ip,
    }
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert legacy_entry_hash(ENTRY, GENESIS_HASH) == hashlib.sha256(text.encode()).hexdigest()


# --- heads ------------------------------------------------------------------------------


def test_a_head_is_written_and_read_as_position_colon_hash() -> None:
    head = ChainHead(12, "ab" * 32)
    assert ChainHead.parse(str(head)) == head
    assert ChainHead.parse(f" 12:{'AB' * 32}\n") == head


@pytest.mark.parametrize(
    "text", ["", "12", f"x:{'a' * 64}", "12:abc", f"-1:{'a' * 64}", "12:" + "g" * 64]
)
def test_a_malformed_head_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a chain head"):
        ChainHead.parse(text)
