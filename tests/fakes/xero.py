"""A stateful fake of Xero: its identity server (OAuth 2.0) and the Accounting API.

`running_fake_xero` serves it on a free port of 127.0.0.1 (uvicorn in a thread, as the
Stripe fake), with Xero's shapes:

    async with running_fake_xero() as xero:
        xero.add_account("200", "Sales", "REVENUE")
        xero.set_faults(0.2)             # a fifth of API calls answer 500 or 429
        ...point the integration's base_url at xero.url, config.oauth at its endpoints...
        assert len(xero.invoices) == 100

Identity: `GET /identity/connect/authorize` answers 302 back to the redirect URI with a
code; `POST /connect/token` takes `authorization_code` and `refresh_token` grants (client
credentials by HTTP Basic), issues access tokens that expire after 30
minutes and refresh tokens that rotate: each is spent by its use. `GET /connections` lists
the tenants the token may reach.

Accounting API (`/api.xro/2.0/…`, Bearer token and `xero-tenant-id` required): Accounts,
TrackingCategories, TaxRates, Currencies, Organisation (GET); Contacts, Invoices, CreditNotes,
Payments, BankTransfers, BankTransactions (GET with `where` and `page`, POST to create).
Creates are validated as Xero does and refused with its validation format (HTTP 400,
`ValidationException`, the messages under `Elements[].ValidationErrors[]`). An
`Idempotency-Key` saves the answer of a create: the same key answers the same again.

Limits: per tenant per minute (60) and per day (5000), 5 calls at once; beyond them a 429
with `Retry-After` and `X-Rate-Limit-Problem`. Every answer carries
`X-DayLimit-Remaining`, `X-MinLimit-Remaining` and `X-AppMinLimit-Remaining`.

Faults (`set_faults`): a fraction of API calls fail, half 500 and half 429. A 500 on a
create is answered after the create was made and saved under its idempotency key (the
answer was lost on the way), so a retry without the key would make it twice.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import hmac
import json
import random
import re
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qsl, urlencode

from starlette.requests import Request
from starlette.responses import Response

from tests.support_server import bind_local_socket, serving_in_thread

ACCESS_TOKEN_SECONDS = 30 * 60
API = "/api.xro/2.0"
PAGE_SIZE = 100
DEFAULT_CURRENCIES = ("GBP", "EUR", "USD", "MYR")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class XeroFault(Exception):
    def __init__(self, status: int, body: Any = None, headers: Mapping[str, str] | None = None):
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = dict(headers or {})


def validation_error(element: Mapping[str, Any], *messages: str) -> XeroFault:
    """Xero's answer to a create that fails validation."""
    return XeroFault(
        400,
        {
            "ErrorNumber": 10,
            "Type": "ValidationException",
            "Message": "A validation exception occurred",
            "Elements": [
                {**element, "ValidationErrors": [{"Message": message} for message in messages]}
            ],
        },
    )


def _ms_date(moment: datetime) -> str:
    return f"/Date({int(moment.timestamp() * 1000)}+0000)/"


def _decimal(value: Any) -> Decimal | None:
    if isinstance(value, bool):
        return None
    try:
        return Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None


def tax_rate(tax_type: str, name: str, rate: float, *, revenue: bool) -> dict[str, Any]:
    """A tax rate as `GET /TaxRates` lists it."""
    return {
        "Name": name,
        "TaxType": tax_type,
        "ReportTaxType": "OUTPUT" if revenue else "INPUT",
        "CanApplyToAssets": True,
        "CanApplyToEquity": True,
        "CanApplyToExpenses": not revenue,
        "CanApplyToLiabilities": True,
        "CanApplyToRevenue": revenue,
        "DisplayTaxRate": rate,
        "EffectiveRate": rate,
        "Status": "ACTIVE",
        "TaxComponents": [{"Name": "VAT", "Rate": rate, "IsCompound": False}],
    }


def _default_tax_rates() -> dict[str, dict[str, Any]]:
    """A UK organisation's usual rates (Xero makes them with the organisation)."""
    rates = (
        tax_rate("NONE", "No VAT", 0.0, revenue=True),
        tax_rate("OUTPUT2", "20% (VAT on Income)", 20.0, revenue=True),
        tax_rate("EXEMPTOUTPUT", "Exempt Income", 0.0, revenue=True),
        tax_rate("INPUT2", "20% (VAT on Expenses)", 20.0, revenue=False),
    )
    return {rate["TaxType"]: rate for rate in rates}


