"""A hash-chained audit log.

Services call `record_write`; the entry is written in the caller's transaction with no link.
After it commits, the sequencer (`events/sequencer.py`) gives it its place in the chain and
its hash, chained to the entry before it, so writers never wait on one another for the
chain. `verify_chain` walks the chain in that order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.audit.chain import GENESIS_HASH, entry_hash
from memberhub.audit.models import AuditEntry
from memberhub.audit.repository import AuditRepository
from memberhub.events.sequencer import mark_for_sequencing
from memberhub.kit.actor import Actor
from memberhub.kit.clock import utcnow

__all__ = ["GENESIS_HASH", "ChainVerdict", "diff", "entry_hash", "record_write", "verify_chain"]


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
    """Add the audit entry of a write to the caller's transaction (at its next flush)."""
    session.add(
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
    mark_for_sequencing(session)


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
        prev_hash = entry.hash or ""
    return ChainVerdict(len(entries), None, None)


async def verify_chain(session: AsyncSession, *, chunk_size: int = 2000) -> ChainVerdict:
    """Walk the whole chain in order; report the first entry that was altered. Entries not
    yet linked by the sequencer are not part of it yet."""
    prev_hash = GENESIS_HASH
    after = 0
    checked = 0
    while True:
        rows = await AuditRepository(session).chain_after(after, chunk_size)
        if not rows:
            return ChainVerdict(checked, None, None)
        verdict = verify_entries(rows, prev_hash)
        if not verdict.intact:
            return ChainVerdict(checked + verdict.checked, verdict.first_bad_id, verdict.reason)
        checked += len(rows)
        prev_hash = rows[-1].hash or ""
        after = rows[-1].chain_position or 0
