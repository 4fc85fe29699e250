"""Xero: the Accounting API (contacts, invoices, payments, credit notes) and its webhooks.

Xero connects by OAuth 2.0 (authorization code, `offline_access` for a refresh token that
rotates on every use; the hub stores each new one). One connection may reach several
organisations (tenants): `GET /connections` lists them and every Accounting API call names
one in the `xero-tenant-id` header, from the `tenant_id` credential the finance service
keeps. Every create is a POST with an `Idempotency-Key`, so a resent call returns what the
first created. A validation error (HTTP 400, `ValidationException`) is final and its
messages are Xero's own: `AccountingRejected`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Annotated, Any, ClassVar

import httpx
from pydantic import Field, StringConstraints

from memberhub.integrations import signatures
from memberhub.integrations.gateway import VENDOR_POLICIES, GatewayPolicy
from memberhub.integrations.providers.base import (
    AccountingRejected,
    BaseConfig,
    BaseCredentials,
    Capability,
    Connection,
    ConnectionFailed,
    InboundIdentity,
    InboundRequest,
    InvoiceLine,
    LedgerAccount,
    LedgerContact,
    LedgerDocument,
    LedgerTransfer,
    MoneyMovement,
    OAuthSettings,
    PaymentNotice,
    Provider,
    SaleDocument,
    TaxRate,
    TrackingCategory,
)
from memberhub.kit.money import minor_unit_digits
from memberhub.members.models import MEMBER_ID_PREFIX

API = "/api.xro/2.0"
Secret = Annotated[str, StringConstraints(strip_whitespace=True, min_length=8, max_length=500)]
TenantId = Annotated[str, StringConstraints(pattern=r"^[0-9A-Za-z-]{1,64}$")]
SIGNATURE = signatures.HmacScheme(header="x-xero-signature", encoding="base64")
# Xero's where-clause strings are double-quoted; these never appear in our ids or emails.
_UNQUOTABLE = frozenset('"\\')
MAX_EVENT_ID_CHARS = 255
# References one `where` asks for (its length stays well within what a URL may hold).
REFERENCES_PER_CALL = 25


class XeroConfig(BaseConfig):
    tenant_id: TenantId | None = Field(
        default=None,
        description="The Xero organisation to book into, from GET /connections; needed only "
        "when the connection reaches more than one.",
    )


class XeroCredentials(BaseCredentials):
    client_id: Secret | None = Field(default=None, description="The Xero app's client id.")
    client_secret: Secret | None = Field(default=None, description="The app's client secret.")
    webhook_key: Secret | None = Field(
        default=None, description="The webhooks signing key shown in the app's settings."
    )


def to_decimal(amount: int, currency: str) -> str:
    """Minor units as the decimal string Xero takes: 1500 GBP → "15.00"."""
    digits = minor_unit_digits(currency)
    return str(Decimal(amount).scaleb(-digits).quantize(Decimal(1).scaleb(-digits)))


def to_minor(value: Any, currency: str) -> int:
    """Xero's decimal amount (a JSON number) in minor units."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return 0
    try:
        return int(Decimal(str(value)).scaleb(minor_unit_digits(currency)).to_integral_value())
    except ArithmeticError:
        return 0


def xero_date(value: Any) -> date | None:
    """Xero's dates come as `/Date(1700000000000+0000)/` or ISO `2024-01-31T00:00:00`."""
    if not isinstance(value, str):
        return None
    if value.startswith("/Date("):
        digits = value[6:].split("+")[0].split("-")[0].rstrip(")/")
        try:
            return datetime.fromtimestamp(int(digits) / 1000, UTC).date()
        except ValueError:
            return None
    try:
        return date.fromisoformat(value[:10])
    except ValueError:
        return None


def error_message(response: httpx.Response) -> str:
    """Xero's validation messages, else its `Message`/`Detail`, else the start of the body."""
    try:
        body = response.json()
    except ValueError:
        return f"Xero answered {response.status_code}: {response.text[:200]}"
    messages: list[str] = []
    if isinstance(body, Mapping):
        for element in body.get("Elements") or []:
            for problem in (element or {}).get("ValidationErrors") or []:
                if isinstance(problem, Mapping) and problem.get("Message"):
                    messages.append(str(problem["Message"]))
        if not messages:
            for name in ("Message", "Detail", "Title"):
                if body.get(name):
                    messages.append(str(body[name]))
                    break
    return "; ".join(dict.fromkeys(messages)) or f"Xero answered {response.status_code}"


