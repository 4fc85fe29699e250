"""What payment events do to members, whichever provider reported them.

A provider with the Payments capability turns its events into `PaymentNotice`s; this module
applies them: a payment joins or renews the member's term and earns points (whether the
earn succeeds never decides the membership), a failed one gives the member grace after
the paid term (never cutting it short) and raises an alert, an ended subscription cancels
at the period end, a refund reverses the points the payment earned. Every notice is
applied in the transaction that marks its inbound event processed, and a payment is
recorded under every id it is known by, so a second notice of it (Checkout's and the
invoice's) applies nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.exc import DataError
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.alerts.models import AlertType
from memberhub.alerts.service import raise_alert
from memberhub.auth.principal import Principal
from memberhub.events.catalog import MemberPaymentChanged
from memberhub.events.service import emit
from memberhub.integrations.models import Integration, PaymentRecord
from memberhub.integrations.providers.base import PaymentNotice
from memberhub.kit import money
from memberhub.kit.actor import Actor
from memberhub.kit.errors import Conflict, MemberhubError
from memberhub.members.models import Member, MemberStatus
from memberhub.members.repository import MemberRepository
from memberhub.memberships import service as memberships
from memberhub.memberships.models import MembershipPlan
from memberhub.organisations.repository import OrganisationRepository
from memberhub.points import service as points
from memberhub.points.models import PointTransaction
from memberhub.points.schemas import MAX_AMOUNT
from memberhub.program import service as program_service

S = MemberStatus
DEFAULT_GRACE_DAYS = 14


class PaymentUnmatched(Conflict):
    code = "PAYMENT_UNMATCHED"


class PaymentNotYetApplied(Exception):
    """A refund arrived before the payment it refunds: worth trying again (not final)."""


# How long a refund waits for its payment to be applied before it is ignored.
REFUND_WAIT = timedelta(hours=1)
# A provider's billing periods and a member's terms are counted apart (a term starts when
# its payment was applied, and in the program's time zone): they may differ by hours, and
# a period differs from the next by a month at least.
PERIOD_TOLERANCE = timedelta(days=1)


class PaymentSettings:
    """The parts of a payments integration's config this module reads."""

    def __init__(self, config: Any) -> None:
        self.price_plans: dict[str, str] = dict(getattr(config, "price_plans", {}) or {})
        self.grace_days: int = int(getattr(config, "grace_days", DEFAULT_GRACE_DAYS))
        self.earn_points: bool = bool(getattr(config, "earn_points", True))
        self.exchange_rates: dict[str, float] = dict(getattr(config, "exchange_rates", {}) or {})


async def apply_notice(
    session: AsyncSession,
    integration: Integration,
    settings: PaymentSettings,
    notice: PaymentNotice,
    *,
    now: datetime,
) -> dict[str, Any]:
    """Apply one notice; return what was done, for the inbound event's result."""
    actor = Actor.system(f"integration:{integration.public_id}")
    principal = Principal.system(actor)
    if notice.kind == "paid":
        return await _paid(session, integration, settings, notice, principal, now)
    if notice.kind == "refunded":
        return await _refunded(session, integration, notice, principal, now)
    if notice.kind == "linked":
        return await _linked(session, integration, notice, now)
    member = await _find_member(session, integration, notice)
    if notice.kind == "failed":
        return await _failed(session, integration, settings, notice, member, principal, now)
    return await _subscription_ended(session, integration, notice, member, principal, now)


# ---------------------------------------------------------------- matching


