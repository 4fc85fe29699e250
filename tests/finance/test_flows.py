"""Stripe payments become Xero contacts, invoices and payments, end to end: signed Stripe
webhooks through the inbound endpoint, the worker booking them in the Xero fake."""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import httpx

from memberhub.integrations.hub import IntegrationHub
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from tests.fakes.stripe import running_fake_stripe
from tests.fakes.xero import FakeXero
from tests.finance.conftest import checkout_event, connected_xero, entries, work
from tests.integrations.conftest import (
    API_KEY,
    create_stripe_integration,
    send,
    stripe_event,
    stripe_id,
)
from tests.integrations.test_registry import dump
from tests.integrations.test_stripe_inbound import invoice_event, subscription_line
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


async def test_documents_are_dated_on_the_programs_calendar_not_utcs(
    api: ApiClient, http: httpx.AsyncClient, db: Database, hub: IntegrationHub, xero: FakeXero
) -> None:
    """A payment made when the program's day is not UTC's (early in a local day, still
    yesterday in UTC, say) is invoiced and paid on the program's day."""
    paid_at = utcnow()
    # A zone whose date differs from UTC's at this moment, whatever the hour.
    zone = "Etc/GMT+12" if paid_at.hour < 12 else "Etc/GMT-14"
    assert (await api.patch("/api/v1/program", {"timezone": zone})).status_code == 200
    local = paid_at.astimezone(ZoneInfo(zone)).date()
    assert local != paid_at.date()
    plan = await api.create_plan(price_amount=4500, currency="GBP")
    stripe = await create_stripe_integration(api)
    await connected_xero(api, http, xero, plan)
    member = await api.create_member()
    event = checkout_event(member, plan)
    event["created"] = int(paid_at.timestamp())

    assert (await send(http, stripe["id"], event)).status_code == 200
    await work(db, hub)

    [invoice] = xero.invoices
    [payment] = xero.payments
    assert invoice["Date"][:10] == payment["Date"][:10] == local.isoformat()


async def test_a_checkout_paid_in_full_by_a_coupon_books_nothing(
    api: ApiClient, http: httpx.AsyncClient, db: Database, hub: IntegrationHub, xero: FakeXero
) -> None:
    plan = await api.create_plan(price_amount=4500, currency="GBP")
    stripe = await create_stripe_integration(api)
    integration = await connected_xero(api, http, xero, plan)
    member = await api.create_member()

    free = checkout_event(member, plan, amount_total=0)
    assert (await send(http, stripe["id"], free)).status_code == 200
    await work(db, hub)

    # The member joined; no money moved, so no invoice owes the plan's price.
    assert (await api.get(f"/api/v1/members/{member['id']}")).json()["status"] == "active"
    assert xero.invoices == []
    assert await entries(api, integration["id"]) == []


async def test_a_hundred_checkouts_are_booked_once_each_through_faults_and_a_token_refresh(
    api: ApiClient, http: httpx.AsyncClient, db: Database, hub: IntegrationHub, xero: FakeXero
) -> None:
    plan = await api.create_plan(price_amount=2500, currency="GBP")
    stripe = await create_stripe_integration(api)
    integration = await connected_xero(api, http, xero, plan)
    members = [await api.create_member() for _ in range(100)]
    sessions = []
    for member in members:
        event = checkout_event(member, plan)
        sessions.append(event["data"]["object"]["id"])
        assert (await send(http, stripe["id"], event)).status_code == 200
    xero.set_faults(0.2)
    # The 30-minute access token runs out a third of the way through.
    xero.expire_access_tokens_after(150)

    await work(db, hub)

    assert len(xero.contacts) == 100
    assert sorted(c["ContactNumber"] for c in xero.contacts) == sorted(m["id"] for m in members)
    assert len(xero.invoices) == 100
    assert sorted(i["Reference"] for i in xero.invoices) == sorted(sessions)
    assert all(i["Status"] == "PAID" and i["AmountDue"] == 0 for i in xero.invoices)
    assert len(xero.payments) == 100
    # The faults did happen, and were retried; the token was refreshed mid-run and the
    # rotated refresh token kept.
    assert xero.count("POST", "/api.xro/2.0/", status=500) > 0
    assert (
        xero.count("GET", "/api.xro/2.0/", status=429)
        + xero.count("POST", "/api.xro/2.0/", status=429)
        > 0
    )
    assert (
        xero.count("GET", "/api.xro/2.0/", status=401)
        + xero.count("POST", "/api.xro/2.0/", status=401)
        > 0
    )
    assert xero.token_grants[0] == "authorization_code"
    assert "refresh_token" in xero.token_grants
    booked = await entries(api, integration["id"])
    assert len(booked) == 100
    assert {e["status"] for e in booked} == {"done"}
    dumped = await dump(db)
    for token in ("xat_", "xrt_"):
        assert token not in dumped


