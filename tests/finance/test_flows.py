"""Stripe payments become Xero contacts, invoices and payments, end to end: signed Stripe
webhooks through the inbound endpoint, the worker booking them in the Xero fake."""

from __future__ import annotations

import httpx

from memberhub.integrations.hub import IntegrationHub
from memberhub.kit.db import Database
from tests.fakes.xero import FakeXero
from tests.finance.conftest import checkout_event, connected_xero, entries, work
from tests.integrations.conftest import create_stripe_integration, send
from tests.support import ApiClient


async def test_a_paid_checkout_becomes_a_contact_an_invoice_and_a_payment(
    api: ApiClient, http: httpx.AsyncClient, db: Database, hub: IntegrationHub, xero: FakeXero
) -> None:
    plan = await api.create_plan(price_amount=4500, currency="GBP")
    stripe = await create_stripe_integration(api)
    integration = await connected_xero(api, http, xero, plan)
    member = await api.create_member()
    event = checkout_event(member, plan)

    assert (await send(http, stripe["id"], event)).status_code == 200
    await work(db, hub)

    [contact] = xero.contacts
    assert contact["ContactNumber"] == member["id"]
    assert contact["EmailAddress"] == member["email"].lower()
    [invoice] = xero.invoices
    assert invoice["Type"] == "ACCREC"
    assert invoice["Reference"] == event["data"]["object"]["id"]
    assert invoice["Total"] == 45.0
    assert invoice["CurrencyCode"] == "GBP"
    assert invoice["Status"] == "PAID"
    [line] = invoice["LineItems"]
    assert line["AccountCode"] == "210"
    assert line["Tracking"] == [{"Name": "Region", "Option": "North"}]
    [payment] = xero.payments
    assert payment["Invoice"] == {"InvoiceID": invoice["InvoiceID"]}
    assert payment["Account"]["Code"] == "090"
    [entry] = await entries(api, integration["id"])
    assert entry["status"] == "done"
    assert entry["kind"] == "sale"
    assert entry["invoice_id"] == invoice["InvoiceID"]
    assert [step["step"] for step in entry["log"]] == [
        "queued",
        "contact",
        "invoice",
        "payment",
        "done",
    ]
    # Every Accounting API call named the tenant; every create carried a key.
    for request in xero.requests:
        if request.path.startswith("/api.xro/"):
            assert request.headers["xero-tenant-id"] == xero.tenant.tenant_id
        if request.method == "POST" and request.path.startswith("/api.xro/"):
            assert request.headers.get("idempotency-key")
