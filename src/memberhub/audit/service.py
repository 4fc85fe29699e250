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
from typing import Any, cast

from sqlalchemy import Table, insert
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.audit.chain import GENESIS_HASH, entry_hash
from memberhub.audit.models import AuditEntry
from memberhub.audit.repository import AuditRepository
from memberhub.events.catalog import EventData
from memberhub.events.models import Event
from memberhub.events.sequencer import mark_for_sequencing
from memberhub.events.service import event_row
from memberhub.kit.actor import Actor
from memberhub.kit.clock import utcnow
from memberhub.kit.db import column_binds, column_values

_AUDIT_LOG = cast(Table, AuditEntry.__table__)

__all__ = [
    "GENESIS_HASH",
    "ChainVerdict",
    "audit_row",
    "diff",
    "entry_hash",
    "record_change_now",
    "record_write",
    "verify_chain",
]


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


def audit_row(
    actor: Actor, action: str, object_type: str, object_id: str, changes: dict[str, Any]
) -> dict[str, Any]:
    """The columns of a new audit entry (for `record_write`, or a write that inserts it
    itself and then calls `mark_for_sequencing`)."""
    return {
        "occurred_at": utcnow(),
        "actor": actor.id,
        "action": action,
        "object_type": object_type,
        "object_id": object_id,
        "changes": _jsonable(changes),
        "request_id": actor.request_id,
        "client_ip": actor.client_ip,
    }


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
    session.add(AuditEntry(**audit_row(actor, action, object_type, object_id, changes)))
    mark_for_sequencing(session)


_ID = ("id",)
_EVENTS = cast(Table, Event.__table__)
_INSERT_EVENT = insert(_EVENTS).values(column_binds(_EVENTS, "e", _ID))
_INSERT_ENTRY = insert(_AUDIT_LOG).values(column_binds(_AUDIT_LOG, "l", _ID))
# PostgreSQL: both rows in one statement.
_INSERT_BOTH = _INSERT_ENTRY.add_cte(_INSERT_EVENT.cte("event"))


async def record_change_now(
    session: AsyncSession,
    actor: Actor,
    event: EventData,
    *,
    organisation_id: int | None,
    member_public_id: str | None,
    occurred_at: datetime,
    action: str,
    object_type: str,
    object_id: str,
    changes: dict[str, Any],
) -> None:
    """A change's event and audit entry, written now as Core statements (one on PostgreSQL):
    `emit` and `record_write` together, for the hot paths."""
    params = column_values(
        _EVENTS, event_row(event, organisation_id, member_public_id, occurred_at), "e", _ID
    ) | column_values(
        _AUDIT_LOG, audit_row(actor, action, object_type, object_id, changes), "l", _ID
    )
    if session.get_bind().dialect.name == "postgresql":
        await session.execute(_INSERT_BOTH, params)
    else:
        await session.execute(_INSERT_EVENT, params)
        await session.execute(_INSERT_ENTRY, params)
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
