"""What a provider is, and the capabilities the rest of memberhub asks of providers.

A provider is the plugin for one vendor (or one generic protocol). It declares the
capabilities it implements; code outside this package asks for a capability
(`provider_with(name, Payments)`) and never imports a vendor module.
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

import httpx
from pydantic import Field, field_validator

from memberhub.integrations.gateway import DEFAULT_POLICY, GatewayPolicy
from memberhub.kit.limits import parse_rate_limit
from memberhub.kit.types import Input

if TYPE_CHECKING:
    from memberhub.integrations.gateway import Gateway
    from memberhub.webhooks.ssrf import UrlPolicy


class Capability(StrEnum):
    CRM = "crm"
    MARKETING_LIST = "marketing_list"
    ANALYTICS_SINK = "analytics_sink"
    PAYMENTS = "payments"
    ACCOUNTING = "accounting"
    EVENTS_SOURCE = "events_source"
    NOTIFIER = "notifier"
    ORDERS = "orders"
    MESSAGES = "messages"  # notifications to members and staff: email, SMS, push
    STORAGE = "storage"  # object storage that exports and backups are written to
    SEARCH_INDEX = "search_index"  # a hosted search index kept in step with our records


class OAuthSettings(Input):
    """Where a provider's OAuth 2.0 authorization server is; defaults come from the provider."""

    authorize_url: str | None = Field(default=None, max_length=2048)
    token_url: str | None = Field(default=None, max_length=2048)
    scopes: list[str] = Field(default_factory=list, max_length=50)


