"""The worker's booking of finance entries in the accounting system.

Each due entry is claimed in a short transaction that pushes its `next_attempt_at` a lease
ahead (another worker skips it meanwhile; one that died lets the lease run out and the
entry be taken again). Then each step runs against the vendor, and what it made is written
at once, in a transaction of its own: contact, invoice, payment (a sale); contact, invoice
(unpaid); credit note, refund (a refund); the fees, a bank transfer (a payout). A step already done
is skipped, and every create carries an idempotency key derived from the entry, so a step
sent but not recorded (a crash in between, a lost answer) returns the object the first
send made: nothing is booked twice. A refusal resending cannot change (Xero's validation
messages: an unknown account, a currency the organisation does not take) fails the entry
with the vendor's words; any other failure is retried with backoff.

Documents are dated on the program's calendar (its `timezone`): a payment made in the
first hours of a local day, still the day before in UTC, is booked on the local day, in
the accounting period the treasurer closes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import select

from memberhub.finance.models import AccountingMapping, EntryKind, EntryStatus, FinanceEntry
from memberhub.finance.report import local_day
from memberhub.integrations.gateway import CircuitOpen, GatewayError
from memberhub.integrations.hub import IntegrationHub
from memberhub.integrations.models import Integration
from memberhub.integrations.providers import as_accounting, get_provider
from memberhub.integrations.providers.base import (
    Accounting,
    AccountingRejected,
    Connection,
    ConnectionFailed,
    InvoiceLine,
    LedgerContact,
    MoneyMovement,
    PaymentsReport,
    SaleDocument,
)
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.members.models import Member
from memberhub.memberships.models import MembershipPlan
from memberhub.program.service import program_zone

log = structlog.get_logger("memberhub.finance.booking")

BATCH = 200
LEASE = timedelta(minutes=5)
MAX_ATTEMPTS = 10
RETRY_BASE_SECONDS = 30.0
RETRY_MAX_SECONDS = 6 * 3600.0
# A refund waits this long for its payment's invoice before it fails.
MAX_REFUND_WAITS = MAX_ATTEMPTS


class NotYet(Exception):
    """The entry depends on another not yet booked (a refund on its payment's invoice)."""


@dataclass
class _Work:
    """What one booking needs, read when the entry was claimed."""

    entry_id: int
    public_id: str
    kind: str
    source_ref: str
    amount: int
    currency: str
    occurred_at: datetime
    day: date  # occurred_at on the program's calendar: the documents' date
    contact_id: str | None
    invoice_id: str | None
    payment_id: str | None
    credit_note_id: str | None
    refund_id: str | None
    transfer_id: str | None
    fees_id: str | None
    integration: Integration
    source: Integration | None
    mapping: dict[str, Any]
    member: LedgerContact | None
    plan_name: str
    revenue: dict[str, Any] | None
    # What the invoice asks for: the plan's price when the payment is in the plan's
    # currency (a discount or a wrong charge then shows as an invoice not paid in full),
    # else the amount charged, which cannot be converted here.
    invoice_amount: int
    # Payments booked for the entry before (a reconciliation's fix may pay its invoice
    # again after a bookkeeper removed the payment): each has a key of its own.
    payments_made: int = 0
    invoices_made: int = 0
    # The same for a credit note refunded again (its refund removed in Xero), and for a
    # payout transferred again (its transfer removed in Xero).
    refunds_made: int = 0
    transfers_made: int = 0
    # For a refund: the contact and invoice of the payment it refunds.
    sale_contact_id: str | None = None
    sale_invoice_id: str | None = None


def _retry_delay(attempts: int) -> float:
    ceiling = min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2 ** (attempts - 1))
    return random.uniform(ceiling / 2, ceiling)


async def book_due_entries(db: Database, hub: IntegrationHub, now: datetime) -> int:
    """Book the entries that are due; return how many were finished (done or failed)."""
    async with db.transaction(read_only=True) as session:
        due = list(
            await session.scalars(
                select(FinanceEntry.id)
                .where(
                    FinanceEntry.status == EntryStatus.PENDING,
                    FinanceEntry.next_attempt_at <= now,
                )
                .order_by(FinanceEntry.id)
                .limit(BATCH)
            )
        )
    finished = 0
    for entry_id in due:
        finished += await book_entry(db, hub, entry_id, now)
    return finished


