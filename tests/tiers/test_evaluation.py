"""Tier evaluation as the ledger changes: upgrades at once, pending points, multipliers,
and the progress shown in the member's points summary."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import select

from memberhub.kit.actor import Actor
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.members.models import Member
from memberhub.points import service as points_service
from memberhub.points.jobs import activate_pending_points
from memberhub.points.repository import PointsRepository
from memberhub.tiers import service as tiers_service
from tests.points.conftest import check_ledger
from tests.support import ApiClient, unique
from tests.tiers.conftest import Review, award, create_tier, member_tier, redeem, tier_events


async def earn(api: ApiClient, member_id: str, amount: int) -> dict[str, Any]:
    response = await api.post(
        "/api/v1/points/earn",
        {
            "member_id": member_id,
            "amount": amount,
            "currency": "MYR",
            "reference_id": unique("order-"),
        },
    )
    assert response.status_code == 201, response.text
    return dict(response.json())


async def summary(api: ApiClient, member_id: str) -> dict[str, Any]:
    response = await api.get(f"/api/v1/members/{member_id}/points")
    assert response.status_code == 200, response.text
    return dict(response.json())


def progress(points_summary: dict[str, Any]) -> tuple[Any, ...]:
    def code(ref: dict[str, str] | None) -> str | None:
        return ref["code"] if ref is not None else None

    return (
        code(points_summary["tier"]),
        code(points_summary["projected_tier"]),
        code(points_summary["next_tier"]),
        points_summary["points_to_next_tier"],
    )


async def set_pending_days(api: ApiClient, days: int) -> None:
    response = await api.patch("/api/v1/program", {"pending_days": days})
    assert response.status_code == 200, response.text


async def test_crossing_a_threshold_upgrades_at_once_with_one_event(api: ApiClient) -> None:
    await create_tier(api, code="SILVER", rank=1, threshold=100)
    await create_tier(api, code="GOLD", rank=2, threshold=500)
    member = await api.create_member()
    version = (await api.get(f"/api/v1/members/{member['id']}")).json()["version"]

    await award(api, member["id"], 99)
    assert await member_tier(api, member["id"]) is None
    await award(api, member["id"], 1)
    assert await member_tier(api, member["id"]) == "SILVER"
    await award(api, member["id"], 50)
    await award(api, member["id"], 400)

    shown = (await api.get(f"/api/v1/members/{member['id']}")).json()
    assert shown["tier"] == "GOLD"
    assert shown["version"] == version + 2
    assert await tier_events(api, member["id"]) == [
        (None, "SILVER", "earned"),
        ("SILVER", "GOLD", "earned"),
    ]
    listed = await api.get("/api/v1/members", params={"tier": "GOLD"})
    assert [m["id"] for m in listed.json()["data"]] == [member["id"]]


async def test_passing_several_tiers_at_once_goes_straight_to_the_highest(api: ApiClient) -> None:
    await create_tier(api, code="SILVER", rank=1, threshold=100)
    await create_tier(api, code="GOLD", rank=2, threshold=500)
    member = await api.create_member()

    await award(api, member["id"], 1000)

    assert await member_tier(api, member["id"]) == "GOLD"
    assert await tier_events(api, member["id"]) == [(None, "GOLD", "earned")]


async def test_earning_on_a_purchase_upgrades(api: ApiClient) -> None:
    await create_tier(api, code="SILVER", rank=1, threshold=100)
    member = await api.create_member()

    await earn(api, member["id"], 20_000)  # 1 point per 200 minor units: 100 points

    assert await member_tier(api, member["id"]) == "SILVER"
    assert await tier_events(api, member["id"]) == [(None, "SILVER", "earned")]


async def test_spending_never_downgrades_outside_the_review(api: ApiClient) -> None:
    await create_tier(
        api, code="SILVER", threshold=100, basis="current_balance", downgrade_policy="to_qualifying"
    )
    member = await api.create_member()
    await award(api, member["id"], 150)

    await redeem(api, member["id"], 150)

    assert await member_tier(api, member["id"]) == "SILVER"
    assert await tier_events(api, member["id"]) == [(None, "SILVER", "earned")]


async def test_inactive_tiers_are_not_awarded(api: ApiClient) -> None:
    await create_tier(api, code="SILVER", rank=1, threshold=100)
    await create_tier(api, code="GOLD", rank=2, threshold=500, active=False)
    member = await api.create_member()

    await award(api, member["id"], 1000)

    assert await member_tier(api, member["id"]) == "SILVER"


async def test_transferred_points_earn_no_tier(api: ApiClient, db: Database) -> None:
    """A transfer moves points another member earned: it earns nothing, so passing the same
    points back and forth lifts neither member."""
    await create_tier(api, code="SILVER", threshold=100)
    await create_tier(api, code="GOLD", rank=2, threshold=1000)
    giver = await api.create_member()
    receiver = await api.create_member()
    await award(api, giver["id"], 600)

    for _ in range(2):
        for source, target in ((giver, receiver), (receiver, giver)):
            moved = await api.post(
                "/api/v1/points/transfer",
                {"from_member_id": source["id"], "to_member_id": target["id"], "points": 600},
            )
            assert moved.status_code == 201, moved.text
    moved = await api.post(
        "/api/v1/points/transfer",
        {"from_member_id": giver["id"], "to_member_id": receiver["id"], "points": 600},
    )
    assert moved.status_code == 201, moved.text

    earned = {
        who: (await api.get(f"/api/v1/members/{m['id']}/points")).json()["lifetime_earned"]
        for who, m in (("giver", giver), ("receiver", receiver))
    }
    assert earned == {"giver": 600, "receiver": 0}
    assert await member_tier(api, giver["id"]) == "SILVER"
    assert await member_tier(api, receiver["id"]) is None
    await check_ledger(db)


async def test_pending_points_count_only_once_they_become_active(
    api: ApiClient, db: Database
) -> None:
    await set_pending_days(api, 14)
    await create_tier(api, code="SILVER", threshold=100)
    member = await api.create_member()

    await earn(api, member["id"], 20_000)

    assert await member_tier(api, member["id"]) is None
    assert progress(await summary(api, member["id"])) == (None, None, "SILVER", 100)
    async with db.transaction() as session:
        assert await activate_pending_points(session, utcnow() + timedelta(days=15)) == 1
    assert await member_tier(api, member["id"]) == "SILVER"
    assert await tier_events(api, member["id"]) == [(None, "SILVER", "earned")]


async def test_pending_points_count_in_a_rolling_window_once_active(
    api: ApiClient, db: Database
) -> None:
    await set_pending_days(api, 14)
    await create_tier(api, code="SILVER", threshold=100, basis="rolling_earned", window_days=30)
    member = await api.create_member()

    await earn(api, member["id"], 20_000)

    assert await member_tier(api, member["id"]) is None
    async with db.transaction() as session:
        await activate_pending_points(session, utcnow() + timedelta(days=15))
    assert await member_tier(api, member["id"]) == "SILVER"


async def test_a_purchase_refunded_while_pending_never_lifts_the_tier(
    api: ApiClient, db: Database
) -> None:
    await set_pending_days(api, 14)
    await create_tier(api, code="SILVER", threshold=100)
    member = await api.create_member()
    purchase = await earn(api, member["id"], 20_000)

    refund = await api.post(
        "/api/v1/points/reverse",
        {
            "member_id": member["id"],
            "transaction_id": purchase["transaction"]["id"],
            "reference_id": unique("refund-"),
        },
    )
    assert refund.status_code == 201, refund.text
    async with db.transaction() as session:
        await activate_pending_points(session, utcnow() + timedelta(days=15))

    assert await member_tier(api, member["id"]) is None
    assert await tier_events(api, member["id"]) == []


async def test_the_tier_multiplier_scales_points_earned_on_purchases(api: ApiClient) -> None:
    await create_tier(api, code="GOLD", threshold=100, earn_multiplier_percent=150)
    member = await api.create_member()

    before = await earn(api, member["id"], 20_000)  # earned before the upgrade: x1
    after = await earn(api, member["id"], 20_000)

    assert before["transaction"]["points"] == 100
    assert after["transaction"]["points"] == 150
    assert after["transaction"]["details"]["multiplier_percent"] == 150


async def test_a_zero_multiplier_earns_nothing(api: ApiClient) -> None:
    await create_tier(api, code="PAUSED", threshold=0, earn_multiplier_percent=0)
    member = await api.create_member()
    await award(api, member["id"], 1)

    assert (await earn(api, member["id"], 20_000))["transaction"]["points"] == 0


async def test_points_summary_shows_tier_projection_and_distance_to_the_next(
    api: ApiClient,
) -> None:
    await create_tier(api, code="SILVER", rank=1, threshold=100)
    await create_tier(
        api, code="GOLD", rank=2, threshold=500, basis="rolling_earned", window_days=365
    )
    member = await api.create_member()

    assert progress(await summary(api, member["id"])) == (None, None, "SILVER", 100)
    await award(api, member["id"], 150)

    shown = await summary(api, member["id"])
    assert progress(shown) == ("SILVER", "SILVER", "GOLD", 350)
    assert shown["tier"] == {"code": "SILVER", "name": "Tier"}
    await award(api, member["id"], 350)
    assert progress(await summary(api, member["id"])) == ("GOLD", "GOLD", None, None)


async def test_points_summary_without_tiers_shows_none(api: ApiClient) -> None:
    member = await api.create_member()
    await award(api, member["id"], 150)

    assert progress(await summary(api, member["id"])) == (None, None, None, None)


async def test_projection_shows_what_the_review_would_do(
    api: ApiClient, db: Database, review: Review
) -> None:
    await create_tier(
        api, code="SILVER", rank=1, threshold=100, basis="rolling_earned", window_days=30
    )
    await create_tier(
        api,
        code="GOLD",
        rank=2,
        threshold=200,
        basis="rolling_earned",
        window_days=30,
        downgrade_policy="one_step",
    )
    member = await api.create_member()
    await award(api, member["id"], 200)
    later = utcnow() + timedelta(days=60)

    async with db.transaction() as session:
        row = await session.scalar(select(Member).where(Member.public_id == member["id"]))
        assert row is not None
        account = await PointsRepository(session).get_account(row.id)
        projected = await tiers_service.tier_progress(session, account, later)
    codes = [t.code if t is not None else None for t in (projected.tier, projected.projected)]
    assert codes == ["GOLD", "SILVER"]
    assert projected.next_tier is None
    await review(later)
    assert await member_tier(api, member["id"]) == "SILVER"


async def test_a_member_loaded_in_the_same_transaction_can_still_be_changed(
    api: ApiClient, db: Database
) -> None:
    await create_tier(api, code="SILVER", threshold=100)
    created = await api.create_member()

    async with db.transaction() as session:
        member = await session.scalar(select(Member).where(Member.public_id == created["id"]))
        assert member is not None
        await points_service.award_points(
            session, Actor.system("test"), member, points=100, reason="Welcome"
        )
        assert member.tier == "SILVER"
        member.first_name = "Changed"
        await session.flush()

    shown = (await api.get(f"/api/v1/members/{created['id']}")).json()
    assert (shown["tier"], shown["first_name"]) == ("SILVER", "Changed")
    assert shown["version"] == created["version"] + 2
