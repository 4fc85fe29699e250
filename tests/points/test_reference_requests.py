"""A reference_id names one request: repeated exactly it replays the first answer, and
repeated with anything else changed (another earn to reverse, another expiry, reason or
recipient, points left out where they were given) it is refused with 409
REFERENCE_ID_REUSED and changes nothing. A deduction's reference names one deduction,
whether it was applied at once or held for approval."""

from __future__ import annotations

from typing import Any

from memberhub.auth.roles import Role
from memberhub.kit.db import Database
from tests.conftest import issue_key
from tests.points.conftest import award, check_ledger, ledger_snapshot, op, summary
from tests.support import ApiClient


async def _refused(api: ApiClient, operation: str, body: dict[str, Any], db: Database) -> None:
    before = await ledger_snapshot(db, body.get("member_id") or body["from_member_id"])
    error = (await op(api, operation, body, expect=409))["error"]
    assert error["code"] == "REFERENCE_ID_REUSED", error
    assert await ledger_snapshot(db, body.get("member_id") or body["from_member_id"]) == before


async def _replayed(api: ApiClient, operation: str, body: dict[str, Any], first: Any) -> None:
    again = await op(api, operation, body, expect=200)
    assert again["replayed"] is True
    assert again["transaction"]["id"] == first["transaction"]["id"]


async def test_a_reversal_reference_names_one_earn_and_one_amount(
    api: ApiClient, db: Database, member: dict[str, Any]
) -> None:
    earns = [
        await op(
            api,
            "earn",
            {"member_id": member["id"], "amount": amount, "currency": "MYR", "reference_id": ref},
        )
        for amount, ref in ((2000, "order-1"), (4000, "order-2"))
    ]
    first = {"member_id": member["id"], "earn_reference_id": "order-1", "points": 2}
    first["reference_id"] = "refund-1"
    reversed_once = await op(api, "reverse", first)

    await _replayed(api, "reverse", first, reversed_once)
    other_earn = {**first, "earn_reference_id": "order-2"}
    await _refused(api, "reverse", other_earn, db)
    by_id = {k: v for k, v in first.items() if k != "earn_reference_id"}
    await _refused(api, "reverse", {**by_id, "transaction_id": earns[1]["transaction"]["id"]}, db)
    everything_left = {k: v for k, v in first.items() if k != "points"}
    await _refused(api, "reverse", everything_left, db)
    # The same earn named by its transaction id is the same request.
    same_by_id = {**by_id, "transaction_id": earns[0]["transaction"]["id"]}
    await _replayed(api, "reverse", same_by_id, reversed_once)


async def test_an_award_reference_names_its_expiry_reason_and_notice(
    api: ApiClient, db: Database, member: dict[str, Any]
) -> None:
    body = {
        "member_id": member["id"],
        "points": 5,
        "reason": "survey",
        "reference_id": "survey-7",
        "expires_at": "2031-01-01T00:00:00Z",
    }
    first = await op(api, "award", body)
    # The same instant written with another offset is the same request.
    await _replayed(api, "award", {**body, "expires_at": "2031-01-01T08:00:00+08:00"}, first)
    for changed in (
        {"expires_at": "2032-01-01T00:00:00Z"},
        {"expires_at": None},
        {"reason": "another survey"},
        {"notify": True},
    ):
        await _refused(api, "award", {**body, **changed}, db)


async def test_redeem_and_transfer_references_name_their_reason_and_recipient(
    api: ApiClient, db: Database, member: dict[str, Any]
) -> None:
    other = await api.create_member()
    await award(api, member["id"], 100)
    redeem = {"member_id": member["id"], "points": 10, "reason": "mug", "reference_id": "r-1"}
    first = await op(api, "redeem", redeem)
    await _replayed(api, "redeem", redeem, first)
    await _refused(api, "redeem", {**redeem, "reason": "cap"}, db)

    transfer = {
        "from_member_id": member["id"],
        "to_member_id": other["id"],
        "points": 5,
        "reason": "gift",
        "reference_id": "t-1",
    }
    moved = await op(api, "transfer", transfer)
    again = await op(api, "transfer", transfer, expect=200)
    assert again["replayed"] is True
    assert again == {**moved, "replayed": True}
    await _refused(api, "transfer", {**transfer, "reason": "another gift"}, db)