async def book_entry(db: Database, hub: IntegrationHub, entry_id: int, now: datetime) -> int:
    work = await _claim(db, entry_id, now)
    if work is None:
        return 0
    provider = get_provider(work.integration.provider)
    accounting = as_accounting(provider) if provider is not None else None
    try:
        if accounting is None:
            raise AccountingRejected(f"{work.integration.provider} is not an accounting system")
        connection = hub.connection(work.integration)
        await _run_steps(db, hub, accounting, connection, work)
    except AccountingRejected as exc:
        await _finish(db, work.entry_id, failed=str(exc))
        return 1
    except NotYet as exc:
        return await _retry_later(db, work.entry_id, str(exc))
    except GatewayError as exc:
        return await _retry_later(db, work.entry_id, str(exc), wait=exc.retry_after)
    except (CircuitOpen, ConnectionFailed) as exc:
        return await _retry_later(db, work.entry_id, str(exc))
    except Exception as exc:
        log.exception("finance_entry_failed", entry=work.public_id)
        return await _retry_later(db, work.entry_id, f"{type(exc).__name__}: {exc}")
    await _finish(db, work.entry_id)
    return 1


async def _claim(db: Database, entry_id: int, now: datetime) -> _Work | None:
    async with db.transaction() as session:
        query = select(FinanceEntry).where(
            FinanceEntry.id == entry_id,
            FinanceEntry.status == EntryStatus.PENDING,
            FinanceEntry.next_attempt_at <= now,
        )
        query = query.with_for_update(skip_locked=True) if not db.is_sqlite else query
        entry = await session.scalar(query)
        if entry is None:
            return None  # taken by another worker, or done
        entry.attempts += 1
        entry.next_attempt_at = utcnow() + LEASE
        integration = await session.get(Integration, entry.integration_id)
        mapping_row = await session.get(AccountingMapping, entry.integration_id)
        assert integration is not None
        member = await session.get(Member, entry.member_id) if entry.member_id else None
        plan = await session.get(MembershipPlan, entry.plan_id) if entry.plan_id else None
        if plan is None and member is not None and member.plan_id is not None:
            plan = await session.get(MembershipPlan, member.plan_id)
        mapping = dict(mapping_row.mapping) if mapping_row is not None else {}
        work = _Work(
            entry_id=entry.id,
            public_id=entry.public_id,
            kind=entry.kind,
            source_ref=entry.source_ref,
            amount=entry.amount,
            currency=entry.currency or (plan.currency if plan else ""),
            occurred_at=entry.occurred_at,
            day=local_day(entry.occurred_at, await program_zone(session)),
            contact_id=entry.contact_id,
            invoice_id=entry.invoice_id,
            payment_id=entry.payment_id,
            credit_note_id=entry.credit_note_id,
            refund_id=entry.refund_id,
            transfer_id=entry.transfer_id,
            fees_id=entry.fees_id,
            integration=integration,
            source=await session.get(Integration, entry.source_integration_id)
            if entry.source_integration_id
            else None,
            mapping=mapping,
            member=_contact(member),
            plan_name=plan.name if plan else "Membership",
            revenue=_revenue_for(mapping, plan),
            invoice_amount=_invoice_amount(entry, plan),
            payments_made=sum(1 for step in entry.log if step.get("step") == "payment"),
            invoices_made=sum(1 for step in entry.log if step.get("step") == "invoice"),
            refunds_made=sum(1 for step in entry.log if step.get("step") == "refund"),
            transfers_made=sum(1 for step in entry.log if step.get("step") == "transfer"),
        )
        if entry.refunds_entry_id is not None:
            sale = await session.get(FinanceEntry, entry.refunds_entry_id)
            if sale is not None:
                work.sale_contact_id = sale.contact_id
                work.sale_invoice_id = sale.invoice_id
        return work


def _contact(member: Member | None) -> LedgerContact | None:
    if member is None:
        return None
    name = " ".join(part for part in (member.first_name, member.last_name) if part)
    return LedgerContact(
        key=member.public_id,
        name=name or member.email or member.public_id,
        email=member.email,
        first_name=member.first_name,
        last_name=member.last_name,
    )


def _invoice_amount(entry: FinanceEntry, plan: MembershipPlan | None) -> int:
    if plan is not None and plan.currency.upper() == (entry.currency or plan.currency).upper():
        return plan.price_amount
    return entry.amount


def _revenue_for(mapping: dict[str, Any], plan: MembershipPlan | None) -> dict[str, Any] | None:
    plans = mapping.get("plans") or {}
    if plan is not None:
        for key in (plan.public_id, plan.code):
            if key in plans:
                return dict(plans[key])
    default = mapping.get("default_revenue")
    return dict(default) if default else None


