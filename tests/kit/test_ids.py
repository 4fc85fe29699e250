"""Public ids: a type prefix and 20 characters of the lower-case Crockford alphabet."""

from __future__ import annotations

import re
from collections import Counter

from memberhub.kit.ids import _ALPHABET, new_public_id, new_public_ids

PUBLIC_ID = re.compile(r"^txn_[0-9abcdefghjkmnpqrstvwxyz]{20}$")


def test_ids_made_many_at_a_time_look_like_ids_made_one_at_a_time() -> None:
    many = new_public_ids("txn", 500)
    assert len(many) == 500
    assert all(PUBLIC_ID.match(public_id) for public_id in [*many, new_public_id("txn")])
    assert len(set(many)) == 500
    assert new_public_ids("txn", 0) == []


def test_ids_made_many_at_a_time_use_every_character_about_as_often() -> None:
    counts = Counter("".join(public_id[4:] for public_id in new_public_ids("txn", 3200)))
    # 64,000 characters, 2,000 expected of each: far outside these only by a broken mapping.
    assert set(counts) == set(_ALPHABET)
    assert all(1700 < count < 2300 for count in counts.values())
