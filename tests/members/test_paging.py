"""Keyset paging over the member list: stable under concurrent inserts, strict cursors."""

from __future__ import annotations

import base64
import json
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import insert, select

from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.kit.ids import new_public_id
from memberhub.members.models import Member
from tests.support import ApiClient

MEMBERS = "/api/v1/members"


async def bulk_insert_members(db: Database, count: int, *, status: str = "pending") -> list[str]:
    """Insert members straight into the table (fast), returning their ids in id order."""
    now = utcnow()
    rows = []
    for index in range(count):
        email = f"bulk{index}.{new_public_id('x', 8)}@example.com"
        rows.append(
            {
                "public_id": new_public_id("mem"),
                "email": email,
                "email_normalized": email,
                "first_name": f"Bulk{index}",
                "status": status,
                "custom_fields": {},
                "external_ids": {},
                "created_at": now,
                "updated_at": now,
            }
        )
    async with db.transaction() as session:
        await session.execute(insert(Member), rows)
        public_ids = await session.scalars(
            select(Member.public_id)
            .where(Member.public_id.in_([r["public_id"] for r in rows]))
            .order_by(Member.id)
        )
        return list(public_ids)


def _cursor(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


async def test_paging_returns_every_existing_member_exactly_once_despite_inserts(
    api: ApiClient, db: Database
) -> None:
    existing = await bulk_insert_members(db, 1000)
    assert len(existing) == 1000

    seen: list[str] = []
    inserted_meanwhile: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 37}
        if cursor is not None:
            params["cursor"] = cursor
        response = await api.get(MEMBERS, params=params)
        assert response.status_code == 200, response.text
        body = response.json()
        pages += 1
        assert len(body["data"]) <= 37
        seen += [m["id"] for m in body["data"]]
        pagination = body["pagination"]
        if not pagination["has_more"]:
            assert pagination["next_cursor"] is None
            break
        assert len(body["data"]) == 37
        cursor = pagination["next_cursor"]
        # Someone else keeps adding members while we page (stop so the walk terminates).
        if len(inserted_meanwhile) < 60:
            for _ in range(2):
                inserted_meanwhile.append((await api.create_member())["id"])

    counts = Counter(seen)
    duplicates = [member_id for member_id, n in counts.items() if n > 1]
    assert duplicates == []
    missing = set(existing) - counts.keys()
    assert missing == set()
    # Ordered by the stable key: the pre-existing members come first, in insertion order.
    assert seen[:1000] == existing
    # Members added meanwhile sort after every old one, so the walk meets each of them once.
    assert seen[1000:] == inserted_meanwhile
    assert pages >= 1000 // 37


async def test_paging_with_a_filter_keeps_the_filter_on_every_page(
    api: ApiClient, db: Database
) -> None:
    active = await bulk_insert_members(db, 120, status="active")
    await bulk_insert_members(db, 80, status="pending")
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 50, "status": "active"}
        if cursor:
            params["cursor"] = cursor
        body = (await api.get(MEMBERS, params=params)).json()
        assert {m["status"] for m in body["data"]} <= {"active"}
        seen += [m["id"] for m in body["data"]]
        cursor = body["pagination"]["next_cursor"]
        if cursor is None:
            break
    assert seen == active


async def test_the_default_page_is_fifty_and_limit_is_capped_at_five_hundred(
    api: ApiClient, db: Database
) -> None:
    await bulk_insert_members(db, 60)
    default = (await api.get(MEMBERS)).json()
    assert len(default["data"]) == 50
    assert default["pagination"]["has_more"] is True

    assert (await api.get(MEMBERS, params={"limit": 500})).status_code == 200
    for bad in (0, 501, -1):
        response = await api.get(MEMBERS, params={"limit": bad})
        assert response.status_code == 422
        assert response.json()["error"]["code"] == "VALIDATION_ERROR"


async def test_an_exactly_full_last_page_reports_no_more(api: ApiClient, db: Database) -> None:
    await bulk_insert_members(db, 10)
    body = (await api.get(MEMBERS, params={"limit": 10})).json()
    assert len(body["data"]) == 10
    assert body["pagination"] == {"next_cursor": None, "has_more": False}


@pytest.mark.parametrize(
    "cursor",
    [
        "not-a-cursor",
        "%%%",
        _cursor([1, 2]),
        _cursor({"after": "10"}),
        _cursor({"after": -1}),
        _cursor({"after": True}),
        _cursor({"after": 1.5}),
        _cursor({"before": 3}),
        _cursor(None),
    ],
    ids=[
        "garbage",
        "not-base64",
        "a-list",
        "string-id",
        "negative-id",
        "boolean-id",
        "float-id",
        "no-after",
        "null",
    ],
)
async def test_an_invalid_cursor_is_422(api: ApiClient, cursor: str) -> None:
    response = await api.get(MEMBERS, params={"cursor": cursor})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "INVALID_CURSOR"
    assert error["details"] == {"field": "cursor"}


async def test_a_cursor_past_the_largest_id_is_422_not_a_server_error(api: ApiClient) -> None:
    response = await api.get(MEMBERS, params={"cursor": _cursor({"after": 2**70})})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "INVALID_CURSOR"


async def test_a_cursor_at_the_largest_id_is_an_empty_last_page(api: ApiClient) -> None:
    await api.create_member()
    response = await api.get(MEMBERS, params={"cursor": _cursor({"after": 2**63 - 1})})
    assert response.status_code == 200, response.text
    assert response.json() == {"data": [], "pagination": {"next_cursor": None, "has_more": False}}


async def test_an_overlong_cursor_is_422(api: ApiClient) -> None:
    response = await api.get(MEMBERS, params={"cursor": "a" * 513})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "VALIDATION_ERROR"
