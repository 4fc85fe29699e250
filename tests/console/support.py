"""Driving the console as a browser would, over httpx: forms with their CSRF token."""

from __future__ import annotations

import re
from typing import Any

import httpx

from memberhub.auth.principal import Principal
from memberhub.kit.actor import Actor
from memberhub.kit.db import Database
from memberhub.staff.service import create_staff

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
PASSWORD = "correct horse battery"


def csrf_of(page: httpx.Response) -> str:
    match = CSRF.search(page.text)
    assert match is not None, page.text
    return match.group(1)


async def create_staff_user(
    db: Database,
    email: str = "ana@example.org",
    role: str = "admin",
    *,
    organisation: str | None = None,
    password: str = PASSWORD,
) -> str:
    async with db.transaction() as session:
        created = await create_staff(
            session,
            Principal.system(Actor.system("test")),
            email=email,
            name=email.partition("@")[0],
            role=role,
            organisation_public_id=organisation,
            password=password,
        )
        return created.staff.public_id


async def submit(
    browser: httpx.AsyncClient, page_url: str, action: str, fields: dict[str, Any]
) -> httpx.Response:
    """Open `page_url`, then post its form to `action` with the page's CSRF token."""
    page = await browser.get(page_url)
    assert page.status_code == 200, page.text
    return await browser.post(action, data={"csrf_token": csrf_of(page), **fields})


async def sign_in(
    browser: httpx.AsyncClient, email: str = "ana@example.org", password: str = PASSWORD
) -> httpx.Response:
    return await submit(
        browser, "/console/sign-in", "/console/sign-in", {"email": email, "password": password}
    )
