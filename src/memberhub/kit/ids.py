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


# Byte value -> a character of the alphabet, by its low 5 bits (256 = 8 x 32: uniform).
_BYTE_TO_CHARACTER = bytes(ord(_ALPHABET[value & 31]) for value in range(256))


def new_public_ids(prefix: str, count: int, length: int = 20) -> list[str]:
    """`count` ids as `new_public_id` makes them, from one read of the random source and a
    byte translation: a job giving ids to thousands of rows spends little on them."""
    body = secrets.token_bytes(count * length).translate(_BYTE_TO_CHARACTER).decode("ascii")
    return [f"{prefix}_{body[start : start + length]}" for start in range(0, len(body), length)]
