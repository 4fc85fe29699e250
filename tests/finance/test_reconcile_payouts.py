"""Reconciliation of payouts: each paid Stripe payout against the balance transactions it
paid out (the Stripe fake's) and the bank transfer the payout flow booked in Xero (the
Xero fake); a payout missing from Xero booked again through the API."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

import httpx

from memberhub.integrations.hub import IntegrationHub
from memberhub.kit.db import Database
from tests.fakes.stripe import FakeStripe
from tests.fakes.xero import FakeXero
from tests.finance.conftest import connected_xero, mapping_body, put, reconcile, this_month, work
from tests.integrations.conftest import create_stripe_integration, send, stripe_event
from tests.support import ApiClient


def before_the_period() -> int:
    """A time in the month before: charges made then are not the period's."""
    return int((datetime.fromisoformat(this_month()[0]) - timedelta(days=10)).timestamp())


async def test_payouts_match_their_balance_and_transfer_and_a_missing_one_is_booked(
    api: ApiClient,
    http: httpx.AsyncClient,
    db: Database,
    hub: IntegrationHub,
    xero: FakeXero,
    stripe_api: FakeStripe,
) -> None:
    plan = await api.create_plan(currency="GBP")
    stripe = await create_stripe_integration(api, base_url=stripe_api.url)
    integration = await connected_xero(api, http, xero, plan)
    earlier = before_the_period()
    # Booked as it should be.
    stripe_api.add_charge(100000, "gbp", fee=2930, created=earlier)
    good = stripe_api.add_payout(97070, "gbp")
    # 1. Paid out, but the notice never reached us.
    stripe_api.add_charge(50000, "gbp", fee=1480, created=earlier)
    missing = stripe_api.add_payout(48520, "gbp")
    # 2. Booked; a bookkeeper then changed the transfer's amount.
    stripe_api.add_charge(20000, "gbp", fee=610, created=earlier)
    edited = stripe_api.add_payout(19390, "gbp")
    # 3. Not what the balance transactions it paid out come to (9680).
    stripe_api.add_charge(10000, "gbp", fee=320, created=earlier)
    short = stripe_api.add_payout(9000, "gbp")
    for payout in (good, edited, short):
        assert (await send(http, stripe["id"], stripe_event("payout.paid", payout))).status_code
    await work(db, hub)
    assert len(xero.bank_transfers) == 3
    [edited_transfer] = [t for t in xero.bank_transfers if t["Reference"] == edited["id"]]
    xero.set_transfer_amount(edited_transfer["BankTransferID"], Decimal("193.00"))

    report = await reconcile(api, db, hub, integration["id"])

    found = {(m["kind"], m["stripe_id"]) for m in report["mismatches"]}
    assert found == {
        ("payout_not_in_xero", missing["id"]),
        ("payout_amount_differs", edited["id"]),
        ("payout_amount_differs", short["id"]),
    }
    summary = report["summary"]
    assert (summary["stripe_payouts"], summary["payouts_matched"]) == (4, 1)
    assert (summary["stripe_charges"], summary["xero_bank_transfers"]) == (0, 3)
    by_payout = {m["stripe_id"]: m for m in report["mismatches"]}
    assert by_payout[missing["id"]]["fix"] == "book_payout"
    assert by_payout[missing["id"]]["stripe_amount"] == 48520
    in_xero = by_payout[edited["id"]]
    assert (in_xero["xero_amount"], in_xero["transfer_id"], in_xero["fix"]) == (
        19300,
        edited_transfer["BankTransferID"],
        None,
    )
    in_stripe = by_payout[short["id"]]
    assert (in_stripe["stripe_amount"], in_stripe["balance_amount"]) == (9000, 9680)
    assert in_stripe["xero_amount"] is None
    as_csv = await api.get(f"/api/v1/reconciliations/{report['id']}/report.csv")
    assert "balance_amount" in as_csv.text.splitlines()[0]
    assert "9680" in as_csv.text

    base = f"/api/v1/reconciliations/{report['id']}/mismatches"
    no_fix = await api.post(f"{base}/{in_xero['id']}/fix")
    assert no_fix.status_code == 409
    assert no_fix.json()["error"]["code"] == "NO_FIX"
    fixed = await api.post(f"{base}/{by_payout[missing['id']]['id']}/fix")
    assert fixed.status_code == 200, fixed.text
    await work(db, hub)

    [transfer] = [t for t in xero.bank_transfers if t["Reference"] == missing["id"]]
    assert (transfer["Amount"], transfer["ToBankAccount"]["Code"]) == (485.20, "091")
    [fees] = [t for t in xero.bank_transactions if t["Reference"] == missing["id"]]
    assert fees["Total"] == 14.80
    assert len(xero.bank_transfers) == 4
    after = await reconcile(api, db, hub, integration["id"])
    assert {(m["kind"], m["stripe_id"]) for m in after["mismatches"]} == {
        ("payout_amount_differs", edited["id"]),
        ("payout_amount_differs", short["id"]),
    }


