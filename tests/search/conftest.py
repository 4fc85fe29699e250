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
from tests.fakes.algolia import (
    DEFAULT_API_KEY,
    DEFAULT_APPLICATION_ID,
    FakeAlgolia,
    running_fake_algolia,
)
from tests.support import ApiClient, shortened_sleep

REWARDS = "memberhub_rewards"
MEMBERS = "memberhub_members"


@pytest.fixture(scope="module")
async def running() -> AsyncIterator[FakeAlgolia]:
    async with running_fake_algolia() as fake:
        yield fake


@pytest.fixture
def algolia(running: FakeAlgolia) -> FakeAlgolia:
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


def algolia_settings(fake: FakeAlgolia, **config: Any) -> dict[str, Any]:
    return {
        "provider": "algolia",
        "name": "Algolia",
        "config": {"base_url": fake.url, **config},
        "credentials": {"application_id": DEFAULT_APPLICATION_ID, "api_key": DEFAULT_API_KEY},
    }


async def create_algolia(api: ApiClient, fake: FakeAlgolia, **config: Any) -> dict[str, Any]:
    response = await api.post("/api/v1/integrations", algolia_settings(fake, **config))
    assert response.status_code == 201, response.text
    return dict(response.json())


async def tick(db: Database, hub: IntegrationHub, now: datetime | None = None) -> dict[str, int]:
    """One pass of the worker's jobs, the search sync among them."""
    return await Worker(db, hub=hub).tick(force=True, now=now)


async def status(api: ApiClient, integration_id: str) -> dict[str, Any]:
    response = await api.get(f"/api/v1/integrations/{integration_id}/search")
    assert response.status_code == 200, response.text
    return dict(response.json())
