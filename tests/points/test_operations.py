"""The ledger operations through the HTTP API: what each one writes, and what it refuses."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from memberhub.auth.roles import Role
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.members.models import Member
from memberhub.points.jobs import expire_points
from memberhub.points.models import BatchStatus, PointBatch
from tests.conftest import issue_key
from tests.points.conftest import award, check_ledger, ledger_snapshot, op, set_program, summary
from tests.support import ApiClient


def future(days: float) -> str:
    return (utcnow() + timedelta(days=days)).isoformat()


async def events(api: ApiClient, member_id: str, event_type: str) -> list[dict[str, Any]]:
    response = await api.get(
        "/api/v1/events", params={"type": event_type, "member_id": member_id, "limit": 500}
    )
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


# ---------------------------------------------------------------- earn


async def test_earn_applies_the_program_rate_rounding_down(
    api: ApiClient, member: dict[str, Any], db: Database
) -> None:
    result = await op(
        api,
        "earn",
        {"member_id": member["id"], "amount": 10_199, "currency": "MYR", "reference_id": "o-1"},
    )
    # Default rate: 1 point per 200 minor units.
    assert result["transaction"]["points"] == 50
    assert result["transaction"]["amount"] == 10_199
    assert result["balance"]["current_balance"] == 50
    assert result["replayed"] is False
    assert len(await events(api, member["id"], "points.earned")) == 1
    await check_ledger(db)


async def test_earn_with_a_known_reference_replays_without_a_second_effect(
    api: ApiClient, member: dict[str, Any], db: Database
) -> None:
    body = {"member_id": member["id"], "amount": 1000, "currency": "MYR", "reference_id": "o-2"}
    first = await op(api, "earn", body)
    again = await op(api, "earn", body, expect=200)
    assert again["replayed"] is True
    # The first answer, built from what the earn wrote, is the transaction as stored.
    assert again["transaction"] == first["transaction"]
    assert (await summary(api, member["id"]))["current_balance"] == 5
    assert len(await events(api, member["id"], "points.earned")) == 1


async def test_earn_reference_reused_with_another_amount_is_refused(
    api: ApiClient, member: dict[str, Any], db: Database
) -> None:
    body = {"member_id": member["id"], "amount": 1000, "currency": "MYR", "reference_id": "o-3"}
    await op(api, "earn", body)
    before = await ledger_snapshot(db, member["id"])
    error = await op(api, "earn", {**body, "amount": 2000}, expect=409)
    assert error["error"]["code"] == "REFERENCE_ID_REUSED"
    assert await ledger_snapshot(db, member["id"]) == before


async def test_earn_in_another_currency_is_refused(
    api: ApiClient, member: dict[str, Any], db: Database
) -> None:
    body = {"member_id": member["id"], "amount": 1000, "currency": "USD", "reference_id": "o-4"}
    error = await op(api, "earn", body, expect=422)
    assert error["error"]["code"] == "CURRENCY_MISMATCH"
    assert (await ledger_snapshot(db, member["id"]))["transactions"] == 0


async def test_earn_of_more_points_than_one_operation_credits_is_refused(
    api: ApiClient, member: dict[str, Any], db: Database
) -> None:
    await set_program(api, earn_points=1_000_000, earn_per_amount=1)
    body = {"member_id": member["id"], "amount": 10**14, "currency": "MYR", "reference_id": "o"}
    before = await ledger_snapshot(db, member["id"])
    error = await op(api, "earn", body, expect=422)
    assert error["error"]["code"] == "TOO_MANY_POINTS"
    assert error["error"]["details"]["max_points"] == 10**12
    assert await ledger_snapshot(db, member["id"]) == before
    # The most one earn credits is accepted.
    result = await op(api, "earn", {**body, "amount": 10**6, "reference_id": "p"})
    assert result["transaction"]["points"] == 10**12


async def test_earn_is_pending_for_the_pending_period_then_activates(
    api: ApiClient, member: dict[str, Any], db: Database
) -> None:
    from memberhub.points.jobs import activate_pending_points

    await set_program(api, pending_days=14)
    body = {"member_id": member["id"], "amount": 20_000, "currency": "MYR", "reference_id": "o-5"}
    result = await op(api, "earn", body)
    assert result["transaction"]["pending_points"] == 100
    assert result["balance"] == {
        "current_balance": 0,
        "pending_balance": 100,
        "lifetime_earned": 100,
        "lifetime_redeemed": 0,
        "lifetime_expired": 0,
    }
    error = await op(api, "redeem", {"member_id": member["id"], "points": 1}, expect=409)
    assert error["error"]["code"] == "INSUFFICIENT_POINTS"
    async with db.transaction() as session:
        assert await activate_pending_points(session, utcnow() + timedelta(days=13)) == 0
    async with db.transaction() as session:
        assert await activate_pending_points(session, utcnow() + timedelta(days=15)) == 1
    async with db.transaction() as session:
        assert await activate_pending_points(session, utcnow() + timedelta(days=16)) == 0
    points = await summary(api, member["id"])
    assert (points["current_balance"], points["pending_balance"]) == (100, 0)
    await check_ledger(db)
    # The activation is audited, as every change is (one entry for the run's chunk).
    audit = (await api.get("/api/v1/audit", {"action": "points.activate"})).json()["data"]
    assert [(e["action"], e["changes"]) for e in audit] == [
        ("points.activate", {"members": 1, "batches": 1, "points": 100})
    ]


async def test_earn_validates_its_input(api: ApiClient, member: dict[str, Any]) -> None:
    for body in (
        {"member_id": member["id"], "amount": -1, "currency": "MYR", "reference_id": "x"},
        {"member_id": member["id"], "amount": 10, "currency": "myr", "reference_id": "x"},
        {"member_id": member["id"], "amount": 10, "currency": "MYR"},
        {"member_id": member["id"], "amount": 10, "currency": "MYR", "reference_id": ""},
        {"member_id": member["id"], "amount": 2**60, "currency": "MYR", "reference_id": "x"},
        {"member_id": "not an id", "amount": 10, "currency": "MYR", "reference_id": "x"},
    ):
        await op(api, "earn", body, expect=422)
    missing = {
        "member_id": "mem_doesnotexist",
        "amount": 10,
        "currency": "MYR",
        "reference_id": "x",
    }
    assert (await op(api, "earn", missing, expect=404))["error"]["code"] == "MEMBER_NOT_FOUND"


# ---------------------------------------------------------------- award and spend


async def test_redeem_draws_from_the_soonest_expiring_batch_first(
    api: ApiClient, member: dict[str, Any], db: Database
) -> None:
    never = await award(api, member["id"], 100)
    later = await award(api, member["id"], 100, expires_at=future(60))
    sooner = await award(api, member["id"], 100, expires_at=future(10))
    older_same_expiry = await award(api, member["id"], 50, expires_at=future(60))
    result = await op(api, "redeem", {"member_id": member["id"], "points": 180})
    taken = [(a["batch_id"], a["points"]) for a in result["transaction"]["allocations"]]
    assert taken == [
        (sooner["transaction"]["batch_id"], 100),
        (later["transaction"]["batch_id"], 80),
    ]
    result = await op(api, "redeem", {"member_id": member["id"], "points": 100})
    taken = [(a["batch_id"], a["points"]) for a in result["transaction"]["allocations"]]
    assert taken == [
        (later["transaction"]["batch_id"], 20),
        (older_same_expiry["transaction"]["batch_id"], 50),
        (never["transaction"]["batch_id"], 30),
    ]
    assert result["balance"]["current_balance"] == 70
    assert result["balance"]["lifetime_redeemed"] == 280
    await check_ledger(db)


async def test_redeem_beyond_the_balance_is_refused_and_writes_nothing(
    api: ApiClient, member: dict[str, Any], db: Database
) -> None:
    await award(api, member["id"], 100)
    before = await ledger_snapshot(db, member["id"])
    error = await op(api, "redeem", {"member_id": member["id"], "points": 101}, expect=409)
    assert error["error"]["code"] == "INSUFFICIENT_POINTS"
    assert error["error"]["details"] == {"balance": 100, "requested": 101}
    assert await ledger_snapshot(db, member["id"]) == before
    assert await events(api, member["id"], "points.redeemed") == []


async def test_award_with_expiry_in_the_past_is_refused(
    api: ApiClient, member: dict[str, Any]
) -> None:
    body = {"member_id": member["id"], "points": 5, "reason": "x", "expires_at": future(-1)}
    await op(api, "award", body, expect=422)


async def test_award_event_carries_notify(api: ApiClient, member: dict[str, Any]) -> None:
    await award(api, member["id"], 10, notify=True)
    (event,) = await events(api, member["id"], "points.earned")
    assert event["data"]["notify"] is True
    assert event["data"]["points"] == 10


async def test_support_agent_awards_below_its_limit_only(
    api: ApiClient, member: dict[str, Any], db: Database
) -> None:
    agent = api.with_key(await issue_key(db, Role.SUPPORT_AGENT))
    await award(agent, member["id"], 999)
    body = {"member_id": member["id"], "points": 1000, "reason": "x"}
    error = await op(agent, "award", body, expect=403)
    assert error["error"]["code"] == "LIMIT_EXCEEDED"
    assert error["error"]["details"]["limit"] == 999
    await set_program(api, role_limits={"support_agent": {"award": 5000, "deduct": 0}})
    await award(agent, member["id"], 1000)
    assert (await summary(api, member["id"]))["current_balance"] == 1999


async def test_integration_key_cannot_award_or_deduct(
    api: ApiClient, member: dict[str, Any], db: Database
) -> None:
    integration = api.with_key(await issue_key(db, Role.INTEGRATION))
    body = {"member_id": member["id"], "points": 1, "reason": "x"}
    assert (await integration.post("/api/v1/points/award", body)).status_code == 403
    assert (await integration.post("/api/v1/points/deduct", body)).status_code == 403


# ---------------------------------------------------------------- deduct and approvals


async def test_manager_deduction_under_the_limit_applies_at_once(
    api: ApiClient, member: dict[str, Any], db: Database
) -> None:
    manager = api.with_key(await issue_key(db, Role.MANAGER))
    await award(api, member["id"], 10_000)
    result = await op(manager, "deduct", {"member_id": member["id"], "points": 4999, "reason": "x"})
    assert result["transaction"]["type"] == "deduct"
    assert result["balance"]["current_balance"] == 5001
    assert len(await events(api, member["id"], "points.deducted")) == 1


async def test_deduction_above_the_limit_waits_for_approval_by_someone_else(
    api: ApiClient, member: dict[str, Any], db: Database
) -> None:
    manager = api.with_key(await issue_key(db, Role.MANAGER))
    other_manager = api.with_key(await issue_key(db, Role.MANAGER))
    await award(api, member["id"], 10_000)
    held = await op(
        manager, "deduct", {"member_id": member["id"], "points": 5000, "reason": "fraud"}, 202
    )
    assert held["status"] == "pending"
    assert (await summary(api, member["id"]))["current_balance"] == 10_000
    assert len(await events(api, member["id"], "approval.requested")) == 1

    own = await manager.post(f"/api/v1/approvals/{held['id']}/approve", {})
    assert own.status_code == 403
    assert own.json()["error"]["code"] == "SELF_APPROVAL"

    approved = await other_manager.post(f"/api/v1/approvals/{held['id']}/approve", {"note": "ok"})
    assert approved.status_code == 200, approved.text
    assert approved.json()["status"] == "approved"
    assert approved.json()["transaction_id"] is not None
    (decided,) = await events(api, member["id"], "approval.decided")
    assert decided["data"] | {"occurred_at": None, "decided_by": None} == {
        "approval_id": held["id"],
        "operation": "deduct",
        "member_id": member["id"],
        "points": 5000,
        "decision": "approved",
        "decided_by": None,
        "note": "ok",
        "transaction_id": approved.json()["transaction_id"],
        "occurred_at": None,
    }
    assert (await summary(api, member["id"]))["current_balance"] == 5000
    again = await other_manager.post(f"/api/v1/approvals/{held['id']}/approve")  # no body
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "APPROVAL_DECIDED"
    assert (await summary(api, member["id"]))["current_balance"] == 5000
    await check_ledger(db)


async def test_support_agent_deduction_always_needs_approval_and_can_be_rejected(
    api: ApiClient, member: dict[str, Any], db: Database
) -> None:
    agent = api.with_key(await issue_key(db, Role.SUPPORT_AGENT))
    await award(api, member["id"], 100)
    held = await op(agent, "deduct", {"member_id": member["id"], "points": 1, "reason": "x"}, 202)
    rejected = await api.post(f"/api/v1/approvals/{held['id']}/reject")  # the note is optional
    assert rejected.status_code == 200, rejected.text
    assert rejected.json()["status"] == "rejected"
    assert (await summary(api, member["id"]))["current_balance"] == 100
    listed = await api.get("/api/v1/approvals", params={"status": "rejected"})
    assert [a["id"] for a in listed.json()["data"]] == [held["id"]]
    (decided,) = await events(api, member["id"], "approval.decided")
    assert (decided["data"]["decision"], decided["data"]["transaction_id"]) == ("rejected", None)
    assert decided["data"]["approval_id"] == held["id"]


async def test_approvals_are_listed_newest_first_page_by_page(
    api: ApiClient, member: dict[str, Any]
) -> None:
    await award(api, member["id"], 100)
    body = {"member_id": member["id"], "points": 1, "reason": "x", "require_approval": True}
    held = [(await op(api, "deduct", body, 202))["id"] for _ in range(3)]
    first = (await api.get("/api/v1/approvals", params={"limit": 2})).json()
    assert [a["id"] for a in first["data"]] == [held[2], held[1]]
    cursor = first["pagination"]["next_cursor"]
    rest = (await api.get("/api/v1/approvals", params={"limit": 2, "cursor": cursor})).json()
    assert [a["id"] for a in rest["data"]] == [held[0]]
    assert rest["pagination"]["has_more"] is False


async def test_require_approval_holds_even_an_admin_deduction(
    api: ApiClient, member: dict[str, Any], db: Database
) -> None:
    await award(api, member["id"], 100)
    body = {"member_id": member["id"], "points": 10, "reason": "x", "require_approval": True}
    held = await op(api, "deduct", body, 202)
    assert held["requested_role"] == "admin"
    assert (await summary(api, member["id"]))["current_balance"] == 100


async def test_approving_a_deduction_the_balance_no_longer_covers_keeps_it_pending(
    api: ApiClient, member: dict[str, Any], db: Database
) -> None:
    manager = api.with_key(await issue_key(db, Role.MANAGER))
    await award(api, member["id"], 6000)
    held = await op(
        manager, "deduct", {"member_id": member["id"], "points": 6000, "reason": "x"}, 202
    )
    await op(api, "redeem", {"member_id": member["id"], "points": 100})
    response = await api.post(f"/api/v1/approvals/{held['id']}/approve", {})
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "INSUFFICIENT_POINTS"
    current = await api.get(f"/api/v1/approvals/{held['id']}")
    assert current.json()["status"] == "pending"


# ---------------------------------------------------------------- reverse


async def _earn(api: ApiClient, member_id: str, amount: int, reference: str) -> dict[str, Any]:
    body = {"member_id": member_id, "amount": amount, "currency": "MYR", "reference_id": reference}
    return dict(await op(api, "earn", body))


async def test_reversing_an_unspent_earn_cancels_its_batch(
    api: ApiClient, member: dict[str, Any], db: Database
) -> None:
    earned = await _earn(api, member["id"], 20_000, "order-1")
    result = await op(
        api,
        "reverse",
        {"member_id": member["id"], "earn_reference_id": "order-1", "reference_id": "refund-1"},
    )
    assert result["transaction"]["points"] == -100
    assert result["transaction"]["related_transaction_id"] == earned["transaction"]["id"]
    assert result["balance"]["current_balance"] == 0
    assert result["balance"]["lifetime_earned"] == 0
    batches = await api.get(f"/api/v1/members/{member['id']}/points/batches")
    assert [b["status"] for b in batches.json()["data"]] == ["cancelled"]
    await check_ledger(db)


async def test_partial_reversals_never_exceed_the_earn(
    api: ApiClient, member: dict[str, Any], db: Database
) -> None:
    earned = await _earn(api, member["id"], 20_000, "order-2")
    txn = earned["transaction"]["id"]
    body = {"member_id": member["id"], "transaction_id": txn, "points": 60}
    await op(api, "reverse", {**body, "reference_id": "r-1"})
    error = await op(api, "reverse", {**body, "reference_id": "r-2"}, expect=409)
    assert error["error"]["code"] == "EXCEEDS_REVERSIBLE"
    assert error["error"]["details"] == {"reversible": 40, "requested": 60}
    await op(api, "reverse", {**body, "points": 40, "reference_id": "r-3"})
    error = await op(api, "reverse", {**body, "points": 1, "reference_id": "r-4"}, expect=409)
    assert error["error"]["code"] == "NOTHING_TO_REVERSE"
    assert (await summary(api, member["id"]))["current_balance"] == 0
    await check_ledger(db)


async def test_reversing_a_spent_earn_takes_the_points_from_the_balance(
    api: ApiClient, member: dict[str, Any], db: Database
) -> None:
    await _earn(api, member["id"], 20_000, "order-3")  # 100 points, the oldest batch
    await award(api, member["id"], 500)
    await op(api, "redeem", {"member_id": member["id"], "points": 150})
    result = await op(
        api,
        "reverse",
        {"member_id": member["id"], "earn_reference_id": "order-3", "reference_id": "refund-3"},
    )
    assert result["transaction"]["points"] == -100
    assert result["transaction"]["details"]["cancelled_unspent"] == 0
    assert result["transaction"]["details"]["taken_from_balance"] == 100
    assert result["balance"]["current_balance"] == 350
    await check_ledger(db)


async def test_reversal_that_would_go_negative_is_refused_under_forbid(
    api: ApiClient, member: dict[str, Any], db: Database
) -> None:
    await _earn(api, member["id"], 20_000, "order-4")
    await op(api, "redeem", {"member_id": member["id"], "points": 80})
    before = await ledger_snapshot(db, member["id"])
    body = {"member_id": member["id"], "earn_reference_id": "order-4", "reference_id": "refund-4"}
    error = await op(api, "reverse", body, expect=409)
    assert error["error"]["code"] == "INSUFFICIENT_POINTS"
    assert error["error"]["details"]["to_take_back"] == 80
    assert await ledger_snapshot(db, member["id"]) == before


async def test_reversal_may_leave_a_negative_balance_that_the_next_points_settle(
    api: ApiClient, member: dict[str, Any], db: Database
) -> None:
    await set_program(api, negative_balance_policy="allow_for_reversals")
    await _earn(api, member["id"], 20_000, "order-5")  # 100 points
    await op(api, "redeem", {"member_id": member["id"], "points": 80})
    body = {"member_id": member["id"], "earn_reference_id": "order-5", "reference_id": "refund-5"}
    result = await op(api, "reverse", body)
    assert result["balance"]["current_balance"] == -80
    assert result["transaction"]["details"]["left_owing"] == 80
    alerts = await api.get("/api/v1/events", params={"type": "alert.raised"})
    assert [e["data"]["alert_type"] for e in alerts.json()["data"]] == ["NEGATIVE_BALANCE"]
    error = await op(api, "redeem", {"member_id": member["id"], "points": 1}, expect=409)
    assert error["error"]["code"] == "INSUFFICIENT_POINTS"
    await award(api, member["id"], 100)
    assert (await summary(api, member["id"]))["current_balance"] == 20
    await op(api, "redeem", {"member_id": member["id"], "points": 20})
    await check_ledger(db)


async def test_a_deficit_is_paid_by_points_arriving_in_several_batches_at_once(
    api: ApiClient, member: dict[str, Any], db: Database
) -> None:
    await set_program(api, negative_balance_policy="allow_for_reversals")
    await _earn(api, member["id"], 2_000, "order-7")  # 10 points
    await op(api, "redeem", {"member_id": member["id"], "points": 10})
    body = {"member_id": member["id"], "earn_reference_id": "order-7", "reference_id": "refund-7"}
    await op(api, "reverse", body)
    assert (await summary(api, member["id"]))["current_balance"] == -10
    giver = (await api.post("/api/v1/members", {"email": "giver@example.com"})).json()
    soon, later = utcnow() + timedelta(days=10), utcnow() + timedelta(days=20)
    await award(api, giver["id"], 30, expires_at=soon.isoformat())
    await award(api, giver["id"], 30, expires_at=later.isoformat())
    # The transfer lands as two batches (one per expiry): the first pays the deficit.
    transfer = {"from_member_id": giver["id"], "to_member_id": member["id"], "points": 60}
    await op(api, "transfer", transfer)
    assert (await summary(api, member["id"]))["current_balance"] == 50
    await check_ledger(db)
    # Spending the 50 leaves nothing to expire later, and nothing owed.
    await op(api, "redeem", {"member_id": member["id"], "points": 50})
    async with db.transaction(read_only=True) as session:
        left = await session.scalar(
            select(func.sum(PointBatch.remaining))
            .join(Member, Member.id == PointBatch.member_id)
            .where(Member.public_id == member["id"], PointBatch.status == BatchStatus.ACTIVE)
        )
    assert (left or 0) == 0
    await check_ledger(db)


async def test_reversing_a_pending_earn_cancels_the_pending_points(
    api: ApiClient, member: dict[str, Any], db: Database
) -> None:
    await set_program(api, pending_days=30)
    await _earn(api, member["id"], 20_000, "order-6")
    body = {"member_id": member["id"], "earn_reference_id": "order-6", "reference_id": "refund-6"}
    result = await op(api, "reverse", body)
    assert result["transaction"]["pending_points"] == -100
    assert result["balance"]["pending_balance"] == 0
    await check_ledger(db)


async def test_reverse_needs_exactly_one_way_to_name_the_earn(
    api: ApiClient, member: dict[str, Any]
) -> None:
    body = {"member_id": member["id"], "reference_id": "r"}
    await op(api, "reverse", body, expect=422)
    await op(api, "reverse", {**body, "transaction_id": "txn_x", "earn_reference_id": "a"}, 422)
    error = await op(api, "reverse", {**body, "earn_reference_id": "nope"}, expect=404)
    assert error["error"]["code"] == "TRANSACTION_NOT_FOUND"


# ---------------------------------------------------------------- extend, expire, recover


async def test_extend_moves_a_batch_expiry_later_only(
    api: ApiClient, member: dict[str, Any], db: Database
) -> None:
    awarded = await award(api, member["id"], 100, expires_at=future(5))
    batch = awarded["transaction"]["batch_id"]
    body = {"batch_id": batch, "expires_at": future(2), "reason": "goodwill"}
    await op(api, "extend", body, expect=422)
    result = await op(api, "extend", {**body, "expires_at": future(40)})
    assert result["transaction"]["type"] == "extend"
    assert result["transaction"]["points"] == 0
    assert await expire_points(db, utcnow() + timedelta(days=10)) == 0
    assert (await summary(api, member["id"]))["current_balance"] == 100
    missing = await op(api, "extend", {**body, "batch_id": "pbt_missing"}, expect=404)
    assert missing["error"]["code"] == "BATCH_NOT_FOUND"


async def test_expired_points_can_be_recovered_with_a_new_expiry(
    api: ApiClient, member: dict[str, Any], db: Database
) -> None:
    first = await award(api, member["id"], 100, expires_at=future(1))
    await award(api, member["id"], 40, expires_at=future(1))
    assert await expire_points(db, utcnow() + timedelta(days=2)) == 2
    points = await summary(api, member["id"])
    assert (points["current_balance"], points["lifetime_expired"]) == (0, 140)
    (expired,) = await events(api, member["id"], "points.expired")
    assert expired["data"]["points"] == 140
    assert expired["data"]["batches"] == 2

    body = {
        "batch_id": first["transaction"]["batch_id"],
        "reason": "complaint",
        "expires_at": future(30),
        "points": 60,
    }
    result = await op(api, "recover", body)
    assert result["balance"]["current_balance"] == 60
    assert result["balance"]["lifetime_expired"] == 80
    error = await op(api, "recover", {**body, "points": 41}, expect=409)
    assert error["error"]["code"] == "EXCEEDS_RECOVERABLE"
    body = {"transaction_id": expired["data"]["transaction_id"], "reason": "all of it"}
    result = await op(api, "recover", body)
    assert result["transaction"]["points"] == 80
    assert result["balance"]["lifetime_expired"] == 0
    error = await op(api, "recover", body, expect=409)
    assert error["error"]["code"] == "NOTHING_TO_RECOVER"
    await check_ledger(db)


async def test_manager_cannot_recover_expired_points(
    api: ApiClient, member: dict[str, Any], db: Database
) -> None:
    manager = api.with_key(await issue_key(db, Role.MANAGER))
    body = {"batch_id": "pbt_x", "reason": "x"}
    assert (await manager.post("/api/v1/points/recover", body)).status_code == 403


# ---------------------------------------------------------------- transfer


async def test_transfer_moves_points_with_their_expiry(
    api: ApiClient, member: dict[str, Any], db: Database
) -> None:
    other = await api.create_member()
    await award(api, member["id"], 100, expires_at=future(10))
    await award(api, member["id"], 100)
    body = {
        "from_member_id": member["id"],
        "to_member_id": other["id"],
        "points": 150,
        "reference_id": "gift-1",
    }
    result = await op(api, "transfer", body)
    assert result["transfer_out"]["balance_after"] == 50
    assert result["transfer_in"]["balance_after"] == 150
    again = await op(api, "transfer", body, expect=200)
    assert again["replayed"] is True
    assert again["transfer_in"]["id"] == result["transfer_in"]["id"]
    third = await api.create_member()
    error = await op(api, "transfer", {**body, "to_member_id": third["id"]}, expect=409)
    assert error["error"]["code"] == "REFERENCE_ID_REUSED"
    schedule = (await summary(api, other["id"]))["expiration_schedule"]
    assert [item["amount"] for item in schedule] == [100]
    await check_ledger(db)
    error = await op(
        api, "transfer", {**body, "to_member_id": member["id"], "reference_id": "x"}, expect=422
    )
    assert error["error"]["code"] == "VALIDATION_ERROR"
    error = await op(api, "transfer", {**body, "points": 51, "reference_id": "y"}, expect=409)
    assert error["error"]["code"] == "INSUFFICIENT_POINTS"


# ---------------------------------------------------------------- reads


async def test_points_summary_has_the_seed_fields(
    api: ApiClient, member: dict[str, Any], db: Database
) -> None:
    await award(api, member["id"], 300, expires_at=future(10))
    await award(api, member["id"], 200, expires_at=future(90))
    await op(api, "redeem", {"member_id": member["id"], "points": 100})
    points = await summary(api, member["id"])
    assert points["current_balance"] == 400
    assert points["expiring_balance"] == 200
    assert points["lifetime_earned"] == 500
    assert points["lifetime_redeemed"] == 100
    assert [i["amount"] for i in points["expiration_schedule"]] == [200, 200]
    assert [t["type"] for t in points["recent_transactions"]] == ["redeem", "award", "award"]
    assert points["balance_value"] == 400
    assert points["currency"] == "MYR"


async def test_balance_as_of_a_past_time_comes_from_the_log(
    api: ApiClient, member: dict[str, Any]
) -> None:
    await award(api, member["id"], 100)
    middle = utcnow()
    await award(api, member["id"], 50)
    path = f"/api/v1/members/{member['id']}/points/balance"
    response = await api.get(path, params={"as_of": middle.isoformat()})
    assert response.json()["current_balance"] == 100
    response = await api.get(path, params={"as_of": future(-365)})
    assert response.json()["current_balance"] == 0
    assert (await api.get(path)).json()["current_balance"] == 150


async def test_transactions_filter_by_member_type_and_date_and_page(
    api: ApiClient, member: dict[str, Any]
) -> None:
    other = await api.create_member()
    for _ in range(3):
        await award(api, member["id"], 10)
    await award(api, other["id"], 10)
    await op(api, "redeem", {"member_id": member["id"], "points": 5})
    listed = await api.get(
        "/api/v1/points/transactions",
        params={"member_id": member["id"], "type": "award", "limit": 2},
    )
    page = listed.json()
    assert [t["type"] for t in page["data"]] == ["award", "award"]
    assert page["pagination"]["has_more"] is True
    rest = await api.get(
        "/api/v1/points/transactions",
        params={
            "member_id": member["id"],
            "type": "award",
            "cursor": page["pagination"]["next_cursor"],
        },
    )
    assert len(rest.json()["data"]) == 1
    everything = await api.get("/api/v1/points/transactions", params={"type": ["award", "redeem"]})
    assert len(everything.json()["data"]) == 5
    later = await api.get("/api/v1/points/transactions", params={"date_from": future(1)})
    assert later.json()["data"] == []
    own = await api.get(
        f"/api/v1/members/{member['id']}/points/transactions", params={"type": "redeem"}
    )
    assert [t["points"] for t in own.json()["data"]] == [-5]
    bad = await api.get("/api/v1/points/transactions", params={"type": "bogus"})
    assert bad.status_code == 422


async def test_organisation_key_sees_only_its_members_points(api: ApiClient, db: Database) -> None:
    org = await api.create_organisation()
    other_org = await api.create_organisation()
    inside = await api.create_member(organisation_id=org["id"])
    outside = await api.create_member(organisation_id=other_org["id"])
    await award(api, inside["id"], 10)
    await award(api, outside["id"], 10)
    bound = api.with_key(await issue_key(db, Role.ADMIN, organisation=org["id"]))
    listed = await bound.get("/api/v1/points/transactions")
    assert {t["member_id"] for t in listed.json()["data"]} == {inside["id"]}
    assert (await bound.get(f"/api/v1/members/{outside['id']}/points")).status_code == 404
    body = {"member_id": outside["id"], "points": 1}
    assert (await bound.post("/api/v1/points/redeem", body)).status_code == 404
    # An award finds the member and its (existing) account in one read: out of reach is
    # still not found, and nothing is written.
    refused = await bound.post("/api/v1/points/award", {**body, "reason": "outside"})
    assert refused.status_code == 404
    assert refused.json()["error"]["code"] == "MEMBER_NOT_FOUND"
    assert (await api.get(f"/api/v1/members/{outside['id']}/points")).json()[
        "current_balance"
    ] == 10
    allowed = await bound.post(
        "/api/v1/points/award", {"member_id": inside["id"], "points": 1, "reason": "inside"}
    )
    assert allowed.status_code == 201
    assert allowed.json()["balance"]["current_balance"] == 11


@pytest.mark.parametrize(
    "settings_patch",
    [
        {"expiry_policy": "days_after_earn"},
        {"expiry_policy": "fixed_date", "expiry_fixed_month": 2, "expiry_fixed_day": 30},
        {"timezone": "Mars/Olympus"},
        # Zone files a host may hold that are no portable zone: the host's own setting, none.
        {"timezone": "localtime"},
        {"timezone": "Factory"},
        {"timezone": "posixrules"},
        {"timezone": "right/UTC"},
        {"earn_per_amount": 0},
        {},
        {"unknown": 1},
    ],
)
async def test_inconsistent_program_settings_are_refused(
    api: ApiClient, settings_patch: dict[str, Any]
) -> None:
    response = await api.patch("/api/v1/program", settings_patch)
    assert response.status_code == 422, response.text
    assert (await api.get("/api/v1/program")).json()["expiry_policy"] == "never"


async def test_the_programs_time_of_change_moves_only_when_it_changes(api: ApiClient) -> None:
    # The defaults were never saved: no time of change, however often they are read.
    assert (await api.get("/api/v1/program")).json()["updated_at"] is None
    assert (await api.get("/api/v1/program")).json()["updated_at"] is None
    saved = await api.patch("/api/v1/program", {"earn_points": 2})
    assert saved.status_code == 200, saved.text
    changed_at = saved.json()["updated_at"]
    assert changed_at is not None
    assert (await api.get("/api/v1/program")).json()["updated_at"] == changed_at
    assert (await api.patch("/api/v1/program", {"earn_points": 2})).json()["updated_at"] == (
        changed_at
    )


async def test_a_patch_of_one_role_limit_keeps_every_other_limit(
    api: ApiClient, db: Database
) -> None:
    await set_program(
        api,
        role_limits={
            "manager": {"award": 1000, "deduct": 4999},
            "support_agent": {"award": 50, "deduct": 0},
        },
        alert_thresholds={"large_redemption_points": 50},
    )
    after = await set_program(
        api,
        role_limits={"manager": {"deduct": 100}},
        alert_thresholds={"points_expiring_days": 7},
    )
    assert after["role_limits"]["manager"] == {"award": 1000, "deduct": 100}
    assert after["role_limits"]["support_agent"] == {"award": 50, "deduct": 0}
    assert after["alert_thresholds"]["points_expiring_days"] == 7
    assert after["alert_thresholds"]["large_redemption_points"] == 50
    # null is a value: no limit, for that one field.
    cleared = await set_program(api, role_limits={"support_agent": {"award": None}})
    assert cleared["role_limits"]["support_agent"] == {"award": None, "deduct": 0}
    assert cleared["role_limits"]["manager"] == {"award": 1000, "deduct": 100}
    manager = api.with_key(await issue_key(db, Role.MANAGER))
    member = await api.create_member()
    refused = await manager.post(
        "/api/v1/points/award", {"member_id": member["id"], "points": 1001, "reason": "x"}
    )
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["code"] == "LIMIT_EXCEEDED"
