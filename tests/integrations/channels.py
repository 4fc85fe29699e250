"""Helpers of the notification channel tests: an integration made through the API and
the provider's connection to it, as the notifications sender gets it from the hub."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from memberhub.integrations.hub import IntegrationHub
from memberhub.integrations.models import Integration
from memberhub.integrations.providers.base import Connection
from memberhub.kit.db import Database
from tests.support import ApiClient


async def no_wait(seconds: float) -> None:
    """The hub's retry sleep in tests: backoffs and Retry-After waits pass at once."""


async def create_integration(
    api: ApiClient, provider: str, config: dict[str, Any], credentials: dict[str, Any]
) -> dict[str, Any]:
    response = await api.post(
        "/api/v1/integrations",
        {
            "provider": provider,
            "name": provider.title(),
            "config": config,
            "credentials": credentials,
        },
    )
    assert response.status_code == 201, response.text
    return dict(response.json())


async def connection_for(db: Database, hub: IntegrationHub, public_id: str) -> Connection:
    async with db.transaction(read_only=True) as session:
        integration = await session.scalar(
            select(Integration).where(Integration.public_id == public_id)
        )
    assert integration is not None
    return hub.connection(integration)


async def payload_log(api: ApiClient, integration_id: str) -> str:
    """Everything the payload log shows of the integration's calls, as one text."""
    response = await api.get(f"/api/v1/integrations/{integration_id}/calls")
    assert response.status_code == 200, response.text
    return response.text
