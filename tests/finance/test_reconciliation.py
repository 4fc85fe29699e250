"""Reconciliation of a seeded month: Stripe's charges (the Stripe fake), Xero's invoices
and payments (the Xero fake) and memberhub's membership terms, with five planted
mismatches of different kinds, reported exactly; two of them fixed through the API."""

from __future__ import annotations

import csv
import io
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx

from memberhub.integrations.hub import IntegrationHub
from memberhub.kit.db import Database
from tests.fakes.stripe import FakeStripe
from tests.fakes.xero import FakeXero
from tests.finance.conftest import checkout_event, connected_xero, put, reconcile, this_month, work
from tests.integrations.conftest import create_stripe_integration, send, stripe_id
from tests.integrations.test_stripe_inbound import invoice_event
from tests.support import ApiClient


async def pay(
    api: ApiClient,
    http: httpx.AsyncClient,
    stripe: dict[str, Any],
    fake: FakeStripe,
    member: dict[str, Any],
    plan: dict[str, Any],
    currency: str = "gbp",
) -> str:
    """A checkout paid in Stripe: its charge exists there and its webhook reached us."""
    intent = stripe_id("pi")
    fake.add_charge(
        plan["price_amount"],
        currency,
        payment_intent=intent,
        metadata={"member_id": member["id"]},
    )
    event = checkout_event(member, plan, payment_intent=intent, currency=currency)
    assert (await send(http, stripe["id"], event)).status_code == 200
    return str(event["data"]["object"]["id"])


async def test_a_month_with_five_planted_mismatches_reports_exactly_those_five(
    api: ApiClient,
    http: httpx.AsyncClient,
    db: Database,
    hub: IntegrationHub,
    xero: FakeXero,
    stripe_api: FakeStripe,
) -> None:
    plan = await api.create_plan(price_amount=2500, currency="GBP")
    stripe = await create_stripe_integration(api, base_url=stripe_api.url)
    integration = await connected_xero(api, http, xero, plan)
    good = [await api.create_member() for _ in range(3)]
    for member in good:
        await pay(api, http, stripe, stripe_api, member, plan)
    no_invoice, unpaid, differs, free, suspended = [await api.create_member() for _ in range(5)]
    await pay(api, http, stripe, stripe_api, unpaid, plan)
    await pay(api, http, stripe, stripe_api, differs, plan)
    await pay(api, http, stripe, stripe_api, suspended, plan)
    await work(db, hub)
    # 1. Paid in Stripe, in a currency Xero's organisation did not take: no invoice.
    xero.set_currencies("GBP")
    await pay(api, http, stripe, stripe_api, no_invoice, plan, currency="myr")
    await work(db, hub)
    # 2. A bookkeeper deleted a payment in Xero.
    [unpaid_invoice] = [
        i for i in xero.invoices if i["Contact"]["Name"].endswith(f"({unpaid['id']})")
    ]
    xero.delete_payment(unpaid_invoice["Payments"][0]["PaymentID"])
    # 3. ... and changed another invoice's amount.
    [changed] = [i for i in xero.invoices if i["Contact"]["Name"].endswith(f"({differs['id']})")]
    xero.set_invoice_total(changed["InvoiceID"], Decimal(30))
    # 4. Staff joined a member without any payment.
    joined = await api.post(
        f"/api/v1/members/{free['id']}/membership/join", {"plan_id": plan["id"]}
    )
    assert joined.status_code == 200, joined.text
    # 5. A suspended member paid: the payment changed no membership.
    assert (
        await api.post(f"/api/v1/members/{suspended['id']}/membership/suspend", {"note": "audit"})
    ).status_code == 200
    await pay(api, http, stripe, stripe_api, suspended, plan)
    await work(db, hub)

    report = await reconcile(api, db, hub, integration["id"])

    found = {(m["kind"], m["member_id"]) for m in report["mismatches"]}
    assert found == {
        ("paid_in_stripe_no_invoice", no_invoice["id"]),
        ("invoice_without_payment", unpaid["id"]),
        ("amount_or_currency_differs", differs["id"]),
        ("membership_active_without_payment", free["id"]),
        ("payment_without_membership_change", suspended["id"]),
    }
    assert len(report["mismatches"]) == 5
    summary = report["summary"]
    assert summary["stripe_charges"] == 8
    assert summary["mismatches"] == 5
    assert summary["matched"] == 4  # three good members and the suspended one's first payment
    by_kind = {m["kind"]: m for m in report["mismatches"]}
    assert by_kind["paid_in_stripe_no_invoice"]["fix"] == "create_missing_invoice"
    assert by_kind["invoice_without_payment"]["fix"] == "link_payment"
    assert by_kind["invoice_without_payment"]["invoice_id"] == unpaid_invoice["InvoiceID"]
    differing = by_kind["amount_or_currency_differs"]
    assert (differing["stripe_amount"], differing["xero_amount"]) == (2500, 3000)
    assert by_kind["membership_active_without_payment"]["fix"] is None

    as_csv = await api.get(f"/api/v1/reconciliations/{report['id']}/report.csv")
    assert as_csv.status_code == 200
    assert as_csv.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert sorted(r["kind"] for r in rows) == sorted(by_kind)

    # The admin applies the two suggested fixes; the worker books them.
    xero.set_currencies("GBP", "MYR")
    for kind in ("paid_in_stripe_no_invoice", "invoice_without_payment"):
        fixed = await api.post(
            f"/api/v1/reconciliations/{report['id']}/mismatches/{by_kind[kind]['id']}/fix"
        )
        assert fixed.status_code == 200, fixed.text
        assert fixed.json()["mismatch"]["fixed_at"]
    again = await api.post(
        f"/api/v1/reconciliations/{report['id']}/mismatches/{by_kind['invoice_without_payment']['id']}/fix"
    )
    assert again.status_code == 409
    no_fix = await api.post(
        f"/api/v1/reconciliations/{report['id']}/mismatches/{by_kind['membership_active_without_payment']['id']}/fix"
    )
    assert no_fix.status_code == 409
    assert no_fix.json()["error"]["code"] == "NO_FIX"
    await work(db, hub)

    after = await reconcile(api, db, hub, integration["id"])
    assert {m["kind"] for m in after["mismatches"]} == {
        "amount_or_currency_differs",
        "membership_active_without_payment",
        "payment_without_membership_change",
    }
    assert len(xero.invoices) == 8


