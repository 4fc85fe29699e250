"""Reconciliation: do the money (Stripe), the books (Xero) and the memberships agree?

For a period, the worker reads Stripe's charges, refunds and payouts, Xero's invoices and
credit notes, and memberhub's membership terms and payment records, then matches them:

- a succeeded charge is matched to the Xero invoice whose reference is one of the
  payment's ids (its charge, payment intent, invoice, or the checkout session memberhub
  booked it under); none is `paid_in_stripe_no_invoice`, one for another amount or
  currency is `amount_or_currency_differs` (the invoice asks the plan's price, so a
  discount shows here), one not paid is `invoice_without_payment`;
- a charge whose member had no membership term start around it is
  `payment_without_membership_change`;
- a term joined or renewed in the period for a member with no charge in it is
  `membership_active_without_payment`.

Refunds are matched against credit notes (`match_refunds.py`) and payouts against
their balance transactions and the bank transfers they were booked as
(`match_payouts.py`).

Each mismatch carries a suggested fix, applied through the API where one can be
(`fixes.py`): the fix queues a finance entry, which the worker books like any other.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.finance.match_payouts import match_payouts
from memberhub.finance.match_refunds import match_refunds
from memberhub.finance.models import AccountingMapping, Reconciliation, ReconciliationStatus
from memberhub.finance.queue import money_scopes
from memberhub.finance.report import MismatchList, local_day, money, record_of
from memberhub.integrations.gateway import CircuitOpen, GatewayError
from memberhub.integrations.hub import IntegrationHub
from memberhub.integrations.models import Integration, PaymentRecord
from memberhub.integrations.providers import as_accounting, get_provider
from memberhub.integrations.providers.base import (
    ConnectionFailed,
    LedgerDocument,
    LedgerTransfer,
    MoneyRecord,
    PaymentsReport,
)
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.members.models import Member
from memberhub.memberships.models import MembershipTerm
from memberhub.program.service import program_zone

log = structlog.get_logger("memberhub.finance.reconciliation")

# A term made (joined or renewed) this close to a charge counts as the charge's membership
# change: when it was made, not when it starts (a renewal starts as the term before ends).
TERM_SLACK = timedelta(days=2)
PAYOUT_ARRIVAL_SLACK = timedelta(days=15)
MAX_ATTEMPTS = 5
BATCH = 5


class ReconciliationFailed(Exception):
    pass


async def run_due_reconciliations(db: Database, hub: IntegrationHub, now: datetime) -> int:
    async with db.transaction(read_only=True) as session:
        due = list(
            await session.scalars(
                select(Reconciliation.id)
                .where(Reconciliation.status == ReconciliationStatus.QUEUED)
                .order_by(Reconciliation.id)
                .limit(BATCH)
            )
        )
    done = 0
    for reconciliation_id in due:
        done += await run_reconciliation(db, hub, reconciliation_id)
    return done


async def run_reconciliation(db: Database, hub: IntegrationHub, reconciliation_id: int) -> int:
    async with db.transaction() as session:
        query = select(Reconciliation).where(
            Reconciliation.id == reconciliation_id,
            Reconciliation.status == ReconciliationStatus.QUEUED,
        )
        if not db.is_sqlite:
            query = query.with_for_update(skip_locked=True)
        found = await session.scalar(query)
        if found is None:
            return 0
        found.status = ReconciliationStatus.RUNNING
        found.attempts += 1
        found.started_at = utcnow()
        integration = await session.get(Integration, found.integration_id)
        source = await session.get(Integration, found.source_integration_id)
        start, end = found.period_start, found.period_end
    try:
        if integration is None or source is None:
            raise ReconciliationFailed("an integration it compares was deleted")
        report = await _compare(db, hub, integration, source, start, end)
    except (GatewayError, CircuitOpen, ConnectionFailed, ReconciliationFailed) as exc:
        await _finish(db, reconciliation_id, error=str(exc))
        return 1
    except Exception as exc:
        log.exception("reconciliation_failed", reconciliation=reconciliation_id)
        await _finish(db, reconciliation_id, error=f"{type(exc).__name__}: {exc}")
        return 1
    finally:
        await hub.drain()
    await _finish(db, reconciliation_id, report=report)
    return 1


async def _finish(
    db: Database,
    reconciliation_id: int,
    *,
    report: dict[str, Any] | None = None,
    error: str | None = None,
) -> None:
    async with db.transaction() as session:
        found = await session.get(Reconciliation, reconciliation_id, with_for_update=True)
        if found is None:
            return
        found.completed_at = utcnow()
        if error is not None:
            if found.attempts < MAX_ATTEMPTS:
                found.status = ReconciliationStatus.QUEUED  # tried again next tick
            else:
                found.status = ReconciliationStatus.FAILED
            found.error = error[:1000]
            return
        found.status = ReconciliationStatus.COMPLETED
        found.error = None
        found.report = report or {}


async def _compare(
    db: Database,
    hub: IntegrationHub,
    integration: Integration,
    source: Integration,
    start: datetime,
    end: datetime,
) -> dict[str, Any]:
    payments_provider = get_provider(source.provider)
    accounting_provider = get_provider(integration.provider)
    accounting = as_accounting(accounting_provider) if accounting_provider else None
    if not isinstance(payments_provider, PaymentsReport) or accounting is None:
        raise ReconciliationFailed(
            f"{source.provider} cannot list its money, or {integration.provider} its books"
        )
    # Read from TERM_SLACK before the period: a charge just before it may answer for a
    # term made in it (paid at 23:58, the webhook applied after midnight), nothing more.
    listed = await payments_provider.money_movements(
        hub.connection(source), since=start - TERM_SLACK, until=end
    )
    movements = [m for m in listed if m.created_at >= start]
    async with db.transaction(read_only=True) as session:
        zone = await program_zone(session)  # documents are dated on the program's calendar
    documents = await accounting.documents(
        hub.connection(integration),
        since=local_day(start, zone),
        until=local_day(end, zone) + timedelta(days=1),
    )
    charges = [m for m in movements if m.kind == "charge" and m.status == "succeeded"]
    refunds = [m for m in movements if m.kind == "refund"]
    earlier = [
        m for m in listed if m.created_at < start and m.kind == "charge" and m.status == "succeeded"
    ]
    all_ids = {i for c in (*charges, *refunds, *earlier) for i in (c.id, *c.references)}
    async with db.transaction(read_only=True) as session:
        records = await _payment_records(session, source.id, all_ids)
        # The terms of the members whose money these books take, paid through this source:
        # an organisation's integrations answer for its members and its chapters' only.
        scopes = await money_scopes(session, {integration.organisation_id, source.organisation_id})
        scope = _within(scopes[integration.organisation_id], scopes[source.organisation_id])
        terms = await _terms(session, start - TERM_SLACK, end + TERM_SLACK, scope)
        members = await _member_ids(
            session, {c.member_id for c in (*charges, *refunds, *earlier) if c.member_id}
        )
        mapping = await session.get(AccountingMapping, integration.id)
        bank = (mapping.mapping if mapping else {}).get("payouts_bank_account_code")
    books = _Payouts(bank=str(bank) if bank else None)
    for payout in movements:
        if payout.kind == "payout" and payout.status == "paid":
            net = await payments_provider.payout_net(hub.connection(source), payout.id)
            if net is not None:
                books.nets[payout.id] = net
    if books.bank:
        # A payout arrives at the bank days after it is made.
        books.transfers = await accounting.transfers(
            hub.connection(integration),
            since=local_day(start, zone),
            until=local_day(end + PAYOUT_ARRIVAL_SLACK, zone),
        )
    # An invoice issued before the period for one of its charges: a renewal whose payment
    # failed last month (its invoice made then, unpaid) and Stripe's retry paid this month.
    # Looked up by reference, whenever issued, for the charges the period's lack.
    issued = {d.reference for d in documents if d.kind == "invoice" and d.status != "VOIDED"}
    missing = [
        ref
        for charge in charges
        if not issued & (refs := _references(charge, records))
        for ref in sorted(refs)
    ]
    earlier_invoices = (
        await accounting.invoices_referencing(hub.connection(integration), missing)
        if missing
        else []
    )
    paid_before: dict[int, list[datetime]] = defaultdict(list)
    for charge in earlier:
        record = record_of(charge, records)
        member_row = record[1] if record else members.get(charge.member_id or "")
        if member_row is not None:
            paid_before[member_row].append(charge.created_at)
    return _match(
        charges,
        movements,
        documents,
        books,
        records,
        terms,
        members,
        start,
        end,
        zone,
        paid_before,
        earlier_invoices,
    )


def _references(charge: MoneyRecord, records: dict[str, tuple[str, int]]) -> set[str]:
    """What an invoice for `charge` has as its reference: the payment's key, or one of the
    charge's ids."""
    record = record_of(charge, records)
    return {record[0] if record else charge.id, charge.id, *charge.references}