async def _find_member(
    session: AsyncSession, integration: Integration, notice: PaymentNotice
) -> Member:
    """By the member id in the payment's metadata, then the provider's customer id stored on
    the member, then the email (case-insensitive) — within the integration's organisation."""
    visible = await _visible_organisations(session, integration)
    repo = MemberRepository(session)
    if notice.member_id:
        member = await repo.get_by_public_id(notice.member_id, for_update=True)
        if member is not None and _within(member, visible):
            return member
    candidates: Sequence[Member] = []
    if notice.customer_id:
        candidates = await _members_where(
            session, Member.external_ids[integration.provider].as_string() == notice.customer_id
        )
    if not candidates and notice.email:
        candidates = await _members_where(
            session, Member.email_normalized == notice.email.strip().lower()
        )
    candidates = [m for m in candidates if _within(m, visible)]
    if len(candidates) == 1:
        member = await repo.get_by_public_id(candidates[0].public_id, for_update=True)
        assert member is not None
        return member
    if len(candidates) > 1:
        raise PaymentUnmatched(
            "The payment's email matches several members; put the member id in the payment's "
            "metadata (member_id).",
            details={"members": sorted(m.public_id for m in candidates)[:10]},
        )
    raise PaymentUnmatched(
        "No member matches the payment (by metadata member_id, customer id or email).",
        details={"member_id": notice.member_id, "customer_id": notice.customer_id},
    )


async def _members_where(session: AsyncSession, condition: Any) -> Sequence[Member]:
    rows = await session.scalars(
        select(Member).where(Member.deleted_at.is_(None), condition).limit(10)
    )
    return list(rows)


async def _visible_organisations(
    session: AsyncSession, integration: Integration
) -> frozenset[int] | None:
    if integration.organisation_id is None:
        return None
    return frozenset(await OrganisationRepository(session).subtree_ids(integration.organisation_id))


def _within(member: Member, visible: frozenset[int] | None) -> bool:
    return visible is None or member.organisation_id in visible


async def _plan_for(
    session: AsyncSession,
    integration: Integration,
    settings: PaymentSettings,
    notice: PaymentNotice,
    member: Member,
) -> MembershipPlan:
    wanted = notice.plan
    if wanted is None:
        wanted = next(
            (settings.price_plans[p] for p in notice.price_ids if p in settings.price_plans), None
        )
    if wanted is not None:
        query = select(MembershipPlan).where(
            (MembershipPlan.public_id == wanted) | (MembershipPlan.code == wanted)
        )
        # An organisation's integration sells the plans its keys see: installation-wide
        # ones and those of its own tree, never another organisation's.
        visible = await _visible_organisations(session, integration)
        if visible is not None:
            query = query.where(
                MembershipPlan.organisation_id.is_(None)
                | MembershipPlan.organisation_id.in_(visible)
            )
        plan = await session.scalar(query)
        if plan is None:
            raise PaymentUnmatched(
                f"The payment names plan {wanted!r}, which does not exist.",
                details={"plan": wanted},
            )
        return plan
    if member.plan is not None:
        return member.plan
    raise PaymentUnmatched(
        "The payment names no plan (metadata plan_id or a price in config.price_plans) and "
        "the member has none.",
        details={"price_ids": list(notice.price_ids)},
    )


# ---------------------------------------------------------------- notices


async def _records(
    session: AsyncSession, integration: Integration, references: Sequence[str]
) -> list[PaymentRecord]:
    if not references:
        return []
    rows = await session.scalars(
        select(PaymentRecord).where(
            PaymentRecord.integration_id == integration.id,
            PaymentRecord.reference.in_(references),
        )
    )
    return list(rows)


def _remember(
    session: AsyncSession,
    integration: Integration,
    references: Sequence[str],
    *,
    known: Sequence[str],
    payment_key: str,
    member: Member,
    amount: int,
    currency: str,
    earn_id: int | None,
) -> None:
    for reference in references:
        if reference not in known:
            session.add(
                PaymentRecord(
                    integration_id=integration.id,
                    reference=reference,
                    payment_key=payment_key,
                    member_id=member.id,
                    amount=amount,
                    currency=currency,
                    earn_transaction_id=earn_id,
                )
            )


