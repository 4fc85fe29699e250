"""The smtp provider: login, refusals, an unreachable server, the payload log, the
connection check; its credentials never leave the vault."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from memberhub.kit.db import Database
from memberhub.settings import Settings
from tests.fakes.smtp_server import SmtpServer
from tests.notifications.conftest import (
    consenting_member,
    create_smtp_integration,
    deliver,
    hub_of,
    notifications,
)
from tests.support import ApiClient

USER, PASSWORD = "relay-user", "s3cret-relay-password"


@pytest.fixture
def guarded_smtp() -> Iterator[SmtpServer]:
    with SmtpServer(credentials=(USER, PASSWORD)) as server:
        yield server


async def _integration(api: ApiClient, port: int, password: str) -> dict[str, Any]:
    body = {
        "provider": "smtp",
        "name": "Relay with login",
        "config": {"host": "127.0.0.1", "port": port, "security": "none", "from_address": "a@b.co"},
        "credentials": {"username": USER, "password": password},
    }
    response = await api.post("/api/v1/integrations", body)
    assert response.status_code == 201, response.text
    assert PASSWORD not in response.text
    return dict(response.json())


async def test_a_relay_that_needs_a_login_gets_one_and_the_check_passes(
    api: ApiClient, db: Database, app: Any, settings: Settings, guarded_smtp: SmtpServer
) -> None:
    integration = await _integration(api, guarded_smtp.port, PASSWORD)
    check = await api.post(f"/api/v1/integrations/{integration['id']}/test")
    assert check.status_code == 200, check.text
    assert check.json()["ok"] is True

    member = await consenting_member(api)
    await deliver(db, app, settings)

    (received,) = guarded_smtp.received()
    assert received.recipients == [member["email"]]
    await hub_of(app).drain()
    calls = await api.get(f"/api/v1/integrations/{integration['id']}/calls")
    assert calls.status_code == 200, calls.text
    logged = calls.json()["data"]
    assert [(c["method"], c["outcome"]) for c in logged] == [("SMTP", "ok")]
    assert PASSWORD not in calls.text


async def test_a_refused_login_fails_the_notification_for_good(
    api: ApiClient, db: Database, app: Any, settings: Settings, guarded_smtp: SmtpServer
) -> None:
    integration = await _integration(api, guarded_smtp.port, "wrong-password")
    check = await api.post(f"/api/v1/integrations/{integration['id']}/test")
    assert check.json()["ok"] is False
    await consenting_member(api)

    await deliver(db, app, settings)

    (logged,) = await notifications(api)
    assert logged["status"] == "failed"
    assert "login refused: 535" in logged["error"]
    assert "wrong-password" not in logged["error"]
    assert guarded_smtp.received() == []


async def test_an_unreachable_server_leaves_the_notification_queued_for_a_retry(
    api: ApiClient, db: Database, app: Any, settings: Settings
) -> None:
    with SmtpServer() as stopped:
        port = stopped.port  # nothing listens there once the block ends
    await create_smtp_integration(api, port)
    await consenting_member(api)

    await deliver(db, app, settings)

    (logged,) = await notifications(api)
    assert logged["status"] == "queued"
    assert logged["attempts"] == 1
    assert "no session with 127.0.0.1" in logged["error"]
    assert logged["next_attempt_at"] is not None
