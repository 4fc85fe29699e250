"""Reconciliation of refunds: Stripe's refunds (the Stripe fake) against the credit notes
and credit-note refunds the refund flow made in Xero (the Xero fake), each gap reported
with its kind and the ones the API can fix fixed through the refund flow."""

from __future__ import annotations

import csv
import io
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import httpx

from memberhub.finance.report import issued_in, local_day
from memberhub.integrations.hub import IntegrationHub
from memberhub.kit.db import Database
from tests.fakes.stripe import FakeStripe
from tests.fakes.xero import FakeXero
from tests.finance.conftest import checkout_event, connected_xero, reconcile, work
from tests.integrations.conftest import create_stripe_integration, send, stripe_event, stripe_id
from tests.support import ApiClient


async def paid(
    http: httpx.AsyncClient,
    stripe: dict[str, Any],
    fake: FakeStripe,
    member: dict[str, Any],
    plan: dict[str, Any],
) -> dict[str, Any]:
    """A checkout paid in Stripe: its charge (returned) exists there and its webhook
    reached us."""
    intent = stripe_id("pi")
    charge = fake.add_charge(
        plan["price_amount"], "gbp", payment_intent=intent, metadata={"member_id": member["id"]}
    )
    event = checkout_event(member, plan, payment_intent=intent)
    assert (await send(http, stripe["id"], event)).status_code == 200
    return charge


async def notify_refunded(
    http: httpx.AsyncClient,
    stripe: dict[str, Any],
    charge: dict[str, Any],
    member: dict[str, Any],
    refunded_so_far: int,
) -> None:
    """Stripe's `charge.refunded` for the charge, refunded `refunded_so_far` in all."""
    event = stripe_event(
        "charge.refunded",
        {
            "id": charge["id"],
            "object": "charge",
            "amount": charge["amount"],
            "amount_refunded": refunded_so_far,
            "currency": "gbp",
            "payment_intent": charge["payment_intent"],
            "metadata": {"member_id": member["id"]},
        },
    )
    assert (await send(http, stripe["id"], event)).status_code == 200


def notes_of(xero: FakeXero, reference_start: str) -> list[dict[str, Any]]:
    return [n for n in xero.credit_notes if (n["Reference"] or "").startswith(reference_start)]


def refunds_in_xero(xero: FakeXero) -> list[dict[str, Any]]:
    return [p for p in xero.payments if p["CreditNote"]]


