"""The analytics dashboard: the KPIs and the charts over time show the numbers of
GET /api/v1/analytics/kpis and /kpis/series, for the staff user's organisations only."""

from __future__ import annotations

import random
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from memberhub.auth.roles import Role
from memberhub.console.charts import format_value
from memberhub.kit.db import Database
from tests.alerts.conftest import award, redeem

# The fixture that moves recorded history into the past, shared with the analytics tests.
from tests.analytics.conftest import MoveIntoPast, move_into_past  # noqa: F401
from tests.conftest import issue_key
from tests.console.support import create_staff_user, sign_in
from tests.support import ApiClient

PAGE = "/console/analytics"
EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


NASTY = ["", "0", "-1", "9" * 40, "1e9", "\u202e", "{{7*7}}", "%ZZ", "<b>", "NaN", "12 "]


def fuzzed_queries(names: list[str], count: int) -> list[dict[str, str]]:
    """Random query strings over `names`, with awkward values and stray characters."""
    chooser = random.Random(29)
    return [
        {
            chooser.choice(names): chooser.choice(NASTY)
            + "".join(chr(chooser.randrange(1, 0x2FFF)) for _ in range(chooser.randrange(6)))
            for _ in range(chooser.randrange(1, 4))
        }
        for _ in range(count)
    ]


def shown(html: str, element_id: str) -> str:
    match = re.search(rf'id="{element_id}">([^<]*)<', html)
    assert match is not None, element_id
    return match.group(1)


def percent(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f} %"


def chart_rows(html: str, chart_id: str) -> list[tuple[str, str]]:
    table = re.search(rf'<table id="{chart_id}-table">(.*?)</table>', html, re.S)
    assert table is not None, chart_id
    return re.findall(r'<th scope="row">([^<]*)</th><td>([^<]*)</td>', table.group(1))


@pytest.fixture
async def history(
    api: ApiClient,
    move_into_past: MoveIntoPast,  # noqa: F811
) -> dict[str, Any]:
    """Organisation 1: A awarded 1000 40 days ago, redeems 250 now; B awarded 300 now.
    Organisation 2: C awarded 5000 40 days ago."""
    first = await api.create_organisation()
    second = await api.create_organisation()
    a = await api.create_member(organisation_id=first["id"])
    b = await api.create_member(organisation_id=first["id"])
    c = await api.create_member(organisation_id=second["id"])
    await award(api, a["id"], 1000)
    await award(api, c["id"], 5000)
    await move_into_past(EPOCH, timedelta(days=40))
    await redeem(api, a["id"], 250)
    await award(api, b["id"], 300)
    return {"first": first["id"], "second": second["id"]}


def assert_kpis_shown(html: str, kpis: dict[str, Any]) -> None:
    assert shown(html, "kpi-liability") == f"{kpis['points_liability']['total']:,}"
    assert shown(html, "kpi-growth") == percent(kpis["monthly_growth_percent"])
    assert shown(html, "kpi-redemption-rate") == percent(kpis["redemption_rate_percent"])
    assert shown(html, "kpi-expiration-rate") == percent(kpis["expiration_rate_percent"])
    assert shown(html, "kpi-active-users") == f"{kpis['active_points_users']:,}"
    average = kpis["average_balance"]
    assert shown(html, "kpi-average-balance") == ("—" if average is None else f"{average:,.2f}")


def assert_charts_shown(html: str, series: list[dict[str, Any]]) -> None:
    labels = [datetime.fromisoformat(p["as_of"]).strftime("%b %Y") for p in series[:-1]]
    labels.append("Now")
    assert chart_rows(html, "liability-chart") == [
        (label, format_value(p["points_liability"]["total"]))
        for label, p in zip(labels, series, strict=True)
    ]
    assert chart_rows(html, "users-chart") == [
        (label, format_value(p["active_points_users"]))
        for label, p in zip(labels, series, strict=True)
    ]
    assert html.count('<svg class="chart-svg" role="img"') == 2