async def _run_steps(
    db: Database,
    hub: IntegrationHub,
    accounting: Accounting,
    connection: Connection,
    work: _Work,
) -> None:
    if not work.mapping:
        raise AccountingRejected("The integration has no accounting mapping; save one first.")
    if work.kind == EntryKind.REFUND:
        await _refund_steps(db, accounting, connection, work)
        return
    if work.kind == EntryKind.PAYOUT:
        await _fees_step(db, hub, accounting, connection, work)
        await _payout_steps(db, accounting, connection, work)
        return
    if work.contact_id is None:
        if work.member is None:
            raise AccountingRejected("The payment's member no longer exists.")
        work.contact_id = await accounting.find_or_create_contact(connection, work.member)
        await _record(db, work.entry_id, "contact", contact_id=work.contact_id)
    if work.invoice_id is None:
        if work.revenue is None:
            raise AccountingRejected(
                "No revenue account is mapped for the plan (mapping.plans or default_revenue)."
            )
        work.invoice_id = await accounting.create_invoice(
            connection,
            SaleDocument(
                reference=work.source_ref,
                contact_id=work.contact_id,
                currency=work.currency,
                issued_on=work.day,
                lines=(_line(work, work.plan_name, work.invoice_amount),),
                # Made again (a fix, after the first was voided in Xero): a new key, or
                # Xero would answer with the first again.
                idempotency_key=f"memberhub-invoice-{work.public_id}"
                + (f"-{work.invoices_made + 1}" if work.invoices_made else ""),
            ),
        )
        await _record(db, work.entry_id, "invoice", invoice_id=work.invoice_id)
    if work.kind == EntryKind.SALE and work.payment_id is None:
        work.payment_id = await accounting.pay_invoice(
            connection,
            MoneyMovement(
                document_id=work.invoice_id,
                account_code=str(work.mapping["payments_account_code"]),
                amount=work.amount,
                currency=work.currency,
                paid_on=work.day,
                reference=work.source_ref,
                idempotency_key=f"memberhub-payment-{work.public_id}"
                + (f"-{work.payments_made + 1}" if work.payments_made else ""),
            ),
        )
        await _record(db, work.entry_id, "payment", payment_id=work.payment_id)


def _line(work: _Work, description: str, amount: int) -> InvoiceLine:
    assert work.revenue is not None
    return InvoiceLine(
        description=description,
        amount=amount,
        account_code=str(work.revenue["account_code"]),
        tax_type=work.revenue.get("tax_type"),
        tracking=tuple((t["category"], t["option"]) for t in work.revenue.get("tracking") or []),
    )


async def _refund_steps(
    db: Database, accounting: Accounting, connection: Connection, work: _Work
) -> None:
    if work.credit_note_id is None:
        if work.sale_invoice_id is None or work.sale_contact_id is None:
            raise NotYet("The refunded payment is not booked yet; the refund waits for it.")
        if work.revenue is None:
            raise AccountingRejected("No revenue account is mapped for the plan.")
        work.credit_note_id = await accounting.create_credit_note(
            connection,
            SaleDocument(
                reference=work.source_ref,
                contact_id=work.sale_contact_id,
                currency=work.currency,
                issued_on=work.day,
                lines=(_line(work, f"Refund: {work.plan_name}", work.amount),),
                idempotency_key=f"memberhub-credit-note-{work.public_id}",
            ),
        )
        await _record(
            db,
            work.entry_id,
            "credit_note",
            credit_note_id=work.credit_note_id,
            contact_id=work.sale_contact_id,
            invoice_id=work.sale_invoice_id,
        )
    if work.refund_id is None:
        work.refund_id = await accounting.refund_credit_note(
            connection,
            MoneyMovement(
                document_id=work.credit_note_id,
                account_code=str(work.mapping["payments_account_code"]),
                amount=work.amount,
                currency=work.currency,
                paid_on=work.day,
                reference=work.source_ref,
                idempotency_key=f"memberhub-refund-{work.public_id}"
                + (f"-{work.refunds_made + 1}" if work.refunds_made else ""),
            ),
        )
        await _record(db, work.entry_id, "refund", refund_id=work.refund_id)


STRIPE_FEES_CONTACT = LedgerContact(key="stripe-fees", name="Stripe", email=None)


