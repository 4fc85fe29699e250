"""Finance against the Xero fake: an integration connected by OAuth, its mapping saved,
Stripe's payment webhooks through the inbound endpoint, the worker booking them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from memberhub.integrations.hub import IntegrationHub
from memberhub.kit.clock import utcnow
from memberhub.kit.crypto import SecretBox
from memberhub.kit.db import Database
from memberhub.settings import Settings
from memberhub.webhooks.ssrf import UrlPolicy
from memberhub.worker.runner import Worker
from tests.fakes.stripe import FakeStripe, running_fake_stripe
from tests.fakes.xero import FakeXero, running_fake_xero
from tests.integrations.conftest import API_KEY, stripe_event, stripe_id
from tests.support import ApiClient

WEBHOOK_KEY = "xero-webhook-key-0123456789abcdefghijklmnopqrstuvwxyz=="
# The fake's limits are Xero's; the client's per-minute limit is raised so a hundred
# bookings take seconds (the daily and concurrent limits stay Xero's).
CLIENT_RATE = "100000/minute"


async def shortened_sleep(seconds: float) -> None:
    """Retry backoffs and Retry-After waits at a fiftieth."""
    await asyncio.sleep(seconds / 50)


@pytest.fixture
async def xero() -> AsyncIterator[FakeXero]:
    async with running_fake_xero() as fake:
        fake.set_limits(per_minute=100_000, per_day=100_000, concurrent=5)
        fake.add_account("200", "Sales", "REVENUE", tax_type="OUTPUT2")
        fake.add_account("210", "Membership fees", "REVENUE", tax_type="NONE")
        fake.add_account("090", "Stripe clearing", "BANK")
        fake.add_account("091", "Business bank account", "BANK")
        fake.add_account("404", "Bank fees", "EXPENSE")
        fake.add_tracking("Region", "North", "South")
        yield fake


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


async def put(api: ApiClient, path: str, body: Any) -> httpx.Response:
    return await api.http.put(path, json=body, headers=api._headers(None))


async def create_xero_integration(
    api: ApiClient, xero: FakeXero, *, organisation_id: str | None = None
) -> dict[str, Any]:
    response = await api.post(
        "/api/v1/integrations",
        {
            "provider": "xero",
            "name": "Xero",
            "organisation_id": organisation_id,
            "config": {
                "base_url": xero.url,
                "rate_limit": CLIENT_RATE,
                "oauth": {"authorize_url": xero.authorize_url, "token_url": xero.token_url},
            },
            "credentials": {
                "client_id": xero.client_id,
                "client_secret": xero.client_secret,
                "webhook_key": WEBHOOK_KEY,
            },
        },
    )
    assert response.status_code == 201, response.text
    return dict(response.json())


async def connect(api: ApiClient, http: httpx.AsyncClient, integration_id: str) -> None:
    """What an admin's browser does: authorize at Xero, follow its redirect back to us."""
    started = await api.get(f"/api/v1/integrations/{integration_id}/oauth/authorize")
    assert started.status_code == 200, started.text
    url = started.json()["authorization_url"]
    assert "offline_access" in url
    async with httpx.AsyncClient() as browser:
        approved = await browser.get(url)
    assert approved.status_code == 302, approved.text
    back = urlsplit(approved.headers["location"])
    answered = await http.get(f"{back.path}?{back.query}")
    assert answered.status_code == 200, answered.text


def mapping_body(plan: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {
        "plans": {
            plan["id"]: {
                "account_code": "210",
                "tax_type": "NONE",
                "tracking": [{"category": "Region", "option": "North"}],
            }
        },
        "payments_account_code": "090",
        "payouts_bank_account_code": "091",
        "fees_account_code": "404",
        **changes,
    }


async def connected_xero(
    api: ApiClient, http: httpx.AsyncClient, xero: FakeXero, plan: dict[str, Any]
) -> dict[str, Any]:
    """A Xero integration connected by OAuth with its mapping saved."""
    integration = await create_xero_integration(api, xero)
    await connect(api, http, integration["id"])
    saved = await put(
        api, f"/api/v1/integrations/{integration['id']}/accounting-mapping", mapping_body(plan)
    )
    assert saved.status_code == 200, saved.text
    assert saved.json()["tenant_id"] == xero.tenant.tenant_id
    return integration


def checkout_event(member: dict[str, Any], plan: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return stripe_event(
        "checkout.session.completed",
        {
            "id": fields.pop("id", stripe_id("cs")),
            "object": "checkout.session",
            "mode": "payment",
            "payment_status": "paid",
            "status": "complete",
            "customer": fields.pop("customer", stripe_id("cus")),
            "customer_details": {"email": member["email"]},
            "client_reference_id": member["id"],
            "metadata": {"member_id": member["id"], "plan_id": plan["id"]},
            "invoice": fields.pop("invoice", None),
            "payment_intent": fields.pop("payment_intent", stripe_id("pi")),
            "amount_total": fields.pop("amount_total", plan["price_amount"]),
            "currency": fields.pop("currency", plan["currency"].lower()),
            **fields,
        },
    )


async def work(db: Database, hub: IntegrationHub, *, rounds: int = 30) -> None:
    """Worker passes until nothing is left to book; later passes act as if the retry
    backoffs had passed."""
    worker = Worker(db, hub=hub)
    await worker.tick(force=True)
    for round_ in range(rounds):
        results = await worker.tick(force=True, now=utcnow() + timedelta(hours=round_ + 1))
        if not await _pending(db):
            break
        del results
    await hub.drain()


async def _pending(db: Database) -> int:
    from sqlalchemy import func, select

    from memberhub.finance.models import EntryStatus, FinanceEntry

    async with db.transaction(read_only=True) as session:
        return int(
            await session.scalar(
                select(func.count()).where(FinanceEntry.status == EntryStatus.PENDING)
            )
            or 0
        )


async def entries(api: ApiClient, integration_id: str, **params: Any) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = {"limit": 500, **params, **({"cursor": cursor} if cursor else {})}
        response = await api.get(
            f"/api/v1/integrations/{integration_id}/finance-entries", params=query
        )
        assert response.status_code == 200, response.text
        found.extend(response.json()["data"])
        cursor = response.json()["pagination"]["next_cursor"]
        if not response.json()["pagination"]["has_more"]:
            return found


@pytest.fixture
async def stripe_api() -> AsyncIterator[FakeStripe]:
    async with running_fake_stripe(secret_key=API_KEY) as fake:
        yield fake


def this_month() -> tuple[str, str]:
    now = datetime.now(UTC)
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return start.isoformat(), end.isoformat()


async def reconcile(
    api: ApiClient, db: Database, hub: IntegrationHub, integration_id: str
) -> dict[str, Any]:
    start, end = this_month()
    created = await api.post(
        "/api/v1/reconciliations",
        {"integration_id": integration_id, "period_start": start, "period_end": end},
    )
    assert created.status_code == 202, created.text
    assert created.json()["status"] == "queued"
    await work(db, hub)
    report = await api.get(f"/api/v1/reconciliations/{created.json()['id']}")
    assert report.status_code == 200
    assert report.json()["status"] == "completed", report.json()
    return dict(report.json())