async def test_the_dashboard_shows_the_apis_kpis_and_series(
    browser: httpx.AsyncClient, api: ApiClient, db: Database, history: dict[str, Any]
) -> None:
    await create_staff_user(db, role="admin")
    await sign_in(browser)

    page = await browser.get(PAGE)

    assert page.status_code == 200, page.text
    kpis = (await api.get("/api/v1/analytics/kpis")).json()
    assert kpis["points_liability"]["total"] == 6050
    assert_kpis_shown(page.text, kpis)
    series = (await api.get("/api/v1/analytics/kpis/series")).json()["points"]
    assert_charts_shown(page.text, series)
    assert page.text.count("<h1>") == 1


async def test_fewer_months_on_request(
    browser: httpx.AsyncClient, api: ApiClient, db: Database, history: dict[str, Any]
) -> None:
    await create_staff_user(db, role="manager")
    await sign_in(browser)
    page = await browser.get(PAGE, params={"months": "3"})
    series = (await api.get("/api/v1/analytics/kpis/series", {"months": 3})).json()["points"]
    assert_charts_shown(page.text, series)
    assert '<option value="3" selected>' in page.text
    odd = await browser.get(PAGE, params={"months": "5"})
    assert '<option value="5" selected>' in odd.text
    assert len(chart_rows(odd.text, "users-chart")) == 5


async def test_an_org_bound_staff_user_sees_the_figures_of_their_organisation_only(
    browser: httpx.AsyncClient, api: ApiClient, db: Database, history: dict[str, Any]
) -> None:
    await create_staff_user(db, role="manager", organisation=history["first"])
    await sign_in(browser)
    scoped = api.with_key(await issue_key(db, Role.MANAGER, organisation=history["first"]))

    page = await browser.get(PAGE)

    kpis = (await scoped.get("/api/v1/analytics/kpis")).json()
    assert kpis["points_liability"]["total"] == 1050
    assert_kpis_shown(page.text, kpis)
    assert_charts_shown(
        page.text, (await scoped.get("/api/v1/analytics/kpis/series")).json()["points"]
    )
    assert "6,050" not in page.text


async def test_an_empty_programme_shows_dashes_and_empty_charts(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    await create_staff_user(db, role="admin")
    await sign_in(browser)
    page = await browser.get(PAGE)
    assert page.status_code == 200
    assert_kpis_shown(page.text, (await api.get("/api/v1/analytics/kpis")).json())
    assert shown(page.text, "kpi-average-balance") == "—"


async def test_a_role_without_analytics_is_refused_and_not_offered_the_page(
    browser: httpx.AsyncClient, db: Database
) -> None:
    await create_staff_user(db, role="support_agent")
    await sign_in(browser)
    refused = await browser.get(PAGE)
    assert refused.status_code == 403
    assert "analytics:read" in refused.text
    home = await browser.get("/console")
    assert 'href="/console/analytics"' not in home.text


async def test_signed_out_visitors_are_sent_to_sign_in(browser: httpx.AsyncClient) -> None:
    response = await browser.get(PAGE)
    assert response.status_code == 303
    assert response.headers["location"].startswith("/console/sign-in?next=")


@pytest.mark.parametrize("months", ["0", "1", "25", "x", "", "12.5", "-3", "9" * 40])
async def test_bad_months_get_a_clear_error_page(
    browser: httpx.AsyncClient, db: Database, months: str
) -> None:
    await create_staff_user(db, role="admin")
    await sign_in(browser)
    response = await browser.get(PAGE, params={"months": months})
    assert response.status_code == 422
    assert "<h1>" in response.text


async def test_fuzzed_query_strings_never_fail_the_page(
    browser: httpx.AsyncClient, db: Database
) -> None:
    await create_staff_user(db, role="admin")
    await sign_in(browser)
    for query in fuzzed_queries(["months", "as_of", "x"], 40):
        response = await browser.get(PAGE, params=query)
        assert response.status_code < 500, (query, response.status_code)
    for raw in ("months=%FF%FE%00", "months=1&months=x", "%", "months=%E0%A4%A", "=&=&"):
        response = await browser.get(f"{PAGE}?{raw}")
        assert response.status_code < 500, (raw, response.status_code)
