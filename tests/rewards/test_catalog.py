"""The rewards catalog: create, read, change and list rewards, and what each refuses."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from memberhub.audit.models import AuditEntry
from memberhub.auth.roles import Role
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.rewards.models import Reward
from tests.conftest import issue_key
from tests.rewards.conftest import (
    REWARDS,
    award,
    cancel,
    claim,
    create_reward,
    error_code,
    get_reward,
    make_tier,
    set_member_tier,
)
from tests.support import ApiClient


def at(days: float) -> str:
    return (utcnow() + timedelta(days=days)).isoformat()


async def reward_count(db: Database) -> int:
    async with db.transaction(read_only=True) as session:
        return int(await session.scalar(select(func.count()).select_from(Reward)) or 0)


async def audit_actions(db: Database, object_id: str) -> list[tuple[str, dict[str, Any]]]:
    async with db.transaction(read_only=True) as session:
        rows = await session.execute(
            select(AuditEntry.action, AuditEntry.changes)
            .where(AuditEntry.object_id == object_id)
            .order_by(AuditEntry.id)
        )
        return [(action, changes) for action, changes in rows]


async def test_create_returns_the_reward_with_its_stock_and_no_claims(
    api: ApiClient, db: Database
) -> None:
    await make_tier(db, "GOLD", 1)
    body = {
        "code": "COFFEE",
        "name": "Free coffee",
        "description": "One cup",
        "points_cost": 250,
        "stock": 10,
        "per_member_limit": 2,
        "tier_codes": ["GOLD"],
        "valid_from": at(-1),
        "valid_until": at(30),
    }
    response = await api.post(REWARDS, body)
    assert response.status_code == 201, response.text
    reward = response.json()
    assert reward["id"].startswith("rwd_")
    assert reward["stock"] == 10
    assert reward["claims_count"] == 0
    assert reward["tier_codes"] == ["GOLD"]
    assert reward["active"] is True
    assert await get_reward(api, reward["id"]) == reward
    [(action, changes)] = await audit_actions(db, reward["id"])
    assert action == "reward.create"
    assert changes["points_cost"] == {"before": None, "after": 250}


async def test_reward_codes_are_unique(api: ApiClient, db: Database) -> None:
    await create_reward(api, code="MUG")
    response = await api.post(REWARDS, {"code": "MUG", "name": "Mug", "points_cost": 5})
    assert response.status_code == 409
    assert error_code(response) == "DUPLICATE_REWARD_CODE"
    assert await reward_count(db) == 1


@pytest.mark.parametrize(
    "fields",
    [
        {"points_cost": 0},
        {"points_cost": -5},
        {"points_cost": 10**13},
        {"stock": -1},
        {"stock": 2**31},
        {"per_member_limit": 0},
        {"valid_from": "2030-01-02T00:00:00Z", "valid_until": "2030-01-01T00:00:00Z"},
        {"valid_from": "2030-01-01T00:00:00Z", "valid_until": "2030-01-01T00:00:00Z"},
        {"code": "has space"},
        {"code": ""},
        {"name": ""},
        {"name": "x" * 201},
        {"description": "x" * 1001},
        {"tier_codes": "GOLD"},
        {"tier_codes": ["not a code"]},
        {"unknown_field": 1},
    ],
    ids=lambda fields: ",".join(fields),
)
async def test_create_rejects_invalid_values(
    api: ApiClient, db: Database, fields: dict[str, Any]
) -> None:
    body = {"code": "R1", "name": "Reward", "points_cost": 10, **fields}
    response = await api.post(REWARDS, body)
    assert response.status_code == 422, response.text
    assert error_code(response) == "VALIDATION_ERROR"
    assert await reward_count(db) == 0


async def test_tier_codes_must_name_existing_tiers(api: ApiClient, db: Database) -> None:
    await make_tier(db, "GOLD", 1)
    response = await api.post(
        REWARDS,
        {"code": "R1", "name": "R", "points_cost": 10, "tier_codes": ["GOLD", "ONYX", "JADE"]},
    )
    assert response.status_code == 422
    assert error_code(response) == "UNKNOWN_TIER_CODES"
    assert response.json()["error"]["details"]["unknown_tier_codes"] == ["JADE", "ONYX"]
    assert await reward_count(db) == 0


async def test_keys_bound_to_an_organisation_cannot_change_the_catalog(
    api: ApiClient, db: Database
) -> None:
    reward = await create_reward(api)
    org = await api.create_organisation()
    chapter_admin = api.with_key(await issue_key(db, Role.ADMIN, organisation=org["id"]))
    response = await chapter_admin.post(REWARDS, {"code": "X", "name": "X", "points_cost": 1})
    assert response.status_code == 403
    response = await chapter_admin.patch(f"{REWARDS}/{reward['id']}", {"points_cost": 1})
    assert response.status_code == 403
    assert (await get_reward(api, reward["id"]))["points_cost"] == reward["points_cost"]
    # Reading the catalog is not restricted by organisation.
    assert (await chapter_admin.get(f"{REWARDS}/{reward['id']}")).status_code == 200


@pytest.mark.parametrize("role", [Role.MANAGER, Role.SUPPORT_AGENT, Role.INTEGRATION])
async def test_only_admins_write_the_catalog_but_every_role_reads_it(
    api: ApiClient, db: Database, role: Role
) -> None:
    reward = await create_reward(api)
    client = api.with_key(await issue_key(db, role))
    response = await client.post(REWARDS, {"code": "X", "name": "X", "points_cost": 1})
    assert response.status_code == 403
    assert (await client.patch(f"{REWARDS}/{reward['id']}", {"name": "Y"})).status_code == 403
    listed = await client.get(REWARDS)
    assert [r["id"] for r in listed.json()["data"]] == [reward["id"]]


async def test_patch_changes_only_the_fields_sent_and_audits_them(
    api: ApiClient, db: Database
) -> None:
    reward = await create_reward(api, name="Mug", points_cost=100, stock=5, description="Blue")
    response = await api.patch(f"{REWARDS}/{reward['id']}", {"name": "Big mug", "points_cost": 150})
    assert response.status_code == 200, response.text
    changed = response.json()
    assert (changed["name"], changed["points_cost"]) == ("Big mug", 150)
    assert (changed["stock"], changed["description"], changed["code"]) == (
        5,
        "Blue",
        reward["code"],
    )
    assert changed["updated_at"] > reward["updated_at"]
    actions = await audit_actions(db, reward["id"])
    assert actions[-1] == (
        "reward.update",
        {
            "name": {"before": "Mug", "after": "Big mug"},
            "points_cost": {"before": 100, "after": 150},
        },
    )


async def test_patch_sets_stock_absolutely_and_null_makes_it_unlimited(api: ApiClient) -> None:
    reward = await create_reward(api, stock=5)
    response = await api.patch(f"{REWARDS}/{reward['id']}", {"stock": 40})
    assert response.json()["stock"] == 40
    response = await api.patch(f"{REWARDS}/{reward['id']}", {"stock": None})
    assert response.status_code == 200
    assert response.json()["stock"] is None
    response = await api.patch(f"{REWARDS}/{reward['id']}", {"stock": 0})
    assert response.json()["stock"] == 0


async def test_patch_checks_the_window_against_the_stored_dates(api: ApiClient) -> None:
    reward = await create_reward(api, valid_from=at(1), valid_until=at(10))
    response = await api.patch(f"{REWARDS}/{reward['id']}", {"valid_until": at(0.5)})
    assert response.status_code == 422
    assert error_code(response) == "VALIDATION_ERROR"
    assert (await get_reward(api, reward["id"]))["valid_until"] == reward["valid_until"]
    response = await api.patch(f"{REWARDS}/{reward['id']}", {"valid_from": None})
    assert response.status_code == 200
    assert response.json()["valid_from"] is None


@pytest.mark.parametrize(
    "body",
    [
        {"name": None},
        {"points_cost": None},
        {"tier_codes": None},
        {"active": None},
        {"points_cost": 0},
        {"stock": -1},
        {"code": "RENAMED"},
        {"tier_codes": ["NOPE"]},
    ],
    ids=lambda body: ",".join(f"{k}={v}" for k, v in body.items()),
)
async def test_patch_rejects_invalid_changes(api: ApiClient, body: dict[str, Any]) -> None:
    reward = await create_reward(api, stock=3)
    response = await api.patch(f"{REWARDS}/{reward['id']}", body)
    assert response.status_code == 422, response.text
    assert await get_reward(api, reward["id"]) == reward


async def test_patch_tier_codes_replaces_the_restriction(api: ApiClient, db: Database) -> None:
    await make_tier(db, "GOLD", 1)
    await make_tier(db, "SILVER", 2)
    reward = await create_reward(api, tier_codes=["GOLD"])
    response = await api.patch(f"{REWARDS}/{reward['id']}", {"tier_codes": ["SILVER", "SILVER"]})
    assert response.json()["tier_codes"] == ["SILVER"]
    response = await api.patch(f"{REWARDS}/{reward['id']}", {"tier_codes": []})
    assert response.json()["tier_codes"] == []


async def test_unknown_or_malformed_reward_ids_are_not_found_or_invalid(api: ApiClient) -> None:
    response = await api.get(f"{REWARDS}/rwd_doesnotexist")
    assert response.status_code == 404
    assert error_code(response) == "REWARD_NOT_FOUND"
    assert (await api.patch(f"{REWARDS}/rwd_doesnotexist", {"name": "x"})).status_code == 404
    assert (await api.get(f"{REWARDS}/not-an-id")).status_code == 422


async def test_list_filters_by_active_and_pages_by_id(api: ApiClient) -> None:
    rewards = [await create_reward(api, active=n % 2 == 0) for n in range(5)]
    first = await api.get(REWARDS, params={"limit": 2})
    page = first.json()
    assert [r["id"] for r in page["data"]] == [r["id"] for r in rewards[:2]]
    assert page["pagination"]["has_more"] is True
    rest = await api.get(REWARDS, params={"limit": 10, "cursor": page["pagination"]["next_cursor"]})
    assert [r["id"] for r in rest.json()["data"]] == [r["id"] for r in rewards[2:]]
    active = await api.get(REWARDS, params={"active": "true"})
    assert [r["id"] for r in active.json()["data"]] == [rewards[i]["id"] for i in (0, 2, 4)]
    inactive = await api.get(REWARDS, params={"active": "false"})
    assert [r["id"] for r in inactive.json()["data"]] == [rewards[i]["id"] for i in (1, 3)]


async def test_claims_count_and_stock_follow_claims_and_cancellations(api: ApiClient) -> None:
    member = await api.create_member()
    await award(api, member["id"], 1000)
    reward = await create_reward(api, points_cost=100, stock=3)
    first = await claim(api, reward["id"], member["id"])
    await claim(api, reward["id"], member["id"])
    shown = await get_reward(api, reward["id"])
    assert (shown["stock"], shown["claims_count"]) == (1, 2)
    await cancel(api, first["claim"]["id"])
    shown = await get_reward(api, reward["id"])
    assert (shown["stock"], shown["claims_count"]) == (2, 1)


async def test_available_for_lists_only_what_the_member_could_claim_now(
    api: ApiClient, db: Database
) -> None:
    await make_tier(db, "GOLD", 1)
    await make_tier(db, "SILVER", 2)
    member = await api.create_member()
    # 500 left once the LIMITED claim below has taken its 1 point.
    await award(api, member["id"], 501)
    await set_member_tier(db, member["id"], "SILVER")
    claimable = [
        await create_reward(api, code="PLAIN", points_cost=100),
        await create_reward(api, code="FOR_SILVER", points_cost=100, tier_codes=["SILVER"]),
        await create_reward(api, code="IN_WINDOW", valid_from=at(-1), valid_until=at(1)),
        await create_reward(api, code="LAST_UNIT", stock=1),
        await create_reward(api, code="EXACTLY_AFFORDABLE", points_cost=500),
    ]
    await create_reward(api, code="INACTIVE", active=False)
    await create_reward(api, code="FOR_GOLD", tier_codes=["GOLD"])
    await create_reward(api, code="NOT_YET", valid_from=at(1))
    await create_reward(api, code="OVER", valid_from=at(-2), valid_until=at(-1))
    await create_reward(api, code="SOLD_OUT", stock=0)
    await create_reward(api, code="TOO_DEAR", points_cost=501)
    limited = await create_reward(api, code="LIMITED", points_cost=1, per_member_limit=1)
    await claim(api, limited["id"], member["id"])

    response = await api.get(REWARDS, params={"available_for": member["id"]})
    assert response.status_code == 200, response.text
    assert [r["code"] for r in response.json()["data"]] == [r["code"] for r in claimable]

    # Paged, the same rewards come out in the same order.
    seen: list[str] = []
    cursor = None
    while True:
        params = {
            "available_for": member["id"],
            "limit": 2,
            **({"cursor": cursor} if cursor else {}),
        }
        page = (await api.get(REWARDS, params=params)).json()
        seen += [r["code"] for r in page["data"]]
        cursor = page["pagination"]["next_cursor"]
        if not page["pagination"]["has_more"]:
            break
    assert seen == [r["code"] for r in claimable]


async def test_available_for_a_member_the_key_cannot_see_is_not_found(
    api: ApiClient, db: Database
) -> None:
    org, other = await api.create_organisation(), await api.create_organisation()
    member = await api.create_member(organisation_id=other["id"])
    chapter_key = api.with_key(await issue_key(db, Role.MANAGER, organisation=org["id"]))
    response = await chapter_key.get(REWARDS, params={"available_for": member["id"]})
    assert response.status_code == 404
    assert error_code(response) == "MEMBER_NOT_FOUND"
