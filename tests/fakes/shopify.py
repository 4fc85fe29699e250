"""A stateful fake of a Shopify shop: its Admin REST API, and the webhooks it sends.

`running_fake_shopify` serves it on a free port of 127.0.0.1 (uvicorn in a thread, as the
Stripe fake is), so code under test calls it over real HTTP with the REST Admin API's
shapes:

    async with running_fake_shopify(access_token="shpat_…", secret="…") as shop:
        shop.subscribe("orders/paid", f"http://testserver/api/v1/inbound/{integration_id}")
        customer = shop.add_customer("ana@example.com")
        order = shop.create_order(customer, [("Tote bag", "TOTE-1", "99.99", 1)])
        await shop.pay_order(order["id"], via=http)      # delivers orders/paid
        await shop.refund(order["id"], "33.33", via=http)  # delivers refunds/create

Endpoints (under `/admin/api/{version}/`, authenticated with `X-Shopify-Access-Token`,
401 `{"errors": "[API] Invalid API key or access token …"}` otherwise): `GET shop.json`,
`GET orders/{id}.json`, `GET orders/{id}/refunds.json`, `GET|POST webhooks.json`. Every
answer carries `X-Shopify-Shop-Api-Call-Limit`; `rate_limit_next(n)` answers the next n
calls 429 with `Retry-After`, as Shopify does when the bucket is empty.

Webhooks are delivered to each subscription of their topic through the `httpx` client the
test passes (`via`), signed as Shopify documents: `X-Shopify-Hmac-Sha256` is base64 of the
HMAC-SHA256 of the raw body, keyed with the app's client secret. Each delivery also carries
`X-Shopify-Topic`, `X-Shopify-Shop-Domain`, `X-Shopify-API-Version`, `X-Shopify-Webhook-Id`
(one per subscription and event, the same on a retry), `X-Shopify-Event-Id` (one per
event) and `X-Shopify-Triggered-At`. `redeliver()` sends the last delivery again, as
Shopify's retries do.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import itertools
import json
import re
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tests.support_server import bind_local_socket, serving_in_thread

API_VERSION = "2025-01"
SHOP_DOMAIN = "memberhub-test.myshopify.com"
DEFAULT_ACCESS_TOKEN = "shpat_fake0123456789abcdef0123456789"
DEFAULT_SECRET = "fake-shopify-client-secret-0123456789"
BUCKET_SIZE = 40
TOPICS = frozenset({"orders/paid", "refunds/create"})

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_ids = itertools.count(5_000_000_000_001)
_PATH = re.compile(r"^/admin/api/(?P<version>[0-9]{4}-[0-9]{2})/(?P<rest>.+)$")


def shopify_id() -> int:
    """Shopify's ids are 64-bit integers."""
    return next(_ids)


def sign(body: bytes, secret: str) -> str:
    """The `X-Shopify-Hmac-Sha256` header for `body`: base64(HMAC-SHA256(secret, body))."""
    return base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()


def _now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def _money(
    amount: Decimal, currency: str, presented: tuple[Decimal, str] | None = None
) -> dict[str, Any]:
    """A MoneyBag: the shop's money, and the customer's (the same unless `presented`)."""
    money = {"amount": f"{amount:.2f}", "currency_code": currency}
    shown = (
        money
        if presented is None
        else {"amount": f"{presented[0]:.2f}", "currency_code": presented[1]}
    )
    return {"shop_money": money, "presentment_money": dict(shown)}


@dataclass
class Delivery:
    topic: str
    address: str
    body: bytes
    headers: dict[str, str]


