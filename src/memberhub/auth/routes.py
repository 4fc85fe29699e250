"""API keys over the API (admins): create, list, read, revoke. The CLI does the same."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.auth import service
from memberhub.auth.dependencies import ApiKeysReader, ApiKeysWriter
from memberhub.auth.models import ApiKey
from memberhub.auth.repository import ApiKeyRepository
from memberhub.auth.roles import Role
from memberhub.auth.schemas import ApiKeyCreate, ApiKeyCreated, ApiKeyOut
from memberhub.kit.http import ERROR_RESPONSES, DbSession, UnitOfWorkRoute
from memberhub.kit.pagination import Page, PageParams, build_page, page_params
from memberhub.kit.types import IdPath
from memberhub.organisations.models import Organisation

router = APIRouter(
    prefix="/api/v1/api-keys",
    tags=["api keys"],
    route_class=UnitOfWorkRoute,
    responses=ERROR_RESPONSES,
)


async def _out(session: AsyncSession, api_key: ApiKey) -> ApiKeyOut:
    organisation = None
    if api_key.organisation_id is not None:
        organisation = await session.get(Organisation, api_key.organisation_id)
    return ApiKeyOut(
        id=api_key.public_id,
        name=api_key.name,
        role=api_key.role,
        scopes=api_key.scopes.get("scopes"),
        organisation_id=organisation.public_id if organisation is not None else None,
        rate_limit=api_key.rate_limit,
        created_at=api_key.created_at,
        revoked_at=api_key.revoked_at,
    )


@router.post("", status_code=201)
async def create_api_key(
    payload: ApiKeyCreate, session: DbSession, principal: ApiKeysWriter, response: Response
) -> ApiKeyCreated:
    """Issue a key; its secret is in this response only (only a digest is stored)."""
    await service.require_grantable(
        session, principal, payload.organisation_id, role=Role(payload.role), scopes=payload.scopes
    )
    issued = await service.create_api_key(
        session,
        principal.actor,
        name=payload.name,
        role=Role(payload.role),
        scopes=payload.scopes,
        organisation_public_id=payload.organisation_id,
        rate_limit=payload.rate_limit,
    )
    out = await _out(session, issued.api_key)
    response.headers["Location"] = f"/api/v1/api-keys/{out.id}"
    return ApiKeyCreated(**out.model_dump(), secret=issued.secret)


@router.get("")
async def list_api_keys(
    session: DbSession,
    principal: ApiKeysReader,
    page: Annotated[PageParams, Depends(page_params)],
) -> Page[ApiKeyOut]:
    """Keys, oldest first, revoked ones included; never their secrets."""
    rows = await ApiKeyRepository(session).list(
        organisation_ids=principal.visible_organisation_ids,
        after_id=page.after_id,
        limit=page.limit,
    )
    items, pagination = build_page(rows, page.limit)
    return Page(data=[await _out(session, k) for k in items], pagination=pagination)


@router.get("/{key_id}")
async def get_api_key(key_id: IdPath, session: DbSession, principal: ApiKeysReader) -> ApiKeyOut:
    """One key, without its secret."""
    return await _out(session, await service.get_api_key(session, principal, key_id))


@router.post("/{key_id}/revoke")
async def revoke_api_key(key_id: IdPath, session: DbSession, principal: ApiKeysWriter) -> ApiKeyOut:
    """Refuse the key from now on (at once in this process; in others within CACHE_TTL)."""
    api_key = await service.revoke_api_key(session, principal.actor, key_id, principal=principal)
    return await _out(session, api_key)
