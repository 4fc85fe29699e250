"""Shopify: a shop's paid orders and refunds, by webhook, and its Admin API.

Shopify signs each webhook with base64(HMAC-SHA256(secret, raw body)) in
`X-Shopify-Hmac-Sha256`, where the secret is the app's client secret (or, for webhooks
created in the shop's admin, the secret shown under Settings → Notifications). The
signature covers no time, so there is no replay window to check: a replayed delivery is
caught by its event id instead (`X-Shopify-Event-Id`, the same in every delivery of one
event, whichever subscription carried it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from decimal import Decimal
from typing import Annotated, Any, ClassVar

from pydantic import Field, StringConstraints

from memberhub.integrations import signatures
from memberhub.integrations.gateway import GatewayPolicy
from memberhub.integrations.providers.base import (
    BaseConfig,
    BaseCredentials,
    Capability,
    Connection,
    ConnectionFailed,
    InboundIdentity,
    InboundRequest,
    OrderItem,
    OrderNotice,
    Provider,
    aware_time,
)
from memberhub.kit import money

Secret = Annotated[str, StringConstraints(strip_whitespace=True, min_length=8, max_length=500)]
ShopDomain = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True, to_lower=True, pattern=r"^[a-z0-9][a-z0-9-]{0,99}\.myshopify\.com$"
    ),
]
ApiVersion = Annotated[str, StringConstraints(pattern=r"^20[0-9]{2}-(01|04|07|10)$")]

SIGNATURE_HEADER = "X-Shopify-Hmac-Sha256"
PAID_TOPIC = "orders/paid"
REFUND_TOPIC = "refunds/create"
MAX_EVENT_ID_CHARS = 255
MAX_ITEMS = 100
MAX_LABEL_CHARS = 200
# Refund transactions that returned money (a pending one may still fail).
SETTLED_STATUSES = frozenset({"success"})


class ShopifyConfig(BaseConfig):
    shop_domain: ShopDomain = Field(
        description="The shop's myshopify.com domain: webhooks from other shops are refused, "
        "and the Admin API is called there unless `base_url` says otherwise."
    )
    api_version: ApiVersion = Field(default="2025-01", description="The Admin API version.")


class ShopifyCredentials(BaseCredentials):
    access_token: Secret | None = Field(
        default=None, description="The Admin API access token (shpat_…), for the connection check."
    )
    webhook_secret: Secret | None = Field(
        default=None,
        description="The secret webhooks are signed with: the app's client secret, or the "
        "one shown under Settings → Notifications → Webhooks.",
    )
    previous_webhook_secret: Secret | None = Field(
        default=None, description="Also accepted while the client secret is being rotated."
    )


def minor_units(value: Any, currency: str) -> int:
    """Shopify's decimal string ("19.99") as an integer of `currency`'s smallest unit;
    ValueError for anything else, or for more decimals than the currency has."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"{value!r} is not an amount")
    try:
        amount = Decimal(str(value).strip()).scaleb(money.minor_unit_digits(currency))
    except ArithmeticError:  # not a number (InvalidOperation), or beyond any (Overflow)
        raise ValueError(f"{value!r} is not an amount") from None
    if not amount.is_finite() or amount != amount.to_integral_value() or amount < 0:
        raise ValueError(f"{value!r} is not an amount of {currency}")
    return int(amount)


def _text(value: Any, limit: int = MAX_LABEL_CHARS) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()[:limit]
    return None


def _currency(value: Any) -> str:
    if not isinstance(value, str) or len(value) != 3 or not value.isalpha():
        raise ValueError(f"{value!r} is not a currency code")
    return value.upper()


def _items(line_items: Any, currency: str) -> tuple[OrderItem, ...]:
    items = []
    for line in line_items if isinstance(line_items, list) else []:
        if not isinstance(line, Mapping):
            continue
        quantity = line.get("quantity")
        quantity = quantity if isinstance(quantity, int) and quantity > 0 else 1
        price = line.get("price")
        items.append(
            OrderItem(
                sku=_text(line.get("sku")),
                name=_text(line.get("title")) or _text(line.get("name")),
                quantity=quantity,
                amount=minor_units(price, currency) * quantity if price is not None else None,
            )
        )
    return tuple(items[:MAX_ITEMS])


