"""The nightly review (downgrade policies, floors, idempotency, concurrent workers) and
manual tier assignment."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select, update

from memberhub.auth.roles import Role
from memberhub.kit.actor import Actor
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.members.models import Member
from memberhub.points import service as points_service
from memberhub.points.jobs import activate_pending_points
from memberhub.points.models import PointAccount, PointTransaction
from memberhub.tiers.jobs import run_review
from memberhub.worker.runner import JOBS
from tests.conftest import issue_key
from tests.support import ApiClient
from tests.tiers.conftest import (
    TIERS,
    Review,
    assign,
    award,
    create_tier,
    member_tier,
    redeem,
    tier_events,
)

DAY = timedelta(days=1)


def days_later(days: float) -> datetime:
    return utcnow() + timedelta(days=days)


async def balance_ladder(api: ApiClient, policy: str) -> None:
    """BRONZE 50, SILVER 100, GOLD 200 points of balance, all with `policy`."""
    for code, rank, threshold in (("BRONZE", 1, 50), ("SILVER", 2, 100), ("GOLD", 3, 200)):
        await create_tier(
            api,
            code=code,
            rank=rank,
            threshold=threshold,
            basis="current_balance",
            downgrade_policy=policy,
        )


async def gold_member_with_points_left(api: ApiClient, points_left: int) -> str:
    member = await api.create_member()
    await award(api, member["id"], 200)
    spend = 200 - points_left
    if spend:
        await redeem(api, member["id"], spend)
    assert await member_tier(api, member["id"]) == "GOLD"
    return str(member["id"])


async def review_events(api: ApiClient, member_id: str) -> list[tuple[str | None, str | None]]:
    return [(p, n) for p, n, reason in await tier_events(api, member_id) if reason == "review"]


async def account_floor(db: Database, member_id: str) -> tuple[str | None, datetime | None]:
    async with db.transaction(read_only=True) as session:
        row = (
            await session.execute(
                select(PointAccount.tier_floor_code, PointAccount.tier_floor_until)
                .join(Member, Member.id == PointAccount.member_id)
                .where(Member.public_id == member_id)
            )
        ).one()
        return row[0], row[1]


# ---------------------------------------------------------------- downgrade policies


async def test_never_keeps_the_tier_whatever_the_member_falls_to(
    api: ApiClient, review: Review
) -> None:
    await balance_ladder(api, "never")
    member_id = await gold_member_with_points_left(api, 0)

    await review(days_later(1))
    await review(days_later(2))

    assert await member_tier(api, member_id) == "GOLD"
    assert await review_events(api, member_id) == []


async def test_one_step_goes_down_one_active_tier_per_review(
    api: ApiClient, review: Review
) -> None:
    await balance_ladder(api, "one_step")
    member_id = await gold_member_with_points_left(api, 0)

    for day in (1, 2, 3, 4):
        await review(days_later(day))

    assert await member_tier(api, member_id) is None
    assert await review_events(api, member_id) == [
        ("GOLD", "SILVER"),
        ("SILVER", "BRONZE"),
        ("BRONZE", None),
    ]


async def test_one_step_stops_at_the_qualifying_tier(api: ApiClient, review: Review) -> None:
    await balance_ladder(api, "one_step")
    member_id = await gold_member_with_points_left(api, 100)

    await review(days_later(1))
    await review(days_later(2))

    assert await member_tier(api, member_id) == "SILVER"
    assert await review_events(api, member_id) == [("GOLD", "SILVER")]


async def test_one_step_skips_inactive_tiers(api: ApiClient, review: Review) -> None:
    await balance_ladder(api, "one_step")
    silver = (await api.get(TIERS, params={"active": "true"})).json()["data"][1]
    member_id = await gold_member_with_points_left(api, 0)
    assert (await api.patch(f"{TIERS}/{silver['id']}", {"active": False})).status_code == 200

    await review(days_later(1))

    assert await member_tier(api, member_id) == "BRONZE"


async def test_to_qualifying_drops_straight_to_the_qualifying_tier(
    api: ApiClient, review: Review
) -> None:
    await balance_ladder(api, "to_qualifying")
    bronze = await gold_member_with_points_left(api, 60)
    nothing = await gold_member_with_points_left(api, 0)

    await review(days_later(1))

    assert await member_tier(api, bronze) == "BRONZE"
    assert await member_tier(api, nothing) is None
    assert await review_events(api, bronze) == [("GOLD", "BRONZE")]
    listed = await api.get("/api/v1/members", params={"tier": "BRONZE"})
    assert [m["id"] for m in listed.json()["data"]] == [bronze]


async def test_the_review_upgrades_to_tiers_created_after_the_points(
    api: ApiClient, review: Review
) -> None:
    member = await api.create_member()
    await award(api, member["id"], 500)
    await create_tier(api, code="GOLD", threshold=500)

    assert await review(days_later(1)) == 1

    assert await member_tier(api, member["id"]) == "GOLD"
    assert await tier_events(api, member["id"]) == [(None, "GOLD", "review")]


async def test_members_of_a_deactivated_tier_move_to_their_qualifying_tier(
    api: ApiClient, review: Review
) -> None:
    await create_tier(api, code="SILVER", rank=1, threshold=100)
    gold = await create_tier(api, code="GOLD", rank=2, threshold=500)
    member = await api.create_member()
    await award(api, member["id"], 500)
    await api.patch(f"{TIERS}/{gold['id']}", {"active": False})

    await review(days_later(1))

    assert await member_tier(api, member["id"]) == "SILVER"


async def rolling_silver(api: ApiClient) -> None:
    """SILVER for 100 points earned in the last 30 days."""
    await create_tier(
        api,
        code="SILVER",
        threshold=100,
        basis="rolling_earned",
        window_days=30,
        downgrade_policy="to_qualifying",
    )


async def test_old_points_leave_a_rolling_window(api: ApiClient, review: Review) -> None:
    await rolling_silver(api)
    member = await api.create_member()
    await award(api, member["id"], 100)
    assert await member_tier(api, member["id"]) == "SILVER"

    await review(days_later(29))
    assert await member_tier(api, member["id"]) == "SILVER"
    await review(days_later(31))

    assert await member_tier(api, member["id"]) is None
    assert await review_events(api, member["id"]) == [("SILVER", None)]


async def test_reversing_an_earn_from_before_the_window_takes_nothing_from_it(
    api: ApiClient, db: Database, review: Review
) -> None:
    await rolling_silver(api)
    member = await api.create_member()

    async def earn(amount: int, reference: str) -> None:
        body = {"member_id": member["id"], "amount": amount, "currency": "MYR"}
        answered = await api.post("/api/v1/points/earn", {**body, "reference_id": reference})
        assert answered.status_code == 201, answered.text

    await earn(20_000, "old-order")  # 100 points, made 40 days old below
    async with db.transaction() as session:
        await session.execute(
            update(PointTransaction)
            .where(PointTransaction.reference_id == "old-order")
            .values(occurred_at=utcnow() - timedelta(days=40))
        )
    await earn(30_000, "new-order")  # 150 points inside the window
    reverse = {"member_id": member["id"], "earn_reference_id": "old-order", "reference_id": "r"}
    assert (await api.post("/api/v1/points/reverse", reverse)).status_code == 201

    summary = (await api.get(f"/api/v1/members/{member['id']}/points")).json()
    assert summary["current_balance"] == 150
    await review(utcnow() + timedelta(hours=1))
    assert await member_tier(api, member["id"]) == "SILVER", "150 earned in the window"


async def test_a_purchase_earned_before_the_window_activated_in_it_then_refunded_counts_nothing(
    api: ApiClient, db: Database, review: Review
) -> None:
    # Pending points count when they activate: day 15 here, inside the window that a
    # review on day 40 looks at (days 10 to 40), although the purchase was on day 0.
    pending = await api.patch("/api/v1/program", {"pending_days": 14})
    assert pending.status_code == 200, pending.text
    await rolling_silver(api)
    member = await api.create_member()
    start = utcnow()
    body = {"member_id": member["id"], "amount": 20_000, "currency": "MYR"}
    earned = await api.post("/api/v1/points/earn", {**body, "reference_id": "order"})
    assert earned.status_code == 201, earned.text
    async with db.transaction() as session:
        await activate_pending_points(session, start + timedelta(days=15))
    assert await member_tier(api, member["id"]) == "SILVER"
    # Refunded in full on day 20: the activation the window counts is taken back with it.
    async with db.transaction() as session:
        buyer = await session.scalar(select(Member).where(Member.public_id == member["id"]))
        purchase = await session.scalar(
            select(PointTransaction).where(PointTransaction.reference_id == "order")
        )
        assert buyer is not None
        assert purchase is not None
        await points_service.reverse_earn(
            session,
            Actor.system("refunds"),
            buyer,
            earn=purchase,
            points=None,
            reason="refund",
            reference_id="refund",
            now=start + timedelta(days=20),
        )

    await review(start + timedelta(days=40))

    assert await member_tier(api, member["id"]) is None


# ---------------------------------------------------------------- running it


async def test_a_second_review_changes_nothing(api: ApiClient, review: Review) -> None:
    await balance_ladder(api, "one_step")
    member_id = await gold_member_with_points_left(api, 0)
    now = days_later(1)

    assert await review(now) == 1
    assert await review(now) == 0
    assert await review(now + timedelta(hours=1)) == 0

    assert await member_tier(api, member_id) == "SILVER"
    assert await review_events(api, member_id) == [("GOLD", "SILVER")]


async def test_two_reviews_at_once_change_each_member_once(api: ApiClient, db: Database) -> None:
    await balance_ladder(api, "one_step")
    members = [await gold_member_with_points_left(api, 0) for _ in range(12)]
    now = days_later(1)

    changes = await asyncio.gather(
        run_review(db, now, chunk_size=5), run_review(db, now, chunk_size=5)
    )

    assert sum(changes) == len(members)
    for member_id in members:
        assert await review_events(api, member_id) == [("GOLD", "SILVER")]
        assert await member_tier(api, member_id) == "SILVER"


def test_the_review_is_a_daily_job() -> None:
    (job,) = [j for j in JOBS if j.name == "tiers.review"]
    assert job.daily
    assert job.chunked is run_review


# ---------------------------------------------------------------- manual assignment


async def test_assignment_sets_the_tier_at_once_even_downwards(
    api: ApiClient, review: Review
) -> None:
    await balance_ladder(api, "never")
    member_id = await gold_member_with_points_left(api, 200)

    result = await assign(api, member_id, "BRONZE")

    assert result == {
        "member_id": member_id,
        "previous_tier": "GOLD",
        "tier": "BRONZE",
        "floor_tier": "BRONZE",
        "floor_until": None,
    }
    assert await member_tier(api, member_id) == "BRONZE"
    assert (await tier_events(api, member_id))[-1] == ("GOLD", "BRONZE", "assigned")


async def test_a_floor_holds_until_it_ends(api: ApiClient, db: Database, review: Review) -> None:
    await balance_ladder(api, "to_qualifying")
    member = await api.create_member()
    until = days_later(10)

    await assign(api, member["id"], "GOLD", until=until.isoformat())
    await review(days_later(5))
    assert await member_tier(api, member["id"]) == "GOLD"
    await review(days_later(11))

    assert await member_tier(api, member["id"]) is None
    assert await account_floor(db, member["id"]) == (None, None)
    assert await tier_events(api, member["id"]) == [
        (None, "GOLD", "assigned"),
        ("GOLD", None, "review"),
    ]


async def test_a_floor_without_end_holds_until_the_next_assignment(
    api: ApiClient, db: Database, review: Review
) -> None:
    await balance_ladder(api, "to_qualifying")
    member = await api.create_member()

    await assign(api, member["id"], "SILVER")
    await review(days_later(400))
    assert await member_tier(api, member["id"]) == "SILVER"
    cleared = await assign(api, member["id"], None)

    assert (cleared["tier"], cleared["floor_tier"]) == (None, None)
    assert await member_tier(api, member["id"]) is None
    assert await account_floor(db, member["id"]) == (None, None)


async def test_members_still_move_up_past_their_floor(api: ApiClient, review: Review) -> None:
    await balance_ladder(api, "to_qualifying")
    member = await api.create_member()
    await assign(api, member["id"], "BRONZE")

    await award(api, member["id"], 200)
    assert await member_tier(api, member["id"]) == "GOLD"
    await redeem(api, member["id"], 200)
    await review(days_later(1))

    assert await member_tier(api, member["id"]) == "BRONZE"
    assert await tier_events(api, member["id"]) == [
        (None, "BRONZE", "assigned"),
        ("BRONZE", "GOLD", "earned"),
        ("GOLD", "BRONZE", "review"),
    ]


async def test_assigning_the_current_tier_emits_no_event_but_is_audited(
    api: ApiClient,
) -> None:
    await balance_ladder(api, "never")
    member_id = await gold_member_with_points_left(api, 200)

    await assign(api, member_id, "GOLD", reason="Keep for a year")

    assert await tier_events(api, member_id) == [(None, "GOLD", "earned")]
    audit = await api.get("/api/v1/audit", params={"object_id": member_id, "action": "tier.assign"})
    (entry,) = audit.json()["data"]
    assert entry["changes"]["reason"] == "Keep for a year"
    assert entry["changes"]["floor_tier"] == {"before": None, "after": "GOLD"}


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        pytest.param({"tier_code": "DIAMOND"}, 404, "TIER_NOT_FOUND", id="unknown-tier"),
        pytest.param({"tier_code": "OLD"}, 409, "TIER_INACTIVE", id="inactive-tier"),
        pytest.param(
            {"tier_code": "GOLD", "until": "2001-01-01T00:00:00Z"},
            422,
            "VALIDATION_ERROR",
            id="until-in-the-past",
        ),
        pytest.param(
            {"tier_code": None, "until": "2999-01-01T00:00:00Z"},
            422,
            "VALIDATION_ERROR",
            id="until-without-tier",
        ),
        pytest.param({"tier_code": "GOLD", "reason": ""}, 422, "VALIDATION_ERROR", id="no-reason"),
        pytest.param({"tier_code": "not a code"}, 422, "VALIDATION_ERROR", id="bad-code"),
        pytest.param(
            {"tier_code": "GOLD", "member_id": "mem_doesnotexist"},
            404,
            "MEMBER_NOT_FOUND",
            id="unknown-member",
        ),
    ],
)
async def test_invalid_assignments_are_refused_and_change_nothing(
    api: ApiClient, body: dict[str, object], status: int, code: str
) -> None:
    await create_tier(api, code="GOLD", rank=1)
    await create_tier(api, code="OLD", rank=2, active=False)
    member = await api.create_member()

    response = await api.post(
        f"{TIERS}/assign", {"member_id": member["id"], "reason": "Because", **body}
    )

    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert await member_tier(api, member["id"]) is None
    assert await tier_events(api, member["id"]) == []


async def test_managers_assign_tiers_but_support_agents_do_not(
    api: ApiClient, db: Database
) -> None:
    await create_tier(api, code="GOLD")
    member = await api.create_member()
    body = {"member_id": member["id"], "tier_code": "GOLD", "reason": "VIP"}

    agent = api.with_key(await issue_key(db, Role.SUPPORT_AGENT))
    assert (await agent.post(f"{TIERS}/assign", body)).status_code == 403
    manager = api.with_key(await issue_key(db, Role.MANAGER))
    assert (await manager.post(f"{TIERS}/assign", body)).status_code == 200
    assert await member_tier(api, member["id"]) == "GOLD"


async def test_a_key_bound_to_an_organisation_cannot_assign_outside_it(
    api: ApiClient, db: Database
) -> None:
    await create_tier(api, code="GOLD")
    ours = await api.create_organisation()
    theirs = await api.create_organisation()
    member = await api.create_member(organisation_id=theirs["id"])
    manager = api.with_key(await issue_key(db, Role.MANAGER, organisation=ours["id"]))

    response = await manager.post(
        f"{TIERS}/assign", {"member_id": member["id"], "tier_code": "GOLD", "reason": "VIP"}
    )

    assert response.status_code == 404, response.text
    assert await member_tier(api, member["id"]) is None
