from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.auth.dependencies import StaffReader, StaffWriter
from memberhub.kit.http import ERROR_RESPONSES, DbSession, UnitOfWorkRoute
from memberhub.kit.pagination import Page, PageParams, build_page, page_params
from memberhub.kit.types import IdPath
from memberhub.staff import service
from memberhub.staff.models import StaffUser
from memberhub.staff.repository import StaffRepository
from memberhub.staff.schemas import StaffCreate, StaffCreated, StaffOut, StaffUpdate

router = APIRouter(
    prefix="/api/v1/staff", tags=["staff"], route_class=UnitOfWorkRoute, responses=ERROR_RESPONSES
)


async def _out(session: AsyncSession, staff: StaffUser) -> StaffOut:
    return StaffOut(
        id=staff.public_id,
        email=staff.email,
        name=staff.name,
        role=staff.role,
        organisation_id=await service.staff_organisation(session, staff),
        active=staff.active,
        totp_enabled=staff.totp_secret is not None,
        locked_until=staff.locked_until,
        last_sign_in_at=staff.last_sign_in_at,
        created_at=staff.created_at,
    )


@router.post("", status_code=201)
async def create_staff(
    payload: StaffCreate, session: DbSession, principal: StaffWriter, response: Response
) -> StaffCreated:
    """A staff account for the console. Its role and organisation give it exactly the
    permissions of an API key with the same ones."""
    created = await service.create_staff(
        session,
        principal,
        email=payload.email,
        name=payload.name,
        role=payload.role,
        organisation_public_id=payload.organisation_id,
        password=payload.password,
    )
    out = await _out(session, created.staff)
    response.headers["Location"] = f"/api/v1/staff/{out.id}"
    return StaffCreated(**out.model_dump(), one_time_password=created.one_time_password)


@router.get("")
async def list_staff(
    session: DbSession,
    principal: StaffReader,
    page: Annotated[PageParams, Depends(page_params)],
) -> Page[StaffOut]:
    """Staff accounts, oldest first (an org-bound caller sees its organisations' only)."""
    rows = await StaffRepository(session).list(
        organisation_ids=principal.visible_organisation_ids,
        after_id=page.after_id,
        limit=page.limit,
    )
    items, pagination = build_page(rows, page.limit)
    return Page(data=[await _out(session, s) for s in items], pagination=pagination)


@router.get("/{staff_id}")
async def get_staff(staff_id: IdPath, session: DbSession, principal: StaffReader) -> StaffOut:
    """One staff account; never its password or second-factor secret."""
    return await _out(session, await service.get_staff(session, principal, staff_id))


@router.patch("/{staff_id}")
async def update_staff(
    staff_id: IdPath, payload: StaffUpdate, session: DbSession, principal: StaffWriter
) -> StaffOut:
    """Change the name, role, organisation or active flag; any change of access ends the
    user's console sessions."""
    staff = await service.update_staff(
        session,
        principal,
        staff_id,
        name=payload.name,
        role=payload.role,
        active=payload.active,
        move_organisation="organisation_id" in payload.model_fields_set,
        organisation_public_id=payload.organisation_id,
    )
    return await _out(session, staff)


@router.post("/{staff_id}/unlock")
async def unlock_staff(staff_id: IdPath, session: DbSession, principal: StaffWriter) -> StaffOut:
    """End a lockout after repeated failed sign-ins."""
    return await _out(session, await service.unlock_staff(session, principal, staff_id))
