"""A reconciliation mismatch's suggested fix, applied from the API.

Every fix queues a finance entry — the same entries the payment flows write — and the
worker books it like any other, with the entry's idempotency keys and log; so a fix is
replayable and never books twice what is booked already:

- `create_missing_invoice`: the payment's sale (contact, invoice, payment);
- `link_payment`: the payment of the unpaid invoice;
- `create_missing_credit_note`: the refund (credit note, its refund) against the refunded
  payment's invoice; the payment must have a sale entry (fix its invoice first);
- `link_refund`: the refund of the credit note not paid back;
- `book_payout`: the payout (Stripe's fees, the transfer to the bank).

A failed entry of the same object is queued again rather than written twice. A fix is
applied once; the report keeps when and by which entry.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.audit.service import diff, record_write
from memberhub.auth.principal import Principal
from memberhub.finance.models import (
    EntryKind,
    EntryStatus,
    FinanceEntry,
    Reconciliation,
    ReconciliationStatus,
)
from memberhub.finance.schemas import FixOut, Mismatch
from memberhub.kit.errors import Conflict, NotFound
from memberhub.kit.ids import new_public_id


async def apply_fix(
    session: AsyncSession,
    principal: Principal,
    found: Reconciliation,
    mismatch_id: str,
    now: datetime,
) -> FixOut:
    """Queue the booking a mismatch's fix calls for; a fix is applied once."""
    if found.status != ReconciliationStatus.COMPLETED:
        raise Conflict("The reconciliation has no report yet.", code="NOT_COMPLETED")
    mismatches = [dict(m) for m in found.report.get("mismatches", [])]
    mismatch = next((m for m in mismatches if m["id"] == mismatch_id), None)
    if mismatch is None:
        raise NotFound(f"No mismatch {mismatch_id} in this report.", code="MISMATCH_NOT_FOUND")
    if mismatch.get("fixed_at"):
        raise Conflict("The fix was applied already.", code="ALREADY_FIXED")
    plan = mismatch.get("_fix")
    fix = mismatch.get("fix")
    if not fix or not plan:
        raise Conflict(
            "This mismatch has no fix to apply from the API: "
            + str(mismatch.get("fix_description")),
            code="NO_FIX",
        )
    if fix in ("create_missing_invoice", "link_payment"):
        entry = await _sale(session, found, fix, plan, now)
    elif fix == "create_missing_credit_note":
        entry = await _missing_credit_note(session, found, plan, now)
    elif fix == "link_refund":
        entry = await _refund_of_credit_note(session, found, plan, now)
    elif fix == "book_payout":
        entry = await _payout(session, found, plan, now)
    else:
        raise Conflict(f"Unknown fix {fix}.", code="NO_FIX")
    entry.status = EntryStatus.PENDING
    entry.attempts = 0
    entry.next_attempt_at = now
    entry.completed_at = None
    entry.updated_at = now
    entry.log = [*entry.log, {"at": now.isoformat(), "step": "queued", "outcome": f"fix:{fix}"}]
    await session.flush()
    mismatch["fixed_at"] = now.isoformat()
    mismatch["entry_id"] = entry.public_id
    found.report = {**found.report, "mismatches": mismatches}
    record_write(
        session,
        principal.actor,
        action="finance.reconciliation.fix",
        object_type="reconciliation",
        object_id=found.public_id,
        changes=diff({}, {"mismatch": mismatch_id, "fix": fix}),
    )
    return FixOut(mismatch=Mismatch.model_validate(mismatch), entry_id=entry.public_id)


def _new_entry(found: Reconciliation, kind: str, source_ref: str, now: datetime) -> FinanceEntry:
    return FinanceEntry(
        public_id=new_public_id("fin"),
        integration_id=found.integration_id,
        source_integration_id=found.source_integration_id,
        kind=kind,
        source_ref=source_ref[:255],
        attempts=0,
        log=[],
        created_at=now,
    )


async def _entry(
    session: AsyncSession, found: Reconciliation, kinds: tuple[str, ...], *conditions: Any
) -> FinanceEntry | None:
    entry: FinanceEntry | None = await session.scalar(
        select(FinanceEntry)
        .where(
            FinanceEntry.integration_id == found.integration_id,
            FinanceEntry.kind.in_(kinds),
            *conditions,
        )
        .order_by(FinanceEntry.id)
        .limit(1)
        .with_for_update()
    )
    return entry


def _not_twice(entry: FinanceEntry, what: str) -> None:
    if entry.status == EntryStatus.DONE:
        raise Conflict(
            f"The {what} is booked already; run the reconciliation again.", code="ALREADY_BOOKED"
        )


def _booked_before(found: Reconciliation, entry: FinanceEntry, what: str) -> None:
    """A fix that books an entry again (its record was removed in the accounting system)
    only for an entry the report saw settled: one booked, or being booked, since the report
    was made (by another report's fix, say) is booked once, not again."""
    if entry.status == EntryStatus.PENDING or (
        entry.status == EntryStatus.DONE
        and entry.completed_at is not None
        and (found.started_at is None or entry.completed_at >= found.started_at)
    ):
        raise Conflict(
            f"The {what} was booked, or is being booked, since this report was made; run the "
            "reconciliation again.",
            code="ALREADY_BOOKED",
        )


