"""The audit chain's seal: each entry's content, its place and the hash of the entry before
it, authenticated with a key derived from the master secret.

What is sealed is a canonical text of the entry as read back from the database, built so
that every backend and driver gives the same text for the same stored value:

- numbers are written as their exact decimal value (digits without trailing zeros and a
  power of ten; `-0.0` is `0`, `20.0` is `20`, `1e20` and `100000000000000000000` are the
  same), which is what PostgreSQL's jsonb keeps of a number (a `numeric`: it drops the sign
  of zero, keeps trailing zeros, and writes `1e20` out in full) and what a JSON reader turns
  back into the same `int` or `float`;
- object keys are sorted by code point (jsonb reorders them; SQLite keeps them as written),
  with no whitespace;
- strings are written in ASCII with `\\u` escapes (nothing to encode, even a lone surrogate);
- the time is UTC with microseconds, whatever offset the driver reads it with.

The seal is HMAC-SHA256 under a key derived (HKDF) from the master secret with a purpose
label of its own, so a person who can write to the database but does not hold the secret
cannot re-seal an entry they altered, nor the entries after it. Entries linked before the
chain was keyed carry no `seal` and a plain SHA-256 of another canonical text
(`legacy_entry_hash`); they are checked that way only when re-sealing them
(`memberhub audit reseal`, or `memberhub db upgrade` when it adds the seal).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from memberhub.kit.db import Database

GENESIS_HASH = "0" * 64
# The seal scheme: named in each entry's `seal` column, and part of what is authenticated.
SCHEME = "hmac-sha256-v1"
_KDF_INFO = b"memberhub audit chain v1"
# The migration that added `seal`: `memberhub db upgrade` re-seals the older entries after it.
KEYED_CHAIN_REVISION = "0010"
# Where a database's sessions carry the key (`Database(session_info=...)`).
_SESSION_INFO_KEY = "memberhub.audit_chain_key"


class ChainedEntry(Protocol):
    @property
    def occurred_at(self) -> datetime: ...
    @property
    def actor(self) -> str: ...
    @property
    def action(self) -> str: ...
    @property
    def object_type(self) -> str: ...
    @property
    def object_id(self) -> str: ...
    @property
    def changes(self) -> dict[str, Any]: ...
    @property
    def request_id(self) -> str | None: ...
    @property
    def client_ip(self) -> str | None: ...


class ChainKey:
    """The key that seals the audit chain, derived from the master secret. `seal` names the
    scheme and the key (a fingerprint of the derived key, never the key), so that an entry
    sealed under another secret is told apart from an altered one."""

    def __init__(self, master_secret: str) -> None:
        self._key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_KDF_INFO).derive(
            master_secret.encode()
        )
        self.key_id = hashlib.sha256(self._key).hexdigest()[:8]
        self.seal = f"{SCHEME}:{self.key_id}"

    def mac(self, text: str) -> str:
        return hmac.new(self._key, text.encode("ascii"), hashlib.sha256).hexdigest()

    def __repr__(self) -> str:
        return f"ChainKey(key_id={self.key_id!r})"


def session_info(key: ChainKey) -> dict[str, Any]:
    """For `Database(session_info=...)`: every session of that database can seal the chain."""
    return {_SESSION_INFO_KEY: key}


def session_key(session: AsyncSession) -> ChainKey | None:
    """The key the session's database seals the chain with; None when it was opened without
    one (it then leaves audit entries for a process that has it)."""
    key = session.info.get(_SESSION_INFO_KEY)
    return key if isinstance(key, ChainKey) else None


def database_key(db: Database) -> ChainKey | None:
    key = db.session_info.get(_SESSION_INFO_KEY)
    return key if isinstance(key, ChainKey) else None


@dataclass(frozen=True)
class ChainHead:
    """The newest linked entry: its position and hash (position 0 and the genesis hash for an
    empty chain). Written `POSITION:HASH`, to keep elsewhere and pass to `--expect-head`."""

    position: int
    hash: str

    def __str__(self) -> str:
        return f"{self.position}:{self.hash}"

    @classmethod
    def parse(cls, text: str) -> ChainHead:
        position, sep, digest = text.strip().partition(":")
        digest = digest.lower()
        if (
            not sep
            or not position.isdigit()
            or len(digest) != len(GENESIS_HASH)
            or any(c not in "0123456789abcdef" for c in digest)
        ):
            raise ValueError(
                f"'{text}' is not a chain head: POSITION:HASH, as `memberhub audit head` prints"
            )
        return cls(int(position), digest)


EMPTY_HEAD = ChainHead(0, GENESIS_HASH)


def canonical_number(value: int | float | Decimal) -> str:
    """The exact decimal value of a JSON number: digits with no trailing zeros and a power of
    ten (`2e1` for 20 and 20.0, `5e-1` for 0.5, `0` for -0.0). A float counts as the decimal
    of its shortest representation (what a JSON writer writes and the database keeps)."""
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        value = Decimal(repr(value))
    elif isinstance(value, int):
        value = Decimal(value)  # exact, whatever its size
    if value.is_nan():
        return "NaN"
    if value.is_infinite():
        return "Infinity" if value > 0 else "-Infinity"
    sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)
    written = "".join(map(str, digits))
    significant = written.rstrip("0")
    if not significant:
        return "0"
    exponent += len(written) - len(significant)
    return ("-" if sign else "") + significant + (f"e{exponent}" if exponent else "")


def canonical_json(value: Any) -> str:
    """The canonical text of a JSON value (see the module docstring)."""
    parts: list[str] = []
    _write_canonical(value, parts.append)
    return "".join(parts)


# Strings as `json.dumps(..., ensure_ascii=True)` writes them, without its per-call work.
_quoted = json.encoder.encode_basestring_ascii
# Integers below this are written by the fast path of `_write_canonical`.
_SMALL_INT = 10**18


def _write_canonical(value: Any, write: Callable[[str], object]) -> None:
    # Every write of an entry is sealed: the common types are tested first, by exact type.
    kind = type(value)
    if kind is str:
        write(_quoted(value))
    elif value is None:
        write("null")
    elif value is True:
        write("true")
    elif value is False:
        write("false")
    elif kind is int and -_SMALL_INT < value < _SMALL_INT:
        digits = str(abs(value))
        significant = digits.rstrip("0")
        if not significant:
            write("0")
        else:
            zeros = len(digits) - len(significant)
            write(("-" if value < 0 else "") + significant + (f"e{zeros}" if zeros else ""))
    elif isinstance(value, str):
        write(_quoted(value))
    elif isinstance(value, int | float | Decimal):
        write(canonical_number(value))
    elif isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise TypeError("JSON object keys are strings")
        write("{")
        for index, key in enumerate(sorted(value)):
            write(f",{_quoted(key)}:" if index else f"{_quoted(key)}:")
            _write_canonical(value[key], write)
        write("}")
    elif isinstance(value, list | tuple):
        write("[")
        for index, item in enumerate(value):
            if index:
                write(",")
            _write_canonical(item, write)
        write("]")
    else:
        raise TypeError(f"{type(value).__name__} is not a JSON value")


def canonical_time(value: datetime) -> str:
    """UTC, microseconds, `Z`: the same text for the same instant on every backend."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def canonical_entry(entry: ChainedEntry, *, position: int, prev_hash: str) -> str:
    """What an entry's seal authenticates: the scheme, its place, the link to the entry
    before it and its content."""
    return canonical_json(
        {
            "scheme": SCHEME,
            "position": position,
            "prev_hash": prev_hash,
            "occurred_at": canonical_time(entry.occurred_at),
            "actor": entry.actor,
            "action": entry.action,
            "object_type": entry.object_type,
            "object_id": entry.object_id,
            "changes": entry.changes,
            "request_id": entry.request_id,
            "client_ip": entry.client_ip,
        }
    )


def entry_hash(entry: ChainedEntry, *, position: int, prev_hash: str, key: ChainKey) -> str:
    """The seal of an entry as stored (read back from the database, so that what is sealed is
    what a later check reads), at `position` and chained to `prev_hash`."""
    return key.mac(canonical_entry(entry, position=position, prev_hash=prev_hash))


def legacy_entry_hash(entry: ChainedEntry, prev_hash: str) -> str:
    """The unkeyed hash entries were linked with before the chain was keyed (no `seal`), as
    that version computed it; only for checking those entries before re-sealing them."""
    content = {
        "prev_hash": prev_hash,
        "occurred_at": entry.occurred_at.isoformat(),
        "actor": entry.actor,
        "action": entry.action,
        "object_type": entry.object_type,
        "object_id": entry.object_id,
        "changes": entry.changes,
        "request_id": entry.request_id,
        "client_ip": entry.client_ip,
    }
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # That version failed on a lone surrogate instead; for every text it could hash, the same.
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()
