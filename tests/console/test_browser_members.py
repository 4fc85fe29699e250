"""The members pages in a real browser: search, a member's points widget read against the
JSON API, and quick actions (redemption, a deduction held for approval, an expiry
extension, joining a plan) recorded as the staff user, with `check_page` on every page."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from playwright.async_api import Browser, Page

from memberhub.kit.db import Database
from tests.console.browser import DESKTOP, Console, check_page, require_chromium
from tests.console.support import PASSWORD, create_staff_user
from tests.support import ApiClient

require_chromium()


async def points_in(page: Page, element_id: str) -> int:
    text = await page.locator(f"#{element_id}").inner_text()
    match = re.match(r"(-?\d+) points", text.strip())
    assert match is not None, (element_id, text)
    return int(match.group(1))


async def test_search_open_a_member_read_the_widget_and_act(
    console: Console, chromium: Browser, db: Database, api: ApiClient
) -> None:
    program = {
        "currency": "EUR",
        "point_value_amount": 1,
        "point_value_points": 1,
        "role_limits": {"manager": {"award": None, "deduct": 100}},
    }
    assert (await api.patch("/api/v1/program", program)).status_code == 200
    tier = {"code": "GOLD", "name": "Gold", "rank": 1, "threshold": 5000}
    assert (await api.post("/api/v1/tiers", tier)).status_code == 201
    plan = await api.create_plan(name="Annual")
    member = await api.create_member(
        email="lee@example.org", first_name="Lee", last_name="Chong", external_ids={"crm": "88"}
    )
    await api.create_member(email="sam@example.org", first_name="Sam")
    soon = datetime.now(UTC) + timedelta(days=12)
    awarded = await api.post(
        "/api/v1/points/award",
        {
            "member_id": member["id"],
            "points": 1500,
            "reason": "Welcome",
            "expires_at": soon.isoformat(),
        },
    )
    assert awarded.status_code == 201, awarded.text
    staff_id = await create_staff_user(db, "mia@example.org", role="manager")

    page = await chromium.new_page(viewport=DESKTOP)
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text))
    await page.goto(f"{console.url}/console/sign-in")
    await page.get_by_label("Email").fill("mia@example.org")
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_url(f"{console.url}/console")

    await page.get_by_role("link", name="Members").first.click()
    await page.wait_for_url(f"{console.url}/console/members")
    await check_page(page, console, "members-all")
    await page.get_by_label("External id").fill("crm:88")
    await page.get_by_role("button", name="Find").click()
    await page.wait_for_url(re.compile(r".*external_id=crm%3A88.*"))
    rows = page.locator("table.results-table tbody tr")
    assert await rows.count() == 1
    await check_page(page, console, "members-search-results")
    await page.get_by_label("External id").fill("")
    await page.get_by_label("Name or email contains").fill("chong")
    await page.get_by_label("Status").select_option("pending")
    await page.get_by_role("button", name="Find").click()
    await page.wait_for_url(re.compile(r".*q=chong.*"))
    assert await rows.count() == 1
    await page.get_by_role("link", name="lee@example.org").click()
    await page.wait_for_url(f"{console.url}/console/members/{member['id']}")

    summary = (await api.get(f"/api/v1/members/{member['id']}/points")).json()
    assert await points_in(page, "balance") == summary["current_balance"] == 1500
    assert await page.locator("#balance-value").inner_text() == "15.00 EUR"
    assert summary["balance_value"] == 1500
    assert await points_in(page, "expiring") == summary["expiring_balance"] == 1500
    assert (
        f"1500 points valid through {soon:%Y-%m-%d}" in await page.locator("#expiring").inner_text()
    )
    assert await points_in(page, "lifetime-earned") == summary["lifetime_earned"]
    assert await points_in(page, "lifetime-redeemed") == summary["lifetime_redeemed"]
    assert await points_in(page, "lifetime-expired") == summary["lifetime_expired"]
    assert summary["next_tier"]["code"] == "GOLD"
    points_to_next = await page.locator("#points-to-next").inner_text()
    assert int(points_to_next) == summary["points_to_next_tier"] == 3500
    assert await page.locator("#tier-progress").get_attribute("value") == "1500"
    await check_page(page, console, "member-widget")

    await page.get_by_label("Points to redeem").fill("200")
    await page.get_by_label("What for (optional)").fill("Tote bag")
    await page.get_by_role("button", name="Redeem").click()
    await page.wait_for_selector("text=Redeemed 200 points.")
    assert await points_in(page, "balance") == 1300
    assert await page.locator("td.actor").first.inner_text() == staff_id
    await check_page(page, console, "member-after-redeem")

    await page.get_by_label("Points to deduct").fill("150")
    await page.get_by_label("Reason for the deduction").fill("Chargeback")
    await page.get_by_role("button", name="Deduct").click()
    await page.wait_for_selector("text=Sent for approval")
    approvals = (await api.get("/api/v1/approvals")).json()["data"]
    assert [(a["status"], a["points"], a["requested_by"]) for a in approvals] == [
        ("pending", 150, staff_id)
    ]
    assert await page.get_by_role("link", name=approvals[0]["id"]).count() == 1
    assert await points_in(page, "balance") == 1300
    await check_page(page, console, "member-after-deduct-held")

    later = (datetime.now(UTC) + timedelta(days=200)).date()
    await page.get_by_label("Points to extend").select_option(index=0)
    await page.get_by_label("New expiry date").fill(later.isoformat())
    await page.get_by_label("Reason for the extension").fill("Goodwill")
    await page.get_by_role("button", name="Extend").click()
    await page.wait_for_selector("text=Extended the expiry")
    assert await points_in(page, "expiring") == 0
    await check_page(page, console, "member-after-extend")

    await page.get_by_label("Plan", exact=True).select_option(plan["id"])
    await page.get_by_role("button", name="Join").click()
    await page.wait_for_selector("text=Joined; the membership runs to")
    assert await page.locator("#member-status").inner_text() == "active"
    assert await page.locator("#status-history td.actor").first.inner_text() == staff_id
    await check_page(page, console, "member-after-join")

    history = (await api.get(f"/api/v1/members/{member['id']}/points/transactions")).json()
    assert [(t["type"], t["actor"]) for t in history["data"]] == [
        ("extend", staff_id),
        ("redeem", staff_id),
        ("award", history["data"][-1]["actor"]),
    ]
    assert (await api.get(f"/api/v1/members/{member['id']}")).json()["status"] == "active"
    # No blocked inline script or style, no failed asset, no form warning on any page.
    assert errors == []