async def _paid(
    session: AsyncSession,
    integration: Integration,
    settings: PaymentSettings,
    notice: PaymentNotice,
    principal: Principal,
    now: datetime,
) -> dict[str, Any]:
    if not notice.references:
        raise PaymentUnmatched("The payment carries no id to record it by; it is not applied.")
    existing = await _records(session, integration, notice.references)
    if existing:
        first = existing[0]
        _remember(
            session,
            integration,
            notice.references,
            known=[r.reference for r in existing],
            payment_key=first.payment_key,
            member=await _member_by_id(session, first.member_id),
            amount=first.amount,
            currency=first.currency,
            earn_id=first.earn_transaction_id,
        )
        return {"action": "already_applied", "payment": first.payment_key}
    member = await _find_member(session, integration, notice)
    plan = await _plan_for(session, integration, settings, notice, member)
    result: dict[str, Any] = {"member_id": member.public_id, "plan_id": plan.public_id}
    # Paid before the subscription was deleted, delivered after the deletion was applied:
    # the term paid for is added, but the cancellation at its end, and the status, stay.
    paid_before_cancelling = bool(
        member.cancel_at_period_end
        and member.payment_status == "cancelled"
        and member.payment_updated_at is not None
        and notice.occurred_at is not None
        and notice.occurred_at < member.payment_updated_at
    )
    if member.status in (S.PENDING, S.LAPSED, S.CANCELLED):
        await memberships.join(session, principal, member.public_id, plan.public_id, _note(notice))
        result["action"] = "join"
    elif member.status in (S.ACTIVE, S.GRACE):
        await memberships.renew(
            session,
            principal,
            member.public_id,
            plan.public_id if plan.id != member.plan_id else None,
            _note(notice),
            now=now,
            enforce_window=False,
        )
        result["action"] = "renew"
        if paid_before_cancelling:
            await memberships.cancel(
                session,
                principal,
                member.public_id,
                at_period_end=True,
                note="The subscription was deleted after this payment.",
            )
            result["cancellation"] = "kept"
    else:
        # Suspended: the payment is recorded, the suspension stays for staff to lift.
        result["action"] = "recorded"
    earn_id = None
    currency = (notice.currency or plan.currency).upper()
    payment_key = notice.references[0]
    if settings.earn_points and notice.amount > 0:
        earn_id, result["points"] = await _earn(
            session,
            principal,
            member,
            notice,
            currency,
            f"{integration.public_id}:{payment_key}",
            now,
            settings.exchange_rates,
        )
    _remember(
        session,
        integration,
        notice.references,
        known=[],
        payment_key=payment_key,
        member=member,
        amount=notice.amount,
        currency=currency,
        earn_id=earn_id,
    )
    # A payment older than the member's last payment event (delivered late, after a later
    # invoice failed, say): its term is added above, but the payments stay where the later
    # event left them.
    older = (
        member.payment_updated_at is not None
        and notice.occurred_at is not None
        and notice.occurred_at < member.payment_updated_at
    )
    if not (older and result["action"] in ("renew", "recorded")):
        _set_payment_status(session, integration, member, "paid", notice, now)
    elif not paid_before_cancelling:
        result["payment_status"] = "kept"
    return result