class FakeShopify:
    def __init__(
        self,
        url: str,
        *,
        access_token: str = DEFAULT_ACCESS_TOKEN,
        secret: str = DEFAULT_SECRET,
        shop_domain: str = SHOP_DOMAIN,
        currency: str = "MYR",
    ) -> None:
        self.url = url
        self.access_token = access_token
        self.secret = secret
        self.shop_domain = shop_domain
        self.currency = currency
        self.customers: dict[int, dict[str, Any]] = {}
        self.orders: dict[int, dict[str, Any]] = {}
        self.subscriptions: dict[int, dict[str, Any]] = {}
        self.deliveries: list[Delivery] = []
        self.calls: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._rate_limited = 0

    # ------------------------------------------------------------ shop state

    def rate_limit_next(self, n: int) -> None:
        with self._lock:
            self._rate_limited = n

    def subscribe(self, topic: str, address: str) -> dict[str, Any]:
        if topic not in TOPICS:
            raise ValueError(f"unknown topic {topic}")
        subscription_id = shopify_id()
        subscription: dict[str, Any] = {
            "id": subscription_id,
            "address": address,
            "topic": topic,
            "format": "json",
            "api_version": API_VERSION,
            "fields": [],
            "metafield_namespaces": [],
            "created_at": _now(),
            "updated_at": _now(),
        }
        self.subscriptions[subscription_id] = subscription
        return subscription

    def add_customer(self, email: str | None, **fields: Any) -> dict[str, Any]:
        customer_id = shopify_id()
        customer = {
            "id": customer_id,
            "email": email,
            "first_name": fields.get("first_name", "Ana"),
            "last_name": fields.get("last_name", "Silva"),
            "state": "enabled",
            "verified_email": True,
            "currency": self.currency,
            "created_at": _now(),
            "updated_at": _now(),
            "admin_graphql_api_id": f"gid://shopify/Customer/{customer_id}",
        }
        self.customers[customer_id] = customer
        return customer

    def create_order(
        self,
        customer: dict[str, Any] | None,
        lines: list[tuple[str, str | None, str, int]],
        *,
        email: str | None = None,
        paid_in: tuple[str, str] | None = None,
    ) -> dict[str, Any]:
        """An order awaiting payment; `lines` are (title, sku, unit price, quantity).
        `paid_in`: the customer's currency and its units per unit of the shop's (Shopify
        Markets: the customer pays, and is refunded, in that currency)."""
        order_id = shopify_id()
        line_items = []
        for title, sku, price, quantity in lines:
            line_id = shopify_id()
            line_items.append(
                {
                    "id": line_id,
                    "admin_graphql_api_id": f"gid://shopify/LineItem/{line_id}",
                    "title": title,
                    "name": title,
                    "sku": sku,
                    "price": price,
                    "price_set": _money(Decimal(price), self.currency),
                    "quantity": quantity,
                    "current_quantity": quantity,
                    "product_id": shopify_id(),
                    "variant_id": shopify_id(),
                    "vendor": "memberhub",
                    "total_discount": "0.00",
                    "taxable": False,
                    "requires_shipping": False,
                }
            )
        total = sum((Decimal(p) * q for _, _, p, q in lines), Decimal(0))
        presented = None
        if paid_in is not None:
            presented = ((total * Decimal(paid_in[1])).quantize(Decimal("0.01")), paid_in[0])
        number = len(self.orders) + 1001
        order = {
            "id": order_id,
            "admin_graphql_api_id": f"gid://shopify/Order/{order_id}",
            "name": f"#{number}",
            "order_number": number,
            "email": email if email is not None else (customer or {}).get("email"),
            "contact_email": email if email is not None else (customer or {}).get("email"),
            "created_at": _now(),
            "updated_at": _now(),
            "processed_at": _now(),
            "currency": self.currency,
            "presentment_currency": paid_in[0] if paid_in is not None else self.currency,
            "financial_status": "pending",
            "fulfillment_status": None,
            "test": True,
            "tags": "",
            "subtotal_price": f"{total:.2f}",
            "total_price": f"{total:.2f}",
            "total_tax": "0.00",
            "total_discounts": "0.00",
            "current_subtotal_price": f"{total:.2f}",
            "current_total_price": f"{total:.2f}",
            "total_price_set": _money(total, self.currency, presented),
            "current_total_price_set": _money(total, self.currency, presented),
            "customer": copy.deepcopy(customer),
            "line_items": line_items,
            "refunds": [],
        }
        self.orders[order_id] = order
        return order

    async def pay_order(self, order_id: int, *, via: httpx.AsyncClient) -> list[httpx.Response]:
        """Mark the order paid, and send `orders/paid` to its subscribers."""
        order = self.orders[order_id]
        order["financial_status"] = "paid"
        order["updated_at"] = _now()
        return await self.deliver("orders/paid", order, via=via)

    async def refund(
        self, order_id: int, amount: str, *, via: httpx.AsyncClient
    ) -> list[httpx.Response]:
        """Return `amount` of the order's money (a decimal string, at most what is left, in
        the currency the customer paid in), and send `refunds/create` to its subscribers."""
        order = self.orders[order_id]
        customer_money = order["current_total_price_set"]["presentment_money"]
        left = Decimal(customer_money["amount"])
        returned = Decimal(amount)
        if returned <= 0 or returned > left:
            raise ValueError(f"cannot refund {amount} of an order with {left} left")
        refund_id = shopify_id()
        transaction_id = shopify_id()
        refund = {
            "id": refund_id,
            "admin_graphql_api_id": f"gid://shopify/Refund/{refund_id}",
            "order_id": order_id,
            "created_at": _now(),
            "processed_at": _now(),
            "note": None,
            "restock": False,
            "user_id": None,
            "duties": [],
            "order_adjustments": [],
            "refund_line_items": [],
            "transactions": [
                {
                    "id": transaction_id,
                    "admin_graphql_api_id": f"gid://shopify/OrderTransaction/{transaction_id}",
                    "order_id": order_id,
                    "kind": "refund",
                    "gateway": "bogus",
                    "status": "success",
                    "message": "Bogus Gateway: Forced success",
                    "created_at": _now(),
                    "processed_at": _now(),
                    "test": True,
                    "authorization": None,
                    "parent_id": shopify_id(),
                    "amount": f"{returned:.2f}",
                    "currency": order["presentment_currency"],
                    "source_name": "web",
                }
            ],
        }
        order["refunds"].append(refund)
        remaining = left - returned
        shop_left = (
            Decimal(order["total_price"])
            * remaining
            / Decimal(order["total_price_set"]["presentment_money"]["amount"])
        ).quantize(Decimal("0.01"))
        order["current_total_price"] = f"{shop_left:.2f}"
        order["current_total_price_set"] = _money(
            shop_left, order["currency"], (remaining, order["presentment_currency"])
        )
        order["financial_status"] = "refunded" if remaining == 0 else "partially_refunded"
        order["updated_at"] = _now()
        return await self.deliver("refunds/create", refund, via=via)

    # ------------------------------------------------------------ webhooks

    async def deliver(
        self, topic: str, payload: dict[str, Any], *, via: httpx.AsyncClient
    ) -> list[httpx.Response]:
        """Send one event of `topic` to every subscription of it (one event id for all)."""
        event_id = str(uuid.uuid4())
        body = json.dumps(payload).encode()
        responses = []
        for subscription in self.subscriptions.values():
            if subscription["topic"] != topic:
                continue
            delivery = Delivery(
                topic=topic,
                address=subscription["address"],
                body=body,
                headers={
                    "Content-Type": "application/json",
                    "X-Shopify-Topic": topic,
                    "X-Shopify-Hmac-Sha256": sign(body, self.secret),
                    "X-Shopify-Shop-Domain": self.shop_domain,
                    "X-Shopify-API-Version": API_VERSION,
                    "X-Shopify-Webhook-Id": str(uuid.uuid4()),
                    "X-Shopify-Event-Id": event_id,
                    "X-Shopify-Triggered-At": datetime.now(UTC).isoformat(),
                },
            )
            self.deliveries.append(delivery)
            responses.append(await self._send(delivery, via))
        return responses

    async def redeliver(self, *, via: httpx.AsyncClient) -> httpx.Response:
        """Shopify's retry of the last delivery: the same body and ids."""
        return await self._send(self.deliveries[-1], via)

    @staticmethod
    async def _send(delivery: Delivery, via: httpx.AsyncClient) -> httpx.Response:
        return await via.post(delivery.address, content=delivery.body, headers=delivery.headers)

    # ------------------------------------------------------------ Admin API

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        request = Request(scope, receive)
        response = await self._answer(request)
        response.headers["X-Shopify-Shop-Api-Call-Limit"] = f"1/{BUCKET_SIZE}"
        await response(scope, receive, send)

    async def _answer(self, request: Request) -> Response:
        self.calls.append((request.method, request.url.path))
        if request.headers.get("x-shopify-access-token") != self.access_token:
            return JSONResponse(
                {
                    "errors": "[API] Invalid API key or access token "
                    "(unrecognized login or wrong password)"
                },
                status_code=401,
            )
        with self._lock:
            if self._rate_limited > 0:
                self._rate_limited -= 1
                return JSONResponse(
                    {
                        "errors": "Exceeded 2 calls per second for api client. Reduce "
                        "request rates to resume uninterrupted service."
                    },
                    status_code=429,
                    headers={"Retry-After": "1.0"},
                )
        match = _PATH.match(request.url.path)
        if match is None:
            return JSONResponse({"errors": "Not Found"}, status_code=404)
        rest = match["rest"]
        if rest == "shop.json" and request.method == "GET":
            return JSONResponse({"shop": self._shop()})
        if rest == "webhooks.json":
            if request.method == "GET":
                return JSONResponse({"webhooks": list(self.subscriptions.values())})
            if request.method == "POST":
                return await self._create_webhook(request)
        order = re.fullmatch(r"orders/([0-9]+)(/refunds)?\.json", rest)
        if order is not None and request.method == "GET":
            found = self.orders.get(int(order[1]))
            if found is None:
                return JSONResponse({"errors": "Not Found"}, status_code=404)
            if order[2]:
                return JSONResponse({"refunds": found["refunds"]})
            return JSONResponse({"order": found})
        return JSONResponse({"errors": "Not Found"}, status_code=404)

    async def _create_webhook(self, request: Request) -> Response:
        try:
            body = await request.json()
            webhook = body["webhook"]
            topic, address = webhook["topic"], webhook["address"]
        except (ValueError, KeyError, TypeError):
            return JSONResponse(
                {"errors": {"webhook": "Required parameter missing or invalid"}}, status_code=400
            )
        if topic not in TOPICS:
            return JSONResponse(
                {"errors": {"topic": ["Invalid topic specified."]}}, status_code=422
            )
        return JSONResponse({"webhook": self.subscribe(topic, address)}, status_code=201)

    def _shop(self) -> dict[str, Any]:
        return {
            "id": 548380009,
            "name": "memberhub test shop",
            "email": "owner@example.com",
            "domain": self.shop_domain,
            "myshopify_domain": self.shop_domain,
            "currency": self.currency,
            "iana_timezone": "Asia/Kuala_Lumpur",
            "plan_name": "partner_test",
        }


@asynccontextmanager
async def running_fake_shopify(**options: Any) -> AsyncIterator[FakeShopify]:
    """Serve a fresh `FakeShopify` on 127.0.0.1 until the block ends."""
    sock, base_url = bind_local_socket()
    fake = FakeShopify(base_url, **options)
    async with serving_in_thread(
        fake, sock, name="fake-shopify", lifespan="off", graceful_shutdown=1
    ):
        yield fake
