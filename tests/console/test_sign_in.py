"""Password sign-in, the session, and acting as the signed-in staff user."""

from __future__ import annotations

import time

import httpx
import pytest

from memberhub.kit.db import Database
from memberhub.settings import Settings
from tests.console.support import PASSWORD, create_staff_user, csrf_of, sign_in, submit
from tests.support import ApiClient


async def test_a_staff_user_signs_in_and_sees_the_home_page(
    browser: httpx.AsyncClient, db: Database
) -> None:
    staff_id = await create_staff_user(db)
    signed_in = await sign_in(browser)
    assert signed_in.status_code == 303, signed_in.text
    assert signed_in.headers["location"] == "/console"
    cookie = signed_in.headers["set-cookie"]
    assert {"HttpOnly", "SameSite=Lax", "Secure"} <= {part.strip() for part in cookie.split(";")}
    home = await browser.get("/console")
    assert home.status_code == 200
    assert staff_id in home.text
    assert home.headers["content-security-policy"].startswith("default-src 'none'")
    assert home.headers["x-frame-options"] == "DENY"


async def test_a_page_asks_for_sign_in_first(browser: httpx.AsyncClient, db: Database) -> None:
    answered = await browser.get("/console/members?email=a@example.org")
    assert answered.status_code == 303
    assert answered.headers["location"].startswith("/console/sign-in?next=%2Fconsole%2Fmembers")


async def test_a_wrong_password_is_refused(browser: httpx.AsyncClient, db: Database) -> None:
    await create_staff_user(db)
    refused = await sign_in(browser, password="not the password")
    assert refused.status_code == 401
    assert "not right" in refused.text
    assert (await browser.get("/console")).status_code == 303


async def test_an_award_from_the_console_is_recorded_as_the_staff_user(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    staff_id = await create_staff_user(db, role="manager")
    member = await api.create_member(email="m@example.org")
    await sign_in(browser)
    found = await browser.get("/console/members", params={"email": "M@example.org"})
    assert member["id"] in found.text
    page = f"/console/members/{member['id']}"
    awarded = await submit(browser, page, f"{page}/award", {"points": "50", "reason": "Welcome"})
    assert awarded.status_code == 303, awarded.text
    after = await browser.get(page)
    assert "50 points" in after.text
    assert staff_id in after.text
    history = (await api.get("/api/v1/points/transactions", {"member_id": member["id"]})).json()
    assert [(t["type"], t["points"], t["actor"]) for t in history["data"]] == [
        ("award", 50, staff_id)
    ]
    audit = (await api.get("/api/v1/audit")).json()["data"]
    assert staff_id in {e["actor"] for e in audit if e["action"].startswith("points.")}


def _another_browser(app: object, cookies: dict[str, str] | None = None) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, base_url="https://testserver", cookies=cookies)


async def test_signing_out_ends_the_session(
    browser: httpx.AsyncClient, app: object, db: Database
) -> None:
    await create_staff_user(db)
    await sign_in(browser)
    home = await browser.get("/console")
    kept = browser.cookies["memberhub_console"]
    # Another browser signed in to the same account keeps its own session.
    elsewhere = _another_browser(app)
    async with elsewhere:
        await sign_in(elsewhere)
        out = await browser.post("/console/sign-out", data={"csrf_token": csrf_of(home)})
        assert out.status_code == 303
        assert (await browser.get("/console")).status_code == 303
        # A copy of the signed-out cookie, still signed and within its lifetime, signs
        # no one in.
        copied = _another_browser(app, cookies={"memberhub_console": kept})
        async with copied:
            replayed = await copied.get("/console/members")
            assert replayed.status_code == 303
            assert replayed.headers["location"].startswith("/console/sign-in")
        assert (await elsewhere.get("/console")).status_code == 200


async def test_the_password_can_be_changed_from_the_account_page(
    browser: httpx.AsyncClient, db: Database
) -> None:
    await create_staff_user(db)
    await sign_in(browser)
    changed = await submit(
        browser,
        "/console/account",
        "/console/account/password",
        {"current_password": PASSWORD, "new_password": "a brand new passphrase"},
    )
    assert changed.status_code == 303, changed.text
    assert (await browser.get("/console")).status_code == 200
    browser.cookies.clear()
    assert (await sign_in(browser)).status_code == 401
    assert (await sign_in(browser, password="a brand new passphrase")).status_code == 303


