"""A hash-chained audit log.

Services call `record_write`; the entries are held on the session and written, chained to
the newest entry, just before the transaction commits. Holding the chain lock only for that
last moment keeps concurrent writers from serialising on it for longer than the commit.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import event, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from memberhub.audit.models import AuditEntry
from memberhub.audit.repository import AuditRepository
from memberhub.kit.actor import Actor
from memberhub.kit.clock import utcnow
from memberhub.kit.db import lock_commit_order
from memberhub.kit.pending import is_savepoint_release, pending, track_savepoints

GENESIS_HASH = "0" * 64
_PENDING_KEY = "memberhub.pending_audit"


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def diff(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Fields whose value differs, as {"field": {"before": ..., "after": ...}}."""
    changed: dict[str, Any] = {}
    for field in sorted(set(before) | set(after)):
        old, new = before.get(field), after.get(field)
        if old != new:
            changed[field] = {"before": _jsonable(old), "after": _jsonable(new)}
    return changed


def record_write(
    session: AsyncSession,
    actor: Actor,
    *,
    action: str,
    object_type: str,
    object_id: str,
    changes: dict[str, Any],
) -> None:
    pending(session.sync_session, _PENDING_KEY).append(
        AuditEntry(
            occurred_at=utcnow(),
            actor=actor.id,
            action=action,
            object_type=object_type,
            object_id=object_id,
            changes=_jsonable(changes),
            request_id=actor.request_id,
            client_ip=actor.client_ip,
        )
    )


def entry_hash(entry: AuditEntry, prev_hash: str) -> str:
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


track_savepoints(_PENDING_KEY)


@event.listens_for(Session, "before_commit")
def _append_pending_entries(session: Session) -> None:
    if is_savepoint_release(session):
        return
    held: list[AuditEntry] = session.info.pop(_PENDING_KEY, [])
    if not held:
        return
    lock_commit_order(session)
    prev_hash = session.execute(
        select(AuditEntry.hash).order_by(AuditEntry.id.desc()).limit(1)
    ).scalar_one_or_none()
    prev_hash = prev_hash or GENESIS_HASH
    for entry in held:
        entry.prev_hash = prev_hash
        entry.hash = entry_hash(entry, prev_hash)
        prev_hash = entry.hash
        session.add(entry)
    session.flush()


@dataclass(frozen=True)
class ChainVerdict:
    checked: int
    first_bad_id: int | None
    reason: str | None

    @property
    def intact(self) -> bool:
        return self.first_bad_id is None


def verify_entries(entries: Sequence[AuditEntry], prev_hash: str = GENESIS_HASH) -> ChainVerdict:
    for count, entry in enumerate(entries):
        if entry.prev_hash != prev_hash:
            return ChainVerdict(count, entry.id, "prev_hash does not match the previous entry")
        if entry_hash(entry, prev_hash) != entry.hash:
            return ChainVerdict(count, entry.id, "content does not match its hash")
        prev_hash = entry.hash
    return ChainVerdict(len(entries), None, None)


async def verify_chain(session: AsyncSession, *, chunk_size: int = 2000) -> ChainVerdict:
    """Walk the whole log in id order; report the first entry that was altered."""
    prev_hash = GENESIS_HASH
    after_id = 0
    checked = 0
    while True:
        rows = await AuditRepository(session).chunk_after(after_id, chunk_size)
        if not rows:
            return ChainVerdict(checked, None, None)
        verdict = verify_entries(rows, prev_hash)
        if not verdict.intact:
            return ChainVerdict(checked + verdict.checked, verdict.first_bad_id, verdict.reason)
        checked += len(rows)
        prev_hash = rows[-1].hash
        after_id = rows[-1].id
