"""What the rules do: each effect, conditions on the member and the activity, priority and
stop-processing, caps, and the extension of every active batch's expiry."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from tests.activities.conftest import (
    activity_body,
    balance,
    create_rule,
    iso,
    noon_yesterday,
    on_type,
    record,
    transactions,
)
from tests.points.conftest import award, check_ledger, set_program
from tests.support import ApiClient


def _paid(amount: int, currency: str = "MYR", **attributes: Any) -> dict[str, Any]:
    return {"amount": amount, "currency": currency, **attributes}


async def _credits(api: ApiClient, body: dict[str, Any]) -> list[tuple[str, int]]:
    activity = (await record(api, body))["activity"]
    return [(credit["effect"], credit["points"]) for credit in activity["credits"]]


async def test_points_per_amount_round_down_stop_at_their_maximum_and_need_the_currency(
    api: ApiClient,
) -> None:
    member = await api.create_member()
    await create_rule(
        api,
        effect={
            "type": "points_per_amount",
            "points": 2,
            "per_amount": 100,
            "currency": "MYR",
            "max_points": 500,
        },
    )
    assert await _credits(api, activity_body(member, attributes=_paid(4999))) == [
        ("points_per_amount", 98)
    ]
    assert await _credits(api, activity_body(member, attributes=_paid(10**6))) == [
        ("points_per_amount", 500)
    ]
    assert await _credits(api, activity_body(member, attributes=_paid(4999, "EUR"))) == []
    assert await _credits(api, activity_body(member)) == []
    (txn, _) = await transactions(api, member["id"])
    assert (txn["amount"], txn["currency"]) == (10**6, "MYR")


async def test_a_multiplier_adds_to_what_the_rules_before_it_credited(api: ApiClient) -> None:
    gold = await api.create_member()
    tier = {"code": "gold", "name": "Gold", "rank": 1, "threshold": 10**6}
    assert (await api.post("/api/v1/tiers", tier)).status_code == 201
    assigned = await api.post(
        "/api/v1/tiers/assign", {"member_id": gold["id"], "tier_code": "gold", "reason": "vip"}
    )
    assert assigned.status_code == 200, assigned.text
    plain = await api.create_member()
    await create_rule(api, name="base", priority=10)
    await create_rule(
        api,
        name="gold double",
        priority=5,
        conditions={"field": "member.tier", "op": "eq", "value": "gold"},
        effect={"type": "multiplier", "percent": 200, "max_points": 60},
    )
    assert await _credits(api, activity_body(gold)) == [("fixed_points", 100), ("multiplier", 60)]
    assert await _credits(api, activity_body(plain)) == [("fixed_points", 100)]


async def test_the_nth_activity_of_a_type_in_a_period_earns_the_bonus(api: ApiClient) -> None:
    member = await api.create_member()
    await create_rule(
        api,
        conditions=on_type("event.attended"),
        effect={"type": "nth_activity_bonus", "points": 500, "nth": 3, "period": "month"},
    )
    await create_rule(
        api,
        conditions=on_type("booking.completed"),
        effect={
            "type": "nth_activity_bonus",
            "points": 7,
            "nth": 2,
            "period": "all_time",
            "repeat": True,
        },
    )
    moment = noon_yesterday()
    got = [
        await _credits(
            api,
            activity_body(member, type="event.attended", occurred_at=moment + timedelta(seconds=s)),
        )
        for s in range(4)
    ]
    assert got == [[], [], [("nth_activity_bonus", 500)], []]
    bookings = [
        await _credits(api, activity_body(member, occurred_at=moment + timedelta(seconds=s)))
        for s in range(5)
    ]
    assert [sum(p for _, p in c) for c in bookings] == [0, 7, 0, 7, 0]


async def test_an_nth_activity_bonus_is_paid_once_per_nth_whatever_order_they_come_in(
    api: ApiClient,
) -> None:
    """Activities arriving out of the order they occurred in (late webhooks, imports) are
    counted as recorded: the 2nd-visit bonus is paid once, not for every activity that was
    2nd by time when it arrived; with `repeat`, once per nth."""
    member = await api.create_member()
    await create_rule(
        api,
        conditions=on_type("gym"),
        effect={"type": "nth_activity_bonus", "points": 100, "nth": 2, "period": "all_time"},
    )
    await create_rule(
        api,
        conditions=on_type("pool"),
        effect={
            "type": "nth_activity_bonus",
            "points": 7,
            "nth": 2,
            "period": "all_time",
            "repeat": True,
        },
    )
    moment = noon_yesterday()
    order = (0, 2, 1, 5, 4, 3)  # hours before `moment`, as they arrive
    gym = [
        await _credits(
            api, activity_body(member, type="gym", occurred_at=moment - timedelta(hours=h))
        )
        for h in order
    ]
    assert [sum(p for _, p in c) for c in gym] == [0, 100, 0, 0, 0, 0]
    pool = [
        await _credits(
            api, activity_body(member, type="pool", occurred_at=moment - timedelta(hours=h))
        )
        for h in order
    ]
    assert [sum(p for _, p in c) for c in pool] == [0, 7, 0, 7, 0, 7]


async def test_priority_orders_the_rules_and_stop_processing_ends_the_evaluation(
    api: ApiClient,
) -> None:
    member = await api.create_member()
    await create_rule(
        api, name="everyone", priority=1, effect={"type": "fixed_points", "points": 1}
    )
    await create_rule(
        api,
        name="spa",
        priority=9,
        stop_processing=True,
        conditions={"field": "activity.attributes.category", "op": "eq", "value": "spa"},
        effect={"type": "fixed_points", "points": 50},
    )
    await create_rule(api, name="middle", priority=5, effect={"type": "fixed_points", "points": 10})
    spa = (await record(api, activity_body(member, attributes={"category": "spa"})))["activity"]
    assert [c["points"] for c in spa["credits"]] == [50]
    other = (await record(api, activity_body(member, attributes={"category": "gym"})))["activity"]
    assert [c["points"] for c in other["credits"]] == [10, 1]


async def test_conditions_read_the_member_and_the_activitys_window_and_attributes(
    api: ApiClient,
) -> None:
    organisation = (await api.create_organisation())["id"]
    inside = await api.create_member(organisation_id=organisation)
    outside = await api.create_member()
    start = noon_yesterday()
    await create_rule(
        api,
        conditions={
            "all": [
                {"field": "member.organisation_id", "op": "eq", "value": organisation},
                {"field": "member.status", "op": "in", "value": ["pending", "active"]},
                {"field": "activity.occurred_at", "op": "gte", "value": iso(start)},
                {
                    "field": "activity.occurred_at",
                    "op": "lt",
                    "value": iso(start + timedelta(hours=1)),
                },
                {"field": "activity.attributes.items.sku", "op": "contains", "value": "SKU-1"},
                {"not": {"field": "activity.attributes.custom.staff", "op": "eq", "value": True}},
            ]
        },
    )
    items = {"items": [{"sku": "SKU-9"}, {"sku": "SKU-1", "quantity": 2}]}
    assert await _credits(api, activity_body(inside, occurred_at=start, attributes=items))
    assert not await _credits(api, activity_body(outside, occurred_at=start, attributes=items))
    late = start + timedelta(hours=2)
    assert not await _credits(api, activity_body(inside, occurred_at=late, attributes=items))
    staff = {**items, "custom": {"staff": True}}
    assert not await _credits(api, activity_body(inside, occurred_at=start, attributes=staff))
    # A custom attribute of another JSON type never equals true.
    other = {**items, "custom": {"staff": 1}}
    assert await _credits(api, activity_body(inside, occurred_at=start, attributes=other))
    assert not await _credits(api, activity_body(inside, occurred_at=start))


async def test_caps_per_member_per_day_and_month_and_overall(api: ApiClient, db: Database) -> None:
    first = await api.create_member()
    second = await api.create_member()
    await create_rule(
        api,
        caps={"per_member_per_day": {"awards": 2}, "per_member_per_month": {"points": 350}},
    )
    await create_rule(
        api,
        name="first two visits overall",
        conditions=on_type("visit"),
        effect={"type": "fixed_points", "points": 5},
        caps={"overall": {"awards": 2}},
    )
    day = noon_yesterday()
    if day.day < 3:  # the two days before it are in its month
        day -= timedelta(days=3)
    daily = [
        await _credits(api, activity_body(first, occurred_at=day + timedelta(seconds=s)))
        for s in range(3)
    ]
    assert daily == [[("fixed_points", 100)], [("fixed_points", 100)], []]
    next_day = day - timedelta(days=1)
    assert await _credits(api, activity_body(first, occurred_at=next_day)) == [
        ("fixed_points", 100)
    ]
    # The month's 350 points are spent after 3.5 activities: the fourth is cut to 50.
    txns = await transactions(api, first["id"])
    assert sum(t["points"] for t in txns) == 300
    cut = await _credits(api, activity_body(first, occurred_at=day - timedelta(days=2)))
    assert cut == [("fixed_points", 50)]
    assert (await transactions(api, first["id"]))[0]["details"]["capped_by"] == (
        "per_member_per_month"
    )
    assert await _credits(api, activity_body(second, occurred_at=day)) == [("fixed_points", 100)]
    third, fourth = await api.create_member(), await api.create_member()
    visits = [await _credits(api, activity_body(m, type="visit")) for m in (third, fourth, fourth)]
    assert [sum(p for _, p in c) for c in visits] == [105, 105, 100]
    await check_ledger(db, [first["id"], second["id"], third["id"], fourth["id"]])


async def test_a_booking_with_the_extension_rule_moves_every_active_batchs_expiry(
    api: ApiClient, db: Database
) -> None:
    await set_program(api, expiry_policy="days_after_earn", expiry_days=365)
    member = await api.create_member()
    now = utcnow()
    soon = (now + timedelta(days=10)).replace(microsecond=0)
    later = (now + timedelta(days=100)).replace(microsecond=0)
    far = (now + timedelta(days=900)).replace(microsecond=0)
    for points, expires_at in ((100, soon), (50, later), (20, far)):
        await award(api, member["id"], points, expires_at=iso(expires_at))
    spent = await api.post("/api/v1/points/redeem", {"member_id": member["id"], "points": 100})
    assert spent.status_code == 201, spent.text
    rule = await create_rule(
        api,
        name="Next booking extends all points",
        conditions=on_type("booking.completed"),
        effect={"type": "extend_expiry"},
    )
    booked_at = now - timedelta(minutes=5)
    activity = (await record(api, activity_body(member, occurred_at=booked_at)))["activity"]
    (credit,) = activity["credits"]
    assert (credit["effect"], credit["points"]) == ("extend_expiry", 0)
    batches = (await api.get(f"/api/v1/members/{member['id']}/points/batches")).json()["data"]
    expiries = {b["initial"]: (b["status"], b["expires_at"]) for b in batches}
    renewed_at = _end_of_day_after(booked_at, 365)  # the program's expiry, from the booking
    assert expiries[100][0] == "spent"
    assert expiries[100][1] == iso(soon)
    assert expiries[50] == ("active", iso(renewed_at))
    assert expiries[20] == ("active", iso(far))  # already later than the renewal
    (txn, *_) = await transactions(api, member["id"])
    assert txn["id"] == credit["transaction_id"]
    assert (txn["type"], txn["points"], txn["reason"]) == ("extend", 0, rule["name"])
    assert txn["details"]["rule_id"] == rule["id"]
    assert txn["details"]["rule_version"] == 1
    (moved,) = txn["details"]["batches"]
    assert moved["points"] == 50
    assert moved["previous_expires_at"] == later.isoformat()
    assert moved["expires_at"] == renewed_at.isoformat()
    await check_ledger(db, [member["id"]])


def _end_of_day_after(moment: datetime, days: int) -> datetime:
    """Midnight (UTC) after the day `days` after `moment`'s: the program's expiry."""
    day = moment.date() + timedelta(days=days + 1)
    return datetime(day.year, day.month, day.day, tzinfo=moment.tzinfo)


async def test_the_add_mode_moves_each_active_batch_by_the_days_given(api: ApiClient) -> None:
    member = await api.create_member()
    now = utcnow().replace(microsecond=0)
    expiries = [now + timedelta(days=d) for d in (3, 40)]
    for expires_at in expiries:
        await award(api, member["id"], 10, expires_at=iso(expires_at))
    await award(api, member["id"], 10)  # never expires: nothing to move
    await create_rule(api, effect={"type": "extend_expiry", "mode": "add", "days": 30})
    await record(api, activity_body(member))
    batches = (await api.get(f"/api/v1/members/{member['id']}/points/batches")).json()["data"]
    assert [b["expires_at"] for b in batches] == [
        iso(expiries[0] + timedelta(days=30)),
        iso(expiries[1] + timedelta(days=30)),
        None,
    ]
    (txn, *_) = await transactions(api, member["id"])
    assert len(txn["details"]["batches"]) == 2
    assert await balance(api, member["id"]) == 30


async def test_the_add_mode_leaves_an_expiry_at_the_end_of_the_calendar_where_it_is(
    api: ApiClient,
) -> None:
    member = await api.create_member()
    soon = utcnow().replace(microsecond=0) + timedelta(days=3)
    await award(api, member["id"], 10, expires_at=iso(soon))
    await award(api, member["id"], 10, expires_at="9999-12-31T00:00:00Z")
    await create_rule(api, effect={"type": "extend_expiry", "mode": "add", "days": 30})
    for _ in range(2):  # and the member's next activities are evaluated as well
        await record(api, activity_body(member))
    batches = (await api.get(f"/api/v1/members/{member['id']}/points/batches")).json()["data"]
    assert [b["expires_at"] for b in batches] == [
        iso(soon + timedelta(days=60)),
        "9999-12-31T00:00:00Z",
    ]
    simulated = await api.post("/api/v1/earning-rules/simulate", activity_body(member))
    assert simulated.status_code == 200, simulated.text


async def test_an_extension_rule_with_nothing_to_extend_writes_nothing(api: ApiClient) -> None:
    member = await api.create_member()
    await create_rule(api, effect={"type": "extend_expiry", "mode": "add", "days": 30})
    activity = (await record(api, activity_body(member)))["activity"]
    assert activity["credits"] == []
    assert await transactions(api, member["id"]) == []


EVERY_SECOND_VISIT = {
    "type": "nth_activity_bonus",
    "points": 7,
    "nth": 2,
    "period": "all_time",
    "repeat": True,
}


async def test_a_new_repeating_nth_bonus_is_paid_on_every_nth_activity_only(
    api: ApiClient,
) -> None:
    member = await api.create_member()
    moment = noon_yesterday()
    for s in range(4):  # history before the rule exists
        await record(
            api, activity_body(member, type="gym", occurred_at=moment + timedelta(seconds=s))
        )
    await create_rule(api, conditions=on_type("gym"), effect=EVERY_SECOND_VISIT)
    got = []
    for s in range(6):  # the member's 5th .. 10th gym visits
        body = activity_body(member, type="gym", occurred_at=moment + timedelta(seconds=10 + s))
        got.append(sum(c["points"] for c in (await record(api, body))["activity"]["credits"]))
    assert got == [0, 7, 0, 7, 0, 7]  # the 6th, 8th and 10th


async def test_an_nth_bonus_its_daily_cap_cut_is_not_paid_on_the_next_days_first_activity(
    api: ApiClient,
) -> None:
    member = await api.create_member()
    await create_rule(
        api,
        conditions=on_type("gym"),
        effect=EVERY_SECOND_VISIT,
        caps={"per_member_per_day": {"awards": 1}},
    )
    day = noon_yesterday() - timedelta(days=1)
    points = []
    for moment in [day + timedelta(seconds=s) for s in range(4)] + [day + timedelta(days=1)]:
        body = activity_body(member, type="gym", occurred_at=moment)
        points.append(sum(c["points"] for c in (await record(api, body))["activity"]["credits"]))
    # 2nd pays; the 4th is cut by the daily cap; the 5th is not an nth activity.
    assert points == [0, 7, 0, 0, 0]
