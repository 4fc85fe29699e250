"""The approvals, alerts, staff and API keys pages in a real browser: a manager approves a
held deduction and acknowledges an alert, an admin creates a staff account and an API key
and revokes it; each page checked for accessibility basics with screenshots (see
tests/console/browser.py), and what the pages show compared with the JSON API."""

from __future__ import annotations

from typing import Any

import httpx
from playwright.async_api import Browser, Page

from memberhub.auth.roles import Role
from memberhub.kit.db import Database
from tests.alerts.conftest import alerts, award, redeem, set_program
from tests.conftest import issue_key
from tests.console.browser import DESKTOP, Console, check_page, require_chromium
from tests.console.support import PASSWORD, create_staff_user
from tests.support import ApiClient

require_chromium()


async def _sign_in(page: Page, console: Console, email: str) -> None:
    await page.goto(f"{console.url}/console/sign-in")
    await page.get_by_label("Email").fill(email)
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_url(f"{console.url}/console")


async def _column(page: Page, table: str, css_class: str) -> dict[str, str]:
    """The text of one column of a table, by row id."""
    rows = page.locator(f"table#{table} tbody tr")
    found = {}
    for index in range(await rows.count()):
        row = rows.nth(index)
        row_id = await row.get_attribute("data-id")
        assert row_id is not None
        found[row_id] = (await row.locator(f"td.{css_class}").inner_text()).strip()
    return found


async def test_a_manager_approves_a_held_deduction_and_acknowledges_an_alert(
    console: Console, chromium: Browser, db: Database, api: ApiClient
) -> None:
    manager_id = await create_staff_user(db, "mia@example.org", role="manager")
    await set_program(api, alert_thresholds={"large_redemption_points": 50})
    member = await api.create_member(email="member@example.org")
    await award(api, member["id"], 1000)
    await redeem(api, member["id"], 60)
    agent = api.with_key(await issue_key(db, Role.SUPPORT_AGENT))
    held = []
    for points in (120, 80):
        sent = await agent.post(
            "/api/v1/points/deduct",
            {"member_id": member["id"], "points": points, "reason": f"Correction of {points}"},
        )
        assert sent.status_code == 202, sent.text
        held.append(sent.json())
    page = await chromium.new_page(viewport=DESKTOP)
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text))
    await _sign_in(page, console, "mia@example.org")

    await page.get_by_role("link", name="Approvals").first.click()
    await page.wait_for_url(f"{console.url}/console/approvals")
    await check_page(page, console, "approvals")
    api_pending = (await api.get("/api/v1/approvals", {"status": "pending"})).json()["data"]
    assert await _column(page, "approvals", "points") == {
        a["id"]: str(a["points"]) for a in api_pending
    }

    await page.get_by_role("link", name=held[0]["id"]).click()
    await check_page(page, console, "approval")
    await page.get_by_label("Note (optional)").fill("Receipt checked")
    await page.get_by_role("button", name="Approve and deduct 120 points").click()
    await page.wait_for_selector("text=120 points deducted")
    assert await page.locator("#approval-status").inner_text() == "approved"
    assert await page.locator("#decided-by").inner_text() == manager_id
    await check_page(page, console, "approval-approved")
    decided = (await api.get(f"/api/v1/approvals/{held[0]['id']}")).json()
    assert (decided["status"], decided["decided_by"]) == ("approved", manager_id)
    balance = (await api.get(f"/api/v1/points/transactions?member_id={member['id']}")).json()
    assert balance["data"][0]["balance_after"] == 1000 - 60 - 120

    await page.goto(f"{console.url}/console/approvals")
    await page.get_by_role("button", name="Reject").click()
    await page.wait_for_selector(f"text=Rejected {held[1]['id']}")
    await check_page(page, console, "approval-rejected")
    assert (await api.get(f"/api/v1/approvals/{held[1]['id']}")).json()["status"] == "rejected"
    await page.goto(f"{console.url}/console/approvals?status=all")
    assert await _column(page, "approvals", "status") == {
        held[0]["id"]: "approved",
        held[1]["id"]: "rejected",
    }
    await check_page(page, console, "approvals-all")

    await page.get_by_role("link", name="Alerts").first.click()
    await page.wait_for_url(f"{console.url}/console/alerts")
    await check_page(page, console, "alerts")
    (alert,) = await alerts(api)
    assert await _column(page, "alerts", "status") == {alert["id"]: "open"}
    await page.get_by_role("link", name=alert["id"]).click()
    await check_page(page, console, "alert")
    await page.get_by_label("Note (optional)").fill("Seen")
    await page.get_by_role("button", name="Acknowledge").click()
    await page.wait_for_selector("text=acknowledged.")
    assert await page.locator("#alert-status").inner_text() == "acknowledged"
    await check_page(page, console, "alert-acknowledged")
    (acknowledged,) = await alerts(api, status="acknowledged")
    assert acknowledged["acknowledged_by"] == manager_id
    await page.get_by_role("link", name="Back to alerts").click()
    assert await _column(page, "alerts", "status") == {}
    await page.get_by_label("Status").select_option("acknowledged")
    await page.get_by_role("button", name="Filter").click()
    assert await _column(page, "alerts", "status") == {alert["id"]: "acknowledged"}
    await check_page(page, console, "alerts-acknowledged")
    assert errors == []


