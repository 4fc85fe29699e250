"""Outbound Stripe calls through the gateway: connection check, customer, Checkout."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from memberhub.kit.db import Database
from tests.fakes.stripe import FakeStripe, running_fake_stripe
from tests.integrations.conftest import API_KEY, WEBHOOK_SECRET
from tests.support import ApiClient


@pytest.fixture
async def fake_stripe() -> AsyncIterator[FakeStripe]:
    async with running_fake_stripe(secret_key=API_KEY) as fake:
        yield fake


async def stripe_integration(api: ApiClient, fake: FakeStripe) -> dict[str, Any]:
    response = await api.post(
        "/api/v1/integrations",
        {
            "provider": "stripe",
            "name": "Stripe",
            "config": {"base_url": fake.url},
            "credentials": {"api_key": API_KEY, "webhook_secret": WEBHOOK_SECRET},
        },
    )
    assert response.status_code == 201, response.text
    return dict(response.json())


async def test_connection_check_reports_success_and_a_bad_key(
    api: ApiClient, fake_stripe: FakeStripe
) -> None:
    integration = await stripe_integration(api, fake_stripe)
    ok = await api.post(f"/api/v1/integrations/{integration['id']}/test")
    assert ok.status_code == 200
    assert ok.json()["ok"] is True
    assert "connected to Stripe account" in ok.json()["message"]

    await api.patch(
        f"/api/v1/integrations/{integration['id']}",
        {"credentials": {"api_key": "sk_test_wrong_key_000000000000"}},
    )
    bad = await api.post(f"/api/v1/integrations/{integration['id']}/test")
    assert bad.json()["ok"] is False
    assert "401" in bad.json()["message"]


async def test_checkout_creates_the_customer_once_and_a_session_per_request(
    api: ApiClient, db: Database, fake_stripe: FakeStripe
) -> None:
    integration = await stripe_integration(api, fake_stripe)
    plan = await api.create_plan(term_months=12, price_amount=12000)
    member = await api.create_member(first_name="Ana", last_name="Lim")
    path = f"/api/v1/integrations/{integration['id']}/checkout-sessions"
    body = {"member_id": member["id"], "plan_id": plan["id"], "success_url": "https://x.test/ok"}

    # The first attempt meets a Stripe outage; the gateway retries (the key makes it safe).
    fake_stripe.fail_next(2, status=500)
    first = await api.post(path, body)
    assert first.status_code == 201, first.text
    second = await api.post(path, body)
    assert second.status_code == 201, second.text

    assert len(fake_stripe.customers) == 1
    [customer] = fake_stripe.customers.values()
    assert customer["email"] == member["email"]
    assert customer["metadata"] == {"member_id": member["id"]}
    assert first.json()["customer_id"] == customer["id"] == second.json()["customer_id"]
    stored = (await api.get(f"/api/v1/members/{member['id']}")).json()
    assert stored["external_ids"]["stripe"] == customer["id"]

    session = fake_stripe.checkout_sessions[first.json()["id"]]
    assert session["mode"] == "subscription" == first.json()["mode"]
    assert session["metadata"] == {"member_id": member["id"], "plan_id": plan["id"]}
    assert session["customer"] == customer["id"]
    assert first.json()["url"].startswith("https://checkout.stripe.com/")
    assert len(fake_stripe.checkout_sessions) == 2

    health = await api.get(f"/api/v1/integrations/{integration['id']}/health")
    assert health.status_code == 200
    figures = health.json()
    assert figures["calls"] == 3
    assert figures["succeeded"] == 3
    assert figures["latency_ms"]["p50"] is not None
    calls = (await api.get(f"/api/v1/integrations/{integration['id']}/calls")).json()["data"]
    assert {c["attempts"] for c in calls} >= {3}  # the call that met the outage
    assert all(API_KEY not in str(c["request_headers"]) for c in calls)


async def test_an_outage_opens_an_incident_that_a_success_closes(
    api: ApiClient, fake_stripe: FakeStripe
) -> None:
    integration = await stripe_integration(api, fake_stripe)
    fake_stripe.fail_next(5, status=503)
    failed = await api.post(f"/api/v1/integrations/{integration['id']}/test")
    assert failed.json()["ok"] is False
    during = (await api.get(f"/api/v1/integrations/{integration['id']}/health")).json()
    assert during["open_incident"] is not None
    assert during["healthy"] is False
    alerts = (await api.get("/api/v1/alerts", params={"type": "INTEGRATION_INCIDENT"})).json()
    assert [a["data"]["integration_id"] for a in alerts["data"]] == [integration["id"]]
    opened = await api.get("/api/v1/events", params={"type": "integration.incident.opened"})
    assert [e["data"]["integration_id"] for e in opened.json()["data"]] == [integration["id"]]
    status = (await api.get("/api/v1/sync/status")).json()
    assert status["sync_errors"] == 1
    assert status["connected"] == ["stripe"]

    assert (await api.post(f"/api/v1/integrations/{integration['id']}/test")).json()["ok"]
    after = (await api.get(f"/api/v1/integrations/{integration['id']}/health")).json()
    assert after["open_incident"] is None
    assert after["incidents"] == 1
    assert after["mean_time_to_recovery_seconds"] is not None
    assert after["success_rate"] == 50.0
    closed = await api.get("/api/v1/events", params={"type": "integration.incident.closed"})
    [event] = closed.json()["data"]
    assert event["data"]["opened_at"] <= event["data"]["closed_at"]
