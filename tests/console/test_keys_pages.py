"""The API keys pages (admins only): a key created in the console works against the API,
its secret is shown once and never put in the cookie or the logs, scopes and rate limit as
the API takes them, revoking makes the key fail with 401; roles, organisations, CSRF and
bad input."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from memberhub.console.session import COOKIE_NAME, load_session
from memberhub.kit.db import Database
from memberhub.settings import Settings
from tests.console.support import create_staff_user, csrf_of, sign_in, submit
from tests.support import ApiClient

KEYS = "/console/keys"


async def keys_in_api(api: ApiClient) -> dict[str, dict[str, Any]]:
    response = await api.get("/api/v1/api-keys", {"limit": 500})
    assert response.status_code == 200, response.text
    return {k["id"]: k for k in response.json()["data"]}


def secret_on(page: httpx.Response) -> str:
    return page.text.split('id="key-secret">')[1].split("<")[0]


async def test_a_key_created_in_the_console_works_once_shown_and_fails_once_revoked(
    browser: httpx.AsyncClient,
    api: ApiClient,
    db: Database,
    settings: Settings,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    await create_staff_user(db)
    await sign_in(browser)
    member = await api.create_member()

    created = await submit(
        browser,
        KEYS,
        KEYS,
        {
            "name": "front desk",
            "role": "support_agent",
            "scopes": ["members:read", "points:read"],
            "rate_limit": "100/minute",
        },
    )
    assert created.status_code == 201, created.text
    secret = secret_on(created)
    key_id = created.text.split('id="key-id">')[1].split("<")[0]
    shown = (await keys_in_api(api))[key_id]
    assert (shown["name"], shown["role"], shown["scopes"], shown["rate_limit"]) == (
        "front desk",
        "support_agent",
        ["members:read", "points:read"],
        "100/minute",
    )

    # Never again: not on the list, not in the cookie, not in the logs.
    listed = await browser.get(KEYS)
    assert key_id in listed.text
    assert secret not in listed.text
    assert secret not in str(load_session(settings, browser.cookies.get(COOKIE_NAME), 0).data)
    assert secret not in (created.headers.get("set-cookie") or "")

    front_desk = api.with_key(secret)
    assert (await front_desk.get(f"/api/v1/members/{member['id']}")).status_code == 200
    # Only the scopes ticked: the role could award, this key cannot.
    award = await front_desk.post(
        "/api/v1/points/award", {"member_id": member["id"], "points": 1, "reason": "x"}
    )
    assert award.status_code == 403

    revoked = await submit(browser, KEYS, f"{KEYS}/{key_id}/revoke", {})
    assert revoked.status_code == 303, revoked.text
    assert (await keys_in_api(api))[key_id]["revoked_at"] is not None
    assert (await front_desk.get(f"/api/v1/members/{member['id']}")).status_code == 401
    assert "revoked" in (await browser.get(KEYS)).text
    again = await browser.post(f"{KEYS}/{key_id}/revoke", data={"csrf_token": csrf_of(listed)})
    assert again.status_code == 409
    assert "already revoked" in again.text
    captured = capsys.readouterr()
    assert secret not in captured.out + captured.err + caplog.text


async def test_no_scope_ticked_gives_every_scope_of_the_role(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    await create_staff_user(db)
    await sign_in(browser)
    org = (await api.create_organisation())["id"]
    created = await submit(
        browser, KEYS, KEYS, {"name": "chapter", "role": "manager", "organisation_id": org}
    )
    assert created.status_code == 201, created.text
    key_id = created.text.split('id="key-id">')[1].split("<")[0]
    shown = (await keys_in_api(api))[key_id]
    assert (shown["scopes"], shown["organisation_id"], shown["rate_limit"]) == (None, org, None)
    chapter = api.with_key(secret_on(created))
    inside = await chapter.post(
        "/api/v1/members", {"email": "in@example.org", "organisation_id": org}
    )
    assert inside.status_code == 201, inside.text


@pytest.mark.parametrize("role", ["manager", "support_agent"])
async def test_key_pages_are_for_admins_only(
    browser: httpx.AsyncClient, api: ApiClient, db: Database, role: str
) -> None:
    await create_staff_user(db, "mia@example.org", role=role)
    await sign_in(browser, "mia@example.org")
    before = await keys_in_api(api)
    (admin_key_id,) = before
    home = await browser.get("/console")
    assert 'href="/console/keys"' not in home.text
    assert (await browser.get(KEYS)).status_code == 403
    token = csrf_of(home)
    create = await browser.post(KEYS, data={"csrf_token": token, "name": "mine", "role": "admin"})
    assert create.status_code == 403
    assert "api_keys:write" in create.text
    revoke = await browser.post(f"{KEYS}/{admin_key_id}/revoke", data={"csrf_token": token})
    assert revoke.status_code == 403
    assert await keys_in_api(api) == before


async def test_an_org_bound_admin_issues_and_revokes_keys_only_within_their_organisations(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    mine = (await api.create_organisation())["id"]
    theirs = (await api.create_organisation())["id"]
    other = await api.post(
        "/api/v1/api-keys", {"name": "theirs", "role": "manager", "organisation_id": theirs}
    )
    assert other.status_code == 201
    other_id = other.json()["id"]
    await create_staff_user(db, organisation=mine)
    await sign_in(browser)

    listed = await browser.get(KEYS)
    assert other_id not in listed.text
    token = csrf_of(listed)
    assert (
        await browser.post(f"{KEYS}/{other_id}/revoke", data={"csrf_token": token})
    ).status_code == 404
    everywhere = await browser.post(
        KEYS, data={"csrf_token": token, "name": "all", "role": "admin"}
    )
    assert everywhere.status_code == 403
    elsewhere = await browser.post(
        KEYS,
        data={"csrf_token": token, "name": "x", "role": "manager", "organisation_id": theirs},
    )
    assert elsewhere.status_code == 404
    assert len(await keys_in_api(api)) == 2
    inside = await browser.post(
        KEYS, data={"csrf_token": token, "name": "ok", "role": "manager", "organisation_id": mine}
    )
    assert inside.status_code == 201
    assert (await keys_in_api(api))[other_id]["revoked_at"] is None


async def test_csrf_and_bad_input_are_refused_and_create_no_key(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    await create_staff_user(db)
    await sign_in(browser)
    before = await keys_in_api(api)
    good = {"name": "shop", "role": "integration"}
    for token in (None, "", "forged"):
        fields = good if token is None else {**good, "csrf_token": token}
        assert (await browser.post(KEYS, data=fields)).status_code == 403
    token = csrf_of(await browser.get(KEYS))
    for bad, message in (
        ({"scopes": ["points:fly"]}, "Unknown scopes"),
        ({"scopes": ["staff:write"]}, "cannot hold these scopes"),
        ({"rate_limit": "lots"}, "is not a rate limit"),
    ):
        answered = await browser.post(KEYS, data={"csrf_token": token, **good, **bad})
        assert answered.status_code == 422, bad
        assert message in answered.text
        assert 'id="key-secret"' not in answered.text
    for bad in (
        {"role": "root"},
        {"name": ""},
        {"name": "x" * 101},
        {"organisation_id": "<script>"},
        {"rate_limit": "r" * 51},
    ):
        answered = await browser.post(KEYS, data={"csrf_token": token, **good, **bad})
        assert answered.status_code == 422, bad
        # The page names the field that is wrong, never echoing what was sent.
        (field,) = bad
        assert f"{field}: " in answered.text, (bad, answered.text)
        assert "<script>" not in answered.text
    missing_org = await browser.post(
        KEYS, data={"csrf_token": token, **good, "organisation_id": "org_missing"}
    )
    assert missing_org.status_code == 404
    assert await keys_in_api(api) == before
    assert (await browser.get(KEYS, params={"cursor": "e30"})).status_code == 422
    missing = await browser.post(f"{KEYS}/key_missing/revoke", data={"csrf_token": token})
    assert missing.status_code == 404
