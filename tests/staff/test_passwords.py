"""Password hashing at the product's own cost (the rest of the suite hashes cheaply)."""

from __future__ import annotations

import pytest
from argon2 import PasswordHasher

from memberhub.kit.errors import ValidationFailed
from memberhub.staff.passwords import decoy_hash, hash_password, verify_password

pytestmark = pytest.mark.usefixtures("real_password_hashing")

PRODUCT_PREFIX = "$argon2id$v=19$m=65536,t=3,p=4$"


def test_passwords_are_hashed_with_argon2id_over_64_mib_in_three_passes() -> None:
    stored = hash_password("correct horse battery")
    assert stored.startswith(PRODUCT_PREFIX), stored
    assert hash_password("correct horse battery") != stored, "a salt of its own each time"
    assert verify_password(stored, "correct horse battery")
    assert not verify_password(stored, "correct horse batterY")


def test_a_hash_made_with_other_parameters_still_verifies() -> None:
    cheaper = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash("an older password")
    assert verify_password(cheaper, "an older password")
    assert not verify_password(cheaper, "another password")


def test_an_account_without_a_password_never_verifies_and_costs_as_much() -> None:
    assert decoy_hash().startswith(PRODUCT_PREFIX)
    assert not verify_password(None, "correct horse battery")
    assert not verify_password("not a hash", "correct horse battery")
    assert not verify_password(hash_password("correct horse battery"), "x" * 201)


def test_short_passwords_are_refused_before_hashing() -> None:
    with pytest.raises(ValidationFailed):
        hash_password("too short")
