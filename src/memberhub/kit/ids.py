"""Public identifiers: a type prefix and a random, URL-safe body (`mem_3kq...`)."""

from __future__ import annotations

import secrets

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case


def new_public_id(prefix: str, length: int = 20) -> str:
    """`prefix_` and `length` characters carrying 5 random bits each (100 bits by default).

    One read of the system's random source per id: the bulk jobs make thousands at a time.
    """
    bits = int.from_bytes(secrets.token_bytes((length * 5 + 7) // 8), "big")
    body = []
    for _ in range(length):
        body.append(_ALPHABET[bits & 31])
        bits >>= 5
    return f"{prefix}_{''.join(body)}"