async def test_bad_reconciliation_requests_are_refused(
    api: ApiClient, http: httpx.AsyncClient, xero: FakeXero, stripe_api: FakeStripe
) -> None:
    plan = await api.create_plan(currency="GBP")
    stripe = await create_stripe_integration(api, base_url=stripe_api.url)
    integration = await connected_xero(api, http, xero, plan)
    start, end = this_month()
    for body in (
        {},
        {"integration_id": integration["id"], "period_start": end, "period_end": start},
        {"integration_id": integration["id"], "period_start": "yesterday", "period_end": end},
        {"integration_id": stripe["id"], "period_start": start, "period_end": end},
        {"integration_id": "int_missing", "period_start": start, "period_end": end},
        {
            "integration_id": integration["id"],
            "payments_integration_id": integration["id"],
            "period_start": start,
            "period_end": end,
        },
    ):
        response = await api.post("/api/v1/reconciliations", body)
        assert 400 <= response.status_code < 500, (body, response.text)
        assert "error" in response.json()
    assert (await api.get("/api/v1/reconciliations/rec_missing")).status_code == 404
    queued = await api.post(
        "/api/v1/reconciliations",
        {"integration_id": integration["id"], "period_start": start, "period_end": end},
    )
    assert queued.status_code == 202
    base = f"/api/v1/reconciliations/{queued.json()['id']}/mismatches"
    not_yet = await api.post(f"{base}/mm_1/fix")
    assert not_yet.status_code == 409
    assert not_yet.json()["error"]["code"] == "NOT_COMPLETED"
    assert (await api.post(f"{base}/mismatch-1/fix")).status_code == 422
    listed = f"/api/v1/integrations/{integration['id']}/finance-entries"
    assert (await api.get(listed, {"kind": "gift"})).status_code == 422
    assert (await api.get(listed, {"status": "done; drop"})).status_code == 422
    assert (await api.get(listed, {"cursor": "%%%"})).status_code == 422
    assert (await api.get("/api/v1/finance-entries/fin_missing")).status_code == 404
    assert (await api.post("/api/v1/finance-entries/fin_missing/replay")).status_code == 404
    bad = await put(api, f"/api/v1/integrations/{stripe['id']}/accounting-mapping", {})
    assert bad.status_code == 422


