from __future__ import annotations

import itertools
import json
import time
from typing import Any

import httpx
import stripe

from memberhub.kit.db import Database
from memberhub.worker.runner import Worker
from tests.support import ApiClient

WEBHOOK_SECRET = "whsec_inbound_test_secret_0123456789abcdef"
API_KEY = "sk_test_memberhub_0123456789abcdefghij"
_ids = itertools.count(1)


def stripe_id(prefix: str) -> str:
    return f"{prefix}_test{next(_ids):08d}"


def stripe_event(
    event_type: str, obj: dict[str, Any], *, event_id: str | None = None
) -> dict[str, Any]:
    """A Stripe Event object as Stripe sends it to a webhook endpoint."""
    return {
        "id": event_id or stripe_id("evt"),
        "object": "event",
        "api_version": "2024-06-20",
        "created": int(time.time()),
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": event_type,
        "data": {"object": obj},
    }


def signed(
    event: dict[str, Any], secret: str = WEBHOOK_SECRET, *, timestamp: int | None = None
) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(event)
    header = stripe.WebhookSignature.generate_signature_header(body, secret, timestamp=timestamp)
    return body.encode(), {"Stripe-Signature": header, "Content-Type": "application/json"}


async def create_stripe_integration(
    api: ApiClient, *, organisation_id: str | None = None, **config: Any
) -> dict[str, Any]:
    response = await api.post(
        "/api/v1/integrations",
        {
            "provider": "stripe",
            "name": "Stripe",
            "organisation_id": organisation_id,
            "config": config,
            "credentials": {"api_key": API_KEY, "webhook_secret": WEBHOOK_SECRET},
        },
    )
    assert response.status_code == 201, response.text
    return dict(response.json())


async def send(
    http: httpx.AsyncClient, integration_id: str, event: dict[str, Any], **kwargs: Any
) -> httpx.Response:
    body, headers = signed(event, **kwargs)
    return await http.post(f"/api/v1/inbound/{integration_id}", content=body, headers=headers)


async def run_worker(db: Database) -> dict[str, int]:
    """One pass of every worker job, as the worker makes it."""
    return await Worker(db).tick(force=True)
