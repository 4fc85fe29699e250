"""Xero's webhooks through the inbound endpoint: the signature recipe of Xero's
documentation (base64 of HMAC-SHA256 of the raw body under the webhook key), computed here
independently of the code under test, and the intent-to-receive check."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import httpx

from memberhub.integrations.hub import IntegrationHub
from memberhub.kit.db import Database
from tests.fakes.xero import FakeXero
from tests.finance.conftest import (
    WEBHOOK_KEY,
    checkout_event,
    connected_xero,
    create_xero_integration,
    entries,
    work,
)
from tests.integrations.conftest import create_stripe_integration, send
from tests.support import ApiClient


def xero_signature(body: bytes, key: str = WEBHOOK_KEY) -> str:
    return base64.b64encode(hmac.new(key.encode(), body, hashlib.sha256).digest()).decode()


INTENT = json.dumps(
    {"events": [], "firstEventSequence": 0, "lastEventSequence": 0, "entropy": "S0MEENTR0PY"}
).encode()


async def test_the_intent_to_receive_check_answers_200_for_a_good_signature_and_401_else(
    api: ApiClient, http: httpx.AsyncClient, xero: FakeXero
) -> None:
    integration = await create_xero_integration(api, xero)
    url = f"/api/v1/inbound/{integration['id']}"

    good = await http.post(
        url, content=INTENT, headers={"x-xero-signature": xero_signature(INTENT)}
    )
    assert good.status_code == 200
    assert good.content == b""

    for headers in (
        {"x-xero-signature": xero_signature(INTENT, "another-key-0123456789")},
        {"x-xero-signature": xero_signature(INTENT + b" ")},
        {"x-xero-signature": "not base64!"},
        {},
    ):
        bad = await http.post(url, content=INTENT, headers=headers)
        assert bad.status_code == 401, headers
        assert bad.content == b""
    # A tampered body with the original signature is refused too.
    tampered = INTENT.replace(b"S0ME", b"SOME")
    refused = await http.post(
        url, content=tampered, headers={"x-xero-signature": xero_signature(INTENT)}
    )
    assert refused.status_code == 401


async def test_an_invoice_update_from_xero_shows_in_the_entry_log(
    api: ApiClient, http: httpx.AsyncClient, db: Database, hub: IntegrationHub, xero: FakeXero
) -> None:
    plan = await api.create_plan(price_amount=1000, currency="GBP")
    stripe = await create_stripe_integration(api)
    integration = await connected_xero(api, http, xero, plan)
    member = await api.create_member()
    await send(http, stripe["id"], checkout_event(member, plan))
    await work(db, hub)
    [invoice] = xero.invoices

    body = json.dumps(
        {
            "events": [
                {
                    "resourceUrl": f"https://api.xero.com/api.xro/2.0/Invoices/{invoice['InvoiceID']}",
                    "resourceId": invoice["InvoiceID"],
                    "eventDateUtc": "2026-12-05T23:00:00.000",
                    "eventType": "UPDATE",
                    "eventCategory": "INVOICE",
                    "tenantId": xero.tenant.tenant_id,
                    "tenantType": "ORGANISATION",
                }
            ],
            "firstEventSequence": 1,
            "lastEventSequence": 1,
            "entropy": "ABCDEFGHIJ",
        }
    ).encode()
    answered = await http.post(
        f"/api/v1/inbound/{integration['id']}",
        content=body,
        headers={"x-xero-signature": xero_signature(body)},
    )
    assert answered.status_code == 200
    assert answered.content == b""
    await work(db, hub)

    [entry] = await entries(api, integration["id"])
    assert entry["log"][-1]["step"] == "xero_webhook"
    assert entry["log"][-1]["outcome"] == "INVOICE.UPDATE"
    events = await api.get(f"/api/v1/integrations/{integration['id']}/inbound-events")
    [event] = events.json()["data"]
    assert event["status"] == "processed"
    assert event["event_type"] == "INVOICE.UPDATE"
