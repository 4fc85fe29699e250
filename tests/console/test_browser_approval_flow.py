"""The console end to end across two staff users, each in their own browser session: a
support agent's deduction above their limit, made on the member page, is held in the
approvals queue; a manager approves it there, and the ledger shows the deduction with the
manager as its actor and the agent as the requester."""

from __future__ import annotations

from playwright.async_api import Browser, Page

from memberhub.kit.db import Database
from tests.console.browser import DESKTOP, Console, check_page, require_chromium
from tests.console.support import PASSWORD, create_staff_user
from tests.support import ApiClient

require_chromium()


async def _signed_in_page(chromium: Browser, console: Console, email: str) -> Page:
    """A page in a browser context of its own (its own cookie), signed in as `email`."""
    context = await chromium.new_context(viewport=DESKTOP)
    page = await context.new_page()
    await page.goto(f"{console.url}/console/sign-in")
    await page.get_by_label("Email").fill(email)
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_url(f"{console.url}/console")
    return page


async def test_a_support_agents_deduction_above_the_limit_is_approved_by_a_manager(
    console: Console, chromium: Browser, db: Database, api: ApiClient
) -> None:
    limits = {"role_limits": {"support_agent": {"award": 100, "deduct": 50}}}
    assert (await api.patch("/api/v1/program", limits)).status_code == 200
    member = await api.create_member(email="kim@example.org", first_name="Kim")
    awarded = await api.post(
        "/api/v1/points/award", {"member_id": member["id"], "points": 800, "reason": "Welcome"}
    )
    assert awarded.status_code == 201, awarded.text
    agent_id = await create_staff_user(db, "sol@example.org", role="support_agent")
    manager_id = await create_staff_user(db, "mia@example.org", role="manager")

    agent = await _signed_in_page(chromium, console, "sol@example.org")
    await agent.get_by_role("link", name="Members").first.click()
    await agent.get_by_label("Find a member by email").fill("kim@example.org")
    await agent.get_by_role("button", name="Find").click()
    await agent.get_by_role("link", name="kim@example.org").click()
    assert "800 points" in await agent.locator("#balance").inner_text()
    await agent.get_by_label("Points to deduct").fill("200")
    await agent.get_by_label("Reason for the deduction").fill("Duplicate booking credited")
    await agent.get_by_role("button", name="Deduct").click()
    await agent.wait_for_selector("text=Sent for approval")
    # Held, not applied: the balance is unchanged.
    assert "800 points" in await agent.locator("#balance").inner_text()
    await check_page(agent, console, "flow-agent-deduct-held")
    pending = (await api.get("/api/v1/approvals", {"status": "pending"})).json()["data"]
    assert [(a["points"], a["requested_by"]) for a in pending] == [(200, agent_id)]
    approval_id = pending[0]["id"]
    # The agent may not decide it (no approvals in their navigation, 403 by URL).
    assert await agent.get_by_role("link", name="Approvals").count() == 0
    refused = await agent.goto(f"{console.url}/console/approvals/{approval_id}")
    assert refused is not None
    assert refused.status == 403

    manager = await _signed_in_page(chromium, console, "mia@example.org")
    await manager.get_by_role("link", name="Approvals").first.click()
    await manager.get_by_role("link", name=approval_id).click()
    await check_page(manager, console, "flow-manager-approval")
    await manager.get_by_role("button", name="Approve and deduct 200 points").click()
    await manager.wait_for_selector("text=200 points deducted")
    assert await manager.locator("#approval-status").inner_text() == "approved"
    await check_page(manager, console, "flow-manager-approved")

    decided = (await api.get(f"/api/v1/approvals/{approval_id}")).json()
    assert (decided["status"], decided["requested_by"], decided["decided_by"]) == (
        "approved",
        agent_id,
        manager_id,
    )
    history = (await api.get("/api/v1/points/transactions", {"member_id": member["id"]})).json()
    latest = history["data"][0]
    assert (latest["points"], latest["balance_after"], latest["actor"]) == (-200, 600, manager_id)

    await agent.goto(f"{console.url}/console/members/{member['id']}")
    assert "600 points" in await agent.locator("#balance").inner_text()
    assert await agent.locator("td.actor").first.inner_text() == manager_id
    await check_page(agent, console, "flow-agent-after-approval")
