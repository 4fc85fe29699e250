"""The points ledger: earn, award, redeem, deduct, reverse, extend, recover, transfer.

Every operation locks the member's account row first, so writes to one member are
serialised and a balance can never be overspent. Batches hold the points; the transaction
log records every change with the balance after it; the account keeps the aggregates. All
three are written in the caller's transaction, with the operation's event and audit entry.
Operations carrying a `reference_id` apply once: a repeat returns the first transaction.
A reference belongs to the organisation of the member it is used for (`reference_scope`):
another organisation may use the same one for its own operation, and an error about a
reference never names another member's transaction.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Table, insert
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.alerts import service as alerts
from memberhub.alerts.models import AlertType
from memberhub.audit.service import audit_row, record_change_now, record_write
from memberhub.auth.principal import Principal
from memberhub.events.catalog import (
    PointsAdjusted,
    PointsChange,
    PointsDeducted,
    PointsEarned,
    PointsRedeemed,
)
from memberhub.events.service import event_row
from memberhub.kit.actor import Actor
from memberhub.kit.clock import utcnow
from memberhub.kit.db import named_xact_lock
from memberhub.kit.errors import Conflict, NotFound, ValidationFailed
from memberhub.kit.ids import new_public_id
from memberhub.members.models import Member
from memberhub.members.service import get_member, visible_member
from memberhub.points import expiry
from memberhub.points.models import (
    BatchSource,
    BatchStatus,
    PointAccount,
    PointAllocation,
    PointBatch,
    PointTransaction,
    TxnType,
)
from memberhub.points.repository import PointsRepository
from memberhub.points.schemas import MAX_POINTS, AllocationOut, BalanceOut, TransactionOut
from memberhub.points.writes import write_credit, write_credits
from memberhub.program import service as program_service
from memberhub.program.models import LoyaltyProgram, NegativeBalancePolicy
from memberhub.tiers import service as tiers

# Transaction types whose points count as earned (reversals subtract from it).
# Points a member earned (lifetime_earned); a transfer moves points already earned by
# another member and earns nothing, so it never lifts a tier.
EARNED_TYPES = (TxnType.EARN, TxnType.AWARD, TxnType.REVERSE)
REDEEMED_TYPES = (TxnType.REDEEM, TxnType.REDEEM_REFUND)
EXPIRED_TYPES = (TxnType.EXPIRE, TxnType.RECOVER)
# Batches whose points are still the member's to spend: a reversal cancels those first.
LIVE_STATUSES = (BatchStatus.ACTIVE, BatchStatus.PENDING)


class InsufficientPoints(Conflict):
    code = "INSUFFICIENT_POINTS"
    default_message = "The member does not have enough points."


class ReferenceReused(Conflict):
    code = "REFERENCE_ID_REUSED"
    default_message = "This reference_id was already used for a different operation."


@dataclass
class LedgerResult:
    transaction: PointTransaction
    account: PointAccount
    replayed: bool = False
    allocations: list[tuple[int, int]] = field(default_factory=list)
    # The transaction as answered, when the operation had all of it in hand.
    out: TransactionOut | None = None


# ---------------------------------------------------------------- shared steps


def reference_scope(member: Member) -> int:
    """The scope a reference used for `member` is unique in: the member's organisation, or
    0 for members without one (who share one scope, as their emails do)."""
    return member.organisation_id or 0


def reference_reused(
    txn_type: str, reference_id: str, existing: PointTransaction, member: Member
) -> ReferenceReused:
    """The conflict of a reference already used in the member's scope. Only a transaction of
    the member itself is named: another member's may belong to a member the caller does not
    see (one that has moved organisation since)."""
    details = {"reference_id": reference_id}
    if existing.member_id == member.id:
        details["transaction_id"] = existing.public_id
    return ReferenceReused(
        f"reference_id '{reference_id}' was used for another {txn_type}.", details=details
    )


# Kept in a transaction's details for the ledger's own use, not shown by the API.
PRIVATE_DETAILS = frozenset({"requested_points", "request"})


def request_fingerprint(reference_id: str | None, **asked: Any) -> str | None:
    """What an operation carrying a reference asked for, as a digest kept with its
    transaction: a repeat of the reference must ask for exactly the same (times compared as
    instants, so an offset spelt otherwise is the same time). None without a reference."""
    if reference_id is None:
        return None
    canonical = {
        name: value.astimezone(UTC).isoformat() if isinstance(value, datetime) else value
        for name, value in asked.items()
    }
    encoded = json.dumps(canonical, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(encoded.encode()).hexdigest()[:32]


def kept_request(request: str | None) -> dict[str, str]:
    """The fingerprint's place in a transaction's details (none without a reference)."""
    return {} if request is None else {"request": request}


async def lock_reference(
    session: AsyncSession, txn_type: str, scope: int, reference_id: str
) -> None:
    """Serialise operations carrying the same reference in one scope until the first one
    commits, so a concurrent repeat finds the first transaction instead of applying again."""
    await session.run_sync(named_xact_lock, f"points:{txn_type}:{scope}:{reference_id}")


async def find_replay(
    session: AsyncSession,
    txn_type: str,
    reference_id: str | None,
    *,
    member: Member,
    points: int | None = None,
    request: str | None = None,
    scope: int | None = None,
) -> PointTransaction | None:
    """The earlier transaction with this reference in the member's scope (or `scope`, where
    the reference was taken earlier, in the organisation the member was in then), after
    checking it was the same request: the same `request` fingerprint (see
    `request_fingerprint`), or, for a transaction written before fingerprints were kept,
    the same points."""
    if reference_id is None:
        return None
    scope = reference_scope(member) if scope is None else scope
    await lock_reference(session, txn_type, scope, reference_id)
    existing = await PointsRepository(session).by_reference(txn_type, scope, reference_id)
    if existing is None:
        return None
    kept = existing.details.get("request")
    if kept is not None and request is not None:
        same = kept == request
    else:
        same = points is None or existing.details.get("requested_points") == points
    if existing.member_id != member.id or not same:
        raise reference_reused(txn_type, reference_id, existing, member)
    return existing


async def _open(
    session: AsyncSession,
    txn_type: str,
    reference_id: str | None,
    member: Member,
    *,
    points: int | None = None,
    request: str | None = None,
    account: PointAccount | None = None,
    scope: int | None = None,
) -> tuple[PointAccount, PointTransaction | None]:
    """The start of every single-member operation: hold the reference (if any), lock the
    member's account (unless given, already locked: see `member_and_account`), and return
    the earlier transaction when this one repeats it."""
    if account is not None:
        # The reference's lock is always taken before the account's.
        assert reference_id is None, "an operation with a reference locks the account itself"
        return account, None
    replay = await find_replay(
        session, txn_type, reference_id, member=member, points=points, request=request, scope=scope
    )
    return await PointsRepository(session).lock_account(member.id), replay


async def _expire_due(
    session: AsyncSession, member: Member, account: PointAccount, now: datetime
) -> None:
    """Before points are taken from the member's balance: expire its batches whose expiry
    has passed and that the expiry job has not reached yet, as the job would (transaction,
    event and audit entry), so that an expired point is never spent or taken back."""
    done = await expiry.expire_member(
        session, account.member_id, now=now, actor_id=expiry.SCHEDULER.id
    )
    if done is None or not done.members:
        return
    record_write(
        session,
        expiry.SCHEDULER,
        action="points.expire",
        object_type="member",
        object_id=member.public_id,
        changes={"batches": done.batches, "points": done.points, "before": "a spend"},
    )
    # The statements changed the account's row: read it again.
    await session.refresh(account)


async def member_and_account(
    session: AsyncSession, principal: Principal, public_id: str
) -> tuple[Member, PointAccount]:
    """`get_member` and the member's account, locked, in one statement once the account
    exists. Only for an operation with no reference id: one with a reference takes the
    reference's lock before the account's (`_open`), and every operation must take them in
    that order."""
    repo = PointsRepository(session)
    found = await repo.member_with_locked_account(public_id)
    if found is None:  # no such member, or its first points: the account is created
        member = await get_member(session, principal, public_id)
        return member, await repo.lock_account(member.id)
    member, account = found
    return visible_member(principal, public_id, member), account


def _require_future(expires_at: datetime | None, now: datetime) -> None:
    if expires_at is not None and expires_at <= now:
        raise ValidationFailed("expires_at must be in the future.", details={"field": "expires_at"})


def record_transaction(
    session: AsyncSession,
    account: PointAccount,
    actor: Actor,
    now: datetime,
    txn_type: str,
    *,
    points: int = 0,
    pending_points: int = 0,
    reason: str | None = None,
    reference_id: str | None = None,
    reference_scope: int | None = None,
    related: PointTransaction | None = None,
    batch: PointBatch | None = None,
    amount: int | None = None,
    currency: str | None = None,
    details: dict[str, Any] | None = None,
) -> PointTransaction:
    """Append a transaction and apply it to the account's balances and aggregates.
    `reference_scope`, the member's (`reference_scope(member)`), is required with a
    `reference_id` and kept only with one."""
    assert reference_id is None or reference_scope is not None, "a reference needs its scope"
    account.current += points
    account.pending += pending_points
    credited = points + pending_points
    if txn_type in EARNED_TYPES:
        account.lifetime_earned += credited
    elif txn_type in REDEEMED_TYPES:
        account.lifetime_redeemed -= points
    elif txn_type in EXPIRED_TYPES:
        account.lifetime_expired -= points
    account.last_activity_at = now
    account.updated_at = now
    txn = PointTransaction(
        public_id=new_public_id("txn"),
        member_id=account.member_id,
        type=txn_type,
        points=points,
        pending_points=pending_points,
        balance_after=account.current,
        pending_after=account.pending,
        reason=reason,
        reference_id=reference_id,
        reference_scope=reference_scope if reference_id is not None else None,
        related_transaction_id=related.id if related is not None else None,
        batch_id=batch.id if batch is not None else None,
        amount=amount,
        currency=currency,
        details=details or {},
        actor=actor.id,
        occurred_at=now,
    )
    session.add(txn)
    return txn


async def _spend(
    session: AsyncSession, account: PointAccount, points: int, *, available: int | None = None
) -> list[tuple[PointBatch, int]]:
    """Take `points` from the member's active batches, soonest-expiring first.

    `available` is the spendable balance when the account row does not show it yet (a
    reversal that already cancelled part of a batch).
    """
    balance = account.current if available is None else available
    if points > balance:
        raise InsufficientPoints(
            f"The member has {balance} points; {points} are needed.",
            details={"balance": balance, "requested": points},
        )
    taken: list[tuple[PointBatch, int]] = []
    left = points
    for batch in await PointsRepository(session).spendable_batches(account.member_id):
        if left == 0:
            break
        take = min(batch.remaining, left)
        batch.remaining -= take
        if batch.remaining == 0:
            batch.status = BatchStatus.SPENT
        taken.append((batch, take))
        left -= take
    # The balance is the sum of the active batches: a shortfall means they disagree.
    assert left == 0, "point batches do not add up to the account balance"
    return taken


async def _allocate(
    session: AsyncSession, txn: PointTransaction, taken: Sequence[tuple[PointBatch, int]]
) -> list[tuple[int, int]]:
    """Record which batches `txn` drew from, in one statement (the transaction is flushed)."""
    rows = [
        {"transaction_id": txn.id, "batch_id": batch.id, "points": points}
        for batch, points in taken
    ]
    if rows:
        await session.execute(insert(PointAllocation), rows)
    return [(batch.id, points) for batch, points in taken]


async def settle_into(
    session: AsyncSession, txn: PointTransaction, batch: PointBatch
) -> list[tuple[PointBatch, int]]:
    """Let a batch that just became active pay any deficit, recorded under `txn`; returns
    what it paid (the batch and the points)."""
    paid = await _settle_deficit(session, txn, batch)
    await _allocate(session, txn, paid)
    return paid


async def _settle_deficit(
    session: AsyncSession, txn: PointTransaction, batch: PointBatch
) -> list[tuple[PointBatch, int]]:
    """Pay points owed (a deficit batch) from a batch that just became active under `txn`,
    which may credit several batches."""
    account = await session.get(PointAccount, batch.member_id)
    # Points are owed only if the balance was negative before `txn` (a deficit is settled by
    # the first points to become active, so none is left while the balance is positive);
    # the balance already counts everything `txn` credits.
    if account is not None and account.current - txn.points >= 0:
        return []
    deficit = await PointsRepository(session).deficit_batch(batch.member_id)
    if deficit is None or deficit.remaining >= 0 or batch.remaining <= 0:
        return []
    paid = min(batch.remaining, -deficit.remaining)
    batch.remaining -= paid
    deficit.remaining += paid
    if batch.remaining == 0:
        batch.status = BatchStatus.SPENT
    if deficit.remaining == 0:
        deficit.status = BatchStatus.SPENT
    return [(batch, paid)]


async def _new_batch(
    session: AsyncSession,
    txn: PointTransaction,
    *,
    points: int,
    source: str,
    now: datetime,
    expires_at: datetime | None,
    activates_at: datetime | None = None,
    settled: list[tuple[PointBatch, int]] | None = None,
) -> PointBatch:
    """A batch holding `points`; an active one first pays any deficit (appended to
    `settled` when given)."""
    pending = activates_at is not None and activates_at > now
    batch = PointBatch(
        public_id=new_public_id("pbt"),
        member_id=txn.member_id,
        status=BatchStatus.PENDING if pending else BatchStatus.ACTIVE,
        source=source,
        initial=points,
        remaining=points,
        transaction_id=txn.id,
        activates_at=activates_at if pending else None,
        expires_at=expires_at,
        created_at=now,
    )
    session.add(batch)
    await session.flush()
    if not pending:
        paid = await settle_into(session, txn, batch)
        if settled is not None:
            settled.extend(paid)
    return batch


async def _credit(
    session: AsyncSession,
    actor: Actor,
    member: Member,
    account: PointAccount,
    now: datetime,
    txn_type: str,
    *,
    points: int,
    source: str,
    expires_at: datetime | None,
    activates_at: datetime | None = None,
    reason: str | None = None,
    reference_id: str | None = None,
    amount: int | None = None,
    currency: str | None = None,
    details: dict[str, Any],
    event: Callable[[PointTransaction, PointBatch], PointsChange],
    action: str,
) -> tuple[PointTransaction, PointBatch]:
    """Credit `points` (> 0, an earned type) in a new batch, pending until `activates_at`
    when that is later, and finish as `_finish` does: the transaction, its batch, the
    account's balances, the event and the audit entry are written together (`writes.py`).
    An active batch must have no deficit to pay (the account's balance is not negative);
    `_new_batch` handles that case."""
    pending = activates_at is not None and activates_at > now
    assert points > 0
    assert txn_type in EARNED_TYPES
    assert pending or account.current >= 0, "a deficit is settled by _new_batch"
    current = account.current + (0 if pending else points)
    pending_total = account.pending + (points if pending else 0)
    balances = {
        "current": current,
        "pending": pending_total,
        "lifetime_earned": account.lifetime_earned + points,
        "last_activity_at": now,
        "updated_at": now,
    }
    txn, batch = _credited(
        account,
        actor,
        now,
        txn_type,
        points=points,
        pending=pending,
        balance_after=current,
        pending_after=pending_total,
        source=source,
        expires_at=expires_at,
        activates_at=activates_at,
        reason=reason,
        reference_id=reference_id,
        scope=reference_scope(member) if reference_id is not None else None,
        amount=amount,
        currency=currency,
        details=details,
    )
    await write_credit(
        session,
        account,
        txn,
        batch,
        balances,
        event_row(event(txn, batch), member.organisation_id, member.public_id, now),
        audit_row(actor, action, "member", member.public_id, _audit_changes(txn)),
    )
    await tiers.after_ledger_change(session, actor, member, account, now)
    return txn, batch


def _credited(
    account: PointAccount,
    actor: Actor,
    now: datetime,
    txn_type: str,
    *,
    points: int,
    pending: bool,
    balance_after: int,
    pending_after: int,
    source: str,
    expires_at: datetime | None,
    activates_at: datetime | None,
    reason: str | None,
    reference_id: str | None,
    scope: int | None,
    amount: int | None,
    currency: str | None,
    details: dict[str, Any],
) -> tuple[PointTransaction, PointBatch]:
    """The rows of a credit of `points` in a new batch (pending or active), to be written
    by `writes.py`: the transaction, with the balances after it, and its batch."""
    txn = PointTransaction(
        public_id=new_public_id("txn"),
        member_id=account.member_id,
        type=txn_type,
        points=0 if pending else points,
        pending_points=points if pending else 0,
        balance_after=balance_after,
        pending_after=pending_after,
        reason=reason,
        reference_id=reference_id,
        reference_scope=scope,
        amount=amount,
        currency=currency,
        details=details,
        actor=actor.id,
        occurred_at=now,
    )
    batch = PointBatch(
        public_id=new_public_id("pbt"),
        member_id=account.member_id,
        status=BatchStatus.PENDING if pending else BatchStatus.ACTIVE,
        source=source,
        initial=points,
        remaining=points,
        activates_at=activates_at if pending else None,
        expires_at=expires_at,
        created_at=now,
    )
    return txn, batch


def balance_out(account: PointAccount) -> BalanceOut:
    return BalanceOut(
        current_balance=account.current,
        pending_balance=account.pending,
        lifetime_earned=account.lifetime_earned,
        lifetime_redeemed=account.lifetime_redeemed,
        lifetime_expired=account.lifetime_expired,
    )


def event_fields(txn: PointTransaction, member: Member) -> dict[str, Any]:
    return {
        "member_id": member.public_id,
        "transaction_id": txn.public_id,
        "transaction_type": txn.type,
        "points": txn.points,
        "pending_points": txn.pending_points,
        "balance_after": txn.balance_after,
        "pending_after": txn.pending_after,
        "reason": txn.reason,
        "reference_id": txn.reference_id,
        "occurred_at": txn.occurred_at,
    }


def _audit_changes(txn: PointTransaction, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "transaction_id": txn.public_id,
        "points": txn.points,
        "pending_points": txn.pending_points,
        "balance_after": txn.balance_after,
        **(extra or {}),
    }


async def _finish(
    session: AsyncSession,
    actor: Actor,
    member: Member,
    account: PointAccount,
    txn: PointTransaction,
    event: PointsChange,
    *,
    action: str,
    changes: dict[str, Any] | None = None,
) -> None:
    """Write the operation's event and audit entry, then let tiers and alerts react."""
    await record_change_now(
        session,
        actor,
        event,
        organisation_id=member.organisation_id,
        member_public_id=member.public_id,
        occurred_at=txn.occurred_at,
        action=action,
        object_type="member",
        object_id=member.public_id,
        changes=_audit_changes(txn, changes),
    )
    if txn.balance_after < 0 <= txn.balance_after - txn.points:
        await alerts.raise_alert(
            session,
            AlertType.NEGATIVE_BALANCE,
            member=member,
            dedupe_key=f"{AlertType.NEGATIVE_BALANCE}:{txn.public_id}",
            message=f"The balance of {member.public_id} went negative ({account.current}).",
            points=account.current,
            data={"transaction_id": txn.public_id, "balance": account.current},
            now=txn.occurred_at,
        )
    await tiers.after_ledger_change(session, actor, member, account, txn.occurred_at)


# ---------------------------------------------------------------- operations


async def earn_points(
    session: AsyncSession,
    actor: Actor,
    member: Member,
    *,
    amount: int,
    currency: str,
    reference_id: str,
    reason: str | None = None,
    now: datetime | None = None,
) -> LedgerResult:
    now = now or utcnow()
    program = await program_service.get_program(session)
    if currency != program.currency:
        raise ValidationFailed(
            f"The program earns on {program.currency}; this amount is in {currency}.",
            code="CURRENCY_MISMATCH",
            details={"program_currency": program.currency, "currency": currency},
        )
    request = request_fingerprint(reference_id, amount=amount, currency=currency, reason=reason)
    account, replay = await _open(session, TxnType.EARN, reference_id, member, request=request)
    if replay is not None:
        if replay.amount != amount or replay.currency != currency:
            raise reference_reused(TxnType.EARN, reference_id, replay, member)
        return LedgerResult(replay, account, replayed=True)
    multiplier = await tiers.earn_multiplier_percent(session, account.tier_code)
    points = program_service.points_for_amount(program, amount, multiplier)
    if points > MAX_POINTS:
        raise ValidationFailed(
            f"This amount would earn {points} points; one earn credits at most {MAX_POINTS}.",
            code="TOO_MANY_POINTS",
            details={"field": "amount", "points": points, "max_points": MAX_POINTS},
        )
    details: dict[str, Any] = {
        "multiplier_percent": multiplier,
        "requested_points": None,
        **kept_request(request),
    }
    return await _earn(
        session,
        actor,
        member,
        account,
        now,
        program,
        points=points,
        amount=amount,
        currency=currency,
        reference_id=reference_id,
        reason=reason,
        details=details,
    )


async def earn_by_rule(
    session: AsyncSession,
    actor: Actor,
    member: Member,
    account: PointAccount,
    *,
    points: int,
    reference_id: str,
    reason: str,
    amount: int | None,
    currency: str | None,
    details: dict[str, Any],
    now: datetime,
) -> LedgerResult:
    """Points an earning rule credits for an activity (`activities/service.py`): an earn,
    pending and expiring as the program says, like `earn_points`'.

    The caller holds the member's `account`, locked, and a `reference_id` nobody used: the
    activity it derives from was just recorded or matched, once (its unique source id, or
    its locked row). The reference's unique index stays the backstop, so a mistake there
    fails the request rather than credit twice.
    """
    assert points > 0
    program = await program_service.get_program(session)
    return await _earn(
        session,
        actor,
        member,
        account,
        now,
        program,
        points=points,
        amount=amount,
        currency=currency,
        reference_id=reference_id,
        reason=reason,
        details=details,
    )


@dataclass(frozen=True)
class RuleEarn:
    """The points one earning rule credits for an activity: an earn of its own."""

    points: int
    reference_id: str
    reason: str
    amount: int | None
    currency: str | None
    details: dict[str, Any]


@dataclass
class EarnPass:
    """Earns for one member, planned as transactions and batches (with their public ids,
    balances, events and audit entries) and written together by `write`: one ledger pass,
    one update of the account. See `plan_rule_earns`."""

    actor: Actor
    member: Member
    account: PointAccount
    now: datetime
    credits: list[tuple[PointTransaction, PointBatch]]
    balances: dict[str, Any]
    events: list[dict[str, Any]]
    audits: list[dict[str, Any]]

    @property
    def transactions(self) -> list[PointTransaction]:
        return [txn for txn, _batch in self.credits]

    async def write(
        self,
        session: AsyncSession,
        *,
        events: Sequence[dict[str, Any]] = (),
        audits: Sequence[dict[str, Any]] = (),
        linked: tuple[Table, Sequence[dict[str, Any]]] | None = None,
    ) -> None:
        """Write the earns with the caller's own `events` and `audits` rows after theirs,
        and `linked` rows (one per earn) naming each earn's transaction; then let tiers
        react, once."""
        await write_credits(
            session,
            self.account,
            self.credits,
            self.balances,
            [*self.events, *events],
            [*self.audits, *audits],
            linked,
        )
        await tiers.after_ledger_change(session, self.actor, self.member, self.account, self.now)


def plan_rule_earns(
    program: LoyaltyProgram,
    actor: Actor,
    member: Member,
    account: PointAccount,
    earns: Sequence[RuleEarn],
    *,
    now: datetime,
) -> EarnPass | None:
    """The earns an activity's rules credit (`activities/service.py`), each as
    `earn_by_rule` would write it, planned to be written in one pass; None when they must
    be written one by one instead (`earn_by_rule`): active points that would first pay the
    member's deficit. Reads nothing.

    The caller holds the member's `account`, locked, and references nobody used (as for
    `earn_by_rule`)."""
    activates_at = program_service.activation_for(program, now)
    expires_at = program_service.expiry_for(program, now)
    pending = activates_at is not None
    if not earns or (not pending and account.current < 0):
        return None
    current, pending_total, earned = account.current, account.pending, account.lifetime_earned
    planned = EarnPass(actor, member, account, now, [], {}, [], [])
    scope = reference_scope(member)
    for earn in earns:
        assert earn.points > 0
        earned += earn.points
        if pending:
            pending_total += earn.points
        else:
            current += earn.points
        txn, batch = _credited(
            account,
            actor,
            now,
            TxnType.EARN,
            points=earn.points,
            pending=pending,
            balance_after=current,
            pending_after=pending_total,
            source=BatchSource.EARN,
            expires_at=expires_at,
            activates_at=activates_at,
            reason=earn.reason,
            reference_id=earn.reference_id,
            scope=scope,
            amount=earn.amount,
            currency=earn.currency,
            details=earn.details,
        )
        event = PointsEarned(
            **event_fields(txn, member),
            amount=earn.amount,
            currency=earn.currency,
            expires_at=expires_at,
            activates_at=batch.activates_at,
        )
        planned.credits.append((txn, batch))
        planned.events.append(event_row(event, member.organisation_id, member.public_id, now))
        planned.audits.append(
            audit_row(actor, "points.earn", "member", member.public_id, _audit_changes(txn))
        )
    planned.balances = {
        "current": current,
        "pending": pending_total,
        "lifetime_earned": earned,
        "last_activity_at": now,
        "updated_at": now,
    }
    return planned


async def _earn(
    session: AsyncSession,
    actor: Actor,
    member: Member,
    account: PointAccount,
    now: datetime,
    program: LoyaltyProgram,
    *,
    points: int,
    amount: int | None,
    currency: str | None,
    reference_id: str,
    reason: str | None,
    details: dict[str, Any],
) -> LedgerResult:
    """The write of an earn of `points` (0 writes the transaction alone) into the locked
    `account`: pending for the program's pending period, expiring by its policy."""
    activates_at = program_service.activation_for(program, now)
    expires_at = program_service.expiry_for(program, now)
    pending = activates_at is not None and points > 0

    def earned(txn: PointTransaction, batch: PointBatch | None) -> PointsEarned:
        return PointsEarned(
            **event_fields(txn, member),
            amount=amount,
            currency=currency,
            expires_at=expires_at if batch else None,
            activates_at=batch.activates_at if batch else None,
        )

    if points > 0 and (pending or account.current >= 0):
        txn, credited = await _credit(
            session,
            actor,
            member,
            account,
            now,
            TxnType.EARN,
            points=points,
            source=BatchSource.EARN,
            expires_at=expires_at,
            activates_at=activates_at,
            reason=reason,
            reference_id=reference_id,
            amount=amount,
            currency=currency,
            details=details,
            event=earned,
            action="points.earn",
        )
        # Everything the answer shows is in hand (a new batch pays nothing): no read back.
        out = transaction_out(txn, member.public_id, batch_public_id=credited.public_id)
        return LedgerResult(txn, account, out=out)
    # Nothing earned, or a new active batch that first pays the deficit.
    txn = record_transaction(
        session,
        account,
        actor,
        now,
        TxnType.EARN,
        points=0 if pending else points,
        pending_points=points if pending else 0,
        reason=reason,
        reference_id=reference_id,
        reference_scope=reference_scope(member),
        amount=amount,
        currency=currency,
        details=details,
    )
    await session.flush()
    batch = None
    if points > 0:
        batch = await _new_batch(
            session,
            txn,
            points=points,
            source=BatchSource.EARN,
            now=now,
            expires_at=expires_at,
            activates_at=activates_at,
        )
        txn.batch_id = batch.id
    await _finish(session, actor, member, account, txn, earned(txn, batch), action="points.earn")
    return LedgerResult(txn, account)


async def award_points(
    session: AsyncSession,
    actor: Actor,
    member: Member,
    *,
    points: int,
    reason: str,
    reference_id: str | None = None,
    expires_at: datetime | None = None,
    notify: bool = False,
    now: datetime | None = None,
    account: PointAccount | None = None,
) -> LedgerResult:
    """Manual points. `account`: the member's account, already locked (no reference id)."""
    now = now or utcnow()
    _require_future(expires_at, now)
    request = request_fingerprint(
        reference_id, points=points, reason=reason, expires_at=expires_at, notify=notify
    )
    account, replay = await _open(
        session,
        TxnType.AWARD,
        reference_id,
        member,
        points=points,
        request=request,
        account=account,
    )
    if replay is not None:
        return LedgerResult(replay, account, replayed=True)
    program = await program_service.get_program(session)
    expiry = expires_at if expires_at is not None else program_service.expiry_for(program, now)
    details: dict[str, Any] = {"requested_points": points, "notify": notify}
    details |= kept_request(request)

    def awarded(txn: PointTransaction, _batch: PointBatch | None) -> PointsEarned:
        return PointsEarned(**event_fields(txn, member), expires_at=expiry, notify=notify)

    settled: list[tuple[PointBatch, int]] = []
    if account.current >= 0:
        txn, batch = await _credit(
            session,
            actor,
            member,
            account,
            now,
            TxnType.AWARD,
            points=points,
            source=BatchSource.AWARD,
            expires_at=expiry,
            reason=reason,
            reference_id=reference_id,
            details=details,
            event=awarded,
            action="points.award",
        )
    else:  # the new batch first pays the deficit
        txn = record_transaction(
            session,
            account,
            actor,
            now,
            TxnType.AWARD,
            points=points,
            reason=reason,
            reference_id=reference_id,
            reference_scope=reference_scope(member),
            details=details,
        )
        await session.flush()
        batch = await _new_batch(
            session,
            txn,
            points=points,
            source=BatchSource.AWARD,
            now=now,
            expires_at=expiry,
            settled=settled,
        )
        txn.batch_id = batch.id
        event = awarded(txn, batch)
        await _finish(session, actor, member, account, txn, event, action="points.award")
    # Everything the answer shows is in hand: no need to read it back.
    out = transaction_out(
        txn,
        member.public_id,
        batch_public_id=batch.public_id,
        allocations=[(b.public_id, p) for b, p in settled],
    )
    return LedgerResult(txn, account, out=out)


async def spend_points(
    session: AsyncSession,
    actor: Actor,
    member: Member,
    txn_type: str,
    *,
    points: int,
    reason: str | None,
    reference_id: str | None,
    now: datetime | None = None,
    details: dict[str, Any] | None = None,
    scope: int | None = None,
) -> LedgerResult:
    """Redeem or deduct: take points from the soonest-expiring batches first. `scope`: the
    reference's, where it was taken earlier than now (a held deduction's)."""
    assert txn_type in (TxnType.REDEEM, TxnType.DEDUCT)
    now = now or utcnow()
    request = request_fingerprint(reference_id, points=points, reason=reason)
    account, replay = await _open(
        session, txn_type, reference_id, member, points=points, request=request, scope=scope
    )
    if replay is not None:
        return LedgerResult(replay, account, replayed=True)
    await _expire_due(session, member, account, now)
    taken = await _spend(session, account, points)
    txn = record_transaction(
        session,
        account,
        actor,
        now,
        txn_type,
        points=-points,
        reason=reason,
        reference_id=reference_id,
        reference_scope=reference_scope(member) if scope is None else scope,
        details={
            "requested_points": points,
            **kept_request(request),
            **(details or {}),
        },
    )
    await session.flush()
    allocations = await _allocate(session, txn, taken)
    if txn_type == TxnType.REDEEM:
        event: PointsChange = PointsRedeemed(**event_fields(txn, member))
        await _flag_large_redemption(session, member, txn, points)
    else:
        event = PointsDeducted(**event_fields(txn, member))
    await _finish(session, actor, member, account, txn, event, action=f"points.{txn_type}")
    return LedgerResult(txn, account, allocations=allocations)


async def _flag_large_redemption(
    session: AsyncSession, member: Member, txn: PointTransaction, points: int
) -> None:
    program = await program_service.get_program(session)
    threshold = program_service.alert_thresholds(program).large_redemption_points
    if points > threshold:
        await alerts.raise_alert(
            session,
            AlertType.LARGE_REDEMPTION,
            member=member,
            dedupe_key=f"{AlertType.LARGE_REDEMPTION}:{txn.public_id}",
            message=f"{member.public_id} redeemed {points} points (over {threshold}).",
            points=points,
            data={"transaction_id": txn.public_id, "threshold": threshold},
            now=txn.occurred_at,
        )


async def refund_redemption(
    session: AsyncSession,
    actor: Actor,
    member: Member,
    redemption: PointTransaction,
    *,
    reason: str | None,
    now: datetime | None = None,
) -> LedgerResult:
    """Give back the points of a redemption (a cancelled reward claim), into batches with
    the expiries the points had."""
    now = now or utcnow()
    account = await PointsRepository(session).lock_account(member.id)
    repo = PointsRepository(session)
    txn = record_transaction(
        session,
        account,
        actor,
        now,
        TxnType.REDEEM_REFUND,
        points=-redemption.points,
        reason=reason,
        related=redemption,
        details={"redemption_id": redemption.public_id},
    )
    await session.flush()
    for batch_id, points in await repo.allocated_from(redemption.id):
        source = await session.get(PointBatch, batch_id)
        assert source is not None
        expires_at = source.expires_at if source.expires_at and source.expires_at > now else None
        if source.expires_at is not None and expires_at is None:
            # The points would have expired meanwhile: they come back valid until the end of
            # the program's expiry from now rather than already expired.
            program = await program_service.get_program(session)
            expires_at = program_service.expiry_for(program, now)
        await _new_batch(
            session, txn, points=points, source=BatchSource.REFUND, now=now, expires_at=expires_at
        )
    event = PointsAdjusted(**event_fields(txn, member))
    await _finish(session, actor, member, account, txn, event, action="points.redeem_refund")
    return LedgerResult(txn, account)


def reversible_points(batch: PointBatch) -> int:
    """What a reversal may still take of an earn's batch: not what earlier reversals took,
    nor what expired (and was not recovered)."""
    return batch.initial - batch.reversed_points - (batch.expired_points - batch.recovered_points)


async def locked_earn_batch(
    session: AsyncSession, member: Member, earn: PointTransaction
) -> PointBatch | None:
    """The earn's batch, locked after the member's account, as every ledger operation locks
    them (a refund locking the batch first deadlocked with a spend of the member's)."""
    repository = PointsRepository(session)
    await repository.lock_account(member.id)
    return await repository.batch_for_transaction(earn.id)


async def reverse_for_refund(
    session: AsyncSession,
    actor: Actor,
    member: Member,
    *,
    earn: PointTransaction,
    batch: PointBatch,
    points: int,
    reason: str,
    reference_id: str,
    now: datetime,
) -> int:
    """Reverse up to `points` of an earn for a refund a vendor has made: not points of the
    earn that expired (they are not taken again); spent ones as the negative-balance policy
    says (INSUFFICIENT_POINTS under `forbid`, for staff to settle). Returns the points
    reversed."""
    wanted = min(points, reversible_points(batch))
    for _ in range(2):
        if wanted <= 0:
            return 0
        try:
            await reverse_earn(
                session,
                actor,
                member,
                earn=earn,
                points=wanted,
                reason=reason,
                reference_id=reference_id,
                now=now,
            )
        except Conflict as exc:
            if exc.code == "NOTHING_TO_REVERSE":
                return 0
            if exc.code != "EXCEEDS_REVERSIBLE":
                raise
            # More of it expired as the reversal brought the member's expiry up to date.
            wanted = min(wanted, int(exc.details["reversible"]))
            continue
        return wanted
    return 0


async def reverse_earn(
    session: AsyncSession,
    actor: Actor,
    member: Member,
    *,
    earn: PointTransaction,
    points: int | None,
    reason: str | None,
    reference_id: str,
    now: datetime | None = None,
) -> LedgerResult:
    """Refund an earn. The unspent part is cancelled; the spent part is taken back from the
    balance, or, where the program allows it, left owing as a negative balance. Points of
    the earn that already expired are not taken again. Nothing is ever clamped silently:
    a shortfall the policy forbids is an INSUFFICIENT_POINTS conflict."""
    now = now or utcnow()
    if earn.member_id != member.id or earn.type != TxnType.EARN:
        raise NotFound(
            f"Transaction {earn.public_id} is not an earn of this member.",
            code="TRANSACTION_NOT_FOUND",
        )
    request = request_fingerprint(reference_id, earn=earn.public_id, points=points, reason=reason)
    account, replay = await _open(
        session, TxnType.REVERSE, reference_id, member, points=points, request=request
    )
    repo = PointsRepository(session)
    if replay is not None:
        return LedgerResult(replay, account, replayed=True)
    await _expire_due(session, member, account, now)
    batch = await repo.batch_for_transaction(earn.id)
    reversible = 0 if batch is None else reversible_points(batch)
    requested = points if points is not None else reversible
    if batch is None or reversible <= 0:
        raise Conflict(
            f"Earn {earn.public_id} has no points left to reverse.",
            code="NOTHING_TO_REVERSE",
            details={"transaction_id": earn.public_id},
        )
    if requested > reversible:
        raise Conflict(
            f"Only {reversible} points of earn {earn.public_id} can be reversed.",
            code="EXCEEDS_REVERSIBLE",
            details={"reversible": reversible, "requested": requested},
        )
    was_pending = batch.status == BatchStatus.PENDING
    unspent = batch.remaining if batch.status in LIVE_STATUSES else 0
    cancel = min(requested, unspent)
    clawback = requested - cancel
    program: LoyaltyProgram = await program_service.get_program(session)
    # What the balance holds once the unspent part is cancelled.
    available = account.current - (0 if was_pending else cancel)
    owed = max(0, clawback - max(available, 0))
    if owed > 0 and program.negative_balance_policy == NegativeBalancePolicy.FORBID:
        raise InsufficientPoints(
            f"{clawback} spent points must be taken back but the balance is {available}.",
            details={
                "balance": available,
                "to_take_back": clawback,
                "negative_balance_policy": program.negative_balance_policy,
            },
        )
    batch.remaining -= cancel
    batch.cancelled_points += cancel
    batch.reversed_points += requested
    if batch.remaining == 0 and batch.status in LIVE_STATUSES:
        batch.status = (
            BatchStatus.CANCELLED if batch.cancelled_points == batch.initial else BatchStatus.SPENT
        )
    taken = (
        await _spend(session, account, clawback - owed, available=available)
        if clawback - owed > 0
        else []
    )
    txn = record_transaction(
        session,
        account,
        actor,
        now,
        TxnType.REVERSE,
        points=-(clawback + (0 if was_pending else cancel)),
        pending_points=-cancel if was_pending else 0,
        reason=reason,
        reference_id=reference_id,
        reference_scope=reference_scope(member),
        related=earn,
        batch=batch,
        details={
            "requested_points": points,
            **kept_request(request),
            "cancelled_unspent": cancel,
            "taken_from_balance": clawback - owed,
            "left_owing": owed,
            "earn_transaction_id": earn.public_id,
        },
    )
    await session.flush()
    allocations = await _allocate(session, txn, taken)
    if owed > 0:
        deficit = await repo.deficit_batch(member.id)
        if deficit is None:
            deficit = PointBatch(
                public_id=new_public_id("pbt"),
                member_id=member.id,
                status=BatchStatus.ACTIVE,
                source=BatchSource.DEFICIT,
                initial=0,
                remaining=0,
                transaction_id=txn.id,
                created_at=now,
            )
            session.add(deficit)
        deficit.remaining -= owed
    event = PointsAdjusted(**event_fields(txn, member))
    await _finish(session, actor, member, account, txn, event, action="points.reverse")
    return LedgerResult(txn, account, allocations=allocations)


async def extend_expiry(
    session: AsyncSession,
    actor: Actor,
    member: Member,
    batch: PointBatch,
    *,
    expires_at: datetime,
    reason: str,
    now: datetime | None = None,
) -> LedgerResult:
    now = now or utcnow()
    _require_future(expires_at, now)
    account = await PointsRepository(session).lock_account(member.id)
    # Points whose expiry has passed are expired, not extended (recovering them is another
    # operation), even where the expiry job has not reached them yet.
    await _expire_due(session, member, account, now)
    locked = await session.get(PointBatch, batch.id, with_for_update=True, populate_existing=True)
    assert locked is not None
    batch = locked
    if batch.status not in LIVE_STATUSES or batch.remaining <= 0:
        raise Conflict(
            f"Batch {batch.public_id} has no points left to extend (status {batch.status}).",
            code="BATCH_NOT_EXTENDABLE",
        )
    if batch.expires_at is None:
        raise Conflict(f"Batch {batch.public_id} never expires.", code="BATCH_NOT_EXTENDABLE")
    if expires_at <= batch.expires_at:
        raise ValidationFailed(
            "expires_at must be later than the batch's current expiry.",
            details={"current_expires_at": batch.expires_at.isoformat()},
        )
    previous = batch.expires_at
    batch.expires_at = expires_at
    batch.expiring_notified_at = None
    batch.expiring_alerted_at = None
    txn = record_transaction(
        session,
        account,
        actor,
        now,
        TxnType.EXTEND,
        reason=reason,
        batch=batch,
        details={
            "batch_id": batch.public_id,
            "points": batch.remaining,
            "previous_expires_at": previous.isoformat(),
            "expires_at": expires_at.isoformat(),
        },
    )
    event = PointsAdjusted(**event_fields(txn, member))
    await _finish(
        session,
        actor,
        member,
        account,
        txn,
        event,
        action="points.extend",
        changes={"batch_id": batch.public_id, "expires_at": expires_at.isoformat()},
    )
    return LedgerResult(txn, account)


def extension_moves(
    batches: Sequence[PointBatch], new_expiry: Callable[[PointBatch], datetime | None]
) -> list[tuple[PointBatch, datetime]]:
    """The batches `new_expiry` moves later, each with its new expiry; a batch it would not
    move later keeps its expiry."""
    moves = []
    for batch in batches:
        target = new_expiry(batch)
        if target is not None and batch.expires_at is not None and target > batch.expires_at:
            moves.append((batch, target))
    return moves


async def extend_batches(
    session: AsyncSession,
    actor: Actor,
    member: Member,
    account: PointAccount,
    moves: Sequence[tuple[PointBatch, datetime]],
    *,
    reason: str,
    reference_id: str,
    details: dict[str, Any],
    now: datetime,
) -> LedgerResult:
    """Move the expiry of several batches of the member at once (an earning rule's "extend
    the expiry of all active points"): one extend transaction lists every batch with its
    points, previous and new expiry. The caller holds the account and the batches locked
    (`PointsRepository.extendable_batches`) and a reference nobody used (as for
    `earn_by_rule`)."""
    assert moves
    listed = []
    for batch, expires_at in moves:
        assert batch.expires_at is not None
        assert batch.member_id == member.id
        listed.append(
            {
                "batch_id": batch.public_id,
                "points": batch.remaining,
                "previous_expires_at": batch.expires_at.isoformat(),
                "expires_at": expires_at.isoformat(),
            }
        )
        batch.expires_at = expires_at
        batch.expiring_notified_at = None
        batch.expiring_alerted_at = None
    txn = record_transaction(
        session,
        account,
        actor,
        now,
        TxnType.EXTEND,
        reason=reason,
        reference_id=reference_id,
        reference_scope=reference_scope(member),
        details={**details, "batches": listed},
    )
    event = PointsAdjusted(**event_fields(txn, member))
    await _finish(
        session,
        actor,
        member,
        account,
        txn,
        event,
        action="points.extend",
        changes={"batches": len(listed)},
    )
    return LedgerResult(txn, account)


async def recover_expired(
    session: AsyncSession,
    actor: Actor,
    member: Member,
    sources: Sequence[PointBatch],
    *,
    points: int | None,
    expires_at: datetime | None,
    reason: str,
    reference_id: str | None,
    now: datetime | None = None,
) -> LedgerResult:
    """Give back expired points as a new batch with a new expiry."""
    now = now or utcnow()
    _require_future(expires_at, now)
    request = request_fingerprint(
        reference_id,
        points=points,
        expires_at=expires_at,
        reason=reason,
        batches=sorted(source.public_id for source in sources),
    )
    account, replay = await _open(
        session, TxnType.RECOVER, reference_id, member, points=points, request=request
    )
    if replay is not None:
        return LedgerResult(replay, account, replayed=True)
    locked = []
    for source in sources:
        row = await session.get(PointBatch, source.id, with_for_update=True, populate_existing=True)
        assert row is not None
        locked.append(row)
    recoverable = sum(b.expired_points - b.recovered_points for b in locked)
    wanted = points if points is not None else recoverable
    if recoverable <= 0 or wanted > recoverable:
        raise Conflict(
            f"{recoverable} expired points can be recovered; {wanted} were asked for.",
            code="NOTHING_TO_RECOVER" if recoverable <= 0 else "EXCEEDS_RECOVERABLE",
            details={"recoverable": recoverable, "requested": wanted},
        )
    if expires_at is None:
        expires_at = program_service.expiry_for(await program_service.get_program(session), now)
    txn = record_transaction(
        session,
        account,
        actor,
        now,
        TxnType.RECOVER,
        points=wanted,
        reason=reason,
        reference_id=reference_id,
        reference_scope=reference_scope(member),
        details={
            "requested_points": points,
            "batches": [b.public_id for b in locked],
            **kept_request(request),
        },
    )
    await session.flush()
    left = wanted
    for source in locked:
        give = min(left, source.expired_points - source.recovered_points)
        source.recovered_points += give
        left -= give
    batch = await _new_batch(
        session, txn, points=wanted, source=BatchSource.RECOVER, now=now, expires_at=expires_at
    )
    txn.batch_id = batch.id
    event = PointsAdjusted(**event_fields(txn, member))
    await _finish(session, actor, member, account, txn, event, action="points.recover")
    return LedgerResult(txn, account)


async def transfer_points(
    session: AsyncSession,
    actor: Actor,
    source: Member,
    target: Member,
    *,
    points: int,
    reason: str | None,
    reference_id: str | None,
    now: datetime | None = None,
) -> tuple[LedgerResult, LedgerResult]:
    """Move points between members; they keep the expiry they had."""
    now = now or utcnow()
    if source.id == target.id:
        raise ValidationFailed("A member cannot transfer points to themselves.")
    request = request_fingerprint(reference_id, points=points, reason=reason, to=target.public_id)
    replay = await find_replay(
        session, TxnType.TRANSFER_OUT, reference_id, member=source, points=points, request=request
    )
    repo = PointsRepository(session)
    # Lock both accounts in id order, so two opposite transfers cannot deadlock.
    first, second = sorted((source.id, target.id))
    accounts = {first: await repo.lock_account(first), second: await repo.lock_account(second)}
    out_account, in_account = accounts[source.id], accounts[target.id]
    if replay is not None:
        if replay.details.get("to_member_id") != target.public_id:
            raise ReferenceReused(
                f"reference_id '{reference_id}' was used for a transfer to another member.",
                details={"reference_id": reference_id, "transaction_id": replay.public_id},
            )
        incoming = await repo.transfer_in_of(replay.id)
        assert incoming is not None
        return (
            LedgerResult(replay, out_account, replayed=True),
            LedgerResult(incoming, in_account, replayed=True),
        )
    await _expire_due(session, source, out_account, now)
    taken = await _spend(session, out_account, points)
    out_txn = record_transaction(
        session,
        out_account,
        actor,
        now,
        TxnType.TRANSFER_OUT,
        points=-points,
        reason=reason,
        reference_id=reference_id,
        reference_scope=reference_scope(source),
        details={
            "requested_points": points,
            "to_member_id": target.public_id,
            **kept_request(request),
        },
    )
    await session.flush()
    allocations = await _allocate(session, out_txn, taken)
    in_txn = record_transaction(
        session,
        in_account,
        actor,
        now,
        TxnType.TRANSFER_IN,
        points=points,
        reason=reason,
        # Links the pair: the incoming side is found by the outgoing transaction's id.
        reference_id=out_txn.public_id,
        reference_scope=reference_scope(target),
        related=out_txn,
        details={"from_member_id": source.public_id},
    )
    await session.flush()
    by_expiry: dict[datetime | None, int] = {}
    for batch, amount in taken:
        by_expiry[batch.expires_at] = by_expiry.get(batch.expires_at, 0) + amount
    for expires_at, amount in by_expiry.items():
        await _new_batch(
            session,
            in_txn,
            points=amount,
            source=BatchSource.TRANSFER,
            now=now,
            expires_at=expires_at,
        )
    await _finish(
        session,
        actor,
        source,
        out_account,
        out_txn,
        PointsDeducted(**event_fields(out_txn, source)),
        action="points.transfer_out",
    )
    await _finish(
        session,
        actor,
        target,
        in_account,
        in_txn,
        PointsEarned(**event_fields(in_txn, target)),
        action="points.transfer_in",
    )
    return (
        LedgerResult(out_txn, out_account, allocations=allocations),
        LedgerResult(in_txn, in_account),
    )


# ---------------------------------------------------------------- output


async def transactions_out(
    session: AsyncSession,
    rows: Sequence[tuple[PointTransaction, str]],
    *,
    with_allocations: bool = True,
) -> list[TransactionOut]:
    repo = PointsRepository(session)
    txns = [txn for txn, _ in rows]
    related = await repo.public_ids(
        t.related_transaction_id for t in txns if t.related_transaction_id
    )
    batches = await repo.batch_public_ids(t.batch_id for t in txns if t.batch_id)
    allocations = await repo.allocations_for(t.id for t in txns) if with_allocations else {}
    return [
        transaction_out(
            txn,
            member_public_id,
            related_public_id=related.get(txn.related_transaction_id)
            if txn.related_transaction_id
            else None,
            batch_public_id=batches.get(txn.batch_id) if txn.batch_id else None,
            allocations=allocations.get(txn.id, []),
        )
        for txn, member_public_id in rows
    ]


def transaction_out(
    txn: PointTransaction,
    member_public_id: str,
    *,
    related_public_id: str | None = None,
    batch_public_id: str | None = None,
    allocations: Sequence[tuple[str, int]] = (),
) -> TransactionOut:
    """A transaction as the API shows it, from its row and the public ids it refers to."""
    return TransactionOut(
        id=txn.public_id,
        member_id=member_public_id,
        type=txn.type,
        points=txn.points,
        pending_points=txn.pending_points,
        balance_after=txn.balance_after,
        pending_after=txn.pending_after,
        reason=txn.reason,
        reference_id=txn.reference_id,
        related_transaction_id=related_public_id,
        batch_id=batch_public_id,
        amount=txn.amount,
        currency=txn.currency,
        details={k: v for k, v in txn.details.items() if k not in PRIVATE_DETAILS},
        actor=txn.actor,
        occurred_at=txn.occurred_at,
        allocations=[AllocationOut(batch_id=b, points=p) for b, p in allocations],
    )
