"""What a payment notice leaves for accounting: finance entries, written in the
transaction that applied the notice, so a payment applied is a payment booked (the worker
does the booking; nothing is lost when a process dies between the two).

One entry per provider object and accounting integration with a mapping: a payment makes
a `sale` (contact, invoice, payment), a failed payment an `unpaid` one (contact, invoice),
a refund a `refund` (credit note, refund); a payout to the bank a `payout` (a bank
transfer from the clearing account, when the mapping names the bank). A failed invoice paid
later turns its unpaid entry into a sale, so its invoice is the one paid. A notice that
applied nothing (a second notice of one payment) leaves nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.finance.models import AccountingMapping, EntryKind, EntryStatus, FinanceEntry
from memberhub.integrations.models import Integration, PaymentRecord
from memberhub.integrations.providers.base import PaymentNotice, PayoutNotice
from memberhub.kit.ids import new_public_id
from memberhub.members.models import Member
from memberhub.memberships.models import MembershipPlan
from memberhub.organisations.repository import OrganisationRepository

# Actions of `apply_notice` that applied nothing new.
_NOTHING_APPLIED = frozenset({"already_applied", "ignored"})


async def record_payment_notice(
    session: AsyncSession,
    integration: Integration,
    notice: PaymentNotice,
    applied: Mapping[str, Any],
    *,
    now: datetime,
) -> list[FinanceEntry]:
    """Queue the bookings `notice` calls for, in every accounting integration that books
    this payments integration's money; return the entries written or moved on."""
    if applied.get("action") in _NOTHING_APPLIED or not notice.references:
        return []
    books = await _booking_integrations(session, integration.id)
    if not books:
        return []
    member_id = await _member_id(session, applied.get("member_id"))
    plan_id = await _plan_id(session, applied.get("plan_id"))
    currency = (notice.currency or "").upper()
    occurred_at = notice.occurred_at or now
    written: list[FinanceEntry] = []
    for book in books:
        if notice.kind == "paid" and notice.amount == 0:
            # Paid in full by a coupon: no money to book (the term shows in reconciliation
            # as one joined without a payment, as a complimentary one does).
            entry = None
        elif notice.kind == "paid":
            entry = await _sale(session, book, integration, notice, member_id, plan_id, now)
        elif notice.kind == "failed":
            entry = await _unpaid(session, book, integration, notice, member_id, now)
        elif notice.kind == "refunded":
            entry = await _refund(session, book, integration, notice, now)
        else:
            entry = None
        if entry is not None:
            entry.currency = entry.currency or currency
            entry.occurred_at = entry.occurred_at or occurred_at
            written.append(entry)
    await session.flush()
    return written


async def record_payout(
    session: AsyncSession, integration: Integration, payout: PayoutNotice, *, now: datetime
) -> list[FinanceEntry]:
    """Queue the transfer of a payout to the bank, in every accounting integration that
    books this payments integration's money and names the bank account payouts land in."""
    written: list[FinanceEntry] = []
    for book in await _booking_integrations(session, integration.id, needs_payouts=True):
        if await _entries(session, book, [payout.payout_id], [EntryKind.PAYOUT]):
            continue
        entry = _new_entry(
            book,
            integration,
            EntryKind.PAYOUT,
            payout.payout_id,
            now,
            amount=payout.amount,
            currency=payout.currency,
            occurred_at=payout.occurred_at or now,
        )
        session.add(entry)
        written.append(entry)
    await session.flush()
    return written


async def _booking_integrations(
    session: AsyncSession, payments_integration_id: int, *, needs_payouts: bool = False
) -> list[int]:
    """Enabled accounting integrations with a mapping that takes this integration's money:
    the mapping names it, or names none and the payments integration is within the
    accounting integration's organisation (see `takes_money_of`)."""
    rows = (
        await session.execute(
            select(
                AccountingMapping.integration_id,
                AccountingMapping.mapping,
                Integration.organisation_id,
            )
            .join(Integration, Integration.id == AccountingMapping.integration_id)
            .where(Integration.enabled.is_(True))
        )
    ).all()
    payments = await session.get(Integration, payments_integration_id)
    scopes = await money_scopes(session, {organisation_id for _, _, organisation_id in rows})
    wanted = []
    for integration_id, mapping, organisation_id in rows:
        source = (mapping or {}).get("payments_integration_db_id")
        if needs_payouts and not (mapping or {}).get("payouts_bank_account_code"):
            continue
        if source == payments_integration_id or (
            source is None
            and payments is not None
            and takes_money_of(scopes[organisation_id], payments.organisation_id)
        ):
            wanted.append(integration_id)
    return wanted


async def money_scopes(
    session: AsyncSession, organisation_ids: Iterable[int | None]
) -> dict[int | None, frozenset[int] | None]:
    """Whose money an accounting integration of each organisation books when its mapping
    names no payments integration: an installation-wide one anyone's (None); an
    organisation's only its own and its chapters' (another's takings are not its
    business). The hierarchy is read once for all of them."""
    wanted = {o for o in organisation_ids if o is not None}
    subtrees = await OrganisationRepository(session).subtrees(wanted) if wanted else {}
    return {None: None, **{o: subtrees[o] for o in wanted}}


