"""Stripe webhooks drive memberships, end to end: signed events through the inbound
endpoint, processed by the worker."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from memberhub.auth.roles import Role
from memberhub.integrations.inbound import process_inbound
from memberhub.integrations.providers.stripe import Stripe
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.members.models import Member
from memberhub.memberships.jobs import advance_membership_statuses
from memberhub.memberships.models import MembershipTerm
from memberhub.points.jobs import expire_points
from tests.conftest import issue_key
from tests.integrations.conftest import (
    create_stripe_integration,
    run_worker,
    send,
    stripe_event,
    stripe_id,
)
from tests.support import ApiClient


def checkout_completed(
    member: dict[str, Any], plan: dict[str, Any], **fields: Any
) -> dict[str, Any]:
    return stripe_event(
        "checkout.session.completed",
        {
            "id": stripe_id("cs"),
            "object": "checkout.session",
            "mode": "subscription",
            "payment_status": "paid",
            "status": "complete",
            "customer": fields.pop("customer", stripe_id("cus")),
            "customer_details": {"email": member["email"]},
            "client_reference_id": member["id"],
            "metadata": {"member_id": member["id"], "plan_id": plan["id"]},
            "invoice": fields.pop("invoice", stripe_id("in")),
            "payment_intent": fields.pop("payment_intent", None),
            "subscription": stripe_id("sub"),
            "amount_total": fields.pop("amount_total", plan["price_amount"]),
            "currency": "myr",
            **fields,
        },
    )


def invoice_event(
    event_type: str, *, metadata: dict[str, str] | None = None, **fields: Any
) -> dict[str, Any]:
    return stripe_event(
        event_type,
        {
            "id": fields.pop("id", stripe_id("in")),
            "object": "invoice",
            "customer": fields.pop("customer", stripe_id("cus")),
            "customer_email": fields.pop("customer_email", None),
            "billing_reason": fields.pop("billing_reason", "subscription_cycle"),
            "status": "paid" if event_type == "invoice.paid" else "open",
            "amount_paid": fields.pop("amount_paid", 12000),
            "amount_due": fields.pop("amount_due", 12000),
            "currency": "myr",
            "subscription": stripe_id("sub"),
            "subscription_details": {"metadata": metadata or {}},
            "lines": {"object": "list", "data": fields.pop("lines", [])},
            "payment_intent": fields.pop("payment_intent", None),
            "charge": fields.pop("charge", None),
            **fields,
        },
    )


def subscription_deleted(
    member: dict[str, Any], customer: str, *, created: int | None = None, **fields: Any
) -> dict[str, Any]:
    """A customer.subscription.deleted event for the member's subscription (a new id
    unless `id` is given), created now unless `created` says when."""
    event = stripe_event(
        "customer.subscription.deleted",
        {
            "id": fields.pop("id", stripe_id("sub")),
            "object": "subscription",
            "customer": customer,
            "status": "canceled",
            **fields,
            "metadata": {"member_id": member["id"]},
        },
    )
    if created is not None:
        event["created"] = created
    return event


async def paying_member(
    api: ApiClient, http: httpx.AsyncClient, db: Database, integration: dict[str, Any]
) -> tuple[dict[str, Any], str]:
    """A member who joined through a Stripe checkout, and their Stripe customer id."""
    plan = await api.create_plan()
    member = await api.create_member()
    customer = stripe_id("cus")
    await send(http, integration["id"], checkout_completed(member, plan, customer=customer))
    await run_worker(db)
    return member, customer


async def member_of(api: ApiClient, member_id: str) -> dict[str, Any]:
    response = await api.get(f"/api/v1/members/{member_id}")
    assert response.status_code == 200
    return dict(response.json())


async def balance_of(api: ApiClient, member_id: str) -> int:
    response = await api.get(f"/api/v1/members/{member_id}/points/balance")
    assert response.status_code == 200, response.text
    body = response.json()
    return int(body["current_balance"]) + int(body["pending_balance"])


async def inbound_events(api: ApiClient, integration_id: str) -> list[dict[str, Any]]:
    response = await api.get(f"/api/v1/integrations/{integration_id}/inbound-events")
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


@pytest.fixture
async def stripe_integration(api: ApiClient) -> dict[str, Any]:
    return await create_stripe_integration(api)


async def test_checkout_joins_the_member_once_even_with_the_invoice_and_a_redelivery(
    api: ApiClient, http: httpx.AsyncClient, db: Database, stripe_integration: dict[str, Any]
) -> None:
    plan = await api.create_plan(term_months=12)
    member = await api.create_member()
    invoice_id = stripe_id("in")
    event = checkout_completed(member, plan, invoice=invoice_id)

    first = await send(http, stripe_integration["id"], event)
    assert first.status_code == 200, first.text
    assert first.json()["status"] == "accepted"
    # Stored, not yet processed: the endpoint answers before the worker runs.
    assert (await member_of(api, member["id"]))["status"] == "pending"

    again = await send(http, stripe_integration["id"], event)
    assert again.status_code == 200
    assert again.json() == {"id": first.json()["id"], "status": "duplicate"}

    await run_worker(db)
    joined = await member_of(api, member["id"])
    assert joined["status"] == "active"
    assert joined["membership"]["plan_id"] == plan["id"]
    assert joined["membership"]["payment_status"] == "paid"
    assert joined["external_ids"]["stripe"] == event["data"]["object"]["customer"]
    points_after_join = await balance_of(api, member["id"])
    assert points_after_join > 0

    # Stripe also sends invoice.paid for the subscription's first invoice: same payment.
    first_invoice = invoice_event(
        "invoice.paid",
        id=invoice_id,
        billing_reason="subscription_create",
        metadata={"member_id": member["id"], "plan_id": plan["id"]},
    )
    assert (await send(http, stripe_integration["id"], first_invoice)).status_code == 200
    await run_worker(db)
    after = await member_of(api, member["id"])
    assert after["membership"]["term_ends_at"] == joined["membership"]["term_ends_at"]
    assert await balance_of(api, member["id"]) == points_after_join

    events = await inbound_events(api, stripe_integration["id"])
    assert [(e["event_type"], e["status"], e["result"].get("action")) for e in events] == [
        ("invoice.paid", "processed", "already_applied"),
        ("checkout.session.completed", "processed", "join"),
    ]
    assert events[1]["result"]["points"] == {"earned": points_after_join}
    assert events[1]["duplicates"] == 1
    assert events[1]["attempts"] == 1
    terms = await api.get(f"/api/v1/members/{member['id']}/membership/terms")
    assert terms.status_code == 200
    assert len(terms.json()["data"]) == 1


async def test_invoice_paid_renews_from_the_end_of_the_term(
    api: ApiClient, http: httpx.AsyncClient, db: Database, stripe_integration: dict[str, Any]
) -> None:
    plan = await api.create_plan(term_months=12)
    member = await api.create_member()
    await send(http, stripe_integration["id"], checkout_completed(member, plan))
    await run_worker(db)
    joined = await member_of(api, member["id"])

    renewal = invoice_event("invoice.paid", metadata={"member_id": member["id"]})
    await send(http, stripe_integration["id"], renewal)
    await run_worker(db)
    renewed = await member_of(api, member["id"])
    assert renewed["status"] == "active"
    first_end = datetime.fromisoformat(joined["membership"]["term_ends_at"])
    second_end = datetime.fromisoformat(renewed["membership"]["term_ends_at"])
    assert (second_end - first_end).days in range(365, 367)
    [latest, _] = await inbound_events(api, stripe_integration["id"])
    assert latest["result"]["action"] == "renew"


async def test_a_payment_is_matched_by_email_and_its_price_when_metadata_is_missing(
    api: ApiClient, http: httpx.AsyncClient, db: Database
) -> None:
    plan = await api.create_plan(term_months=1, price_amount=1000)
    integration = await create_stripe_integration(api, price_plans={"price_monthly": plan["code"]})
    member = await api.create_member(email="Jane.Doe@Example.com")
    event = invoice_event(
        "invoice.paid",
        customer_email="jane.doe@example.com",
        billing_reason="subscription_create",
        lines=[{"object": "line_item", "price": {"id": "price_monthly"}}],
        amount_paid=1000,
    )
    await send(http, integration["id"], event)
    await run_worker(db)
    joined = await member_of(api, member["id"])
    assert joined["status"] == "active"
    assert joined["membership"]["plan_id"] == plan["id"]


async def _end_paid_term(db: Database, member_id: str, ends_at: datetime) -> None:
    """Move the member's current term (and the member's term and grace ends, keeping the
    grace's length) to end at `ends_at`."""
    async with db.transaction() as session:
        member = await session.scalar(select(Member).where(Member.public_id == member_id))
        assert member is not None
        term = await session.scalar(
            select(MembershipTerm)
            .where(MembershipTerm.member_id == member.id)
            .order_by(MembershipTerm.id.desc())
            .limit(1)
        )
        assert term is not None
        shift = ends_at - term.ends_at
        term.starts_at, term.ends_at = term.starts_at + shift, ends_at
        member.term_ends_at = ends_at
        if member.grace_ends_at is not None:
            member.grace_ends_at += shift


