"""Password hashing (argon2id through argon2-cffi) and generation."""

from __future__ import annotations

import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from memberhub.kit.errors import ValidationFailed

MIN_LENGTH = 12
MAX_LENGTH = 200
_HASHER = PasswordHasher()
# Verified when an account has no password (or does not exist), so the time taken does not
# tell which.
_DECOY_HASH = _HASHER.hash(secrets.token_urlsafe(16))


def check_strength(password: str) -> None:
    if not MIN_LENGTH <= len(password) <= MAX_LENGTH:
        raise ValidationFailed(
            f"A password has {MIN_LENGTH} to {MAX_LENGTH} characters.",
            details={"field": "password"},
            code="WEAK_PASSWORD",
        )


def hash_password(password: str) -> str:
    check_strength(password)
    return _HASHER.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    if len(password) > MAX_LENGTH:
        return False
    try:
        return _HASHER.verify(stored_hash or _DECOY_HASH, password) and stored_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def generate_password() -> str:
    return secrets.token_urlsafe(18)
