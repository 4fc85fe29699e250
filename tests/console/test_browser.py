"""The console in a real browser: Debian's chromium driven by Playwright for Python.

Password sign-in, single sign-on through the fake provider, an award from the member page
recorded as the staff user, and accessibility basics on every page (each form field has a
label, one h1, no sideways scrolling at 375 px). Each page's screenshot is kept under the
test's directory and copied to test-artifacts/console/ (git-ignored).

The browser must come from the system's package (`apt-get install chromium`; `.ci/run`
installs it), never from a download: the tests are skipped when it is missing, except in
CI, where that fails them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from memberhub.app import create_app
from memberhub.kit.db import Database
from memberhub.settings import Settings
from tests.console.support import PASSWORD, create_staff_user
from tests.fakes.oidc_provider import FakeOidcProvider, running_oidc_provider
from tests.support import ApiClient
from tests.support_server import bind_local_socket, serving_in_thread

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "console"
PHONE_WIDTH = 375

if not CHROMIUM.exists():
    if os.environ.get("CI"):
        pytest.fail(f"CI needs {CHROMIUM} (apt-get install chromium)", pytrace=False)
    pytest.skip(
        f"{CHROMIUM} is not installed (apt-get install chromium); browser tests skipped",
        allow_module_level=True,
    )

from playwright.async_api import Browser, Page, async_playwright  # noqa: E402

# Run in the page through the DevTools protocol (not subject to the page's CSP).
A11Y_CHECK = """() => {
  const fields = [...document.querySelectorAll(
    'input:not([type=hidden]):not([hidden]), select, textarea')];
  return {
    h1: document.querySelectorAll('h1').length,
    unlabelled: fields.filter(f => !(f.labels && f.labels.length) &&
                                   !f.getAttribute('aria-label')).map(f => f.name || f.id),
    overflow: document.documentElement.scrollWidth - window.innerWidth,
  };
}"""


@dataclass
class Console:
    url: str
    provider: FakeOidcProvider
    screenshots: Path


@pytest.fixture
async def console(settings: Settings, db: Database, tmp_path: Path) -> AsyncIterator[Console]:
    async with running_oidc_provider(redirect_uris=[]) as provider:
        sock, url = bind_local_socket()
        provider.redirect_uris.append(f"{url}/console/auth/callback")
        served = settings.model_copy(
            update={
                "public_url": url,
                # Plain http on 127.0.0.1 in this test: a Secure cookie would not be kept.
                "console_cookie_secure": False,
                "oidc_issuer": provider.url,
                "oidc_client_id": provider.client_id,
                "oidc_client_secret": SecretStr(provider.client_secret),
            }
        )
        async with serving_in_thread(create_app(served), sock, name="console-under-test"):
            shots = tmp_path / "screenshots"
            shots.mkdir()
            yield Console(url=url, provider=provider, screenshots=shots)
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            for shot in shots.iterdir():
                shutil.copy(shot, ARTIFACTS / shot.name)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        try:
            yield launched
        finally:
            await launched.close()


async def check_page(page: Page, console: Console, name: str) -> None:
    """Accessibility basics, at desktop width and at 375 px, with a screenshot of each."""
    # After a form post the next page may still be loading: check the page that arrived.
    await page.wait_for_load_state("load")
    found: dict[str, Any] = await page.evaluate(A11Y_CHECK)
    assert found["h1"] == 1, (name, found)
    assert found["unlabelled"] == [], (name, found)
    await page.screenshot(path=console.screenshots / f"{name}.png", full_page=True)
    desktop = page.viewport_size
    await page.set_viewport_size({"width": PHONE_WIDTH, "height": 800})
    narrow: dict[str, Any] = await page.evaluate(A11Y_CHECK)
    assert narrow["overflow"] <= 0, (name, narrow)
    await page.screenshot(path=console.screenshots / f"{name}-375px.png", full_page=True)
    assert desktop is not None
    await page.set_viewport_size(desktop)


async def test_password_sign_in_then_an_award_recorded_as_the_staff_user(
    console: Console, browser: Browser, db: Database, api: ApiClient
) -> None:
    staff_id = await create_staff_user(db, "mia@example.org", role="manager")
    member = await api.create_member(email="member@example.org", first_name="Lee")
    page = await browser.new_page(viewport={"width": 1280, "height": 800})
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
    console: Console, browser: Browser, db: Database
) -> None:
    staff_id = await create_staff_user(db, "ana@example.org", role="support_agent")
    console.provider.user = {"sub": "ana-1", "email": "ana@example.org", "email_verified": True}
    page = await browser.new_page(viewport={"width": 1280, "height": 800})
    await page.goto(f"{console.url}/console/sign-in")
    await page.get_by_role("link", name="Sign in with SSO").click()
    await page.wait_for_url(f"{console.url}/console")
    assert staff_id in await page.locator("main").inner_text()
    assert console.provider.token_requests == 1
    await check_page(page, console, "home-after-sso")