async def test_failed_payment_moves_to_grace_with_an_alert_and_a_payment_recovers(
    api: ApiClient,
    http: httpx.AsyncClient,
    db: Database,
    stripe_integration: dict[str, Any],
) -> None:
    plan = await api.create_plan(term_months=12, grace_days=10)
    member = await api.create_member()
    customer = stripe_id("cus")
    await send(http, stripe_integration["id"], checkout_completed(member, plan, customer=customer))
    await run_worker(db)

    # The paid term is over when the renewal fails.
    await _end_paid_term(db, member["id"], utcnow() - timedelta(minutes=1))
    # No metadata on the renewal invoice: the member is found by the Stripe customer.
    failed_invoice = stripe_id("in")
    await send(
        http,
        stripe_integration["id"],
        invoice_event("invoice.payment_failed", id=failed_invoice, customer=customer),
    )
    await run_worker(db)
    in_grace = await member_of(api, member["id"])
    assert in_grace["status"] == "grace"
    assert in_grace["membership"]["payment_status"] == "past_due"
    grace_ends = datetime.fromisoformat(in_grace["membership"]["grace_ends_at"])
    term_ends = datetime.fromisoformat(in_grace["membership"]["term_ends_at"])
    assert (grace_ends - term_ends).days == 10
    alerts = await api.get("/api/v1/alerts", params={"type": "PAYMENT_FAILED"})
    assert alerts.status_code == 200
    [alert] = alerts.json()["data"]
    assert alert["member_id"] == member["id"]
    assert failed_invoice in alert["message"]

    # Stripe's retry succeeds: the member is active again, renewed from the term's end.
    await send(
        http,
        stripe_integration["id"],
        invoice_event("invoice.paid", id=failed_invoice, customer=customer),
    )
    await run_worker(db)
    recovered = await member_of(api, member["id"])
    assert recovered["status"] == "active"
    assert recovered["membership"]["payment_status"] == "paid"

    # A failure of that invoice delivered late (events come in any order) changes nothing.
    late = invoice_event("invoice.payment_failed", id=failed_invoice, customer=customer)
    await send(http, stripe_integration["id"], late)
    await run_worker(db)
    assert await member_of(api, member["id"]) == recovered
    [event] = [e for e in await inbound_events(api, stripe_integration["id"])
               if e["provider_event_id"] == late["id"]]  # fmt: skip
    assert (event["status"], event["result"]["reason"]) == ("ignored", "already paid")


async def test_a_failed_payment_never_takes_away_a_paid_term(
    api: ApiClient, http: httpx.AsyncClient, db: Database, stripe_integration: dict[str, Any]
) -> None:
    plan = await api.create_plan(term_months=12, grace_days=10)
    member = await api.create_member()
    customer = stripe_id("cus")
    await send(http, stripe_integration["id"], checkout_completed(member, plan, customer=customer))
    await run_worker(db)
    paid = await member_of(api, member["id"])
    assert paid["status"] == "active"

    failure = invoice_event("invoice.payment_failed", customer=customer)
    await send(http, stripe_integration["id"], failure)
    await run_worker(db)
    after = await member_of(api, member["id"])
    assert after["status"] == "active"
    assert after["membership"]["term_ends_at"] == paid["membership"]["term_ends_at"]
    assert after["membership"]["grace_ends_at"] == paid["membership"]["grace_ends_at"]
    assert after["membership"]["payment_status"] == "past_due"
    [event] = [e for e in await inbound_events(api, stripe_integration["id"])
               if e["provider_event_id"] == failure["id"]]  # fmt: skip
    assert event["result"]["action"] == "recorded"
    assert event["result"]["paid_until"] == paid["membership"]["term_ends_at"].replace(
        "Z", "+00:00"
    )
    alerts = await api.get("/api/v1/alerts", params={"type": "PAYMENT_FAILED"})
    assert len(alerts.json()["data"]) == 1


