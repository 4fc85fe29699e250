"""Stripe: payments (customers, Checkout) and the webhooks that drive memberships."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar

from pydantic import Field, StringConstraints

from memberhub.integrations import signatures
from memberhub.integrations.gateway import VENDOR_POLICIES, GatewayPolicy
from memberhub.integrations.providers.base import (
    BaseConfig,
    BaseCredentials,
    Capability,
    CheckoutRequest,
    CheckoutResult,
    Connection,
    ConnectionFailed,
    InboundIdentity,
    InboundRequest,
    MoneyRecord,
    PaymentNotice,
    PayoutNotice,
    Provider,
)

Secret = Annotated[str, StringConstraints(strip_whitespace=True, min_length=8, max_length=500)]
CurrencyCode = Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")]
Rate = Annotated[float, Field(gt=0, le=1_000_000, allow_inf_nan=False)]
# Stripe bills recurring prices at most yearly; longer plans are paid once per term.
MAX_RECURRING_MONTHS = 12
# What an inbound event's id and type columns hold.
MAX_EVENT_ID_CHARS = 255


class StripeConfig(BaseConfig):
    price_plans: dict[str, str] = Field(
        default_factory=dict,
        max_length=500,
        description="Stripe price id → plan id or code, for payments whose metadata names "
        "no plan (subscriptions created outside memberhub).",
    )
    grace_days: int = Field(
        default=14,
        ge=0,
        le=365,
        description="Grace after a failed payment when the member's plan has none.",
    )
    tolerance_seconds: int = Field(default=300, ge=30, le=3600)
    earn_points: bool = Field(default=True, description="Payments earn points.")
    exchange_rates: dict[CurrencyCode, Rate] = Field(
        default_factory=dict,
        max_length=200,
        description="For payments in another currency than the program's: ISO code → how "
        "many whole units of the program's currency one whole unit of that currency is worth "
        '(a USD program: {"EUR": 1.08, "JPY": 0.0067}), each currency counted with its own '
        "decimals. A payment in a currency not listed earns no points; it still joins or "
        "renews the member.",
    )


class StripeCredentials(BaseCredentials):
    api_key: Secret | None = Field(default=None, description="A secret or restricted key.")
    webhook_secret: Secret | None = Field(
        default=None, description="The endpoint's signing secret (whsec_…)."
    )
    previous_webhook_secret: Secret | None = Field(
        default=None, description="Also accepted while Stripe rolls the signing secret."
    )


def _form(prefix: str, value: Any, into: dict[str, str]) -> dict[str, str]:
    """Stripe's form encoding of nested values: `metadata[member_id]=…`, `items[0][x]=…`."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            _form(f"{prefix}[{key}]" if prefix else str(key), item, into)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _form(f"{prefix}[{index}]", item, into)
    elif isinstance(value, bool):
        into[prefix] = "true" if value else "false"
    elif value is not None:
        into[prefix] = str(value)
    return into