async def test_a_refund_becomes_a_credit_note_and_its_refund(
    api: ApiClient, http: httpx.AsyncClient, db: Database, hub: IntegrationHub, xero: FakeXero
) -> None:
    plan = await api.create_plan(price_amount=6000, currency="GBP")
    stripe = await create_stripe_integration(api)
    integration = await connected_xero(api, http, xero, plan)
    member = await api.create_member()
    intent = stripe_id("pi")
    await send(http, stripe["id"], checkout_event(member, plan, payment_intent=intent))
    await work(db, hub)
    [invoice] = xero.invoices

    refund = stripe_event(
        "charge.refunded",
        {
            "id": stripe_id("ch"),
            "object": "charge",
            "amount": 6000,
            "amount_refunded": 2000,
            "currency": "gbp",
            "payment_intent": intent,
            "metadata": {"member_id": member["id"]},
        },
    )
    assert (await send(http, stripe["id"], refund)).status_code == 200
    await work(db, hub)

    [note] = xero.credit_notes
    assert note["Type"] == "ACCRECCREDIT"
    assert note["Contact"]["ContactID"] == invoice["Contact"]["ContactID"]
    assert note["Total"] == 20.0
    assert note["Status"] == "PAID"
    refunds = [p for p in xero.payments if p["CreditNote"]]
    assert len(refunds) == 1
    assert refunds[0]["Amount"] == 20.0
    [entry] = await entries(api, integration["id"], kind="refund")
    assert entry["status"] == "done"
    assert entry["credit_note_id"] == note["CreditNoteID"]
    # The same refund notified again books nothing more.
    again = stripe_event("charge.refunded", refund["data"]["object"])
    assert (await send(http, stripe["id"], again)).status_code == 200
    await work(db, hub)
    assert len(xero.credit_notes) == 1


async def test_a_failed_payment_leaves_the_invoice_unpaid_until_it_is_paid(
    api: ApiClient, http: httpx.AsyncClient, db: Database, hub: IntegrationHub, xero: FakeXero
) -> None:
    plan = await api.create_plan(price_amount=3000, currency="GBP")
    stripe = await create_stripe_integration(api)
    integration = await connected_xero(api, http, xero, plan)
    member = await api.create_member()
    await send(http, stripe["id"], checkout_event(member, plan))
    await work(db, hub)
    invoice_id = stripe_id("in")
    metadata = {"member_id": member["id"], "plan_id": plan["id"]}

    failed = invoice_event("invoice.payment_failed", id=invoice_id, metadata=metadata)
    failed["data"]["object"].update(amount_due=3000, currency="gbp")
    assert (await send(http, stripe["id"], failed)).status_code == 200
    await work(db, hub)
    unpaid = [i for i in xero.invoices if i["Reference"] == invoice_id]
    assert len(unpaid) == 1
    assert unpaid[0]["Status"] == "AUTHORISED"
    assert unpaid[0]["AmountDue"] == 30.0
    assert len(xero.payments) == 1  # the checkout's only

    paid = invoice_event("invoice.paid", id=invoice_id, metadata=metadata)
    paid["data"]["object"].update(amount_paid=3000, amount_due=3000, currency="gbp")
    assert (await send(http, stripe["id"], paid)).status_code == 200
    await work(db, hub)
    [same] = [i for i in xero.invoices if i["Reference"] == invoice_id]
    assert same["Status"] == "PAID"
    assert len(xero.invoices) == 2
    assert len(xero.contacts) == 1
    kinds = sorted(e["kind"] for e in await entries(api, integration["id"]))
    assert kinds == ["sale", "sale"]


async def test_a_late_failure_of_an_invoice_for_time_already_paid_for_books_nothing(
    api: ApiClient, http: httpx.AsyncClient, db: Database, hub: IntegrationHub, xero: FakeXero
) -> None:
    plan = await api.create_plan(price_amount=3000, currency="GBP", term_months=1)
    stripe = await create_stripe_integration(api)
    integration = await connected_xero(api, http, xero, plan)
    member = await api.create_member()
    await send(http, stripe["id"], checkout_event(member, plan))
    await work(db, hub)
    joined = await api.get(f"/api/v1/members/{member['id']}")
    paid_until = datetime.fromisoformat(joined.json()["membership"]["term_ends_at"])

    # Another subscription's invoice for a month the checkout paid, failing, delivered late.
    subscription = stripe_id("sub")
    late = invoice_event(
        "invoice.payment_failed",
        metadata={"member_id": member["id"], "plan_id": plan["id"]},
        subscription=subscription,
        lines=[subscription_line(subscription, paid_until - timedelta(days=30), paid_until)],
    )
    late["data"]["object"].update(amount_due=3000, currency="gbp")
    assert (await send(http, stripe["id"], late)).status_code == 200
    await work(db, hub)
    assert len(xero.invoices) == 1  # the checkout's only
    assert [e["kind"] for e in await entries(api, integration["id"])] == ["sale"]