async def test_a_failed_payment_right_after_a_paid_renewal_keeps_the_renewed_term(
    api: ApiClient, http: httpx.AsyncClient, db: Database, stripe_integration: dict[str, Any]
) -> None:
    # No grace on the plan: a failed payment gives config.grace_days (14 by default).
    plan = await api.create_plan(term_months=12, grace_days=0)
    member = await api.create_member()
    customer = stripe_id("cus")
    await send(http, stripe_integration["id"], checkout_completed(member, plan, customer=customer))
    renewal = invoice_event("invoice.paid", customer=customer)
    await send(http, stripe_integration["id"], renewal)
    await run_worker(db)
    renewed = await member_of(api, member["id"])
    paid_until = datetime.fromisoformat(renewed["membership"]["term_ends_at"])
    assert paid_until > utcnow() + timedelta(days=700)

    # The next invoice fails: the renewed term stays, and grace follows it.
    failure = invoice_event("invoice.payment_failed", customer=customer)
    await send(http, stripe_integration["id"], failure)
    await run_worker(db)
    after = await member_of(api, member["id"])
    assert after["status"] == "active"
    assert after["membership"]["payment_status"] == "past_due"
    assert datetime.fromisoformat(after["membership"]["term_ends_at"]) == paid_until
    grace_ends = datetime.fromisoformat(after["membership"]["grace_ends_at"])
    assert grace_ends == paid_until + timedelta(days=14)
    [event] = [e for e in await inbound_events(api, stripe_integration["id"])
               if e["provider_event_id"] == failure["id"]]  # fmt: skip
    assert event["result"]["action"] == "recorded"
    assert datetime.fromisoformat(event["result"]["paid_until"]) == paid_until
    assert datetime.fromisoformat(event["result"]["grace_ends_at"]) == grace_ends
    terms = await api.get(f"/api/v1/members/{member['id']}/membership/terms")
    assert [t["ended_early_at"] for t in terms.json()["data"]] == [None, None]

    # The scheduled job moves the member to grace when the paid term ends, not before.
    async with db.transaction() as session:
        assert await advance_membership_statuses(session, paid_until - timedelta(seconds=1)) == 0
    async with db.transaction() as session:
        assert await advance_membership_statuses(session, paid_until) == 1
    assert (await member_of(api, member["id"]))["status"] == "grace"
    async with db.transaction() as session:
        assert await advance_membership_statuses(session, grace_ends) == 1
    assert (await member_of(api, member["id"]))["status"] == "lapsed"


async def test_subscription_deleted_cancels_at_the_period_end(
    api: ApiClient, http: httpx.AsyncClient, db: Database, stripe_integration: dict[str, Any]
) -> None:
    plan = await api.create_plan()
    member = await api.create_member()
    await send(http, stripe_integration["id"], checkout_completed(member, plan))
    await run_worker(db)
    deleted = subscription_deleted(member, stripe_id("cus"))
    await send(http, stripe_integration["id"], deleted)
    await run_worker(db)
    cancelled = await member_of(api, member["id"])
    assert cancelled["status"] == "active"  # paid until the term ends
    assert cancelled["membership"]["cancel_at_period_end"] is True
    assert cancelled["membership"]["payment_status"] == "cancelled"


async def test_a_refund_reverses_the_points_the_payment_earned(
    api: ApiClient, http: httpx.AsyncClient, db: Database, stripe_integration: dict[str, Any]
) -> None:
    plan = await api.create_plan(price_amount=20000)
    member = await api.create_member()
    payment_intent = stripe_id("pi")
    await send(
        http,
        stripe_integration["id"],
        checkout_completed(member, plan, payment_intent=payment_intent, invoice=None),
    )
    await run_worker(db)
    earned = await balance_of(api, member["id"])
    assert earned > 0

    def refund(amount_refunded: int) -> dict[str, Any]:
        return stripe_event(
            "charge.refunded",
            {
                "id": charge_id,
                "object": "charge",
                "amount": 20000,
                "amount_refunded": amount_refunded,
                "refunded": amount_refunded == 20000,
                "currency": "myr",
                "payment_intent": payment_intent,
            },
        )

    charge_id = stripe_id("ch")
    await send(http, stripe_integration["id"], refund(10000))
    await run_worker(db)
    assert await balance_of(api, member["id"]) == earned - earned // 2
    partly = await member_of(api, member["id"])
    assert partly["membership"]["payment_status"] == "partially_refunded"

    await send(http, stripe_integration["id"], refund(20000))
    await run_worker(db)
    assert await balance_of(api, member["id"]) == 0
    assert (await member_of(api, member["id"]))["membership"]["payment_status"] == "refunded"


async def test_a_full_refund_takes_back_the_spent_points_not_those_that_expired(
    api: ApiClient, http: httpx.AsyncClient, db: Database, stripe_integration: dict[str, Any]
) -> None:
    program = {
        "expiry_policy": "days_after_earn",
        "expiry_days": 5,
        "negative_balance_policy": "allow_for_reversals",
    }
    assert (await api.patch("/api/v1/program", program)).status_code == 200
    plan = await api.create_plan(price_amount=20000)
    member = await api.create_member()
    payment_intent = stripe_id("pi")
    await send(
        http,
        stripe_integration["id"],
        checkout_completed(member, plan, payment_intent=payment_intent, invoice=None),
    )
    await run_worker(db)
    assert await balance_of(api, member["id"]) == 100
    redeem = {"member_id": member["id"], "points": 40, "reason": "voucher"}
    assert (await api.post("/api/v1/points/redeem", redeem)).status_code == 201
    later = utcnow() + timedelta(days=10)
    await expire_points(db, later)  # the 60 unspent points expire

    refund = {
        "id": stripe_id("ch"),
        "object": "charge",
        "amount": 20000,
        "amount_refunded": 20000,
        "refunded": True,
        "currency": "myr",
        "payment_intent": payment_intent,
    }
    await send(http, stripe_integration["id"], stripe_event("charge.refunded", refund))
    await process_inbound(db, later)

    (applied,) = [
        e
        for e in await inbound_events(api, stripe_integration["id"])
        if "refund" in e["event_type"]
    ]
    assert applied["result"]["points"] == 40
    assert await balance_of(api, member["id"]) == -40  # the spent points, owed
    batches = (await api.get(f"/api/v1/members/{member['id']}/points/batches")).json()["data"]
    assert [
        (b["reversed_points"], b["expired_points"]) for b in batches if b["source"] == "earn"
    ] == [(40, 60)]