def _quoted(value: str) -> str:
    if _UNQUOTABLE & set(value):
        raise AccountingRejected(f"{value!r} cannot be searched for in Xero")
    return f'"{value}"'


class Xero(Provider):
    name = "xero"
    title = "Xero"
    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {Capability.ACCOUNTING, Capability.EVENTS_SOURCE}
    )
    config_model = XeroConfig
    credentials_model = XeroCredentials
    base_url = "https://api.xero.com"
    policy: ClassVar[GatewayPolicy] = VENDOR_POLICIES["xero"]
    oauth_defaults = OAuthSettings(
        authorize_url="https://login.xero.com/identity/connect/authorize",
        token_url="https://identity.xero.com/connect/token",
        scopes=[
            "offline_access",
            "accounting.transactions",
            "accounting.contacts",
            "accounting.settings.read",
        ],
    )
    token_client_auth = "basic"  # Xero's token endpoint takes the client by HTTP Basic

    def auth_headers(self, credentials: Mapping[str, Any]) -> dict[str, str]:
        headers = super().auth_headers(credentials)
        tenant = credentials.get("tenant_id")
        if tenant:
            headers["xero-tenant-id"] = str(tenant)
        return headers

    async def check_connection(self, connection: Connection) -> str:
        tenants = await self.tenants(connection)
        names = ", ".join(f"{name} ({tenant})" for tenant, name in tenants) or "none"
        return f"connected to Xero; organisations: {names}"

    # ------------------------------------------------------------ calls

    async def _get(
        self, connection: Connection, path: str, params: Mapping[str, str] | None = None
    ) -> Any:
        self._need_tenant(connection)
        response = await connection.gateway.request(
            "GET", f"{API}{path}", params=params, headers={"Accept": "application/json"}
        )
        if response.status_code != 200:
            raise ConnectionFailed(error_message(response))
        return response.json()

    async def _create(
        self, connection: Connection, path: str, body: Mapping[str, Any], key: str
    ) -> Any:
        self._need_tenant(connection)
        response = await connection.gateway.request(
            "POST",
            f"{API}{path}",
            json=body,
            headers={"Accept": "application/json"},
            idempotency_key=key,
        )
        if response.status_code == 400:
            raise AccountingRejected(error_message(response))
        if response.status_code != 200:
            raise ConnectionFailed(error_message(response))
        return response.json()

    @staticmethod
    def _need_tenant(connection: Connection) -> None:
        if not connection.credentials.get("tenant_id"):
            raise AccountingRejected(
                "No Xero organisation is chosen yet: save the accounting mapping (it picks "
                "the tenant from GET /connections)."
            )

    # ------------------------------------------------------------ accounting

    async def tenants(self, connection: Connection) -> list[tuple[str, str]]:
        response = await connection.gateway.request("GET", "/connections")
        if response.status_code != 200:
            raise ConnectionFailed(error_message(response))
        found = []
        for row in response.json() or []:
            if isinstance(row, Mapping) and row.get("tenantType", "ORGANISATION") == (
                "ORGANISATION"
            ):
                found.append((str(row.get("tenantId")), str(row.get("tenantName") or "")))
        return found

    async def accounts(self, connection: Connection) -> list[LedgerAccount]:
        body = await self._get(connection, "/Accounts")
        return [
            LedgerAccount(
                code=str(row.get("Code") or ""),
                name=str(row.get("Name") or ""),
                type=str(row.get("Type") or ""),
                status=str(row.get("Status") or "ACTIVE"),
                tax_type=row.get("TaxType"),
                takes_payments=row.get("Type") == "BANK"
                or bool(row.get("EnablePaymentsToAccount")),
            )
            for row in body.get("Accounts") or []
            if isinstance(row, Mapping)
        ]

    async def tax_rates(self, connection: Connection) -> list[TaxRate]:
        body = await self._get(connection, "/TaxRates")
        return [
            TaxRate(
                tax_type=str(row.get("TaxType") or ""),
                name=str(row.get("Name") or ""),
                status=str(row.get("Status") or "ACTIVE"),
                revenue=bool(row.get("CanApplyToRevenue", True)),
            )
            for row in body.get("TaxRates") or []
            if isinstance(row, Mapping)
        ]

    async def tracking_categories(self, connection: Connection) -> list[TrackingCategory]:
        body = await self._get(connection, "/TrackingCategories")
        return [
            TrackingCategory(
                name=str(row.get("Name") or ""),
                options=tuple(
                    str(option.get("Name") or "")
                    for option in row.get("Options") or []
                    if isinstance(option, Mapping)
                ),
            )
            for row in body.get("TrackingCategories") or []
            if isinstance(row, Mapping)
        ]

    async def find_or_create_contact(self, connection: Connection, contact: LedgerContact) -> str:
        where = f"ContactNumber=={_quoted(contact.key)}"
        if contact.email:
            where += f" OR EmailAddress=={_quoted(contact.email.lower())}"
        found = await self._get(connection, "/Contacts", {"where": where})
        rows = [
            row
            for row in found.get("Contacts") or []
            if isinstance(row, Mapping)
            # Not another member's (two members may share an address, in two
            # organisations say): theirs is made for them, with their own id.
            and not _another_members(row.get("ContactNumber"), contact.key)
        ]
        # Our id first: an email may have been shared by another contact before.
        rows.sort(key=lambda row: row.get("ContactNumber") != contact.key)
        if rows:
            return str(rows[0]["ContactID"])
        body = {
            "Contacts": [
                {
                    "Name": f"{contact.name} ({contact.key})"[:255],
                    "ContactNumber": contact.key,
                    "EmailAddress": contact.email,
                    "FirstName": contact.first_name,
                    "LastName": contact.last_name,
                    "IsCustomer": True,
                }
            ]
        }
        created = await self._create(
            connection, "/Contacts", body, f"memberhub-contact-{contact.key}"
        )
        return str(created["Contacts"][0]["ContactID"])

    def _document(self, document: SaleDocument, kind: str) -> dict[str, Any]:
        return {
            "Type": kind,
            "Contact": {"ContactID": document.contact_id},
            "Date": document.issued_on.isoformat(),
            "DueDate": document.issued_on.isoformat(),
            "Reference": document.reference,
            "CurrencyCode": document.currency,
            "Status": "AUTHORISED",
            "LineAmountTypes": "Inclusive",
            "LineItems": [
                {
                    "Description": line.description,
                    "Quantity": 1,
                    "UnitAmount": to_decimal(line.amount, document.currency),
                    "AccountCode": line.account_code,
                    **({"TaxType": line.tax_type} if line.tax_type else {}),
                    **(
                        {"Tracking": [{"Name": n, "Option": o} for n, o in line.tracking]}
                        if line.tracking
                        else {}
                    ),
                }
                for line in document.lines
            ],
        }

    async def create_invoice(self, connection: Connection, invoice: SaleDocument) -> str:
        body = {"Invoices": [self._document(invoice, "ACCREC")]}
        created = await self._create(connection, "/Invoices", body, invoice.idempotency_key)
        return str(_first_valid(created, "Invoices")["InvoiceID"])

    async def create_credit_note(self, connection: Connection, note: SaleDocument) -> str:
        body = {"CreditNotes": [self._document(note, "ACCRECCREDIT")]}
        created = await self._create(connection, "/CreditNotes", body, note.idempotency_key)
        return str(_first_valid(created, "CreditNotes")["CreditNoteID"])

    async def pay_invoice(self, connection: Connection, payment: MoneyMovement) -> str:
        return await self._payment(connection, payment, ("Invoice", "InvoiceID"))

    async def refund_credit_note(self, connection: Connection, refund: MoneyMovement) -> str:
        return await self._payment(connection, refund, ("CreditNote", "CreditNoteID"))

    async def _payment(
        self, connection: Connection, movement: MoneyMovement, target: tuple[str, str]
    ) -> str:
        name, id_field = target
        body = {
            "Payments": [
                {
                    name: {id_field: movement.document_id},
                    "Account": {"Code": movement.account_code},
                    "Date": movement.paid_on.isoformat(),
                    "Amount": to_decimal(movement.amount, movement.currency),
                    "Reference": movement.reference,
                }
            ]
        }
        created = await self._create(connection, "/Payments", body, movement.idempotency_key)
        return str(_first_valid(created, "Payments")["PaymentID"])

    async def transfer(self, connection: Connection, transfer: MoneyMovement) -> str:
        body = {
            "BankTransfers": [
                {
                    "FromBankAccount": {"Code": transfer.document_id},
                    "ToBankAccount": {"Code": transfer.account_code},
                    "Amount": to_decimal(transfer.amount, transfer.currency),
                    "Date": transfer.paid_on.isoformat(),
                    "Reference": transfer.reference,
                }
            ]
        }
        created = await self._create(connection, "/BankTransfers", body, transfer.idempotency_key)
        return str(_first_valid(created, "BankTransfers")["BankTransferID"])

    async def spend(
        self, connection: Connection, spending: MoneyMovement, *, contact_id: str, line: InvoiceLine
    ) -> str:
        body = {
            "BankTransactions": [
                {
                    "Type": "SPEND",
                    "Contact": {"ContactID": contact_id},
                    "BankAccount": {"Code": spending.document_id},
                    "Date": spending.paid_on.isoformat(),
                    "Reference": spending.reference,
                    "CurrencyCode": spending.currency,
                    "LineAmountTypes": "Inclusive",
                    "LineItems": [
                        {
                            "Description": line.description,
                            "Quantity": 1,
                            "UnitAmount": to_decimal(line.amount, spending.currency),
                            "AccountCode": line.account_code,
                            **({"TaxType": line.tax_type} if line.tax_type else {}),
                        }
                    ],
                }
            ]
        }
        created = await self._create(
            connection, "/BankTransactions", body, spending.idempotency_key
        )
        return str(_first_valid(created, "BankTransactions")["BankTransactionID"])

    async def documents(
        self, connection: Connection, *, since: date, until: date
    ) -> list[LedgerDocument]:
        where = _date_range(since, until)
        found: list[LedgerDocument] = []
        for path, key, kind in (
            ("/Invoices", "Invoices", "invoice"),
            ("/CreditNotes", "CreditNotes", "credit_note"),
        ):
            rows = await self._every_page(connection, path, key, where)
            found.extend(_ledger_document(row, kind) for row in rows)
        return found

    async def invoices_referencing(
        self, connection: Connection, references: Sequence[str]
    ) -> list[LedgerDocument]:
        found: list[LedgerDocument] = []
        wanted = [r for r in dict.fromkeys(references) if not _UNQUOTABLE & set(r)]
        for start in range(0, len(wanted), REFERENCES_PER_CALL):
            where = " OR ".join(
                f"Reference=={_quoted(r)}" for r in wanted[start : start + REFERENCES_PER_CALL]
            )
            rows = await self._every_page(connection, "/Invoices", "Invoices", where)
            found.extend(_ledger_document(row, "invoice") for row in rows)
        return found

    async def _every_page(
        self, connection: Connection, path: str, key: str, where: str
    ) -> list[Mapping[str, Any]]:
        """The rows of `path` that `where` keeps, page after page (Xero's pages hold 100)."""
        found: list[Mapping[str, Any]] = []
        page = 1
        while True:
            body = await self._get(connection, path, {"where": where, "page": str(page)})
            rows = [row for row in body.get(key) or [] if isinstance(row, Mapping)]
            found.extend(rows)
            if len(rows) < 100:
                return found
            page += 1

    async def transfers(
        self, connection: Connection, *, since: date, until: date
    ) -> list[LedgerTransfer]:
        # Bank transfers are not paged: one call answers every transfer the filter keeps.
        body = await self._get(connection, "/BankTransfers", {"where": _date_range(since, until)})
        return [
            _ledger_transfer(row)
            for row in body.get("BankTransfers") or []
            if isinstance(row, Mapping)
        ]

    async def record_payment(self, connection: Connection, notice: PaymentNotice) -> str:
        raise AccountingRejected(
            "Xero books payments through memberhub's finance flows, which need the "
            "integration's accounting mapping (PUT …/accounting-mapping)."
        )

    # ------------------------------------------------------------ webhooks

    def verify(
        self, request: InboundRequest, connection_secrets: Mapping[str, Any], config: BaseConfig
    ) -> None:
        key = connection_secrets.get("webhook_key")
        if not key:
            raise signatures.SignatureInvalid(
                signatures.NO_MATCHING_SIGNATURE,
                "the integration has no credentials.webhook_key to verify with",
            )
        signatures.verify_hmac(request.body, request.headers, key, SIGNATURE, now=request.now)

    def identify(self, request: InboundRequest) -> InboundIdentity:
        payload = json.loads(request.body)
        if not isinstance(payload, Mapping) or not isinstance(payload.get("events"), list):
            raise ValueError("the body is not a Xero webhook (events, entropy)")
        events = [e for e in payload["events"] if isinstance(e, Mapping)]
        if not events:
            event_type = "intent_to_receive"
        else:
            first = events[0]
            event_type = f"{first.get('eventCategory', '?')}.{first.get('eventType', '?')}"
        # Xero's sequence numbers and entropy identify one delivery; a redelivery repeats
        # the same bytes.
        event_id = "xero_" + hashlib.sha256(request.body).hexdigest()
        return InboundIdentity(event_id=event_id, event_type=event_type[:MAX_EVENT_ID_CHARS])

    # Xero's intent-to-receive check wants 200 or 401 with nothing in the body.
    bare_inbound_replies: ClassVar[bool] = True