async def _sale(
    session: AsyncSession, found: Reconciliation, fix: str, plan: dict[str, Any], now: datetime
) -> FinanceEntry:
    entry = await _entry(
        session,
        found,
        (EntryKind.SALE, EntryKind.UNPAID),
        FinanceEntry.source_ref == plan["payment_key"],
    )
    if entry is None:
        entry = _new_entry(found, EntryKind.SALE, str(plan["payment_key"]), now)
        entry.member_id = plan.get("member_row")
        entry.amount = int(plan["amount"])
        entry.currency = str(plan["currency"])
        entry.occurred_at = datetime.fromisoformat(plan["occurred_at"])
        session.add(entry)
    if fix == "link_payment":
        if entry.kind == EntryKind.SALE:
            _booked_before(found, entry, "payment")
        entry.invoice_id = plan.get("invoice_id")
        entry.contact_id = entry.contact_id or plan.get("contact_id")
        entry.payment_id = None
    elif entry.kind == EntryKind.SALE:
        # Booked before the report, yet the report found no invoice for it (voided or
        # deleted in Xero since): made again, invoice and payment.
        _booked_before(found, entry, "payment")
        entry.invoice_id = None
        entry.payment_id = None
    entry.kind = EntryKind.SALE
    return entry


async def _refunded_sale(
    session: AsyncSession, found: Reconciliation, plan: dict[str, Any]
) -> FinanceEntry:
    sale = (
        await _entry(
            session, found, (EntryKind.SALE,), FinanceEntry.source_ref == plan["payment_key"]
        )
        if plan.get("payment_key")
        else None
    )
    if sale is None:
        raise Conflict(
            "The refunded payment is not booked in the accounting system: apply its "
            "create_missing_invoice fix first, then this one.",
            code="PAYMENT_NOT_BOOKED",
        )
    return sale


async def _missing_credit_note(
    session: AsyncSession, found: Reconciliation, plan: dict[str, Any], now: datetime
) -> FinanceEntry:
    sale = await _refunded_sale(session, found, plan)
    amount = int(plan["amount"])
    # The refund's own entry (written by an earlier fix), or the notice's that failed
    # before it made its credit note: booked again, not a second time.
    entry = await _entry(
        session, found, (EntryKind.REFUND,), FinanceEntry.source_ref == plan["refund_id"]
    ) or await _entry(
        session,
        found,
        (EntryKind.REFUND,),
        FinanceEntry.refunds_entry_id == sale.id,
        FinanceEntry.status == EntryStatus.FAILED,
        FinanceEntry.credit_note_id.is_(None),
        FinanceEntry.amount == amount,
    )
    if entry is not None:
        _not_twice(entry, "refund")
        return entry
    entry = _new_entry(found, EntryKind.REFUND, str(plan["refund_id"]), now)
    entry.refunds_entry_id = sale.id
    entry.member_id = sale.member_id
    entry.plan_id = sale.plan_id
    entry.amount = amount
    entry.currency = str(plan["currency"])
    entry.occurred_at = datetime.fromisoformat(plan["occurred_at"])
    session.add(entry)
    return entry


async def _refund_of_credit_note(
    session: AsyncSession, found: Reconciliation, plan: dict[str, Any], now: datetime
) -> FinanceEntry:
    entry = await _entry(
        session,
        found,
        (EntryKind.REFUND,),
        or_(
            FinanceEntry.credit_note_id == plan["credit_note_id"],
            FinanceEntry.source_ref == plan["refund_id"],
        ),
    )
    if entry is None:
        # A credit note made by hand: only its refund is booked.
        entry = _new_entry(found, EntryKind.REFUND, str(plan["refund_id"]), now)
        entry.amount = int(plan["amount"])
        entry.currency = str(plan["currency"])
        entry.occurred_at = datetime.fromisoformat(plan["occurred_at"])
        session.add(entry)
    else:
        _booked_before(found, entry, "refund")
    entry.credit_note_id = str(plan["credit_note_id"])
    entry.refund_id = None
    return entry


async def _payout(
    session: AsyncSession, found: Reconciliation, plan: dict[str, Any], now: datetime
) -> FinanceEntry:
    entry = await _entry(
        session, found, (EntryKind.PAYOUT,), FinanceEntry.source_ref == plan["payout_id"]
    )
    if entry is None:
        entry = _new_entry(found, EntryKind.PAYOUT, str(plan["payout_id"]), now)
        entry.amount = int(plan["amount"])
        entry.currency = str(plan["currency"])
        entry.occurred_at = datetime.fromisoformat(plan["occurred_at"])
        session.add(entry)
    else:
        _booked_before(found, entry, "payout")
    # Booked before and its transfer since removed in Xero: transferred again (the fees
    # it booked stay booked).
    entry.transfer_id = None
    return entry
