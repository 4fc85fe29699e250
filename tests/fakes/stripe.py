"""A stateful fake of the Stripe API, and builders of the events Stripe sends us.

`running_fake_stripe` serves it on a free port of 127.0.0.1, under uvicorn in a thread with
its own event loop (as `tests.fakes.webhook_receiver` does), so the code under test talks
to it over real HTTP with the shapes of the real API (version 2024-06-20):

    async with running_fake_stripe(secret_key="sk_test_abc123") as fake:
        fake.add_price(1500, "gbp", recurring_interval="month", price_id="price_gold")
        fake.fail_next(1)
        ...point the Stripe connection's base URL at fake.url and create a checkout...
        assert fake.count("POST", "/v1/checkout/sessions") == 2
        [session] = fake.checkout_sessions.values()

Requests are form-encoded with Stripe's bracket notation (`metadata[member_id]=mem_1`,
`line_items[0][quantity]=1`) and authenticated with `Authorization: Bearer sk_…` (or HTTP
Basic with the key as user name, as curl does). Endpoints: `GET /v1/account`,
`POST|GET /v1/customers`, `GET|POST /v1/customers/{id}`, `POST /v1/checkout/sessions`,
`GET /v1/checkout/sessions/{id}` and `GET /v1/checkout/sessions/{id}/line_items`, and
the money listings `GET /v1/charges`, `/v1/refunds`, `/v1/payouts` and
`/v1/balance_transactions` (newest first, `created[gte|gt|lte|lt]`, `starting_after`) of
what `add_charge`, `add_refund` and `add_payout` made.
Required and unknown parameters are checked as Stripe does, and `price` ids must have been
added with `add_price`, as they would have to exist in a real account.

Checks apply in this order: latency, the API key (401), programmed failures (`fail_next`),
programmed rate limiting (`rate_limit_next`), the sliding rate limit, then idempotency and
the endpoint itself. As on Stripe, a response is saved under its `Idempotency-Key` only once
the endpoint has run: 401, 429, programmed failures (which stand for Stripe failing before
it executed anything, so they carry `Stripe-Should-Retry: true`) and parameter errors are
not saved, and a retry with the same key executes the request.

The module-level helpers build what Stripe sends to our webhook endpoint: `make_event`
wraps an object from `checkout_session_completed`, `invoice`, `charge` or `subscription`
into an Event, and `signed` gives the exact body and `Stripe-Signature` header for it.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import re
import secrets
import string
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import Response
from stripe import WebhookSignature

from tests.support_server import bind_local_socket, serving_in_thread

API_VERSION = "2024-06-20"
DEFAULT_SECRET_KEY = "sk_test_4eC39HqLyjWDarjtT1zdp7dc"
ACCOUNT_ID = "acct_1FakeMemberhub0"
CHECKOUT_SESSION_LIFETIME_SECONDS = 24 * 60 * 60
MAX_LIST_LIMIT = 100
# Stripe accepts billing intervals of up to three years.
MAX_INTERVAL_DAYS = {"day": 1, "week": 7, "month": 31, "year": 366}
MAX_INTERVAL_TOTAL_DAYS = 3 * 366

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_ALNUM = string.ascii_letters + string.digits

CUSTOMER_PARAMS = frozenset(
    {
        "address",
        "balance",
        "cash_balance",
        "description",
        "email",
        "expand",
        "invoice_prefix",
        "invoice_settings",
        "metadata",
        "name",
        "next_invoice_sequence",
        "payment_method",
        "phone",
        "preferred_locales",
        "shipping",
        "source",
        "tax",
        "tax_exempt",
        "tax_id_data",
        "test_clock",
    }
)
CHECKOUT_SESSION_PARAMS = frozenset(
    {
        "adaptive_pricing",
        "after_expiration",
        "allow_promotion_codes",
        "automatic_tax",
        "billing_address_collection",
        "cancel_url",
        "client_reference_id",
        "consent_collection",
        "currency",
        "custom_fields",
        "custom_text",
        "customer",
        "customer_creation",
        "customer_email",
        "customer_update",
        "discounts",
        "expand",
        "expires_at",
        "invoice_creation",
        "line_items",
        "locale",
        "metadata",
        "mode",
        "payment_intent_data",
        "payment_method_collection",
        "payment_method_configuration",
        "payment_method_options",
        "payment_method_types",
        "phone_number_collection",
        "redirect_on_completion",
        "return_url",
        "saved_payment_method_options",
        "setup_intent_data",
        "shipping_address_collection",
        "shipping_options",
        "submit_type",
        "subscription_data",
        "success_url",
        "tax_id_collection",
        "ui_mode",
    }
)
LINE_ITEM_PARAMS = frozenset(
    {"adjustable_quantity", "dynamic_tax_rates", "price", "price_data", "quantity", "tax_rates"}
)
PRICE_DATA_PARAMS = frozenset(
    {
        "currency",
        "product",
        "product_data",
        "recurring",
        "tax_behavior",
        "unit_amount",
        "unit_amount_decimal",
    }
)


def new_id(prefix: str, length: int = 24) -> str:
    """An id shaped like Stripe's: `prefix` and `length` random letters and digits."""
    return prefix + "".join(secrets.choice(_ALNUM) for _ in range(length))


# --------------------------------------------------------------------------- form decoding


