from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel
from sqlalchemy import select

from memberhub.audit.repository import AuditFilters, AuditRepository
from memberhub.auth.dependencies import AuditReader
from memberhub.events.sequencer import catch_up
from memberhub.kit.errors import Forbidden
from memberhub.kit.http import ERROR_RESPONSES, DbSession, UnitOfWorkRoute
from memberhub.kit.pagination import Page, PageParams, build_page, page_params
from memberhub.kit.types import SafeQuery, UTCDatetime
from memberhub.leads.models import Lead
from memberhub.members.models import Member
from memberhub.members.personal import ids_with_sealed, open_personal

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
    """Audit entries in chain order (oldest first): who did what to which object, with the
    changes."""
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
    # Members' and leads' personal values are sealed with their keys (`members.personal`).
    sealed_for = ids_with_sealed(items)
    keys: dict[tuple[str, str], str | None] = {}
    for object_type, model in (("member", Member), ("lead", Lead)):
        if object_type in sealed_for:
            found = await session.execute(
                select(model.public_id, model.data_key).where(
                    model.public_id.in_(sealed_for[object_type])
                )
            )
            keys.update({(object_type, public_id): key for public_id, key in found})
    out = []
    for entry in items:
        shown = AuditEntryOut.model_validate(entry, from_attributes=True)
        if entry.object_id in sealed_for.get(entry.object_type, ()):
            key = keys.get((entry.object_type, entry.object_id))
            changes = open_personal(entry.changes, key, entry.object_id)
            shown = shown.model_copy(update={"changes": changes})
        out.append(shown)
    return Page(data=out, pagination=pagination)
