"""API key material: generation, lookup prefix and digest."""

from __future__ import annotations

import hashlib
import hmac
import secrets

KEY_PREFIX = "mh_"
_LOOKUP_LENGTH = len(KEY_PREFIX) + 12
_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def generate_key() -> str:
    return KEY_PREFIX + "".join(secrets.choice(_ALPHABET) for _ in range(44))


def lookup_prefix(key: str) -> str | None:
    """The indexed start of a key; None when `key` cannot be one (so it is never looked up)."""
    body = key[len(KEY_PREFIX) :]
    if not key.startswith(KEY_PREFIX) or len(key) < _LOOKUP_LENGTH + 8 or len(key) > 200:
        return None
    # Keys are ASCII letters and digits; anything else (a NUL, say) must not reach the database.
    if not (body.isascii() and body.isalnum()):
        return None
    return key[:_LOOKUP_LENGTH]


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def matches(key: str, stored_digest: str) -> bool:
    return hmac.compare_digest(digest(key), stored_digest)
