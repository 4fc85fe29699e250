"""A hash-chained audit log.

Services call `record_write`; the entry is written in the caller's transaction with no link.
After it commits, the sequencer (`events/sequencer.py`) gives it its place in the chain and
its seal, chained to the entry before it, so writers never wait on one another for the
chain. `verify_chain` walks the chain in that order and names every entry that does not
check; `reseal_chain` re-seals it under a new key once it checks (`audit/chain.py`).
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, cast

from sqlalchemy import CTE, Table, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.audit.chain import (
    EMPTY_HEAD,
    GENESIS_HASH,
    SCHEME,
    ChainHead,
    ChainKey,
    entry_hash,
    legacy_entry_hash,
    session_key,
)
from memberhub.audit.models import AuditEntry
from memberhub.audit.repository import AuditRepository
from memberhub.events.catalog import EventData
from memberhub.events.models import Event
from memberhub.events.sequencer import SEQUENCER_LOCK, mark_for_sequencing
from memberhub.events.service import event_row
from memberhub.kit.actor import Actor
from memberhub.kit.clock import utcnow
from memberhub.kit.db import advisory_xact_lock, column_binds, column_values
from memberhub.kit.errors import Conflict

_AUDIT_LOG = cast(Table, AuditEntry.__table__)

__all__ = [
    "GENESIS_HASH",
    "ChainProblem",
    "ChainVerdict",
    "audit_row",
    "chain_head",
    "change_ctes_after",
    "change_params",
    "diff",
    "entry_hash",
    "record_change_now",
    "record_write",
    "reseal_chain",
    "verify_chain",
]


_PLAIN = frozenset({str, int, float, bool, type(None)})


def _jsonable(value: Any) -> Any:
    if type(value) in _PLAIN:  # nearly every value: nothing to convert, nothing to walk
        return value
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


def change_params(
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
) -> dict[str, Any]:
    """The parameters of a change's event (`e_` binds) and audit entry (`l_` binds), for
    `record_change_now` or `change_ctes_after`."""
    return column_values(
        _EVENTS, event_row(event, organisation_id, member_public_id, occurred_at), "e", _ID
    ) | column_values(
        _AUDIT_LOG, audit_row(actor, action, object_type, object_id, changes), "l", _ID
    )


def change_ctes_after(written: CTE) -> tuple[CTE, CTE]:
    """PostgreSQL: CTEs inserting a change's event and audit entry (`change_params`) once
    for each row `written` returns, so that a write which turns out not to happen (an
    insert's conflict) records nothing, in the same statement as the write. The caller then
    calls `mark_for_sequencing`."""
    ctes = []
    for table, prefix, name in ((_EVENTS, "e", "event"), (_AUDIT_LOG, "l", "audit")):
        binds = column_binds(table, prefix, _ID)
        rows = select(*binds.values()).select_from(written)
        ctes.append(insert(table).from_select(list(binds), rows).cte(name))
    return ctes[0], ctes[1]


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
    params = change_params(
        actor,
        event,
        organisation_id=organisation_id,
        member_public_id=member_public_id,
        occurred_at=occurred_at,
        action=action,
        object_type=object_type,
        object_id=object_id,
        changes=changes,
    )
    if session.get_bind().dialect.name == "postgresql":
        await session.execute(_INSERT_BOTH, params)
    else:
        await session.execute(_INSERT_EVENT, params)
        await session.execute(_INSERT_ENTRY, params)
    mark_for_sequencing(session)


@dataclass(frozen=True)
class ChainProblem:
    """One thing wrong with the chain: an entry that does not check, or missing positions
    (`entry_id` None)."""

    position: int
    entry_id: int | None
    reason: str

    def __str__(self) -> str:
        if self.entry_id is None:
            return self.reason
        return f"entry {self.entry_id}: {self.reason} (position {self.position})"


@dataclass(frozen=True)
class ChainVerdict:
    checked: int
    problems: tuple[ChainProblem, ...]
    # The newest entry as stored (whether or not it checks).
    head: ChainHead

    @property
    def intact(self) -> bool:
        return not self.problems


class ChainNotResealed(Conflict):
    code = "AUDIT_CHAIN_NOT_RESEALED"


class _ChainCheck:
    """Checks entries in chain order, one at a time, noting every problem and going on.

    Each entry is checked against its own stored links: its seal over its content, its
    position and its stored `prev_hash`; that `prev_hash` against the stored hash of the
    entry before it; its position against the one before. So one edited entry is named
    alone, a re-hashed one with the entry after it, and a removed one by its missing
    position and the entry after it.

    `also_accept` and `accept_unkeyed` are for re-sealing only: entries sealed under those
    keys, or with the unkeyed hash of before the chain was keyed, check too.
    """

    def __init__(
        self,
        key: ChainKey,
        *,
        also_accept: Sequence[ChainKey] = (),
        accept_unkeyed: bool = False,
        expect_head: ChainHead | None = None,
    ) -> None:
        self.keys = {k.seal: k for k in (key, *also_accept)}
        self.accept_unkeyed = accept_unkeyed
        self.expect_head = expect_head
        self.problems: list[ChainProblem] = []
        self.checked = 0
        self.position = 0
        self.prev_hash = GENESIS_HASH
        self.keyed_seen = False
        self.expected_head_found = False

    def check(self, entry: AuditEntry) -> None:
        position = entry.chain_position or 0
        if position > self.position + 1:
            first, last = self.position + 1, position - 1
            where = f"position {first}" if first == last else f"positions {first} to {last}"
            self.problems.append(
                ChainProblem(first, None, f"{where}: missing, removed from the chain")
            )
            if self.expect_head is not None and first <= self.expect_head.position <= last:
                self._expected_head_missing()
        if entry.prev_hash != self.prev_hash:
            self._bad(entry, "prev_hash does not match the previous entry's hash")
        reason = self._seal_problem(entry, position)
        if reason is not None:
            self._bad(entry, reason)
        if self.expect_head is not None and position == self.expect_head.position:
            self.expected_head_found = True
            if entry.hash != self.expect_head.hash:
                self._bad(
                    entry,
                    f"its hash is not the expected head's ({self.expect_head}): the chain was "
                    "rewritten up to here",
                )
        self.checked += 1
        self.position = position
        self.prev_hash = entry.hash or ""

    def verdict(self) -> ChainVerdict:
        expected = self.expect_head
        if expected is not None and not self.expected_head_found:
            if expected.position == 0:
                if expected.hash != GENESIS_HASH:
                    self.problems.append(
                        ChainProblem(0, None, f"the expected head {expected} is not a chain head")
                    )
            elif expected.position > self.position:
                self.problems.append(
                    ChainProblem(
                        expected.position,
                        None,
                        f"the chain ends at position {self.position}, before the expected head "
                        f"at position {expected.position}: entries were removed from its end",
                    )
                )
        head = ChainHead(self.position, self.prev_hash) if self.checked else EMPTY_HEAD
        return ChainVerdict(self.checked, tuple(self.problems), head)

    def _bad(self, entry: AuditEntry, reason: str) -> None:
        self.problems.append(ChainProblem(entry.chain_position or 0, entry.id, reason))

    def _expected_head_missing(self) -> None:
        assert self.expect_head is not None
        self.expected_head_found = True
        self.problems.append(
            ChainProblem(
                self.expect_head.position,
                None,
                f"the expected head's position {self.expect_head.position} is missing",
            )
        )

    def _seal_problem(self, entry: AuditEntry, position: int) -> str | None:
        if entry.hash is None:
            return "linked without a hash"
        prev_hash = entry.prev_hash or ""
        if entry.seal is None:
            if self.keyed_seen:
                return "hashed without the key after keyed entries: rewritten"
            if not hmac.compare_digest(legacy_entry_hash(entry, prev_hash), entry.hash):
                return "content does not match its hash"
            if self.accept_unkeyed:
                return None
            return (
                "hashed without the key, before the chain was keyed (`memberhub audit reseal` "
                "seals it, if you trust it)"
            )
        self.keyed_seen = True
        key = self.keys.get(entry.seal)
        if key is None:
            scheme, _, key_id = entry.seal.partition(":")
            if scheme != SCHEME:
                return f"unknown seal '{entry.seal}'"
            return (
                f"sealed under another secret (key id {key_id}): was SECRET_KEY replaced "
                "without `memberhub secrets rotate`?"
            )
        digest = entry_hash(entry, position=position, prev_hash=prev_hash, key=key)
        if not hmac.compare_digest(digest, entry.hash):
            return "content does not match its hash: edited, or re-hashed without the key"
        return None


async def _walk(session: AsyncSession, check: _ChainCheck, chunk_size: int) -> ChainVerdict:
    repository = AuditRepository(session)
    after = 0
    while rows := await repository.chain_after(after, chunk_size):
        for entry in rows:
            check.check(entry)
        after = rows[-1].chain_position or 0
    return check.verdict()


def _key_for(session: AsyncSession, key: ChainKey | None) -> ChainKey:
    key = key or session_key(session)
    if key is None:
        raise RuntimeError("the audit chain's key is needed: open the database with it")
    return key


async def verify_chain(
    session: AsyncSession,
    *,
    key: ChainKey | None = None,
    expect_head: ChainHead | None = None,
    chunk_size: int = 2000,
) -> ChainVerdict:
    """Walk the whole chain in order, naming every entry that does not check (`key`: the
    session's database's by default). With `expect_head` (kept elsewhere earlier), the entry
    at its position must still have its hash. Entries not yet linked by the sequencer are
    not part of the chain yet."""
    check = _ChainCheck(_key_for(session, key), expect_head=expect_head)
    return await _walk(session, check, chunk_size)


async def chain_head(session: AsyncSession) -> ChainHead:
    head = await AuditRepository(session).head()
    if head is None:
        return EMPTY_HEAD
    return ChainHead(head[0], head[1] or "")


@dataclass(frozen=True)
class ResealReport:
    resealed: int
    old_head: ChainHead
    new_head: ChainHead


async def reseal_chain(
    session: AsyncSession,
    key: ChainKey,
    *,
    previous_keys: Sequence[ChainKey] = (),
    accept_unkeyed: bool = False,
    expect_head: ChainHead | None = None,
    chunk_size: int = 2000,
) -> ResealReport:
    """Seal the whole chain under `key`, in the caller's transaction, holding the sequencer.

    First every entry must check: under `key`, one of `previous_keys` (a rotation), or with
    `accept_unkeyed` the unkeyed hash of before the chain was keyed; and `expect_head`, if
    given. Otherwise nothing is changed and `ChainNotResealed` lists every problem: re-sealing
    would hide them. Entries already sealed under `key` with the same links are left as
    they are.
    """
    await session.run_sync(advisory_xact_lock, SEQUENCER_LOCK)
    check = _ChainCheck(
        key,
        also_accept=previous_keys,
        accept_unkeyed=accept_unkeyed,
        expect_head=expect_head,
    )
    verdict = await _walk(session, check, chunk_size)
    if not verdict.intact:
        listed = "; ".join(str(p) for p in verdict.problems[:20])
        more = len(verdict.problems) - 20
        raise ChainNotResealed(
            "The audit chain does not check, so it was not re-sealed (nothing was changed): "
            f"{listed}{f'; and {more} more' if more > 0 else ''}. "
            "See `memberhub audit verify`.",
            details={"problems": [str(p) for p in verdict.problems]},
        )
    repository = AuditRepository(session)
    prev_hash = GENESIS_HASH
    after = resealed = 0
    while rows := await repository.chain_after(after, chunk_size):
        links = []
        for entry in rows:
            position = entry.chain_position or 0
            digest = entry_hash(entry, position=position, prev_hash=prev_hash, key=key)
            if (entry.prev_hash, entry.hash, entry.seal) != (prev_hash, digest, key.seal):
                links.append(
                    {
                        "b_id": entry.id,
                        "b_prev_hash": prev_hash,
                        "b_hash": digest,
                        "b_seal": key.seal,
                    }
                )
            prev_hash = digest
            after = position
        await repository.relink(links)
        resealed += len(links)
    new_head = ChainHead(verdict.head.position, prev_hash) if verdict.checked else EMPTY_HEAD
    return ResealReport(resealed, verdict.head, new_head)