async def test_a_refund_of_spent_points_under_forbid_waits_for_staff_then_applies_once(
    api: ApiClient, http: httpx.AsyncClient, db: Database, stripe_integration: dict[str, Any]
) -> None:
    assert (await api.patch("/api/v1/program", {"negative_balance_policy": "forbid"})).is_success
    plan = await api.create_plan(price_amount=20000)
    member = await api.create_member()
    payment_intent = stripe_id("pi")
    await send(
        http,
        stripe_integration["id"],
        checkout_completed(member, plan, payment_intent=payment_intent, invoice=None),
    )
    await run_worker(db)
    redeem = {"member_id": member["id"], "points": 40, "reason": "voucher"}
    assert (await api.post("/api/v1/points/redeem", redeem)).status_code == 201
    refund = {
        "id": stripe_id("ch"),
        "object": "charge",
        "amount": 20000,
        "amount_refunded": 20000,
        "refunded": True,
        "currency": "myr",
        "payment_intent": payment_intent,
    }

    await send(http, stripe_integration["id"], stripe_event("charge.refunded", refund))
    await run_worker(db)

    # The 40 spent points cannot be taken below zero: the event fails as a whole, as a
    # Shopify refund does, and waits for staff.
    (failed,) = [
        e
        for e in await inbound_events(api, stripe_integration["id"])
        if "refund" in e["event_type"]
    ]
    assert failed["status"] == "failed", failed
    assert failed["result"]["error_code"] == "INSUFFICIENT_POINTS"
    assert await balance_of(api, member["id"]) == 60
    changed = await api.patch("/api/v1/program", {"negative_balance_policy": "allow_for_reversals"})
    assert changed.status_code == 200, changed.text
    retried = await api.post(f"/api/v1/inbound-events/{failed['id']}/retry")
    assert retried.status_code in (200, 202), retried.text
    await run_worker(db)
    (applied,) = [
        e
        for e in await inbound_events(api, stripe_integration["id"])
        if "refund" in e["event_type"]
    ]
    assert (applied["status"], applied["result"]["points"]) == ("processed", 100)
    assert await balance_of(api, member["id"]) == -40
    assert (await member_of(api, member["id"]))["membership"]["payment_status"] == "refunded"


async def test_a_refund_of_an_invoice_paid_under_basil_finds_it_through_its_invoice_payment(
    api: ApiClient, http: httpx.AsyncClient, db: Database, stripe_integration: dict[str, Any]
) -> None:
    """From API version 2025-03-31.basil an invoice names neither the payment intent nor the
    charge that paid it, and a charge not its invoice: `invoice_payment.paid` links them."""
    plan = await api.create_plan(price_amount=12000)
    member = await api.create_member()
    invoice, intent, charge = stripe_id("in"), stripe_id("pi"), stripe_id("ch")
    paid = invoice_event(
        "invoice.paid",
        id=invoice,
        metadata={"member_id": member["id"], "plan_id": plan["id"]},
    )
    for removed in ("payment_intent", "charge", "subscription", "subscription_details"):
        del paid["data"]["object"][removed]
    paid["data"]["object"]["parent"] = {
        "type": "subscription_details",
        "subscription_details": {
            "subscription": stripe_id("sub"),
            "metadata": {"member_id": member["id"], "plan_id": plan["id"]},
        },
    }
    await send(http, stripe_integration["id"], paid)
    await run_worker(db)
    earned = await balance_of(api, member["id"])
    assert earned > 0
    refund = {
        "id": charge,
        "object": "charge",
        "amount": 12000,
        "amount_refunded": 12000,
        "refunded": True,
        "currency": "myr",
        "payment_intent": intent,
    }
    # The refund comes first: no payment is known by its ids yet, so it waits.
    await send(http, stripe_integration["id"], stripe_event("charge.refunded", refund))
    await run_worker(db)
    assert await balance_of(api, member["id"]) == earned
    link = {
        "id": stripe_id("inpay"),
        "object": "invoice_payment",
        "invoice": invoice,
        "amount_paid": 12000,
        "currency": "myr",
        "status": "paid",
        "payment": {"type": "payment_intent", "payment_intent": intent},
    }
    await send(http, stripe_integration["id"], stripe_event("invoice_payment.paid", link))
    await run_worker(db)
    await process_inbound(db, utcnow() + timedelta(minutes=5))  # the refund's retry

    assert await balance_of(api, member["id"]) == 0
    results = {
        e["event_type"]: e["result"] for e in await inbound_events(api, stripe_integration["id"])
    }
    assert results["invoice_payment.paid"]["action"] == "linked"
    assert results["invoice_payment.paid"]["references"] == [intent]
    assert results["charge.refunded"]["action"] == "refund"


async def test_a_refund_arriving_before_its_payment_waits_for_it(
    api: ApiClient, http: httpx.AsyncClient, db: Database, stripe_integration: dict[str, Any]
) -> None:
    plan = await api.create_plan(price_amount=20000)
    member = await api.create_member()
    payment_intent = stripe_id("pi")
    refund = stripe_event(
        "charge.refunded",
        {
            "id": stripe_id("ch"),
            "object": "charge",
            "amount": 20000,
            "amount_refunded": 20000,
            "refunded": True,
            "currency": "myr",
            "payment_intent": payment_intent,
        },
    )
    await send(http, stripe_integration["id"], refund)
    await run_worker(db)
    [waiting] = await inbound_events(api, stripe_integration["id"])
    assert (waiting["status"], waiting["attempts"]) == ("pending", 1)
    assert "No payment on record" in waiting["error"]

    await send(
        http,
        stripe_integration["id"],
        checkout_completed(member, plan, payment_intent=payment_intent, invoice=None),
    )
    await run_worker(db)
    assert await balance_of(api, member["id"]) > 0
    # The refund's retry is due a little later.
    await process_inbound(db, utcnow() + timedelta(hours=1))
    assert await balance_of(api, member["id"]) == 0
    refunded = await member_of(api, member["id"])
    assert refunded["membership"]["payment_status"] == "refunded"


