"""The console in a real browser: password sign-in, single sign-on through the fake
provider, and an award from the member page recorded as the staff user, with accessibility
basics and a screenshot of every page (see tests/console/browser.py)."""

from __future__ import annotations

from playwright.async_api import Browser

from memberhub.kit.db import Database
from tests.console.browser import DESKTOP, Console, check_page, require_chromium
from tests.console.support import PASSWORD, create_staff_user
from tests.support import ApiClient

require_chromium()


async def test_password_sign_in_then_an_award_recorded_as_the_staff_user(
    console: Console, chromium: Browser, db: Database, api: ApiClient
) -> None:
    staff_id = await create_staff_user(db, "mia@example.org", role="manager")
    member = await api.create_member(email="member@example.org", first_name="Lee")
    page = await chromium.new_page(viewport=DESKTOP)
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text))

    await page.goto(f"{console.url}/console")
    assert page.url.startswith(f"{console.url}/console/sign-in")
    await check_page(page, console, "sign-in")
    await page.get_by_label("Email").fill("mia@example.org")
    await page.get_by_label("Password").fill("not it at all")
    await page.get_by_role("button", name="Sign in").click()
    assert "not right" in await page.locator(".error").inner_text()
    await page.get_by_label("Email").fill("mia@example.org")
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_url(f"{console.url}/console")
    assert staff_id in await page.locator("main").inner_text()
    await check_page(page, console, "home")

    await page.get_by_role("link", name="Members").first.click()
    await check_page(page, console, "members")
    await page.get_by_label("Find a member by email").fill("member@example.org")
    await page.get_by_role("button", name="Find").click()
    await page.get_by_role("link", name="member@example.org").click()
    assert "0 points" in await page.locator("#balance").inner_text()
    await check_page(page, console, "member")

    await page.get_by_label("Points", exact=True).fill("500")
    await page.get_by_label("Reason", exact=True).fill("Volunteered at the annual meeting")
    await page.get_by_role("button", name="Award").click()
    await page.wait_for_selector("text=Awarded 500 points")
    assert "500 points" in await page.locator("#balance").inner_text()
    assert await page.locator("td.actor").first.inner_text() == staff_id
    await check_page(page, console, "member-after-award")
    history = (await api.get("/api/v1/points/transactions", {"member_id": member["id"]})).json()
    assert [(t["points"], t["actor"]) for t in history["data"]] == [(500, staff_id)]

    await page.get_by_role("link", name="Account").click()
    await check_page(page, console, "account")
    await page.get_by_role("button", name="Set up two-factor sign-in").click()
    await check_page(page, console, "account-totp-enrolment")

    await page.get_by_role("button", name="Sign out").click()
    await page.wait_for_url(f"{console.url}/console/sign-in")
    assert "signed out" in await page.locator(".flash").inner_text()
    await page.goto(f"{console.url}/console/members/{member['id']}")
    assert page.url.startswith(f"{console.url}/console/sign-in")
    # No blocked inline script or style, no failed asset, no form warning, on any page so
    # far (the wrong password's 401 aside).
    assert [e for e in errors if "status of 401" not in e] == []
    await page.goto(f"{console.url}/console/no-such-page")
    await check_page(page, console, "not-found")


async def test_sign_in_with_sso_in_the_browser(
    console: Console, chromium: Browser, db: Database
) -> None:
    staff_id = await create_staff_user(db, "ana@example.org", role="support_agent")
    console.provider.user = {"sub": "ana-1", "email": "ana@example.org", "email_verified": True}
    page = await chromium.new_page(viewport=DESKTOP)
    await page.goto(f"{console.url}/console/sign-in")
    await page.get_by_role("link", name="Sign in with SSO").click()
    await page.wait_for_url(f"{console.url}/console")
    assert staff_id in await page.locator("main").inner_text()
    assert console.provider.token_requests == 1
    await check_page(page, console, "home-after-sso")