async def test_an_admin_manages_staff_and_api_keys(
    console: Console, chromium: Browser, db: Database, api: ApiClient
) -> None:
    await create_staff_user(db, "ana@example.org")
    member = await api.create_member()
    page = await chromium.new_page(viewport=DESKTOP)
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text))
    await _sign_in(page, console, "ana@example.org")

    await page.get_by_role("link", name="Staff").first.click()
    await page.wait_for_url(f"{console.url}/console/staff")
    await check_page(page, console, "staff")
    await page.get_by_label("Email").fill("lee@example.org")
    await page.get_by_label("Name").fill("Lee Chen")
    await page.get_by_label("Role").select_option("support_agent")
    await page.get_by_role("button", name="Create").click()
    one_time = await page.locator("#one-time-password").inner_text()
    assert len(one_time) >= 12
    await check_page(page, console, "staff-created")
    await page.get_by_role("link", name="Open the account").click()
    await check_page(page, console, "staff-member")
    await page.get_by_label("Role").select_option("manager")
    await page.get_by_role("button", name="Save").click()
    await page.wait_for_selector("text=saved")
    assert await page.locator("#staff-role-now").inner_text() == "manager"
    staff: dict[str, Any] = {s["email"]: s for s in (await api.get("/api/v1/staff")).json()["data"]}
    assert staff["lee@example.org"]["role"] == "manager"
    await page.goto(f"{console.url}/console/staff")
    assert await _column(page, "staff", "role") == {s["id"]: s["role"] for s in staff.values()}
    assert one_time not in await page.content()

    await page.get_by_role("link", name="API keys").first.click()
    await page.wait_for_url(f"{console.url}/console/keys")
    await check_page(page, console, "keys")
    await page.get_by_label("Name").fill("front desk")
    await page.get_by_label("Role").select_option("support_agent")
    await page.get_by_label("Rate limit").fill("100/minute")
    await page.get_by_label("members:read").check()
    await page.get_by_role("button", name="Create key").click()
    secret = await page.locator("#key-secret").inner_text()
    key_id = await page.locator("#key-id").inner_text()
    await check_page(page, console, "key-created")
    async with httpx.AsyncClient(base_url=console.url) as client:
        headers = {"Authorization": f"Bearer {secret}"}
        works = await client.get(f"/api/v1/members/{member['id']}", headers=headers)
        assert works.status_code == 200

        await page.goto(f"{console.url}/console/keys")
        assert secret not in await page.content()
        listed = (await api.get("/api/v1/api-keys")).json()["data"]
        assert set(await _column(page, "keys", "state")) == {k["id"] for k in listed}
        await page.locator(f'tr[data-id="{key_id}"]').get_by_role("button", name="Revoke").click()
        await page.wait_for_selector(f"text=API key {key_id}")
        assert (await _column(page, "keys", "state"))[key_id] == "revoked"
        await check_page(page, console, "keys-after-revoke")
        refused = await client.get(f"/api/v1/members/{member['id']}", headers=headers)
        assert refused.status_code == 401
    assert errors == []
