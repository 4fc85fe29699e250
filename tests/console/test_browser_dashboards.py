"""The analytics and integrations dashboards in a real browser: the KPI numbers shown are
the API's, the charts are drawn and visible, a conflict is settled from the integration's
page, with accessibility basics and a screenshot of every page (see tests/console/browser.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from playwright.async_api import Browser, Page

from memberhub.kit.db import Database
from tests.alerts.conftest import award, redeem

# Fixtures: recorded history moved into the past, and an organisation's HubSpot with runs
# and an open conflict.
from tests.analytics.conftest import MoveIntoPast, move_into_past  # noqa: F401
from tests.console.browser import DESKTOP, Console, check_page, require_chromium
from tests.console.support import PASSWORD, create_staff_user
from tests.console.test_integration_pages import crm  # noqa: F401
from tests.crm.conftest import hub, hubspot  # noqa: F401
from tests.support import ApiClient

require_chromium()

EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


def percent(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f} %"


async def signed_in_page(chromium: Browser, console: Console, db: Database) -> Page:
    await create_staff_user(db, "ada@example.org", role="admin")
    page = await chromium.new_page(viewport=DESKTOP)
    await page.goto(f"{console.url}/console/sign-in")
    await page.get_by_label("Email").fill("ada@example.org")
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_url(f"{console.url}/console")
    return page


async def text(page: Page, selector: str) -> str:
    return (await page.locator(selector).inner_text()).strip()


async def test_the_analytics_dashboard_shows_the_apis_kpis_and_its_charts(
    console: Console,
    chromium: Browser,
    db: Database,
    api: ApiClient,
    move_into_past: MoveIntoPast,  # noqa: F811
) -> None:
    first = await api.create_member()
    second = await api.create_member()
    await award(api, first["id"], 2000)
    await move_into_past(EPOCH, timedelta(days=45))
    await redeem(api, first["id"], 500)
    await award(api, second["id"], 750)
    page = await signed_in_page(chromium, console, db)

    await page.get_by_role("link", name="Analytics").first.click()
    await page.wait_for_url(f"{console.url}/console/analytics")
    await check_page(page, console, "analytics")

    kpis = (await api.get("/api/v1/analytics/kpis")).json()
    assert await text(page, "#kpi-liability") == f"{kpis['points_liability']['total']:,}"
    assert await text(page, "#kpi-liability") == "2,250"
    assert await text(page, "#kpi-growth") == percent(kpis["monthly_growth_percent"])
    assert await text(page, "#kpi-redemption-rate") == percent(kpis["redemption_rate_percent"])
    assert await text(page, "#kpi-expiration-rate") == percent(kpis["expiration_rate_percent"])
    assert await text(page, "#kpi-active-users") == str(kpis["active_points_users"])
    assert await text(page, "#kpi-average-balance") == f"{kpis['average_balance']:,.2f}"
    for chart in ("#liability-chart", "#users-chart"):
        svg = page.locator(f"{chart} svg[role=img]")
        assert await svg.is_visible()
        box = await svg.bounding_box()
        assert box is not None
        assert box["width"] > 200
        assert box["height"] > 80
        assert await page.locator(f"{chart} polyline.chart-line").count() >= 1
    # The line is drawn in the stylesheet's colour: the CSP let the stylesheet apply.
    stroke = await page.locator("#liability-chart polyline.chart-line").first.evaluate(
        "line => getComputedStyle(line).stroke"
    )
    assert stroke == "rgb(11, 92, 173)"
    await page.get_by_text("Points liability at each month end: the numbers").click()
    last_row = page.locator("#liability-chart-table tbody tr").last
    assert await last_row.inner_text() == "Now\t2,250"
    await check_page(page, console, "analytics-numbers-open")

    await page.get_by_label("Months shown").select_option("3")
    await page.get_by_role("button", name="Show").click()
    await page.wait_for_url(f"{console.url}/console/analytics?months=3")
    assert await page.locator("#users-chart-table tbody tr").count() == 3
    await check_page(page, console, "analytics-3-months")


async def test_the_integrations_dashboard_and_a_conflict_settled_from_the_page(
    console: Console,
    chromium: Browser,
    db: Database,
    api: ApiClient,
    crm: dict[str, Any],  # noqa: F811
) -> None:
    page = await signed_in_page(chromium, console, db)

    await page.get_by_role("link", name="Integrations").first.click()
    await page.wait_for_url(f"{console.url}/console/integrations")
    await check_page(page, console, "integrations")
    external = (await api.get("/api/v1/external/sync/status")).json()
    activity = (await api.get("/api/v1/external/sync/activity")).json()
    assert await text(page, "#open-conflicts") == str(external["open_conflicts"]) == "1"
    assert await text(page, "#leads-imported") == str(activity["leads_imported"])
    assert await text(page, "#runs-today") == str(activity["runs"])

    integration_id = crm["integration"]["id"]
    await page.get_by_role("link", name=crm["integration"]["name"], exact=True).click()
    await page.wait_for_url(f"{console.url}/console/integrations/{integration_id}")
    await check_page(page, console, "integration")
    path = f"/api/v1/integrations/{integration_id}/conflicts"
    [conflict] = (await api.get(path, {"status": "open"})).json()["data"]

    await page.get_by_role("button", name=f"Keep memberhub's value for {conflict['id']}").click()
    await page.wait_for_selector(f"text=Conflict {conflict['id']} resolved")
    await check_page(page, console, "integration-after-resolve")
    [after] = (await api.get(path)).json()["data"]
    assert (after["status"], after["resolution"]) == ("resolved", "memberhub")
    assert "No open conflicts." in await page.locator("main").inner_text()

    await page.get_by_role("link", name=crm["pull"]["id"]).click()
    await page.wait_for_url(f"**/runs/{crm['pull']['id']}")
    await check_page(page, console, "sync-run")
    records = (await api.get(f"/api/v1/sync-runs/{crm['pull']['id']}/records")).json()["data"]
    assert await page.locator("#records-table tbody tr").count() == len(records)