@dataclass
class _Payouts:
    """What payouts are checked against: the bank they are booked to, the nets of the
    balance transactions each paid out, the transfers in the accounting system."""

    bank: str | None
    nets: dict[str, int] = field(default_factory=dict)
    transfers: list[LedgerTransfer] = field(default_factory=list)


async def _payment_records(
    session: AsyncSession, source_id: int, ids: set[str]
) -> dict[str, tuple[str, int]]:
    """Reference → (payment key, member row id)."""
    if not ids:
        return {}
    rows = await session.execute(
        select(PaymentRecord.reference, PaymentRecord.payment_key, PaymentRecord.member_id).where(
            PaymentRecord.integration_id == source_id, PaymentRecord.reference.in_(ids)
        )
    )
    return {reference: (key, member) for reference, key, member in rows}


def _within(*scopes: frozenset[int] | None) -> frozenset[int] | None:
    """The organisations in every one of `scopes` (None: every organisation)."""
    bounded = [scope for scope in scopes if scope is not None]
    return frozenset.intersection(*bounded) if bounded else None


async def _terms(
    session: AsyncSession, since: datetime, until: datetime, scope: frozenset[int] | None
) -> list[tuple[str, int, str, datetime]]:
    """(term id, member row id, member public id, created_at) of terms joined or renewed
    by members of the organisations of `scope` (None: every member)."""
    query = (
        select(MembershipTerm.public_id, Member.id, Member.public_id, MembershipTerm.created_at)
        .join(Member, Member.id == MembershipTerm.member_id)
        .where(
            MembershipTerm.created_at >= since,
            MembershipTerm.created_at < until,
            MembershipTerm.kind.in_(("join", "renew")),
        )
        .order_by(MembershipTerm.id)
    )
    if scope is not None:
        query = query.where(Member.organisation_id.in_(scope))
    rows = await session.execute(query)
    return [(term, member, public, made) for term, member, public, made in rows]