async def test_an_unmatched_payment_fails_with_its_reason_and_can_be_retried(
    api: ApiClient, http: httpx.AsyncClient, db: Database, stripe_integration: dict[str, Any]
) -> None:
    plan = await api.create_plan()
    event = invoice_event(
        "invoice.paid",
        customer_email="later@example.com",
        metadata={"plan_id": plan["id"]},
        billing_reason="subscription_create",
    )
    await send(http, stripe_integration["id"], event)
    await run_worker(db)
    [failed] = await inbound_events(api, stripe_integration["id"])
    assert failed["status"] == "failed"
    assert "No member matches" in failed["error"]

    member = await api.create_member(email="later@example.com")
    retried = await api.post(f"/api/v1/inbound-events/{failed['id']}/retry")
    assert retried.status_code == 202, retried.text
    assert retried.json()["status"] == "pending"
    await run_worker(db)
    assert (await member_of(api, member["id"]))["status"] == "active"
    [done] = await inbound_events(api, stripe_integration["id"])
    assert done["status"] == "processed"
    again = await api.post(f"/api/v1/inbound-events/{failed['id']}/retry")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "ALREADY_PROCESSED"


async def test_unrelated_event_types_are_ignored(
    api: ApiClient, http: httpx.AsyncClient, db: Database, stripe_integration: dict[str, Any]
) -> None:
    event = stripe_event("customer.created", {"id": stripe_id("cus"), "object": "customer"})
    await send(http, stripe_integration["id"], event)
    await run_worker(db)
    [ignored] = await inbound_events(api, stripe_integration["id"])
    assert ignored["status"] == "ignored"


@pytest.mark.parametrize(
    ("secret", "timestamp_offset", "reason"),
    [
        ("whsec_wrong_secret_0123456789abcdef", 0, "no_matching_signature"),
        (None, -360, "timestamp_out_of_range"),
        (None, +360, "timestamp_out_of_range"),
    ],
)
async def test_bad_signatures_are_refused_and_nothing_is_stored(
    api: ApiClient,
    http: httpx.AsyncClient,
    stripe_integration: dict[str, Any],
    secret: str | None,
    timestamp_offset: int,
    reason: str,
) -> None:
    event = stripe_event("invoice.paid", {"id": stripe_id("in"), "object": "invoice"})
    kwargs: dict[str, Any] = {"timestamp": int(time.time()) + timestamp_offset}
    if secret is not None:
        kwargs["secret"] = secret
    response = await send(http, stripe_integration["id"], event, **kwargs)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "SIGNATURE_INVALID"
    assert response.json()["error"]["details"]["reason"] == reason
    assert await inbound_events(api, stripe_integration["id"]) == []


async def test_a_tampered_body_is_refused(
    http: httpx.AsyncClient, stripe_integration: dict[str, Any]
) -> None:
    from tests.integrations.conftest import signed

    body, headers = signed(stripe_event("invoice.paid", {"id": "in_1", "object": "invoice"}))
    tampered = body.replace(b"in_1", b"in_2")
    response = await http.post(
        f"/api/v1/inbound/{stripe_integration['id']}", content=tampered, headers=headers
    )
    assert response.status_code == 400


async def test_unknown_disabled_and_non_allowlisted_integrations_refuse_webhooks(
    api: ApiClient, http: httpx.AsyncClient
) -> None:
    event = stripe_event("invoice.paid", {"id": stripe_id("in"), "object": "invoice"})
    unknown = await send(http, "int_doesnotexist", event)
    assert unknown.status_code == 404

    limited = await create_stripe_integration(api, inbound_allowed_ips=["203.0.113.0/24"])
    refused = await send(http, limited["id"], event)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "INBOUND_SOURCE_REFUSED"

    disabled = await create_stripe_integration(api)
    assert (await api.post(f"/api/v1/integrations/{disabled['id']}/disable")).status_code == 200
    response = await send(http, disabled["id"], event)
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "INTEGRATION_DISABLED"


