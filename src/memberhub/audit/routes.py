from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from memberhub.audit.repository import AuditFilters, AuditRepository
from memberhub.auth.dependencies import AuditReader
from memberhub.events.sequencer import catch_up
from memberhub.kit.errors import Forbidden
from memberhub.kit.http import ERROR_RESPONSES, DbSession, UnitOfWorkRoute
from memberhub.kit.pagination import Page, PageParams, build_page, page_params
from memberhub.kit.types import SafeQuery, UTCDatetime

router = APIRouter(
    prefix="/api/v1/audit", tags=["audit"], route_class=UnitOfWorkRoute, responses=ERROR_RESPONSES
)


class AuditEntryOut(BaseModel):
    id: int
    chain_position: int
    occurred_at: datetime
    actor: str
    action: str
    object_type: str
    object_id: str
    changes: dict[str, Any]
    request_id: str | None
    client_ip: str | None
    prev_hash: str
    hash: str


@router.get("")
async def list_audit_entries(
    request: Request,
    session: DbSession,
    principal: AuditReader,
    page: Annotated[PageParams, Depends(page_params)],
    actor: SafeQuery = None,
    action: SafeQuery = None,
    object_id: SafeQuery = None,
    occurred_from: UTCDatetime | None = None,
    occurred_to: UTCDatetime | None = None,
) -> Page[AuditEntryOut]:
    """Audit entries, newest first: who did what to which object, with the changes."""
    if principal.organisation_id is not None:
        # Entries span every organisation; a key limited to one must not read the others'.
        raise Forbidden(
            "The audit log covers the whole installation; use a key not bound to an organisation.",
            code="AUDIT_REQUIRES_INSTALLATION_KEY",
        )
    # Entries are listed in chain order once linked: link what has committed so far first.
    await catch_up(request.app.state.db, session)
    filters = AuditFilters(
        actor=actor,
        action=action,
        object_id=object_id,
        occurred_from=occurred_from,
        occurred_to=occurred_to,
    )
    rows = await AuditRepository(session).list(
        filters, after_position=page.after_id, limit=page.limit
    )
    items, pagination = build_page(rows, page.limit, key="chain_position")
    return Page(
        data=[AuditEntryOut.model_validate(e, from_attributes=True) for e in items],
        pagination=pagination,
    )
