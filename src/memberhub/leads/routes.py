from __future__ import annotations

from datetime import UTC, datetime, time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response, status
from fastapi.responses import StreamingResponse

from memberhub.auth.dependencies import LeadsReader, LeadsWriter, MembersWriter
from memberhub.kit.errors import ValidationFailed
from memberhub.kit.http import ERROR_RESPONSES, DbSession, UnitOfWorkRoute
from memberhub.kit.pagination import Page, PageParams, build_page, page_params
from memberhub.kit.types import IdPath, ISODate, SafeQuery, UTCDatetime
from memberhub.leads import service, transfer
from memberhub.leads.models import LeadStatus
from memberhub.leads.schemas import (
    EnrollmentOut,
    LeadCreate,
    LeadEnroll,
    LeadImport,
    LeadImportOut,
    LeadOut,
    LeadPatch,
)

router = APIRouter(
    prefix="/api/v1/leads", tags=["leads"], route_class=UnitOfWorkRoute, responses=ERROR_RESPONSES
)
external = APIRouter(
    prefix="/api/v1/external",
    tags=["leads"],
    route_class=UnitOfWorkRoute,
    responses=ERROR_RESPONSES,
)
StatusFilter = Annotated[str | None, Query(pattern="^(" + "|".join(LeadStatus.ALL) + ")$")]


@router.post("", status_code=status.HTTP_201_CREATED)
async def create_lead(
    payload: LeadCreate, response: Response, session: DbSession, principal: LeadsWriter
) -> LeadOut:
    """Create a lead (status `new`)."""
    lead = await service.create_lead(session, principal, payload)
    response.headers["Location"] = f"/api/v1/leads/{lead.public_id}"
    return service.to_out(lead)


@router.get("")
async def list_leads(
    session: DbSession,
    principal: LeadsReader,
    page: Annotated[PageParams, Depends(page_params)],
    status: StatusFilter = None,
    email: SafeQuery = None,
    source: SafeQuery = None,
    agent_id: SafeQuery = None,
    organisation_id: SafeQuery = None,
    created_from: UTCDatetime | None = None,
    updated_since: UTCDatetime | None = None,
) -> Page[LeadOut]:
    """Leads, oldest first, by status, email, source, agent, organisation or dates."""
    filters = service.LeadFilters(
        organisation_ids=await service.visible_organisation_ids(
            session, principal, organisation_id
        ),
        status=status,
        email=email,
        source=source,
        agent_id=agent_id,
        created_from=created_from,
        updated_since=updated_since,
    )
    rows = await service.list_leads(session, filters, after_id=page.after_id, limit=page.limit)
    items, pagination = build_page(rows, page.limit)
    return Page(data=[service.to_out(lead) for lead in items], pagination=pagination)


@router.get("/{lead_id}")
async def get_lead(lead_id: IdPath, session: DbSession, principal: LeadsReader) -> LeadOut:
    """One lead."""
    return service.to_out(await service.get_lead(session, principal, lead_id))


@router.patch("/{lead_id}")
async def update_lead(
    lead_id: IdPath, payload: LeadPatch, session: DbSession, principal: LeadsWriter
) -> LeadOut:
    """Change a lead or move it along the pipeline (enrolling is `POST .../enroll`); a move
    to `lost` needs a `lost_reason` (422 otherwise)."""
    lead = await service.update_lead(session, principal, lead_id, payload)
    if lead.status == LeadStatus.LOST and not lead.lost_reason:
        raise ValidationFailed(
            "A lead marked lost needs a lost_reason.", details={"field": "lost_reason"}
        )
    return service.to_out(lead)


@router.post("/{lead_id}/enroll", status_code=status.HTTP_201_CREATED)
async def enroll_lead(
    lead_id: IdPath,
    payload: LeadEnroll,
    session: DbSession,
    principal: LeadsWriter,
    _members: MembersWriter,
    response: Response,
) -> EnrollmentOut:
    """Create the member from the lead (and join the plan given); emits
    `enrollment.completed`. Needs `members:write` as well as `leads:write`, and
    `memberships:write` with a `plan_id`. `Location` is the new member."""
    enrolled = await service.enroll(session, principal, lead_id, payload)
    response.headers["Location"] = f"/api/v1/members/{enrolled.member_id}"
    return enrolled


@external.post("/leads/import")
async def import_leads(
    payload: LeadImport, session: DbSession, principal: LeadsWriter
) -> LeadImportOut:
    """Create or update leads from another system, with a result per record: a record that
    is invalid (or would make a refused status move) is reported and the rest are stored.
    Records match existing leads by their external id in `source`, then by email."""
    return await transfer.import_leads(session, principal, payload)


EXPORT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": '`{"leads": [...]}` (leads as in GET /leads) or CSV with a header '
        "line, streamed.",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "text/csv": {"schema": {"type": "string"}},
        },
    }
}


@external.get("/leads/export", response_class=StreamingResponse, responses=EXPORT_RESPONSES)
async def export_leads(
    request: Request,
    session: DbSession,
    principal: LeadsReader,
    status: StatusFilter = None,
    date_from: Annotated[
        ISODate | None, Query(description="Leads created on or after this day (UTC).")
    ] = None,
    organisation_id: SafeQuery = None,
    format: Literal["json", "csv"] = "json",
) -> StreamingResponse:
    """Every lead matching the filters, oldest first, streamed a page at a time."""
    organisation_ids = await service.visible_organisation_ids(session, principal, organisation_id)
    created_from = datetime.combine(date_from, time.min, tzinfo=UTC) if date_from else None
    lines = transfer.export_lines(
        request.app.state.db, organisation_ids, status, created_from, format
    )
    if format == "csv":
        return StreamingResponse(
            lines,
            media_type="text/csv",
            headers={"Content-Disposition": 'attachment; filename="leads.csv"'},
        )
    return StreamingResponse(lines, media_type="application/json")