def _dig(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _metadata(*candidates: Any) -> dict[str, Any]:
    """The first non-empty metadata among the places an API version may put it."""
    for candidate in candidates:
        if isinstance(candidate, Mapping) and candidate:
            return dict(candidate)
    return {}


def _when(value: Any) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if isinstance(value, int) else None


class Stripe(Provider):
    name = "stripe"
    title = "Stripe"
    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {Capability.PAYMENTS, Capability.EVENTS_SOURCE}
    )
    config_model = StripeConfig
    credentials_model = StripeCredentials
    # Stripe's test mode runs on the same host, with test keys.
    base_url = "https://api.stripe.com"
    policy: ClassVar[GatewayPolicy] = VENDOR_POLICIES["stripe"]

    async def check_connection(self, connection: Connection) -> str:
        if not connection.credentials.get("api_key"):
            raise ConnectionFailed("credentials.api_key is not set")
        response = await connection.gateway.request("GET", "/v1/account")
        if response.status_code != 200:
            raise ConnectionFailed(_error_message(response.status_code, response.text))
        account = response.json()
        return f"connected to Stripe account {account.get('id', '?')}"

    # ------------------------------------------------------------ events source

    def verify(
        self, request: InboundRequest, connection_secrets: Mapping[str, Any], config: BaseConfig
    ) -> None:
        assert isinstance(config, StripeConfig)
        secrets = [
            connection_secrets.get("webhook_secret"),
            connection_secrets.get("previous_webhook_secret"),
        ]
        header = {k.lower(): v for k, v in request.headers.items()}.get("stripe-signature")
        usable = [s for s in secrets if s]
        if not usable:
            raise signatures.SignatureInvalid(
                signatures.NO_MATCHING_SIGNATURE,
                "the integration has no credentials.webhook_secret to verify with",
            )
        failure: signatures.SignatureInvalid | None = None
        for secret in usable:
            try:
                signatures.verify_stripe(
                    request.body,
                    header,
                    secret,
                    now=request.now,
                    tolerance=config.tolerance_seconds,
                )
                return
            except signatures.SignatureInvalid as exc:
                failure = failure or exc
        assert failure is not None
        raise failure

    def identify(self, request: InboundRequest) -> InboundIdentity:
        event = json.loads(request.body)
        event_id, event_type = _text(_dig(event, "id")), _text(_dig(event, "type"))
        if not event_id or not event_type or _dig(event, "object") != "event":
            raise ValueError("the body is not a Stripe event (id, type, object=event)")
        if len(event_id) > MAX_EVENT_ID_CHARS:
            raise ValueError("the event id is longer than Stripe's ids are")
        return InboundIdentity(event_id=event_id, event_type=event_type[:MAX_EVENT_ID_CHARS])

    # ------------------------------------------------------------ payments

    def interpret(self, event_type: str, payload: Mapping[str, Any]) -> PaymentNotice | None:
        obj = _dig(payload, "data", "object")
        if not isinstance(obj, Mapping):
            return None
        occurred_at = _when(payload.get("created"))
        if event_type in ("checkout.session.completed", "checkout.session.async_payment_succeeded"):
            if obj.get("payment_status") != "paid":
                return None  # an asynchronous payment not yet made
            return PaymentNotice(
                kind="paid",
                references=_ids(obj.get("id"), obj.get("invoice"), obj.get("payment_intent")),
                member_id=_text(_metadata(obj.get("metadata")).get("member_id"))
                or _text(obj.get("client_reference_id")),
                email=_text(_dig(obj, "customer_details", "email"))
                or _text(obj.get("customer_email")),
                customer_id=_text(obj.get("customer")),
                plan=_text(_metadata(obj.get("metadata")).get("plan_id")),
                amount=_int(obj.get("amount_total")),
                currency=_text(obj.get("currency")),
                occurred_at=occurred_at,
                details={"checkout_session": obj.get("id")},
            )
        if event_type in ("invoice.paid", "invoice.payment_failed"):
            metadata = _metadata(
                _dig(obj, "parent", "subscription_details", "metadata"),
                _dig(obj, "subscription_details", "metadata"),
                obj.get("metadata"),
            )
            prices = []
            for line in _dig(obj, "lines", "data") or []:
                price = _text(_dig(line, "price", "id")) or _text(
                    _dig(line, "pricing", "price_details", "price")
                )
                if price:
                    prices.append(price)
            return PaymentNotice(
                kind="paid" if event_type == "invoice.paid" else "failed",
                references=_ids(obj.get("id"), obj.get("payment_intent"), obj.get("charge")),
                member_id=_text(metadata.get("member_id")),
                email=_text(obj.get("customer_email")),
                customer_id=_text(obj.get("customer")),
                plan=_text(metadata.get("plan_id")),
                price_ids=tuple(prices),
                amount=_int(
                    obj.get("amount_paid" if event_type == "invoice.paid" else "amount_due")
                ),
                currency=_text(obj.get("currency")),
                occurred_at=occurred_at,
                period_end=_subscription_period_end(_dig(obj, "lines", "data")),
                details={"invoice": obj.get("id"), "billing_reason": obj.get("billing_reason")},
            )
        if event_type == "customer.subscription.deleted":
            metadata = _metadata(obj.get("metadata"))
            return PaymentNotice(
                kind="subscription_ended",
                references=_ids(obj.get("id")),
                member_id=_text(metadata.get("member_id")),
                customer_id=_text(obj.get("customer")),
                occurred_at=occurred_at,
                # From API version 2025-03-31.basil the period is its items'.
                period_end=_when(obj.get("current_period_end"))
                or max(
                    (
                        end
                        for item in _dig(obj, "items", "data") or []
                        if (end := _when(_dig(item, "current_period_end"))) is not None
                    ),
                    default=None,
                ),
                details={"subscription": obj.get("id")},
            )
        if event_type == "invoice_payment.paid":
            # From API version 2025-03-31.basil an invoice no longer names the payment intent
            # or charge that paid it (nor a charge its invoice): this event links them, so
            # that a refund of the charge finds the invoice's payment.
            return PaymentNotice(
                kind="linked",
                references=_ids(
                    obj.get("invoice"),
                    _dig(obj, "payment", "payment_intent"),
                    _dig(obj, "payment", "charge"),
                ),
                occurred_at=occurred_at,
                details={"invoice_payment": obj.get("id")},
            )
        if event_type == "charge.refunded":
            return PaymentNotice(
                kind="refunded",
                references=_ids(obj.get("id"), obj.get("payment_intent"), obj.get("invoice")),
                member_id=_text(_metadata(obj.get("metadata")).get("member_id")),
                email=_text(_dig(obj, "billing_details", "email")),
                customer_id=_text(obj.get("customer")),
                amount=_int(obj.get("amount")),
                amount_refunded=_int(obj.get("amount_refunded")),
                currency=_text(obj.get("currency")),
                occurred_at=occurred_at,
                details={"charge": obj.get("id")},
            )
        return None

    def interpret_payout(self, event_type: str, payload: Mapping[str, Any]) -> PayoutNotice | None:
        obj = _dig(payload, "data", "object")
        if event_type != "payout.paid" or not isinstance(obj, Mapping):
            return None
        payout_id, currency = _text(obj.get("id")), _text(obj.get("currency"))
        if payout_id is None or currency is None or _int(obj.get("amount")) <= 0:
            return None
        return PayoutNotice(
            payout_id=payout_id,
            amount=_int(obj.get("amount")),
            currency=currency.upper(),
            occurred_at=_when(obj.get("arrival_date")) or _when(payload.get("created")),
        )

    async def create_customer(
        self, connection: Connection, *, member_id: str, email: str | None, name: str | None
    ) -> str:
        data = _form("", {"email": email, "name": name, "metadata": {"member_id": member_id}}, {})
        response = await connection.gateway.request(
            "POST", "/v1/customers", data=data, idempotency_key=f"memberhub-customer-{member_id}"
        )
        if response.status_code != 200:
            raise ConnectionFailed(_error_message(response.status_code, response.text))
        customer_id: str = response.json()["id"]
        return customer_id

    async def create_checkout(
        self, connection: Connection, request: CheckoutRequest
    ) -> CheckoutResult:
        metadata = {"member_id": request.member_id, "plan_id": request.plan_id}
        recurring = request.term_months <= MAX_RECURRING_MONTHS
        if request.price_id is not None:
            item: dict[str, Any] = {"price": request.price_id, "quantity": 1}
        else:
            price_data: dict[str, Any] = {
                "currency": request.currency.lower(),
                "unit_amount": request.amount,
                "product_data": {"name": request.plan_name},
            }
            if recurring:
                price_data["recurring"] = {
                    "interval": "month",
                    "interval_count": request.term_months,
                }
            item = {"price_data": price_data, "quantity": 1}
        mode = "subscription" if recurring else "payment"
        body: dict[str, Any] = {
            "mode": mode,
            "customer": request.customer_id,
            "client_reference_id": request.member_id,
            "success_url": request.success_url,
            "cancel_url": request.cancel_url,
            "line_items": [item],
            "metadata": metadata,
        }
        if mode == "subscription":
            body["subscription_data"] = {"metadata": metadata}
        else:
            body["payment_intent_data"] = {"metadata": metadata}
        response = await connection.gateway.request(
            "POST",
            "/v1/checkout/sessions",
            data=_form("", body, {}),
            idempotency_key=request.idempotency_key,
        )
        if response.status_code != 200:
            raise ConnectionFailed(_error_message(response.status_code, response.text))
        session = response.json()
        return CheckoutResult(id=session["id"], url=session.get("url") or "", mode=mode)

    # ------------------------------------------------------------ payments report

    async def money_movements(
        self, connection: Connection, *, since: datetime, until: datetime
    ) -> list[MoneyRecord]:
        """Charges, refunds and payouts created in [since, until), every page of each."""
        found: list[MoneyRecord] = []
        for path, kind in (
            ("/v1/charges", "charge"),
            ("/v1/refunds", "refund"),
            ("/v1/payouts", "payout"),
        ):
            async for obj in self._listed(connection, path, since, until):
                found.append(_money_record(obj, kind))
        return found

    async def payout_fees(self, connection: Connection, payout_id: str) -> int:
        """The sum of the fees of the balance transactions the payout paid out."""
        fees = 0
        async for row in self._listed(connection, "/v1/balance_transactions", payout=payout_id):
            if row.get("type") != "payout":
                fees += _int(row.get("fee"))
        return fees

    async def payout_net(self, connection: Connection, payout_id: str) -> int | None:
        """The sum of the nets (amount less fee: charges in, refunds out) of the balance
        transactions the payout paid out; None when Stripe lists none (it lists them for
        automatic payouts only)."""
        net: int | None = None
        async for row in self._listed(connection, "/v1/balance_transactions", payout=payout_id):
            if row.get("type") != "payout":
                net = (net or 0) + _int(row.get("net"))
        return net

    async def _listed(
        self,
        connection: Connection,
        path: str,
        since: datetime | None = None,
        until: datetime | None = None,
        **filters: str,
    ) -> AsyncIterator[Mapping[str, Any]]:
        starting_after: str | None = None
        while True:
            params = {"limit": "100", **filters}
            if since is not None:
                params["created[gte]"] = str(int(since.timestamp()))
            if until is not None:
                params["created[lt]"] = str(int(until.timestamp()))
            if starting_after is not None:
                params["starting_after"] = starting_after
            response = await connection.gateway.request("GET", path, params=params)
            if response.status_code != 200:
                raise ConnectionFailed(_error_message(response.status_code, response.text))
            page = response.json()
            rows = [row for row in page.get("data") or [] if isinstance(row, Mapping)]
            for row in rows:
                yield row
            if not page.get("has_more") or not rows:
                return
            starting_after = str(rows[-1]["id"])