async def _earn(
    session: AsyncSession,
    principal: Principal,
    member: Member,
    notice: PaymentNotice,
    currency: str,
    reference_id: str,
    now: datetime,
    exchange_rates: dict[str, float],
) -> tuple[int | None, dict[str, Any]]:
    """Points for a payment, under the documented rule: a payment in the program's currency
    earns as paid; one in another currency is converted at the integration's
    `exchange_rates` (one whole unit of it is worth `rate` whole units of the program's
    currency; `money.convert`), or earns nothing without a rate. Joining or renewing never
    depends on the earn: it runs in a savepoint, and an earn the ledger refuses earns
    nothing and says why."""
    program = await program_service.get_program(session)
    outcome: dict[str, Any] = {}
    amount = notice.amount
    if currency != program.currency:
        rate = exchange_rates.get(currency)
        if rate is None:
            return None, {
                "earned": 0,
                "reason": f"currency {currency} is not the program's {program.currency} and "
                f"config.exchange_rates has no rate for {currency}",
            }
        amount = money.convert(notice.amount, source=currency, target=program.currency, rate=rate)
        outcome["converted"] = {
            "from": {"currency": currency, "amount": notice.amount},
            "to": {"currency": program.currency, "amount": amount},
            "rate": rate,
        }
        if amount > MAX_AMOUNT:
            return None, {**outcome, "earned": 0, "reason": "the converted amount is too large"}
    try:
        async with session.begin_nested():
            earned = await points.earn_points(
                session,
                principal.actor,
                member,
                amount=amount,
                currency=program.currency,
                reference_id=reference_id,
                reason="payment",
                now=now,
            )
    except (MemberhubError, DataError) as exc:
        if sa_inspect(member).expired_attributes:
            # The savepoint's rollback expired what the earn had changed; reload it.
            await session.refresh(member)
        message = exc.message if isinstance(exc, MemberhubError) else "it could not be stored"
        return None, {**outcome, "earned": 0, "reason": f"the earn was refused: {message}"}
    txn = earned.transaction
    return txn.id, {**outcome, "earned": txn.points + txn.pending_points}


async def _failed(
    session: AsyncSession,
    integration: Integration,
    settings: PaymentSettings,
    notice: PaymentNotice,
    member: Member,
    principal: Principal,
    now: datetime,
) -> dict[str, Any]:
    if await _records(session, integration, notice.references):
        # Stripe retried the invoice and it was paid; this older failure came late.
        return {"member_id": member.public_id, "action": "ignored", "reason": "already paid"}
    if _paid_for(member, notice):
        # An older invoice (a previous period's, another subscription's) failing, delivered
        # after a later one was paid: the time it was for is paid, nothing is past due.
        return {
            "member_id": member.public_id,
            "action": "ignored",
            "reason": "an invoice for a period already paid for (an older event)",
        }
    result: dict[str, Any] = {"member_id": member.public_id, "action": "recorded"}
    if member.status == S.ACTIVE:
        grace_days = member.plan.grace_days if member.plan and member.plan.grace_days else 0
        # Time already paid for is kept: grace follows the paid term.
        member = await memberships.record_failed_payment(
            session,
            principal,
            member.public_id,
            grace_days=grace_days or settings.grace_days,
            note=_note(notice),
            now=now,
        )
        if member.status == S.GRACE:
            result["action"] = "grace"
        elif member.term_ends_at is not None:
            result["paid_until"] = member.term_ends_at.isoformat()
        if member.grace_ends_at is not None:
            result["grace_ends_at"] = member.grace_ends_at.isoformat()
    reference = notice.references[0] if notice.references else "unknown"
    await raise_alert(
        session,
        AlertType.PAYMENT_FAILED,
        member=member,
        dedupe_key=f"{AlertType.PAYMENT_FAILED}:{integration.public_id}:{reference}",
        message=f"A payment of {member.public_id} failed ({integration.provider} {reference}).",
        data={
            "integration_id": integration.public_id,
            "reference": reference,
            "amount": notice.amount,
            "currency": notice.currency,
        },
        now=now,
    )
    _set_payment_status(session, integration, member, "past_due", notice, now)
    return result


