"""Helpers for the alert tests: ledger operations over HTTP and the jobs at a chosen time."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.kit.db import Database
from tests.support import ApiClient, unique

ALERTS = "/api/v1/alerts"
RunJob = Callable[[Callable[[AsyncSession, datetime], Awaitable[int]], datetime], Awaitable[int]]


@pytest.fixture
def run_job(db: Database) -> RunJob:
    """Run a `(session, now)` job once, in its own transaction, as of `now`."""

    async def _run(job: Callable[[AsyncSession, datetime], Awaitable[int]], now: datetime) -> int:
        async with db.transaction() as session:
            return await job(session, now)

    return _run


async def set_program(api: ApiClient, **fields: Any) -> dict[str, Any]:
    response = await api.patch("/api/v1/program", fields)
    assert response.status_code == 200, response.text
    return dict(response.json())


async def ledger(api: ApiClient, operation: str, body: dict[str, Any]) -> dict[str, Any]:
    response = await api.post(f"/api/v1/points/{operation}", body)
    assert response.status_code == 201, response.text
    return dict(response.json())


async def award(
    api: ApiClient, member_id: str, points: int, *, expires_at: datetime | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"member_id": member_id, "points": points, "reason": "Bonus"}
    if expires_at is not None:
        body["expires_at"] = expires_at.isoformat()
    return await ledger(api, "award", body)


async def redeem(api: ApiClient, member_id: str, points: int) -> dict[str, Any]:
    return await ledger(api, "redeem", {"member_id": member_id, "points": points})


async def earn(api: ApiClient, member_id: str, amount: int) -> dict[str, Any]:
    body = {"member_id": member_id, "amount": amount, "currency": "MYR"}
    return await ledger(api, "earn", {**body, "reference_id": unique("order-")})


async def reverse(
    api: ApiClient, member_id: str, transaction_id: str, points: int | None = None
) -> dict[str, Any]:
    body = {"member_id": member_id, "transaction_id": transaction_id, "points": points}
    return await ledger(api, "reverse", {**body, "reference_id": unique("refund-")})


async def alerts(api: ApiClient, **filters: Any) -> list[dict[str, Any]]:
    response = await api.get(ALERTS, {"limit": 500, **filters})
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


async def alert_events(api: ApiClient) -> list[dict[str, Any]]:
    response = await api.get("/api/v1/events", {"type": "alert.raised", "limit": 500})
    assert response.status_code == 200, response.text
    return [event["data"] for event in response.json()["data"]]


def mid_month_after(moment: datetime) -> datetime:
    """A moment a day or more after `moment`, on the 5th to the 25th of its month, so that
    it and the two days after it share one calendar month, and the first day of the next
    month is less than 30 days later (from the 2nd of a 31-day month it is 30 days)."""
    candidate = moment + timedelta(days=1)
    if candidate.day > 25:
        return (candidate.replace(day=1) + timedelta(days=32)).replace(day=5)
    if candidate.day < 5:
        return candidate.replace(day=5)
    return candidate


def first_of_next_month(moment: datetime) -> datetime:
    return (moment.replace(day=1) + timedelta(days=32)).replace(
        day=1, hour=0, minute=0, second=0, microsecond=0
    )
