from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from pydantic import SecretStr

from memberhub.app import create_app
from memberhub.kit.db import Database
from memberhub.settings import Settings
from tests.console.browser import ARTIFACTS, CHROMIUM, Console
from tests.fakes.oidc_provider import running_oidc_provider
from tests.support_server import bind_local_socket, serving_in_thread

if TYPE_CHECKING:
    from playwright.async_api import Browser


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


@pytest.fixture
async def console(settings: Settings, db: Database, tmp_path: Path) -> AsyncIterator[Console]:
    """The application served on a local port for a real browser, signing in through a
    fake OIDC provider; screenshots taken in the test are copied to test-artifacts/."""
    async with running_oidc_provider(redirect_uris=[]) as provider:
        sock, url = bind_local_socket()
        provider.redirect_uris.append(f"{url}/console/auth/callback")
        served = settings.model_copy(
            update={
                "public_url": url,
                # Plain http on 127.0.0.1 in this test: a Secure cookie would not be kept.
                "console_cookie_secure": False,
                "oidc_issuer": provider.url,
                "oidc_client_id": provider.client_id,
                "oidc_client_secret": SecretStr(provider.client_secret),
            }
        )
        async with serving_in_thread(create_app(served), sock, name="console-under-test"):
            shots = tmp_path / "screenshots"
            shots.mkdir()
            yield Console(url=url, provider=provider, screenshots=shots)
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            for shot in shots.iterdir():
                shutil.copy(shot, ARTIFACTS / shot.name)


@pytest.fixture(scope="session")
async def chromium_process() -> AsyncIterator[Browser]:
    """Debian's chromium, headless, through Playwright (never a downloaded browser): one per
    test process, as starting Playwright's driver and the browser cost seconds each time."""
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def chromium(chromium_process: Browser) -> AsyncIterator[Browser]:
    """The browser, for one test: each page it opens has a context (cookies, storage) of its
    own, and the contexts the test opened are closed after it."""
    before = set(chromium_process.contexts)
    yield chromium_process
    for context in chromium_process.contexts:
        if context not in before:
            await context.close()
