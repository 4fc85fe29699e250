"""Claiming rewards and cancelling claims through the HTTP API.

A claim redeems the reward's points and takes one unit of stock together; every refusal
writes nothing. Cancelling refunds the points and gives the unit back.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from memberhub.auth.roles import Role
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.points.models import PointTransaction
from tests.conftest import issue_key
from tests.rewards.conftest import (
    CLAIMS,
    REWARDS,
    award,
    balance,
    cancel,
    claim,
    create_reward,
    database_state,
    error_code,
    get_reward,
    make_tier,
    set_member_tier,
)
from tests.support import ApiClient


def at(days: float) -> str:
    return (utcnow() + timedelta(days=days)).isoformat()


async def events(api: ApiClient, member_id: str, event_type: str) -> list[dict[str, Any]]:
    response = await api.get(
        "/api/v1/events", params={"type": event_type, "member_id": member_id, "limit": 500}
    )
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


@pytest.fixture
async def member(api: ApiClient) -> dict[str, Any]:
    created = await api.create_member()
    await award(api, created["id"], 1000)
    return created


# ---------------------------------------------------------------- claiming


async def test_claim_redeems_the_points_takes_a_unit_and_emits_reward_claimed(
    api: ApiClient, member: dict[str, Any], db: Database
) -> None:
    reward = await create_reward(api, code="COFFEE", points_cost=300, stock=4)
    result = await claim(api, reward["id"], member["id"])

    made = result["claim"]
    assert made["id"].startswith("clm_")
    assert (made["reward_id"], made["reward_code"], made["member_id"]) == (
        reward["id"],
        "COFFEE",
        member["id"],
    )
    assert (made["status"], made["points"], made["refund_transaction_id"]) == ("claimed", 300, None)
    assert result["balance"]["current_balance"] == 700
    assert result["balance"]["lifetime_redeemed"] == 300
    assert result["replayed"] is False
    assert await balance(api, member["id"]) == 700
    assert (await get_reward(api, reward["id"]))["stock"] == 3

    async with db.transaction(read_only=True) as session:
        txn = await session.scalar(
            select(PointTransaction).where(PointTransaction.public_id == made["transaction_id"])
        )
        assert txn is not None
        assert (txn.type, txn.points, txn.reason) == ("redeem", -300, "Reward COFFEE")
        assert txn.details["reward_id"] == reward["id"]
        assert txn.details["claim_id"] == made["id"]

    [event] = await events(api, member["id"], "reward.claimed")
    assert event["data"] == {
        "member_id": member["id"],
        "reward_id": reward["id"],
        "reward_code": "COFFEE",
        "claim_id": made["id"],
        "points": 300,
        "transaction_id": made["transaction_id"],
        "occurred_at": event["data"]["occurred_at"],
    }
    assert len(await events(api, member["id"], "points.redeemed")) == 1


async def test_unlimited_stock_stays_unlimited(api: ApiClient, member: dict[str, Any]) -> None:
    reward = await create_reward(api, points_cost=10)
    for _ in range(3):
        await claim(api, reward["id"], member["id"])
    shown = await get_reward(api, reward["id"])
    assert (shown["stock"], shown["claims_count"]) == (None, 3)


async def test_a_tier_restricted_reward_is_claimable_by_members_of_those_tiers(
    api: ApiClient, member: dict[str, Any], db: Database
) -> None:
    await make_tier(db, "GOLD", 1)
    await make_tier(db, "PLATINUM", 2)
    reward = await create_reward(api, tier_codes=["GOLD", "PLATINUM"])
    await set_member_tier(db, member["id"], "PLATINUM")
    await claim(api, reward["id"], member["id"])


Setup = Callable[[ApiClient, Database, dict[str, Any]], Awaitable[dict[str, Any]]]


async def _inactive(api: ApiClient, db: Database, member: dict[str, Any]) -> dict[str, Any]:
    return await create_reward(api, active=False)


async def _not_yet_valid(api: ApiClient, db: Database, member: dict[str, Any]) -> dict[str, Any]:
    return await create_reward(api, valid_from=at(1))


async def _expired(api: ApiClient, db: Database, member: dict[str, Any]) -> dict[str, Any]:
    return await create_reward(api, valid_from=at(-10), valid_until=at(-1))


async def _other_tier(api: ApiClient, db: Database, member: dict[str, Any]) -> dict[str, Any]:
    await make_tier(db, "GOLD", 1)
    await make_tier(db, "SILVER", 2)
    await set_member_tier(db, member["id"], "SILVER")
    return await create_reward(api, tier_codes=["GOLD"])


async def _no_tier(api: ApiClient, db: Database, member: dict[str, Any]) -> dict[str, Any]:
    await make_tier(db, "GOLD", 1)
    return await create_reward(api, tier_codes=["GOLD"])


async def _limit_reached(api: ApiClient, db: Database, member: dict[str, Any]) -> dict[str, Any]:
    reward = await create_reward(api, points_cost=10, per_member_limit=2)
    for _ in range(2):
        await claim(api, reward["id"], member["id"])
    return reward


async def _sold_out(api: ApiClient, db: Database, member: dict[str, Any]) -> dict[str, Any]:
    reward = await create_reward(api, points_cost=10, stock=1)
    other = await api.create_member()
    await award(api, other["id"], 10)
    await claim(api, reward["id"], other["id"])
    return reward


async def _too_dear(api: ApiClient, db: Database, member: dict[str, Any]) -> dict[str, Any]:
    return await create_reward(api, points_cost=1001, stock=5)


@pytest.mark.parametrize(
    ("setup", "code", "reason"),
    [
        (_inactive, "REWARD_NOT_AVAILABLE", "inactive"),
        (_not_yet_valid, "REWARD_NOT_AVAILABLE", "not_yet_valid"),
        (_expired, "REWARD_NOT_AVAILABLE", "expired"),
        (_other_tier, "TIER_NOT_ELIGIBLE", None),
        (_no_tier, "TIER_NOT_ELIGIBLE", None),
        (_limit_reached, "CLAIM_LIMIT_REACHED", None),
        (_sold_out, "OUT_OF_STOCK", None),
        (_too_dear, "INSUFFICIENT_POINTS", None),
    ],
    ids=[
        "inactive",
        "not-yet-valid",
        "expired",
        "other-tier",
        "no-tier",
        "limit-reached",
        "sold-out",
        "too-dear",
    ],
)
async def test_a_refused_claim_changes_nothing(
    api: ApiClient,
    db: Database,
    member: dict[str, Any],
    setup: Setup,
    code: str,
    reason: str | None,
) -> None:
    reward = await setup(api, db, member)
    before = await database_state(db)
    response = await api.post(
        f"{REWARDS}/{reward['id']}/claim", {"member_id": member["id"], "reference_id": "r-1"}
    )
    assert response.status_code == 409, response.text
    assert error_code(response) == code
    if reason is not None:
        assert response.json()["error"]["details"]["reason"] == reason
    assert await database_state(db) == before


async def test_per_member_limit_counts_only_claims_that_are_not_cancelled(
    api: ApiClient, member: dict[str, Any]
) -> None:
    reward = await create_reward(api, points_cost=10, per_member_limit=1)
    first = await claim(api, reward["id"], member["id"])
    response = await api.post(f"{REWARDS}/{reward['id']}/claim", {"member_id": member["id"]})
    assert error_code(response) == "CLAIM_LIMIT_REACHED"
    await cancel(api, first["claim"]["id"])
    await claim(api, reward["id"], member["id"])


async def test_per_member_limit_is_per_member(api: ApiClient, member: dict[str, Any]) -> None:
    reward = await create_reward(api, points_cost=10, per_member_limit=1)
    other = await api.create_member()
    await award(api, other["id"], 10)
    await claim(api, reward["id"], member["id"])
    await claim(api, reward["id"], other["id"])


# ---------------------------------------------------------------- idempotency


async def test_a_repeat_with_the_same_reference_returns_the_first_claim_and_changes_nothing(
    api: ApiClient, member: dict[str, Any], db: Database
) -> None:
    reward = await create_reward(api, points_cost=100, stock=5)
    first = await claim(api, reward["id"], member["id"], reference_id="order-7")
    before = await database_state(db)
    again = await claim(api, reward["id"], member["id"], reference_id="order-7", expect=200)
    assert again["claim"] == first["claim"]
    assert again["replayed"] is True
    assert again["balance"]["current_balance"] == 900
    assert await database_state(db) == before


async def test_a_reference_used_for_another_reward_or_member_is_refused(
    api: ApiClient, member: dict[str, Any], db: Database
) -> None:
    reward = await create_reward(api, points_cost=100)
    other_reward = await create_reward(api, points_cost=100)
    other_member = await api.create_member()
    await award(api, other_member["id"], 1000)
    await claim(api, reward["id"], member["id"], reference_id="order-8")
    before = await database_state(db)
    for reward_id, member_id in (
        (other_reward["id"], member["id"]),
        (reward["id"], other_member["id"]),
    ):
        response = await api.post(
            f"{REWARDS}/{reward_id}/claim", {"member_id": member_id, "reference_id": "order-8"}
        )
        assert response.status_code == 409
        assert error_code(response) == "REFERENCE_ID_REUSED"
    assert await database_state(db) == before


async def test_claim_reference_is_separate_from_ledger_references(
    api: ApiClient, member: dict[str, Any]
) -> None:
    """A redeem made directly with the same reference is another operation."""
    response = await api.post(
        "/api/v1/points/redeem", {"member_id": member["id"], "points": 5, "reference_id": "x-1"}
    )
    assert response.status_code == 201
    reward = await create_reward(api, points_cost=10)
    await claim(api, reward["id"], member["id"], reference_id="x-1")
    assert await balance(api, member["id"]) == 985


# ---------------------------------------------------------------- cancelling


async def test_cancel_refunds_the_points_returns_the_unit_and_emits_an_event(
    api: ApiClient, member: dict[str, Any], db: Database
) -> None:
    reward = await create_reward(api, points_cost=300, stock=2)
    made = (await claim(api, reward["id"], member["id"]))["claim"]
    result = await cancel(api, made["id"], "out of stock at the store")

    cancelled = result["claim"]
    assert (cancelled["status"], cancelled["cancel_reason"]) == (
        "cancelled",
        "out of stock at the store",
    )
    assert cancelled["cancelled_at"] is not None
    assert cancelled["refund_transaction_id"] is not None
    assert result["balance"]["current_balance"] == 1000
    assert result["balance"]["lifetime_redeemed"] == 0
    assert await balance(api, member["id"]) == 1000
    assert (await get_reward(api, reward["id"]))["stock"] == 2

    async with db.transaction(read_only=True) as session:
        refund = await session.scalar(
            select(PointTransaction).where(
                PointTransaction.public_id == cancelled["refund_transaction_id"]
            )
        )
        assert refund is not None
        assert (refund.type, refund.points) == ("redeem_refund", 300)

    [event] = await events(api, member["id"], "reward.claim.cancelled")
    assert event["data"] == {
        "member_id": member["id"],
        "reward_id": reward["id"],
        "claim_id": made["id"],
        "points": 300,
        "transaction_id": cancelled["refund_transaction_id"],
        "occurred_at": event["data"]["occurred_at"],
    }


async def test_cancelling_twice_is_refused_and_changes_nothing(
    api: ApiClient, member: dict[str, Any], db: Database
) -> None:
    reward = await create_reward(api, points_cost=300, stock=2)
    made = (await claim(api, reward["id"], member["id"]))["claim"]
    await cancel(api, made["id"])
    before = await database_state(db)
    response = await api.post(f"{CLAIMS}/{made['id']}/cancel", {"reason": "again"})
    assert response.status_code == 409
    assert error_code(response) == "CLAIM_ALREADY_CANCELLED"
    assert await database_state(db) == before


async def test_cancelling_keeps_unlimited_stock_unlimited(
    api: ApiClient, member: dict[str, Any]
) -> None:
    reward = await create_reward(api, points_cost=10)
    made = (await claim(api, reward["id"], member["id"]))["claim"]
    await cancel(api, made["id"])
    assert (await get_reward(api, reward["id"]))["stock"] is None


async def test_cancelling_keeps_the_stock_within_what_a_reward_holds(
    api: ApiClient, member: dict[str, Any]
) -> None:
    """Staff set the stock to the most a reward holds after the claim: the cancel refunds
    and leaves the stock there, not one past it (a server error on PostgreSQL)."""
    most = 2**31 - 1
    reward = await create_reward(api, points_cost=10, stock=most)
    made = (await claim(api, reward["id"], member["id"]))["claim"]
    patched = await api.patch(f"{REWARDS}/{reward['id']}", {"stock": most})
    assert patched.status_code == 200, patched.text
    await cancel(api, made["id"])
    assert (await get_reward(api, reward["id"]))["stock"] == most
    assert await balance(api, member["id"]) == 1000


async def test_a_claim_of_a_reward_withdrawn_since_can_still_be_cancelled(
    api: ApiClient, member: dict[str, Any]
) -> None:
    reward = await create_reward(api, points_cost=10, stock=1)
    made = (await claim(api, reward["id"], member["id"]))["claim"]
    await api.patch(f"{REWARDS}/{reward['id']}", {"active": False})
    await cancel(api, made["id"])
    assert await balance(api, member["id"]) == 1000


async def test_an_integration_can_cancel_the_claims_it_may_make(
    api: ApiClient, member: dict[str, Any], db: Database
) -> None:
    reward = await create_reward(api, points_cost=10)
    integration = api.with_key(await issue_key(db, Role.INTEGRATION))
    made = (await claim(integration, reward["id"], member["id"]))["claim"]
    await cancel(integration, made["id"])


async def test_cancel_needs_a_reason(api: ApiClient, member: dict[str, Any], db: Database) -> None:
    reward = await create_reward(api, points_cost=10)
    made = (await claim(api, reward["id"], member["id"]))["claim"]
    before = await database_state(db)
    for body in ({}, {"reason": ""}, {"reason": "x" * 1001}, {"reason": "ok", "extra": 1}):
        response = await api.post(f"{CLAIMS}/{made['id']}/cancel", body)
        assert response.status_code == 422, body
    assert await database_state(db) == before


# ---------------------------------------------------------------- input and access


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"member_id": "not-an-id"},
        {"member_id": "mem_abc", "reference_id": ""},
        {"member_id": "mem_abc", "reference_id": "has space"},
        {"member_id": "mem_abc", "reference_id": "x" * 201},
        {"member_id": "mem_abc", "points": 5},
    ],
    ids=["empty", "bad-member", "empty-ref", "space-ref", "long-ref", "extra-field"],
)
async def test_claim_input_is_validated(api: ApiClient, db: Database, body: dict[str, Any]) -> None:
    reward = await create_reward(api)
    before = await database_state(db)
    response = await api.post(f"{REWARDS}/{reward['id']}/claim", body)
    assert response.status_code == 422, response.text
    assert await database_state(db) == before


async def test_unknown_reward_member_or_claim_is_not_found(
    api: ApiClient, member: dict[str, Any]
) -> None:
    reward = await create_reward(api)
    response = await api.post(f"{REWARDS}/rwd_nothere/claim", {"member_id": member["id"]})
    assert (response.status_code, error_code(response)) == (404, "REWARD_NOT_FOUND")
    response = await api.post(f"{REWARDS}/{reward['id']}/claim", {"member_id": "mem_nothere"})
    assert (response.status_code, error_code(response)) == (404, "MEMBER_NOT_FOUND")
    response = await api.post(f"{CLAIMS}/clm_nothere/cancel", {"reason": "x"})
    assert (response.status_code, error_code(response)) == (404, "CLAIM_NOT_FOUND")


async def test_a_key_of_another_organisation_can_neither_claim_nor_cancel_for_the_member(
    api: ApiClient, db: Database
) -> None:
    org, other = await api.create_organisation(), await api.create_organisation()
    member = await api.create_member(organisation_id=other["id"])
    await award(api, member["id"], 100)
    reward = await create_reward(api, points_cost=10)
    made = (await claim(api, reward["id"], member["id"]))["claim"]
    outsider = api.with_key(await issue_key(db, Role.MANAGER, organisation=org["id"]))
    before = await database_state(db)
    response = await outsider.post(f"{REWARDS}/{reward['id']}/claim", {"member_id": member["id"]})
    assert (response.status_code, error_code(response)) == (404, "MEMBER_NOT_FOUND")
    response = await outsider.post(f"{CLAIMS}/{made['id']}/cancel", {"reason": "x"})
    assert (response.status_code, error_code(response)) == (404, "CLAIM_NOT_FOUND")
    assert await database_state(db) == before


async def test_claiming_needs_the_rewards_claim_scope(
    api: ApiClient, member: dict[str, Any], db: Database
) -> None:
    reward = await create_reward(api)
    reader = api.with_key(await issue_key(db, Role.MANAGER, scopes=["rewards:read"]))
    response = await reader.post(f"{REWARDS}/{reward['id']}/claim", {"member_id": member["id"]})
    assert response.status_code == 403


# ---------------------------------------------------------------- lists


async def test_claims_list_filters_by_member_reward_and_status(
    api: ApiClient, member: dict[str, Any]
) -> None:
    other = await api.create_member()
    await award(api, other["id"], 1000)
    mug, cup = await create_reward(api, points_cost=10), await create_reward(api, points_cost=10)
    a = (await claim(api, mug["id"], member["id"]))["claim"]
    b = (await claim(api, cup["id"], member["id"]))["claim"]
    c = (await claim(api, mug["id"], other["id"]))["claim"]
    await cancel(api, b["id"])

    async def ids(**params: str) -> list[str]:
        response = await api.get(CLAIMS, params=params)
        assert response.status_code == 200, response.text
        return [row["id"] for row in response.json()["data"]]

    assert await ids() == [c["id"], b["id"], a["id"]]
    assert await ids(member_id=member["id"]) == [b["id"], a["id"]]
    assert await ids(reward_id=mug["id"]) == [c["id"], a["id"]]
    assert await ids(status="cancelled") == [b["id"]]
    assert await ids(member_id=member["id"], status="claimed") == [a["id"]]
    for bad in ({"status": "lost"}, {"member_id": "nope"}, {"reward_id": "mem_x"}):
        assert (await api.get(CLAIMS, params=bad)).status_code == 422
    response = await api.get(CLAIMS, params={"reward_id": "rwd_nothere"})
    assert response.status_code == 404


async def test_claims_lists_show_only_members_the_key_can_see(api: ApiClient, db: Database) -> None:
    org, other = await api.create_organisation(), await api.create_organisation()
    mine = await api.create_member(organisation_id=org["id"])
    theirs = await api.create_member(organisation_id=other["id"])
    reward = await create_reward(api, points_cost=10)
    for member in (mine, theirs):
        await award(api, member["id"], 10)
        await claim(api, reward["id"], member["id"])
    chapter_key = api.with_key(await issue_key(db, Role.MANAGER, organisation=org["id"]))
    response = await chapter_key.get(CLAIMS)
    assert [row["member_id"] for row in response.json()["data"]] == [mine["id"]]
    response = await chapter_key.get(f"/api/v1/members/{theirs['id']}/reward-claims")
    assert response.status_code == 404
    response = await chapter_key.get(CLAIMS, params={"member_id": theirs["id"]})
    assert response.status_code == 404


async def test_member_reward_claims_are_paged_newest_first(
    api: ApiClient, member: dict[str, Any]
) -> None:
    reward = await create_reward(api, points_cost=10)
    made = [(await claim(api, reward["id"], member["id"]))["claim"]["id"] for _ in range(5)]
    path = f"/api/v1/members/{member['id']}/reward-claims"
    first = (await api.get(path, params={"limit": 3})).json()
    assert [row["id"] for row in first["data"]] == made[:1:-1]
    assert first["pagination"]["has_more"] is True
    rest = (
        await api.get(path, params={"limit": 3, "cursor": first["pagination"]["next_cursor"]})
    ).json()
    assert [row["id"] for row in rest["data"]] == made[1::-1]
    assert rest["pagination"]["has_more"] is False
