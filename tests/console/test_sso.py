"""OpenID Connect sign-in against the fake provider: discovery, PKCE, the code exchange,
and every check on the ID token."""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from pydantic import SecretStr

from memberhub.kit.db import Database
from memberhub.settings import Settings
from tests.console.support import create_staff_user, sign_in
from tests.fakes.oidc_provider import FakeOidcProvider, running_oidc_provider
from tests.support import ApiClient

CALLBACK = "https://testserver/console/auth/callback"


@pytest.fixture
async def provider() -> AsyncIterator[FakeOidcProvider]:
    async with running_oidc_provider(redirect_uris=[CALLBACK]) as running:
        yield running


@pytest.fixture
def settings(settings: Settings, provider: FakeOidcProvider) -> Settings:
    return settings.model_copy(
        update={
            "oidc_issuer": provider.url,
            "oidc_client_id": provider.client_id,
            "oidc_client_secret": SecretStr(provider.client_secret),
        }
    )


async def sso(browser: httpx.AsyncClient) -> httpx.Response:
    """Start SSO in the console, let the provider's user approve, and come back."""
    started = await browser.get("/console/auth/sso")
    assert started.status_code == 303, started.text
    async with httpx.AsyncClient() as outside:
        approved = await outside.get(started.headers["location"])
    assert approved.status_code == 302, approved.text
    back = urlsplit(approved.headers["location"])
    assert f"{back.scheme}://{back.netloc}{back.path}" == CALLBACK
    return await browser.get(f"{back.path}?{back.query}")


async def test_a_staff_user_signs_in_with_sso(
    browser: httpx.AsyncClient, provider: FakeOidcProvider, db: Database, api: ApiClient
) -> None:
    staff_id = await create_staff_user(db, role="support_agent")
    sign_in_page = await browser.get("/console/sign-in")
    assert "Sign in with SSO" in sign_in_page.text
    back = await sso(browser)
    assert back.status_code == 303, back.text
    assert back.headers["location"] == "/console"
    home = await browser.get("/console")
    assert home.status_code == 200
    assert staff_id in home.text
    sent = provider.authorize_requests[-1]
    assert sent["code_challenge_method"] == "S256"
    assert sent["redirect_uri"] == CALLBACK
    assert {"openid", "email"} <= set(sent["scope"].split())
    audit = (await api.get("/api/v1/audit")).json()["data"]
    sign_ins = [e for e in audit if e["action"] == "staff.sign_in"]
    assert [e["object_id"] for e in sign_ins] == [staff_id]


@pytest.mark.parametrize("configured_with_slash", [True, False])
async def test_an_issuer_published_with_a_trailing_slash_signs_in(
    browser: httpx.AsyncClient,
    provider: FakeOidcProvider,
    settings: Settings,
    db: Database,
    configured_with_slash: bool,
) -> None:
    """Auth0's issuer is `https://TENANT.auth0.com/`; the ID token's `iss` must equal it
    exactly, whether or not the setting was written with the slash."""
    provider.issuer_slash = True
    settings.oidc_issuer = provider.url + ("/" if configured_with_slash else "")
    await create_staff_user(db)
    back = await sso(browser)
    assert back.status_code == 303, back.text
    assert (await browser.get("/console")).status_code == 200


@pytest.mark.parametrize(
    "tamper", ["signature", "nonce", "audience", "issuer", "issuer-slash", "expired"]
)
async def test_an_id_token_that_fails_a_check_signs_no_one_in(
    browser: httpx.AsyncClient, provider: FakeOidcProvider, db: Database, tamper: str
) -> None:
    await create_staff_user(db)
    provider.tamper = tamper
    refused = await sso(browser)
    assert refused.status_code == 401, refused.text
    assert "Single sign-on" in refused.text
    assert (await browser.get("/console")).status_code == 303


async def test_an_unverified_or_unknown_email_signs_no_one_in(
    browser: httpx.AsyncClient, provider: FakeOidcProvider, db: Database
) -> None:
    await create_staff_user(db)
    provider.user = {"sub": "u", "email": "ana@example.org", "email_verified": False}
    assert (await sso(browser)).status_code == 401
    provider.user = {"sub": "u", "email": "stranger@example.org", "email_verified": True}
    assert (await sso(browser)).status_code == 401
    assert (await browser.get("/console")).status_code == 303


async def test_a_locked_account_stays_locked_for_sso(
    browser: httpx.AsyncClient, db: Database, api: ApiClient, settings: Settings
) -> None:
    """The lock holds whatever is tried meanwhile: SSO neither signs the account in nor
    lifts the lock; an admin's unlock does."""
    staff_id = await create_staff_user(db)
    for _ in range(settings.staff_lockout_attempts):
        assert (await sign_in(browser, password="wrong password")).status_code == 401
    locked = await sso(browser)
    assert locked.status_code == 401, locked.headers
    assert "locked" in locked.text
    assert (await browser.get("/console")).status_code == 303
    account = (await api.get(f"/api/v1/staff/{staff_id}")).json()
    assert account["locked_until"] is not None
    assert (await sign_in(browser)).status_code == 401
    assert (await api.post(f"/api/v1/staff/{staff_id}/unlock", {})).status_code == 200
    assert (await sso(browser)).status_code == 303
    assert (await browser.get("/console")).status_code == 200


async def test_a_callback_with_another_state_or_replayed_is_refused(
    browser: httpx.AsyncClient, provider: FakeOidcProvider, db: Database
) -> None:
    await create_staff_user(db)
    started = await browser.get("/console/auth/sso")
    async with httpx.AsyncClient() as outside:
        approved = await outside.get(started.headers["location"])
    query = parse_qs(urlsplit(approved.headers["location"]).query)
    forged = await browser.get(
        "/console/auth/callback", params={"code": query["code"][0], "state": "forged"}
    )
    assert forged.status_code == 401
    # The pending sign-in was used up by that attempt: the real state fails now too.
    replay = await browser.get(
        "/console/auth/callback", params={"code": query["code"][0], "state": query["state"][0]}
    )
    assert replay.status_code == 401
    assert provider.token_requests == 0


async def test_first_sso_sign_in_creates_an_account_when_configured(
    browser: httpx.AsyncClient,
    provider: FakeOidcProvider,
    app: object,
    api: ApiClient,
) -> None:
    app.state.settings.oidc_auto_create_role = "support_agent"  # type: ignore[attr-defined]
    app.state.settings.oidc_allowed_email_domains = "example.org"  # type: ignore[attr-defined]
    provider.user = {"sub": "u", "email": "new@example.com", "email_verified": True}
    assert (await sso(browser)).status_code == 401
    provider.user = {"sub": "u", "email": "New@Example.org", "email_verified": True}
    assert (await sso(browser)).status_code == 303
    staff = (await api.get("/api/v1/staff")).json()["data"]
    assert [(s["email"], s["role"]) for s in staff] == [("new@example.org", "support_agent")]