async def _subscription_ended(
    session: AsyncSession,
    integration: Integration,
    notice: PaymentNotice,
    member: Member,
    principal: Principal,
    now: datetime,
) -> dict[str, Any]:
    if _outlasted_by_paid_term(member, notice):
        # Another subscription (the member moved to a new one) has paid beyond this one's
        # last period: its end, however late it is delivered, ends nothing.
        return {
            "member_id": member.public_id,
            "action": "ignored",
            "reason": "a subscription whose last period the paid term outlasts",
        }
    result: dict[str, Any] = {"member_id": member.public_id, "action": "recorded"}
    if member.status == S.ACTIVE and not member.cancel_at_period_end:
        await memberships.cancel(
            session, principal, member.public_id, at_period_end=True, note=_note(notice)
        )
        result["action"] = "cancel_at_period_end"
    elif member.status == S.GRACE:
        # In grace the paid period is over: the cancellation takes effect now.
        await memberships.cancel(
            session, principal, member.public_id, at_period_end=True, note=_note(notice)
        )
        result["action"] = "cancel"
    _set_payment_status(session, integration, member, "cancelled", notice, now)
    return result


async def _linked(
    session: AsyncSession, integration: Integration, notice: PaymentNotice, now: datetime
) -> dict[str, Any]:
    """Remember the payment's other ids, so that a notice naming only those (a refund of
    the charge) finds it."""
    records = await _records(session, integration, notice.references)
    if not records:
        if now - (notice.occurred_at or now) < REFUND_WAIT:
            raise PaymentNotYetApplied(
                "No payment on record with these ids yet; trying again shortly."
            )
        return {"action": "ignored", "reason": "no payment on record with these ids"}
    record = records[0]
    known = [r.reference for r in records]
    added = [reference for reference in notice.references if reference not in known]
    member = await _member_by_id(session, record.member_id)
    _remember(
        session,
        integration,
        added,
        known=known,
        payment_key=record.payment_key,
        member=member,
        amount=record.amount,
        currency=record.currency,
        earn_id=record.earn_transaction_id,
    )
    return {"member_id": member.public_id, "action": "linked", "references": added}


async def _refunded(
    session: AsyncSession,
    integration: Integration,
    notice: PaymentNotice,
    principal: Principal,
    now: datetime,
) -> dict[str, Any]:
    records = await _records(session, integration, notice.references)
    if not records:
        occurred = notice.occurred_at or now
        if now - occurred < REFUND_WAIT:
            # Events arrive in any order: the payment may be on its way, or waiting for a
            # retry. The worker tries again with backoff.
            raise PaymentNotYetApplied(
                "No payment on record with these ids yet; trying again shortly."
            )
        return {"action": "ignored", "reason": "no payment on record with these ids"}
    record = records[0]
    # The refunded total only grows: one no higher than a total already applied is an older
    # event (or this one again), and changes neither the status nor the points.
    raised = await session.execute(
        update(PaymentRecord)
        .where(
            PaymentRecord.integration_id == integration.id,
            PaymentRecord.payment_key == record.payment_key,
            PaymentRecord.refunded_amount < notice.amount_refunded,
        )
        .values(refunded_amount=notice.amount_refunded)
        .execution_options(synchronize_session=False)
    )
    if not raised.rowcount:  # type: ignore[attr-defined]
        return {
            "action": "ignored",
            "reason": "a refund total no higher than one already applied (an older event)",
        }
    member = await _member_by_id(session, record.member_id)
    full = notice.amount_refunded >= record.amount or notice.amount_refunded >= notice.amount
    result: dict[str, Any] = {"member_id": member.public_id, "action": "refund", "points": 0}
    if record.earn_transaction_id is not None:
        result["points"] = await _reverse(
            session, integration, notice, record, member, principal, now, full=full
        )
    if await _paid_again_since(session, record):
        # The payment status is the member's latest payment's: the refund of an older one
        # (a previous period's, refunded or delivered after a later one was paid) takes its
        # points back and leaves the status of the payment that pays for the term.
        result["payment_status"] = "kept: a later payment is on record"
        return result
    status = "refunded" if full else "partially_refunded"
    _set_payment_status(session, integration, member, status, notice, now)
    return result


