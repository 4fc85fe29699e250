"""GET /api/v1/analytics/kpis/series: the KPIs at each month end, each point exactly what
GET /api/v1/analytics/kpis answers for its moment."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select, update

from memberhub.analytics.repository import AnalyticsRepository
from memberhub.analytics.service import month_ends
from memberhub.auth.roles import Role
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.members.models import Member
from memberhub.organisations.models import Organisation
from memberhub.points.models import PointTransaction
from tests.alerts.conftest import award
from tests.analytics.conftest import MoveIntoPast
from tests.conftest import issue_key
from tests.support import ApiClient

SERIES = "/api/v1/analytics/kpis/series"
EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
AGO = timedelta(days=70)


@pytest.fixture
async def history(api: ApiClient, move_into_past: MoveIntoPast) -> dict[str, Any]:
    """A (organisation 1) is awarded 1000 and B (organisation 2) 400, 70 days ago; A is
    awarded 500 more now."""
    first = await api.create_organisation()
    second = await api.create_organisation()
    a = await api.create_member(organisation_id=first["id"])
    b = await api.create_member(organisation_id=second["id"])
    await award(api, a["id"], 1000)
    await award(api, b["id"], 400)
    before_move = utcnow()
    await move_into_past(EPOCH, AGO)
    await award(api, a["id"], 500)
    return {"first": first, "second": second, "awarded_at": before_move - AGO}


def test_month_ends_are_the_last_microsecond_of_each_month_then_now() -> None:
    now = datetime(2026, 3, 15, 10, 30, tzinfo=UTC)
    assert month_ends(now, 4) == [
        datetime(2025, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        datetime(2026, 1, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        datetime(2026, 2, 28, 23, 59, 59, 999_999, tzinfo=UTC),
        now,
    ]
    assert month_ends(now, 1) == [now]


def test_month_ends_follow_the_programs_time_zone_through_daylight_saving() -> None:
    # 2026-04-01 01:30 in Kuala Lumpur is still March 31 in UTC: April is the month so far.
    now = datetime(2026, 3, 31, 17, 30, tzinfo=UTC)
    assert month_ends(now, 2, ZoneInfo("Asia/Kuala_Lumpur")) == [
        datetime(2026, 3, 31, 15, 59, 59, 999_999, tzinfo=UTC),
        now,
    ]
    # London: March ends in winter time (UTC+0), April in summer time (UTC+1).
    now = datetime(2026, 5, 10, tzinfo=UTC)
    assert month_ends(now, 3, ZoneInfo("Europe/London")) == [
        datetime(2026, 3, 31, 22, 59, 59, 999_999, tzinfo=UTC),
        datetime(2026, 4, 30, 22, 59, 59, 999_999, tzinfo=UTC),
        now,
    ]
    # Where midnight comes before UTC's: New York's January ends at 05:00 UTC on Feb 1.
    now = datetime(2026, 2, 1, 3, 0, tzinfo=UTC)  # still January there
    assert month_ends(now, 2, ZoneInfo("America/New_York")) == [
        datetime(2026, 1, 1, 4, 59, 59, 999_999, tzinfo=UTC),
        now,
    ]


async def test_each_point_is_the_kpis_at_its_month_end(
    api: ApiClient, history: dict[str, Any]
) -> None:
    response = await api.get(SERIES, {"months": 4})
    assert response.status_code == 200, response.text
    body = response.json()
    points = body["points"]
    assert body["months"] == 4
    assert len(points) == 4
    moments = [datetime.fromisoformat(p["as_of"]) for p in points]
    assert moments == sorted(moments)
    for point, moment in zip(points[:-1], moments, strict=False):
        single = await api.get("/api/v1/analytics/kpis", {"as_of": point["as_of"]})
        assert single.json() == point
        expected = 1400 if moment >= history["awarded_at"] else 0
        assert point["points_liability"]["total"] == expected
        assert point["active_points_users"] == (2 if expected else 0)
    now = (await api.get("/api/v1/analytics/kpis")).json()
    assert points[-1]["points_liability"] == now["points_liability"]
    assert points[-1]["points_liability"]["total"] == 1900
    assert points[-1]["active_points_users"] == now["active_points_users"] == 2


async def test_the_months_are_the_programs_time_zone(api: ApiClient) -> None:
    changed = await api.patch("/api/v1/program", {"timezone": "America/New_York"})
    assert changed.status_code == 200, changed.text
    points = (await api.get(SERIES, {"months": 3})).json()["points"]
    zone = ZoneInfo("America/New_York")
    for point in points[:-1]:
        as_of = datetime.fromisoformat(point["as_of"])
        # The last microsecond before a local midnight that starts a month.
        following = (as_of + timedelta(microseconds=1)).astimezone(zone)
        assert (following.day, following.hour, following.minute) == (1, 0, 0), point["as_of"]
        assert as_of.astimezone(UTC).hour in (3, 4)  # EDT or EST, never UTC's midnight


async def test_twelve_months_by_default(api: ApiClient, history: dict[str, Any]) -> None:
    body = (await api.get(SERIES)).json()
    assert len(body["points"]) == 12


async def test_an_organisation_bound_key_gets_the_series_of_its_members_only(
    api: ApiClient, db: Database, history: dict[str, Any]
) -> None:
    manager = api.with_key(await issue_key(db, Role.MANAGER, organisation=history["first"]["id"]))
    points = (await manager.get(SERIES, {"months": 3})).json()["points"]
    assert points[-1]["points_liability"]["total"] == 1500
    assert points[-1]["active_points_users"] == 1


async def test_a_role_without_analytics_is_refused(api: ApiClient, db: Database) -> None:
    agent = api.with_key(await issue_key(db, Role.SUPPORT_AGENT))
    assert (await agent.get(SERIES)).status_code == 403


@pytest.mark.parametrize("months", ["0", "25", "-1", "twelve", "1e3", ""])
async def test_months_out_of_range_are_refused(api: ApiClient, months: str) -> None:
    response = await api.get(SERIES, {"months": months})
    assert response.status_code == 422, response.text


async def test_liabilities_read_at_once_are_those_read_one_moment_at_a_time(
    api: ApiClient, db: Database, history: dict[str, Any]
) -> None:
    # Two transactions at one moment: the later one (by id) holds, as `liability_at` reads.
    member = await api.create_member(organisation_id=history["first"]["id"])
    await award(api, member["id"], 70)
    await award(api, member["id"], 30)
    async with db.transaction() as session:
        await session.execute(
            update(PointTransaction)
            .where(
                PointTransaction.member_id
                == select(Member.id).where(Member.public_id == member["id"]).scalar_subquery()
            )
            .values(occurred_at=history["awarded_at"] + timedelta(days=1))
        )
    now = utcnow()
    moments = [
        EPOCH,
        history["awarded_at"] - timedelta(days=1),
        history["awarded_at"] + timedelta(days=1),
        history["awarded_at"] + timedelta(days=2),
        now,
        now,
    ]
    async with db.transaction(read_only=True) as session:
        repository = AnalyticsRepository(session)
        organisation = await session.scalar(
            select(Organisation.id).where(Organisation.public_id == history["first"]["id"])
        )
        assert organisation is not None
        scopes: list[frozenset[int] | None] = [None, frozenset({organisation})]
        for scope in scopes:
            at_once = await repository.liability_at_many(moments, scope)
            one_by_one = {m: await repository.liability_at(m, scope) for m in moments}
            assert at_once == one_by_one
        assert at_once[history["awarded_at"] + timedelta(days=2)].outstanding == 1100
        assert await repository.liability_at_many([], None) == {}
