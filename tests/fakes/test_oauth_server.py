"""The fake OAuth server grants, refreshes and checks tokens as RFC 6749, 6750 and 7636 say."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.fakes.oauth_server import FakeOAuthServer, running_oauth_server, s256_challenge

CLIENT_ID = "club-app"
CLIENT_SECRET = "club-secret"
REDIRECT_URI = "http://127.0.0.1:9/oauth/callback"


@pytest.fixture
async def server() -> AsyncIterator[FakeOAuthServer]:
    async with running_oauth_server(
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        redirect_uris=[REDIRECT_URI, "http://127.0.0.1:9/other"],
        access_token_ttl=600,
    ) as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5, follow_redirects=False) as client:
        yield client


def new_verifier() -> str:
    return secrets.token_urlsafe(48)


def authorize_params(verifier: str, **overrides: str) -> dict[str, str]:
    params = {
        "response_type": "code",
        "client_id": CLIENT_ID,
        "redirect_uri": REDIRECT_URI,
        "state": "state-123",
        "code_challenge": s256_challenge(verifier),
        "code_challenge_method": "S256",
        "scope": "read offline_access",
    }
    params.update(overrides)
    return params


def redirect_query(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 302, response.text
    location = urlsplit(response.headers["location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == REDIRECT_URI
    return {name: values[0] for name, values in parse_qs(location.query).items()}


async def authorize(
    http: httpx.AsyncClient, server: FakeOAuthServer, verifier: str, **overrides: str
) -> str:
    response = await http.get(server.authorize_url, params=authorize_params(verifier, **overrides))
    query = redirect_query(response)
    assert query["state"] == "state-123"
    return query["code"]


async def exchange(
    http: httpx.AsyncClient, server: FakeOAuthServer, code: str, verifier: str, **extra: str
) -> httpx.Response:
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT_URI,
        "code_verifier": verifier,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        **extra,
    }
    return await http.post(server.token_url, data=form)


async def refresh(
    http: httpx.AsyncClient, server: FakeOAuthServer, refresh_token: str
) -> httpx.Response:
    return await http.post(
        server.token_url,
        data={"grant_type": "refresh_token", "refresh_token": refresh_token},
        auth=(CLIENT_ID, CLIENT_SECRET),
    )


async def tokens(http: httpx.AsyncClient, server: FakeOAuthServer) -> dict[str, Any]:
    verifier = new_verifier()
    code = await authorize(http, server, verifier)
    response = await exchange(http, server, code, verifier)
    assert response.status_code == 200, response.text
    granted: dict[str, Any] = response.json()
    return granted


async def me(http: httpx.AsyncClient, server: FakeOAuthServer, token: str) -> httpx.Response:
    return await http.get(f"{server.url}/api/me", headers={"authorization": f"Bearer {token}"})


# --------------------------------------------------------------------------- authorization code


async def test_pkce_authorization_code_flow_grants_working_tokens(
    server: FakeOAuthServer, http: httpx.AsyncClient
) -> None:
    verifier = new_verifier()

    code = await authorize(http, server, verifier)
    response = await exchange(http, server, code, verifier)

    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    granted = response.json()
    assert set(granted) == {"access_token", "token_type", "expires_in", "refresh_token", "scope"}
    assert (granted["token_type"], granted["expires_in"]) == ("Bearer", 600)
    assert granted["scope"] == "read offline_access"
    profile = await me(http, server, granted["access_token"])
    assert profile.status_code == 200
    assert profile.json()["id"] == "user_1"
    assert server.token_requests == ["authorization_code"]
    assert server.issued_access_tokens == [granted["access_token"]]


async def test_wrong_code_verifier_is_invalid_grant(
    server: FakeOAuthServer, http: httpx.AsyncClient
) -> None:
    verifier = new_verifier()
    code = await authorize(http, server, verifier)

    wrong = await exchange(http, server, code, new_verifier())
    missing = await exchange(http, server, code, "")

    assert wrong.status_code == 400
    assert wrong.json()["error"] == "invalid_grant"
    assert (missing.status_code, missing.json()["error"]) == (400, "invalid_request")
    assert server.issued_access_tokens == []


async def test_code_is_single_use_and_reuse_revokes_its_tokens(
    server: FakeOAuthServer, http: httpx.AsyncClient
) -> None:
    verifier = new_verifier()
    code = await authorize(http, server, verifier)
    first = (await exchange(http, server, code, verifier)).json()

    reused = await exchange(http, server, code, verifier)

    assert (reused.status_code, reused.json()["error"]) == (400, "invalid_grant")
    assert (await me(http, server, first["access_token"])).status_code == 401
    assert (await refresh(http, server, first["refresh_token"])).json()["error"] == "invalid_grant"


async def test_code_is_bound_to_its_redirect_uri_and_expires(
    server: FakeOAuthServer, http: httpx.AsyncClient
) -> None:
    verifier = new_verifier()
    code = await authorize(http, server, verifier)
    other_uri = await exchange(
        http, server, code, verifier, redirect_uri="http://127.0.0.1:9/other"
    )
    late_code = await authorize(http, server, verifier)
    server.advance_clock(61)

    late = await exchange(http, server, late_code, verifier)

    assert (other_uri.status_code, other_uri.json()["error"]) == (400, "invalid_grant")
    assert (late.status_code, late.json()["error"]) == (400, "invalid_grant")
    assert "expired" in late.json()["error_description"]


async def test_client_authenticates_by_basic_or_body_and_wrong_secret_is_invalid_client(
    server: FakeOAuthServer, http: httpx.AsyncClient
) -> None:
    verifier = new_verifier()
    code = await authorize(http, server, verifier)
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT_URI,
        "code_verifier": verifier,
    }

    wrong = await http.post(server.token_url, data=form, auth=(CLIENT_ID, "not-the-secret"))
    both = await http.post(
        server.token_url, data={**form, "client_secret": CLIENT_SECRET}, auth=(CLIENT_ID, "x")
    )
    basic = await http.post(server.token_url, data=form, auth=(CLIENT_ID, CLIENT_SECRET))

    assert wrong.status_code == 401
    assert wrong.json()["error"] == "invalid_client"
    assert wrong.headers["www-authenticate"].startswith("Basic")
    assert (both.status_code, both.json()["error"]) == (400, "invalid_request")
    assert basic.status_code == 200


async def test_unsupported_or_missing_grant_type_is_refused(
    server: FakeOAuthServer, http: httpx.AsyncClient
) -> None:
    credentials = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}

    implicit = await http.post(server.token_url, data={**credentials, "grant_type": "password"})
    missing = await http.post(server.token_url, data=credentials)

    assert (implicit.status_code, implicit.json()["error"]) == (400, "unsupported_grant_type")
    assert (missing.status_code, missing.json()["error"]) == (400, "invalid_request")
    assert server.token_requests == ["password", ""]


# --------------------------------------------------------------------------- authorize errors


async def test_unregistered_redirect_uri_or_client_gets_400_without_redirect(
    server: FakeOAuthServer, http: httpx.AsyncClient
) -> None:
    verifier = new_verifier()

    bad_uri = await http.get(
        server.authorize_url,
        params=authorize_params(verifier, redirect_uri="https://evil.example/cb"),
    )
    bad_client = await http.get(
        server.authorize_url, params=authorize_params(verifier, client_id="someone-else")
    )

    assert (bad_uri.status_code, bad_client.status_code) == (400, 400)
    assert "location" not in bad_uri.headers
    assert "location" not in bad_client.headers


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"code_challenge": ""}, "invalid_request"),
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"scope": "read admin"}, "invalid_scope"),
    ],
)
async def test_invalid_authorization_request_redirects_with_the_error_and_state(
    server: FakeOAuthServer, http: httpx.AsyncClient, overrides: dict[str, str], error: str
) -> None:
    response = await http.get(
        server.authorize_url, params=authorize_params(new_verifier(), **overrides)
    )

    query = redirect_query(response)
    assert query["error"] == error
    assert query["state"] == "state-123"
    assert "code" not in query


async def test_denied_authorization_redirects_access_denied(
    server: FakeOAuthServer, http: httpx.AsyncClient
) -> None:
    server.deny_next_authorization()

    denied = await http.get(server.authorize_url, params=authorize_params(new_verifier()))
    approved = await http.get(server.authorize_url, params=authorize_params(new_verifier()))

    assert redirect_query(denied)["error"] == "access_denied"
    assert "code" in redirect_query(approved)


# --------------------------------------------------------------------------- refresh


async def test_refresh_rotates_the_refresh_token_and_the_old_one_stops_working(
    server: FakeOAuthServer, http: httpx.AsyncClient
) -> None:
    first = await tokens(http, server)

    refreshed = await refresh(http, server, first["refresh_token"])
    replayed = await refresh(http, server, first["refresh_token"])

    assert refreshed.status_code == 200
    second = refreshed.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    assert second["scope"] == first["scope"]
    assert (replayed.status_code, replayed.json()["error"]) == (400, "invalid_grant")
    assert (await refresh(http, server, second["refresh_token"])).status_code == 200
    assert (await me(http, server, second["access_token"])).status_code == 200
    assert server.token_requests == [
        "authorization_code",
        "refresh_token",
        "refresh_token",
        "refresh_token",
    ]


async def test_without_rotation_the_same_refresh_token_keeps_working(
    http: httpx.AsyncClient,
) -> None:
    async with running_oauth_server(
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        redirect_uris=[REDIRECT_URI],
        rotate_refresh_tokens=False,
    ) as server:
        first = await tokens(http, server)

        again = [await refresh(http, server, first["refresh_token"]) for _ in range(2)]

    assert [r.status_code for r in again] == [200, 200]
    assert {r.json()["refresh_token"] for r in again} == {first["refresh_token"]}


async def test_revoked_refresh_tokens_are_invalid_grant(
    server: FakeOAuthServer, http: httpx.AsyncClient
) -> None:
    granted = await tokens(http, server)

    server.revoke_refresh_tokens()
    response = await refresh(http, server, granted["refresh_token"])

    assert (response.status_code, response.json()["error"]) == (400, "invalid_grant")


# --------------------------------------------------------------------------- protected API


async def test_expired_access_token_gets_401_invalid_token_until_refreshed(
    server: FakeOAuthServer, http: httpx.AsyncClient
) -> None:
    granted = await tokens(http, server)

    server.expire_access_tokens()
    expired = await me(http, server, granted["access_token"])
    renewed = (await refresh(http, server, granted["refresh_token"])).json()
    after = await me(http, server, renewed["access_token"])

    assert expired.status_code == 401
    assert 'error="invalid_token"' in expired.headers["www-authenticate"]
    assert expired.headers["www-authenticate"].startswith("Bearer ")
    assert after.status_code == 200
    assert [(call.path, call.status) for call in server.resource_calls] == [
        ("/api/me", 401),
        ("/api/me", 200),
    ]


async def test_access_token_expires_after_its_ttl(
    server: FakeOAuthServer, http: httpx.AsyncClient
) -> None:
    granted = await tokens(http, server)

    server.advance_clock(599)
    before = await me(http, server, granted["access_token"])
    server.advance_clock(2)
    after = await me(http, server, granted["access_token"])

    assert (before.status_code, after.status_code) == (200, 401)


async def test_missing_or_unknown_bearer_token_is_refused(
    server: FakeOAuthServer, http: httpx.AsyncClient
) -> None:
    missing = await http.get(f"{server.url}/api/me")
    unknown = await me(http, server, "not-a-token")

    assert missing.status_code == unknown.status_code == 401
    assert missing.headers["www-authenticate"] == 'Bearer realm="fake-oauth"'
    assert 'error="invalid_token"' in unknown.headers["www-authenticate"]


async def test_other_api_paths_echo_the_request(
    server: FakeOAuthServer, http: httpx.AsyncClient
) -> None:
    granted = await tokens(http, server)

    response = await http.get(
        f"{server.url}/api/contacts",
        params={"limit": "5"},
        headers={"authorization": f"Bearer {granted['access_token']}"},
    )

    assert response.status_code == 200
    assert response.json() == {
        "path": "/api/contacts",
        "query": {"limit": "5"},
        "user_id": "user_1",
        "client_id": CLIENT_ID,
        "scope": "read offline_access",
    }
    assert server.resource_calls[-1].token == granted["access_token"]