class Shopify(Provider):
    name = "shopify"
    title = "Shopify"
    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {Capability.ORDERS, Capability.EVENTS_SOURCE}
    )
    config_model = ShopifyConfig
    credentials_model = ShopifyCredentials
    # The REST Admin API's leaky bucket: 40 requests, refilled at 2 per second.
    policy: ClassVar[GatewayPolicy] = GatewayPolicy(rate_limit="2 per second")

    def resolve_base_url(self, config: BaseConfig) -> str | None:
        assert isinstance(config, ShopifyConfig)
        return config.base_url or f"https://{config.shop_domain}"

    def auth_headers(self, credentials: Mapping[str, Any]) -> dict[str, str]:
        token = credentials.get("access_token")
        return {"X-Shopify-Access-Token": str(token)} if token else {}

    async def check_connection(self, connection: Connection) -> str:
        assert isinstance(connection.config, ShopifyConfig)
        if not connection.credentials.get("access_token"):
            raise ConnectionFailed("credentials.access_token is not set")
        path = f"/admin/api/{connection.config.api_version}/shop.json"
        response = await connection.gateway.request("GET", path)
        if response.status_code != 200:
            raise ConnectionFailed(_error_message(response.status_code, response.text))
        shop = response.json().get("shop") or {}
        return f"connected to Shopify shop {shop.get('name', '?')} ({shop.get('domain', '?')})"

    # ------------------------------------------------------------ events source

    def verify(
        self, request: InboundRequest, connection_secrets: Mapping[str, Any], config: BaseConfig
    ) -> None:
        assert isinstance(config, ShopifyConfig)
        usable = [
            str(secret)
            for secret in (
                connection_secrets.get("webhook_secret"),
                connection_secrets.get("previous_webhook_secret"),
            )
            if secret
        ]
        if not usable:
            raise signatures.SignatureInvalid(
                signatures.NO_MATCHING_SIGNATURE,
                "the integration has no credentials.webhook_secret to verify with",
            )
        scheme = signatures.HmacScheme(header=SIGNATURE_HEADER, encoding="base64")
        failure: signatures.SignatureInvalid | None = None
        for secret in usable:
            try:
                signatures.verify_hmac(request.body, request.headers, secret, scheme, now=0.0)
                break
            except signatures.SignatureInvalid as exc:
                failure = failure or exc
        else:
            assert failure is not None
            raise failure
        shop = _header(request, "x-shopify-shop-domain")
        if shop is not None and shop.lower() != config.shop_domain:
            # One app's secret signs the webhooks of every shop that installed it.
            raise signatures.SignatureInvalid(
                signatures.NO_MATCHING_SIGNATURE,
                f"the webhook comes from shop {shop[:100]}, not {config.shop_domain}",
            )

    def identify(self, request: InboundRequest) -> InboundIdentity:
        topic = _header(request, "x-shopify-topic")
        event_id = _header(request, "x-shopify-event-id") or _header(
            request, "x-shopify-webhook-id"
        )
        if not topic or not event_id:
            raise ValueError("the request has no X-Shopify-Topic or X-Shopify-Event-Id header")
        if len(event_id) > MAX_EVENT_ID_CHARS:
            raise ValueError("the event id is longer than Shopify's ids are")
        if not isinstance(json.loads(request.body), dict):
            raise ValueError("the body is not a JSON object")
        return InboundIdentity(event_id=event_id, event_type=topic[:MAX_EVENT_ID_CHARS])

    # ------------------------------------------------------------ orders

    def interpret_order(self, event_type: str, payload: Mapping[str, Any]) -> OrderNotice | None:
        if event_type == PAID_TOPIC:
            return _paid(payload)
        if event_type == REFUND_TOPIC:
            return _refund(payload)
        return None


def _paid(order: Mapping[str, Any]) -> OrderNotice:
    order_id = _text(order.get("id"))
    if order_id is None:
        raise ValueError("the order has no id")
    currency = _currency(order.get("currency"))
    customer = order.get("customer") if isinstance(order.get("customer"), Mapping) else {}
    assert isinstance(customer, Mapping)
    paid_amount, paid_currency = _presentment_total(order, currency)
    return OrderNotice(
        kind="paid",
        order_id=order_id,
        currency=currency,
        amount=minor_units(order.get("total_price"), currency),
        paid_amount=paid_amount,
        paid_currency=paid_currency,
        email=_text(order.get("email"), 320)
        or _text(order.get("contact_email"), 320)
        or _text(customer.get("email"), 320),
        customer_id=_text(customer.get("id")),
        items=_items(order.get("line_items"), currency),
        occurred_at=aware_time(order.get("processed_at")) or aware_time(order.get("created_at")),
    )


def _presentment_total(order: Mapping[str, Any], currency: str) -> tuple[int | None, str | None]:
    """The order's total in the customer's currency (`total_price_set.presentment_money`),
    when that is not the shop's: Shopify refunds such an order in the customer's currency."""
    prices = order.get("total_price_set")
    money = prices.get("presentment_money") if isinstance(prices, Mapping) else None
    if not isinstance(money, Mapping):
        return None, None
    paid_currency = _currency(money.get("currency_code"))
    if paid_currency == currency:
        return None, None
    return minor_units(money.get("amount"), paid_currency), paid_currency


def _refund(refund: Mapping[str, Any]) -> OrderNotice:
    refund_id, order_id = _text(refund.get("id")), _text(refund.get("order_id"))
    if refund_id is None or order_id is None:
        raise ValueError("the refund has no id or order_id")
    returned: list[tuple[str, Any]] = []
    transactions = refund.get("transactions")
    for transaction in transactions if isinstance(transactions, list) else []:
        if (
            isinstance(transaction, Mapping)
            and transaction.get("kind") == "refund"
            and transaction.get("status") in SETTLED_STATUSES
        ):
            returned.append((_currency(transaction.get("currency")), transaction.get("amount")))
    currencies = {currency for currency, _ in returned}
    if len(currencies) > 1:
        raise ValueError("the refund's transactions are in several currencies")
    currency = currencies.pop() if currencies else ""
    return OrderNotice(
        kind="refunded",
        order_id=order_id,
        refund_id=refund_id,
        currency=currency,
        amount=sum(minor_units(amount, currency) for currency, amount in returned),
        occurred_at=aware_time(refund.get("processed_at")) or aware_time(refund.get("created_at")),
    )


def _header(request: InboundRequest, name: str) -> str | None:
    value = {k.lower(): v for k, v in request.headers.items()}.get(name)
    return value.strip() if value and value.strip() else None


def _error_message(status: int, text: str) -> str:
    """Shopify's `errors` (a string or an object), or the start of the body."""
    try:
        errors = json.loads(text)["errors"]
        message = errors if isinstance(errors, str) else json.dumps(errors)[:200]
    except (ValueError, KeyError, TypeError):
        message = text[:200]
    return f"Shopify answered {status}: {message}"