class BaseConfig(Input):
    """Settings every integration has; providers extend it."""

    base_url: str | None = Field(
        default=None,
        max_length=2048,
        description="Where the vendor's API is: a sandbox or another host. Default: the "
        "provider's production URL (its sandbox URL when `sandbox` is true).",
    )
    sandbox: bool = Field(default=False, description="Use the vendor's sandbox URL.")
    inbound_allowed_ips: list[str] = Field(
        default_factory=list,
        max_length=100,
        description="Addresses or CIDRs inbound webhooks must come from; empty accepts any source.",
    )
    oauth: OAuthSettings | None = None
    rate_limit: str | None = Field(
        default=None,
        max_length=100,
        description='The client-side request limit in `limits` notation ("190/10 seconds", '
        '"100 per second"), for accounts whose plan allows more than the vendor\'s published '
        "default. Default: the provider's.",
    )

    @field_validator("rate_limit")
    @classmethod
    def _rate_limit(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            parse_rate_limit(value)
        except ValueError:
            raise ValueError(
                f"{value!r} is not a rate limit of at least one request, such as '100/10 seconds'"
            ) from None
        return value

    @field_validator("inbound_allowed_ips")
    @classmethod
    def _networks(cls, entries: list[str]) -> list[str]:
        networks = []
        for entry in entries:
            try:
                networks.append(str(ipaddress.ip_network(entry.strip(), strict=False)))
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or CIDR") from None
        return networks


class BaseCredentials(Input):
    """Secrets every integration has (none); providers extend it."""


@dataclass(frozen=True)
class InboundRequest:
    """A webhook as it reached `POST /api/v1/inbound/{id}`: the exact bytes and headers."""

    method: str
    url: str
    headers: Mapping[str, str]
    body: bytes
    now: float  # Unix seconds


@dataclass(frozen=True)
class InboundIdentity:
    event_id: str
    event_type: str


@dataclass(frozen=True)
class Connection:
    """An integration as a provider sees it: its settings, credentials and HTTP client."""

    integration_id: str
    config: BaseConfig
    credentials: Mapping[str, Any]
    gateway: Gateway
    # Where a provider that connects without the gateway's HTTP client (SMTP) may connect;
    # None: nowhere that is not globally routable.
    url_policy: UrlPolicy | None = None


class ConnectionFailed(Exception):
    """The vendor refused or could not answer a connection check."""


class Provider:
    """Base class of providers. Subclasses set the class attributes and implement the
    methods of the capabilities they declare."""

    name: ClassVar[str]
    title: ClassVar[str]
    capabilities: ClassVar[frozenset[Capability]] = frozenset()
    config_model: ClassVar[type[BaseConfig]] = BaseConfig
    credentials_model: ClassVar[type[BaseCredentials]] = BaseCredentials
    base_url: ClassVar[str | None] = None
    sandbox_url: ClassVar[str | None] = None
    policy: ClassVar[GatewayPolicy] = DEFAULT_POLICY
    oauth_defaults: ClassVar[OAuthSettings | None] = None
    # How the client authenticates at the OAuth token endpoint: its id and secret in the
    # form, or by HTTP Basic (RFC 6749 §2.3.1), which some authorization servers require.
    token_client_auth: ClassVar[Literal["form", "basic"]] = "form"

    def resolve_base_url(self, config: BaseConfig) -> str | None:
        if config.base_url:
            return config.base_url
        if config.sandbox and self.sandbox_url:
            return self.sandbox_url
        return self.base_url

    def base_url_for(self, config: BaseConfig, credentials: Mapping[str, Any]) -> str | None:
        """Where the integration's calls go; vendors whose host depends on the account
        (Mailchimp's data centre, named by the API key) read it from the credentials."""
        return self.resolve_base_url(config)

    def oauth_settings(self, config: BaseConfig) -> OAuthSettings | None:
        """The provider's OAuth endpoints, overridden field by field by `config.oauth`."""
        defaults = self.oauth_defaults
        if config.oauth is None:
            return defaults
        if defaults is None:
            return config.oauth
        return OAuthSettings(
            authorize_url=config.oauth.authorize_url or defaults.authorize_url,
            token_url=config.oauth.token_url or defaults.token_url,
            scopes=config.oauth.scopes or defaults.scopes,
        )

    def auth_headers(self, credentials: Mapping[str, Any]) -> dict[str, str]:
        """Headers that authenticate a call; an OAuth access token when there is one."""
        token = credentials.get("access_token") or credentials.get("api_key")
        return {"Authorization": f"Bearer {token}"} if token else {}

    def request_auth_headers(
        self, credentials: Mapping[str, Any], request: httpx.Request
    ) -> dict[str, str]:
        """The headers that authenticate this request: `auth_headers`, unless a provider
        whose APIs take different credentials looks at where the request goes."""
        return self.auth_headers(credentials)

    async def check_connection(self, connection: Connection) -> str:
        """Make one cheap authenticated call; return what it showed, raise ConnectionFailed."""
        raise NotImplementedError

    def validate(self, config: BaseConfig, credentials: BaseCredentials) -> None:
        """Check the settings together; raise ValueError with a message for the caller."""

    def outbound_urls(self, config: BaseConfig) -> dict[str, str]:
        """URLs the provider calls besides `base_url` and the OAuth token URL (a login or
        second API host) that the integration's settings changed from the vendor's own, by
        the config field naming them: checked against the outbound URL policy when the
        integration is saved, as those are."""
        return {}

    def outbound_hosts(self, config: BaseConfig) -> dict[str, tuple[str, int]]:
        """Hosts the provider connects to that are not URLs (an SMTP server), by the config
        field naming them, with their port: checked against the outbound URL policy when
        the integration is saved, as URLs are."""
        return {}


# ---------------------------------------------------------------- capabilities


@runtime_checkable
class EventsSource(Protocol):
    """Sends us webhooks: how to verify them and what identifies each one."""

    def verify(
        self, request: InboundRequest, connection_secrets: Mapping[str, Any], config: BaseConfig
    ) -> None:
        """Raise SignatureInvalid unless the request is authentic and fresh."""

    def identify(self, request: InboundRequest) -> InboundIdentity:
        """The provider's id and type of the event; ValueError if it has none."""


@dataclass(frozen=True)
class PaymentNotice:
    """A payment provider's event, in memberhub's terms."""

    # "linked": more ids of a payment already noticed (Stripe's invoice payment naming the
    # payment intent that paid an invoice).
    kind: Literal["paid", "failed", "subscription_ended", "refunded", "linked"]
    # Every id the provider knows this payment by (invoice, payment intent, charge, …).
    references: tuple[str, ...]
    member_id: str | None = None
    email: str | None = None
    customer_id: str | None = None
    plan: str | None = None  # a plan id or code, from the payment's metadata
    price_ids: tuple[str, ...] = ()
    amount: int = 0  # minor units
    currency: str | None = None
    amount_refunded: int = 0
    occurred_at: datetime | None = None
    # The end of the latest subscription period the payment is for (an invoice's lines),
    # when the provider says: a failure of one for time already paid for is an older event.
    period_end: datetime | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckoutRequest:
    customer_id: str
    member_id: str
    plan_id: str
    plan_name: str
    amount: int
    currency: str
    term_months: int
    success_url: str
    cancel_url: str | None
    price_id: str | None
    idempotency_key: str


@dataclass(frozen=True)
class CheckoutResult:
    id: str
    url: str
    mode: str


@runtime_checkable
class Payments(Protocol):
    """Takes payments: customers and hosted checkouts out, payment events in."""

    def interpret(self, event_type: str, payload: Mapping[str, Any]) -> PaymentNotice | None:
        """The payment meaning of an inbound event; None for events without one."""

    async def create_customer(
        self, connection: Connection, *, member_id: str, email: str | None, name: str | None
    ) -> str:
        """Create the vendor's customer for a member; return its id."""

    async def create_checkout(
        self, connection: Connection, request: CheckoutRequest
    ) -> CheckoutResult:
        """Start a hosted checkout for a plan."""


@dataclass(frozen=True)
class OrderItem:
    sku: str | None
    name: str | None
    quantity: int
    amount: int | None  # the line's total, minor units


@dataclass(frozen=True)
class OrderNotice:
    """A shop's order event, in memberhub's terms: an order paid, or a refund of one."""

    kind: Literal["paid", "refunded"]
    order_id: str
    currency: str
    amount: int  # minor units: the order's total when paid, the money returned when refunded
    refund_id: str | None = None
    # A paid order's total in the currency the customer paid in, when not `currency` (a
    # shop selling in several): refunds come in that currency.
    paid_amount: int | None = None
    paid_currency: str | None = None
    email: str | None = None
    customer_id: str | None = None
    items: tuple[OrderItem, ...] = ()
    occurred_at: datetime | None = None


@runtime_checkable
class Orders(Protocol):
    """A shop: its paid orders become activities, its refunds take back what they earned."""

    def interpret_order(self, event_type: str, payload: Mapping[str, Any]) -> OrderNotice | None:
        """The order meaning of an inbound event; None for events without one. ValueError
        when the event should carry an order but its body is not one."""


@dataclass(frozen=True)
class ContactRecord:
    """A member or lead as a CRM, marketing list or analytics sink receives it."""

    key: str  # our id
    email: str | None
    properties: Mapping[str, Any]  # the vendor's property names and the values to write
    external_id: str | None = None  # the vendor's id, once known
    # Known not to be in the CRM (its complete listing has no such email): create it
    # without searching first.
    absent: bool = False
    # The addresses the CRM's record holds, its primary first, when a listing just read
    # them (a CRM keeping several per record needs them to change one without the others).
    crm_emails: tuple[str, ...] | None = None


@dataclass(frozen=True)
class WriteResult:
    key: str
    external_id: str | None
    error: str | None = None
    created: bool = False


@dataclass(frozen=True)
class RemoteRecord:
    """A record as read from a CRM: its id, email, mapped properties and when it changed."""

    external_id: str
    email: str | None
    properties: Mapping[str, Any]
    modified_at: datetime | None
    # Every address the record holds, where the CRM keeps several (Pipedrive): a member
    # whose email is any of them is this record. Empty: only `email`.
    other_emails: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChangesPage:
    records: list[RemoteRecord]
    # Where the next page starts (a vendor page token); None when this was the last page.
    next_page: str | None


@runtime_checkable
class CRM(Protocol):
    """Keeps contacts in a CRM in step with members and leads.

    `object_name` is the CRM object records go to (HubSpot `contacts`, Salesforce `Contact`
    or `Lead`, Pipedrive `persons`). Writes are idempotent: a record with an
    `external_id` updates that record; one without is matched by the vendor's key (email,
    or our id as an external id field) before anything is created, so a retried write never
    creates a second record.
    """

    batch_size: int
    concurrency: int
    # The consent purpose a member must have agreed to for a push (`members/consent.py`).
    consent_purpose: str

    async def upsert_contacts(
        self, connection: Connection, object_name: str, records: Sequence[ContactRecord]
    ) -> list[WriteResult]:
        """Write one batch (at most `batch_size`); one result per record, in order. Raise
        (GatewayError, CircuitOpen, CrmError) only when the batch as a whole failed."""

    async def changed_contacts(
        self,
        connection: Connection,
        object_name: str,
        *,
        since: datetime | None,
        page: str | None,
        properties: Sequence[str],
    ) -> ChangesPage:
        """Records changed at or after `since` (all when None), oldest change first."""

    def default_objects(self) -> Mapping[str, str]:
        """The CRM object members and leads go to by default: {"members": …, "leads": …}."""


@runtime_checkable
class CrmWebhooks(Protocol):
    """A CRM that tells us of changes by webhook (through the inbound endpoint)."""

    def webhook_changes(self, event_type: str, payload: Any) -> list[tuple[str, RemoteRecord]]:
        """The changes an inbound event carries, as (CRM object, partial record) pairs:
        only the properties the event names."""


def aware_time(value: Any) -> datetime | None:
    """An ISO 8601 time; one without a zone is taken as UTC."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class CrmError(Exception):
    """A CRM refused a request as a whole (bad settings, unknown field): the message says why."""


class CrmRefusedEverything(CrmError):
    """A refusal that is about no record in the request (the API's request limit is spent,
    the credentials are refused): a smaller request would be refused alike, so a batch is
    not split to find the records at fault."""


def refuses_everything(status_code: int) -> bool:
    """Whether a CRM's HTTP status refuses whatever the request holds."""
    return status_code in (401, 403)


@dataclass(frozen=True)
class AudienceMember:
    """A member as a marketing list holds them: subscribed only with email-marketing
    consent, unsubscribed once it is withdrawn."""

    key: str  # our member id
    email: str
    status: Literal["subscribed", "unsubscribed"]
    merge_fields: Mapping[str, Any]
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class AudienceChange:
    """What a marketing list's webhook reports about one address."""

    kind: Literal["unsubscribed", "cleaned", "profile", "email_changed"]
    email: str
    new_email: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    reason: str | None = None


class MarketingListError(Exception):
    """A marketing list refused a request as a whole (unknown audience, a contact not on
    it): the message is the vendor's own words."""


class SegmentMissing(MarketingListError):
    """The segment is gone from the list (deleted in the vendor's own app)."""


@runtime_checkable
class MarketingList(Protocol):
    """An audience that members subscribe to, honouring their email-marketing consent;
    static segments of it; and journeys started for one contact.

    `batch_size` members go in one write and `segment_batch_size` addresses in one segment
    change; at most `concurrency` calls may be in flight at once.
    """

    batch_size: int
    segment_batch_size: int
    concurrency: int

    async def write_members(
        self, connection: Connection, list_id: str, members: Sequence[AudienceMember]
    ) -> list[WriteResult]:
        """Create or update one batch (at most `batch_size`), status, fields and tags;
        one result per member, in order. Raise only when the batch as a whole failed."""

    async def create_static_segment(self, connection: Connection, list_id: str, name: str) -> str:
        """Create an empty static segment; return its id."""

    async def change_segment(
        self,
        connection: Connection,
        list_id: str,
        segment_id: str,
        *,
        add: Sequence[str],
        remove: Sequence[str],
    ) -> None:
        """Add and remove addresses (each at most `segment_batch_size`)."""

    async def trigger_journey(
        self, connection: Connection, journey_id: str, step_id: str, email: str
    ) -> None:
        """Start the journey's API-triggered step for one subscribed contact."""

    def audience_changes(self, event_type: str, body: bytes) -> list[AudienceChange]:
        """The changes an inbound webhook of the list reports; [] for other events."""


@dataclass(frozen=True)
class SinkEvent:
    """One of our events as an analytics sink receives it, about one member who consents
    to the sink's purpose."""

    id: str  # our event id (evt_…): the vendor's deduplication key where it has one
    type: str  # our event type
    name: str  # the vendor's event name, from the sink's mapping
    member_id: str
    occurred_at: datetime
    properties: Mapping[str, Any]  # what the event says: points, tier, status, …
    traits: Mapping[str, Any]  # the member as now: tier, status, points balance
    consent: Mapping[str, bool]  # the member's consent by purpose
    client_id: str | None = None  # the member's analytics client id, when we know it
    identify: bool = False  # the member's traits changed: send them along


@dataclass(frozen=True)
class SinkRequest:
    """One request a sink would send: its events and the exact JSON body."""

    events: tuple[SinkEvent, ...]
    body: Mapping[str, Any]
    path: str
    # The body already encoded, when planning it measured the encoding anyway.
    content: bytes | None = None


class SinkRefused(Exception):
    """The vendor refused a request for a reason sending it again cannot change (a 400):
    the message is the vendor's own words."""


class SinkUnavailable(Exception):
    """The vendor did not take a request for a reason that may pass (credentials refused,
    an unexpected answer): nothing is dropped, the request is tried again later."""


@runtime_checkable
class AnalyticsSink(Protocol):
    """Receives memberhub's events, batched in the vendor's own requests.

    `consent_purpose` is what a member must have agreed to (`members/consent.py`) for
    anything about them to be sent. `plan_requests` packs events into requests within the
    vendor's limits, in their order (events it can never send come back with a reason);
    `send` sends one request and raises `SinkRefused` (resending cannot help: its events
    are dropped and logged), `SinkUnavailable`, `GatewayError` or `CircuitOpen` (it may,
    later). `request_deletion` asks the vendor to
    delete what it holds about a member: False when the vendor has no API for it (or it is
    not configured); it raises `SinkRefused` when the vendor refuses the request itself (it
    is logged and the sink goes on), the others as `send` does.
    """

    consent_purpose: str

    def default_mapping(self) -> Mapping[str, str]: ...

    def mapping_errors(self, mapping: Mapping[str, str]) -> list[str]:
        """Why the vendor would not take these event names; empty when it would."""

    def plan_requests(
        self, config: BaseConfig, events: Sequence[SinkEvent]
    ) -> tuple[list[SinkRequest], list[tuple[SinkEvent, str]]]: ...

    async def send(self, connection: Connection, request: SinkRequest) -> None: ...

    async def request_deletion(self, connection: Connection, member_id: str) -> bool: ...


class AccountingRejected(Exception):
    """The accounting system refused a write for a reason resending cannot change (a
    validation error: unknown account, a currency the organisation does not take). The
    message is the vendor's own words."""


@dataclass(frozen=True)
class LedgerAccount:
    code: str
    name: str
    type: str  # the vendor's account type: REVENUE, BANK, EXPENSE, …
    status: str = "ACTIVE"
    tax_type: str | None = None
    takes_payments: bool = False  # a bank account, or one enabled for payments


@dataclass(frozen=True)
class TaxRate:
    tax_type: str
    name: str
    status: str = "ACTIVE"
    revenue: bool = True  # may be applied to sales


@dataclass(frozen=True)
class TrackingCategory:
    name: str
    options: tuple[str, ...]


@dataclass(frozen=True)
class LedgerContact:
    """A member as the accounting system's customer: found by `key` (our member id, the
    vendor's contact number) or email before one is created."""

    key: str
    name: str
    email: str | None
    first_name: str | None = None
    last_name: str | None = None


@dataclass(frozen=True)
class InvoiceLine:
    description: str
    amount: int  # minor units, tax included
    account_code: str
    tax_type: str | None = None
    tracking: tuple[tuple[str, str], ...] = ()  # (category, option)


@dataclass(frozen=True)
class SaleDocument:
    """A sales invoice, or a credit note against one. `reference` is the payment's id at
    the payment provider; `idempotency_key` makes a resent create return the first."""

    reference: str
    contact_id: str
    currency: str
    issued_on: date
    lines: tuple[InvoiceLine, ...]
    idempotency_key: str


@dataclass(frozen=True)
class MoneyMovement:
    """Money in (a payment of an invoice) or out (a refund of a credit note)."""

    document_id: str
    account_code: str
    amount: int  # minor units
    currency: str
    paid_on: date
    reference: str
    idempotency_key: str


@dataclass(frozen=True)
class LedgerDocument:
    """An invoice or credit note as read back: enough to reconcile it."""

    id: str
    kind: Literal["invoice", "credit_note"]
    number: str | None
    reference: str | None
    contact_id: str | None
    status: str
    currency: str
    total: int  # minor units
    amount_paid: int
    amount_due: int
    issued_on: date | None
    payments: tuple[str, ...] = ()


@dataclass(frozen=True)
class LedgerTransfer:
    """A transfer between two bank accounts as read back (a payout booked to the bank).
    The amount is the vendor's decimal: a transfer names no currency of its own."""

    id: str
    from_account: str | None
    to_account: str | None
    amount: Decimal
    reference: str | None
    transferred_on: date | None


@runtime_checkable
class Accounting(Protocol):
    """Books payments and refunds as invoices, payments and credit notes.

    Writes carry an idempotency key: a write resent after a failure or a crash returns what
    the first made. A refusal that resending cannot change raises AccountingRejected with
    the vendor's message; GatewayError and CircuitOpen propagate for the caller's retries.
    """

    async def record_payment(self, connection: Connection, notice: PaymentNotice) -> str:
        """Book a notice with the provider's defaults, for callers without a mapping;
        return the vendor's id of what was booked."""

    async def tenants(self, connection: Connection) -> list[tuple[str, str]]:
        """The organisations the connection may act for, as (id, name): one is chosen and
        kept as the `tenant_id` credential."""

    async def accounts(self, connection: Connection) -> list[LedgerAccount]:
        """The chart of accounts."""

    async def tracking_categories(self, connection: Connection) -> list[TrackingCategory]: ...

    async def tax_rates(self, connection: Connection) -> list[TaxRate]:
        """The organisation's tax rates (the tax types a sale's line may name)."""

    async def find_or_create_contact(self, connection: Connection, contact: LedgerContact) -> str:
        """The vendor's id of the member's contact, created only when none matches."""

    async def create_invoice(self, connection: Connection, invoice: SaleDocument) -> str: ...

    async def create_credit_note(self, connection: Connection, note: SaleDocument) -> str: ...

    async def pay_invoice(self, connection: Connection, payment: MoneyMovement) -> str: ...

    async def refund_credit_note(self, connection: Connection, refund: MoneyMovement) -> str: ...

    async def transfer(self, connection: Connection, transfer: MoneyMovement) -> str:
        """Move money between two bank accounts (`document_id` is the account it leaves,
        `account_code` the one it reaches): a payout from the payment provider's clearing
        account to the bank."""

    async def spend(
        self, connection: Connection, spending: MoneyMovement, *, contact_id: str, line: InvoiceLine
    ) -> str:
        """Money spent from a bank account (`document_id` is its code) on `line`'s expense
        account: a payment provider's fees, taken from the clearing account."""

    async def documents(
        self, connection: Connection, *, since: date, until: date
    ) -> list[LedgerDocument]:
        """Invoices and credit notes issued from `since` up to, not including, `until`."""

    async def invoices_referencing(
        self, connection: Connection, references: Sequence[str]
    ) -> list[LedgerDocument]:
        """The invoices whose reference is one of `references`, whenever issued."""

    async def transfers(
        self, connection: Connection, *, since: date, until: date
    ) -> list[LedgerTransfer]:
        """Transfers between bank accounts dated from `since` up to, not including,
        `until`."""


@dataclass(frozen=True)
class MoneyRecord:
    """A charge, refund or payout at a payment provider, as a reconciliation reads it."""

    id: str
    kind: Literal["charge", "refund", "payout"]
    amount: int  # minor units
    currency: str
    created_at: datetime
    status: str
    references: tuple[str, ...] = ()  # the other ids of the same payment
    member_id: str | None = None
    fee: int = 0
    arrives_at: datetime | None = None  # a payout's arrival at the bank


@dataclass(frozen=True)
class PayoutNotice:
    """A payment provider paid money out to the account holder's bank."""

    payout_id: str
    amount: int  # minor units
    currency: str
    occurred_at: datetime | None = None


@runtime_checkable
class PayoutsSource(Protocol):
    """A payment provider whose events tell of payouts to the bank."""

    def interpret_payout(self, event_type: str, payload: Mapping[str, Any]) -> PayoutNotice | None:
        """The payout an inbound event reports; None for events of anything else."""


@runtime_checkable
class PaymentsReport(Protocol):
    """A payment provider that lists its money movements for a period."""

    async def money_movements(
        self, connection: Connection, *, since: datetime, until: datetime
    ) -> list[MoneyRecord]: ...

    async def payout_fees(self, connection: Connection, payout_id: str) -> int:
        """The provider's fees (minor units) on the money a payout paid out."""

    async def payout_net(self, connection: Connection, payout_id: str) -> int | None:
        """What the money a payout paid out comes to (minor units): its charges less
        refunds and fees, the payout itself left out; None when the provider cannot say
        (a payout made by hand)."""


@runtime_checkable
class Notifier(Protocol):
    """Sends a message to people (email, SMS, chat)."""

    async def notify(
        self, connection: Connection, recipient: str, subject: str, body: str
    ) -> None: ...


@dataclass(frozen=True)
class OutgoingMessage:
    """One rendered notification for one recipient on one channel.

    `reference` is memberhub's notification id: providers that accept an idempotency key
    or custom arguments send it, so a retried send is recognisable at the vendor and in
    its delivery reports.
    """

    channel: Literal["email", "sms", "push"]
    to: str  # an email address, an E.164 phone number or a device token
    reference: str
    text: str  # the plain-text body (email's text part, the SMS, the push body)
    subject: str | None = None  # email subject, push title
    html: str | None = None  # email only
    sender: str | None = None  # overrides the integration's default from address/number
    headers: Mapping[str, str] = field(default_factory=dict)  # email: List-Unsubscribe, …
    data: Mapping[str, str] = field(default_factory=dict)  # push: the data payload


@dataclass(frozen=True)
class SendResult:
    provider_message_id: str | None


class SendRejected(Exception):
    """The provider refused a message. `permanent` says whether resending can ever work
    (4xx other than 408/429: bad address, unverified sender, invalid token); the message is
    the provider's own words. `recipient_gone`: the provider says the recipient no longer
    exists (a push token of an app uninstalled), so nothing should be sent to it again."""

    def __init__(self, message: str, *, permanent: bool, recipient_gone: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.recipient_gone = recipient_gone


@dataclass(frozen=True)
class DeliveryReport:
    """What a provider's status callback says about one message it was given."""

    status: Literal[
        "sent", "delivered", "bounced", "dropped", "spam_report", "unsubscribed", "failed"
    ]
    provider_message_id: str | None
    recipient: str | None  # the address or number, for suppression
    reference: str | None = None  # our notification id, where the vendor echoes it back
    reason: str | None = None
    occurred_at: datetime | None = None


@runtime_checkable
class MessageChannel(Protocol):
    """Sends notifications on one or more channels and, where the vendor calls back,
    turns its verified callbacks (arriving through the inbound endpoint, after
    `EventsSource.verify`) into delivery reports."""

    message_channels: ClassVar[frozenset[str]]  # of "email", "sms", "push"

    async def send_message(self, connection: Connection, message: OutgoingMessage) -> SendResult:
        """Send one message. Raise SendRejected for a refusal; GatewayError/CircuitOpen
        propagate for the caller's retry schedule."""

    def delivery_reports(self, event_type: str, body: bytes) -> list[DeliveryReport]:
        """The reports an inbound callback carries; [] for callbacks without any."""


@dataclass(frozen=True)
class StoredObject:
    key: str  # the object's key under the integration's prefix, "/"-separated
    size: int
    etag: str | None = None


@runtime_checkable
class ObjectStorage(Protocol):
    """A store of files by key (S3 and compatibles, OneDrive/SharePoint, a local
    directory). Keys are relative to the integration's configured prefix or folder.

    Uploads take a local file so memory stays bounded whatever its size: the provider
    sends it in parts (S3 multipart, Graph upload sessions) past its own threshold, and an
    interrupted upload is retried or resumed, never left visible half-written.
    """

    async def upload_file(
        self, connection: Connection, key: str, path: Path, *, content_type: str
    ) -> StoredObject: ...

    async def download_file(self, connection: Connection, key: str, path: Path) -> None:
        """Write the object to `path`; FileNotFoundError when there is no such key."""

    async def list_objects(self, connection: Connection, prefix: str) -> list[StoredObject]:
        """Every object whose key starts with `prefix`, in key order."""

    async def delete_object(self, connection: Connection, key: str) -> None:
        """Remove the object; no error when it is already gone."""


@dataclass(frozen=True)
class SearchRecord:
    object_id: str  # our public id
    attributes: Mapping[str, Any]


@runtime_checkable
class SearchIndex(Protocol):
    """A hosted search index (Algolia): records written and deleted in batches."""

    batch_size: int

    async def save_records(
        self, connection: Connection, index: str, records: Sequence[SearchRecord]
    ) -> None: ...

    async def delete_records(
        self, connection: Connection, index: str, object_ids: Sequence[str]
    ) -> None: ...


@runtime_checkable
class RebuildableSearchIndex(Protocol):
    """A search index that can be rebuilt whole and swapped in at once, so a full reindex
    leaves exactly the records given (including none) with no moment of a half-built index.
    Optional beside `SearchIndex`; without it a reindex can only write every record."""

    async def replace_records(
        self,
        connection: Connection,
        index: str,
        batches: AsyncIterator[Sequence[SearchRecord]],
    ) -> int:
        """Make `index` hold exactly the records of `batches`; return how many."""


CAPABILITY_INTERFACES: dict[Capability, type] = {
    Capability.CRM: CRM,
    Capability.MARKETING_LIST: MarketingList,
    Capability.ANALYTICS_SINK: AnalyticsSink,
    Capability.PAYMENTS: Payments,
    Capability.ACCOUNTING: Accounting,
    Capability.EVENTS_SOURCE: EventsSource,
    Capability.NOTIFIER: Notifier,
    Capability.ORDERS: Orders,
    Capability.MESSAGES: MessageChannel,
    Capability.STORAGE: ObjectStorage,
    Capability.SEARCH_INDEX: SearchIndex,
}
