"""Tier definitions through the HTTP API: create, list by rank, read, change, delete."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from memberhub.auth.roles import Role
from memberhub.kit.db import Database
from memberhub.tiers import service as tiers_service
from memberhub.tiers.repository import TierRepository
from tests.conftest import issue_key
from tests.support import ApiClient
from tests.tiers.conftest import TIERS, assign, create_tier, tier_body


async def tier_codes(api: ApiClient, **params: Any) -> list[str]:
    response = await api.get(TIERS, params={"limit": 500, **params})
    assert response.status_code == 200, response.text
    return [t["code"] for t in response.json()["data"]]


async def audit_actions(api: ApiClient, object_id: str) -> list[str]:
    response = await api.get("/api/v1/audit", params={"object_id": object_id, "limit": 500})
    assert response.status_code == 200, response.text
    return [e["action"] for e in response.json()["data"]]


async def test_create_returns_the_tier_with_a_tir_id_and_defaults(api: ApiClient) -> None:
    response = await api.post(
        TIERS, {"code": "GOLD", "name": "Gold", "rank": 30, "threshold": 5000}
    )

    assert response.status_code == 201, response.text
    tier = response.json()
    assert tier["id"].startswith("tir_")
    assert tier == {
        "id": tier["id"],
        "code": "GOLD",
        "name": "Gold",
        "rank": 30,
        "threshold": 5000,
        "basis": "lifetime_earned",
        "window_days": None,
        "downgrade_policy": "never",
        "earn_multiplier_percent": 100,
        "benefits": [],
        "active": True,
        "created_at": tier["created_at"],
        "updated_at": tier["updated_at"],
    }
    assert (await api.get(f"{TIERS}/{tier['id']}")).json() == tier


async def test_create_keeps_rolling_window_policy_multiplier_and_benefits(api: ApiClient) -> None:
    tier = await create_tier(
        api,
        code="SILVER",
        basis="rolling_earned",
        window_days=365,
        downgrade_policy="one_step",
        earn_multiplier_percent=125,
        benefits=["Free shipping", "Lounge access"],
    )

    assert tier["basis"] == "rolling_earned"
    assert tier["window_days"] == 365
    assert tier["downgrade_policy"] == "one_step"
    assert tier["earn_multiplier_percent"] == 125
    assert tier["benefits"] == ["Free shipping", "Lounge access"]


async def test_list_is_ordered_by_rank_and_paged(api: ApiClient) -> None:
    for code, rank in (("GOLD", 30), ("BRONZE", 10), ("SILVER", 20)):
        await create_tier(api, code=code, rank=rank)

    first = await api.get(TIERS, params={"limit": 2})
    assert [t["code"] for t in first.json()["data"]] == ["BRONZE", "SILVER"]
    assert first.json()["pagination"]["has_more"] is True
    second = await api.get(
        TIERS, params={"limit": 2, "cursor": first.json()["pagination"]["next_cursor"]}
    )
    assert [t["code"] for t in second.json()["data"]] == ["GOLD"]
    assert second.json()["pagination"] == {"next_cursor": None, "has_more": False}


async def test_list_filters_by_active(api: ApiClient) -> None:
    await create_tier(api, code="BRONZE", rank=1)
    await create_tier(api, code="OLD", rank=2, active=False)

    assert await tier_codes(api, active="true") == ["BRONZE"]
    assert await tier_codes(api, active="false") == ["OLD"]
    assert await tier_codes(api) == ["BRONZE", "OLD"]


async def test_unknown_tier_is_404(api: ApiClient) -> None:
    for response in (
        await api.get(f"{TIERS}/tir_doesnotexist"),
        await api.patch(f"{TIERS}/tir_doesnotexist", {"name": "X"}),
        await api.delete(f"{TIERS}/tir_doesnotexist"),
    ):
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "TIER_NOT_FOUND"


async def test_codes_and_ranks_are_unique(api: ApiClient) -> None:
    gold = await create_tier(api, code="GOLD", rank=30)
    await create_tier(api, code="SILVER", rank=20)

    same_code = await api.post(TIERS, tier_body(code="GOLD", rank=40))
    assert same_code.status_code == 409
    assert same_code.json()["error"]["code"] == "DUPLICATE_TIER_CODE"
    same_rank = await api.post(TIERS, tier_body(code="PLATINUM", rank=30))
    assert same_rank.status_code == 409
    assert same_rank.json()["error"]["code"] == "DUPLICATE_TIER_RANK"
    moved_onto_silver = await api.patch(f"{TIERS}/{gold['id']}", {"rank": 20})
    assert moved_onto_silver.status_code == 409
    assert moved_onto_silver.json()["error"]["code"] == "DUPLICATE_TIER_RANK"
    assert await tier_codes(api) == ["SILVER", "GOLD"]


async def test_a_rank_taken_between_the_check_and_the_insert_is_named(
    api: ApiClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two creates at once both pass the service's own check; the database's constraint
    # refuses the second, and the answer still names what conflicts.
    await create_tier(api, code="GOLD", rank=30)

    async def no_check(*_args: object, **_kwargs: object) -> None:
        return None

    monkeypatch.setattr(tiers_service, "_check_rank_free", no_check)
    monkeypatch.setattr(tiers_service.TierRepository, "get_by_code", no_check)
    same_rank = await api.post(TIERS, tier_body(code="PLATINUM", rank=30))
    same_code = await api.post(TIERS, tier_body(code="GOLD", rank=40))

    assert same_rank.status_code == 409, same_rank.text
    assert same_rank.json()["error"]["code"] == "DUPLICATE_TIER_RANK"
    assert same_code.status_code == 409, same_code.text
    assert same_code.json()["error"]["code"] == "DUPLICATE_TIER_CODE"
    assert await tier_codes(api) == ["GOLD"]


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"code": "has space"}, id="code-pattern"),
        pytest.param({"code": "x" * 51}, id="code-too-long"),
        pytest.param({"name": ""}, id="empty-name"),
        pytest.param({"rank": -1}, id="negative-rank"),
        pytest.param({"threshold": -1}, id="negative-threshold"),
        pytest.param({"threshold": 2**40}, id="threshold-too-large"),
        pytest.param({"basis": "rolling_earned"}, id="rolling-without-window"),
        pytest.param({"window_days": 30}, id="window-without-rolling"),
        pytest.param({"basis": "rolling_earned", "window_days": 0}, id="window-zero"),
        pytest.param({"basis": "points_from_mars"}, id="unknown-basis"),
        pytest.param({"downgrade_policy": "sometimes"}, id="unknown-policy"),
        pytest.param({"earn_multiplier_percent": -1}, id="negative-multiplier"),
        pytest.param({"earn_multiplier_percent": 1001}, id="multiplier-too-large"),
        pytest.param({"benefits": ["x"] * 51}, id="too-many-benefits"),
        pytest.param({"benefits": ["x" * 201]}, id="benefit-too-long"),
        pytest.param({"benefits": [""]}, id="empty-benefit"),
        pytest.param({"benefits": "Free coffee"}, id="benefits-not-a-list"),
        pytest.param({"colour": "gold"}, id="unknown-field"),
    ],
)
async def test_invalid_definitions_are_422_and_store_nothing(
    api: ApiClient, fields: dict[str, Any]
) -> None:
    response = await api.post(TIERS, tier_body(**fields))

    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "VALIDATION_ERROR"
    assert await tier_codes(api) == []


async def test_patch_changes_the_given_fields_only(api: ApiClient) -> None:
    tier = await create_tier(api, code="GOLD", name="Gold", rank=30, threshold=5000)

    response = await api.patch(
        f"{TIERS}/{tier['id']}",
        {
            "name": "Gold+",
            "threshold": 6000,
            "benefits": ["Lounge"],
            "downgrade_policy": "one_step",
        },
    )

    assert response.status_code == 200, response.text
    changed = response.json()
    assert (changed["name"], changed["threshold"], changed["benefits"]) == (
        "Gold+",
        6000,
        ["Lounge"],
    )
    assert changed["downgrade_policy"] == "one_step"
    assert (changed["code"], changed["rank"], changed["basis"]) == ("GOLD", 30, "lifetime_earned")
    assert (await api.get(f"{TIERS}/{tier['id']}")).json() == changed


async def test_patch_keeps_window_days_with_the_rolling_basis_only(api: ApiClient) -> None:
    tier = await create_tier(api, code="GOLD")
    path = f"{TIERS}/{tier['id']}"

    needs_window = await api.patch(path, {"basis": "rolling_earned"})
    assert needs_window.status_code == 422, needs_window.text
    window_alone = await api.patch(path, {"window_days": 90})
    assert window_alone.status_code == 422, window_alone.text
    rolling = await api.patch(path, {"basis": "rolling_earned", "window_days": 90})
    assert rolling.status_code == 200, rolling.text
    assert (rolling.json()["basis"], rolling.json()["window_days"]) == ("rolling_earned", 90)
    dropped = await api.patch(path, {"window_days": None})
    assert dropped.status_code == 422, dropped.text
    back = await api.patch(path, {"basis": "current_balance"})
    assert back.status_code == 200, back.text
    assert (back.json()["basis"], back.json()["window_days"]) == ("current_balance", None)


async def test_code_cannot_be_changed(api: ApiClient) -> None:
    tier = await create_tier(api, code="GOLD")

    response = await api.patch(f"{TIERS}/{tier['id']}", {"code": "PLATINUM"})

    assert response.status_code == 422, response.text
    assert await tier_codes(api) == ["GOLD"]


async def test_a_tier_nobody_holds_can_be_deleted(api: ApiClient) -> None:
    tier = await create_tier(api, code="GOLD")

    response = await api.delete(f"{TIERS}/{tier['id']}")

    assert response.status_code == 204, response.text
    assert (await api.get(f"{TIERS}/{tier['id']}")).status_code == 404


async def test_a_tier_a_member_holds_is_deactivated_not_deleted(api: ApiClient) -> None:
    tier = await create_tier(api, code="GOLD")
    member = await api.create_member()
    await assign(api, member["id"], "GOLD")

    refused = await api.delete(f"{TIERS}/{tier['id']}")
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "TIER_IN_USE"
    deactivated = await api.patch(f"{TIERS}/{tier['id']}", {"active": False})
    assert deactivated.status_code == 200, deactivated.text
    assert deactivated.json()["active"] is False


async def test_a_tier_a_reward_is_limited_to_is_not_deleted(api: ApiClient) -> None:
    tier = await create_tier(api, code="GOLD")
    reward = {"code": "LOUNGE", "name": "Lounge pass", "points_cost": 100, "tier_codes": ["GOLD"]}
    created = await api.post("/api/v1/rewards", reward)
    assert created.status_code == 201, created.text

    refused = await api.delete(f"{TIERS}/{tier['id']}")
    assert refused.status_code == 409, refused.text
    error = refused.json()["error"]
    assert error["code"] == "TIER_IN_USE"
    assert error["details"] == {"code": "GOLD", "rewards": ["LOUNGE"]}
    assert (await api.get(f"{TIERS}/{tier['id']}")).status_code == 200

    freed = await api.patch(f"/api/v1/rewards/{created.json()['id']}", {"tier_codes": []})
    assert freed.status_code == 200, freed.text
    assert (await api.delete(f"{TIERS}/{tier['id']}")).status_code == 204


async def test_a_reward_limited_to_a_tier_being_deleted_never_outlives_it(
    api: ApiClient, db: Database, is_postgres: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reward is created between the deletion's check for rewards limited to the tier
    and its delete: it waits for the deletion, then finds the tier gone."""
    if not is_postgres:
        pytest.skip("SQLite runs one writer at a time: nothing comes between")
    tier = await create_tier(api, code="GOLD")
    checked = TierRepository.rewards_limited_to
    creating: list[asyncio.Task[httpx.Response]] = []

    async def create_meanwhile(self: TierRepository, code: str) -> list[str]:
        found = await checked(self, code)
        body = {"code": "LOUNGE", "name": "Lounge", "points_cost": 100, "tier_codes": ["GOLD"]}
        creating.append(asyncio.create_task(api.post("/api/v1/rewards", body)))
        # On until the creation is done, or waits on a lock (the deletion's).
        while not creating[0].done():
            if await _someone_waits(db):  # (a query: the creation runs meanwhile)
                break
        return found

    monkeypatch.setattr(TierRepository, "rewards_limited_to", create_meanwhile)
    deleted = await api.delete(f"{TIERS}/{tier['id']}")
    created = await creating[0]
    outcome = (deleted.status_code, created.status_code)
    assert outcome in ((204, 422), (409, 201)), (outcome, created.text)
    if deleted.status_code == 204:
        assert created.json()["error"]["code"] == "UNKNOWN_TIER_CODES"
        assert (await api.get("/api/v1/rewards")).json()["data"] == []