async def test_a_currency_the_organisation_cannot_take_is_reported_on_the_record(
    api: ApiClient, http: httpx.AsyncClient, db: Database, hub: IntegrationHub, xero: FakeXero
) -> None:
    plan = await api.create_plan(price_amount=5000, currency="GBP")
    stripe = await create_stripe_integration(api)
    integration = await connected_xero(api, http, xero, plan)
    xero.set_currencies("GBP")
    member = await api.create_member()
    await send(http, stripe["id"], checkout_event(member, plan, currency="myr"))
    await work(db, hub)

    [entry] = await entries(api, integration["id"])
    assert entry["status"] == "failed"
    assert entry["last_error"] == "Organisation is not subscribed to currency MYR"
    assert entry["currency"] == "MYR"
    assert entry["log"][-1]["message"] == "Organisation is not subscribed to currency MYR"
    assert xero.invoices == []

    # Once the organisation takes MYR, a replay books it, reusing the contact.
    xero.set_currencies("GBP", "MYR")
    replayed = await api.post(f"/api/v1/finance-entries/{entry['id']}/replay")
    assert replayed.status_code == 202, replayed.text
    assert replayed.json()["status"] == "pending"
    await work(db, hub)
    [done] = await entries(api, integration["id"])
    assert done["status"] == "done"
    assert len(xero.contacts) == 1
    assert len(xero.invoices) == 1
    again = await api.post(f"/api/v1/finance-entries/{entry['id']}/replay")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "ALREADY_BOOKED"


async def test_a_payout_books_stripes_fees_and_a_transfer_to_the_bank(
    api: ApiClient, http: httpx.AsyncClient, db: Database, hub: IntegrationHub, xero: FakeXero
) -> None:
    plan = await api.create_plan(currency="GBP")
    async with running_fake_stripe(secret_key=API_KEY) as stripe_api:
        stripe = await create_stripe_integration(api, base_url=stripe_api.url)
        integration = await connected_xero(api, http, xero, plan)
        stripe_api.add_charge(100000, "gbp", fee=2930)
        stripe_api.add_charge(25806, "gbp", fee=780)
        paid_out = stripe_api.add_payout(122096, "gbp", created=1764979200)
        payout = stripe_event("payout.paid", paid_out)
        for _ in range(2):  # sent twice: booked once
            assert (await send(http, stripe["id"], payout)).status_code == 200
        again = stripe_event("payout.paid", paid_out)
        assert (await send(http, stripe["id"], again)).status_code == 200
        await work(db, hub)

    [fees] = xero.bank_transactions
    assert fees["Type"] == "SPEND"
    assert fees["BankAccount"]["Code"] == "090"
    assert fees["LineItems"][0]["AccountCode"] == "404"
    assert fees["Total"] == 37.10
    assert fees["Reference"] == paid_out["id"]
    [transfer] = xero.bank_transfers
    assert transfer["FromBankAccount"]["Code"] == "090"
    assert transfer["ToBankAccount"]["Code"] == "091"
    assert transfer["Amount"] == 1220.96
    assert transfer["Reference"] == paid_out["id"]
    [entry] = await entries(api, integration["id"], kind="payout")
    assert entry["status"] == "done"
    assert entry["transfer_id"] == transfer["BankTransferID"]
    assert entry["fees_id"] == fees["BankTransactionID"]
    assert entry["occurred_at"].startswith("2025-12-08")  # the arrival date
    assert [step["step"] for step in entry["log"]] == [
        "queued",
        "contact",
        "fees",
        "transfer",
        "done",
    ]


async def test_a_day_of_calls_spent_waits_what_xero_asks_without_spending_attempts(
    api: ApiClient, http: httpx.AsyncClient, db: Database, hub: IntegrationHub, xero: FakeXero
) -> None:
    plan = await api.create_plan(price_amount=1000, currency="GBP")
    stripe = await create_stripe_integration(api)
    integration = await connected_xero(api, http, xero, plan)
    member = await api.create_member()
    assert (await send(http, stripe["id"], checkout_event(member, plan))).is_success
    # The day's calls are spent: 429 with X-Rate-Limit-Problem: day and a long Retry-After.
    xero.set_limits(per_minute=100_000, per_day=0, concurrent=5)
    before = len(xero.requests)
    started = utcnow()
    await work(db, hub, rounds=0)  # one worker pass, now
    sent = [r for r in xero.requests[before:] if r.path.startswith("/api.xro/")]
    assert len(sent) == 1, [r.path for r in sent]  # not sent again within minutes
    [entry] = await entries(api, integration["id"])
    assert entry["status"] == "pending", entry
    assert entry["attempts"] == 0, entry
    assert datetime.fromisoformat(entry["next_attempt_at"]) >= started + timedelta(hours=1)
