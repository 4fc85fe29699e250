"""OAuth connections against a fake authorization server: authorize → callback → call →
expiry → refresh → call."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import select

from memberhub.integrations.hub import IntegrationHub
from memberhub.integrations.models import Integration
from memberhub.kit.crypto import SecretBox
from memberhub.kit.db import Database
from memberhub.settings import Settings
from memberhub.webhooks.ssrf import UrlPolicy
from tests.fakes.oauth_server import FakeOAuthServer, running_oauth_server
from tests.integrations.test_registry import dump
from tests.support import ApiClient


@pytest.fixture
async def oauth_server() -> AsyncIterator[FakeOAuthServer]:
    async with running_oauth_server(access_token_ttl=3600) as server:
        yield server


async def create_oauth_integration(api: ApiClient, server: FakeOAuthServer) -> dict[str, Any]:
    response = await api.post(
        "/api/v1/integrations",
        {
            "provider": "http",
            "name": "Partner API",
            "config": {
                "base_url": server.url,
                "auth": "oauth2",
                "test_path": "/api/me",
                "oauth": {
                    "authorize_url": server.authorize_url,
                    "token_url": server.token_url,
                    "scopes": ["read", "offline_access"],
                },
            },
            "credentials": {"client_id": server.client_id, "client_secret": server.client_secret},
        },
    )
    assert response.status_code == 201, response.text
    integration = dict(response.json())
    server.redirect_uris = (
        f"http://127.0.0.1:8000/api/v1/integrations/{integration['id']}/oauth/callback",
    )
    return integration


async def connect(api: ApiClient, http: httpx.AsyncClient, integration_id: str) -> httpx.Response:
    """What a browser does: authorize at the provider, follow its redirect back to us."""
    started = await api.get(f"/api/v1/integrations/{integration_id}/oauth/authorize")
    assert started.status_code == 200, started.text
    authorization_url = started.json()["authorization_url"]
    assert "code_challenge_method=S256" in authorization_url
    async with httpx.AsyncClient() as browser:
        approved = await browser.get(authorization_url)
    assert approved.status_code == 302, approved.text
    back = urlsplit(approved.headers["location"])
    return await http.get(f"{back.path}?{back.query}")


async def test_authorize_callback_call_expiry_refresh_call(
    api: ApiClient, http: httpx.AsyncClient, db: Database, oauth_server: FakeOAuthServer
) -> None:
    integration = await create_oauth_integration(api, oauth_server)
    assert integration["oauth"] == {"connected": False, "expires_at": None}

    callback = await connect(api, http, integration["id"])
    assert callback.status_code == 200, callback.text
    assert callback.json()["connected"] is True
    shown = (await api.get(f"/api/v1/integrations/{integration['id']}")).json()
    assert shown["oauth"]["connected"] is True
    assert shown["credentials"]["access_token"].startswith("…")

    first = await api.post(f"/api/v1/integrations/{integration['id']}/test")
    assert first.json()["ok"] is True, first.text

    oauth_server.expire_access_tokens()
    second = await api.post(f"/api/v1/integrations/{integration['id']}/test")
    assert second.json()["ok"] is True, second.text
    assert oauth_server.token_requests == ["authorization_code", "refresh_token"]
    statuses = [call.status for call in oauth_server.resource_calls]
    assert statuses == [200, 401, 200]

    # The refreshed tokens were stored, encrypted: a fresh process uses them at once.
    dumped = await dump(db)
    for token in oauth_server.issued_access_tokens:
        assert token not in dumped
    calls = await api.get(f"/api/v1/integrations/{integration['id']}/calls")
    assert calls.status_code == 200
    assert all(
        "Bearer" not in str(c["request_headers"]) or "***" in str(c["request_headers"])
        for c in calls.json()["data"]
    )
    token_calls = [c for c in calls.json()["data"] if c["url"].endswith("/oauth/token")]
    assert token_calls
    assert all(oauth_server.client_secret not in c["request_body"] for c in token_calls)


async def test_an_access_token_about_to_expire_is_refreshed_before_the_call(
    api: ApiClient, http: httpx.AsyncClient
) -> None:
    async with running_oauth_server(access_token_ttl=30) as server:
        integration = await create_oauth_integration(api, server)
        assert (await connect(api, http, integration["id"])).status_code == 200
        result = await api.post(f"/api/v1/integrations/{integration['id']}/test")
        assert result.json()["ok"] is True
        # Refreshed first, so the vendor never saw the stale token.
        assert server.token_requests == ["authorization_code", "refresh_token"]
        assert [call.status for call in server.resource_calls] == [200]


async def test_a_callback_is_single_use_and_needs_a_known_state(
    api: ApiClient, http: httpx.AsyncClient, oauth_server: FakeOAuthServer
) -> None:
    integration = await create_oauth_integration(api, oauth_server)
    started = await api.get(f"/api/v1/integrations/{integration['id']}/oauth/authorize")
    async with httpx.AsyncClient() as browser:
        approved = await browser.get(started.json()["authorization_url"])
    back = urlsplit(approved.headers["location"])
    assert (await http.get(f"{back.path}?{back.query}")).status_code == 200
    replay = await http.get(f"{back.path}?{back.query}")
    assert replay.status_code == 400
    assert replay.json()["error"]["code"] == "OAUTH_STATE_INVALID"
    forged = await http.get(f"{back.path}?code=abc&state=forged")
    assert forged.status_code == 400
    assert oauth_server.token_requests == ["authorization_code"]


async def test_a_provider_whose_server_wants_http_basic_authenticates_the_client_so(
    api: ApiClient, http: httpx.AsyncClient, db: Database, settings: Settings
) -> None:
    """Pipedrive's token endpoint takes the client id and secret by HTTP Basic only: the
    code exchange and each refresh send them so, never in the form."""
    async with running_oauth_server(client_auth="basic", scopes=["contacts:full"]) as server:
        created = await api.post(
            "/api/v1/integrations",
            {
                "provider": "pipedrive",
                "name": "Pipedrive",
                "config": {
                    "base_url": server.url,
                    "oauth": {"authorize_url": server.authorize_url, "token_url": server.token_url},
                },
                "credentials": {
                    "client_id": server.client_id,
                    "client_secret": server.client_secret,
                },
            },
        )
        assert created.status_code == 201, created.text
        integration = created.json()
        server.redirect_uris = (
            f"http://127.0.0.1:8000/api/v1/integrations/{integration['id']}/oauth/callback",
        )
        callback = await connect(api, http, integration["id"])
        assert callback.status_code == 200, callback.text
        assert callback.json()["connected"] is True

        hub = IntegrationHub(
            db, SecretBox(settings.resolved_secret_key), UrlPolicy.from_settings(settings)
        )
        try:
            async with db.transaction(read_only=True) as session:
                row = await session.scalar(
                    select(Integration).where(Integration.public_id == integration["id"])
                )
            assert row is not None
            hub.connection(row)
            server.expire_access_tokens()
            assert await hub.refresh(row.id) is True
        finally:
            await hub.aclose()
        # The server takes no other client authentication: both went by HTTP Basic.
        assert server.token_requests == ["authorization_code", "refresh_token"]
        calls = (await api.get(f"/api/v1/integrations/{integration['id']}/calls")).json()["data"]
        token_calls = [c for c in calls if c["url"].endswith("/oauth/token")]
        assert token_calls  # the exchange's, at least (the refresh was another process's)
        for call in token_calls:
            assert "client_secret" not in call["request_body"]
            assert call["request_headers"]["authorization"].startswith("***")
