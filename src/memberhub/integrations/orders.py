"""What a shop's order events do, whichever provider reported them.

A provider with the Orders capability turns its events into `OrderNotice`s; this module
applies them, in the transaction that marks the inbound event processed:

- a paid order is recorded as an `order.paid` activity (source: the provider's name,
  source id: the order id), matched by the shop's customer id as an external id, then by
  email, and earns what the earning rules say. A repeat of the order is a replay of the
  activity and earns nothing again.
- a refund takes back the share of each point the order's activity earned that the
  refunded money is of the order's total, through the ledger's reverse operation (so the
  program's negative balance policy decides what happens to points already spent). Shares
  are counted on the running total refunded, so several partial refunds of one order take
  back exactly what one refund of their sum would, and a full refund takes back all. Each
  reversal's reference names the refund, so a refund applied twice takes nothing twice.

Refunds of one order are serialised by a lock on the order's activity row; the running
total is the sum of the refunds of the order already processed (kept in their inbound
events' results).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.activities.models import Activity
from memberhub.activities.repository import ActivityRepository
from memberhub.activities.schemas import ActivityAttributes, ActivityIn, ActivityItem
from memberhub.activities.service import record_activity
from memberhub.auth.principal import Principal
from memberhub.earning_rules.models import RuleAward
from memberhub.integrations.models import InboundEvent, InboundStatus, Integration
from memberhub.integrations.payments import REFUND_WAIT, PaymentNotYetApplied
from memberhub.integrations.providers.base import OrderNotice
from memberhub.kit.actor import Actor
from memberhub.kit.errors import NotFound, ValidationFailed
from memberhub.members.models import Member
from memberhub.members.repository import MemberRepository
from memberhub.organisations.models import Organisation
from memberhub.points import service as points
from memberhub.points.models import PointTransaction, TxnType
from memberhub.points.repository import PointsRepository

ORDER_PAID = "order.paid"


async def apply_order_notice(
    session: AsyncSession,
    integration: Integration,
    notice: OrderNotice,
    *,
    event_type: str,
    now: datetime,
) -> dict[str, Any]:
    """Apply one notice; return what was done, for the inbound event's result."""
    principal = Principal.system(Actor.system(f"integration:{integration.public_id}"))
    if notice.kind == "paid":
        return await _paid(session, integration, principal, notice, now)
    return await _refunded(session, integration, principal, notice, event_type, now)


async def _paid(
    session: AsyncSession,
    integration: Integration,
    principal: Principal,
    notice: OrderNotice,
    now: datetime,
) -> dict[str, Any]:
    if notice.email is None and notice.customer_id is None:
        return {"action": "ignored", "reason": "the order names no customer and no email"}
    organisation = (
        await session.get(Organisation, integration.organisation_id)
        if integration.organisation_id is not None
        else None
    )
    try:
        payload = ActivityIn(
            type=ORDER_PAID,
            # A shop's clock a little ahead of ours does not make the order a future one.
            occurred_at=min(notice.occurred_at or now, now),
            source=integration.provider,
            source_id=notice.order_id,
            external_id=(
                f"{integration.provider}:{notice.customer_id}" if notice.customer_id else None
            ),
            email=notice.email,
            organisation_id=organisation.public_id if organisation is not None else None,
            attributes=ActivityAttributes(
                amount=notice.amount,
                currency=notice.currency,
                paid_amount=notice.paid_amount,
                paid_currency=notice.paid_currency,
                order_id=notice.order_id,
                items=[
                    ActivityItem(
                        sku=item.sku, name=item.name, quantity=item.quantity, amount=item.amount
                    )
                    for item in notice.items
                ]
                or None,
            ),
        )
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in exc.errors()[:5]
        )
        message = f"The order cannot be recorded as an activity: {problems}."
        raise ValidationFailed(message) from None
    recorded = await record_activity(session, principal, payload, now=now)
    activity = recorded.activity
    return {
        "action": "replayed" if recorded.replayed else "recorded",
        "order_id": notice.order_id,
        "activity_id": activity.id,
        "member_id": activity.member_id,
        "activity_status": activity.status,
        # What this notice earned: a replay earns nothing (the credits are the first one's).
        "points": 0 if recorded.replayed else sum(credit.points for credit in activity.credits),
    }