async def test_deactivating_a_staff_user_ends_their_session(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    staff_id = await create_staff_user(db)
    await sign_in(browser)
    assert (await browser.get("/console")).status_code == 200
    changed = await api.patch(f"/api/v1/staff/{staff_id}", {"active": False})
    assert changed.status_code == 200, changed.text
    assert (await browser.get("/console")).status_code == 303
    assert (await sign_in(browser)).status_code == 401


def test_the_cookie_is_secure_everywhere_but_development() -> None:
    assert Settings(env="production", secret_key="x").console_secure_cookie
    assert Settings(env="test", secret_key="x").console_secure_cookie
    assert not Settings(env="development", secret_key="x").console_secure_cookie
    assert not Settings(env="production", console_cookie_secure=False).console_secure_cookie


async def test_sign_in_only_returns_to_console_pages(
    browser: httpx.AsyncClient, db: Database
) -> None:
    await create_staff_user(db)
    for target, landed in (
        ("/console/account", "/console/account"),
        ("https://evil.example/", "/console"),
        ("//evil.example/console", "/console"),
    ):
        browser.cookies.clear()
        page = await browser.get("/console/sign-in")
        answered = await browser.post(
            "/console/sign-in",
            data={
                "csrf_token": csrf_of(page),
                "email": "ana@example.org",
                "password": PASSWORD,
                "next": target,
            },
        )
        assert answered.headers["location"] == landed


@pytest.mark.parametrize("form", ["/console/sign-out", "/console/account/password"])
async def test_a_form_sent_after_the_session_expired_asks_to_sign_in_and_ends_it_everywhere(
    browser: httpx.AsyncClient,
    app: object,
    db: Database,
    monkeypatch: pytest.MonkeyPatch,
    form: str,
) -> None:
    await create_staff_user(db)
    start = time.time()
    await sign_in(browser)
    page = await browser.get("/console/account")
    token = csrf_of(page)
    copied = _another_browser(
        app, cookies={"memberhub_console": browser.cookies["memberhub_console"]}
    )
    async with copied:
        monkeypatch.setattr(time, "time", lambda: start + 20 * 60)
        used = await copied.get("/console")
        refreshed = used.cookies.get("memberhub_console")
        assert refreshed
        copied.cookies.clear()
        copied.cookies.set("memberhub_console", refreshed)
        monkeypatch.setattr(time, "time", lambda: start + 40 * 60)
        # The page was left open; its form is sent after the idle time.
        fields = {"csrf_token": token, "current_password": PASSWORD, "new_password": "y" * 16}
        sent = await browser.post(form, data=fields)
        assert sent.status_code == 303, sent.text
        assert sent.headers["location"].startswith("/console/sign-in")
        kept_busy = await copied.get("/console/members")
        assert kept_busy.status_code == 303, "the copy is signed out too"
    assert (await sign_in(browser)).status_code == 303, "the password did not change"


async def test_a_form_sent_after_expiry_leads_back_to_its_page_and_the_page_says_why(
    browser: httpx.AsyncClient, api: ApiClient, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    await create_staff_user(db)
    member = await api.create_member()
    member_page = f"/console/members/{member['id']}"
    start = time.time()
    await sign_in(browser)
    token = csrf_of(await browser.get(member_page))
    monkeypatch.setattr(time, "time", lambda: start + 40 * 60)  # past CONSOLE_IDLE_MINUTES
    sent = await browser.post(
        f"{member_page}/award",
        data={"csrf_token": token, "points": "5", "reason": "left open"},
        headers={"referer": f"http://testserver{member_page}"},
    )
    assert sent.status_code == 303, sent.text
    asked = await browser.get(sent.headers["location"])
    # The redirect that followed the expiry did not hide it: the sign-in page says so, once.
    assert "Your session expired" in asked.text
    assert "Your session expired" not in (await browser.get("/console/sign-in")).text
    # Signed in again, back on the page the form was on (its POST-only action answers no
    # GET); nothing was awarded.
    next_url = asked.text.split('name="next" value="')[1].split('"')[0]
    assert next_url == member_page
    again = await browser.post(
        "/console/sign-in",
        data={
            "csrf_token": csrf_of(asked),
            "email": "ana@example.org",
            "password": PASSWORD,
            "next": next_url,
        },
    )
    assert again.headers["location"] == member_page
    assert (await browser.get(member_page)).status_code == 200
    points = (await api.get(f"/api/v1/members/{member['id']}/points")).json()
    assert points["current_balance"] == 0, points


async def test_a_session_expired_in_one_browser_ends_for_a_copy_kept_busy_elsewhere(
    browser: httpx.AsyncClient, app: object, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Idle expiry reads the cookie's own time of last use: a copy used elsewhere stays
    fresh. When the browser comes back with its expired copy, the session is ended for
    every copy, as a sign-out would."""
    await create_staff_user(db)
    start = time.time()
    await sign_in(browser)
    copied = _another_browser(
        app, cookies={"memberhub_console": browser.cookies["memberhub_console"]}
    )
    async with copied:
        monkeypatch.setattr(time, "time", lambda: start + 20 * 60)
        used = await copied.get("/console")
        assert used.status_code == 200
        refreshed = used.cookies.get("memberhub_console")
        assert refreshed  # its time of last use moved on
        copied.cookies.clear()
        copied.cookies.set("memberhub_console", refreshed)
        monkeypatch.setattr(time, "time", lambda: start + 40 * 60)
        returned = await browser.get("/console")
        assert returned.status_code == 303  # idle for 40 minutes: signed out
        kept_busy = await copied.get("/console/members")
        assert kept_busy.status_code == 303
        assert kept_busy.headers["location"].startswith("/console/sign-in")