def _first_valid(body: Any, key: str) -> Mapping[str, Any]:
    """The one object a create answered with; Xero may answer 200 with per-object errors
    (`summarizeErrors=false`), which are validation errors all the same."""
    rows = body.get(key) if isinstance(body, Mapping) else None
    if not rows or not isinstance(rows[0], Mapping):
        raise ConnectionFailed(f"Xero's answer has no {key}")
    row = rows[0]
    problems = [p.get("Message") for p in row.get("ValidationErrors") or [] if p.get("Message")]
    if problems or row.get("HasValidationErrors"):
        raise AccountingRejected("; ".join(problems) or "Xero refused it")
    return row


def _date_range(since: date, until: date) -> str:
    return (
        f"Date>=DateTime({since.year},{since.month:02d},{since.day:02d}) AND "
        f"Date<DateTime({until.year},{until.month:02d},{until.day:02d})"
    )


def _ledger_transfer(row: Mapping[str, Any]) -> LedgerTransfer:
    try:
        amount = Decimal(str(row.get("Amount")))
    except ArithmeticError:
        amount = Decimal(0)
    return LedgerTransfer(
        id=str(row.get("BankTransferID") or ""),
        from_account=(row.get("FromBankAccount") or {}).get("Code"),
        to_account=(row.get("ToBankAccount") or {}).get("Code"),
        amount=amount,
        reference=row.get("Reference"),
        transferred_on=xero_date(row.get("DateString") or row.get("Date")),
    )


