"""Shopify orders earn through the earning rules and refunds take the points back, end to
end: the fake shop sends signed webhooks to the inbound endpoint, the worker processes
them."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from memberhub.integrations.models import InboundEvent
from memberhub.integrations.orders import share
from memberhub.integrations.providers.shopify import minor_units
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from tests.fakes.shopify import FakeShopify, running_fake_shopify, shopify_id
from tests.integrations.conftest import run_worker
from tests.support import ApiClient

ACCESS_TOKEN = "shpat_0123456789abcdef0123456789abcdef"
CLIENT_SECRET = "shopify-client-secret-for-tests-0123"
PER_RINGGIT = {"type": "points_per_amount", "points": 1, "per_amount": 100, "currency": "MYR"}


@pytest.fixture
async def shop() -> AsyncIterator[FakeShopify]:
    async with running_fake_shopify(access_token=ACCESS_TOKEN, secret=CLIENT_SECRET) as fake:
        yield fake


@pytest.fixture
async def shopify(api: ApiClient, shop: FakeShopify) -> dict[str, Any]:
    response = await api.post(
        "/api/v1/integrations",
        {
            "provider": "shopify",
            "name": "Shop",
            "config": {"shop_domain": shop.shop_domain, "base_url": shop.url},
            "credentials": {"access_token": ACCESS_TOKEN, "webhook_secret": CLIENT_SECRET},
        },
    )
    assert response.status_code == 201, response.text
    integration = dict(response.json())
    address = f"http://testserver/api/v1/inbound/{integration['id']}"
    shop.subscribe("orders/paid", address)
    shop.subscribe("refunds/create", address)
    return integration


async def order_rule(api: ApiClient) -> dict[str, Any]:
    response = await api.post(
        "/api/v1/earning-rules",
        {
            "name": "Shop orders: 1 point per 1 MYR",
            "conditions": {"field": "activity.type", "op": "eq", "value": "order.paid"},
            "effect": {**PER_RINGGIT, "max_points": 10_000},
        },
    )
    assert response.status_code == 201, response.text
    return dict(response.json())


async def balance(api: ApiClient, member_id: str) -> int:
    response = await api.get(f"/api/v1/members/{member_id}/points")
    assert response.status_code == 200, response.text
    return int(response.json()["current_balance"])


async def inbound_events(api: ApiClient, integration_id: str) -> list[dict[str, Any]]:
    response = await api.get(f"/api/v1/integrations/{integration_id}/inbound-events")
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


async def paid_order(
    api: ApiClient,
    http: httpx.AsyncClient,
    db: Database,
    shop: FakeShopify,
    email: str,
    lines: list[tuple[str, str | None, str, int]],
    *,
    paid_in: tuple[str, str] | None = None,
) -> dict[str, Any]:
    customer = shop.add_customer(email)
    order = shop.create_order(customer, lines, paid_in=paid_in)
    [response] = await shop.pay_order(order["id"], via=http)
    assert response.status_code == 200, response.text
    await run_worker(db)
    return order


async def test_a_paid_order_earns_by_the_rule_once_for_the_member_with_its_email(
    api: ApiClient,
    http: httpx.AsyncClient,
    db: Database,
    shop: FakeShopify,
    shopify: dict[str, Any],
) -> None:
    rule = await order_rule(api)
    member = await api.create_member(email="ana.silva@example.com")
    customer = shop.add_customer("Ana.Silva@Example.com")
    order = shop.create_order(
        customer, [("Tote bag", "TOTE-1", "120.50", 2), ("Mug", None, "9.00", 1)]
    )

    [first] = await shop.pay_order(order["id"], via=http)
    assert first.status_code == 200, first.text
    assert first.json()["status"] == "accepted"
    # Shopify's retry of the same delivery is answered and counted, not processed again.
    again = await shop.redeliver(via=http)
    assert again.json() == {"id": first.json()["id"], "status": "duplicate"}
    await run_worker(db)

    assert await balance(api, member["id"]) == 250  # 250.00 MYR at 1 point per 1 MYR
    response = await api.get(f"/api/v1/members/{member['id']}/activities")
    [activity] = response.json()["data"]
    assert activity["type"] == "order.paid"
    assert (activity["source"], activity["source_id"]) == ("shopify", str(order["id"]))
    assert activity["matched_by"] == "email"
    assert activity["attributes"]["amount"] == 25000
    assert activity["attributes"]["currency"] == "MYR"
    assert activity["attributes"]["order_id"] == str(order["id"])
    assert activity["attributes"]["items"] == [
        {"sku": "TOTE-1", "name": "Tote bag", "quantity": 2, "amount": 24100},
        {"name": "Mug", "quantity": 1, "amount": 900},
    ]
    [credit] = activity["credits"]
    assert (credit["rule_id"], credit["points"]) == (rule["id"], 250)
    [event] = await inbound_events(api, shopify["id"])
    assert event["event_type"] == "orders/paid"
    assert event["status"] == "processed"
    assert event["duplicates"] == 1
    assert event["result"]["points"] == 250

    # The same order paid again in another event (a second subscription, a replay) is the
    # same activity: it earns nothing more.
    await shop.deliver("orders/paid", shop.orders[order["id"]], via=http)
    await run_worker(db)
    assert await balance(api, member["id"]) == 250
    latest = (await inbound_events(api, shopify["id"]))[0]
    assert latest["result"]["action"] == "replayed"
    assert latest["result"]["points"] == 0  # what this notice earned


async def test_partial_refunds_reverse_in_proportion_and_the_last_one_takes_the_rest(
    api: ApiClient,
    http: httpx.AsyncClient,
    db: Database,
    shop: FakeShopify,
    shopify: dict[str, Any],
) -> None:
    await order_rule(api)
    member = await api.create_member(email="lee@example.com")
    order = await paid_order(
        api, http, db, shop, "lee@example.com", [("Jacket", "J-1", "99.99", 1)]
    )
    assert await balance(api, member["id"]) == 99

    # About a third of the money back: 99 * 33.00 / 99.99 = 32.67, rounded down.
    await shop.refund(order["id"], "33.00", via=http)
    await shop.redeliver(via=http)
    await run_worker(db)
    assert await balance(api, member["id"]) == 99 - 32

    # The rest of the money: all the points the order earned are back, none twice.
    await shop.refund(order["id"], "66.99", via=http)
    await run_worker(db)
    assert await balance(api, member["id"]) == 0

    refunds = [
        e for e in await inbound_events(api, shopify["id"]) if e["event_type"] == "refunds/create"
    ]
    assert [
        (e["status"], e["result"]["points"], e["result"]["refunded_before"]) for e in refunds
    ] == [
        ("processed", 67, 3300),
        ("processed", 32, 0),
    ]
    response = await api.get(
        f"/api/v1/members/{member['id']}/points/transactions", params={"type": "reverse"}
    )
    reversals = response.json()["data"]
    assert sorted(-t["points"] for t in reversals) == [32, 67]
    assert all(t["reference_id"].startswith(f"{shopify['id']}:refund:") for t in reversals)


async def test_refunds_of_an_order_paid_in_the_customers_currency_take_their_share(
    api: ApiClient,
    http: httpx.AsyncClient,
    db: Database,
    shop: FakeShopify,
    shopify: dict[str, Any],
) -> None:
    """A shop in MYR selling to a customer in SGD (Shopify Markets): the order earns on the
    shop's total, and its refunds, which Shopify makes in the customer's currency, take
    back their share of the SGD paid."""
    await order_rule(api)
    member = await api.create_member(email="sg@example.com")
    lines: list[tuple[str, str | None, str, int]] = [("Jacket", "J-1", "100.00", 1)]
    order = await paid_order(api, http, db, shop, "sg@example.com", lines, paid_in=("SGD", "0.3"))
    assert await balance(api, member["id"]) == 100
    [activity] = (await api.get(f"/api/v1/members/{member['id']}/activities")).json()["data"]
    assert activity["attributes"]["paid_amount"] == 3000
    assert activity["attributes"]["paid_currency"] == "SGD"

    await shop.refund(order["id"], "12.00", via=http)  # 40% of the SGD 30.00
    await run_worker(db)
    assert await balance(api, member["id"]) == 60
    await shop.refund(order["id"], "18.00", via=http)
    await run_worker(db)
    assert await balance(api, member["id"]) == 0
    refunds = [
        e for e in await inbound_events(api, shopify["id"]) if e["event_type"] == "refunds/create"
    ]
    assert sorted((e["result"]["points"], e["result"]["refunded_currency"]) for e in refunds) == [
        (40, "SGD"),
        (60, "SGD"),
    ]


async def test_a_refund_of_spent_points_follows_the_negative_balance_policy(
    api: ApiClient,
    http: httpx.AsyncClient,
    db: Database,
    shop: FakeShopify,
    shopify: dict[str, Any],
) -> None:
    await order_rule(api)
    member = await api.create_member(email="mei@example.com")
    order = await paid_order(api, http, db, shop, "mei@example.com", [("Lamp", "L-1", "200.00", 1)])
    redeemed = await api.post(
        "/api/v1/points/redeem", {"member_id": member["id"], "points": 150, "reason": "Voucher"}
    )
    assert redeemed.status_code == 201, redeemed.text
    assert await balance(api, member["id"]) == 50

    # Under `forbid` (the default) the 150 spent points cannot be taken back: the refund
    # fails as a whole, nothing is reversed, and the event waits for staff.
    await shop.refund(order["id"], "200.00", via=http)
    await run_worker(db)
    refund_event = (await inbound_events(api, shopify["id"]))[0]
    assert refund_event["status"] == "failed"
    assert "150 spent points" in refund_event["error"]
    assert refund_event["result"]["error_details"]["negative_balance_policy"] == "forbid"
    assert refund_event["result"]["error_code"] == "INSUFFICIENT_POINTS"
    assert await balance(api, member["id"]) == 50

    # Allowing reversals to leave a negative balance, the retried refund takes all 200:
    # the 50 unspent ones are cancelled and 150 are owed.
    changed = await api.patch("/api/v1/program", {"negative_balance_policy": "allow_for_reversals"})
    assert changed.status_code == 200, changed.text
    retried = await api.post(f"/api/v1/inbound-events/{refund_event['id']}/retry")
    assert retried.status_code in (200, 202), retried.text
    await run_worker(db)
    refund_event = (await inbound_events(api, shopify["id"]))[0]
    assert refund_event["status"] == "processed", refund_event
    assert refund_event["result"]["points"] == 200
    assert await balance(api, member["id"]) == -150


async def test_webhooks_are_verified_by_the_documented_hmac_recipe(
    api: ApiClient, http: httpx.AsyncClient, db: Database, shopify: dict[str, Any]
) -> None:
    member = await api.create_member(email="raj@example.com")
    await order_rule(api)
    order = {
        "id": shopify_id(),
        "email": "raj@example.com",
        "currency": "MYR",
        "total_price": "10.00",
        "current_total_price": "10.00",
        "financial_status": "paid",
        "customer": {"id": shopify_id(), "email": "raj@example.com"},
        "line_items": [],
    }
    body = json.dumps(order, separators=(",", ":")).encode()
    # Shopify's recipe: base64 of the HMAC-SHA256 of the raw body, keyed by the client secret.
    digest = hmac.new(CLIENT_SECRET.encode(), body, hashlib.sha256).digest()
    headers = {
        "Content-Type": "application/json",
        "X-Shopify-Topic": "orders/paid",
        "X-Shopify-Hmac-Sha256": base64.b64encode(digest).decode(),
        "X-Shopify-Shop-Domain": "memberhub-test.myshopify.com",
        "X-Shopify-Event-Id": "6b7c0f0e-5d0a-4c1e-9f43-0a1b2c3d4e5f",
        "X-Shopify-Webhook-Id": "0f8e7d6c-5b4a-4938-8271-605f4e3d2c1b",
    }
    path = f"/api/v1/inbound/{shopify['id']}"

    tampered = body.replace(b'"10.00"', b'"99.00"', 1)
    refused = await http.post(path, content=tampered, headers=headers)
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "SIGNATURE_INVALID"
    other_shop = await http.post(
        path, content=body, headers={**headers, "X-Shopify-Shop-Domain": "other.myshopify.com"}
    )
    assert other_shop.status_code == 400
    unsigned = {k: v for k, v in headers.items() if k != "X-Shopify-Hmac-Sha256"}
    assert (await http.post(path, content=body, headers=unsigned)).status_code == 400

    accepted = await http.post(path, content=body, headers=headers)
    assert accepted.status_code == 200, accepted.text
    await run_worker(db)
    assert await balance(api, member["id"]) == 10


async def test_a_refund_arriving_before_its_order_waits_for_it(
    api: ApiClient,
    http: httpx.AsyncClient,
    db: Database,
    shop: FakeShopify,
    shopify: dict[str, Any],
) -> None:
    await order_rule(api)
    member = await api.create_member(email="kim@example.com")
    customer = shop.add_customer("kim@example.com")
    order = shop.create_order(customer, [("Scarf", "S-1", "40.00", 1)])
    order["financial_status"] = "paid"
    paid_body = copy_of(order)
    await shop.refund(order["id"], "10.00", via=http)
    await run_worker(db)
    [waiting] = await inbound_events(api, shopify["id"])
    assert waiting["status"] == "pending"
    assert "not recorded yet" in waiting["error"]

    await shop.deliver("orders/paid", paid_body, via=http)
    await run_worker(db)
    assert await balance(api, member["id"]) == 40
    # The refund's backoff passes; the worker tries it again and finds the order.
    async with db.transaction() as session:
        await session.execute(update(InboundEvent).values(next_attempt_at=utcnow()))
    await run_worker(db)
    refund_event = (await inbound_events(api, shopify["id"]))[-1]
    assert (refund_event["status"], refund_event["result"]["points"]) == ("processed", 10)
    assert await balance(api, member["id"]) == 30


async def test_the_connection_check_uses_the_admin_api_token(
    api: ApiClient, shop: FakeShopify, shopify: dict[str, Any]
) -> None:
    ok = await api.post(f"/api/v1/integrations/{shopify['id']}/test")
    assert ok.json()["ok"] is True, ok.text
    assert "memberhub test shop" in ok.json()["message"]
    assert ("GET", "/admin/api/2025-01/shop.json") in shop.calls

    await api.patch(
        f"/api/v1/integrations/{shopify['id']}",
        {"credentials": {"access_token": "shpat_not_the_right_token_000000"}},
    )
    bad = await api.post(f"/api/v1/integrations/{shopify['id']}/test")
    assert bad.json()["ok"] is False
    assert "401" in bad.json()["message"]


def copy_of(order: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(order))


@pytest.mark.parametrize(
    ("value", "currency", "expected"),
    [("19.99", "MYR", 1999), ("1500", "JPY", 1500), ("1.250", "KWD", 1250), ("0.00", "USD", 0)],
)
def test_shopify_prices_become_minor_units_of_their_currency(
    value: str, currency: str, expected: int
) -> None:
    assert minor_units(value, currency) == expected


@pytest.mark.parametrize(
    ("value", "currency"),
    [("1.5", "JPY"), ("abc", "MYR"), ("-1.00", "MYR"), ("1E+999999", "MYR"), ("NaN", "USD")],
)
def test_amounts_a_currency_cannot_hold_are_refused(value: str, currency: str) -> None:
    with pytest.raises(ValueError, match="amount"):
        minor_units(value, currency)


def test_shares_of_several_refunds_add_up_to_the_points_earned() -> None:
    earned, total = 99, 9999
    refunds = [1111, 2222, 3333, 3333]
    taken, before = 0, 0
    for refunded in refunds:
        taken += share(earned, before + refunded, total) - share(earned, before, total)
        before += refunded
    assert taken == earned
