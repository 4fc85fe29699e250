"""GET /api/v1/analytics/kpis: seed 004's points KPIs from the ledger, on a known history.

The history, for members A and B (organisation 1) and C and D (organisation 2):

- 40 days ago: A is awarded 1000, B 500; C earns 100 (a 200.00 purchase).
- yesterday: A redeems 300; B is awarded 200 that expire; C earns 200; D earns 50, and the
  purchase is refunded (the earn reversed).

Points are worth half a minor unit each (1 per 2 points, rounded down).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update

from memberhub.alerts.jobs import check_rates
from memberhub.auth.roles import Role
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.members.models import Member
from memberhub.points.jobs import expire_points
from memberhub.points.models import PointTransaction
from tests.alerts.conftest import alerts, award, earn, redeem, reverse, set_program
from tests.analytics.conftest import MoveIntoPast
from tests.conftest import issue_key
from tests.support import ApiClient

KPIS = "/api/v1/analytics/kpis"
EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


@pytest.fixture
async def history(api: ApiClient, db: Database, move_into_past: MoveIntoPast) -> dict[str, Any]:
    await set_program(api, point_value_amount=1, point_value_points=2)
    first = await api.create_organisation()
    second = await api.create_organisation()
    a = await api.create_member(organisation_id=first["id"])
    b = await api.create_member(organisation_id=first["id"])
    c = await api.create_member(organisation_id=second["id"])
    await award(api, a["id"], 1000)
    await award(api, b["id"], 500)
    await earn(api, c["id"], 20_000)
    await move_into_past(EPOCH, timedelta(days=40))

    recent = utcnow()
    d = await api.create_member(organisation_id=second["id"])
    await redeem(api, a["id"], 300)
    await award(api, b["id"], 200, expires_at=recent + timedelta(hours=1))
    await earn(api, c["id"], 40_000)
    refunded = await earn(api, d["id"], 10_000)
    await reverse(api, d["id"], refunded["transaction"]["id"])
    assert await expire_points(db, recent + timedelta(hours=2)) == 1
    await move_into_past(recent, timedelta(days=1))
    return {"first": first, "second": second}


async def kpis(api: ApiClient, **params: Any) -> dict[str, Any]:
    response = await api.get(KPIS, params)
    assert response.status_code == 200, response.text
    return dict(response.json())


def _without_times(body: dict[str, Any]) -> dict[str, Any]:
    window = {k: v for k, v in body["window"].items() if k not in ("start", "end")}
    return {**{k: v for k, v in body.items() if k != "as_of"}, "window": window}


async def test_kpis_now_on_a_known_history(api: ApiClient, history: dict[str, Any]) -> None:
    body = await kpis(api)

    assert _without_times(body) == {
        "currency": "MYR",
        "members_count": 4,
        # A 700, B 500 (its 200 expired), C 300, D 0.
        "points_liability": {
            "total_outstanding": 1500,
            "pending": 0,
            "total": 1500,
            "value": 750,
            "currency": "MYR",
        },
        # A 1000, B 500, C 100.
        "liability_30d_ago": 1600,
        "monthly_growth_percent": -6.25,
        "redemption_cost_30d": 150,
        # 300 and 200 of 1600 + 400 (200 awarded, 200 + 50 earned, 50 reversed).
        "redemption_rate_percent": 15.0,
        "expiration_rate_percent": 10.0,
        "active_points_users": 3,
        "average_balance": 500.0,
        "window": {"outstanding_at_start": 1600, "credited": 400, "redeemed": 300, "expired": 200},
    }
    start = datetime.fromisoformat(body["window"]["start"])
    end = datetime.fromisoformat(body["window"]["end"])
    assert end - start == timedelta(days=30)
    assert end == datetime.fromisoformat(body["as_of"])


async def test_kpis_as_of_an_earlier_moment_come_from_the_transaction_log(
    api: ApiClient, history: dict[str, Any]
) -> None:
    as_of = utcnow() - timedelta(days=20)

    body = await kpis(api, as_of=as_of.isoformat())

    assert datetime.fromisoformat(body["as_of"]) == as_of
    assert _without_times(body) == {
        "currency": "MYR",
        "members_count": 3,
        "points_liability": {
            "total_outstanding": 1600,
            "pending": 0,
            "total": 1600,
            "value": 800,
            "currency": "MYR",
        },
        "liability_30d_ago": 0,
        "monthly_growth_percent": None,
        "redemption_cost_30d": 0,
        "redemption_rate_percent": 0.0,
        "expiration_rate_percent": 0.0,
        "active_points_users": 3,
        "average_balance": 533.33,
        "window": {"outstanding_at_start": 0, "credited": 1600, "redeemed": 0, "expired": 0},
    }


async def test_kpis_as_of_now_from_the_log_agree_with_the_accounts(
    api: ApiClient, history: dict[str, Any]
) -> None:
    from_accounts = await kpis(api)
    from_log = await kpis(api, as_of=utcnow().isoformat())

    assert from_log["points_liability"] == from_accounts["points_liability"]
    assert from_log["active_points_users"] == from_accounts["active_points_users"]


async def test_an_erased_members_points_are_no_liability_from_its_erasure_on(
    api: ApiClient,
) -> None:
    """No one can use an erased member's points: from the erasure on they are in no
    figure (as the member is in no `members_count`); before it, they were."""
    kept, erased = await api.create_member(), await api.create_member()
    await award(api, kept["id"], 50)
    await award(api, erased["id"], 100)
    before = utcnow()
    assert (await api.delete(f"/api/v1/members/{erased['id']}")).status_code == 204

    for body in (await kpis(api), await kpis(api, as_of=utcnow().isoformat())):
        assert body["members_count"] == 1
        assert body["active_points_users"] == 1
        assert body["points_liability"]["total"] == 50
    earlier = await kpis(api, as_of=before.isoformat())
    assert (earlier["members_count"], earlier["points_liability"]["total"]) == (2, 150)


async def test_the_series_counts_an_erased_members_points_until_its_erasure(
    api: ApiClient, db: Database
) -> None:
    kept, erased = await api.create_member(), await api.create_member()
    await award(api, kept["id"], 50)
    await award(api, erased["id"], 100)
    assert (await api.delete(f"/api/v1/members/{erased['id']}")).status_code == 204
    now = utcnow()
    erased_at = now - timedelta(days=40)
    async with db.transaction() as session:
        await session.execute(
            update(PointTransaction).values(occurred_at=now - timedelta(days=100))
        )
        await session.execute(
            update(Member).where(Member.public_id == erased["id"]).values(deleted_at=erased_at)
        )

    response = await api.get("/api/v1/analytics/kpis/series", {"months": 4})
    assert response.status_code == 200, response.text
    points = response.json()["points"]
    totals = {datetime.fromisoformat(p["as_of"]) < erased_at for p in points}
    assert totals == {True, False}  # month ends on both sides of the erasure
    for point in points:
        expected = 150 if datetime.fromisoformat(point["as_of"]) < erased_at else 50
        assert point["points_liability"]["total"] == expected, point["as_of"]
        single = await kpis(api, as_of=point["as_of"])
        assert single["points_liability"] == point["points_liability"]
        assert single["active_points_users"] == point["active_points_users"]


async def test_an_organisation_bound_key_gets_the_kpis_of_its_members_only(
    api: ApiClient, db: Database, history: dict[str, Any]
) -> None:
    manager = api.with_key(await issue_key(db, Role.MANAGER, organisation=history["first"]["id"]))

    body = await kpis(manager)

    assert _without_times(body) == {
        "currency": "MYR",
        "members_count": 2,
        "points_liability": {
            "total_outstanding": 1200,
            "pending": 0,
            "total": 1200,
            "value": 600,
            "currency": "MYR",
        },
        "liability_30d_ago": 1500,
        "monthly_growth_percent": -20.0,
        "redemption_cost_30d": 150,
        # 300 and 200 of 1500 + 200.
        "redemption_rate_percent": 17.65,
        "expiration_rate_percent": 11.76,
        "active_points_users": 2,
        "average_balance": 600.0,
        "window": {"outstanding_at_start": 1500, "credited": 200, "redeemed": 300, "expired": 200},
    }


async def test_the_rate_alerts_use_the_same_rates_as_the_kpis(
    api: ApiClient, db: Database, history: dict[str, Any]
) -> None:
    await set_program(
        api,
        alert_thresholds={"high_expiration_rate_percent": 5, "low_redemption_rate_percent": 20},
    )
    as_of = utcnow()
    body = await kpis(api, as_of=as_of.isoformat())

    async with db.transaction() as session:
        assert await check_rates(session, as_of) == 2

    rates = {a["type"]: a["data"] for a in await alerts(api)}
    assert rates["HIGH_EXPIRATION_RATE"]["rate_percent"] == body["expiration_rate_percent"]
    assert rates["LOW_REDEMPTION_RATE"]["rate_percent"] == body["redemption_rate_percent"]
    for data in rates.values():
        assert (data["window_start"], data["window_end"]) == (
            body["window"]["start"].replace("Z", "+00:00"),
            body["window"]["end"].replace("Z", "+00:00"),
        )
        assert _without_times(body)["window"] == {
            k: data[k] for k in ("outstanding_at_start", "credited", "redeemed", "expired")
        }


async def test_an_empty_ledger_has_zero_kpis_and_no_rates(api: ApiClient) -> None:
    await api.create_member()

    body = await kpis(api)

    assert body["members_count"] == 1
    assert body["points_liability"]["total"] == 0
    assert body["monthly_growth_percent"] is None
    assert body["redemption_rate_percent"] is None
    assert body["expiration_rate_percent"] is None
    assert body["active_points_users"] == 0
    assert body["average_balance"] is None
    assert body["redemption_cost_30d"] == 0


async def test_as_of_must_be_a_valid_moment_not_in_the_future(api: ApiClient) -> None:
    for bad in (
        (utcnow() + timedelta(days=1)).isoformat(),
        "yesterday",
        "1900-01-01T00:00:00Z",
        "0001-01-01T00:00:00Z",
        "9999-12-31T23:59:59Z",
    ):
        response = await api.get(KPIS, {"as_of": bad})
        assert response.status_code == 422, (bad, response.text)
        assert response.json()["error"]["code"] == "VALIDATION_ERROR"


async def test_as_of_before_the_earliest_moment_says_so(api: ApiClient) -> None:
    response = await api.get(KPIS, {"as_of": "1960-01-01T00:00:00Z"})

    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["message"] == "as_of must be on or after 1970-01-31."
    assert error["details"]["field"] == "as_of"


async def test_kpis_need_the_analytics_scope(api: ApiClient, db: Database) -> None:
    integration = api.with_key(await issue_key(db, Role.INTEGRATION))

    response = await integration.get(KPIS)

    assert response.status_code == 403, response.text