def _ledger_document(row: Mapping[str, Any], kind: str) -> LedgerDocument:
    currency = str(row.get("CurrencyCode") or "")
    return LedgerDocument(
        id=str(row.get("InvoiceID") or row.get("CreditNoteID") or ""),
        kind="invoice" if kind == "invoice" else "credit_note",
        number=row.get("InvoiceNumber") or row.get("CreditNoteNumber"),
        reference=row.get("Reference"),
        contact_id=(row.get("Contact") or {}).get("ContactID"),
        status=str(row.get("Status") or ""),
        currency=currency,
        total=to_minor(row.get("Total"), currency),
        amount_paid=to_minor(row.get("AmountPaid"), currency),
        amount_due=to_minor(row.get("AmountDue") or row.get("RemainingCredit"), currency),
        issued_on=xero_date(row.get("DateString") or row.get("Date")),
        payments=tuple(
            str(p.get("PaymentID")) for p in row.get("Payments") or [] if isinstance(p, Mapping)
        ),
    )


def _another_members(number: Any, key: str) -> bool:
    """Whether a contact's ContactNumber is another member's id (not `key`, the member's
    own; a number of the organisation's own numbering is not a member's)."""
    return isinstance(number, str) and number.startswith(MEMBER_ID_PREFIX) and number != key