def _money_record(obj: Mapping[str, Any], kind: str) -> MoneyRecord:
    metadata = _metadata(obj.get("metadata"))
    return MoneyRecord(
        id=str(obj.get("id")),
        kind=kind,  # type: ignore[arg-type]
        amount=_int(obj.get("amount")),
        currency=str(obj.get("currency") or "").upper(),
        created_at=_when(obj.get("created")) or datetime.now(UTC),
        status=str(obj.get("status") or ""),
        references=_ids(obj.get("payment_intent"), obj.get("invoice"), obj.get("charge")),
        member_id=_text(metadata.get("member_id")),
        arrives_at=_when(obj.get("arrival_date")) if kind == "payout" else None,
    )


def _subscription_period_end(lines: Any) -> datetime | None:
    """The end of the latest subscription period an invoice's lines bill for. Not the
    invoice's own `period_end`: on a subscription's invoice that looks back one period.
    Lines of one-off items (a period of an instant) say nothing about a subscription."""
    ends = []
    for line in lines if isinstance(lines, list) else []:
        if not isinstance(line, Mapping):
            continue
        of_subscription = (
            _text(line.get("subscription")) is not None
            or line.get("type") == "subscription"
            # From API version 2025-03-31.basil a line names its subscription in `parent`.
            or isinstance(_dig(line, "parent", "subscription_item_details"), Mapping)
            or _text(_dig(line, "parent", "invoice_item_details", "subscription")) is not None
        )
        end = _when(_dig(line, "period", "end"))
        if of_subscription and end is not None:
            ends.append(end)
    return max(ends, default=None)


def _ids(*values: Any) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v for v in values if isinstance(v, str) and v))


def _error_message(status: int, text: str) -> str:
    """Stripe's `error.message`, or the start of the body."""
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = text[:200]
    return f"Stripe answered {status}: {message}"