async def _paid_again_since(session: AsyncSession, record: PaymentRecord) -> bool:
    """Whether the member has a payment first recorded after `record`'s payment was (a
    payment's later ids, linked afterwards, do not make it a later payment)."""
    first_of_this = (
        select(func.min(PaymentRecord.id))
        .where(
            PaymentRecord.integration_id == record.integration_id,
            PaymentRecord.payment_key == record.payment_key,
        )
        .scalar_subquery()
    )
    later = await session.scalar(
        select(PaymentRecord.payment_key)
        .where(PaymentRecord.member_id == record.member_id)
        .group_by(PaymentRecord.integration_id, PaymentRecord.payment_key)
        .having(func.min(PaymentRecord.id) > first_of_this)
        .limit(1)
    )
    return later is not None


async def _reverse(
    session: AsyncSession,
    integration: Integration,
    notice: PaymentNotice,
    record: PaymentRecord,
    member: Member,
    principal: Principal,
    now: datetime,
    *,
    full: bool,
) -> int:
    """Take back the share of the payment's points that was refunded, so far: a second
    partial refund reverses only what the first did not (`points.reverse_for_refund`)."""
    earn = await session.get(PointTransaction, record.earn_transaction_id)
    if earn is None:
        return 0
    earned = earn.points + earn.pending_points
    total = max(record.amount, 1)
    target = earned if full else earned * notice.amount_refunded // total
    batch = await points.locked_earn_batch(session, member, earn)
    if batch is None:
        return 0
    # One reversal per state of the earn: the same notice again is the same reversal.
    reference = (
        f"{integration.public_id}:refund:{record.payment_key}:{target}:{batch.reversed_points}"
    )
    return await points.reverse_for_refund(
        session,
        principal.actor,
        member,
        earn=earn,
        batch=batch,
        points=target - batch.reversed_points,
        reason="refund",
        reference_id=reference,
        now=now,
    )


# ---------------------------------------------------------------- helpers


async def _member_by_id(session: AsyncSession, member_id: int) -> Member:
    member = await MemberRepository(session).get_by_id(member_id, for_update=True)
    if member is None:
        raise PaymentUnmatched("The member the payment was applied to no longer exists.")
    return member


def _paid_for(member: Member, notice: PaymentNotice) -> bool:
    """Whether the member's paid term already covers the period the notice is for."""
    return (
        notice.period_end is not None
        and member.term_ends_at is not None
        and notice.period_end <= member.term_ends_at + PERIOD_TOLERANCE
    )


def _outlasted_by_paid_term(member: Member, notice: PaymentNotice) -> bool:
    """Whether the member's paid term runs on past the period the notice's subscription
    last had, by more than the two can differ by: paid for by something else."""
    return (
        notice.period_end is not None
        and member.term_ends_at is not None
        and notice.period_end + PERIOD_TOLERANCE < member.term_ends_at
    )


def _note(notice: PaymentNotice) -> str:
    return f"payment {', '.join(notice.references[:3])}"[:1000]


def _set_payment_status(
    session: AsyncSession,
    integration: Integration,
    member: Member,
    status: str,
    notice: PaymentNotice,
    now: datetime,
) -> None:
    member.payment_status = status
    # When the processor says it happened, not when it was applied (a worker behind, a
    # notice retried for hours): which of two payment events came first is judged by it.
    member.payment_updated_at = notice.occurred_at or now
    if notice.customer_id and member.external_ids.get(integration.provider) != notice.customer_id:
        member.external_ids = {**member.external_ids, integration.provider: notice.customer_id}
    emit(
        session,
        MemberPaymentChanged(
            member_id=member.public_id,
            organisation_id=member.organisation.public_id if member.organisation else None,
            integration_id=integration.public_id,
            payment_status=status,
            references=list(notice.references),
            amount=notice.amount or None,
            currency=notice.currency.upper() if notice.currency else None,
            occurred_at=now,
        ),
        organisation_id=member.organisation_id,
        member_public_id=member.public_id,
        occurred_at=now,
    )


__all__ = ["PaymentSettings", "PaymentUnmatched", "apply_notice"]