async def test_a_renewal_paid_before_its_term_starts_is_the_charges_membership_change(
    api: ApiClient,
    http: httpx.AsyncClient,
    db: Database,
    hub: IntegrationHub,
    xero: FakeXero,
    stripe_api: FakeStripe,
) -> None:
    plan = await api.create_plan(price_amount=2500, currency="GBP", term_months=1)
    stripe = await create_stripe_integration(api, base_url=stripe_api.url)
    integration = await connected_xero(api, http, xero, plan)
    member = await api.create_member()
    await pay(api, http, stripe, stripe_api, member, plan)  # joins
    await pay(api, http, stripe, stripe_api, member, plan)  # renews: the term starts in a month
    await work(db, hub)
    terms = (await api.get(f"/api/v1/members/{member['id']}/membership/terms")).json()["data"]
    assert sorted(t["kind"] for t in terms) == ["join", "renew"]

    report = await reconcile(api, db, hub, integration["id"])

    assert report["mismatches"] == []
    assert report["summary"]["matched"] == 2


async def test_a_payment_just_before_a_period_answers_for_the_term_made_just_after(
    api: ApiClient,
    http: httpx.AsyncClient,
    db: Database,
    hub: IntegrationHub,
    xero: FakeXero,
    stripe_api: FakeStripe,
) -> None:
    plan = await api.create_plan(price_amount=2500, currency="GBP")
    stripe = await create_stripe_integration(api, base_url=stripe_api.url)
    integration = await connected_xero(api, http, xero, plan)
    member = await api.create_member()
    # Paid two minutes ago; the periods' boundary falls between the charge and the term
    # its webhook made (as at 23:58 and 00:01).
    paid_at = int(time.time()) - 120
    intent = stripe_id("pi")
    stripe_api.add_charge(
        2500, "gbp", payment_intent=intent, metadata={"member_id": member["id"]}, created=paid_at
    )
    event = checkout_event(member, plan, payment_intent=intent, currency="gbp")
    event["created"] = paid_at
    assert (await send(http, stripe["id"], event)).status_code == 200
    await work(db, hub)
    boundary = datetime.fromtimestamp(paid_at + 60, UTC)
    for start, end in (
        (boundary - timedelta(days=1), boundary),
        (boundary, boundary + timedelta(days=1)),
    ):
        created = await api.post(
            "/api/v1/reconciliations",
            {
                "integration_id": integration["id"],
                "period_start": start.isoformat(),
                "period_end": end.isoformat(),
            },
        )
        assert created.status_code == 202, created.text
        await work(db, hub)
        report = (await api.get(f"/api/v1/reconciliations/{created.json()['id']}")).json()
        assert report["status"] == "completed", report
        assert report["mismatches"] == [], (start, report["mismatches"])


async def test_a_discounted_payment_is_invoiced_at_the_plan_price_and_reported(
    api: ApiClient,
    http: httpx.AsyncClient,
    db: Database,
    hub: IntegrationHub,
    xero: FakeXero,
    stripe_api: FakeStripe,
) -> None:
    plan = await api.create_plan(price_amount=2500, currency="GBP")
    stripe = await create_stripe_integration(api, base_url=stripe_api.url)
    integration = await connected_xero(api, http, xero, plan)
    member = await api.create_member()
    intent = stripe_id("pi")
    # A coupon took 5.00 off: Stripe charged 20.00 for the 25.00 plan.
    stripe_api.add_charge(2000, "gbp", payment_intent=intent)
    event = checkout_event(member, plan, payment_intent=intent, amount_total=2000)
    assert (await send(http, stripe["id"], event)).status_code == 200
    await work(db, hub)

    [invoice] = xero.invoices
    assert invoice["Total"] == 25.0
    assert invoice["LineItems"][0]["UnitAmount"] == 25.0
    assert (invoice["AmountPaid"], invoice["AmountDue"]) == (20.0, 5.0)
    assert invoice["Status"] == "AUTHORISED"
    [payment] = xero.payments
    assert payment["Amount"] == 20.0

    report = await reconcile(api, db, hub, integration["id"])
    [mismatch] = report["mismatches"]
    assert mismatch["kind"] == "amount_or_currency_differs"
    assert (mismatch["stripe_amount"], mismatch["xero_amount"]) == (2000, 2500)
    assert mismatch["member_id"] == member["id"]


