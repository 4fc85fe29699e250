"""Helpers for the rewards tests: catalog and claim calls through the API, tiers written
straight to the tables, and a snapshot of everything a claim could change."""

from __future__ import annotations

from typing import Any

import httpx
from sqlalchemy import func, select, update

from memberhub.audit.models import AuditEntry
from memberhub.events.models import Event
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.kit.ids import new_public_id
from memberhub.members.models import Member
from memberhub.points.models import PointAccount, PointBatch, PointTransaction
from memberhub.rewards.models import Reward, RewardClaim
from memberhub.tiers.models import Tier
from tests.support import ApiClient, unique

REWARDS = "/api/v1/rewards"
CLAIMS = f"{REWARDS}/claims"


async def create_reward(api: ApiClient, **fields: Any) -> dict[str, Any]:
    body = {
        "code": fields.pop("code", unique("RWD")),
        "name": fields.pop("name", "Free coffee"),
        "points_cost": fields.pop("points_cost", 100),
        **fields,
    }
    response = await api.post(REWARDS, body)
    assert response.status_code == 201, response.text
    return dict(response.json())


async def get_reward(api: ApiClient, reward_id: str) -> dict[str, Any]:
    response = await api.get(f"{REWARDS}/{reward_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


async def award(api: ApiClient, member_id: str, points: int) -> None:
    response = await api.post(
        "/api/v1/points/award", {"member_id": member_id, "points": points, "reason": "test"}
    )
    assert response.status_code == 201, response.text


async def balance(api: ApiClient, member_id: str) -> int:
    response = await api.get(f"/api/v1/members/{member_id}/points")
    assert response.status_code == 200, response.text
    return int(response.json()["current_balance"])


async def claim(
    api: ApiClient, reward_id: str, member_id: str, *, expect: int = 201, **fields: Any
) -> dict[str, Any]:
    response = await api.post(f"{REWARDS}/{reward_id}/claim", {"member_id": member_id, **fields})
    assert response.status_code == expect, response.text
    return dict(response.json())


async def cancel(
    api: ApiClient, claim_id: str, reason: str = "changed their mind", *, expect: int = 200
) -> dict[str, Any]:
    response = await api.post(f"{CLAIMS}/{claim_id}/cancel", {"reason": reason})
    assert response.status_code == expect, response.text
    return dict(response.json())


def error_code(response: httpx.Response) -> str:
    return str(response.json()["error"]["code"])


async def make_tier(db: Database, code: str, rank: int) -> None:
    async with db.transaction() as session:
        session.add(
            Tier(
                public_id=new_public_id("tir"),
                code=code,
                name=code.title(),
                rank=rank,
                threshold=rank * 1000,
            )
        )


async def set_member_tier(db: Database, member_public_id: str, tier_code: str | None) -> None:
    """Put the member in a tier, as the tier evaluation would (the account must exist)."""
    async with db.transaction() as session:
        member_id = await session.scalar(
            select(Member.id).where(Member.public_id == member_public_id)
        )
        result = await session.execute(
            update(PointAccount)
            .where(PointAccount.member_id == member_id)
            .values(tier_code=tier_code, updated_at=utcnow())
        )
        assert result.rowcount == 1  # type: ignore[attr-defined]


async def database_state(db: Database) -> dict[str, Any]:
    """Everything a claim or a cancellation writes, to prove a refused one wrote nothing."""
    async with db.transaction(read_only=True) as session:

        async def rows(*columns: Any) -> list[tuple[Any, ...]]:
            result = await session.execute(select(*columns).order_by(columns[0]))
            return [tuple(row) for row in result]

        async def count(model: Any) -> int:
            return int(await session.scalar(select(func.count()).select_from(model)) or 0)

        return {
            "rewards": await rows(Reward.id, Reward.stock, Reward.updated_at),
            "claims": await rows(RewardClaim.id, RewardClaim.status),
            "accounts": await rows(
                PointAccount.member_id, PointAccount.current, PointAccount.lifetime_redeemed
            ),
            "batches": await rows(PointBatch.id, PointBatch.status, PointBatch.remaining),
            "transactions": await count(PointTransaction),
            "events": await count(Event),
            "audit": await count(AuditEntry),
        }


async def redeem_transactions(db: Database) -> int:
    async with db.transaction(read_only=True) as session:
        return int(
            await session.scalar(select(func.count()).where(PointTransaction.type == "redeem")) or 0
        )
