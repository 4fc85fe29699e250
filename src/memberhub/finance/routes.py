from __future__ import annotations

import csv
import io
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response

from memberhub.auth.dependencies import IntegrationsReader, IntegrationsWriter
from memberhub.finance import fixes, service
from memberhub.finance.models import EntryKind, EntryStatus
from memberhub.finance.schemas import (
    FinanceEntryOut,
    FixOut,
    MappingIn,
    MappingOut,
    ReconciliationCreate,
    ReconciliationOut,
)
from memberhub.integrations import service as integrations
from memberhub.integrations.hub import IntegrationHub
from memberhub.integrations.routes import OutboundRoute
from memberhub.kit.clock import utcnow
from memberhub.kit.http import ERROR_RESPONSES, DbSession, UnitOfWorkRoute
from memberhub.kit.pagination import Page, PageParams, build_page, page_params
from memberhub.kit.spreadsheet import csv_cell
from memberhub.kit.types import IdPath

router = APIRouter(
    prefix="/api/v1", tags=["finance"], route_class=UnitOfWorkRoute, responses=ERROR_RESPONSES
)
outbound = APIRouter(
    prefix="/api/v1", tags=["finance"], route_class=OutboundRoute, responses=ERROR_RESPONSES
)

StatusFilter = Annotated[str | None, Query(pattern="^(" + "|".join(EntryStatus.ALL) + ")$")]
KindFilter = Annotated[str | None, Query(pattern="^(" + "|".join(EntryKind.ALL) + ")$")]
MismatchPath = Annotated[str, Path(pattern=r"^mm_[0-9]{1,6}$")]


def _hub(request: Request) -> IntegrationHub:
    hub: IntegrationHub = request.app.state.integrations
    return hub


@outbound.put("/integrations/{integration_id}/accounting-mapping")
async def save_accounting_mapping(
    integration_id: IdPath,
    payload: MappingIn,
    request: Request,
    session: DbSession,
    principal: IntegrationsWriter,
) -> MappingOut:
    """Set where an accounting integration (Xero) books memberships' money. The
    organisation is chosen from the connection's tenants; every account code, tax type and
    tracking option is checked against it, and an unknown one is refused with Xero's
    message. Nothing is kept unless all of it is valid."""
    integration = await integrations.get_integration(session, principal, integration_id)
    hub = _hub(request)
    try:
        return await service.save_mapping(
            request.app.state.db, hub, principal, integration, payload
        )
    finally:
        await hub.drain()


@router.get("/integrations/{integration_id}/accounting-mapping")
async def get_accounting_mapping(
    integration_id: IdPath, session: DbSession, principal: IntegrationsReader
) -> MappingOut:
    """The integration's accounting mapping, its organisation and when it was checked."""
    integration = await integrations.get_integration(session, principal, integration_id)
    return await service.get_mapping(session, integration)


@router.get("/integrations/{integration_id}/finance-entries")
async def list_finance_entries(
    integration_id: IdPath,
    session: DbSession,
    principal: IntegrationsReader,
    page: Annotated[PageParams, Depends(page_params)],
    status: StatusFilter = None,
    kind: KindFilter = None,
) -> Page[FinanceEntryOut]:
    """What was booked (or waits, or failed) for each Stripe payment, failure and refund,
    newest first, with each step's outcome and the vendor's ids."""
    integration = await integrations.get_integration(session, principal, integration_id)
    rows = await service.list_entries(
        session, integration, status=status, kind=kind, after_id=page.after_id, limit=page.limit
    )
    items, pagination = build_page(rows, page.limit)
    return Page(data=await service.entries_out(session, items), pagination=pagination)


@router.get("/finance-entries/{entry_id}")
async def get_finance_entry(
    entry_id: IdPath, session: DbSession, principal: IntegrationsReader
) -> FinanceEntryOut:
    """One finance entry: what it books, the vendor's ids and its log, step by step."""
    entry, _ = await service.get_entry(session, principal, entry_id)
    [out] = await service.entries_out(session, [entry])
    return out


@router.post("/finance-entries/{entry_id}/replay", status_code=202)
async def replay_finance_entry(
    entry_id: IdPath, session: DbSession, principal: IntegrationsWriter
) -> FinanceEntryOut:
    """Book a failed entry again; what it made before is reused, never made twice."""
    entry, _ = await service.get_entry(session, principal, entry_id, for_update=True)
    await service.replay_entry(session, principal, entry, utcnow())
    [out] = await service.entries_out(session, [entry])
    return out


@router.post("/reconciliations", status_code=202)
async def create_reconciliation(
    payload: ReconciliationCreate, session: DbSession, principal: IntegrationsWriter
) -> ReconciliationOut:
    """Compare, for the period, Stripe's charges, refunds and payouts with Xero's invoices
    and payments and memberhub's membership terms. The worker runs it; GET it for the
    report."""
    found = await service.request_reconciliation(session, principal, payload)
    return await service.reconciliation_out(session, found)


@router.get("/reconciliations/{reconciliation_id}")
async def get_reconciliation(
    reconciliation_id: IdPath, session: DbSession, principal: IntegrationsReader
) -> ReconciliationOut:
    """The reconciliation and, once the worker ran it, its report: counts and every
    mismatch with its kind and suggested fix."""
    found = await service.get_reconciliation(session, principal, reconciliation_id)
    return await service.reconciliation_out(session, found)


CSV_COLUMNS = (
    "id",
    "kind",
    "member_id",
    "stripe_id",
    "invoice_id",
    "credit_note_id",
    "transfer_id",
    "term_id",
    "stripe_amount",
    "stripe_currency",
    "xero_amount",
    "xero_currency",
    "balance_amount",
    "fix",
    "fix_description",
    "fixed_at",
    "description",
)


@router.get(
    "/reconciliations/{reconciliation_id}/report.csv",
    response_class=Response,
    responses={200: {"content": {"text/csv": {}}}},
)
async def reconciliation_csv(
    reconciliation_id: IdPath, session: DbSession, principal: IntegrationsReader
) -> Response:
    """The mismatches as CSV, one a row, for a spreadsheet."""
    found = await service.get_reconciliation(session, principal, reconciliation_id)
    out = await service.reconciliation_out(session, found)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for mismatch in out.mismatches:
        row = mismatch.model_dump()
        writer.writerow([_cell(row.get(column)) for column in CSV_COLUMNS])
    return Response(
        buffer.getvalue(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{out.id}.csv"'},
    )


def _cell(value: object) -> object:
    # Text never runs as a formula; a number (a negative balance) stays a number.
    if value is None or isinstance(value, str):
        return csv_cell(value)
    return value


@router.post("/reconciliations/{reconciliation_id}/mismatches/{mismatch_id}/fix")
async def fix_mismatch(
    reconciliation_id: IdPath,
    mismatch_id: MismatchPath,
    session: DbSession,
    principal: IntegrationsWriter,
) -> FixOut:
    """Apply a mismatch's suggested fix: `create_missing_invoice` queues the booking of
    the Stripe payment (contact, invoice, payment); `link_payment` queues the payment of
    the unpaid invoice; `create_missing_credit_note` the refund's credit note and its
    refund; `link_refund` the refund of a credit note not paid back; `book_payout` the
    payout's fees and transfer to the bank. The worker books it; the entry's log shows how
    it went."""
    found = await service.get_reconciliation(session, principal, reconciliation_id, for_update=True)
    return await fixes.apply_fix(session, principal, found, mismatch_id, utcnow())
