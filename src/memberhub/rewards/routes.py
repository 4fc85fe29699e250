from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Response, status
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.auth.dependencies import RewardsClaimer, RewardsReader, RewardsWriter
from memberhub.kit.clock import utcnow
from memberhub.kit.http import ERROR_RESPONSES, DbSession, UnitOfWorkRoute
from memberhub.kit.pagination import Page, PageParams, build_page, page_params
from memberhub.kit.types import IdPath
from memberhub.members.service import get_member
from memberhub.points.service import balance_out
from memberhub.rewards import service
from memberhub.rewards.models import ClaimStatus, Reward
from memberhub.rewards.repository import ClaimFilters, RewardRepository
from memberhub.rewards.schemas import (
    CancelClaimRequest,
    ClaimOut,
    ClaimRequest,
    ClaimResult,
    RewardCreate,
    RewardOut,
    RewardPatch,
)

router = APIRouter(
    prefix="/api/v1", tags=["rewards"], route_class=UnitOfWorkRoute, responses=ERROR_RESPONSES
)
MemberRef = Annotated[str | None, Query(pattern=r"^mem_[0-9a-z]{1,40}$")]
RewardRef = Annotated[str | None, Query(pattern=r"^rwd_[0-9a-z]{1,40}$")]
StatusFilter = Annotated[
    str | None, Query(pattern=f"^({ClaimStatus.CLAIMED}|{ClaimStatus.CANCELLED})$")
]
CLAIMED_OR_REPLAYED: dict[int | str, dict[str, Any]] = {
    200: {"model": ClaimResult, "description": "A replay of reference_id: the first claim"}
}


@router.post("/rewards", status_code=status.HTTP_201_CREATED)
async def create_reward(
    payload: RewardCreate, session: DbSession, principal: RewardsWriter, response: Response
) -> RewardOut:
    """Add a reward to the catalog (installation-wide: keys bound to an organisation get
    403). Tier codes must name existing tiers."""
    reward = await service.create_reward(session, principal, payload)
    response.headers["Location"] = f"/api/v1/rewards/{reward.public_id}"
    return (await service.rewards_to_out(session, [reward]))[0]


@router.get("/rewards")
async def list_rewards(
    session: DbSession,
    principal: RewardsReader,
    page: Annotated[PageParams, Depends(page_params)],
    active: bool | None = None,
    available_for: Annotated[
        str | None,
        Query(
            pattern=r"^mem_[0-9a-z]{1,40}$",
            description="A member id: only rewards this member could claim now (active, "
            "valid, in stock, affordable, under the per-member limit, open to their tier).",
        ),
    ] = None,
) -> Page[RewardOut]:
    """The reward catalogue, with stock and claim counts."""
    rows: Sequence[Reward]
    if available_for is not None:
        member = await get_member(session, principal, available_for)
        # Claimable rewards are active ones: asking for inactive ones too finds none.
        rows = (
            []
            if active is False
            else await service.claimable_rewards(
                session, member, now=utcnow(), after_id=page.after_id, limit=page.limit
            )
        )
    else:
        rows = await RewardRepository(session).list(
            active=active, after_id=page.after_id, limit=page.limit
        )
    items, pagination = build_page(rows, page.limit)
    return Page(data=await service.rewards_to_out(session, items), pagination=pagination)


async def _claims_page(
    session: AsyncSession, filters: ClaimFilters, page: PageParams
) -> Page[ClaimOut]:
    rows = await RewardRepository(session).list_claims(
        filters, after_id=page.after_id, limit=page.limit
    )
    items, pagination = build_page([claim for claim, _ in rows], page.limit)
    members = {claim.id: member_public_id for claim, member_public_id in rows}
    data = await service.claims_to_out(session, [(c, members[c.id]) for c in items])
    return Page(data=data, pagination=pagination)


async def _reward_filter(session: AsyncSession, reward_id: str | None) -> int | None:
    return (await service.get_reward(session, reward_id)).id if reward_id is not None else None


