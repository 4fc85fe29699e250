"""Builders and helpers for the tier tests: tiers, points, the member's tier and its events,
and the review run with a chosen clock."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import pytest

from memberhub.kit.db import Database
from memberhub.tiers.jobs import run_review
from tests.support import ApiClient, unique

TIERS = "/api/v1/tiers"
Review = Callable[[datetime], Awaitable[int]]


def tier_body(**fields: Any) -> dict[str, Any]:
    return {
        "code": fields.pop("code", unique("T")),
        "name": fields.pop("name", "Tier"),
        "rank": fields.pop("rank", 1),
        "threshold": fields.pop("threshold", 100),
        **fields,
    }


async def create_tier(api: ApiClient, **fields: Any) -> dict[str, Any]:
    response = await api.post(TIERS, tier_body(**fields))
    assert response.status_code == 201, response.text
    return dict(response.json())


async def award(api: ApiClient, member_id: str, points: int) -> dict[str, Any]:
    response = await api.post(
        "/api/v1/points/award", {"member_id": member_id, "points": points, "reason": "Test"}
    )
    assert response.status_code == 201, response.text
    return dict(response.json())


async def redeem(api: ApiClient, member_id: str, points: int) -> None:
    response = await api.post("/api/v1/points/redeem", {"member_id": member_id, "points": points})
    assert response.status_code == 201, response.text


async def member_tier(api: ApiClient, member_id: str) -> str | None:
    response = await api.get(f"/api/v1/members/{member_id}")
    assert response.status_code == 200, response.text
    tier: str | None = response.json()["tier"]
    return tier


async def tier_events(api: ApiClient, member_id: str) -> list[tuple[str | None, str | None, str]]:
    """(previous, new, reason) of the member's member.tier.changed events, oldest first."""
    response = await api.get(
        "/api/v1/events",
        params={"type": "member.tier.changed", "member_id": member_id, "limit": 500},
    )
    assert response.status_code == 200, response.text
    return [
        (e["data"]["previous_tier"], e["data"]["new_tier"], e["data"]["reason"])
        for e in response.json()["data"]
    ]


async def assign(
    api: ApiClient, member_id: str, tier_code: str | None, **fields: Any
) -> dict[str, Any]:
    response = await api.post(
        f"{TIERS}/assign",
        {"member_id": member_id, "tier_code": tier_code, "reason": "Goodwill", **fields},
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


@pytest.fixture
def review(db: Database) -> Review:
    """Run the nightly tier review as of `now`."""

    async def _review(now: datetime) -> int:
        return await run_review(db, now)

    return _review
