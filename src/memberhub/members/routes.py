from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response, status
from fastapi.responses import JSONResponse

from memberhub.auth.dependencies import MembersEraser, MembersReader, MembersWriter
from memberhub.kit.http import ERROR_RESPONSES, DbSession, UnitOfWorkRoute, error_doc
from memberhub.kit.pagination import Page, PageParams, build_page, page_params
from memberhub.kit.types import IdPath, SafeQuery, UTCDatetime
from memberhub.members import data_export, service
from memberhub.members.models import MemberStatus
from memberhub.members.repository import (
    ConsentChangeRepository,
    MemberFilters,
    MemberRepository,
)
from memberhub.members.schemas import ConsentChangeOut, MemberCreate, MemberOut, MemberPatch
from memberhub.organisations.service import get_visible as get_visible_organisation

router = APIRouter(
    prefix="/api/v1/members",
    tags=["members"],
    route_class=UnitOfWorkRoute,
    responses=ERROR_RESPONSES,
)
StatusFilter = Annotated[str | None, Query(pattern="^(" + "|".join(MemberStatus.ALL) + ")$")]


@router.post("", status_code=status.HTTP_201_CREATED)
async def create_member(
    payload: MemberCreate,
    response: Response,
    session: DbSession,
    principal: MembersWriter,
) -> MemberOut:
    """Create a member (status `pending` until they join a plan); emits `member.created`.
    The email is unique per organisation, compared case-insensitively (409 DUPLICATE_EMAIL)."""
    member = await service.create_member(session, principal, payload)
    response.headers["ETag"] = service.etag(member)
    response.headers["Location"] = f"/api/v1/members/{member.public_id}"
    return service.to_out(member)


@router.get("")
async def list_members(
    session: DbSession,
    principal: MembersReader,
    page: Annotated[PageParams, Depends(page_params)],
    status: StatusFilter = None,
    tier: SafeQuery = None,
    organisation_id: SafeQuery = None,
    email: SafeQuery = None,
    external_id: Annotated[
        str | None,
        Query(
            max_length=300,
            pattern=r"^[^:\x00]{1,100}:[^\x00]{1,200}$",
            description="`SYSTEM:ID`: the member whose `external_ids` map SYSTEM to ID.",
        ),
    ] = None,
    q: SafeQuery = None,
    updated_since: UTCDatetime | None = None,
    created_from: UTCDatetime | None = None,
    created_to: UTCDatetime | None = None,
) -> Page[MemberOut]:
    """Members, oldest first, filtered by any of the parameters together."""
    organisation_ids = principal.visible_organisation_ids
    if organisation_id is not None:
        org = await get_visible_organisation(session, principal, organisation_id)
        organisation_ids = frozenset({org.id})
    filters = MemberFilters(
        status=status,
        tier=tier,
        organisation_ids=organisation_ids,
        email=email,
        external_id=_system_and_id(external_id),
        q=q,
        updated_since=updated_since,
        created_from=created_from,
        created_to=created_to,
    )
    rows = await MemberRepository(session).list(filters, after_id=page.after_id, limit=page.limit)
    items, pagination = build_page(rows, page.limit)
    return Page(data=[service.to_out(m) for m in items], pagination=pagination)


def _system_and_id(external_id: str | None) -> tuple[str, str] | None:
    if external_id is None:
        return None
    system, _, value = external_id.partition(":")
    return system, value


@router.get("/{member_id}")
async def get_member(
    member_id: IdPath,
    response: Response,
    session: DbSession,
    principal: MembersReader,
) -> MemberOut:
    """One member, with an `ETag` to send back as `If-Match` when patching."""
    member = await service.get_member(session, principal, member_id)
    response.headers["ETag"] = service.etag(member)
    return service.to_out(member)


@router.patch(
    "/{member_id}",
    responses={412: error_doc("If-Match names a stale version")},
)
async def update_member(
    member_id: IdPath,
    payload: MemberPatch,
    response: Response,
    session: DbSession,
    principal: MembersWriter,
    if_match: Annotated[str | None, Header(max_length=100)] = None,
) -> MemberOut:
    """Change a member's profile, consent, custom fields or external ids; with `If-Match`,
    only the version read (412 otherwise). Emits `member.updated` with what changed."""
    member = await service.update_member(
        session, principal, member_id, payload, if_match=service.parse_if_match(if_match)
    )
    response.headers["ETag"] = service.etag(member)
    return service.to_out(member)


@router.delete("/{member_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_member(member_id: IdPath, session: DbSession, principal: MembersEraser) -> None:
    """Erase the member's personal data (here and in past events); the record stays, so
    ledger and audit references hold. Emits `member.deleted`."""
    await service.delete_member(session, principal, member_id)


@router.get("/{member_id}/consent-history")
async def consent_history(
    member_id: IdPath,
    session: DbSession,
    principal: MembersReader,
    page: Annotated[PageParams, Depends(page_params)],
) -> Page[ConsentChangeOut]:
    """Every change of the member's consent, oldest first: the purpose, granted or
    withdrawn, who changed it, from where (api, console, import, crm, vendor_webhook,
    erasure, migration) and the client's IP address when known."""
    member = await service.get_member(session, principal, member_id)
    rows = await ConsentChangeRepository(session).for_member(
        member.id, after_id=page.after_id, limit=page.limit
    )
    items, pagination = build_page(rows, page.limit)
    return Page(
        data=[
            ConsentChangeOut(
                purpose=row.purpose,
                granted=row.granted,
                actor=row.actor,
                source=row.source,
                client_ip=row.client_ip,
                occurred_at=row.occurred_at,
            )
            for row in items
        ],
        pagination=pagination,
    )


@router.get(
    "/{member_id}/export",
    responses={200: {"description": "The member's data, as one JSON document."}},
)
async def export_member_data(
    member_id: IdPath, request: Request, session: DbSession, principal: MembersEraser
) -> JSONResponse:
    """Everything memberhub holds about the member (profile, consent, memberships and
    their history, the points ledger and batches, reward claims, activities, approvals,
    alerts, payment records, CRM links, the events about the member and the audit entries
    of changes to it), for a data subject access request. Needs the same permission as
    erasure; each export is recorded in the audit log."""
    document: dict[str, Any] = await data_export.export_member_data(session, principal, member_id)
    async with request.app.state.db.transaction() as audit_session:
        data_export.record_export(audit_session, principal, document)
    return JSONResponse(
        document,
        headers={"Content-Disposition": f'attachment; filename="{member_id}-export.json"'},
    )
