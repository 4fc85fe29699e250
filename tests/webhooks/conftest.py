from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from memberhub.kit.crypto import SecretBox
from memberhub.kit.db import Database
from memberhub.settings import Settings
from memberhub.webhooks.delivery import DeliveryConfig, DeliveryLoop
from tests.fakes.webhook_receiver import WebhookReceiver, running_receiver
from tests.support import ApiClient


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    async with running_receiver() as running:
        yield running


def delivery_loop(db: Database, settings: Settings, **overrides: Any) -> DeliveryLoop:
    """The worker's delivery loop for `settings`, with setting overrides (webhook_…)."""
    settings = settings.model_copy(update=overrides)
    return DeliveryLoop(
        db,
        DeliveryConfig.from_settings(settings),
        SecretBox(settings.resolved_secret_key),
        worker_id="test-worker",
    )


async def create_endpoint(
    api: ApiClient, url: str, event_types: list[str] | None = None, **fields: Any
) -> dict[str, Any]:
    body = {"url": url, "event_types": event_types or ["*"], **fields}
    response = await api.post("/api/v1/webhook-endpoints", body)
    assert response.status_code == 201, response.text
    return dict(response.json())
