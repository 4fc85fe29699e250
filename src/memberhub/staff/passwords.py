"""Password hashing (argon2id through argon2-cffi) and generation."""

from __future__ import annotations

import functools
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from argon2.profiles import RFC_9106_LOW_MEMORY

from memberhub.kit.errors import ValidationFailed

MIN_LENGTH = 12
MAX_LENGTH = 200
# argon2id with RFC 9106's second recommended option (3 passes over 64 MiB, 4 lanes), which
# argon2-cffi also defaults to, named here so that a library upgrade cannot change it. A hash
# carries its own parameters: hashes made with others still verify.
PARAMETERS = RFC_9106_LOW_MEMORY
_HASHER = PasswordHasher.from_parameters(PARAMETERS)


@functools.cache
def decoy_hash() -> str:
    """Verified when an account has no password (or does not exist), so the time taken does
    not tell which. Made once per process, on first use or when the API starts (not at
    import: the CLI and the worker never need it, and hashing costs a sixth of a second)."""
    return _HASHER.hash(secrets.token_urlsafe(16))


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
        return _HASHER.verify(stored_hash or decoy_hash(), password) and stored_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def generate_password() -> str:
    return secrets.token_urlsafe(18)