async def test_a_deduction_reference_names_one_deduction_held_or_applied(
    api: ApiClient, db: Database, member: dict[str, Any]
) -> None:
    await award(api, member["id"], 100)
    applied = {"member_id": member["id"], "points": 10, "reason": "fix", "reference_id": "d-1"}
    first = await op(api, "deduct", applied)
    await _replayed(api, "deduct", applied, first)
    # Holding it for approval now would hold nothing: approving it could only point at the
    # deduction already applied.
    await _refused(api, "deduct", {**applied, "require_approval": True}, db)
    assert (await api.get("/api/v1/approvals")).json()["data"] == []

    held = {**applied, "reference_id": "d-2", "require_approval": True}
    response = await api.post("/api/v1/points/deduct", held)
    assert response.status_code == 202, response.text
    approval = response.json()
    assert response.headers["Location"] == f"/api/v1/approvals/{approval['id']}"
    assert (await api.get(response.headers["Location"])).json()["status"] == "pending"
    # Applied directly, the held deduction's reference is refused; the request stays
    # pending and, approved by another manager, deducts once.
    await _refused(api, "deduct", {**held, "require_approval": False}, db)
    await _refused(api, "deduct", {**held, "reason": "another fix"}, db)
    manager = api.with_key(await issue_key(db, Role.MANAGER))
    decided = await manager.post(f"/api/v1/approvals/{approval['id']}/approve", {})
    assert decided.status_code == 200, decided.text
    assert (await summary(api, member["id"]))["current_balance"] == 80
    await check_ledger(db)


async def test_a_held_deduction_approved_after_its_member_moved_deducts_under_its_reference(
    api: ApiClient, db: Database
) -> None:
    """A held deduction's reference was taken in the member's organisation of the time;
    after a move, a deduction with the same reference in the new organisation is another
    one: approving the held one deducts it, never replays the other."""
    first = await api.create_organisation()
    second = await api.create_organisation()
    member = await api.create_member(organisation_id=first["id"])
    await award(api, member["id"], 1000)
    body = {"member_id": member["id"], "points": 300, "reason": "fix", "reference_id": "R"}
    held = await op(api, "deduct", {**body, "require_approval": True}, expect=202)
    moved = await api.patch(f"/api/v1/members/{member['id']}", {"organisation_id": second["id"]})
    assert moved.status_code == 200, moved.text
    direct = await op(api, "deduct", body)
    assert direct["balance"]["current_balance"] == 700

    manager = api.with_key(await issue_key(db, Role.MANAGER))
    decided = await manager.post(f"/api/v1/approvals/{held['id']}/approve", {})

    assert decided.status_code == 200, decided.text
    assert decided.json()["transaction_id"] != direct["transaction"]["id"]
    assert (await summary(api, member["id"]))["current_balance"] == 400
    await check_ledger(db)


async def test_the_held_deductions_of_an_erased_member_are_gone_with_it(
    api: ApiClient, db: Database, member: dict[str, Any]
) -> None:
    await award(api, member["id"], 100)
    body = {"member_id": member["id"], "points": 10, "reason": "fix", "require_approval": True}
    held = [await op(api, "deduct", {**body, "reference_id": f"h-{n}"}, expect=202) for n in (1, 2)]
    assert (await api.delete(f"/api/v1/members/{member['id']}")).status_code == 204

    manager = api.with_key(await issue_key(db, Role.MANAGER))
    answers = [
        await manager.get(f"/api/v1/approvals/{held[0]['id']}"),
        await manager.post(f"/api/v1/approvals/{held[0]['id']}/reject", {}),
        await manager.post(f"/api/v1/approvals/{held[1]['id']}/approve", {}),
    ]

    assert [a.status_code for a in answers] == [404, 404, 404], [a.text for a in answers]
    assert {a.json()["error"]["code"] for a in answers} == {"APPROVAL_NOT_FOUND"}
    assert (await manager.get("/api/v1/approvals", params={"status": "pending"})).json()[
        "data"
    ] == []