def takes_money_of(scope: frozenset[int] | None, payments_organisation_id: int | None) -> bool:
    return scope is None or (
        payments_organisation_id is not None and payments_organisation_id in scope
    )


async def _member_id(session: AsyncSession, public_id: Any) -> int | None:
    if not isinstance(public_id, str):
        return None
    found: int | None = await session.scalar(select(Member.id).where(Member.public_id == public_id))
    return found


async def _plan_id(session: AsyncSession, public_id: Any) -> int | None:
    if not isinstance(public_id, str):
        return None
    found: int | None = await session.scalar(
        select(MembershipPlan.id).where(MembershipPlan.public_id == public_id)
    )
    return found


async def _entries(
    session: AsyncSession, book: int, references: Sequence[str], kinds: Sequence[str]
) -> list[FinanceEntry]:
    rows = await session.scalars(
        select(FinanceEntry)
        .where(
            FinanceEntry.integration_id == book,
            FinanceEntry.kind.in_(kinds),
            FinanceEntry.source_ref.in_(references),
        )
        .with_for_update()
    )
    return list(rows)


def _new_entry(
    book: int, source: Integration, kind: str, source_ref: str, now: datetime, **fields: Any
) -> FinanceEntry:
    entry = FinanceEntry(
        public_id=new_public_id("fin"),
        integration_id=book,
        source_integration_id=source.id,
        kind=kind,
        source_ref=source_ref[:255],
        status=EntryStatus.PENDING,
        attempts=0,
        next_attempt_at=now,
        log=[{"at": now.isoformat(), "step": "queued", "outcome": kind}],
        created_at=now,
        updated_at=now,
        **fields,
    )
    return entry


async def _sale(
    session: AsyncSession,
    book: int,
    source: Integration,
    notice: PaymentNotice,
    member_id: int | None,
    plan_id: int | None,
    now: datetime,
) -> FinanceEntry | None:
    existing = await _entries(session, book, notice.references, EntryKind.ALL)
    if any(entry.kind == EntryKind.SALE for entry in existing):
        return None
    unpaid = next((entry for entry in existing if entry.kind == EntryKind.UNPAID), None)
    if unpaid is not None:
        # The invoice of the failed payment is the one this payment pays.
        unpaid.kind = EntryKind.SALE
        unpaid.status = EntryStatus.PENDING
        unpaid.next_attempt_at = now
        unpaid.amount = notice.amount or unpaid.amount
        unpaid.plan_id = plan_id or unpaid.plan_id
        unpaid.completed_at = None
        unpaid.updated_at = now
        unpaid.log = [*unpaid.log, {"at": now.isoformat(), "step": "queued", "outcome": "paid"}]
        return unpaid
    entry = _new_entry(
        book,
        source,
        EntryKind.SALE,
        notice.references[0],
        now,
        member_id=member_id,
        plan_id=plan_id,
        amount=notice.amount,
        currency=(notice.currency or "").upper(),
        occurred_at=notice.occurred_at or now,
    )
    session.add(entry)
    return entry


async def _unpaid(
    session: AsyncSession,
    book: int,
    source: Integration,
    notice: PaymentNotice,
    member_id: int | None,
    now: datetime,
) -> FinanceEntry | None:
    if await _entries(session, book, notice.references, EntryKind.ALL):
        return None  # already invoiced, or paid meanwhile
    member_plan = None
    if member_id is not None:
        member_plan = await session.scalar(select(Member.plan_id).where(Member.id == member_id))
    entry = _new_entry(
        book,
        source,
        EntryKind.UNPAID,
        notice.references[0],
        now,
        member_id=member_id,
        plan_id=member_plan,
        amount=notice.amount,
        currency=(notice.currency or "").upper(),
        occurred_at=notice.occurred_at or now,
    )
    session.add(entry)
    return entry


async def _refund(
    session: AsyncSession, book: int, source: Integration, notice: PaymentNotice, now: datetime
) -> FinanceEntry | None:
    payment_key = await session.scalar(
        select(PaymentRecord.payment_key)
        .where(
            PaymentRecord.integration_id == source.id,
            PaymentRecord.reference.in_(notice.references),
        )
        .limit(1)
    )
    if payment_key is None:
        return None
    sales = await _entries(session, book, [payment_key], [EntryKind.SALE])
    if not sales:
        return None
    sale = sales[0]
    # Refunds so far are cumulative in Stripe's charge: book what is new.
    booked = await session.scalar(
        select(func.coalesce(func.sum(FinanceEntry.amount), 0)).where(
            FinanceEntry.refunds_entry_id == sale.id, FinanceEntry.kind == EntryKind.REFUND
        )
    )
    amount = notice.amount_refunded - int(booked or 0)
    if amount <= 0:
        return None
    entry = _new_entry(
        book,
        source,
        EntryKind.REFUND,
        f"{notice.references[0]}:refunded:{notice.amount_refunded}",
        now,
        refunds_entry_id=sale.id,
        member_id=sale.member_id,
        plan_id=sale.plan_id,
        amount=amount,
        currency=(notice.currency or sale.currency).upper(),
        occurred_at=notice.occurred_at or now,
    )
    session.add(entry)
    return entry