@pytest.mark.parametrize("how", ["earned", "assigned"])
async def test_a_member_moved_into_a_tier_being_deleted_never_holds_a_tier_that_is_gone(
    api: ApiClient, db: Database, is_postgres: bool, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """The member reaches the tier (an award past its threshold, or a manual assignment)
    between the deletion's check that nobody holds it and its delete: either the deletion
    waits and then refuses, or it went first and the member stays out of the tier."""
    if not is_postgres:
        pytest.skip("SQLite runs one writer at a time: nothing comes between")
    tier = await create_tier(api, code="GOLD", threshold=100)
    member = await api.create_member()
    checked = TierRepository.is_held
    moving: list[asyncio.Task[httpx.Response]] = []

    async def move_meanwhile(self: TierRepository, code: str) -> bool:
        held = await checked(self, code)
        if how == "earned":
            body = {"member_id": member["id"], "points": 150, "reason": "Test"}
            moving.append(asyncio.create_task(api.post("/api/v1/points/award", body)))
        else:
            body = {"member_id": member["id"], "tier_code": "GOLD", "reason": "Goodwill"}
            moving.append(asyncio.create_task(api.post(f"{TIERS}/assign", body)))
        while not moving[0].done():
            if await _someone_waits(db):
                break
        return held

    monkeypatch.setattr(TierRepository, "is_held", move_meanwhile)
    deleted = await api.delete(f"{TIERS}/{tier['id']}")
    moved = await moving[0]
    monkeypatch.undo()
    now_in = (await api.get(f"/api/v1/members/{member['id']}")).json()["tier"]
    tiers = {t["code"] for t in (await api.get(TIERS)).json()["data"]}
    assert now_in is None or now_in in tiers, (deleted.status_code, moved.text)
    if deleted.status_code == 204:
        assert now_in is None
        if how == "assigned":
            assert moved.status_code == 404, moved.text
            assert moved.json()["error"]["code"] == "TIER_NOT_FOUND"
        else:
            assert moved.status_code == 201, moved.text
    else:
        assert deleted.status_code == 409, deleted.text
        assert moved.status_code in (200, 201), moved.text
        assert now_in == "GOLD"


async def _someone_waits(db: Database) -> bool:
    async with db.transaction(read_only=True) as session:
        return bool(await session.scalar(text("SELECT count(*) FROM pg_locks WHERE NOT granted")))


async def test_every_write_is_audited(api: ApiClient) -> None:
    tier = await create_tier(api, code="GOLD")
    await api.patch(f"{TIERS}/{tier['id']}", {"threshold": 999})
    await api.patch(f"{TIERS}/{tier['id']}", {"threshold": 999})  # no change, nothing to audit
    await api.delete(f"{TIERS}/{tier['id']}")

    assert sorted(await audit_actions(api, tier["id"])) == [
        "tier.create",
        "tier.delete",
        "tier.update",
    ]


async def test_only_admins_define_tiers_but_every_role_reads_them(
    api: ApiClient, db: Database
) -> None:
    tier = await create_tier(api, code="GOLD")
    for role in (Role.MANAGER, Role.SUPPORT_AGENT, Role.INTEGRATION):
        other = api.with_key(await issue_key(db, role))
        assert (await other.get(f"{TIERS}/{tier['id']}")).status_code == 200
        for response in (
            await other.post(TIERS, tier_body(code="NEW", rank=99)),
            await other.patch(f"{TIERS}/{tier['id']}", {"name": "Mine"}),
            await other.delete(f"{TIERS}/{tier['id']}"),
        ):
            assert response.status_code == 403, response.text
    assert await tier_codes(api) == ["GOLD"]


async def test_an_admin_key_bound_to_an_organisation_cannot_define_tiers(
    api: ApiClient, db: Database
) -> None:
    org = await api.create_organisation()
    tier = await create_tier(api, code="GOLD")
    bound = api.with_key(await issue_key(db, Role.ADMIN, organisation=org["id"]))

    for response in (
        await bound.post(TIERS, tier_body(code="NEW", rank=99)),
        await bound.patch(f"{TIERS}/{tier['id']}", {"name": "Mine"}),
        await bound.delete(f"{TIERS}/{tier['id']}"),
    ):
        assert response.status_code == 403, response.text
    assert (await bound.get(TIERS)).status_code == 200
    assert await tier_codes(api) == ["GOLD"]
