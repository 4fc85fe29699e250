"""Helpers shared by tests: an authenticated client and small data builders."""

from __future__ import annotations

import asyncio
import itertools
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from memberhub.kit.db import Database

_counter = itertools.count(1)


async def shortened_sleep(seconds: float) -> None:
    """Gateway retry backoffs and Retry-After waits at a twentieth: a vendor's 5xx or 429
    answers cost the test seconds of waiting otherwise. What is waited for, and how often,
    is unchanged (rate limits keep real time)."""
    await asyncio.sleep(seconds / 20)


def unique(prefix: str = "x") -> str:
    return f"{prefix}{next(_counter)}"


async def age_the_feed(db: Database, days: int = 91) -> None:
    """Every event now occurred `days` ago and was dispatched: by default just past the
    default retention (90 days), so that a purge keeps only what something still holds."""
    from datetime import timedelta

    from sqlalchemy import update

    from memberhub.events.models import Event
    from memberhub.kit.clock import utcnow

    async with db.transaction() as session:
        await session.execute(
            update(Event).values(
                occurred_at=utcnow() - timedelta(days=days), dispatched_at=utcnow()
            )
        )


class ApiClient:
    """Wraps an httpx client with a bearer key; returns raw responses for assertions."""

    def __init__(self, http: httpx.AsyncClient, key: str) -> None:
        self.http = http
        self.key = key

    def with_key(self, key: str) -> ApiClient:
        return ApiClient(self.http, key)

    def _headers(self, extra: dict[str, str] | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}", **(extra or {})}

    async def get(
        self, path: str, params: Any = None, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        return await self.http.get(path, params=params, headers=self._headers(headers))

    async def post(
        self, path: str, json: Any = None, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        return await self.http.post(path, json=json, headers=self._headers(headers))

    async def patch(
        self, path: str, json: Any = None, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        return await self.http.patch(path, json=json, headers=self._headers(headers))

    async def delete(self, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
        return await self.http.delete(path, headers=self._headers(headers))

    # Builders: each asserts success, so a failing precondition fails loudly.

    async def create_organisation(
        self, parent_id: str | None = None, **fields: Any
    ) -> dict[str, Any]:
        slug = fields.pop("slug", unique("org-"))
        body = {"name": fields.pop("name", slug.title()), "slug": slug, "parent_id": parent_id}
        response = await self.post("/api/v1/organisations", {**body, **fields})
        assert response.status_code == 201, response.text
        return dict(response.json())

    async def create_member(self, **fields: Any) -> dict[str, Any]:
        body = {"email": fields.pop("email", f"{unique('m')}@example.com"), **fields}
        response = await self.post("/api/v1/members", body)
        assert response.status_code == 201, response.text
        return dict(response.json())

    async def create_plan(self, **fields: Any) -> dict[str, Any]:
        body = {
            "code": fields.pop("code", unique("PLAN")),
            "name": fields.pop("name", "Standard"),
            "term_months": fields.pop("term_months", 12),
            "price_amount": fields.pop("price_amount", 12000),
            "currency": fields.pop("currency", "MYR"),
            **fields,
        }
        response = await self.post("/api/v1/plans", body)
        assert response.status_code == 201, response.text
        return dict(response.json())
