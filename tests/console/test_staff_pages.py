"""The staff pages (admins only): the list, a new account (a generated first password shown
once, never in the cookie), changing role, organisation and active flag, unlocking; with
the API's rules for roles and organisations, CSRF, and bad input."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from memberhub.console.session import COOKIE_NAME, load_session
from memberhub.kit.db import Database
from memberhub.settings import Settings
from tests.console.support import PASSWORD, create_staff_user, csrf_of, sign_in, submit
from tests.support import ApiClient

STAFF = "/console/staff"
NEW_PASSWORD = "a long first password"


async def staff_in_api(api: ApiClient) -> dict[str, dict[str, Any]]:
    response = await api.get("/api/v1/staff", {"limit": 500})
    assert response.status_code == 200, response.text
    return {s["email"]: s for s in response.json()["data"]}


def cookie_data(browser: httpx.AsyncClient, settings: Settings) -> dict[str, Any]:
    return load_session(settings, browser.cookies.get(COOKIE_NAME), 0).data


async def test_an_admin_creates_a_staff_account_that_can_sign_in(
    browser: httpx.AsyncClient, api: ApiClient, db: Database, app: Any
) -> None:
    await create_staff_user(db)
    await sign_in(browser)
    org = (await api.create_organisation())["id"]

    created = await submit(
        browser,
        STAFF,
        STAFF,
        {
            "email": "Lee@Example.org",
            "name": "Lee Chen",
            "role": "support_agent",
            "organisation_id": org,
            "password": NEW_PASSWORD,
        },
    )
    assert created.status_code == 303, created.text
    new = (await staff_in_api(api))["lee@example.org"]
    assert (new["name"], new["role"], new["organisation_id"], new["active"]) == (
        "Lee Chen",
        "support_agent",
        org,
        True,
    )
    assert created.headers["location"] == f"{STAFF}/{new['id']}"
    listed = await browser.get(STAFF)
    row = listed.text.split(f'data-id="{new["id"]}"')[1].split("</tr>")[0]
    assert "lee@example.org" in row
    assert "support_agent" in row

    other = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=browser.base_url)
    async with other:
        assert (await sign_in(other, "lee@example.org", NEW_PASSWORD)).status_code == 303


async def test_a_generated_first_password_is_shown_once_and_never_put_in_the_cookie(
    browser: httpx.AsyncClient, api: ApiClient, db: Database, app: Any, settings: Settings
) -> None:
    await create_staff_user(db)
    await sign_in(browser)
    created = await submit(
        browser,
        STAFF,
        STAFF,
        {"email": "kai@example.org", "name": "Kai", "role": "manager", "password": ""},
    )
    assert created.status_code == 201, created.text
    one_time = created.text.split('id="one-time-password">')[1].split("<")[0]
    assert len(one_time) >= 12
    assert one_time not in str(cookie_data(browser, settings))
    assert one_time not in (created.headers.get("set-cookie") or "")
    assert one_time not in (await browser.get(STAFF)).text
    kai = (await staff_in_api(api))["kai@example.org"]
    assert one_time not in (await browser.get(f"{STAFF}/{kai['id']}")).text

    other = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=browser.base_url)
    async with other:
        assert (await sign_in(other, "kai@example.org", one_time)).status_code == 303


async def test_an_admin_changes_role_organisation_and_active_flag(
    browser: httpx.AsyncClient, api: ApiClient, db: Database, app: Any
) -> None:
    await create_staff_user(db)
    sam_id = await create_staff_user(db, "sam@example.org", role="support_agent")
    org = (await api.create_organisation())["id"]
    sams_browser = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url=browser.base_url
    )
    async with sams_browser:
        await sign_in(sams_browser, "sam@example.org")
        assert (await sams_browser.get("/console")).status_code == 200
        await sign_in(browser)

        page_url = f"{STAFF}/{sam_id}"
        saved = await submit(
            browser,
            page_url,
            page_url,
            {"name": "Sam Park", "role": "manager", "organisation_id": org, "active": "true"},
        )
        assert saved.status_code == 303, saved.text
        sam = (await staff_in_api(api))["sam@example.org"]
        assert (sam["name"], sam["role"], sam["organisation_id"], sam["active"]) == (
            "Sam Park",
            "manager",
            org,
            True,
        )
        # A change of access ends the account's sessions.
        assert (await sams_browser.get("/console")).status_code == 303

        # A new name changes no access: the session signed in after goes on.
        await sign_in(sams_browser, "sam@example.org")
        renamed = await submit(
            browser,
            page_url,
            page_url,
            {"name": "Sam P.", "role": "manager", "organisation_id": org, "active": "true"},
        )
        assert renamed.status_code == 303, renamed.text
        assert (await staff_in_api(api))["sam@example.org"]["name"] == "Sam P."
        assert (await sams_browser.get("/console")).status_code == 200

        # The form shows every field: an empty organisation makes the account
        # installation-wide, an unticked box deactivates it.
        deactivated = await submit(
            browser, page_url, page_url, {"name": "Sam Park", "role": "manager"}
        )
        assert deactivated.status_code == 303
        sam = (await staff_in_api(api))["sam@example.org"]
        assert (sam["organisation_id"], sam["active"]) == (None, False)
        assert (await sams_browser.get("/console")).status_code == 303
        assert (await sign_in(sams_browser, "sam@example.org")).status_code == 401


async def test_an_admin_cannot_deactivate_their_own_account(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    admin_id = await create_staff_user(db)
    await sign_in(browser)
    page_url = f"{STAFF}/{admin_id}"
    refused = await submit(browser, page_url, page_url, {"name": "ana", "role": "admin"})
    assert refused.status_code == 409
    assert "cannot deactivate your own account" in refused.text
    assert (await staff_in_api(api))["ana@example.org"]["active"] is True
    # Changing one's own name keeps one's session.
    renamed = await submit(
        browser, page_url, page_url, {"name": "Ana Lima", "role": "admin", "active": "true"}
    )
    assert renamed.status_code == 303
    assert (await browser.get("/console")).status_code == 200
    assert (await staff_in_api(api))["ana@example.org"]["name"] == "Ana Lima"


async def test_an_admin_unlocks_a_locked_out_account(
    browser: httpx.AsyncClient, api: ApiClient, db: Database, app: Any
) -> None:
    await create_staff_user(db)
    sam_id = await create_staff_user(db, "sam@example.org", role="support_agent")
    lockout = app.state.settings.staff_lockout_attempts
    for _ in range(lockout):
        await sign_in(browser, "sam@example.org", "wrong password")
    assert (await sign_in(browser, "sam@example.org")).status_code == 401  # told as any miss
    assert (await staff_in_api(api))["sam@example.org"]["locked_until"] is not None

    await sign_in(browser)
    page_url = f"{STAFF}/{sam_id}"
    page = await browser.get(page_url)
    assert "locked until" in page.text
    assert 'class="lock">locked<' in (await browser.get(STAFF)).text
    unlocked = await submit(browser, page_url, f"{page_url}/unlock", {})
    assert unlocked.status_code == 303, unlocked.text
    assert (await staff_in_api(api))["sam@example.org"]["locked_until"] is None
    assert "not locked" in (await browser.get(page_url)).text
    browser.cookies.clear()
    assert (await sign_in(browser, "sam@example.org")).status_code == 303


@pytest.mark.parametrize("role", ["manager", "support_agent"])
async def test_staff_pages_are_for_admins_only(
    browser: httpx.AsyncClient, api: ApiClient, db: Database, role: str
) -> None:
    admin_id = await create_staff_user(db, "ana@example.org")
    await create_staff_user(db, "mia@example.org", role=role)
    await sign_in(browser, "mia@example.org")
    home = await browser.get("/console")
    assert 'href="/console/staff"' not in home.text
    token = csrf_of(home)
    assert (await browser.get(STAFF)).status_code == 403
    assert (await browser.get(f"{STAFF}/{admin_id}")).status_code == 403
    attempts = [
        (STAFF, {"email": "x@example.org", "name": "X", "role": "admin", "password": PASSWORD}),
        (f"{STAFF}/{admin_id}", {"name": "X", "role": "support_agent", "active": "true"}),
        (f"{STAFF}/{admin_id}/unlock", {}),
    ]
    for action, fields in attempts:
        refused = await browser.post(action, data={"csrf_token": token, **fields})
        assert refused.status_code == 403, action
        assert "staff:write" in refused.text
    assert set(await staff_in_api(api)) == {"ana@example.org", "mia@example.org"}
    assert (await staff_in_api(api))["ana@example.org"]["role"] == "admin"


async def test_an_org_bound_admin_reaches_only_their_organisations_staff(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    mine = (await api.create_organisation())["id"]
    theirs = (await api.create_organisation())["id"]
    other_id = await create_staff_user(db, "out@example.org", "manager", organisation=theirs)
    await create_staff_user(db, "ana@example.org", organisation=mine)
    await sign_in(browser)

    listed = await browser.get(STAFF)
    assert other_id not in listed.text
    # The organisations offered in the form are the admin's own.
    assert f'<option value="{mine}">' in listed.text
    assert theirs not in listed.text
    assert (await browser.get(f"{STAFF}/{other_id}")).status_code == 404
    token = csrf_of(listed)
    hidden = await browser.post(f"{STAFF}/{other_id}/unlock", data={"csrf_token": token})
    assert hidden.status_code == 404
    # Leaving the organisation out would hand out access to every organisation.
    everywhere = await browser.post(
        STAFF,
        data={"csrf_token": token, "email": "w@example.org", "name": "W", "role": "manager"},
    )
    assert everywhere.status_code == 403
    elsewhere = await browser.post(
        STAFF,
        data={
            "csrf_token": token,
            "email": "w@example.org",
            "name": "W",
            "role": "manager",
            "organisation_id": theirs,
        },
    )
    assert elsewhere.status_code == 404
    assert "w@example.org" not in await staff_in_api(api)
    inside = await browser.post(
        STAFF,
        data={
            "csrf_token": token,
            "email": "w@example.org",
            "name": "W",
            "role": "manager",
            "organisation_id": mine,
            "password": NEW_PASSWORD,
        },
    )
    assert inside.status_code == 303
    assert (await staff_in_api(api))["w@example.org"]["organisation_id"] == mine


async def test_csrf_and_bad_input_are_refused_and_change_nothing(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    admin_id = await create_staff_user(db)
    await sign_in(browser)
    good = {"email": "new@example.org", "name": "New", "role": "manager", "password": PASSWORD}
    for token in (None, "", "forged"):
        fields = good if token is None else {**good, "csrf_token": token}
        assert (await browser.post(STAFF, data=fields)).status_code == 403
    token = csrf_of(await browser.get(STAFF))
    for bad in (
        {"role": "owner"},
        {"role": "ADMIN"},
        {"email": ""},
        {"email": "x" * 400},
        {"name": ""},
        {"name": "   "},
        {"name": "a\x00b"},
        {"name": "n" * 101},
        {"password": "short"},
        {"organisation_id": "not an id"},
    ):
        answered = await browser.post(STAFF, data={"csrf_token": token, **good, **bad})
        assert answered.status_code == 422, bad
        assert "<h1>" in answered.text
    not_email = await browser.post(
        STAFF, data={"csrf_token": token, **good, "email": "not-an-email"}
    )
    assert not_email.status_code == 422
    assert "is not an email address" in not_email.text
    no_org = await browser.post(
        STAFF, data={"csrf_token": token, **good, "organisation_id": "org_missing"}
    )
    assert no_org.status_code == 404
    assert "org_missing does not exist" in no_org.text
    duplicate = await browser.post(
        STAFF, data={"csrf_token": token, **good, "email": "ANA@example.org"}
    )
    assert duplicate.status_code == 409
    assert "exists" in duplicate.text
    assert set(await staff_in_api(api)) == {"ana@example.org"}
    bad_edit = await browser.post(
        f"{STAFF}/{admin_id}",
        data={"csrf_token": token, "name": "ana", "role": "admin", "active": "maybe"},
    )
    assert bad_edit.status_code == 422
    assert (await browser.get(STAFF, params={"cursor": "zzz"})).status_code == 422
    assert (await browser.get(f"{STAFF}/stf_missing")).status_code == 404
    assert (await browser.get(f"{STAFF}/..%2F..")).status_code in (404, 422)
