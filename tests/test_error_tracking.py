"""With SENTRY_DSN set, an unhandled error reaches Sentry as an envelope (here a local
receiver speaking Sentry's envelope endpoint), without the API key or the request body."""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import sentry_sdk
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from memberhub.app import create_app
from memberhub.kit.db import Database
from memberhub.ops.tracking import configure_error_tracking
from memberhub.settings import Settings
from tests.support_server import bind_local_socket, serving_in_thread


class Receiver:
    def __init__(self) -> None:
        self.envelopes: list[bytes] = []

    async def envelope(self, request: Request) -> Response:
        body = await request.body()
        if request.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        self.envelopes.append(body)
        return Response('{"id": "1"}', media_type="application/json")

    def events(self) -> list[dict[str, Any]]:
        found = []
        for envelope in self.envelopes:
            lines = envelope.split(b"\n")
            for header, payload in zip(lines[1::2], lines[2::2], strict=False):
                if json.loads(header).get("type") == "event":
                    found.append(json.loads(payload))
        return found


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    received = Receiver()
    app = Starlette(routes=[Route("/api/1/envelope/", received.envelope, methods=["POST"])])
    sock, base_url = bind_local_socket()
    async with serving_in_thread(app, sock, name="sentry", lifespan="off"):
        yield received, base_url
    sentry_sdk.init()  # no DSN: tracking off again for the other tests


async def test_an_unhandled_error_is_sent_without_secrets(
    settings: Settings, db: Database, admin_key: str, receiver: tuple[Receiver, str]
) -> None:
    received, base_url = receiver
    host = base_url.removeprefix("http://")
    tracked = settings.model_copy(update={"sentry_dsn": f"http://publickey@{host}/1"})
    assert configure_error_tracking(tracked)
    app = create_app(tracked, db=db)

    async def boom() -> None:
        raise RuntimeError("the unexpected")

    app.add_api_route("/api/v1/boom", boom, methods=["POST"])
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.post(
            "/api/v1/boom",
            json={"email": "ana@example.com"},
            headers={"Authorization": f"Bearer {admin_key}"},
        )
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "INTERNAL_ERROR"
    sentry_sdk.flush(timeout=10)
    events = received.events()
    assert len(events) == 1, received.envelopes
    event = events[0]
    assert event["exception"]["values"][-1]["value"] == "the unexpected"
    assert event["release"].startswith("memberhub@")
    raw = b"".join(received.envelopes)
    assert admin_key.encode() not in raw
    assert b"ana@example.com" not in raw


async def test_without_a_dsn_nothing_is_started(settings: Settings) -> None:
    assert not configure_error_tracking(settings)