@dataclass
class Tenant:
    tenant_id: str
    name: str
    base_currency: str = "GBP"
    currencies: set[str] = field(default_factory=lambda: set(DEFAULT_CURRENCIES))
    accounts: dict[str, dict[str, Any]] = field(default_factory=dict)  # by code
    tracking: dict[str, list[str]] = field(default_factory=dict)
    tax_rates: dict[str, dict[str, Any]] = field(default_factory=_default_tax_rates)  # by type
    contacts: dict[str, dict[str, Any]] = field(default_factory=dict)
    invoices: dict[str, dict[str, Any]] = field(default_factory=dict)
    credit_notes: dict[str, dict[str, Any]] = field(default_factory=dict)
    payments: dict[str, dict[str, Any]] = field(default_factory=dict)
    bank_transfers: dict[str, dict[str, Any]] = field(default_factory=dict)
    bank_transactions: dict[str, dict[str, Any]] = field(default_factory=dict)
    saved: dict[str, tuple[str, int, Any]] = field(default_factory=dict)  # key → (hash, …)
    minute_calls: deque[float] = field(default_factory=deque)
    day_calls: int = 0


@dataclass(frozen=True)
class XeroRequest:
    method: str
    path: str
    status: int
    headers: dict[str, str]
    body: str


class FakeXero:
    """The fake's state, its programming and what it has seen; safe from any thread."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client_id = "XEROCLIENTID0000000000000000001"
        self.client_secret = "xero-client-secret-0123456789abcdef"
        self.authorize_url = f"{url}/identity/connect/authorize"
        self.token_url = f"{url}/connect/token"
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.tenants: dict[str, Tenant] = {}
            self._codes: dict[str, str] = {}  # code → redirect_uri
            self._access: dict[str, float] = {}  # token → expires at (monotonic-free: time)
            self._refresh: set[str] = set()
            self.token_grants: list[str] = []
            self.requests: list[XeroRequest] = []
            self.fault_fraction = 0.0
            self.fault_retry_after = 1
            self._random = random.Random(19)
            self.per_minute = 60
            self.per_day = 5000
            self.concurrent = 5
            self._in_flight = 0
            self.latency = 0.0
            self._expire_after: int | None = None
        self.add_tenant("Memberhub Association")

    # ------------------------------------------------------------ programming

    def add_tenant(self, name: str, *, base_currency: str = "GBP") -> Tenant:
        tenant = Tenant(tenant_id=str(uuid.uuid4()), name=name, base_currency=base_currency)
        with self._lock:
            self.tenants[tenant.tenant_id] = tenant
        return tenant

    @property
    def tenant(self) -> Tenant:
        """The first tenant (the only one unless more were added)."""
        return next(iter(self.tenants.values()))

    def add_account(
        self,
        code: str,
        name: str,
        account_type: str,
        *,
        tax_type: str = "NONE",
        payments: bool = False,
        tenant: Tenant | None = None,
    ) -> dict[str, Any]:
        account = {
            "AccountID": str(uuid.uuid4()),
            "Code": code,
            "Name": name,
            "Type": account_type,
            "TaxType": tax_type,
            "Status": "ACTIVE",
            "EnablePaymentsToAccount": payments,
            "Class": "REVENUE" if account_type == "REVENUE" else "ASSET",
        }
        with self._lock:
            (tenant or self.tenant).accounts[code] = account
        return account

    def add_tracking(self, name: str, *options: str, tenant: Tenant | None = None) -> None:
        with self._lock:
            (tenant or self.tenant).tracking[name] = list(options)

    def set_currencies(self, *codes: str, tenant: Tenant | None = None) -> None:
        with self._lock:
            (tenant or self.tenant).currencies = set(codes)

    def set_faults(self, fraction: float, *, seed: int = 19, retry_after: int = 1) -> None:
        """Answer `fraction` of API calls 500 or 429 (half each); the 429s ask for
        `retry_after` seconds."""
        with self._lock:
            self.fault_fraction = fraction
            self.fault_retry_after = retry_after
            self._random = random.Random(seed)

    def set_limits(self, *, per_minute: int = 60, per_day: int = 5000, concurrent: int = 5) -> None:
        with self._lock:
            self.per_minute, self.per_day, self.concurrent = per_minute, per_day, concurrent

    def expire_access_tokens_after(self, calls: int) -> None:
        """Expire every access token once `calls` more API calls were answered: the
        30 minutes run out in the middle of a run."""
        with self._lock:
            self._expire_after = calls

    def expire_access_tokens(self) -> None:
        """Every access token issued so far expires now, as 30 minutes later."""
        with self._lock:
            self._access = dict.fromkeys(self._access, 0.0)

    def issue_tokens(self) -> dict[str, Any]:
        """Tokens as after a completed authorization (for tests that skip the browser)."""
        with self._lock:
            return self._issue("offline_access accounting.transactions")

    # ------------------------------------------------------------ state, read by tests

    @property
    def contacts(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(list(self.tenant.contacts.values()))

    @property
    def invoices(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(list(self.tenant.invoices.values()))

    @property
    def credit_notes(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(list(self.tenant.credit_notes.values()))

    @property
    def bank_transfers(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(list(self.tenant.bank_transfers.values()))

    @property
    def bank_transactions(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(list(self.tenant.bank_transactions.values()))

    @property
    def payments(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(list(self.tenant.payments.values()))

    def count(self, method: str, path_prefix: str = "", status: int | None = None) -> int:
        with self._lock:
            return sum(
                1
                for r in self.requests
                if r.method == method
                and r.path.startswith(path_prefix)
                and (status is None or r.status == status)
            )

    def add_invoice(
        self,
        contact_id: str,
        *,
        reference: str,
        amount: Decimal,
        currency: str = "GBP",
        account_code: str = "200",
        issued: date | None = None,
    ) -> dict[str, Any]:
        """An invoice made in Xero by hand (not through the API)."""
        with self._lock:
            tenant = self.tenant
            return copy.deepcopy(
                self._store_document(
                    tenant,
                    "invoice",
                    {
                        "Type": "ACCREC",
                        "Contact": {"ContactID": contact_id},
                        "Reference": reference,
                        "CurrencyCode": currency,
                        "Date": (issued or datetime.now(UTC).date()).isoformat(),
                        "Status": "AUTHORISED",
                        "LineItems": [
                            {
                                "Description": "Membership",
                                "Quantity": 1,
                                "UnitAmount": str(amount),
                                "AccountCode": account_code,
                            }
                        ],
                    },
                )
            )

    def add_contact(
        self, name: str, *, number: str | None = None, email: str | None = None
    ) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(
                self._store_contact(
                    self.tenant, {"Name": name, "ContactNumber": number, "EmailAddress": email}
                )
            )

    def delete_payment(self, payment_id: str) -> None:
        """Delete a payment as a bookkeeper might: its invoice is owed again (a credit
        note's refund: its credit is left again)."""
        with self._lock:
            payment = self.tenant.payments.pop(payment_id)
            if payment["Invoice"]:
                document = self.tenant.invoices[payment["Invoice"]["InvoiceID"]]
                due_field = "AmountDue"
            else:
                document = self.tenant.credit_notes[payment["CreditNote"]["CreditNoteID"]]
                due_field = "RemainingCredit"
            amount = Decimal(str(payment["Amount"]))
            document["AmountPaid"] = float(Decimal(str(document["AmountPaid"])) - amount)
            document[due_field] = float(Decimal(str(document[due_field])) + amount)
            document["Payments"] = [p for p in document["Payments"] if p["PaymentID"] != payment_id]
            document["Status"] = "AUTHORISED"

    def add_credit_note(
        self,
        contact_id: str,
        *,
        reference: str,
        amount: Decimal,
        currency: str = "GBP",
        account_code: str = "200",
    ) -> dict[str, Any]:
        """A credit note made in Xero by hand (not through the API)."""
        with self._lock:
            return copy.deepcopy(
                self._store_document(
                    self.tenant,
                    "credit_note",
                    {
                        "Type": "ACCRECCREDIT",
                        "Contact": {"ContactID": contact_id},
                        "Reference": reference,
                        "CurrencyCode": currency,
                        "Date": datetime.now(UTC).date().isoformat(),
                        "Status": "AUTHORISED",
                        "LineItems": [
                            {
                                "Description": "Goodwill credit",
                                "Quantity": 1,
                                "UnitAmount": str(amount),
                                "AccountCode": account_code,
                            }
                        ],
                    },
                )
            )

    def set_credit_note_total(self, credit_note_id: str, total: Decimal) -> None:
        """Edit a credit note's amount as a bookkeeper might in Xero's screens."""
        with self._lock:
            note = self.tenant.credit_notes[credit_note_id]
            note["LineItems"][0]["UnitAmount"] = float(total)
            note["LineItems"][0]["LineAmount"] = float(total)
            paid = Decimal(str(note["AmountPaid"]))
            note["SubTotal"] = note["Total"] = float(total)
            note["RemainingCredit"] = float(max(total - paid, Decimal(0)))

    def set_transfer_amount(self, transfer_id: str, amount: Decimal) -> None:
        """Edit a bank transfer's amount as a bookkeeper might in Xero's screens."""
        with self._lock:
            self.tenant.bank_transfers[transfer_id]["Amount"] = float(amount)

    def delete_transfer(self, transfer_id: str) -> None:
        """Delete a bank transfer as a bookkeeper might in Xero's screens."""
        with self._lock:
            del self.tenant.bank_transfers[transfer_id]

    def set_invoice_total(self, invoice_id: str, total: Decimal) -> None:
        """Edit an invoice's amount as a bookkeeper might in Xero's screens."""
        with self._lock:
            invoice = self.tenant.invoices[invoice_id]
            invoice["LineItems"][0]["UnitAmount"] = float(total)
            invoice["LineItems"][0]["LineAmount"] = float(total)
            paid = Decimal(str(invoice["AmountPaid"]))
            invoice["SubTotal"] = invoice["Total"] = float(total)
            invoice["AmountDue"] = float(max(total - paid, Decimal(0)))

    # ------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        body = await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}
        path = request.url.path
        status: int = 500
        payload: Any = None
        extra: dict[str, str] = {}
        if self.latency:
            await asyncio.sleep(self.latency)
        try:
            if path == "/connect/token" and request.method == "POST":
                status, payload = 200, self._token(headers, body)
            elif path == "/identity/connect/authorize" and request.method == "GET":
                location = self._authorize(dict(request.query_params))
                status, extra = 302, {"location": location}
            elif path == "/connections" and request.method == "GET":
                self._bearer(headers)
                status, payload = 200, self._connections()
            elif path.startswith(API + "/"):
                status, payload, extra = await self._api(
                    request.method, path[len(API) :], dict(request.query_params), headers, body
                )
            else:
                raise XeroFault(404, {"Title": "Not Found", "Status": 404, "Detail": path})
        except XeroFault as fault:
            status, payload, extra = fault.status, fault.body, fault.headers
        with self._lock:
            self.requests.append(
                XeroRequest(request.method, path, status, headers, body.decode(errors="replace"))
            )
        content = b"" if payload is None else json.dumps(payload).encode()
        response = Response(
            content,
            status_code=status,
            headers=extra,
            media_type="application/json" if payload is not None else None,
        )
        await response(scope, receive, send)

    # ------------------------------------------------------------ identity

    def _issue(self, scope: str) -> dict[str, Any]:
        access = "xat_" + secrets.token_urlsafe(24)
        refresh = "xrt_" + secrets.token_urlsafe(24)
        self._access[access] = time.time() + ACCESS_TOKEN_SECONDS
        self._refresh.add(refresh)
        return {
            "id_token": "eyJ.fake.idtoken",
            "access_token": access,
            "expires_in": ACCESS_TOKEN_SECONDS,
            "token_type": "Bearer",
            "refresh_token": refresh,
            "scope": scope,
        }

    def _authorize(self, query: Mapping[str, str]) -> str:
        if query.get("client_id") != self.client_id or query.get("response_type") != "code":
            raise XeroFault(400, {"error": "unauthorized_client"})
        redirect = query.get("redirect_uri") or ""
        if "offline_access" not in (query.get("scope") or "").split():
            raise XeroFault(400, {"error": "invalid_scope"})
        code = secrets.token_urlsafe(16)
        with self._lock:
            self._codes[code] = redirect
        answer = {"code": code, "scope": query.get("scope", "")}
        if query.get("state"):
            answer["state"] = query["state"]
        return f"{redirect}?{urlencode(answer)}"

    def _token(self, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
        form = dict(parse_qsl(body.decode()))
        # Xero takes the client by HTTP Basic only ("authorization: Basic base64(id:secret)").
        authorization = headers.get("authorization", "")
        if not authorization.startswith("Basic "):
            raise XeroFault(400, {"error": "invalid_client"})
        decoded = base64.b64decode(authorization[6:]).decode()
        client_id, _, client_secret = decoded.partition(":")
        if client_id != self.client_id or client_secret != self.client_secret:
            raise XeroFault(400, {"error": "invalid_client"})
        grant = form.get("grant_type")
        with self._lock:
            self.token_grants.append(str(grant))
            if grant == "authorization_code":
                if self._codes.pop(form.get("code", ""), None) is None:
                    raise XeroFault(400, {"error": "invalid_grant"})
                return self._issue("offline_access accounting.transactions")
            if grant == "refresh_token":
                token = form.get("refresh_token", "")
                if token not in self._refresh:
                    raise XeroFault(400, {"error": "invalid_grant"})
                self._refresh.discard(token)  # rotated: spent by its use
                return self._issue("offline_access accounting.transactions")
        raise XeroFault(400, {"error": "unsupported_grant_type"})

    def _bearer(self, headers: Mapping[str, str]) -> None:
        authorization = headers.get("authorization", "")
        token = authorization[7:] if authorization.startswith("Bearer ") else ""
        with self._lock:
            expires = self._access.get(token)
        if expires is None or expires <= time.time():
            raise XeroFault(
                401,
                {
                    "Type": None,
                    "Title": "Unauthorized",
                    "Status": 401,
                    "Detail": "TokenExpired: token expired" if expires else "TokenInvalid",
                },
                {"www-authenticate": 'Bearer error="invalid_token"'},
            )

    def _connections(self) -> list[dict[str, Any]]:
        now = datetime.now(UTC).isoformat()
        with self._lock:
            return [
                {
                    "id": str(uuid.uuid5(uuid.NAMESPACE_URL, t.tenant_id)),
                    "authEventId": str(uuid.uuid4()),
                    "tenantId": t.tenant_id,
                    "tenantType": "ORGANISATION",
                    "tenantName": t.name,
                    "createdDateUtc": now,
                    "updatedDateUtc": now,
                }
                for t in self.tenants.values()
            ]

    # ------------------------------------------------------------ accounting API

    async def _api(
        self,
        method: str,
        path: str,
        query: dict[str, str],
        headers: Mapping[str, str],
        body: bytes,
    ) -> tuple[int, Any, dict[str, str]]:
        self._bearer(headers)
        with self._lock:
            if self._expire_after is not None:
                self._expire_after -= 1
                if self._expire_after <= 0:
                    self._expire_after = None
                    self._access = dict.fromkeys(self._access, 0.0)
            tenant = self.tenants.get(headers.get("xero-tenant-id", ""))
            if tenant is None:
                raise XeroFault(
                    403,
                    {
                        "Type": "AuthorizationUnsuccessful",
                        "Title": "Forbidden",
                        "Status": 403,
                        "Detail": "AuthenticationUnsuccessful",
                    },
                )
            limits = self._admit(tenant)
            fault = self._random.random() < self.fault_fraction
            fault_status = self._random.choice((500, 429)) if fault else 0
            self._in_flight += 1
        try:
            if fault_status == 429:
                raise XeroFault(
                    429,
                    {"Title": "Too Many Requests", "Status": 429},
                    {
                        **limits,
                        "retry-after": str(self.fault_retry_after),
                        "x-rate-limit-problem": "minute",
                    },
                )
            await asyncio.sleep(0)
            with self._lock:
                status, payload = self._route(tenant, method, path, query, headers, body)
            if fault_status == 500:
                # Done, and the answer lost on the way back.
                raise XeroFault(500, {"Title": "An error occurred", "Status": 500}, limits)
            return status, payload, limits
        finally:
            with self._lock:
                self._in_flight -= 1

    def _admit(self, tenant: Tenant) -> dict[str, str]:
        now = time.monotonic()
        while tenant.minute_calls and tenant.minute_calls[0] <= now - 60:
            tenant.minute_calls.popleft()
        if self._in_flight >= self.concurrent:
            raise XeroFault(
                429,
                {"Title": "Too Many Requests"},
                {"retry-after": "1", "x-rate-limit-problem": "concurrent"},
            )
        if tenant.day_calls >= self.per_day:
            raise XeroFault(
                429,
                {"Title": "Too Many Requests"},
                {"retry-after": "3600", "x-rate-limit-problem": "day"},
            )
        if len(tenant.minute_calls) >= self.per_minute:
            wait = max(1, int(tenant.minute_calls[0] + 60 - now) + 1)
            raise XeroFault(
                429,
                {"Title": "Too Many Requests"},
                {"retry-after": str(wait), "x-rate-limit-problem": "minute"},
            )
        tenant.minute_calls.append(now)
        tenant.day_calls += 1
        return {
            "x-daylimit-remaining": str(self.per_day - tenant.day_calls),
            "x-minlimit-remaining": str(self.per_minute - len(tenant.minute_calls)),
            "x-appminlimit-remaining": str(10000 - len(tenant.minute_calls)),
        }

    def _route(
        self,
        tenant: Tenant,
        method: str,
        path: str,
        query: dict[str, str],
        headers: Mapping[str, str],
        body: bytes,
    ) -> tuple[int, Any]:
        resource = path.strip("/").split("/")[0]
        if method == "GET":
            return 200, self._read(tenant, resource, query)
        if method in ("POST", "PUT") and resource in (
            "Contacts",
            "Invoices",
            "CreditNotes",
            "Payments",
            "BankTransfers",
            "BankTransactions",
        ):
            key = headers.get("idempotency-key")
            digest = hashlib.sha256(method.encode() + path.encode() + body).hexdigest()
            if key and key in tenant.saved:
                saved_digest, status, payload = tenant.saved[key]
                if saved_digest != digest:
                    raise XeroFault(
                        400,
                        {
                            "Title": "Idempotency key reused",
                            "Status": 400,
                            "Detail": "The Idempotency-Key was used with a different request.",
                        },
                    )
                return status, copy.deepcopy(payload)
            try:
                request_body = json.loads(body)
            except ValueError:
                raise XeroFault(400, {"Title": "Bad Request", "Detail": "Invalid JSON"}) from None
            items = request_body.get(resource) if isinstance(request_body, dict) else None
            if not isinstance(items, list) or not items:
                raise XeroFault(400, {"Title": "Bad Request", "Detail": f"No {resource} given"})
            created = [self._create(tenant, resource, item) for item in items]
            payload = {
                "Id": str(uuid.uuid4()),
                "Status": "OK",
                "ProviderName": "memberhub",
                "DateTimeUTC": _ms_date(datetime.now(UTC)),
                resource: created,
            }
            if key:
                tenant.saved[key] = (digest, 200, copy.deepcopy(payload))
            return 200, payload
        raise XeroFault(404, {"Title": "Not Found", "Status": 404})

    def _read(self, tenant: Tenant, resource: str, query: dict[str, str]) -> dict[str, Any]:
        rows: list[dict[str, Any]]
        if resource == "Accounts":
            rows = list(tenant.accounts.values())
        elif resource == "TrackingCategories":
            rows = [
                {
                    "TrackingCategoryID": str(uuid.uuid5(uuid.NAMESPACE_DNS, name)),
                    "Name": name,
                    "Status": "ACTIVE",
                    "Options": [
                        {"TrackingOptionID": str(uuid.uuid4()), "Name": o, "Status": "ACTIVE"}
                        for o in options
                    ],
                }
                for name, options in tenant.tracking.items()
            ]
        elif resource == "TaxRates":
            rows = list(tenant.tax_rates.values())
        elif resource == "Currencies":
            rows = [{"Code": c, "Description": c} for c in sorted(tenant.currencies)]
        elif resource == "Organisation":
            rows = [{"Name": tenant.name, "BaseCurrency": tenant.base_currency}]
            resource = "Organisations"
        elif resource == "Contacts":
            rows = list(tenant.contacts.values())
        elif resource == "Invoices":
            rows = list(tenant.invoices.values())
        elif resource == "CreditNotes":
            rows = list(tenant.credit_notes.values())
        elif resource == "Payments":
            rows = list(tenant.payments.values())
        elif resource == "BankTransfers":
            rows = list(tenant.bank_transfers.values())
        elif resource == "BankTransactions":
            rows = list(tenant.bank_transactions.values())
        else:
            raise XeroFault(404, {"Title": "Not Found", "Status": 404})
        if query.get("where"):
            rows = [row for row in rows if _where(query["where"], row)]
        if resource in ("Invoices", "CreditNotes", "Contacts", "Payments") and "page" in query:
            page = int(query["page"]) if query["page"].isdigit() else 1
            rows = rows[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
        return {
            "Id": str(uuid.uuid4()),
            "Status": "OK",
            "ProviderName": "memberhub",
            "DateTimeUTC": _ms_date(datetime.now(UTC)),
            resource: copy.deepcopy(rows),
        }

    # ------------------------------------------------------------ creates

    def _create(self, tenant: Tenant, resource: str, item: Any) -> dict[str, Any]:
        if not isinstance(item, dict):
            raise validation_error({}, "The item is not an object.")
        if resource == "Contacts":
            return self._store_contact(tenant, item)
        if resource == "Invoices":
            return self._store_document(tenant, "invoice", item)
        if resource == "CreditNotes":
            return self._store_document(tenant, "credit_note", item)
        if resource == "BankTransfers":
            return self._store_transfer(tenant, item)
        if resource == "BankTransactions":
            return self._store_bank_transaction(tenant, item)
        return self._store_payment(tenant, item)

    def _store_bank_transaction(self, tenant: Tenant, item: dict[str, Any]) -> dict[str, Any]:
        problems: list[str] = []
        if item.get("Type") not in ("SPEND", "RECEIVE"):
            problems.append("Type must be SPEND or RECEIVE")
        contact_id = (item.get("Contact") or {}).get("ContactID")
        if contact_id not in tenant.contacts:
            problems.append("A Contact must be specified for this type of transaction")
        bank = tenant.accounts.get((item.get("BankAccount") or {}).get("Code") or "")
        if bank is None or bank["Type"] != "BANK":
            problems.append("The BankAccount must be a bank account")
        currency = item.get("CurrencyCode") or tenant.base_currency
        if currency not in tenant.currencies:
            problems.append(f"Organisation is not subscribed to currency {currency}")
        total = Decimal(0)
        for line in item.get("LineItems") or []:
            if line.get("AccountCode") not in tenant.accounts:
                problems.append(
                    f"Account code '{line.get('AccountCode')}' is not a valid code for this "
                    "document."
                )
            total += _decimal(line.get("UnitAmount")) or Decimal(0)
        if problems:
            raise validation_error(item, *dict.fromkeys(problems))
        transaction_id = str(uuid.uuid4())
        transaction: dict[str, Any] = {
            "BankTransactionID": transaction_id,
            "Type": item["Type"],
            "Contact": {"ContactID": contact_id},
            "BankAccount": {"Code": item["BankAccount"]["Code"]},
            "Date": f"{(item.get('Date') or datetime.now(UTC).date().isoformat())[:10]}T00:00:00",
            "Reference": item.get("Reference"),
            "CurrencyCode": currency,
            "LineItems": item.get("LineItems") or [],
            "Total": float(total),
            "Status": "AUTHORISED",
        }
        tenant.bank_transactions[transaction_id] = transaction
        return transaction

    def _store_transfer(self, tenant: Tenant, item: dict[str, Any]) -> dict[str, Any]:
        problems: list[str] = []
        ends: list[dict[str, Any]] = []
        for side in ("FromBankAccount", "ToBankAccount"):
            code = (item.get(side) or {}).get("Code")
            account = tenant.accounts.get(code or "")
            if account is None or account["Type"] != "BANK":
                problems.append(f"{side} must be a bank account; '{code}' is not one.")
            else:
                ends.append(account)
        amount = _decimal(item.get("Amount"))
        if amount is None or amount <= 0:
            problems.append("Amount must be greater than zero")
        if problems:
            raise validation_error(item, *problems)
        transfer_id = str(uuid.uuid4())
        transfer: dict[str, Any] = {
            "BankTransferID": transfer_id,
            "FromBankAccount": {"AccountID": ends[0]["AccountID"], "Code": ends[0]["Code"]},
            "ToBankAccount": {"AccountID": ends[1]["AccountID"], "Code": ends[1]["Code"]},
            "Amount": float(amount or 0),
            "Date": f"{(item.get('Date') or datetime.now(UTC).date().isoformat())[:10]}T00:00:00",
            "Reference": item.get("Reference"),
            "CurrencyRate": 1.0,
        }
        tenant.bank_transfers[transfer_id] = transfer
        return transfer

    def _store_contact(self, tenant: Tenant, item: dict[str, Any]) -> dict[str, Any]:
        name = (item.get("Name") or "").strip()
        if not name:
            raise validation_error(item, "The contact name must be specified.")
        if any(c["Name"].lower() == name.lower() for c in tenant.contacts.values()):
            raise validation_error(
                item,
                f"The contact name {name} is already assigned to another contact. The contact "
                "name must be unique across all active contacts.",
            )
        contact_id = str(uuid.uuid4())
        contact: dict[str, Any] = {
            "ContactID": contact_id,
            "ContactNumber": item.get("ContactNumber"),
            "ContactStatus": "ACTIVE",
            "Name": name,
            "FirstName": item.get("FirstName"),
            "LastName": item.get("LastName"),
            "EmailAddress": item.get("EmailAddress"),
            "IsCustomer": True,
            "UpdatedDateUTC": _ms_date(datetime.now(UTC)),
        }
        tenant.contacts[contact_id] = contact
        return contact

    def _store_document(self, tenant: Tenant, kind: str, item: dict[str, Any]) -> dict[str, Any]:
        problems: list[str] = []
        expected = "ACCREC" if kind == "invoice" else "ACCRECCREDIT"
        if item.get("Type") != expected:
            problems.append(f"Type must be {expected}")
        contact_id = (item.get("Contact") or {}).get("ContactID")
        if contact_id not in tenant.contacts:
            problems.append("A Contact must be specified for this type of transaction")
        currency = item.get("CurrencyCode") or tenant.base_currency
        if currency not in tenant.currencies:
            problems.append(f"Organisation is not subscribed to currency {currency}")
        lines = item.get("LineItems") or []
        total = Decimal(0)
        for line in lines:
            code = line.get("AccountCode")
            if code not in tenant.accounts:
                problems.append(f"Account code '{code}' is not a valid code for this document.")
            tax_type = line.get("TaxType")
            rate = tenant.tax_rates.get(tax_type) if tax_type is not None else None
            if tax_type is not None and (
                rate is None or rate["Status"] != "ACTIVE" or not rate["CanApplyToRevenue"]
            ):
                problems.append(
                    f"The TaxType code '{tax_type}' does not exist or cannot be used with "
                    "this type of transaction."
                )
            for choice in line.get("Tracking") or []:
                if choice.get("Option") not in tenant.tracking.get(choice.get("Name"), []):
                    problems.append(f"The TrackingOption '{choice.get('Option')}' does not exist.")
            amount = _decimal(line.get("UnitAmount"))
            quantity = _decimal(line.get("Quantity", 1)) or Decimal(1)
            if amount is None:
                problems.append("The UnitAmount is not a number.")
            else:
                total += amount * quantity
        if not lines:
            problems.append("A document must have at least one line item.")
        if problems:
            raise validation_error(item, *dict.fromkeys(problems))
        issued = item.get("Date") or datetime.now(UTC).date().isoformat()
        number_field, id_field = (
            ("InvoiceNumber", "InvoiceID")
            if kind == "invoice"
            else ("CreditNoteNumber", "CreditNoteID")
        )
        store = tenant.invoices if kind == "invoice" else tenant.credit_notes
        prefix = "INV" if kind == "invoice" else "CN"
        document_id = str(uuid.uuid4())
        document: dict[str, Any] = {
            id_field: document_id,
            number_field: f"{prefix}-{len(store) + 1:04d}",
            "Type": expected,
            "Contact": {"ContactID": contact_id, "Name": tenant.contacts[str(contact_id)]["Name"]},
            "Reference": item.get("Reference"),
            "Date": f"{issued[:10]}T00:00:00",
            "DateString": f"{issued[:10]}T00:00:00",
            "DueDate": f"{(item.get('DueDate') or issued)[:10]}T00:00:00",
            "Status": item.get("Status") or "DRAFT",
            "LineAmountTypes": item.get("LineAmountTypes") or "Exclusive",
            "LineItems": [
                {
                    "LineItemID": str(uuid.uuid4()),
                    "Description": line.get("Description"),
                    "Quantity": float(_decimal(line.get("Quantity", 1)) or 1),
                    "UnitAmount": float(_decimal(line.get("UnitAmount")) or 0),
                    "AccountCode": line.get("AccountCode"),
                    "TaxType": line.get("TaxType")
                    or tenant.accounts[line["AccountCode"]]["TaxType"],
                    "Tracking": line.get("Tracking") or [],
                }
                for line in lines
            ],
            "CurrencyCode": currency,
            "SubTotal": float(total),
            "TotalTax": 0.0,
            "Total": float(total),
            "AmountPaid": 0.0,
            "AmountDue" if kind == "invoice" else "RemainingCredit": float(total),
            "Payments": [],
            "UpdatedDateUTC": _ms_date(datetime.now(UTC)),
        }
        store[document_id] = document
        return document

    def _store_payment(self, tenant: Tenant, item: dict[str, Any]) -> dict[str, Any]:
        problems: list[str] = []
        invoice_id = (item.get("Invoice") or {}).get("InvoiceID")
        note_id = (item.get("CreditNote") or {}).get("CreditNoteID")
        document = (
            tenant.invoices.get(invoice_id)
            if invoice_id
            else tenant.credit_notes.get(note_id or "")
        )
        due_field = "AmountDue" if invoice_id else "RemainingCredit"
        if document is None:
            problems.append("Invoice or credit note could not be found")
        code = (item.get("Account") or {}).get("Code")
        account = tenant.accounts.get(code or "")
        if account is None:
            problems.append("Account could not be found")
        elif account["Type"] != "BANK" and not account["EnablePaymentsToAccount"]:
            problems.append("Account type is invalid for making a payment to/from")
        amount = _decimal(item.get("Amount"))
        if amount is None or amount <= 0:
            problems.append("Payment amount must be greater than zero")
        if document is not None and document["Status"] != "AUTHORISED":
            problems.append("Payment can only be made against an authorised document")
        if (
            document is not None
            and amount is not None
            and amount > Decimal(str(document[due_field]))
        ):
            problems.append("Payment amount exceeds the amount outstanding on this document")
        if problems:
            raise validation_error(item, *dict.fromkeys(problems))
        assert document is not None
        assert amount is not None
        payment_id = str(uuid.uuid4())
        payment: dict[str, Any] = {
            "PaymentID": payment_id,
            "Date": f"{(item.get('Date') or datetime.now(UTC).date().isoformat())[:10]}T00:00:00",
            "Amount": float(amount),
            "Reference": item.get("Reference"),
            "CurrencyRate": 1.0,
            "PaymentType": "ACCRECPAYMENT" if invoice_id else "ARCREDITPAYMENT",
            "Status": "AUTHORISED",
            "Account": {"AccountID": account["AccountID"], "Code": code} if account else {},
            "Invoice": {"InvoiceID": invoice_id} if invoice_id else None,
            "CreditNote": {"CreditNoteID": note_id} if note_id else None,
        }
        tenant.payments[payment_id] = payment
        paid = Decimal(str(document["AmountPaid"])) + amount
        document["AmountPaid"] = float(paid)
        document[due_field] = float(Decimal(str(document["Total"])) - paid)
        document["Payments"].append({"PaymentID": payment_id, "Amount": float(amount)})
        if Decimal(str(document[due_field])) == 0:
            document["Status"] = "PAID"
        return payment


# ---------------------------------------------------------------- where clauses

_CONDITION = re.compile(
    r'\s*([A-Za-z.]+)\s*(==|>=|<=|<|>)\s*(?:"([^"]*)"|DateTime\((\d+),\s*(\d+),\s*(\d+)\))\s*'
)


def _field(row: Mapping[str, Any], name: str) -> Any:
    value: Any = row
    for part in name.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _where(clause: str, row: Mapping[str, Any]) -> bool:
    """The subset of Xero's where syntax the client uses: `A=="x" OR B=="y"`, and date
    ranges `Date>=DateTime(2026,01,01) AND Date<DateTime(2026,02,01)`."""
    any_of = re.split(r"\s+OR\s+", clause)
    for alternative in any_of:
        ok = True
        for condition in re.split(r"\s+AND\s+", alternative):
            match = _CONDITION.fullmatch(condition)
            if match is None:
                raise XeroFault(400, {"Title": "Bad Request", "Detail": f"Invalid where: {clause}"})
            name, op, text, year, month, day = match.groups()
            value = _field(row, name)
            if text is not None:
                ok &= op == "==" and str(value or "").lower() == text.lower()
                continue
            wanted = date(int(year), int(month), int(day))
            have = date.fromisoformat(str(value)[:10]) if value else None
            if have is None:
                ok = False
                continue
            ok &= {
                ">=": have >= wanted,
                "<=": have <= wanted,
                "<": have < wanted,
                ">": have > wanted,
                "==": have == wanted,
            }[op]
        if ok:
            return True
    return False


# ---------------------------------------------------------------- webhooks


def signed_webhook(payload: Mapping[str, Any] | bytes, key: str) -> tuple[bytes, dict[str, str]]:
    """The body and headers Xero posts: `x-xero-signature` is the base64 HMAC-SHA256 of the
    body under the webhook key."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signature = base64.b64encode(hmac.new(key.encode(), body, hashlib.sha256).digest()).decode()
    return body, {"x-xero-signature": signature, "content-type": "application/json"}


def intent_to_receive() -> dict[str, Any]:
    return {
        "events": [],
        "firstEventSequence": 0,
        "lastEventSequence": 0,
        "entropy": secrets.token_hex(10).upper(),
    }


@asynccontextmanager
async def running_fake_xero() -> AsyncIterator[FakeXero]:
    sock, base_url = bind_local_socket()
    fake = FakeXero(base_url)
    async with serving_in_thread(fake, sock, name="fake-xero", lifespan="off", graceful_shutdown=1):
        yield fake
