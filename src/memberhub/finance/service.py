"""Finance as the API offers it: the accounting mapping (checked against the organisation's
chart of accounts before it is kept), the finance entries and their log, replays, and
reconciliations (queued here, run by the worker, see `reconciliation.py`).

Saving a mapping talks to the vendor, so it runs outside the request's transaction (the
route reads only) and writes in short transactions of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.audit.service import diff, record_write
from memberhub.auth.principal import Principal
from memberhub.finance.models import (
    AccountingMapping,
    EntryStatus,
    FinanceEntry,
    Reconciliation,
    ReconciliationStatus,
)
from memberhub.finance.queue import money_scopes, takes_money_of
from memberhub.finance.schemas import (
    EntryLog,
    FinanceEntryOut,
    MappingIn,
    MappingOut,
    Mismatch,
    ReconciliationCreate,
    ReconciliationOut,
    ReconciliationSummary,
)
from memberhub.integrations import service as integrations
from memberhub.integrations.gateway import CircuitOpen, GatewayError
from memberhub.integrations.hub import IntegrationHub
from memberhub.integrations.models import Integration
from memberhub.integrations.providers import as_accounting, as_payments, get_provider
from memberhub.integrations.providers.base import (
    Accounting,
    AccountingRejected,
    ConnectionFailed,
    LedgerAccount,
    TaxRate,
)
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.kit.errors import Conflict, MemberhubError, NotFound, ValidationFailed
from memberhub.kit.ids import new_public_id
from memberhub.members.models import Member
from memberhub.memberships.models import MembershipPlan


class NotAccounting(Conflict):
    code = "NOT_ACCOUNTING"


class MappingRefused(ValidationFailed):
    code = "MAPPING_REFUSED"


class AccountingUnavailable(MemberhubError):
    code = "PROVIDER_UNAVAILABLE"
    status_code = 503


class AccountingError(MemberhubError):
    code = "PROVIDER_ERROR"
    status_code = 502


class EntryNotFound(NotFound):
    code = "FINANCE_ENTRY_NOT_FOUND"


class ReconciliationNotFound(NotFound):
    code = "RECONCILIATION_NOT_FOUND"


def accounting_of(integration: Integration) -> Accounting:
    provider = get_provider(integration.provider)
    accounting = as_accounting(provider) if provider is not None else None
    if accounting is None:
        raise NotAccounting(
            f"Integration {integration.public_id} ({integration.provider}) is not an "
            "accounting system."
        )
    return accounting


# ---------------------------------------------------------------- mapping


async def save_mapping(
    db: Database,
    hub: IntegrationHub,
    principal: Principal,
    integration: Integration,
    body: MappingIn,
) -> MappingOut:
    """Choose the tenant, check every code against the organisation, keep the mapping."""
    accounting = accounting_of(integration)
    payments_db_id = await _payments_integration(
        db, principal, body.payments_integration_id, integration
    )
    missing_plans = await _unknown_plans(db, list(body.plans))
    if missing_plans:
        raise MappingRefused(
            f"No plan {', '.join(missing_plans)} exists.", details={"plans": missing_plans}
        )
    try:
        tenant_id, tenant_name = await _choose_tenant(hub, accounting, integration, body)
        connection = hub.connection(integration)
        accounts = {a.code: a for a in await accounting.accounts(connection)}
        tracking_used = [t for r in _revenues(body) for t in r.tracking]
        categories = (
            {c.name: c.options for c in await accounting.tracking_categories(connection)}
            if tracking_used
            else {}
        )
        tax_rates = (
            {rate.tax_type: rate for rate in await accounting.tax_rates(connection)}
            if any(revenue.tax_type for revenue in _revenues(body))
            else {}
        )
    except AccountingRejected as exc:
        raise MappingRefused(str(exc)) from None
    except ConnectionFailed as exc:
        raise AccountingError(f"Xero refused the call: {exc}") from None
    except (GatewayError, CircuitOpen) as exc:
        raise AccountingUnavailable(f"The accounting system could not be reached: {exc}") from None
    _check_accounts(body, accounts, categories, tax_rates)
    mapping: dict[str, Any] = body.model_dump(mode="json")
    mapping["payments_integration_db_id"] = payments_db_id
    now = utcnow()
    async with db.transaction() as session:
        row = await session.get(AccountingMapping, integration.id, with_for_update=True)
        before = mapping_out(integration, row).mapping if row is not None else {}
        if row is None:
            row = AccountingMapping(integration_id=integration.id)
            session.add(row)
        row.mapping = mapping
        row.tenant_id = tenant_id
        row.tenant_name = tenant_name
        row.validated_at = now
        row.updated_by = principal.actor.id
        record_write(
            session,
            principal.actor,
            action="finance.mapping.save",
            object_type="integration",
            object_id=integration.public_id,
            changes=diff({"mapping": before}, {"mapping": mapping_out(integration, row).mapping}),
        )
        await session.flush()
        return mapping_out(integration, row)


async def _payments_candidates(
    session: AsyncSession, accounting_organisation_id: int | None
) -> list[int]:
    """The enabled payments integrations an accounting integration of this organisation
    books when its mapping names none."""
    scope = (await money_scopes(session, [accounting_organisation_id]))[accounting_organisation_id]
    return [
        i.id
        for i in await session.scalars(select(Integration).where(Integration.enabled.is_(True)))
        if (p := get_provider(i.provider)) is not None
        and as_payments(p) is not None
        and takes_money_of(scope, i.organisation_id)
    ]


async def _payments_integration(
    db: Database, principal: Principal, public_id: str | None, integration: Integration
) -> int | None:
    if public_id is None:
        async with db.transaction(read_only=True) as session:
            candidates = await _payments_candidates(session, integration.organisation_id)
        if len(candidates) > 1:
            raise MappingRefused(
                "Several payments integrations could take this organisation's money: "
                "name one (payments_integration_id).",
                details={"field": "payments_integration_id"},
            )
        return None
    async with db.transaction(read_only=True) as session:
        found = await integrations.get_integration(session, principal, public_id)
    provider = get_provider(found.provider)
    if provider is None or as_payments(provider) is None:
        raise MappingRefused(
            f"Integration {public_id} does not take payments.",
            details={"field": "payments_integration_id"},
        )
    return found.id


async def _unknown_plans(db: Database, refs: Sequence[str]) -> list[str]:
    if not refs:
        return []
    async with db.transaction(read_only=True) as session:
        rows = await session.execute(
            select(MembershipPlan.public_id, MembershipPlan.code).where(
                MembershipPlan.public_id.in_(refs) | MembershipPlan.code.in_(refs)
            )
        )
        known = {value for row in rows for value in row}
    return sorted(ref for ref in refs if ref not in known)


async def _choose_tenant(
    hub: IntegrationHub, accounting: Accounting, integration: Integration, body: MappingIn
) -> tuple[str, str | None]:
    connection = hub.connection(integration)
    if not connection.credentials.get("access_token"):
        raise MappingRefused("Connect the integration first (…/oauth/authorize).")
    tenants = await accounting.tenants(connection)
    if body.tenant_id is not None:
        chosen = [t for t in tenants if t[0] == body.tenant_id]
    else:
        chosen = tenants if len(tenants) == 1 else []
    if not chosen:
        available = [{"tenant_id": t, "name": n} for t, n in tenants]
        raise MappingRefused(
            "Choose the organisation: tenant_id must be one of the connection's."
            if tenants
            else "The connection reaches no organisation.",
            details={"tenants": available},
        )
    tenant_id, tenant_name = chosen[0]
    if connection.credentials.get("tenant_id") != tenant_id:
        await hub.merge_credentials(integration.id, {"tenant_id": tenant_id})
    return tenant_id, tenant_name or None


def _revenues(body: MappingIn) -> list[Any]:
    found = list(body.plans.values())
    if body.default_revenue is not None:
        found.append(body.default_revenue)
    return found


def _invalid_code(code: str) -> str:
    # Xero's own words when a document names an account it does not have.
    return f"Account code '{code}' is not a valid code for this document."


def _not_a_bank(code: str, kind: str) -> str:
    return (
        f"'{code}' is a {kind} account; a payout is booked as a bank transfer, between BANK "
        "accounts only (the payments account and the one Stripe pays out to)."
    )


def _check_accounts(
    body: MappingIn,
    accounts: dict[str, LedgerAccount],
    categories: dict[str, tuple[str, ...]],
    tax_rates: dict[str, TaxRate],
) -> None:
    problems: list[dict[str, str]] = []

    def need(field: str, code: str | None, *, payments: bool = False, bank: bool = False) -> None:
        if code is None:
            return
        account = accounts.get(code)
        if account is None or account.status != "ACTIVE":
            problems.append({"field": field, "message": _invalid_code(code)})
        elif bank and account.type != "BANK":
            problems.append({"field": field, "message": _not_a_bank(code, account.type)})
        elif payments and not account.takes_payments:
            problems.append(
                {
                    "field": field,
                    "message": f"Payments can only be made to BANK accounts or accounts with "
                    f"EnablePaymentsToAccount; '{code}' is neither.",
                }
            )

    revenue_fields = [(f"plans.{k}", v) for k, v in body.plans.items()]
    if body.default_revenue is not None:
        revenue_fields.append(("default_revenue", body.default_revenue))
    for field, revenue in revenue_fields:
        need(f"{field}.account_code", revenue.account_code)
        rate = tax_rates.get(revenue.tax_type) if revenue.tax_type else None
        if revenue.tax_type and (rate is None or rate.status != "ACTIVE" or not rate.revenue):
            problems.append(
                {
                    "field": f"{field}.tax_type",
                    "message": f"Tax type '{revenue.tax_type}' is not one of the "
                    "organisation's active tax rates for sales.",
                }
            )
        for index, choice in enumerate(revenue.tracking):
            options = categories.get(choice.category)
            if options is None or choice.option not in options:
                problems.append(
                    {
                        "field": f"{field}.tracking.{index}",
                        "message": f"Tracking option '{choice.option}' of category "
                        f"'{choice.category}' does not exist in the organisation.",
                    }
                )
    # A payout is booked as a transfer between two bank accounts, and Stripe's fees as money
    # spent from one: with payouts booked, the payments account must be a bank account too.
    payouts = body.payouts_bank_account_code is not None
    need("payments_account_code", body.payments_account_code, payments=True, bank=payouts)
    need("payouts_bank_account_code", body.payouts_bank_account_code, bank=True)
    need("fees_account_code", body.fees_account_code)
    if problems:
        raise MappingRefused(
            "; ".join(dict.fromkeys(p["message"] for p in problems)), details={"errors": problems}
        )


async def get_mapping(session: AsyncSession, integration: Integration) -> MappingOut:
    row = await session.get(AccountingMapping, integration.id)
    if row is None:
        raise NotFound(
            f"Integration {integration.public_id} has no accounting mapping.",
            code="MAPPING_NOT_FOUND",
        )
    return mapping_out(integration, row)


def mapping_out(integration: Integration, row: AccountingMapping) -> MappingOut:
    shown = {k: v for k, v in row.mapping.items() if k != "payments_integration_db_id"}
    return MappingOut(
        integration_id=integration.public_id,
        tenant_id=row.tenant_id,
        tenant_name=row.tenant_name,
        mapping=shown,
        validated_at=row.validated_at,
    )


# ---------------------------------------------------------------- entries


async def list_entries(
    session: AsyncSession,
    integration: Integration,
    *,
    status: str | None,
    kind: str | None,
    after_id: int | None,
    limit: int,
) -> Sequence[FinanceEntry]:
    """Newest first."""
    query = (
        select(FinanceEntry)
        .where(FinanceEntry.integration_id == integration.id)
        .order_by(FinanceEntry.id.desc())
        .limit(limit + 1)
    )
    if after_id is not None:
        query = query.where(FinanceEntry.id < after_id)
    if status is not None:
        query = query.where(FinanceEntry.status == status)
    if kind is not None:
        query = query.where(FinanceEntry.kind == kind)
    return list(await session.scalars(query))


async def get_entry(
    session: AsyncSession, principal: Principal, public_id: str, *, for_update: bool = False
) -> tuple[FinanceEntry, Integration]:
    query = select(FinanceEntry).where(FinanceEntry.public_id == public_id)
    if for_update:
        query = query.with_for_update()
    entry = await session.scalar(query)
    integration = await session.get(Integration, entry.integration_id) if entry else None
    if (
        entry is None
        or integration is None
        or not principal.can_see_organisation(integration.organisation_id)
    ):
        raise EntryNotFound(f"Finance entry {public_id} does not exist.")
    return entry, integration


async def replay_entry(
    session: AsyncSession, principal: Principal, entry: FinanceEntry, now: datetime
) -> None:
    """Book a failed entry again (after fixing the mapping, enabling a currency…). What it
    made already is kept, so nothing is booked twice."""
    if entry.status == EntryStatus.PENDING:
        raise Conflict("The entry is waiting to be booked already.", code="ALREADY_PENDING")
    if entry.status == EntryStatus.DONE:
        raise Conflict("The entry is booked; it is not booked twice.", code="ALREADY_BOOKED")
    entry.status = EntryStatus.PENDING
    entry.attempts = 0
    entry.next_attempt_at = now
    entry.completed_at = None
    entry.updated_at = now
    entry.log = [*entry.log, {"at": now.isoformat(), "step": "replay", "outcome": "queued"}]
    record_write(
        session,
        principal.actor,
        action="finance.entry.replay",
        object_type="finance_entry",
        object_id=entry.public_id,
        changes=diff({"status": EntryStatus.FAILED}, {"status": EntryStatus.PENDING}),
    )


async def entries_out(
    session: AsyncSession, entries: Sequence[FinanceEntry]
) -> list[FinanceEntryOut]:
    member_ids = {e.member_id for e in entries if e.member_id is not None}
    integration_ids = {e.integration_id for e in entries}
    members: dict[int, str] = {}
    if member_ids:
        rows = await session.execute(
            select(Member.id, Member.public_id).where(Member.id.in_(member_ids))
        )
        members = {row_id: public for row_id, public in rows}
    names: dict[int, str] = {}
    if integration_ids:
        rows = await session.execute(
            select(Integration.id, Integration.public_id).where(Integration.id.in_(integration_ids))
        )
        names = {row_id: public for row_id, public in rows}
    return [
        FinanceEntryOut(
            id=e.public_id,
            integration_id=names.get(e.integration_id, ""),
            kind=e.kind,
            source_ref=e.source_ref,
            member_id=members.get(e.member_id) if e.member_id else None,
            amount=e.amount,
            currency=e.currency,
            occurred_at=e.occurred_at,
            status=e.status,
            attempts=e.attempts,
            next_attempt_at=e.next_attempt_at,
            last_error=e.last_error,
            contact_id=e.contact_id,
            invoice_id=e.invoice_id,
            payment_id=e.payment_id,
            credit_note_id=e.credit_note_id,
            refund_id=e.refund_id,
            transfer_id=e.transfer_id,
            fees_id=e.fees_id,
            log=[EntryLog.model_validate(step) for step in e.log],
            created_at=e.created_at,
            completed_at=e.completed_at,
        )
        for e in entries
    ]


# ---------------------------------------------------------------- reconciliations


async def request_reconciliation(
    session: AsyncSession, principal: Principal, body: ReconciliationCreate
) -> Reconciliation:
    integration = await integrations.get_integration(session, principal, body.integration_id)
    accounting_of(integration)
    mapping = await session.get(AccountingMapping, integration.id)
    if mapping is None:
        raise Conflict("Save the integration's accounting mapping first.", code="MAPPING_NOT_FOUND")
    source_id: int | None = None
    if body.payments_integration_id is not None:
        source = await integrations.get_integration(
            session, principal, body.payments_integration_id
        )
        provider = get_provider(source.provider)
        if provider is None or as_payments(provider) is None:
            raise ValidationFailed(
                f"Integration {source.public_id} does not take payments.",
                details={"field": "payments_integration_id"},
            )
        source_id = source.id
    else:
        source_id = mapping.mapping.get("payments_integration_db_id")
        if source_id is not None and await session.get(Integration, source_id) is None:
            source_id = None  # the mapping's payments integration was deleted since
        if source_id is None:
            candidates = await _payments_candidates(session, integration.organisation_id)
            if len(candidates) != 1:
                raise ValidationFailed(
                    "Name the payments integration to reconcile (payments_integration_id).",
                    details={"field": "payments_integration_id"},
                )
            source_id = candidates[0]
    now = utcnow()
    reconciliation = Reconciliation(
        public_id=new_public_id("rec"),
        integration_id=integration.id,
        source_integration_id=source_id,
        period_start=body.period_start,
        period_end=body.period_end,
        status=ReconciliationStatus.QUEUED,
        attempts=0,
        report={},
        requested_by=principal.actor.id,
        created_at=now,
    )
    session.add(reconciliation)
    record_write(
        session,
        principal.actor,
        action="finance.reconciliation.request",
        object_type="reconciliation",
        object_id=reconciliation.public_id,
        changes=diff(
            {},
            {
                "period_start": body.period_start.isoformat(),
                "period_end": body.period_end.isoformat(),
            },
        ),
    )
    await session.flush()
    return reconciliation


async def get_reconciliation(
    session: AsyncSession, principal: Principal, public_id: str, *, for_update: bool = False
) -> Reconciliation:
    query = select(Reconciliation).where(Reconciliation.public_id == public_id)
    if for_update:
        query = query.with_for_update()
    found = await session.scalar(query)
    integration = await session.get(Integration, found.integration_id) if found else None
    if (
        found is None
        or integration is None
        or not principal.can_see_organisation(integration.organisation_id)
    ):
        raise ReconciliationNotFound(f"Reconciliation {public_id} does not exist.")
    return found


async def reconciliation_out(session: AsyncSession, found: Reconciliation) -> ReconciliationOut:
    rows = await session.execute(
        select(Integration.id, Integration.public_id).where(
            Integration.id.in_([found.integration_id, found.source_integration_id])
        )
    )
    names = {row_id: public for row_id, public in rows}
    report = found.report or {}
    return ReconciliationOut(
        id=found.public_id,
        integration_id=names.get(found.integration_id, ""),
        payments_integration_id=names.get(found.source_integration_id, ""),
        period_start=found.period_start,
        period_end=found.period_end,
        status=found.status,
        error=found.error,
        summary=ReconciliationSummary.model_validate(report["summary"])
        if "summary" in report
        else None,
        mismatches=[Mismatch.model_validate(m) for m in report.get("mismatches", [])],
        created_at=found.created_at,
        completed_at=found.completed_at,
    )