async def _paid_in_another_currency(
    api: ApiClient,
    http: httpx.AsyncClient,
    db: Database,
    *,
    program_currency: str = "EUR",
    price_amount: int = 12000,
    currency: str = "MYR",
    **config: Any,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A program earning on `program_currency`, and a checkout paid in `currency`: (the
    member, the inbound event)."""
    program = await api.patch("/api/v1/program", {"currency": program_currency})
    assert program.status_code == 200, program.text
    integration = await create_stripe_integration(api, **config)
    plan = await api.create_plan(price_amount=price_amount, currency=currency)
    member = await api.create_member()
    event = checkout_completed(member, plan, currency=currency.lower())
    await send(http, integration["id"], event)
    await run_worker(db)
    [inbound] = [e for e in await inbound_events(api, integration["id"])
                 if e["provider_event_id"] == event["id"]]  # fmt: skip
    return member, inbound


async def test_a_payment_in_another_currency_joins_and_earns_nothing_without_a_rate(
    api: ApiClient, http: httpx.AsyncClient, db: Database
) -> None:
    member, inbound = await _paid_in_another_currency(api, http, db)
    assert inbound["status"] == "processed", inbound
    assert (await member_of(api, member["id"]))["status"] == "active"
    assert inbound["result"]["action"] == "join"
    assert inbound["result"]["points"] == {
        "earned": 0,
        "reason": "currency MYR is not the program's EUR and config.exchange_rates has no "
        "rate for MYR",
    }
    assert await balance_of(api, member["id"]) == 0


async def test_a_payment_in_another_currency_earns_at_the_configured_rate(
    api: ApiClient, http: httpx.AsyncClient, db: Database
) -> None:
    member, inbound = await _paid_in_another_currency(api, http, db, exchange_rates={"MYR": 0.2})
    assert inbound["status"] == "processed", inbound
    assert (await member_of(api, member["id"]))["status"] == "active"
    # 2,400 cents of EUR at the program's 1 point per 200: 12 points.
    assert inbound["result"]["points"] == {
        "earned": 12,
        "converted": {
            "from": {"currency": "MYR", "amount": 12000},
            "to": {"currency": "EUR", "amount": 2400},
            "rate": 0.2,
        },
    }
    assert await balance_of(api, member["id"]) == 12


async def test_a_rate_converts_whole_units_of_currencies_with_other_decimals(
    api: ApiClient, http: httpx.AsyncClient, db: Database
) -> None:
    # ¥15,000 (JPY has no decimals) at 1 JPY = 0.0067 USD is $100.50: 10,050 cents.
    member, inbound = await _paid_in_another_currency(
        api,
        http,
        db,
        program_currency="USD",
        price_amount=15000,
        currency="JPY",
        exchange_rates={"JPY": 0.0067},
    )
    assert inbound["status"] == "processed", inbound
    points = inbound["result"]["points"]
    assert points["converted"]["to"] == {"currency": "USD", "amount": 10050}
    assert points["earned"] == 50 == await balance_of(api, member["id"])


async def test_a_payment_joins_even_when_the_ledger_refuses_its_earn(
    api: ApiClient, http: httpx.AsyncClient, db: Database, stripe_integration: dict[str, Any]
) -> None:
    plan = await api.create_plan(price_amount=12000)
    member = await api.create_member()
    event = checkout_completed(member, plan)
    # The payment's earn reference was already used, for another amount: the ledger
    # refuses the earn, and the member joins all the same.
    reference = f"{stripe_integration['id']}:{event['data']['object']['id']}"
    earlier = await api.post(
        "/api/v1/points/earn",
        {"member_id": member["id"], "amount": 400, "currency": "MYR", "reference_id": reference},
    )
    assert earlier.status_code == 201, earlier.text

    await send(http, stripe_integration["id"], event)
    await run_worker(db)
    joined = await member_of(api, member["id"])
    assert joined["status"] == "active"
    assert joined["membership"]["payment_status"] == "paid"
    [inbound] = await inbound_events(api, stripe_integration["id"])
    assert (inbound["status"], inbound["result"]["action"]) == ("processed", "join")
    assert inbound["result"]["points"]["earned"] == 0
    assert inbound["result"]["points"]["reason"].startswith("the earn was refused: ")
    assert await balance_of(api, member["id"]) == 2  # the earlier earn's only


async def test_exchange_rates_are_checked_when_saved(api: ApiClient) -> None:
    for rates in ({"myr": 0.2}, {"MYR": 0}, {"MYR": -1}, {"MYR": "x"}, {"EURO": 1.08}):
        response = await api.post(
            "/api/v1/integrations",
            {"provider": "stripe", "name": "S", "config": {"exchange_rates": rates}},
        )
        assert response.status_code == 422, (rates, response.text)
    accepted = await create_stripe_integration(api, exchange_rates={"EUR": 1.08, "JPY": 0.0067})
    assert accepted["config"]["exchange_rates"] == {"EUR": 1.08, "JPY": 0.0067}


async def test_a_chapters_payments_join_only_plans_its_keys_see(
    api: ApiClient, http: httpx.AsyncClient, db: Database
) -> None:
    """A chapter's Stripe sells installation-wide plans and its own, never another
    chapter's (its keys get 404 for those): such a payment fails with its reason."""
    hq = await api.create_organisation()
    ours = await api.create_organisation(parent_id=hq["id"])
    theirs = await api.create_organisation(parent_id=hq["id"])
    their_plan = await api.create_plan(organisation_id=theirs["id"])
    our_plan = await api.create_plan(organisation_id=ours["id"])
    member = await api.create_member(organisation_id=ours["id"])
    chapter_admin = api.with_key(await issue_key(db, Role.ADMIN, organisation=ours["id"]))
    assert (await chapter_admin.get(f"/api/v1/plans/{their_plan['id']}")).status_code == 404
    integration = await create_stripe_integration(chapter_admin, organisation_id=ours["id"])

    refused = checkout_completed(member, their_plan)
    assert (await send(http, integration["id"], refused)).status_code == 200
    await run_worker(db)
    [failed] = await inbound_events(api, integration["id"])
    assert failed["status"] == "failed"
    assert "does not exist" in failed["error"]
    assert (await member_of(api, member["id"]))["status"] == "pending"

    assert (await send(http, integration["id"], checkout_completed(member, our_plan))).is_success
    await run_worker(db)
    joined = await member_of(api, member["id"])
    assert joined["status"] == "active"
    assert joined["membership"]["plan_id"] == our_plan["id"]


async def test_a_stale_partial_refund_arriving_after_the_full_one_does_not_undo_it(
    api: ApiClient, http: httpx.AsyncClient, db: Database, stripe_integration: dict[str, Any]
) -> None:
    plan = await api.create_plan(price_amount=20000)
    member = await api.create_member()
    payment_intent, charge_id = stripe_id("pi"), stripe_id("ch")
    await send(
        http,
        stripe_integration["id"],
        checkout_completed(member, plan, payment_intent=payment_intent, invoice=None),
    )
    await run_worker(db)

    def refund(amount_refunded: int, created: int) -> dict[str, Any]:
        event = stripe_event(
            "charge.refunded",
            {
                "id": charge_id,
                "object": "charge",
                "amount": 20000,
                "amount_refunded": amount_refunded,
                "refunded": amount_refunded == 20000,
                "currency": "myr",
                "payment_intent": payment_intent,
            },
        )
        event["created"] = created
        return event

    now = int(time.time())
    # Stripe sent the partial refund first, the full one a minute later; they arrive swapped.
    await send(http, stripe_integration["id"], refund(20000, now))
    await run_worker(db)
    assert (await member_of(api, member["id"]))["membership"]["payment_status"] == "refunded"
    await send(http, stripe_integration["id"], refund(10000, now - 60))
    await run_worker(db)
    assert await balance_of(api, member["id"]) == 0
    after = await member_of(api, member["id"])
    assert after["membership"]["payment_status"] == "refunded"


async def test_a_late_invoice_paid_before_the_subscription_ended_keeps_the_cancellation(
    api: ApiClient, http: httpx.AsyncClient, db: Database, stripe_integration: dict[str, Any]
) -> None:
    member, customer = await paying_member(api, http, db, stripe_integration)
    now = int(time.time())
    await send(http, stripe_integration["id"], subscription_deleted(member, customer, created=now))
    await run_worker(db)
    cancelled = (await member_of(api, member["id"]))["membership"]
    assert cancelled["cancel_at_period_end"] is True

    # An invoice paid ten minutes before the subscription was deleted, delivered late: the
    # term it paid for is added, the cancellation at its end stays.
    late = invoice_event("invoice.paid", customer=customer, metadata={"member_id": member["id"]})
    late["created"] = now - 600
    await send(http, stripe_integration["id"], late)
    await run_worker(db)
    after = (await member_of(api, member["id"]))["membership"]
    assert after["cancel_at_period_end"] is True
    assert after["payment_status"] == "cancelled"
    assert after["term_ends_at"] > cancelled["term_ends_at"]
    # A payment made after the deletion (the member subscribed again) lifts it.
    again = invoice_event("invoice.paid", customer=customer, metadata={"member_id": member["id"]})
    again["created"] = int(time.time()) + 1
    await send(http, stripe_integration["id"], again)
    await run_worker(db)
    resumed = (await member_of(api, member["id"]))["membership"]
    assert (resumed["cancel_at_period_end"], resumed["payment_status"]) == (False, "paid")


async def test_a_payment_made_after_a_deletion_applied_late_lifts_the_cancellation(
    api: ApiClient, http: httpx.AsyncClient, db: Database, stripe_integration: dict[str, Any]
) -> None:
    """What came first is judged by when Stripe says each happened, not by when each was
    applied: a deletion applied late (the worker behind, Stripe retrying) and a payment
    made after it leave the member paid, with nothing scheduled."""
    member, customer = await paying_member(api, http, db, stripe_integration)
    now = int(time.time())
    # Deleted ten minutes ago, applied only now.
    deleted = subscription_deleted(member, customer, created=now - 600)
    await send(http, stripe_integration["id"], deleted)
    await run_worker(db)
    assert (await member_of(api, member["id"]))["membership"]["cancel_at_period_end"] is True

    again = invoice_event("invoice.paid", customer=customer, metadata={"member_id": member["id"]})
    again["created"] = now - 300  # subscribed again and paid, five minutes ago
    await send(http, stripe_integration["id"], again)
    await run_worker(db)
    resumed = (await member_of(api, member["id"]))["membership"]
    assert (resumed["cancel_at_period_end"], resumed["payment_status"]) == (False, "paid")


async def test_a_late_payment_older_than_a_failure_adds_its_term_and_leaves_past_due(
    api: ApiClient, http: httpx.AsyncClient, db: Database, stripe_integration: dict[str, Any]
) -> None:
    """An invoice paid twenty minutes ago, delivered after a later invoice's failure (ten
    minutes ago) was applied: the term it paid for is added, but the member's payments are
    where the later event left them, past due."""
    member, customer = await paying_member(api, http, db, stripe_integration)
    now = int(time.time())
    failed = invoice_event(
        "invoice.payment_failed", customer=customer, metadata={"member_id": member["id"]}
    )
    failed["created"] = now - 600
    await send(http, stripe_integration["id"], failed)
    await run_worker(db)
    before = (await member_of(api, member["id"]))["membership"]
    assert before["payment_status"] == "past_due"

    late = invoice_event("invoice.paid", customer=customer, metadata={"member_id": member["id"]})
    late["created"] = now - 1200
    await send(http, stripe_integration["id"], late)
    await run_worker(db)
    after = (await member_of(api, member["id"]))["membership"]
    assert after["term_ends_at"] > before["term_ends_at"]
    assert after["payment_status"] == "past_due"

    # The failed invoice paid at last (Stripe's retry, now): paid.
    retried = invoice_event(
        "invoice.paid", id=failed["data"]["object"]["id"], customer=customer,
        metadata={"member_id": member["id"]},
    )  # fmt: skip
    await send(http, stripe_integration["id"], retried)
    await run_worker(db)
    assert (await member_of(api, member["id"]))["membership"]["payment_status"] == "paid"


def subscription_line(subscription: str, starts_at: datetime, ends_at: datetime) -> dict[str, Any]:
    """An invoice's line for a subscription's service period, as Stripe writes it."""
    return {
        "id": stripe_id("il"),
        "object": "line_item",
        "type": "subscription",
        "subscription": subscription,
        "period": {"start": int(starts_at.timestamp()), "end": int(ends_at.timestamp())},
        "proration": False,
        "quantity": 1,
    }


@pytest.mark.parametrize("whose", ["a previous period", "another subscription"])
async def test_a_late_failure_of_an_invoice_for_time_already_paid_for_changes_nothing(
    api: ApiClient,
    http: httpx.AsyncClient,
    db: Database,
    stripe_integration: dict[str, Any],
    whose: str,
) -> None:
    plan = await api.create_plan(term_months=1, grace_days=10)
    member = await api.create_member()
    customer, subscription = stripe_id("cus"), stripe_id("sub")
    await send(http, stripe_integration["id"], checkout_completed(member, plan, customer=customer))
    await run_worker(db)
    joined = datetime.fromisoformat(
        (await member_of(api, member["id"]))["membership"]["term_ends_at"]
    )
    renewal = invoice_event(
        "invoice.paid",
        customer=customer,
        subscription=subscription,
        lines=[subscription_line(subscription, joined, joined + timedelta(days=30))],
    )
    await send(http, stripe_integration["id"], renewal)
    await run_worker(db)
    renewed = await member_of(api, member["id"])
    assert renewed["membership"]["payment_status"] == "paid"
    paid_until = datetime.fromisoformat(renewed["membership"]["term_ends_at"])

    # An older invoice's failure, delivered after the newer one was paid: its period is
    # already paid for, so the member is not past due, gets no grace and no alert.
    older = stripe_id("sub") if whose == "another subscription" else subscription
    late = invoice_event(
        "invoice.payment_failed",
        customer=customer,
        subscription=older,
        lines=[subscription_line(older, joined - timedelta(days=30), joined)],
    )
    late["created"] = int(time.time()) - 3600
    await send(http, stripe_integration["id"], late)
    await run_worker(db)
    after_late = await member_of(api, member["id"])
    assert after_late["membership"]["payment_status"] == "paid"
    assert after_late == renewed
    [event] = [e for e in await inbound_events(api, stripe_integration["id"])
               if e["provider_event_id"] == late["id"]]  # fmt: skip
    assert event["status"] == "ignored"
    assert event["result"]["action"] == "ignored"
    alerts = await api.get("/api/v1/alerts", params={"type": "PAYMENT_FAILED"})
    assert alerts.json()["data"] == []
    changed = await api.get("/api/v1/events", params={"type": "member.payment.changed"})
    assert [e["data"]["payment_status"] for e in changed.json()["data"]] == ["paid", "paid"]

    # The next period's invoice failing is a failure now.
    failure = invoice_event(
        "invoice.payment_failed",
        customer=customer,
        subscription=subscription,
        lines=[subscription_line(subscription, paid_until, paid_until + timedelta(days=31))],
    )
    await send(http, stripe_integration["id"], failure)
    await run_worker(db)
    after = await member_of(api, member["id"])
    assert (after["status"], after["membership"]["payment_status"]) == ("active", "past_due")
    assert after["membership"]["term_ends_at"] == renewed["membership"]["term_ends_at"]
    alerts = await api.get("/api/v1/alerts", params={"type": "PAYMENT_FAILED"})
    assert len(alerts.json()["data"]) == 1


def test_a_failed_invoice_is_for_its_subscription_lines_latest_period_in_either_api_version() -> (
    None
):
    start, end = 1_800_000_000, 1_802_592_000
    legacy = subscription_line(
        "sub_a", datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(end, UTC)
    )
    basil = {
        "object": "line_item",
        "parent": {
            "type": "subscription_item_details",
            "subscription_item_details": {"subscription": "sub_a", "proration": False},
        },
        "period": {"start": start, "end": end + 86400},
    }
    one_off = {"object": "line_item", "type": "invoiceitem", "period": {"start": 1, "end": 1}}

    def period_end(*lines: dict[str, Any]) -> datetime | None:
        event = invoice_event("invoice.payment_failed", lines=list(lines))
        notice = Stripe().interpret(event["type"], event)
        assert notice is not None
        return notice.period_end

    assert period_end(legacy) == datetime.fromtimestamp(end, UTC)
    assert period_end(legacy, basil) == datetime.fromtimestamp(end + 86400, UTC)
    assert period_end(one_off) is None
    assert period_end() is None


async def test_the_end_of_a_subscription_whose_period_the_paid_term_outlasts_changes_nothing(
    api: ApiClient, http: httpx.AsyncClient, db: Database, stripe_integration: dict[str, Any]
) -> None:
    plan = await api.create_plan(term_months=1)
    member = await api.create_member()
    customer, first, second = stripe_id("cus"), stripe_id("sub"), stripe_id("sub")
    await send(
        http,
        stripe_integration["id"],
        checkout_completed(member, plan, customer=customer, subscription=first),
    )
    await run_worker(db)
    joined = datetime.fromisoformat(
        (await member_of(api, member["id"]))["membership"]["term_ends_at"]
    )
    # The member moves to a new subscription, which pays for the month after the first's.
    moved = invoice_event(
        "invoice.paid",
        customer=customer,
        subscription=second,
        billing_reason="subscription_create",
        lines=[subscription_line(second, joined, joined + timedelta(days=31))],
    )
    await send(http, stripe_integration["id"], moved)
    await run_worker(db)
    renewed = await member_of(api, member["id"])
    assert renewed["membership"]["payment_status"] == "paid"

    # The first subscription's deletion, delivered after: it ends a period already behind
    # the paid term, and the membership goes on with the second.
    deleted = subscription_deleted(
        member,
        customer,
        created=int(time.time()) - 600,
        id=first,
        current_period_start=int((joined - timedelta(days=30)).timestamp()),
        current_period_end=int(joined.timestamp()),
    )
    await send(http, stripe_integration["id"], deleted)
    await run_worker(db)
    after = await member_of(api, member["id"])
    assert (after["membership"]["cancel_at_period_end"], after["membership"]["payment_status"]) == (
        False,
        "paid",
    )
    assert after == renewed
    [event] = [e for e in await inbound_events(api, stripe_integration["id"])
               if e["provider_event_id"] == deleted["id"]]  # fmt: skip
    assert (event["status"], event["result"]["action"]) == ("ignored", "ignored")

    # The second subscription's deletion cancels at the end of the paid term.
    ended = subscription_deleted(
        member,
        customer,
        id=second,
        current_period_start=int(joined.timestamp()),
        current_period_end=int((joined + timedelta(days=31)).timestamp()),
    )
    await send(http, stripe_integration["id"], ended)
    await run_worker(db)
    cancelled = (await member_of(api, member["id"]))["membership"]
    assert (cancelled["cancel_at_period_end"], cancelled["payment_status"]) == (True, "cancelled")


async def test_a_refund_of_an_older_payment_reverses_its_points_and_leaves_the_newer_status(
    api: ApiClient, http: httpx.AsyncClient, db: Database, stripe_integration: dict[str, Any]
) -> None:
    plan = await api.create_plan(term_months=1, price_amount=12000)
    member = await api.create_member()
    customer, first_intent = stripe_id("cus"), stripe_id("pi")
    await send(
        http,
        stripe_integration["id"],
        checkout_completed(member, plan, customer=customer, payment_intent=first_intent),
    )
    await run_worker(db)
    first_points = await balance_of(api, member["id"])
    renewal = invoice_event(
        "invoice.paid", customer=customer, payment_intent=stripe_id("pi"), charge=stripe_id("ch")
    )
    await send(http, stripe_integration["id"], renewal)
    await run_worker(db)
    renewed = await member_of(api, member["id"])
    assert renewed["membership"]["payment_status"] == "paid"
    both_points = await balance_of(api, member["id"])

    # The first payment is refunded (or its refund is delivered) after the renewal was
    # paid: its points go, the renewal still pays for the term, and says so.
    refund = stripe_event(
        "charge.refunded",
        {
            "id": stripe_id("ch"),
            "object": "charge",
            "amount": 12000,
            "amount_refunded": 12000,
            "refunded": True,
            "currency": "myr",
            "customer": customer,
            "payment_intent": first_intent,
        },
    )
    await send(http, stripe_integration["id"], refund)
    await run_worker(db)
    assert await balance_of(api, member["id"]) == both_points - first_points
    after = await member_of(api, member["id"])
    assert after["membership"]["payment_status"] == "paid"
    [event] = [e for e in await inbound_events(api, stripe_integration["id"])
               if e["provider_event_id"] == refund["id"]]  # fmt: skip
    assert (event["status"], event["result"]["action"]) == ("processed", "refund")
    changed = await api.get("/api/v1/events", params={"type": "member.payment.changed"})
    assert [e["data"]["payment_status"] for e in changed.json()["data"]] == ["paid", "paid"]

    # A refund of the newest payment is the member's payment status.
    newest = stripe_event(
        "charge.refunded",
        {
            "id": renewal["data"]["object"]["charge"],
            "object": "charge",
            "amount": 12000,
            "amount_refunded": 6000,
            "refunded": False,
            "currency": "myr",
            "customer": customer,
            "payment_intent": renewal["data"]["object"]["payment_intent"],
        },
    )
    await send(http, stripe_integration["id"], newest)
    await run_worker(db)
    refunded = await member_of(api, member["id"])
    assert refunded["membership"]["payment_status"] == "partially_refunded"
