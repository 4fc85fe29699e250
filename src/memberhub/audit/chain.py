"""The audit chain's hash: each entry's content and the hash of the entry before it."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any, Protocol

GENESIS_HASH = "0" * 64


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


def entry_hash(entry: ChainedEntry, prev_hash: str) -> str:
    """The hash of an entry as stored (read back from the database, so what is hashed is what
    a later check reads), chained to `prev_hash`."""
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
    return hashlib.sha256(canonical.encode()).hexdigest()
