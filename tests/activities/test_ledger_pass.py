"""An activity's earns are written in one ledger pass: still one transaction and one batch
per crediting rule, naming the rule and its version, with running balances, a
`points.earned` event and an audit entry each; one update of the account. Extensions and
points that pay a deficit are written one rule at a time, in the rules' order."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event, select

from memberhub.audit.models import AuditEntry
from memberhub.earning_rules.models import RuleAward
from memberhub.kit.db import Database
from memberhub.points.models import PointTransaction
from tests.activities.conftest import (
    activity_body,
    balance,
    create_rule,
    on_type,
    record,
    transactions,
)
from tests.points.conftest import award, check_ledger, set_program
from tests.support import ApiClient


async def _three_rules(api: ApiClient) -> list[dict[str, Any]]:
    return [
        await create_rule(
            api,
            name=f"Rule {points}",
            priority=points,
            conditions=on_type("booking.completed"),
            effect={"type": "fixed_points", "points": points},
        )
        for points in (30, 20, 10)
    ]


async def test_three_crediting_rules_write_three_earns_with_running_balances(
    api: ApiClient, db: Database
) -> None:
    member = await api.create_member()
    await award(api, member["id"], 5)
    rules = await _three_rules(api)
    activity = (await record(api, activity_body(member)))["activity"]
    credits = activity["credits"]
    assert [(c["rule_id"], c["points"]) for c in credits] == [
        (rules[0]["id"], 30),
        (rules[1]["id"], 20),
        (rules[2]["id"], 10),
    ]
    earns = list(reversed(await transactions(api, member["id"], type="earn")))
    assert [t["id"] for t in earns] == [c["transaction_id"] for c in credits]
    assert [(t["points"], t["balance_after"]) for t in earns] == [(30, 35), (20, 55), (10, 65)]
    assert [(t["details"]["rule_id"], t["details"]["rule_version"]) for t in earns] == [
        (rule["id"], 1) for rule in rules
    ]
    assert [t["reference_id"] for t in earns] == [
        f"activity:{activity['id']}:{rule['id']}" for rule in rules
    ]
    assert await balance(api, member["id"]) == 65
    batches = (await api.get(f"/api/v1/members/{member['id']}/points/batches")).json()["data"]
    assert sorted(b["initial"] for b in batches) == [5, 10, 20, 30]
    events = (await api.get("/api/v1/events", {"type": "points.earned"})).json()["data"]
    earned = [
        e["data"]["transaction_id"] for e in events if e["data"]["transaction_type"] == "earn"
    ]
    assert sorted(earned) == sorted(t["id"] for t in earns)
    recorded = (await api.get("/api/v1/events", {"type": "activity.recorded"})).json()["data"]
    assert [e["data"]["activity"]["credits"] for e in recorded] == [credits]
    async with db.transaction(read_only=True) as session:
        actions = (
            await session.scalars(
                select(AuditEntry.action)
                .where(AuditEntry.object_id.in_([member["id"], activity["id"]]))
                .order_by(AuditEntry.id)
            )
        ).all()
        awards = (
            await session.execute(
                select(RuleAward.points, PointTransaction.public_id)
                .join(PointTransaction, PointTransaction.id == RuleAward.transaction_id)
                .order_by(RuleAward.id)
            )
        ).all()
    assert list(actions) == [
        "member.create",
        "points.award",
        *["points.earn"] * 3,
        "activity.record",
    ]
    assert [tuple(row) for row in awards] == [(c["points"], c["transaction_id"]) for c in credits]
    await check_ledger(db, [member["id"]])


async def test_the_account_is_updated_once_for_all_the_earns(api: ApiClient, db: Database) -> None:
    member = await api.create_member()
    await _three_rules(api)
    await record(api, activity_body(member))  # the caches filled
    updates: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "point_accounts" in statement and statement.lstrip().upper().startswith(
            ("UPDATE", "WITH")
        ):
            updates.append(statement)

    engine = db.request_engine.sync_engine
    event.listen(engine, "before_cursor_execute", count)
    try:
        await record(api, activity_body(member))
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert len(updates) == 1
    assert await balance(api, member["id"]) == 120


async def test_pending_earns_are_written_together_as_pending(api: ApiClient, db: Database) -> None:
    await set_program(api, pending_days=14)
    member = await api.create_member()
    await _three_rules(api)
    await record(api, activity_body(member))
    earns = list(reversed(await transactions(api, member["id"], type="earn")))
    assert [(t["points"], t["pending_points"], t["pending_after"]) for t in earns] == [
        (0, 30, 30),
        (0, 20, 50),
        (0, 10, 60),
    ]
    summary = (await api.get(f"/api/v1/members/{member['id']}/points")).json()
    assert (summary["current_balance"], summary["pending_balance"]) == (0, 60)
    await check_ledger(db, [member["id"]])


async def test_earns_that_pay_a_deficit_are_written_one_by_one_and_settle_it(
    api: ApiClient, db: Database
) -> None:
    await set_program(api, negative_balance_policy="allow_for_reversals")
    member = await api.create_member()
    earned = await api.post(
        "/api/v1/points/earn",
        {"member_id": member["id"], "amount": 20_000, "currency": "MYR", "reference_id": "o-1"},
    )
    assert earned.status_code == 201, earned.text
    redeemed = await api.post("/api/v1/points/redeem", {"member_id": member["id"], "points": 80})
    assert redeemed.status_code == 201, redeemed.text
    reversed_ = await api.post(
        "/api/v1/points/reverse",
        {"member_id": member["id"], "earn_reference_id": "o-1", "reference_id": "r-1"},
    )
    assert reversed_.status_code == 201, reversed_.text
    assert await balance(api, member["id"]) == -80
    await _three_rules(api)
    activity = (await record(api, activity_body(member)))["activity"]
    assert [c["points"] for c in activity["credits"]] == [30, 20, 10]
    assert await balance(api, member["id"]) == -20
    await check_ledger(db, [member["id"]])


async def test_an_earn_and_an_extension_on_one_activity_keep_the_rules_order(
    api: ApiClient, db: Database
) -> None:
    await set_program(api, expiry_policy="days_after_earn", expiry_days=30)
    member = await api.create_member()
    await award(api, member["id"], 50)
    extend = await create_rule(
        api,
        name="extend",
        priority=9,
        conditions=on_type("booking.completed"),
        effect={"type": "extend_expiry", "mode": "add", "days": 10},
    )
    earn = await create_rule(api, name="earn", priority=1, conditions=on_type("booking.completed"))
    activity = (await record(api, activity_body(member)))["activity"]
    assert [(c["rule_id"], c["effect"]) for c in activity["credits"]] == [
        (extend["id"], "extend_expiry"),
        (earn["id"], "fixed_points"),
    ]
    latest = await transactions(api, member["id"])
    assert [t["type"] for t in reversed(latest[:2])] == ["extend", "earn"]
    assert await balance(api, member["id"]) == 150
    await check_ledger(db, [member["id"]])
