"""GET /api/v1/members/{id}/clv: seed 000's calculateMemberCLV from the member's purchases.

Orders are earn transactions not reversed in full; spend is their purchase `amount`; awards
are neither. Tenure is whole days ÷ 30 (at least one month); money is rounded to the
nearest minor unit, halves up.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from memberhub.auth.roles import Role
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from tests.alerts.conftest import award, earn, reverse, set_program
from tests.analytics.conftest import SetMemberSince
from tests.conftest import issue_key
from tests.support import ApiClient


def clv_path(member_id: str) -> str:
    return f"/api/v1/members/{member_id}/clv"


async def clv(api: ApiClient, member_id: str, **params: Any) -> dict[str, Any]:
    response = await api.get(clv_path(member_id), params)
    assert response.status_code == 200, response.text
    return dict(response.json())


async def test_clv_of_a_member_with_orders(
    api: ApiClient, set_member_since: SetMemberSince
) -> None:
    member = await api.create_member()
    await earn(api, member["id"], 10_000)  # 50 points at 1 per 200
    partly_refunded = await earn(api, member["id"], 25_000)  # 125 points
    await earn(api, member["id"], 5_002)  # 25 points
    await earn(api, member["id"], 4_000)  # 20 points
    refunded = await earn(api, member["id"], 8_000)  # 40 points
    await reverse(api, member["id"], partly_refunded["transaction"]["id"], points=25)
    await reverse(api, member["id"], refunded["transaction"]["id"])
    await award(api, member["id"], 500)
    await set_member_since(member["id"], utcnow() - timedelta(days=100, hours=1), "GOLD")

    body = await clv(api, member["id"])

    assert body == {
        "member_id": member["id"],
        "currency": "MYR",
        "tier": "GOLD",
        "months": 36,
        "total_spend": 44_002,
        "points_based_spend": 44_000,  # 220 points x 200
        "earned_points": 220,
        "order_count": 4,
        "avg_order_value": 11_001,  # 11,000.5
        "tenure_months": 3.3333,  # 100 days
        "avg_orders_per_month": 1.2,
        "projected_clv": 475_222,  # 44,002 x 36 x 3 / 10 = 475,221.6
    }
    assert (await clv(api, member["id"], months=12))["projected_clv"] == 158_407  # 158,407.2


async def test_a_member_without_orders_has_a_clv_of_zero(api: ApiClient) -> None:
    member = await api.create_member()
    await award(api, member["id"], 500)

    body = await clv(api, member["id"])

    assert {k: v for k, v in body.items() if k not in ("member_id", "currency", "tier")} == {
        "months": 36,
        "total_spend": 0,
        "points_based_spend": 0,
        "earned_points": 0,
        "order_count": 0,
        "avg_order_value": 0,
        "tenure_months": 1.0,  # joined today: at least one month
        "avg_orders_per_month": 0.0,
        "projected_clv": 0,
    }


async def test_tenure_counts_from_creation_when_the_member_never_joined(
    api: ApiClient,
) -> None:
    member = await api.create_member()
    await earn(api, member["id"], 3_000)

    body = await clv(api, member["id"], months=1)

    assert body["tenure_months"] == 1.0
    assert (body["order_count"], body["avg_orders_per_month"], body["projected_clv"]) == (
        1,
        1.0,
        3_000,
    )


async def test_points_based_spend_is_null_when_the_program_earns_no_points(
    api: ApiClient,
) -> None:
    member = await api.create_member()
    await earn(api, member["id"], 3_000)
    await set_program(api, earn_points=0)

    body = await clv(api, member["id"])

    assert body["points_based_spend"] is None
    assert body["total_spend"] == 3_000


async def test_bad_horizons_and_unknown_members_are_refused(api: ApiClient) -> None:
    member = await api.create_member()
    for months in ("0", "-1", "601", "abc", "1.5"):
        response = await api.get(clv_path(member["id"]), {"months": months})
        assert response.status_code == 422, (months, response.text)
        assert response.json()["error"]["code"] == "VALIDATION_ERROR"
    unknown = await api.get(clv_path("mem_doesnotexist"))
    assert unknown.status_code == 404, unknown.text
    assert unknown.json()["error"]["code"] == "MEMBER_NOT_FOUND"
    malformed = await api.get(clv_path("not-a-member"))
    assert malformed.status_code == 422, malformed.text


async def test_an_organisation_bound_key_cannot_see_another_organisations_member(
    api: ApiClient, db: Database
) -> None:
    ours = await api.create_organisation()
    theirs = await api.create_organisation()
    member = await api.create_member(organisation_id=theirs["id"])
    manager = api.with_key(await issue_key(db, Role.MANAGER, organisation=ours["id"]))
    integration = api.with_key(await issue_key(db, Role.INTEGRATION))

    hidden = await manager.get(clv_path(member["id"]))
    refused = await integration.get(clv_path(member["id"]))

    assert hidden.status_code == 404, hidden.text
    assert refused.status_code == 403, refused.text