async def test_a_payout_whose_transfer_was_deleted_is_transferred_again_once(
    api: ApiClient,
    http: httpx.AsyncClient,
    db: Database,
    hub: IntegrationHub,
    xero: FakeXero,
    stripe_api: FakeStripe,
) -> None:
    plan = await api.create_plan(currency="GBP")
    stripe = await create_stripe_integration(api, base_url=stripe_api.url)
    integration = await connected_xero(api, http, xero, plan)
    stripe_api.add_charge(30000, "gbp", fee=900, created=before_the_period())
    payout = stripe_api.add_payout(29100, "gbp")
    await send(http, stripe["id"], stripe_event("payout.paid", payout))
    await work(db, hub)
    [first] = xero.bank_transfers
    xero.delete_transfer(first["BankTransferID"])

    report = await reconcile(api, db, hub, integration["id"])
    [mismatch] = report["mismatches"]
    assert mismatch["kind"] == "payout_not_in_xero"
    fixed = await api.post(f"/api/v1/reconciliations/{report['id']}/mismatches/mm_1/fix")
    assert fixed.status_code == 200, fixed.text
    await work(db, hub)

    [again] = xero.bank_transfers
    assert again["BankTransferID"] != first["BankTransferID"]
    assert again["Amount"] == 291.0
    assert len(xero.bank_transactions) == 1  # the fees stay booked once
    assert (await reconcile(api, db, hub, integration["id"]))["mismatches"] == []


async def test_one_missing_payout_fixed_from_two_reports_is_transferred_once(
    api: ApiClient,
    http: httpx.AsyncClient,
    db: Database,
    hub: IntegrationHub,
    xero: FakeXero,
    stripe_api: FakeStripe,
) -> None:
    plan = await api.create_plan(currency="GBP")
    await create_stripe_integration(api, base_url=stripe_api.url)
    integration = await connected_xero(api, http, xero, plan)
    stripe_api.add_charge(50000, "gbp", fee=1480, created=before_the_period())
    missing = stripe_api.add_payout(48520, "gbp")  # its payout.paid never came
    # The month run twice (or a month and its quarter) before anything was fixed.
    first = await reconcile(api, db, hub, integration["id"])
    second = await reconcile(api, db, hub, integration["id"])
    [in_first] = [m for m in first["mismatches"] if m["kind"] == "payout_not_in_xero"]
    [in_second] = [m for m in second["mismatches"] if m["kind"] == "payout_not_in_xero"]
    fix = "/api/v1/reconciliations/{}/mismatches/{}/fix"
    fixed = await api.post(fix.format(first["id"], in_first["id"]))
    assert fixed.status_code == 200, fixed.text
    # Again from the other report, while it is being booked and once it is booked.
    for _ in range(2):
        again = await api.post(fix.format(second["id"], in_second["id"]))
        assert again.status_code == 409, again.text
        assert again.json()["error"]["code"] == "ALREADY_BOOKED"
        await work(db, hub)
    assert [t["Reference"] for t in xero.bank_transfers] == [missing["id"]]


async def test_without_a_payouts_bank_only_stripes_own_sums_are_checked(
    api: ApiClient,
    http: httpx.AsyncClient,
    db: Database,
    hub: IntegrationHub,
    xero: FakeXero,
    stripe_api: FakeStripe,
) -> None:
    plan = await api.create_plan(currency="GBP")
    await create_stripe_integration(api, base_url=stripe_api.url)
    integration = await connected_xero(api, http, xero, plan)
    body = mapping_body(plan)
    del body["payouts_bank_account_code"]
    saved = await put(api, f"/api/v1/integrations/{integration['id']}/accounting-mapping", body)
    assert saved.status_code == 200, saved.text
    stripe_api.add_charge(10000, "gbp", fee=320, created=before_the_period())
    stripe_api.add_payout(9680, "gbp")
    stripe_api.add_charge(5000, "gbp", fee=175, created=before_the_period())
    short = stripe_api.add_payout(4000, "gbp")
    # A manual payout: Stripe lists no balance transactions for it, so nothing to check.
    stripe_api.add_payout(1000, "gbp", automatic=False)

    report = await reconcile(api, db, hub, integration["id"])

    [mismatch] = report["mismatches"]
    assert (mismatch["kind"], mismatch["stripe_id"]) == ("payout_amount_differs", short["id"])
    assert mismatch["balance_amount"] == 4825
    assert (report["summary"]["stripe_payouts"], report["summary"]["payouts_matched"]) == (3, 2)
    assert not any(r.path.startswith("/api.xro/2.0/BankTransfers") for r in xero.requests)
