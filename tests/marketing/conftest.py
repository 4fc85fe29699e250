from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import pytest

from memberhub.integrations.hub import IntegrationHub
from memberhub.kit.crypto import SecretBox
from memberhub.kit.db import Database
from memberhub.settings import Settings
from memberhub.webhooks.ssrf import UrlPolicy
from memberhub.worker.runner import Worker
from tests.fakes.mailchimp import FakeMailchimp, running_fake_mailchimp
from tests.support import ApiClient, shortened_sleep

WEBHOOK_SECRET = "mc-hook-secret-0123456789abcdef"


@pytest.fixture(scope="module")
async def running() -> AsyncIterator[FakeMailchimp]:
    async with running_fake_mailchimp() as fake:
        yield fake


@pytest.fixture
def mailchimp(running: FakeMailchimp) -> FakeMailchimp:
    running.reset()
    return running


@pytest.fixture
async def hub(settings: Settings, db: Database) -> AsyncIterator[IntegrationHub]:
    integrations = IntegrationHub(
        db,
        SecretBox(settings.resolved_secret_key),
        UrlPolicy.from_settings(settings),
        retry_sleep=shortened_sleep,
    )
    yield integrations
    await integrations.aclose()


def mailchimp_settings(fake: FakeMailchimp, list_id: str, **config: Any) -> dict[str, Any]:
    return {
        "provider": "mailchimp",
        "name": "Mailchimp",
        "config": {"base_url": fake.url, "list_id": list_id, **config},
        "credentials": {"api_key": fake.api_key, "webhook_secret": WEBHOOK_SECRET},
    }


async def create_mailchimp(
    api: ApiClient, fake: FakeMailchimp, list_id: str, **config: Any
) -> dict[str, Any]:
    response = await api.post("/api/v1/integrations", mailchimp_settings(fake, list_id, **config))
    assert response.status_code == 201, response.text
    return dict(response.json())


async def tick(db: Database, hub: IntegrationHub, now: datetime | None = None) -> dict[str, int]:
    """One pass of the worker's jobs, the marketing sync among them."""
    return await Worker(db, hub=hub).tick(force=True, now=now)


async def status(api: ApiClient, integration_id: str) -> dict[str, Any]:
    response = await api.get(f"/api/v1/integrations/{integration_id}/marketing")
    assert response.status_code == 200, response.text
    return dict(response.json())
