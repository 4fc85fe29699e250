"""The generic http provider's connection test and notify: only a 2xx is a success."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.support import ApiClient
from tests.support_server import bind_local_socket, serving_in_thread


async def _moved(_request: Request) -> Response:
    return Response(status_code=302, headers={"Location": "https://login.example.com/"})


async def _ok(_request: Request) -> Response:
    return Response(b'{"ok": true}', media_type="application/json")


@pytest.fixture
async def partner() -> AsyncIterator[str]:
    routes = [Route("/moved", _moved, methods=["GET", "POST"]), Route("/ok", _ok)]
    sock, base_url = bind_local_socket()
    async with serving_in_thread(Starlette(routes=routes), sock, name="partner", lifespan="off"):
        yield base_url


async def _integration(api: ApiClient, base_url: str, test_path: str) -> str:
    config = {"base_url": base_url, "auth": "none", "test_path": test_path}
    created = await api.post(
        "/api/v1/integrations", {"provider": "http", "name": "Partner", "config": config}
    )
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


async def test_a_redirect_is_not_a_working_connection(api: ApiClient, partner: str) -> None:
    moved = await _integration(api, partner, "/moved")
    result = (await api.post(f"/api/v1/integrations/{moved}/test")).json()
    assert result["ok"] is False, result
    assert result["message"] == (
        "GET /moved answered 302, redirecting to https://login.example.com/"
    )
    fine = await _integration(api, partner, "/ok")
    assert (await api.post(f"/api/v1/integrations/{fine}/test")).json()["ok"] is True