async def _refunded(
    session: AsyncSession,
    integration: Integration,
    principal: Principal,
    notice: OrderNotice,
    event_type: str,
    now: datetime,
) -> dict[str, Any]:
    assert notice.refund_id is not None
    result: dict[str, Any] = {
        "action": "refund",
        "order_id": notice.order_id,
        "refund_id": notice.refund_id,
        "refunded_amount": notice.amount,
        "points": 0,
    }
    repo = ActivityRepository(session)
    found = await repo.by_source(
        integration.organisation_id or 0, integration.provider, notice.order_id
    )
    if found is None:
        occurred = notice.occurred_at or now
        if now - occurred < REFUND_WAIT:
            # Webhooks arrive in any order: the paid order may be on its way.
            raise PaymentNotYetApplied(f"Order {notice.order_id} is not recorded yet.")
        return {**result, "action": "ignored", "reason": "the order was never recorded"}
    # Refunds of one order wait for each other here, so each sees the ones before it.
    activity = await repo.get_by_public_id(found.public_id, for_update=True)
    assert activity is not None
    result["activity_id"] = activity.public_id
    result["refunded_currency"] = notice.currency
    attributes = activity.attributes
    if notice.amount == 0:
        return {**result, "action": "ignored", "reason": "the refund returned no money"}
    # A refund's share of the order is measured in its own currency: the shop's, or the
    # one the customer paid in (in which a shop selling in several currencies refunds).
    totals = {
        attributes.get("currency"): attributes.get("amount"),
        attributes.get("paid_currency"): attributes.get("paid_amount"),
    }
    order_amount = totals.get(notice.currency)
    if not isinstance(order_amount, int) or not order_amount:
        paid_in = " or ".join(str(c) for c in totals if c is not None)
        return {
            **result,
            "action": "ignored",
            "reason": f"the refund is in {notice.currency}, the order was paid in {paid_in}",
        }
    if activity.member_id is None:
        return {**result, "action": "ignored", "reason": "the order matched no member"}
    member = await _member(session, activity.member_id)
    before = await _refunded_before(
        session, integration, event_type, notice, order_currency=attributes.get("currency")
    )
    reversals = []
    for earn in await _earns_of(session, activity):
        reversed_points = await _reverse_share(
            session,
            principal,
            member,
            earn,
            reference_id=f"{integration.public_id}:refund:{notice.refund_id}:{earn.public_id}",
            refund_id=notice.refund_id,
            order_amount=order_amount,
            before=before,
            after=before + notice.amount,
            now=now,
        )
        if reversed_points:
            reversals.append({"transaction_id": earn.public_id, "points": reversed_points})
    result["member_id"] = member.public_id
    result["refunded_before"] = before
    result["points"] = sum(reversal["points"] for reversal in reversals)
    result["reversals"] = reversals
    return result


async def _member(session: AsyncSession, member_id: int) -> Member:
    member = await MemberRepository(session).get_by_id(member_id, for_update=True)
    if member is None:
        raise NotFound("The member the order was recorded for no longer exists.")
    return member


async def _refunded_before(
    session: AsyncSession,
    integration: Integration,
    event_type: str,
    notice: OrderNotice,
    *,
    order_currency: Any,
) -> int:
    """What the refunds of the order already applied returned in the notice's currency,
    each refund counted once (results written before refunds named their currency were in
    the order's)."""
    rows = await session.scalars(
        select(InboundEvent.result).where(
            InboundEvent.integration_id == integration.id,
            InboundEvent.event_type == event_type,
            InboundEvent.status == InboundStatus.PROCESSED,
            InboundEvent.result["order_id"].as_string() == notice.order_id,
        )
    )
    amounts: dict[str, int] = {}
    for row in rows:
        refund_id = row.get("refund_id")
        currency = row.get("refunded_currency", order_currency)
        if (
            refund_id != notice.refund_id
            and currency == notice.currency
            and isinstance(row.get("refunded_amount"), int)
        ):
            amounts[refund_id] = row["refunded_amount"]
    return sum(amounts.values())


async def _earns_of(session: AsyncSession, activity: Activity) -> Sequence[PointTransaction]:
    """The earns the activity's rules credited (extensions credit nothing to reverse)."""
    rows = await session.scalars(
        select(PointTransaction)
        .join(RuleAward, RuleAward.transaction_id == PointTransaction.id)
        .where(RuleAward.activity_id == activity.id, PointTransaction.type == TxnType.EARN)
        .order_by(PointTransaction.id)
    )
    return list(rows)


def share(points_earned: int, refunded: int, order_amount: int) -> int:
    """The points of an earn that `refunded` of `order_amount` stands for, rounded down
    (all of them once the whole order is refunded)."""
    if refunded >= order_amount:
        return points_earned
    return points_earned * refunded // order_amount


async def _reverse_share(
    session: AsyncSession,
    principal: Principal,
    member: Member,
    earn: PointTransaction,
    *,
    reference_id: str,
    refund_id: str,
    order_amount: int,
    before: int,
    after: int,
    now: datetime,
) -> int:
    """The points of `earn` this refund takes back (0 when it was applied already)."""
    existing = await PointsRepository(session).by_reference(
        TxnType.REVERSE, points.reference_scope(member), reference_id
    )
    if existing is not None:
        return 0  # this refund was applied to this earn already
    earned = earn.points + earn.pending_points
    wanted = share(earned, after, order_amount) - share(earned, before, order_amount)
    batch = await points.locked_earn_batch(session, member, earn)
    if batch is None or wanted <= 0:
        return 0
    return await points.reverse_for_refund(
        session,
        principal.actor,
        member,
        earn=earn,
        batch=batch,
        points=wanted,
        reason=f"refund {refund_id}",
        reference_id=reference_id,
        now=now,
    )


__all__ = ["ORDER_PAID", "apply_order_notice", "share"]