async def test_refunds_match_their_credit_notes_and_each_gap_is_reported_and_fixed(
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
    whole, lost, edited, unrefunded = [await api.create_member() for _ in range(4)]
    charges = {}
    for member in (whole, lost, edited, unrefunded):
        charges[member["id"]] = await paid(http, stripe, stripe_api, member, plan)
    await work(db, hub)
    # Refunded in full and notified: booked, and it matches.
    stripe_api.add_refund(charges[whole["id"]]["id"])
    await notify_refunded(http, stripe, charges[whole["id"]], whole, 2500)
    # 1. Refunded in Stripe, but the notice never reached us.
    lost_refund = stripe_api.add_refund(charges[lost["id"]]["id"], 1000)
    # 2. Partly refunded and booked; a bookkeeper then changed the credit note's amount.
    edited_refund = stripe_api.add_refund(charges[edited["id"]]["id"], 1000)
    await notify_refunded(http, stripe, charges[edited["id"]], edited, 1000)
    # 3. Refunded and booked; a bookkeeper then deleted the credit note's refund.
    unrefunded_refund = stripe_api.add_refund(charges[unrefunded["id"]]["id"])
    await notify_refunded(http, stripe, charges[unrefunded["id"]], unrefunded, 2500)
    await work(db, hub)
    assert len(xero.credit_notes) == 3
    [edited_note] = notes_of(xero, charges[edited["id"]]["id"])
    xero.set_credit_note_total(edited_note["CreditNoteID"], Decimal(15))
    [unrefunded_note] = notes_of(xero, charges[unrefunded["id"]]["id"])
    xero.delete_payment(unrefunded_note["Payments"][0]["PaymentID"])
    # 4. A credit note made in Xero by hand, for no refund.
    goodwill = xero.add_credit_note(
        xero.contacts[0]["ContactID"], reference="goodwill", amount=Decimal(5)
    )

    report = await reconcile(api, db, hub, integration["id"])

    found = {(m["kind"], m["stripe_id"], m["credit_note_id"]) for m in report["mismatches"]}
    assert found == {
        ("refund_without_credit_note", lost_refund["id"], None),
        ("refund_amount_differs", edited_refund["id"], edited_note["CreditNoteID"]),
        ("credit_note_not_refunded", unrefunded_refund["id"], unrefunded_note["CreditNoteID"]),
        ("credit_note_without_refund", None, goodwill["CreditNoteID"]),
    }
    summary = report["summary"]
    assert (summary["stripe_refunds"], summary["refunds_matched"]) == (4, 1)
    assert summary["xero_credit_notes"] == 4
    assert summary["matched"] == 4  # every charge still has its paid invoice
    by_kind = {m["kind"]: m for m in report["mismatches"]}
    missing = by_kind["refund_without_credit_note"]
    assert missing["member_id"] == lost["id"]
    assert (missing["stripe_amount"], missing["fix"]) == (1000, "create_missing_credit_note")
    differs = by_kind["refund_amount_differs"]
    assert (differs["stripe_amount"], differs["xero_amount"], differs["fix"]) == (1000, 1500, None)
    assert by_kind["credit_note_not_refunded"]["fix"] == "link_refund"
    assert by_kind["credit_note_without_refund"]["xero_amount"] == 500
    assert by_kind["credit_note_without_refund"]["fix"] is None

    as_csv = await api.get(f"/api/v1/reconciliations/{report['id']}/report.csv")
    rows = {r["kind"]: r for r in csv.DictReader(io.StringIO(as_csv.text))}
    assert set(rows) == set(by_kind)
    assert rows["refund_amount_differs"]["credit_note_id"] == edited_note["CreditNoteID"]
    assert rows["refund_without_credit_note"]["stripe_id"] == lost_refund["id"]

    base = f"/api/v1/reconciliations/{report['id']}/mismatches"
    for kind in ("refund_amount_differs", "credit_note_without_refund"):
        refused = await api.post(f"{base}/{by_kind[kind]['id']}/fix")
        assert refused.status_code == 409
        assert refused.json()["error"]["code"] == "NO_FIX"
    for kind in ("refund_without_credit_note", "credit_note_not_refunded"):
        fixed = await api.post(f"{base}/{by_kind[kind]['id']}/fix")
        assert fixed.status_code == 200, fixed.text
        assert fixed.json()["mismatch"]["fixed_at"]
        assert fixed.json()["entry_id"].startswith("fin_")
    again = await api.post(f"{base}/{missing['id']}/fix")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "ALREADY_FIXED"
    await work(db, hub)

    [made] = [n for n in xero.credit_notes if n["Reference"] == lost_refund["id"]]
    assert made["Total"] == 10.0
    assert made["Status"] == "PAID"
    [lost_invoice] = [i for i in xero.invoices if i["Contact"]["Name"].endswith(f"({lost['id']})")]
    assert made["Contact"]["ContactID"] == lost_invoice["Contact"]["ContactID"]
    [relinked] = [
        n for n in xero.credit_notes if n["CreditNoteID"] == unrefunded_note["CreditNoteID"]
    ]
    assert relinked["Status"] == "PAID"
    assert len(xero.credit_notes) == 5
    assert len(refunds_in_xero(xero)) == 4  # three by the flow (one deleted), two by fixes

    # The lost notice arriving late books nothing more: the fix booked that refund.
    await notify_refunded(http, stripe, charges[lost["id"]], lost, 1000)
    await work(db, hub)
    assert len(xero.credit_notes) == 5

    after = await reconcile(api, db, hub, integration["id"])
    assert {m["kind"] for m in after["mismatches"]} == {
        "refund_amount_differs",
        "credit_note_without_refund",
    }
    assert after["summary"]["refunds_matched"] == 3


async def test_one_credit_note_booked_for_refunds_whose_first_notice_was_lost_matches_both(
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
    charge = await paid(http, stripe, stripe_api, member, plan)
    await work(db, hub)
    stripe_api.add_refund(charge["id"], 1000)
    stripe_api.add_refund(charge["id"], 1000)
    # Only the second notice (20.00 refunded so far) reaches us: one credit note of 20.00.
    await notify_refunded(http, stripe, charge, member, 2000)
    await work(db, hub)
    assert [n["Total"] for n in notes_of(xero, charge["id"])] == [20.0]

    report = await reconcile(api, db, hub, integration["id"])

    assert report["mismatches"] == []
    assert report["summary"]["refunds_matched"] == 2


async def test_a_refunds_fix_waits_for_the_refunded_payment_to_be_booked(
    api: ApiClient,
    http: httpx.AsyncClient,
    db: Database,
    hub: IntegrationHub,
    xero: FakeXero,
    stripe_api: FakeStripe,
) -> None:
    plan = await api.create_plan(price_amount=2500, currency="GBP")
    stripe = await create_stripe_integration(api, base_url=stripe_api.url)
    member = await api.create_member()
    # Paid before Xero was connected: nothing was booked for it.
    charge = await paid(http, stripe, stripe_api, member, plan)
    refund = stripe_api.add_refund(charge["id"], 500)
    await work(db, hub)
    integration = await connected_xero(api, http, xero, plan)

    report = await reconcile(api, db, hub, integration["id"])

    by_kind = {m["kind"]: m for m in report["mismatches"]}
    assert set(by_kind) == {"paid_in_stripe_no_invoice", "refund_without_credit_note"}
    base = f"/api/v1/reconciliations/{report['id']}/mismatches"
    refund_fix = f"{base}/{by_kind['refund_without_credit_note']['id']}/fix"
    too_soon = await api.post(refund_fix)
    assert too_soon.status_code == 409
    assert too_soon.json()["error"]["code"] == "PAYMENT_NOT_BOOKED"
    unchanged = await api.get(f"/api/v1/reconciliations/{report['id']}")
    assert all(m["fixed_at"] is None for m in unchanged.json()["mismatches"])
    assert xero.credit_notes == []

    invoice_fix = f"{base}/{by_kind['paid_in_stripe_no_invoice']['id']}/fix"
    assert (await api.post(invoice_fix)).status_code == 200
    assert (await api.post(refund_fix)).status_code == 200
    await work(db, hub)

    [invoice] = xero.invoices
    [note] = xero.credit_notes
    assert note["Reference"] == refund["id"]
    assert note["Contact"]["ContactID"] == invoice["Contact"]["ContactID"]
    assert (note["Total"], note["Status"]) == (5.0, "PAID")
    after = await reconcile(api, db, hub, integration["id"])
    assert after["mismatches"] == []
    assert (after["summary"]["matched"], after["summary"]["refunds_matched"]) == (1, 1)


def test_a_credit_note_is_in_the_period_by_the_programs_calendar() -> None:
    # The period is the program's December (UTC+14): from Nov 30 10:00 UTC to Dec 31 10:00.
    zone = ZoneInfo("Etc/GMT-14")
    start = datetime(2026, 11, 30, 10, tzinfo=UTC)
    end = datetime(2026, 12, 31, 10, tzinfo=UTC)
    assert issued_in(date(2026, 12, 1), start, end, zone)
    assert issued_in(date(2026, 12, 31), start, end, zone)
    # UTC's calendar would take Nov 30 in and leave Dec 31 out.
    assert not issued_in(date(2026, 11, 30), start, end, zone)
    assert not issued_in(date(2027, 1, 1), start, end, zone)
    assert local_day(datetime(2026, 12, 31, 9, 59, tzinfo=UTC), zone) == date(2026, 12, 31)