async def _fees_step(
    db: Database,
    hub: IntegrationHub,
    accounting: Accounting,
    connection: Connection,
    work: _Work,
) -> None:
    """The payment provider's fees on what the payout paid out, spent from the clearing
    account on the fees account: the clearing account then holds what the transfer takes."""
    fees_account = work.mapping.get("fees_account_code")
    provider = get_provider(work.source.provider) if work.source is not None else None
    if work.fees_id is not None or not fees_account or not isinstance(provider, PaymentsReport):
        return
    assert work.source is not None
    fees = await provider.payout_fees(hub.connection(work.source), work.source_ref)
    if fees <= 0:
        return
    if work.contact_id is None:
        work.contact_id = await accounting.find_or_create_contact(connection, STRIPE_FEES_CONTACT)
        await _record(db, work.entry_id, "contact", contact_id=work.contact_id)
    work.fees_id = await accounting.spend(
        connection,
        MoneyMovement(
            document_id=str(work.mapping["payments_account_code"]),
            account_code=str(fees_account),
            amount=fees,
            currency=work.currency,
            paid_on=work.day,
            reference=work.source_ref,
            idempotency_key=f"memberhub-fees-{work.public_id}",
        ),
        contact_id=work.contact_id,
        line=InvoiceLine(
            description=f"Stripe fees, payout {work.source_ref}",
            amount=fees,
            account_code=str(fees_account),
        ),
    )
    await _record(db, work.entry_id, "fees", fees_id=work.fees_id)


async def _payout_steps(
    db: Database, accounting: Accounting, connection: Connection, work: _Work
) -> None:
    bank = work.mapping.get("payouts_bank_account_code")
    if not bank:
        raise AccountingRejected("The mapping names no payouts_bank_account_code.")
    if work.transfer_id is None:
        work.transfer_id = await accounting.transfer(
            connection,
            MoneyMovement(
                document_id=str(work.mapping["payments_account_code"]),
                account_code=str(bank),
                amount=work.amount,
                currency=work.currency,
                paid_on=work.day,
                reference=work.source_ref,
                idempotency_key=f"memberhub-transfer-{work.public_id}"
                + (f"-{work.transfers_made + 1}" if work.transfers_made else ""),
            ),
        )
        await _record(db, work.entry_id, "transfer", transfer_id=work.transfer_id)


async def _record(db: Database, entry_id: int, step: str, **ids: str) -> None:
    """Keep what a step made, at once: a crash after this never makes it again."""
    async with db.transaction() as session:
        entry = await session.get(FinanceEntry, entry_id, with_for_update=True)
        if entry is None:
            return
        now = utcnow()
        for name, value in ids.items():
            setattr(entry, name, value)
        made = ids.get(f"{step}_id")
        entry.log = [*entry.log, {"at": now.isoformat(), "step": step, "outcome": "ok", "id": made}]
        entry.updated_at = now


async def _finish(db: Database, entry_id: int, *, failed: str | None = None) -> None:
    async with db.transaction() as session:
        entry = await session.get(FinanceEntry, entry_id, with_for_update=True)
        if entry is None:
            return
        now = utcnow()
        entry.status = EntryStatus.FAILED if failed else EntryStatus.DONE
        entry.last_error = failed[:1000] if failed else None
        entry.next_attempt_at = None
        entry.completed_at = now
        entry.updated_at = now
        step = {"at": now.isoformat(), "step": "done", "outcome": "failed" if failed else "ok"}
        if failed:
            step["message"] = failed[:1000]
        entry.log = [*entry.log, step]


async def _retry_later(
    db: Database, entry_id: int, message: str, *, wait: float | None = None
) -> int:
    """Try the entry again later: after the backoff, counting the attempt; or, when the
    accounting system asked for a `wait` (its day's calls spent), after that wait, which
    spends none of the entry's attempts."""
    async with db.transaction() as session:
        entry = await session.get(FinanceEntry, entry_id, with_for_update=True)
        if entry is None or entry.status != EntryStatus.PENDING:
            return 0
        now = utcnow()
        entry.last_error = message[:1000]
        entry.updated_at = now
        if wait is not None:
            entry.attempts = max(0, entry.attempts - 1)
            entry.next_attempt_at = now + timedelta(seconds=wait)
            entry.log = [
                *entry.log,
                {
                    "at": now.isoformat(),
                    "step": "attempt",
                    "outcome": "wait",
                    "message": message[:500],
                },
            ]
            return 0
        final = entry.attempts >= MAX_ATTEMPTS
        entry.log = [
            *entry.log,
            {
                "at": now.isoformat(),
                "step": "attempt",
                "outcome": "failed" if final else "retry",
                "message": message[:500],
            },
        ]
        if final:
            entry.status = EntryStatus.FAILED
            entry.completed_at = now
            entry.next_attempt_at = None
            return 1
        entry.next_attempt_at = now + timedelta(seconds=_retry_delay(entry.attempts))
        return 0
