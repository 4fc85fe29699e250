from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response, status

from memberhub.auth.dependencies import TiersAssigner, TiersReader, TiersWriter
from memberhub.kit.http import ERROR_RESPONSES, DbSession, UnitOfWorkRoute
from memberhub.kit.pagination import Page, PageParams, build_page, page_params
from memberhub.kit.types import IdPath
from memberhub.members.service import get_member
from memberhub.tiers import service
from memberhub.tiers.repository import TierRepository
from memberhub.tiers.schemas import (
    TierAssignment,
    TierAssignmentOut,
    TierCreate,
    TierOut,
    TierPatch,
)

router = APIRouter(
    prefix="/api/v1/tiers", tags=["tiers"], route_class=UnitOfWorkRoute, responses=ERROR_RESPONSES
)


@router.post("", status_code=status.HTTP_201_CREATED)
async def create_tier(
    payload: TierCreate, session: DbSession, principal: TiersWriter, response: Response
) -> TierOut:
    """Define a tier: its rank, threshold on a basis, downgrade policy, multiplier, benefits."""
    tier = await service.create_tier(session, principal, payload)
    response.headers["Location"] = f"/api/v1/tiers/{tier.public_id}"
    return service.to_out(tier)


@router.get("")
async def list_tiers(
    session: DbSession,
    principal: TiersReader,
    page: Annotated[PageParams, Depends(page_params)],
    active: Annotated[bool | None, Query(description="Only active or inactive tiers.")] = None,
) -> Page[TierOut]:
    """Tiers from the lowest rank up."""
    rows = await TierRepository(session).list_by_rank(
        active=active, after_rank=page.after_id, limit=page.limit
    )
    items, pagination = build_page(rows, page.limit, key="rank")
    return Page(data=[service.to_out(t) for t in items], pagination=pagination)


@router.post("/assign")
async def assign_tier(
    payload: TierAssignment, session: DbSession, principal: TiersAssigner
) -> TierAssignmentOut:
    """Set a member's tier now (also downwards), keeping it as a floor until `until`, or
    until the next assignment when `until` is absent; a null `tier_code` clears both."""
    member = await get_member(session, principal, payload.member_id)
    return await service.assign_tier(session, principal.actor, member, payload)


@router.get("/{tier_id}")
async def get_tier(tier_id: IdPath, session: DbSession, principal: TiersReader) -> TierOut:
    """One tier, with its thresholds and benefits."""
    return service.to_out(await service.get_tier(session, tier_id))


@router.patch("/{tier_id}")
async def update_tier(
    tier_id: IdPath, payload: TierPatch, session: DbSession, principal: TiersWriter
) -> TierOut:
    """Change a tier (not its code). Members move by the new rules at their next ledger
    change or review; `active: false` retires a tier that members hold."""
    return service.to_out(await service.update_tier(session, principal, tier_id, payload))


@router.delete("/{tier_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_tier(tier_id: IdPath, session: DbSession, principal: TiersWriter) -> None:
    """Delete a tier that no member holds (409 TIER_IN_USE otherwise)."""
    await service.delete_tier(session, principal, tier_id)