# Declared before /rewards/{reward_id}, which would otherwise take "claims" for an id.
@router.get("/rewards/claims")
async def list_claims(
    session: DbSession,
    principal: RewardsReader,
    page: Annotated[PageParams, Depends(page_params)],
    member_id: MemberRef = None,
    reward_id: RewardRef = None,
    status: StatusFilter = None,
) -> Page[ClaimOut]:
    """Claims, newest first, of members the key can see."""
    member = await get_member(session, principal, member_id) if member_id else None
    filters = ClaimFilters(
        member_id=member.id if member is not None else None,
        reward_id=await _reward_filter(session, reward_id),
        status=status,
        organisation_ids=principal.visible_organisation_ids,
    )
    return await _claims_page(session, filters, page)


@router.get("/members/{member_id}/reward-claims")
async def member_claims(
    member_id: IdPath,
    session: DbSession,
    principal: RewardsReader,
    page: Annotated[PageParams, Depends(page_params)],
    reward_id: RewardRef = None,
    status: StatusFilter = None,
) -> Page[ClaimOut]:
    """The member's claims, newest first."""
    member = await get_member(session, principal, member_id)
    filters = ClaimFilters(
        member_id=member.id, reward_id=await _reward_filter(session, reward_id), status=status
    )
    return await _claims_page(session, filters, page)


@router.get("/rewards/{reward_id}")
async def get_reward(reward_id: IdPath, session: DbSession, principal: RewardsReader) -> RewardOut:
    """One reward."""
    reward = await service.get_reward(session, reward_id)
    return (await service.rewards_to_out(session, [reward]))[0]


@router.patch("/rewards/{reward_id}")
async def update_reward(
    reward_id: IdPath, payload: RewardPatch, session: DbSession, principal: RewardsWriter
) -> RewardOut:
    """Change a reward; only the fields sent change. `stock` sets the units left."""
    reward = await service.update_reward(session, principal, reward_id, payload)
    return (await service.rewards_to_out(session, [reward]))[0]


async def _claim_result(session: AsyncSession, outcome: service.ClaimOutcome) -> ClaimResult:
    (claim,) = await service.claims_to_out(session, [(outcome.claim, outcome.member.public_id)])
    return ClaimResult(claim=claim, balance=balance_out(outcome.account), replayed=outcome.replayed)


@router.post(
    "/rewards/{reward_id}/claim", status_code=status.HTTP_201_CREATED, responses=CLAIMED_OR_REPLAYED
)
async def claim_reward(
    reward_id: IdPath,
    payload: ClaimRequest,
    response: Response,
    session: DbSession,
    principal: RewardsClaimer,
) -> ClaimResult:
    """Claim a reward for a member: the points are redeemed and a unit of stock taken
    together, or nothing happens (409 REWARD_NOT_AVAILABLE, TIER_NOT_ELIGIBLE,
    CLAIM_LIMIT_REACHED, OUT_OF_STOCK or INSUFFICIENT_POINTS). A repeat with the same
    `reference_id` returns the first claim with 200."""
    outcome = await service.claim_reward(
        session, principal, reward_id, payload.member_id, reference_id=payload.reference_id
    )
    if outcome.replayed:
        response.status_code = status.HTTP_200_OK
    return await _claim_result(session, outcome)


@router.post("/rewards/claims/{claim_id}/cancel")
async def cancel_claim(
    claim_id: IdPath, payload: CancelClaimRequest, session: DbSession, principal: RewardsClaimer
) -> ClaimResult:
    """Cancel a claim: its points are refunded and its unit of stock given back. Any key
    that may claim for the member may cancel the member's claims (the `rewards:claim`
    scope), so an integration can undo its own claims. A second cancel is 409
    CLAIM_ALREADY_CANCELLED and changes nothing."""
    outcome = await service.cancel_claim(session, principal, claim_id, reason=payload.reason)
    return await _claim_result(session, outcome)
