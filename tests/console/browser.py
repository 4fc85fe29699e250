"""Driving the console in a real browser: Debian's chromium through Playwright for Python.

A browser test module calls `require_chromium()` before importing Playwright, and asks
for the `console` (the application served on a local port with a fake OIDC provider) and
`chromium` fixtures from this directory's conftest. `check_page` checks accessibility
basics (each form field labelled, one h1, no sideways scrolling at 375 px) and keeps a
screenshot of each page under the test's directory, copied to test-artifacts/console/
(git-ignored).

The browser must come from the system's package (`apt-get install chromium`; `.ci/run`
installs it), never from a download: the tests are skipped when it is missing, except in
CI, where that fails them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from playwright.async_api import Page, ViewportSize

    from tests.fakes.oidc_provider import FakeOidcProvider

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "console"
PHONE_WIDTH = 375
DESKTOP: ViewportSize = {"width": 1280, "height": 800}

# Run in the page through the DevTools protocol (not subject to the page's CSP).
A11Y_CHECK = """() => {
  const fields = [...document.querySelectorAll(
    'input:not([type=hidden]):not([hidden]), select, textarea')];
  return {
    h1: document.querySelectorAll('h1').length,
    unlabelled: fields.filter(f => !(f.labels && f.labels.length) &&
                                   !f.getAttribute('aria-label')).map(f => f.name || f.id),
    overflow: document.documentElement.scrollWidth - window.innerWidth,
  };
}"""


def require_chromium() -> None:
    """Skip the calling test module when chromium is missing, or fail it in CI."""
    if CHROMIUM.exists():
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI needs {CHROMIUM} (apt-get install chromium)", pytrace=False)
    pytest.skip(
        f"{CHROMIUM} is not installed (apt-get install chromium); browser tests skipped",
        allow_module_level=True,
    )


@dataclass
class Console:
    url: str
    provider: FakeOidcProvider
    screenshots: Path


async def check_page(page: Page, console: Console, name: str) -> None:
    """Accessibility basics, at desktop width and at 375 px, with a screenshot of each."""
    # After a form post the next page may still be loading: check the page that arrived.
    await page.wait_for_load_state("load")
    found: dict[str, Any] = await page.evaluate(A11Y_CHECK)
    assert found["h1"] == 1, (name, found)
    assert found["unlabelled"] == [], (name, found)
    await page.screenshot(path=console.screenshots / f"{name}.png", full_page=True)
    desktop = page.viewport_size
    await page.set_viewport_size({"width": PHONE_WIDTH, "height": 800})
    narrow: dict[str, Any] = await page.evaluate(A11Y_CHECK)
    assert narrow["overflow"] <= 0, (name, narrow)
    await page.screenshot(path=console.screenshots / f"{name}-375px.png", full_page=True)
    assert desktop is not None
    await page.set_viewport_size(desktop)
