from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from sqlalchemy import select

from memberhub.events.catalog import AlertRaised
from memberhub.events.models import Event
from memberhub.events.sequencer import run_passes
from memberhub.events.service import emit_many
from memberhub.kit.clock import utcnow
from memberhub.kit.crypto import SecretBox
from memberhub.kit.db import Database
from memberhub.settings import Settings
from memberhub.webhooks.delivery import DeliveryConfig, DeliveryLoop
from memberhub.webhooks.models import WebhookAttempt, WebhookDelivery
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


@asynccontextmanager
async def running_loop(db: Database, settings: Settings, **overrides: Any) -> AsyncIterator[None]:
    """The delivery loop running as in the worker, until the block ends."""
    loop = delivery_loop(db, settings, **{"webhook_poll_seconds": 0.05, **overrides})
    stop = asyncio.Event()
    task = asyncio.create_task(loop.run(stop, grace=0.5))
    try:
        yield
    finally:
        stop.set()
        await task


async def emit_alerts(db: Database, count: int) -> list[str]:
    """`count` committed outbox events, in one transaction; their ids in commit order."""
    now = utcnow()
    data = [
        (
            AlertRaised(
                alert_id=f"alr_{i}",
                alert_type="LOW_REDEMPTION_RATE",
                priority="low",
                member_id=None,
                message=f"event {i}",
                data={"n": i},
                occurred_at=now,
            ),
            None,
            None,
        )
        for i in range(count)
    ]
    async with db.transaction() as session:
        await emit_many(session, data, occurred_at=now)
    await run_passes(db)
    async with db.transaction() as session:
        ids = await session.scalars(
            select(Event.public_id).where(Event.type == "alert.raised").order_by(Event.position)
        )
        return list(ids)[-count:]


async def attempts_of(db: Database, event_public_id: str) -> list[WebhookAttempt]:
    async with db.transaction() as session:
        rows = await session.scalars(
            select(WebhookAttempt)
            .join(WebhookDelivery, WebhookDelivery.id == WebhookAttempt.delivery_id)
            .join(Event, Event.id == WebhookDelivery.event_id)
            .where(Event.public_id == event_public_id)
            .order_by(WebhookAttempt.number)
        )
        return list(rows)