async def test_an_invoice_voided_in_xero_is_made_again_by_its_fix(
    api: ApiClient,
    http: httpx.AsyncClient,
    db: Database,
    hub: IntegrationHub,
    xero: FakeXero,
    stripe_api: FakeStripe,
) -> None:
    plan = await api.create_plan(price_amount=2500, currency="GBP")
    stripe = await create_stripe_integration(api, base_url=stripe_api.url)
    integration = await connected_xero(api, http, xero, plan)
    member = await api.create_member()
    await pay(api, http, stripe, stripe_api, member, plan)
    await work(db, hub)
    [invoice] = xero.invoices
    xero.tenant.invoices[invoice["InvoiceID"]]["Status"] = "VOIDED"  # a bookkeeper voided it

    report = await reconcile(api, db, hub, integration["id"])
    [mismatch] = report["mismatches"]
    assert (mismatch["kind"], mismatch["fix"]) == (
        "paid_in_stripe_no_invoice",
        "create_missing_invoice",
    )
    fix = f"/api/v1/reconciliations/{report['id']}/mismatches/{mismatch['id']}/fix"
    fixed = await api.post(fix)
    assert fixed.status_code == 200, fixed.text
    await work(db, hub)
    # A new invoice (not Xero's answer to the first one's key again), paid; then all agrees.
    made = [i for i in xero.invoices if i["InvoiceID"] != invoice["InvoiceID"]]
    assert [(i["Reference"], i["Status"]) for i in made] == [(invoice["Reference"], "PAID")]
    assert (await reconcile(api, db, hub, integration["id"]))["mismatches"] == []
    # The fix applied, applying it again books nothing more.
    again = await api.post(fix)
    assert again.status_code == 409, again.text
    await work(db, hub)
    assert len(xero.invoices) == 2


async def test_a_retry_paid_this_month_finds_the_invoice_its_failure_made_last_month(
    api: ApiClient,
    http: httpx.AsyncClient,
    db: Database,
    hub: IntegrationHub,
    xero: FakeXero,
    stripe_api: FakeStripe,
) -> None:
    plan = await api.create_plan(price_amount=3000, currency="GBP", term_months=1)
    stripe = await create_stripe_integration(api, base_url=stripe_api.url)
    integration = await connected_xero(api, http, xero, plan)
    member = await api.create_member()
    await pay(api, http, stripe, stripe_api, member, plan)
    await work(db, hub)
    invoice_id = stripe_id("in")
    metadata = {"member_id": member["id"], "plan_id": plan["id"]}
    # The renewal's first attempt failed an hour before this month began (its Xero
    # invoice, unpaid, dated then)...
    failed = invoice_event("invoice.payment_failed", id=invoice_id, metadata=metadata)
    failed["data"]["object"].update(amount_due=3000, currency="gbp")
    failed["created"] = int(datetime.fromisoformat(this_month()[0]).timestamp()) - 3600
    assert (await send(http, stripe["id"], failed)).status_code == 200
    await work(db, hub)
    # ...and Stripe's retry paid it this month: that invoice is paid.
    intent = stripe_id("pi")
    charge = stripe_api.add_charge(
        3000, "gbp", payment_intent=intent, invoice=invoice_id, metadata=metadata
    )
    paid = invoice_event("invoice.paid", id=invoice_id, metadata=metadata, payment_intent=intent)
    paid["data"]["object"].update(amount_paid=3000, amount_due=3000, currency="gbp")
    assert (await send(http, stripe["id"], paid)).status_code == 200
    await work(db, hub)
    [renewal] = [i for i in xero.invoices if i["Reference"] == invoice_id]
    assert renewal["Status"] == "PAID"

    report = await reconcile(api, db, hub, integration["id"])
    # The charge has its invoice, though issued last month (which this month's documents
    # do not count).
    assert [m["kind"] for m in report["mismatches"] if m["stripe_id"] == charge["id"]] == []
    assert report["summary"]["xero_invoices"] == 1
