from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from memberhub.settings import Settings


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # The console's cookie is Secure outside development: the test client speaks https.
    return settings.model_copy(update={"public_url": "https://testserver"})


@pytest.fixture
async def browser(app: object) -> AsyncIterator[httpx.AsyncClient]:
    """A client that keeps the console's cookie, as a browser does."""
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="https://testserver") as client:
        yield client