def parse_stripe_form(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Decode Stripe's bracket notation into nested dicts and lists.

    `line_items[0][price_data][currency]=gbp` becomes
    `{"line_items": [{"price_data": {"currency": "gbp"}}]}`; `expand[]=a&expand[]=b`
    becomes `{"expand": ["a", "b"]}`. Values stay strings, as Stripe receives them.
    """
    root: dict[str, Any] = {}
    for raw_key, value in pairs:
        segments = _key_segments(raw_key)
        node = root
        for position, segment in enumerate(segments):
            if segment == "":
                segment = str(len(node))
            if position == len(segments) - 1:
                node[segment] = value
            else:
                child = node.setdefault(segment, {})
                if not isinstance(child, dict):
                    # `a=1&a[b]=2`: the later, nested form wins, as on Stripe.
                    child = node[segment] = {}
                node = child
    return _lists_from_indexes(root)


def _key_segments(raw_key: str) -> list[str]:
    head, bracket, rest = raw_key.partition("[")
    if not bracket:
        return [raw_key]
    return [head, *re.findall(r"([^\]]*)\]\[?", rest)]


def _lists_from_indexes(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    converted = {key: _lists_from_indexes(value) for key, value in node.items()}
    if converted and all(key.isdigit() for key in converted):
        return [converted[key] for key in sorted(converted, key=int)]
    return converted


# --------------------------------------------------------------------------- errors


class StripeError(Exception):
    """An error answer, rendered as Stripe's `{"error": {...}}` object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def body(self, request_id: str) -> dict[str, Any]:
        error: dict[str, Any] = {"message": self.message, "type": self.error_type}
        if self.code is not None:
            error["code"] = self.code
            error["doc_url"] = f"https://stripe.com/docs/error-codes/{self.code.replace('_', '-')}"
        if self.param is not None:
            error["param"] = self.param
        error["request_log_url"] = (
            f"https://dashboard.stripe.com/test/logs/{request_id}?t={int(time.time())}"
        )
        return {"error": error}


def _missing(param: str) -> StripeError:
    return StripeError(
        400, f"Missing required param: {param}.", code="parameter_missing", param=param
    )


def _invalid(param: str, message: str) -> StripeError:
    return StripeError(400, message, code="parameter_invalid_empty", param=param)


def _no_such(kind: str, object_id: str, param: str, status: int = 404) -> StripeError:
    return StripeError(
        status, f"No such {kind}: '{object_id}'", code="resource_missing", param=param
    )


def _check_known(params: Mapping[str, Any], allowed: frozenset[str], prefix: str = "") -> None:
    for name in params:
        if name not in allowed:
            full = f"{prefix}[{name}]" if prefix else name
            raise StripeError(
                400, f"Received unknown parameter: {full}", code="parameter_unknown", param=full
            )


def _integer(params: Mapping[str, Any], name: str, param: str | None = None) -> int | None:
    value = params.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise StripeError(
            400, f"Invalid integer: {value}", code="parameter_invalid_integer", param=param or name
        ) from None


def _metadata(params: Mapping[str, Any], param: str = "metadata") -> dict[str, str]:
    value = params.get(param, {})
    if value == "":
        return {}
    if not isinstance(value, dict):
        raise StripeError(400, f"Invalid object: {param} must be a hash", param=param)
    # An empty value unsets a key.
    return {str(key): str(item) for key, item in value.items() if item != ""}


# --------------------------------------------------------------------------- the fake


class StripeRequest(NamedTuple):
    """One request as it arrived: form (or query) decoded, header names lower-cased."""

    method: str
    path: str
    form: dict[str, Any]
    headers: dict[str, str]


@dataclass(frozen=True)
class _Saved:
    """A response saved under an idempotency key."""

    method: str
    path: str
    params: dict[str, Any]
    status: int
    body: bytes
    request_id: str


class FakeStripe:
    """The fake's state, programming and what it has seen; safe to use from any thread."""

    def __init__(self, url: str, secret_key: str = DEFAULT_SECRET_KEY) -> None:
        self.url = url
        self.secret_key = secret_key
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forget every object, request and programming, as a fresh fake."""
        with self._lock:
            self._customers: dict[str, dict[str, Any]] = {}
            self._sessions: dict[str, dict[str, Any]] = {}
            self._session_items: dict[str, list[dict[str, Any]]] = {}
            self._prices: dict[str, dict[str, Any]] = {}
            # Money movements, listed by GET /v1/charges, /v1/refunds, /v1/payouts and
            # /v1/balance_transactions.
            self._money: dict[str, dict[str, dict[str, Any]]] = {
                "charges": {},
                "refunds": {},
                "payouts": {},
                "balance_transactions": {},
            }
            # Balance transaction id → the payout that paid it out.
            self._paid_out: dict[str, str] = {}
            self._saved: dict[str, _Saved] = {}
            self._requests: list[StripeRequest] = []
            self._failures: deque[int] = deque()
            self._rate_limited_next = 0
            self._rate_limit: float | None = None
            self._accepted_at: deque[float] = deque()
            self._latency = 0.0

    # ------------------------------------------------------------------ programming

    def fail_next(self, n: int, status: int = 500) -> None:
        """Answer the next `n` requests with `status` and an `api_error` body."""
        with self._lock:
            self._failures.extend(status for _ in range(n))

    def rate_limit_next(self, n: int) -> None:
        """Answer the next `n` requests with 429 `rate_limit`."""
        with self._lock:
            self._rate_limited_next += n

    def set_latency(self, seconds: float) -> None:
        """Wait `seconds` before handling each request."""
        with self._lock:
            self._latency = seconds

    def set_rate_limit(self, per_second: float | None) -> None:
        """Accept at most `per_second` requests in any moving one-second window; None: all.

        Requests refused with 429 don't count towards the limit.
        """
        with self._lock:
            self._rate_limit = per_second
            self._accepted_at.clear()

    # ------------------------------------------------------------------ state

    def add_price(
        self,
        unit_amount: int,
        currency: str,
        *,
        recurring_interval: str | None = None,
        interval_count: int = 1,
        price_id: str | None = None,
        product_name: str = "Membership",
    ) -> dict[str, Any]:
        """Make a price exist, so checkout line items can refer to it by id."""
        price = _price_object(
            price_id or new_id("price_"),
            unit_amount=unit_amount,
            currency=currency.lower(),
            recurring=(
                None
                if recurring_interval is None
                else {"interval": recurring_interval, "interval_count": interval_count}
            ),
            product=new_id("prod_", 14),
            nickname=product_name,
        )
        with self._lock:
            self._prices[price["id"]] = price
        return copy.deepcopy(price)

    def add_customer(
        self,
        *,
        email: str | None = None,
        name: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Make a customer exist, as if created earlier through the API."""
        customer = _customer_object(new_id("cus_", 14), email, name, dict(metadata or {}))
        with self._lock:
            self._customers[customer["id"]] = customer
        return copy.deepcopy(customer)

    def complete_checkout_session(self, session_id: str) -> dict[str, Any]:
        """Mark an open session paid, as when the customer pays; returns the session.

        A customer is created if the session had none; a subscription id (subscription mode)
        or a payment intent id (payment mode) is assigned. Wrap the result with
        `make_event("checkout.session.completed", ...)` to send it to a webhook endpoint.
        """
        with self._lock:
            session = self._sessions[session_id]
            if session["customer"] is None:
                customer = _customer_object(new_id("cus_", 14), session["customer_email"], None, {})
                self._customers[customer["id"]] = customer
                session["customer"] = customer["id"]
            email = session["customer_email"] or self._customers[session["customer"]]["email"]
            session["status"] = "complete"
            session["payment_status"] = "paid"
            session["customer_details"] = {"email": email, "name": None, "phone": None}
            if session["mode"] == "subscription":
                session["subscription"] = new_id("sub_")
                session["invoice"] = new_id("in_")
            else:
                session["payment_intent"] = new_id("pi_")
            return copy.deepcopy(session)

    def add_charge(
        self,
        amount: int,
        currency: str,
        *,
        created: int | None = None,
        payment_intent: str | None = None,
        invoice: str | None = None,
        customer: str | None = None,
        metadata: Mapping[str, str] | None = None,
        fee: int = 0,
    ) -> dict[str, Any]:
        """A succeeded charge, with its balance transaction (`fee` is Stripe's)."""
        made = charge(
            amount=amount,
            currency=currency.lower(),
            created=created,
            payment_intent=payment_intent,
            invoice=invoice,
            customer=customer,
            metadata=metadata,
        )
        made["balance_transaction"] = self._balance_transaction(
            "charge", made["id"], amount, currency, made["created"], fee
        )
        with self._lock:
            self._money["charges"][made["id"]] = made
        return copy.deepcopy(made)

    def add_refund(self, charge_id: str, amount: int | None = None) -> dict[str, Any]:
        """Refund a charge added with `add_charge`, wholly unless `amount` is given."""
        with self._lock:
            refunded = self._money["charges"][charge_id]
            amount = refunded["amount"] - refunded["amount_refunded"] if amount is None else amount
            refunded["amount_refunded"] += amount
            refunded["refunded"] = refunded["amount_refunded"] >= refunded["amount"]
        created = int(time.time())
        refund_id = new_id("re_")
        refund: dict[str, Any] = {
            "id": refund_id,
            "object": "refund",
            "amount": amount,
            "charge": charge_id,
            "created": created,
            "currency": refunded["currency"],
            "metadata": {},
            "payment_intent": refunded["payment_intent"],
            "reason": None,
            "status": "succeeded",
        }
        refund["balance_transaction"] = self._balance_transaction(
            "refund", refund_id, -amount, refunded["currency"], created, 0
        )
        with self._lock:
            self._money["refunds"][refund_id] = refund
        return copy.deepcopy(refund)

    def add_payout(
        self, amount: int, currency: str, *, created: int | None = None, automatic: bool = True
    ) -> dict[str, Any]:
        """A paid payout of `amount` to the account's bank. An automatic one pays out every
        balance transaction not paid out before (`GET /v1/balance_transactions?payout=…`);
        for a manual one (`automatic=False`) Stripe lists none: it only moves money."""
        when = int(time.time()) if created is None else created
        payout_id = new_id("po_")
        payout: dict[str, Any] = {
            "id": payout_id,
            "object": "payout",
            "amount": amount,
            "arrival_date": when + 2 * 86400,
            "automatic": automatic,
            "created": when,
            "currency": currency.lower(),
            "destination": new_id("ba_"),
            "method": "standard",
            "status": "paid",
            "type": "bank_account",
        }
        payout["balance_transaction"] = self._balance_transaction(
            "payout", payout_id, -amount, currency, when, 0
        )
        with self._lock:
            self._money["payouts"][payout_id] = payout
            if automatic:
                for transaction_id in self._money["balance_transactions"]:
                    self._paid_out.setdefault(transaction_id, payout_id)
        return copy.deepcopy(payout)

    def _balance_transaction(
        self, kind: str, source: str, amount: int, currency: str, created: int, fee: int
    ) -> str:
        transaction_id = new_id("txn_")
        transaction: dict[str, Any] = {
            "id": transaction_id,
            "object": "balance_transaction",
            "amount": amount,
            "available_on": created + 2 * 86400,
            "created": created,
            "currency": currency.lower(),
            "fee": fee,
            "fee_details": [{"amount": fee, "currency": currency.lower(), "type": "stripe_fee"}]
            if fee
            else [],
            "net": amount - fee,
            "reporting_category": kind,
            "source": source,
            "status": "available",
            "type": kind,
        }
        with self._lock:
            self._money["balance_transactions"][transaction_id] = transaction
        return transaction_id

    @property
    def customers(self) -> dict[str, dict[str, Any]]:
        """Every customer by id (a copy)."""
        with self._lock:
            return copy.deepcopy(self._customers)

    @property
    def checkout_sessions(self) -> dict[str, dict[str, Any]]:
        """Every checkout session by id (a copy)."""
        with self._lock:
            return copy.deepcopy(self._sessions)

    def checkout_line_items(self, session_id: str) -> list[dict[str, Any]]:
        """The line items of a session, as `GET .../line_items` lists them."""
        with self._lock:
            return copy.deepcopy(self._session_items[session_id])

    @property
    def requests(self) -> list[StripeRequest]:
        """Every request so far, in arrival order, whatever it was answered."""
        with self._lock:
            return list(self._requests)

    def count(self, method: str | None = None, path_prefix: str = "") -> int:
        """Requests with `method` (any if None) to a path starting with `path_prefix`."""
        return sum(
            1
            for request in self.requests
            if (method is None or request.method == method.upper())
            and request.path.startswith(path_prefix)
        )

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        method = request.method
        path = request.url.path
        body = await request.body()
        query = scope.get("query_string", b"").decode("latin-1")
        pairs = parse_qsl(body.decode() if method == "POST" else query, keep_blank_values=True)
        params = parse_stripe_form(pairs)
        headers = {name.lower(): value for name, value in request.headers.items()}
        with self._lock:
            self._requests.append(StripeRequest(method, path, params, headers))
            latency = self._latency
        if latency > 0:
            await asyncio.sleep(latency)
        request_id = new_id("req_", 14)
        idempotency_key = headers.get("idempotency-key") if method == "POST" else None
        extra_headers = {"idempotency-key": idempotency_key} if idempotency_key else {}
        try:
            self._admit(headers)
            saved = self._saved_response(idempotency_key, method, path, params)
            if saved is not None:
                replay = _raw_response(
                    saved.status,
                    saved.body,
                    request_id,
                    {
                        **extra_headers,
                        "idempotent-replayed": "true",
                        "original-request": saved.request_id,
                    },
                )
                await replay(scope, receive, send)
                return
            payload = self._route(method, path, params)
        except StripeError as error:
            body_bytes = _json_bytes(error.body(request_id))
            response = _raw_response(
                error.status, body_bytes, request_id, {**extra_headers, **error.headers}
            )
            await response(scope, receive, send)
            return
        body_bytes = _json_bytes(payload)
        if idempotency_key:
            with self._lock:
                self._saved.setdefault(
                    idempotency_key,
                    _Saved(method, path, params, 200, body_bytes, request_id),
                )
        await _raw_response(200, body_bytes, request_id, extra_headers)(scope, receive, send)

    def _admit(self, headers: Mapping[str, str]) -> None:
        """Raise the error for a request that must not reach an endpoint."""
        key = _api_key(headers.get("authorization", ""))
        if key is None:
            raise StripeError(
                401,
                "You did not provide an API key. You need to provide your API key in the "
                "Authorization header, using Bearer auth (e.g. 'Authorization: Bearer "
                "YOUR_SECRET_KEY').",
                headers={"www-authenticate": 'Basic realm="Stripe"'},
            )
        if key != self.secret_key:
            raise StripeError(
                401,
                f"Invalid API Key provided: {_redacted(key)}",
                headers={"www-authenticate": 'Basic realm="Stripe"'},
            )
        with self._lock:
            if self._failures:
                status = self._failures.popleft()
                raise StripeError(
                    status,
                    "An unknown error occurred while processing your request; please try again.",
                    error_type="api_error",
                    headers={"stripe-should-retry": "true"},
                )
            if self._rate_limited_next > 0:
                self._rate_limited_next -= 1
                raise _rate_limited()
            if self._rate_limit is not None:
                now = time.monotonic()
                while self._accepted_at and self._accepted_at[0] <= now - 1.0:
                    self._accepted_at.popleft()
                if len(self._accepted_at) >= self._rate_limit:
                    raise _rate_limited()
                self._accepted_at.append(now)

    def _saved_response(
        self, key: str | None, method: str, path: str, params: dict[str, Any]
    ) -> _Saved | None:
        if not key:
            return None
        with self._lock:
            saved = self._saved.get(key)
        if saved is None:
            return None
        if (saved.method, saved.path, saved.params) != (method, path, params):
            raise StripeError(
                400,
                "Keys for idempotent requests can only be used with the same parameters they "
                f"were first used with. Try using a key other than '{key}' if you meant to "
                "execute a different request.",
                error_type="idempotency_error",
            )
        return saved

    def _route(self, method: str, path: str, params: dict[str, Any]) -> dict[str, Any]:
        parts = path.strip("/").split("/")
        match method, parts:
            case "GET", ["v1", "account"]:
                return _account_object()
            case "POST", ["v1", "customers"]:
                return self._create_customer(params)
            case "GET", ["v1", "customers"]:
                return self._list_customers(params)
            case "GET", ["v1", "customers", customer_id]:
                return self._get(self._customers, "customer", customer_id)
            case "POST", ["v1", "customers", customer_id]:
                return self._update_customer(customer_id, params)
            case "POST", ["v1", "checkout", "sessions"]:
                return self._create_checkout_session(params)
            case "GET", ["v1", "checkout", "sessions", session_id]:
                return self._get(self._sessions, "checkout.session", session_id)
            case "GET", ["v1", "checkout", "sessions", session_id, "line_items"]:
                return self._list_line_items(session_id, path)
            case "GET", ["v1", ("charges" | "refunds" | "payouts" | "balance_transactions")]:
                return self._list_money(parts[1], params)
        raise StripeError(
            404,
            f"Unrecognized request URL ({method}: {path}). Please see https://stripe.com/docs "
            "or we can help at https://support.stripe.com/.",
        )

    def _get(self, store: dict[str, dict[str, Any]], kind: str, object_id: str) -> dict[str, Any]:
        with self._lock:
            found = store.get(object_id)
            if found is None:
                raise _no_such(kind, object_id, "id")
            return copy.deepcopy(found)

    def _create_customer(self, params: dict[str, Any]) -> dict[str, Any]:
        _check_known(params, CUSTOMER_PARAMS)
        customer = _customer_object(
            new_id("cus_", 14), params.get("email"), params.get("name"), _metadata(params)
        )
        if isinstance(params.get("description"), str):
            customer["description"] = params["description"]
        if isinstance(params.get("phone"), str):
            customer["phone"] = params["phone"]
        with self._lock:
            self._customers[customer["id"]] = customer
        return copy.deepcopy(customer)

    def _update_customer(self, customer_id: str, params: dict[str, Any]) -> dict[str, Any]:
        _check_known(params, CUSTOMER_PARAMS)
        metadata = params.get("metadata", {})
        with self._lock:
            customer = self._customers.get(customer_id)
            if customer is None:
                raise _no_such("customer", customer_id, "id")
            for field_name in ("email", "name", "description", "phone"):
                if field_name in params:
                    customer[field_name] = params[field_name] or None
            if isinstance(metadata, dict):
                for key, value in metadata.items():
                    if value == "":
                        customer["metadata"].pop(key, None)
                    else:
                        customer["metadata"][key] = value
            elif metadata == "":
                customer["metadata"] = {}
            return copy.deepcopy(customer)

    def _list_customers(self, params: dict[str, Any]) -> dict[str, Any]:
        limit = _integer(params, "limit")
        if limit is None:
            limit = 10
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise StripeError(
                400,
                f"This value must be greater than or equal to 1 and less than or equal to "
                f"{MAX_LIST_LIMIT}.",
                code="parameter_invalid_integer",
                param="limit",
            )
        with self._lock:
            # Newest first, as Stripe lists.
            everyone = [copy.deepcopy(c) for c in reversed(self._customers.values())]
        email = params.get("email")
        matching = [c for c in everyone if email is None or c["email"] == email]
        starting_after = params.get("starting_after")
        if starting_after is not None:
            ids = [c["id"] for c in matching]
            if starting_after not in ids:
                raise _no_such("customer", starting_after, "starting_after", status=400)
            matching = matching[ids.index(starting_after) + 1 :]
        return {
            "object": "list",
            "data": matching[:limit],
            "has_more": len(matching) > limit,
            "url": "/v1/customers",
        }

    def _list_money(self, kind: str, params: dict[str, Any]) -> dict[str, Any]:
        """Newest first, filtered by `created[gte|gt|lte|lt]`, paged by `starting_after`."""
        limit = _integer(params, "limit")
        if limit is None:
            limit = 10
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise StripeError(
                400,
                f"This value must be greater than or equal to 1 and less than or equal to "
                f"{MAX_LIST_LIMIT}.",
                code="parameter_invalid_integer",
                param="limit",
            )
        created = params.get("created")
        bounds: dict[str, int] = {}
        if isinstance(created, Mapping):
            for op in ("gte", "gt", "lte", "lt"):
                if op in created:
                    value = _integer(created, op, f"created[{op}]")
                    assert value is not None
                    bounds[op] = value
        with self._lock:
            rows = sorted(
                (copy.deepcopy(r) for r in self._money[kind].values()),
                key=lambda r: r["created"],
                reverse=True,
            )
        checks = {
            "gte": lambda c, b: c >= b,
            "gt": lambda c, b: c > b,
            "lte": lambda c, b: c <= b,
            "lt": lambda c, b: c < b,
        }
        rows = [r for r in rows if all(checks[op](r["created"], b) for op, b in bounds.items())]
        payout = params.get("payout")
        if kind == "balance_transactions" and payout is not None:
            with self._lock:
                rows = [r for r in rows if self._paid_out.get(r["id"]) == payout]
        starting_after = params.get("starting_after")
        if starting_after is not None:
            ids = [r["id"] for r in rows]
            if starting_after not in ids:
                raise _no_such(kind.rstrip("s"), starting_after, "starting_after", status=400)
            rows = rows[ids.index(starting_after) + 1 :]
        return {
            "object": "list",
            "data": rows[:limit],
            "has_more": len(rows) > limit,
            "url": f"/v1/{kind}",
        }

    def _create_checkout_session(self, params: dict[str, Any]) -> dict[str, Any]:
        _check_known(params, CHECKOUT_SESSION_PARAMS)
        mode = params.get("mode")
        if not mode:
            raise _missing("mode")
        if mode not in ("payment", "subscription", "setup"):
            raise StripeError(
                400,
                f"Invalid mode: must be one of payment, setup, or subscription (got {mode!r})",
                param="mode",
            )
        if not params.get("success_url"):
            raise _missing("success_url")
        customer_id = params.get("customer")
        if customer_id is not None:
            with self._lock:
                known = customer_id in self._customers
            if not known:
                raise _no_such("customer", customer_id, "customer", status=400)
            if params.get("customer_email"):
                raise StripeError(
                    400,
                    "You may only specify one of these parameters: customer, customer_email.",
                    param="customer_email",
                )
        items = self._line_items(mode, params.get("line_items"))
        currencies = {item["currency"] for item in items}
        if len(currencies) > 1:
            raise StripeError(
                400,
                "All line items must use the same currency.",
                param="line_items",
            )
        amount = sum(item["amount_total"] for item in items)
        created = int(time.time())
        session_id = new_id("cs_test_", 58)
        session: dict[str, Any] = {
            "id": session_id,
            "object": "checkout.session",
            "after_expiration": None,
            "allow_promotion_codes": None,
            "amount_subtotal": amount,
            "amount_total": amount,
            "automatic_tax": {"enabled": False, "liability": None, "status": None},
            "billing_address_collection": None,
            "cancel_url": params.get("cancel_url"),
            "client_reference_id": params.get("client_reference_id"),
            "client_secret": None,
            "consent": None,
            "consent_collection": None,
            "created": created,
            "currency": next(iter(currencies), None),
            "custom_fields": [],
            "custom_text": {
                "after_submit": None,
                "shipping_address": None,
                "submit": None,
                "terms_of_service_acceptance": None,
            },
            "customer": customer_id,
            "customer_creation": (
                "if_required" if customer_id is None and mode == "payment" else None
            ),
            "customer_details": None,
            "customer_email": params.get("customer_email"),
            "expires_at": created + CHECKOUT_SESSION_LIFETIME_SECONDS,
            "invoice": None,
            "invoice_creation": None,
            "livemode": False,
            "locale": params.get("locale"),
            "metadata": _metadata(params),
            "mode": mode,
            "payment_intent": None,
            "payment_link": None,
            "payment_method_collection": "always" if mode == "subscription" else None,
            "payment_method_options": {},
            "payment_method_types": params.get("payment_method_types") or ["card"],
            "payment_status": "no_payment_required" if mode == "setup" else "unpaid",
            "phone_number_collection": {"enabled": False},
            "recovered_from": None,
            "setup_intent": None,
            "shipping_address_collection": None,
            "shipping_cost": None,
            "shipping_details": None,
            "shipping_options": [],
            "status": "open",
            "submit_type": params.get("submit_type"),
            "subscription": None,
            "success_url": params["success_url"],
            "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
            "ui_mode": "hosted",
            "url": f"https://checkout.stripe.com/c/pay/{session_id}",
        }
        with self._lock:
            self._sessions[session_id] = copy.deepcopy(session)
            self._session_items[session_id] = items
        return session

    def _line_items(self, mode: str, raw_items: Any) -> list[dict[str, Any]]:
        if mode == "setup":
            return []
        if not raw_items:
            raise _missing("line_items")
        if not isinstance(raw_items, list):
            raise StripeError(400, "Invalid array", param="line_items")
        items: list[dict[str, Any]] = []
        recurring_seen = False
        for index, raw in enumerate(raw_items):
            prefix = f"line_items[{index}]"
            if not isinstance(raw, dict):
                raise StripeError(400, "Invalid object", param=prefix)
            _check_known(raw, LINE_ITEM_PARAMS, prefix)
            price = self._line_item_price(raw, prefix)
            quantity = _integer(raw, "quantity", f"{prefix}[quantity]")
            if quantity is None:
                raise StripeError(
                    400,
                    f"Quantity is required. Add `quantity` to `{prefix}`",
                    code="parameter_missing",
                    param=f"{prefix}[quantity]",
                )
            if price["recurring"] is not None:
                recurring_seen = True
                if mode == "payment":
                    raise StripeError(
                        400,
                        "You specified `payment` mode but passed a recurring price. Either "
                        "switch to `subscription` mode or use only one-time prices.",
                        param=f"{prefix}[price]",
                    )
            amount = price["unit_amount"] * quantity
            items.append(
                {
                    "id": new_id("li_"),
                    "object": "item",
                    "amount_discount": 0,
                    "amount_subtotal": amount,
                    "amount_tax": 0,
                    "amount_total": amount,
                    "currency": price["currency"],
                    "description": price["nickname"],
                    "price": price,
                    "quantity": quantity,
                }
            )
        if mode == "subscription" and not recurring_seen:
            raise StripeError(
                400,
                "You must provide at least one recurring price in `subscription` mode when "
                "using prices.",
                param="line_items",
            )
        return items

    def _line_item_price(self, raw: Mapping[str, Any], prefix: str) -> dict[str, Any]:
        if "price" in raw:
            with self._lock:
                price = self._prices.get(raw["price"])
            if price is None:
                raise _no_such("price", raw["price"], f"{prefix}[price]", status=400)
            return copy.deepcopy(price)
        data = raw.get("price_data")
        if not isinstance(data, dict):
            raise _missing(f"{prefix}[price]")
        data_prefix = f"{prefix}[price_data]"
        _check_known(data, PRICE_DATA_PARAMS, data_prefix)
        if not data.get("currency"):
            raise _missing(f"{data_prefix}[currency]")
        unit_amount = _integer(data, "unit_amount", f"{data_prefix}[unit_amount]")
        if unit_amount is None:
            raise _missing(f"{data_prefix}[unit_amount]")
        if unit_amount < 0:
            raise _invalid(f"{data_prefix}[unit_amount]", "This value must be at least 0.")
        product_data = data.get("product_data")
        if "product" not in data:
            if not isinstance(product_data, dict):
                raise _missing(f"{data_prefix}[product_data]")
            if not product_data.get("name"):
                raise _missing(f"{data_prefix}[product_data][name]")
        recurring = data.get("recurring")
        if recurring is not None:
            recurring = self._recurring(recurring, f"{data_prefix}[recurring]")
        return _price_object(
            new_id("price_"),
            unit_amount=unit_amount,
            currency=str(data["currency"]).lower(),
            recurring=recurring,
            product=str(data.get("product") or new_id("prod_", 14)),
            nickname=(product_data or {}).get("name") if isinstance(product_data, dict) else None,
        )

    @staticmethod
    def _recurring(recurring: Any, prefix: str) -> dict[str, Any]:
        if not isinstance(recurring, dict):
            raise StripeError(400, "Invalid object", param=prefix)
        interval = recurring.get("interval")
        if not interval:
            raise _missing(f"{prefix}[interval]")
        if interval not in MAX_INTERVAL_DAYS:
            raise StripeError(
                400,
                f"Invalid {prefix}[interval]: must be one of day, month, week, or year",
                param=f"{prefix}[interval]",
            )
        interval_count = _integer(recurring, "interval_count", f"{prefix}[interval_count]") or 1
        if not 1 <= interval_count * MAX_INTERVAL_DAYS[interval] <= MAX_INTERVAL_TOTAL_DAYS:
            raise StripeError(
                400,
                "The maximum billing interval is three years (3 years, 36 months, or 156 weeks).",
                param=f"{prefix}[interval_count]",
            )
        return {
            "aggregate_usage": None,
            "interval": interval,
            "interval_count": interval_count,
            "trial_period_days": None,
            "usage_type": "licensed",
        }

    def _list_line_items(self, session_id: str, path: str) -> dict[str, Any]:
        with self._lock:
            items = self._session_items.get(session_id)
            if items is None:
                raise _no_such("checkout.session", session_id, "id")
            data = copy.deepcopy(items)
        return {"object": "list", "data": data, "has_more": False, "url": path}


def _api_key(authorization: str) -> str | None:
    scheme, _, credentials = authorization.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer" and credentials.strip():
        return credentials.strip()
    if scheme == "basic":
        try:
            user, _, _password = base64.b64decode(credentials).decode().partition(":")
        except ValueError:
            return None
        return user or None
    return None


def _redacted(key: str) -> str:
    prefix = "_".join(key.split("_")[:2]) if key.count("_") >= 2 else ""
    return f"{prefix}_****{key[-4:]}" if prefix else f"****{key[-4:]}"


def _rate_limited() -> StripeError:
    return StripeError(
        429,
        "Request rate limit exceeded. You can learn more about rate limits here "
        "https://stripe.com/docs/rate-limits.",
        code="rate_limit",
    )


def _json_bytes(payload: Any) -> bytes:
    return json.dumps(payload, indent=2).encode()


def _raw_response(
    status: int, body: bytes, request_id: str, headers: Mapping[str, str]
) -> Response:
    return Response(
        content=body,
        status_code=status,
        media_type="application/json",
        headers={
            "request-id": request_id,
            "stripe-version": API_VERSION,
            "cache-control": "no-cache, no-store",
            **headers,
        },
    )


# --------------------------------------------------------------------------- objects


def _account_object() -> dict[str, Any]:
    return {
        "id": ACCOUNT_ID,
        "object": "account",
        "business_profile": {"name": "Memberhub Test Club", "url": None},
        "business_type": "company",
        "capabilities": {"card_payments": "active", "transfers": "active"},
        "charges_enabled": True,
        "country": "GB",
        "created": 1_700_000_000,
        "default_currency": "gbp",
        "details_submitted": True,
        "email": "owner@example.com",
        "payouts_enabled": True,
        "settings": {"dashboard": {"display_name": "Memberhub Test Club", "timezone": "Etc/UTC"}},
        "type": "standard",
    }


def _customer_object(
    customer_id: str, email: str | None, name: str | None, metadata: dict[str, str]
) -> dict[str, Any]:
    return {
        "id": customer_id,
        "object": "customer",
        "address": None,
        "balance": 0,
        "created": int(time.time()),
        "currency": None,
        "default_source": None,
        "delinquent": False,
        "description": None,
        "discount": None,
        "email": email or None,
        "invoice_prefix": customer_id.removeprefix("cus_")[:8].upper(),
        "invoice_settings": {
            "custom_fields": None,
            "default_payment_method": None,
            "footer": None,
            "rendering_options": None,
        },
        "livemode": False,
        "metadata": metadata,
        "name": name or None,
        "next_invoice_sequence": 1,
        "phone": None,
        "preferred_locales": [],
        "shipping": None,
        "tax_exempt": "none",
        "test_clock": None,
    }


def _price_object(
    price_id: str,
    *,
    unit_amount: int,
    currency: str,
    recurring: dict[str, Any] | None,
    product: str,
    nickname: str | None,
) -> dict[str, Any]:
    if recurring is not None:
        recurring = {
            "aggregate_usage": None,
            "trial_period_days": None,
            "usage_type": "licensed",
            **recurring,
        }
    return {
        "id": price_id,
        "object": "price",
        "active": True,
        "billing_scheme": "per_unit",
        "created": int(time.time()),
        "currency": currency,
        "livemode": False,
        "lookup_key": None,
        "metadata": {},
        "nickname": nickname,
        "product": product,
        "recurring": recurring,
        "tax_behavior": "unspecified",
        "type": "one_time" if recurring is None else "recurring",
        "unit_amount": unit_amount,
        "unit_amount_decimal": str(unit_amount),
    }


# --------------------------------------------------------------------------- events


def make_event(
    event_type: str,
    data_object: Mapping[str, Any],
    *,
    event_id: str | None = None,
    created: int | None = None,
    previous_attributes: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A Stripe Event of `event_type` about `data_object`, as Stripe posts it to endpoints."""
    data: dict[str, Any] = {"object": copy.deepcopy(dict(data_object))}
    if previous_attributes is not None:
        data["previous_attributes"] = copy.deepcopy(dict(previous_attributes))
    return {
        "id": event_id or new_id("evt_"),
        "object": "event",
        "api_version": API_VERSION,
        "created": int(time.time()) if created is None else created,
        "data": data,
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": event_type,
    }


def signed(
    event_or_bytes: Mapping[str, Any] | bytes, secret: str, *, timestamp: int | None = None
) -> tuple[bytes, dict[str, str]]:
    """The exact body and the headers Stripe would post for it, signed with `secret`.

    A dict is serialised as Stripe does (indented JSON); bytes are signed as they are.
    `timestamp` (Unix seconds) defaults to now; older ones test the tolerance window.
    """
    if isinstance(event_or_bytes, bytes):
        body = event_or_bytes
    else:
        body = json.dumps(event_or_bytes, indent=2).encode()
    signature = WebhookSignature.generate_signature_header(
        body.decode(), secret, timestamp=int(time.time()) if timestamp is None else timestamp
    )
    headers = {
        "Content-Type": "application/json; charset=utf-8",
        "Stripe-Signature": str(signature),
        "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
    }
    return body, headers


def checkout_session_completed(
    *,
    session_id: str | None = None,
    mode: str = "subscription",
    customer: str | None = None,
    customer_email: str | None = "member@example.com",
    client_reference_id: str | None = None,
    subscription: str | None = None,
    payment_intent: str | None = None,
    invoice: str | None = None,
    amount_total: int = 1500,
    currency: str = "gbp",
    payment_status: str = "paid",
    metadata: Mapping[str, str] | None = None,
    created: int | None = None,
) -> dict[str, Any]:
    """A checkout session as `checkout.session.completed` carries it.

    In subscription mode a subscription (and invoice) id is made up unless given; in
    payment mode a payment intent id.
    """
    now = int(time.time()) if created is None else created
    identifier = session_id or new_id("cs_test_", 58)
    if mode == "subscription":
        subscription = subscription or new_id("sub_")
        invoice = invoice or new_id("in_")
    elif mode == "payment":
        payment_intent = payment_intent or new_id("pi_")
    return {
        "id": identifier,
        "object": "checkout.session",
        "amount_subtotal": amount_total,
        "amount_total": amount_total,
        "cancel_url": "https://example.com/cancel",
        "client_reference_id": client_reference_id,
        "created": now,
        "currency": currency,
        "customer": customer or new_id("cus_", 14),
        "customer_creation": None,
        "customer_details": {"email": customer_email, "name": None, "phone": None},
        "customer_email": customer_email,
        "expires_at": now + CHECKOUT_SESSION_LIFETIME_SECONDS,
        "invoice": invoice,
        "livemode": False,
        "metadata": dict(metadata or {}),
        "mode": mode,
        "payment_intent": payment_intent,
        "payment_link": None,
        "payment_method_types": ["card"],
        "payment_status": payment_status,
        "status": "complete",
        "subscription": subscription,
        "success_url": "https://example.com/success",
        "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
        "ui_mode": "hosted",
        "url": None,
    }


def invoice(
    *,
    invoice_id: str | None = None,
    customer: str | None = None,
    customer_email: str | None = "member@example.com",
    subscription: str | None = None,
    billing_reason: str = "subscription_cycle",
    status: str = "paid",
    amount_paid: int | None = None,
    amount_due: int = 1500,
    currency: str = "gbp",
    price_id: str | None = None,
    period_start: int | None = None,
    period_end: int | None = None,
    payment_intent: str | None = None,
    charge: str | None = None,
    metadata: Mapping[str, str] | None = None,
    subscription_metadata: Mapping[str, str] | None = None,
    created: int | None = None,
) -> dict[str, Any]:
    """An invoice as `invoice.paid`, `invoice.payment_failed` etc. carry it.

    `amount_paid` defaults to `amount_due` when `status` is "paid", else 0; the one line's
    period defaults to the month from now.
    """
    now = int(time.time()) if created is None else created
    identifier = invoice_id or new_id("in_")
    start = now if period_start is None else period_start
    end = start + 30 * 24 * 60 * 60 if period_end is None else period_end
    paid = status == "paid"
    paid_amount = (amount_due if paid else 0) if amount_paid is None else amount_paid
    subscription = subscription or new_id("sub_")
    if paid:
        payment_intent = payment_intent or new_id("pi_")
        charge = charge or new_id("ch_")
    line_price = _price_object(
        price_id or new_id("price_"),
        unit_amount=amount_due,
        currency=currency,
        recurring={"interval": "month", "interval_count": 1},
        product=new_id("prod_", 14),
        nickname=None,
    )
    return {
        "id": identifier,
        "object": "invoice",
        "account_country": "GB",
        "amount_due": amount_due,
        "amount_paid": paid_amount,
        "amount_remaining": max(0, amount_due - paid_amount),
        "attempt_count": 1,
        "attempted": True,
        "billing_reason": billing_reason,
        "charge": charge,
        "collection_method": "charge_automatically",
        "created": now,
        "currency": currency,
        "customer": customer or new_id("cus_", 14),
        "customer_email": customer_email,
        "hosted_invoice_url": f"https://invoice.stripe.com/i/acct_test/{identifier}",
        "lines": {
            "object": "list",
            "data": [
                {
                    "id": new_id("il_"),
                    "object": "line_item",
                    "amount": amount_due,
                    "currency": currency,
                    "description": "1 \u00d7 Membership",
                    "invoice": identifier,
                    "livemode": False,
                    "metadata": {},
                    "period": {"start": start, "end": end},
                    "price": line_price,
                    "proration": False,
                    "quantity": 1,
                    "subscription": subscription,
                    "type": "subscription",
                }
            ],
            "has_more": False,
            "total_count": 1,
            "url": f"/v1/invoices/{identifier}/lines",
        },
        "livemode": False,
        "metadata": dict(metadata or {}),
        "number": f"{identifier[-8:].upper()}-0001",
        "paid": paid,
        "payment_intent": payment_intent,
        "period_end": end,
        "period_start": start,
        "status": status,
        "subscription": subscription,
        "subscription_details": {"metadata": dict(subscription_metadata or {})},
        "subtotal": amount_due,
        "total": amount_due,
    }


def charge(
    *,
    charge_id: str | None = None,
    amount: int = 1500,
    amount_refunded: int = 0,
    refunded: bool | None = None,
    currency: str = "gbp",
    customer: str | None = None,
    payment_intent: str | None = None,
    invoice: str | None = None,
    email: str | None = "member@example.com",
    metadata: Mapping[str, str] | None = None,
    created: int | None = None,
) -> dict[str, Any]:
    """A charge as `charge.succeeded` or `charge.refunded` carry it.

    `refunded` defaults to whether `amount_refunded` covers `amount`.
    """
    return {
        "id": charge_id or new_id("ch_"),
        "object": "charge",
        "amount": amount,
        "amount_captured": amount,
        "amount_refunded": amount_refunded,
        "billing_details": {"address": None, "email": email, "name": None, "phone": None},
        "captured": True,
        "created": int(time.time()) if created is None else created,
        "currency": currency,
        "customer": customer,
        "description": None,
        "invoice": invoice,
        "livemode": False,
        "metadata": dict(metadata or {}),
        "paid": True,
        "payment_intent": payment_intent or new_id("pi_"),
        "receipt_email": email,
        "refunded": amount_refunded >= amount if refunded is None else refunded,
        "status": "succeeded",
    }


def subscription(
    *,
    subscription_id: str | None = None,
    customer: str | None = None,
    status: str = "active",
    current_period_start: int | None = None,
    current_period_end: int | None = None,
    cancel_at_period_end: bool = False,
    canceled_at: int | None = None,
    price_id: str | None = None,
    metadata: Mapping[str, str] | None = None,
    created: int | None = None,
) -> dict[str, Any]:
    """A subscription as `customer.subscription.*` events carry it."""
    now = int(time.time()) if created is None else created
    identifier = subscription_id or new_id("sub_")
    start = now if current_period_start is None else current_period_start
    end = start + 30 * 24 * 60 * 60 if current_period_end is None else current_period_end
    return {
        "id": identifier,
        "object": "subscription",
        "billing_cycle_anchor": start,
        "cancel_at": end if cancel_at_period_end else None,
        "cancel_at_period_end": cancel_at_period_end,
        "canceled_at": canceled_at,
        "collection_method": "charge_automatically",
        "created": now,
        "currency": "gbp",
        "current_period_end": end,
        "current_period_start": start,
        "customer": customer or new_id("cus_", 14),
        "ended_at": canceled_at if status == "canceled" else None,
        "items": {
            "object": "list",
            "data": [
                {
                    "id": new_id("si_", 14),
                    "object": "subscription_item",
                    "price": {"id": price_id or new_id("price_"), "object": "price"},
                    "quantity": 1,
                    "subscription": identifier,
                }
            ],
            "has_more": False,
            "total_count": 1,
            "url": f"/v1/subscription_items?subscription={identifier}",
        },
        "latest_invoice": new_id("in_"),
        "livemode": False,
        "metadata": dict(metadata or {}),
        "start_date": now,
        "status": status,
    }


# --------------------------------------------------------------------------- serving


@asynccontextmanager
async def running_fake_stripe(secret_key: str = DEFAULT_SECRET_KEY) -> AsyncIterator[FakeStripe]:
    """Serve a fresh `FakeStripe` accepting `secret_key` on 127.0.0.1 until the block ends."""
    sock, base_url = bind_local_socket()
    fake = FakeStripe(base_url, secret_key)
    async with serving_in_thread(
        fake, sock, name="fake-stripe", lifespan="off", graceful_shutdown=1
    ):
        yield fake