async def _member_ids(session: AsyncSession, public_ids: set[str | None]) -> dict[str, int]:
    wanted = {p for p in public_ids if p}
    if not wanted:
        return {}
    rows = await session.execute(
        select(Member.public_id, Member.id).where(Member.public_id.in_(wanted))
    )
    return {public: row_id for public, row_id in rows}


def _match(
    charges: list[MoneyRecord],
    movements: list[MoneyRecord],
    documents: list[LedgerDocument],
    books: _Payouts,
    records: dict[str, tuple[str, int]],
    terms: list[tuple[str, int, str, datetime]],
    members: dict[str, int],
    start: datetime,
    end: datetime,
    zone: tzinfo,
    paid_before: Mapping[int, list[datetime]],
    earlier_invoices: Sequence[LedgerDocument] = (),
) -> dict[str, Any]:
    invoices_by_ref: dict[str, LedgerDocument] = {}
    # The period's invoices first; then those issued before it for its charges (matched
    # to them, not counted among the period's documents).
    for document in (*documents, *earlier_invoices):
        if document.kind == "invoice" and document.reference and document.status != "VOIDED":
            invoices_by_ref.setdefault(document.reference, document)
    public_of = {row_id: public for public, row_id in members.items()}
    terms_by_member: dict[int, list[datetime]] = defaultdict(list)
    for _term, term_member, public, made in terms:
        public_of[term_member] = public
        terms_by_member[term_member].append(made)
    found = MismatchList()
    add = found.add
    matched = 0
    paying_members: set[int] = set()

    for charge in sorted(charges, key=lambda c: (c.created_at, c.id)):
        ids = (charge.id, *charge.references)
        record = record_of(charge, records)
        payment_key = record[0] if record else charge.id
        member_row: int | None = record[1] if record else members.get(charge.member_id or "")
        if member_row is not None:
            paying_members.add(member_row)
        member_public = public_of.get(member_row) if member_row is not None else charge.member_id
        invoice = next(
            (invoices_by_ref[r] for r in (payment_key, *ids) if r in invoices_by_ref), None
        )
        money_fields = {
            "member_id": member_public,
            "stripe_id": charge.id,
            "stripe_amount": charge.amount,
            "stripe_currency": charge.currency,
        }
        fine = True
        if invoice is None:
            fine = False
            add(
                "paid_in_stripe_no_invoice",
                f"Stripe charge {charge.id} ({money(charge.amount, charge.currency)}) has no "
                "invoice in Xero.",
                "create_missing_invoice" if member_row is not None else None,
                "Create the invoice and its payment in Xero."
                if member_row is not None
                else "Find the member this payment is for, then book it by hand.",
                _fix={
                    "payment_key": payment_key,
                    "member_row": member_row,
                    "amount": charge.amount,
                    "currency": charge.currency,
                    "occurred_at": charge.created_at.isoformat(),
                },
                **money_fields,
            )
        elif invoice.currency != charge.currency or invoice.total != charge.amount:
            fine = False
            add(
                "amount_or_currency_differs",
                f"Stripe charge {charge.id} is {money(charge.amount, charge.currency)}; Xero "
                f"invoice {invoice.number or invoice.id} is "
                f"{money(invoice.total, invoice.currency)}.",
                None,
                "Correct the invoice in Xero (or refund the difference in Stripe).",
                invoice_id=invoice.id,
                xero_amount=invoice.total,
                xero_currency=invoice.currency,
                **money_fields,
            )
        elif invoice.amount_due > 0 and invoice.status != "PAID":
            fine = False
            add(
                "invoice_without_payment",
                f"Xero invoice {invoice.number or invoice.id} is unpaid though Stripe charge "
                f"{charge.id} paid it.",
                "link_payment",
                "Record the Stripe payment against the invoice in Xero.",
                invoice_id=invoice.id,
                xero_amount=invoice.total,
                xero_currency=invoice.currency,
                _fix={
                    "payment_key": payment_key,
                    "member_row": member_row,
                    "amount": charge.amount,
                    "currency": charge.currency,
                    "occurred_at": charge.created_at.isoformat(),
                    "invoice_id": invoice.id,
                    "contact_id": invoice.contact_id,
                },
                **money_fields,
            )
        # Each term answers for one charge: the nearest one not yet claimed.
        member_terms = terms_by_member[member_row] if member_row is not None else []
        candidates = [m for m in member_terms if abs(m - charge.created_at) <= TERM_SLACK]
        if candidates:
            nearest = min(candidates, key=lambda made: abs(made - charge.created_at))
            member_terms.remove(nearest)
        else:
            fine = False
            add(
                "payment_without_membership_change",
                f"Stripe charge {charge.id} changed no membership"
                + (f" of {member_public}." if member_public else " (no member matches it)."),
                None,
                "Join or renew the member by hand, or refund the payment.",
                **money_fields,
            )
        matched += fine
    for term, member_row, public, made in terms:
        if not start <= made < end or member_row in paying_members:
            continue
        if any(abs(made - paid) <= TERM_SLACK for paid in paid_before.get(member_row, ())):
            continue  # paid just before the period began
        add(
            "membership_active_without_payment",
            f"Membership term {term} of {public} was joined or renewed "
            f"{local_day(made, zone).isoformat()} with no Stripe payment in the period.",
            None,
            "Take the payment (a checkout), or record why the membership is free.",
            member_id=public,
            term_id=term,
        )
    refunds = [m for m in movements if m.kind == "refund"]
    payouts = [m for m in movements if m.kind == "payout"]
    refunds_matched = match_refunds(refunds, documents, records, public_of, found, start, end, zone)
    payouts_matched = match_payouts(payouts, books.nets, books.transfers, books.bank, found)
    summary = {
        "stripe_charges": len(charges),
        "stripe_refunds": len(refunds),
        "stripe_payouts": len(payouts),
        "xero_invoices": sum(1 for d in documents if d.kind == "invoice"),
        "xero_credit_notes": sum(1 for d in documents if d.kind == "credit_note"),
        "xero_bank_transfers": len(books.transfers),
        "membership_terms": sum(1 for t in terms if start <= t[3] < end),
        "matched": matched,
        "refunds_matched": refunds_matched,
        "payouts_matched": payouts_matched,
        "mismatches": len(found.rows),
    }
    return {"summary": summary, "mismatches": found.rows}
