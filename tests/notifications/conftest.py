"""Helpers of the notification tests: a real SMTP server, an SMTP integration, a tiny SMS
channel registered for the test only, and the worker's planning and sending passes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, ClassVar, TypeVar

import pytest
from fastapi import FastAPI

from memberhub.integrations import providers
from memberhub.integrations.hub import IntegrationHub
from memberhub.integrations.providers.base import (
    Capability,
    Connection,
    DeliveryReport,
    OutgoingMessage,
    Provider,
    SendRejected,
    SendResult,
)
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.notifications.planning import LinkSettings, plan_notifications
from memberhub.notifications.sending import NotificationSender
from memberhub.settings import Settings
from tests.fakes.smtp_server import SmtpServer
from tests.support import ApiClient

FROM = "club@example.com"


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    with SmtpServer() as server:
        yield server


async def create_smtp_integration(api: ApiClient, port: int, **config: Any) -> dict[str, Any]:
    body = {
        "provider": "smtp",
        "name": "Mail relay",
        "config": {
            "host": "127.0.0.1",
            "port": port,
            "security": "none",
            "from_address": FROM,
            "from_name": "The Club",
            **config,
        },
    }
    response = await api.post("/api/v1/integrations", body)
    assert response.status_code == 201, response.text
    return dict(response.json())


@pytest.fixture
async def mail(api: ApiClient, smtp: SmtpServer) -> dict[str, Any]:
    """The SMTP integration, sending to the test's server."""
    return await create_smtp_integration(api, smtp.port)


class RecordingSms(Provider):
    """An SMS channel that keeps what it is given; numbers in `refused` are refused for
    good, as a vendor refuses an invalid number."""

    name = "test_sms"
    title = "Test SMS"
    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.MESSAGES})
    message_channels: ClassVar[frozenset[str]] = frozenset({"sms"})

    def __init__(self) -> None:
        self.sent: list[OutgoingMessage] = []
        self.refused: set[str] = set()
        # Recipients the vendor says no longer exist (a push token of an app uninstalled).
        self.gone: set[str] = set()

    async def send_message(self, connection: Connection, message: OutgoingMessage) -> SendResult:
        if message.to in self.refused:
            raise SendRejected(
                "21211: The 'To' number is not a valid phone number.", permanent=True
            )
        if message.to in self.gone:
            raise SendRejected("UNREGISTERED: no such device", permanent=True, recipient_gone=True)
        self.sent.append(message)
        return SendResult(provider_message_id=f"SM{len(self.sent):032d}")

    def delivery_reports(self, event_type: str, body: bytes) -> list[DeliveryReport]:
        return []


P = TypeVar("P", bound=Provider)


@asynccontextmanager
async def registered(api: ApiClient, provider: P, name: str) -> AsyncIterator[P]:
    """`provider` registered and configured as an integration while the block runs."""
    providers.register(provider)
    try:
        response = await api.post(
            "/api/v1/integrations", {"provider": provider.name, "name": name, "config": {}}
        )
        assert response.status_code == 201, response.text
        yield provider
    finally:
        providers._PROVIDERS.pop(provider.name, None)


@pytest.fixture
async def sms(api: ApiClient) -> AsyncIterator[RecordingSms]:
    """The test SMS channel, registered and configured as an integration for this test."""
    async with registered(api, RecordingSms(), "SMS") as provider:
        yield provider


def hub_of(app: Any) -> IntegrationHub:
    assert isinstance(app, FastAPI)
    hub: IntegrationHub = app.state.integrations
    return hub


async def deliver(
    db: Database, app: Any, settings: Settings, now: datetime | None = None
) -> tuple[int, int]:
    """What the worker's notification jobs do in a tick: plan, then send; as of `now`."""
    moment = now or utcnow()
    links = LinkSettings(public_url=settings.public_url, secret=settings.resolved_secret_key)
    planned = await plan_notifications(db, moment, links)
    sent = await NotificationSender(db, hub_of(app)).send_due(moment)
    return planned, sent


async def notifications(api: ApiClient, **filters: Any) -> list[dict[str, Any]]:
    response = await api.get("/api/v1/notifications", {"limit": 500, **filters})
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


async def consenting_member(api: ApiClient, **fields: Any) -> dict[str, Any]:
    return await api.create_member(consent={"email": True, **fields.pop("consent", {})}, **fields)


async def award(api: ApiClient, member_id: str, points: int, **fields: Any) -> dict[str, Any]:
    body = {"member_id": member_id, "points": points, "reason": "Welcome bonus", **fields}
    response = await api.post("/api/v1/points/award", body)
    assert response.status_code == 201, response.text
    return dict(response.json())
