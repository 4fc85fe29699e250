"""Public identifiers: a type prefix and a random, URL-safe body (`mem_3kq...`)."""

from __future__ import annotations

import secrets

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case


def new_public_id(prefix: str, length: int = 20) -> str:
    body = "".join(secrets.choice(_ALPHABET) for _ in range(length))
    return f"{prefix}_{body}"
