from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response, status

from memberhub.auth.dependencies import OrganisationsReader, OrganisationsWriter
from memberhub.kit.http import ERROR_RESPONSES, DbSession, UnitOfWorkRoute
from memberhub.kit.pagination import Page, PageParams, build_page, page_params
from memberhub.kit.types import IdPath, SafeQuery
from memberhub.organisations import service
from memberhub.organisations.repository import OrganisationRepository
from memberhub.organisations.schemas import OrganisationCreate, OrganisationOut, OrganisationPatch

router = APIRouter(
    prefix="/api/v1/organisations",
    tags=["organisations"],
    route_class=UnitOfWorkRoute,
    responses=ERROR_RESPONSES,
)


@router.post("", status_code=status.HTTP_201_CREATED)
async def create_organisation(
    payload: OrganisationCreate,
    session: DbSession,
    principal: OrganisationsWriter,
    response: Response,
) -> OrganisationOut:
    """Create an organisation, optionally as a chapter of `parent_id`; the slug is unique."""
    org = await service.create_organisation(session, principal, payload)
    response.headers["Location"] = f"/api/v1/organisations/{org.public_id}"
    return (await service.to_out(session, [org]))[0]


@router.get("")
async def list_organisations(
    session: DbSession,
    principal: OrganisationsReader,
    page: Annotated[PageParams, Depends(page_params)],
    parent_id: SafeQuery = None,
) -> Page[OrganisationOut]:
    """Organisations the key can see, oldest first."""
    parent_pk = None
    if parent_id is not None:
        parent_pk = (await service.get_visible(session, principal, parent_id)).id
    rows = await OrganisationRepository(session).list(
        visible_ids=principal.visible_organisation_ids,
        parent_id=parent_pk,
        after_id=page.after_id,
        limit=page.limit,
    )
    items, pagination = build_page(rows, page.limit)
    return Page(data=await service.to_out(session, items), pagination=pagination)


@router.get("/{organisation_id}")
async def get_organisation(
    organisation_id: IdPath, session: DbSession, principal: OrganisationsReader
) -> OrganisationOut:
    """One organisation, with its parent."""
    org = await service.get_visible(session, principal, organisation_id)
    return (await service.to_out(session, [org]))[0]


@router.patch("/{organisation_id}")
async def update_organisation(
    organisation_id: IdPath,
    payload: OrganisationPatch,
    session: DbSession,
    principal: OrganisationsWriter,
) -> OrganisationOut:
    """Change an organisation's name or slug."""
    org = await service.update_organisation(session, principal, organisation_id, payload)
    return (await service.to_out(session, [org]))[0]


@router.delete("/{organisation_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_organisation(
    organisation_id: IdPath, session: DbSession, principal: OrganisationsWriter
) -> None:
    """Delete an organisation that has no chapters and nothing that refers to it (409 otherwise)."""
    await service.delete_organisation(session, principal, organisation_id)
