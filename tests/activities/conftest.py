"""Helpers for the activity and earning rule tests: requests through the API."""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta
from typing import Any

from memberhub.kit.clock import utcnow
from tests.support import ApiClient

ACTIVITIES = "/api/v1/activities"
RULES = "/api/v1/earning-rules"
_source_ids = itertools.count(1)


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def activity_body(
    member: dict[str, Any] | None = None,
    *,
    type: str = "booking.completed",
    occurred_at: datetime | None = None,
    source: str = "booking-system",
    source_id: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": type,
        "occurred_at": iso(occurred_at or utcnow() - timedelta(minutes=1)),
        "source": source,
        "source_id": source_id or f"S-{next(_source_ids)}",
        **fields,
    }
    if member is not None and not {"member_id", "email", "external_id"} & set(fields):
        body["member_id"] = member["id"]
    return body


async def record(api: ApiClient, body: dict[str, Any], expect: int = 201) -> dict[str, Any]:
    response = await api.post(ACTIVITIES, body)
    assert response.status_code == expect, response.text
    return dict(response.json())


async def create_rule(api: ApiClient, **fields: Any) -> dict[str, Any]:
    body = {
        "name": fields.pop("name", "A rule"),
        "effect": fields.pop("effect", {"type": "fixed_points", "points": 100}),
        **fields,
    }
    response = await api.post(RULES, body)
    assert response.status_code == 201, response.text
    return dict(response.json())


def on_type(activity_type: str) -> dict[str, Any]:
    return {"field": "activity.type", "op": "eq", "value": activity_type}


async def balance(api: ApiClient, member_id: str) -> int:
    response = await api.get(f"/api/v1/members/{member_id}/points")
    assert response.status_code == 200, response.text
    return int(response.json()["current_balance"])


async def transactions(api: ApiClient, member_id: str, **params: Any) -> list[dict[str, Any]]:
    response = await api.get(f"/api/v1/members/{member_id}/points/transactions", params=params)
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


def noon_yesterday() -> datetime:
    """A time well inside one day, week-independent enough for day and month windows."""
    return (utcnow() - timedelta(days=1)).replace(hour=12, minute=0, second=0, microsecond=0)
