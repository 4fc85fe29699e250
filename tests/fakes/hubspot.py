"""A stateful fake of HubSpot's CRM v3 contacts API, and of the webhooks HubSpot sends back.

`running_fake_hubspot` serves it on a free port of 127.0.0.1, under uvicorn in a thread with
its own event loop (as `tests.fakes.stripe` does), so the code under test talks to it over
real HTTP with the shapes of the real API:

    async with running_fake_hubspot(access_token="pat-na1-test") as fake:
        contact_id = fake.add_contact({"email": "ada@example.com", "firstname": "Ada"})
        fake.fail_next(1)
        ...point the HubSpot connection's base URL at fake.url and run a sync...
        assert fake.writes() == 1
        assert fake.contact_by_email("ADA@example.com")["firstname"] == "Ada"

Requests carry `Authorization: Bearer <token>` (a private app's access token). Endpoints,
all under `/crm/v3/objects/contacts`: `GET` (list, paged by id), `POST` (create),
`GET|PATCH /{id}` (`idProperty=email` accepted), `POST /batch/create`, `/batch/upsert`
(by email), `/batch/update`, `/batch/read` and `/search`.

Checks apply in this order: latency, the token (401), programmed failures (`fail_next`),
programmed rate limiting (`rate_limit_next`), random failures, the rolling rate limits
(`set_rate_limit`), then the endpoint. Nothing before the endpoint changes any contact, so a
retried request is always safe.

Behaviour chosen where HubSpot's documentation is silent, following what HubSpot does in
practice:
- Emails are stored lower-cased and matched case-insensitively.
- A write that changes no value leaves `lastmodifieddate` alone and sends no webhook.
- 429 answers carry no `Retry-After`: HubSpot documents only the `X-HubSpot-RateLimit-*`
  headers, and its rolling-window 429s come without it.
- In a 207, inputs that failed validation get one error each; ids that were not found are
  grouped into one OBJECT_NOT_FOUND error listing them all, as HubSpot groups them.
- Results carry every set property (plus `hs_object_id`, `createdate`, `lastmodifieddate`)
  when no properties are requested; requested properties that are not set come back null.
- Search sees a contact's values as they were `search_delay` seconds ago (HubSpot's
  indexing delay); the other endpoints always see the current values.
- Creating a contact sends `contact.creation` and one `contact.propertyChange` per property
  set, as HubSpot does for subscribed properties.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import functools
import hashlib
import heapq
import hmac
import itertools
import json
import random
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlencode

import httpx
from starlette.requests import Request
from starlette.responses import Response

from tests.support_server import bind_local_socket, serving_in_thread

DEFAULT_TOKEN = "pat-na1-11111111-2222-3333-4444-555555555555"
PORTAL_ID = 62515
CONTACTS_PATH = "/crm/v3/objects/contacts"
MAX_BATCH_INPUTS = 100
MAX_LIST_LIMIT = 100
DEFAULT_LIST_LIMIT = 10
MAX_SEARCH_LIMIT = 200
DEFAULT_SEARCH_LIMIT = 10
# HubSpot's search can page through at most 10,000 results of one query.
MAX_SEARCH_RESULTS = 10_000
MAX_FILTER_GROUPS = 5
MAX_FILTERS_PER_GROUP = 6
MAX_FILTERS_TOTAL = 18
SEARCH_REQUESTS_PER_SECOND = 5
MAX_WEBHOOK_BATCH = 100
# HubSpot retries a failed delivery up to 10 times over 24 hours; the fake retries quickly.
WEBHOOK_MAX_ATTEMPTS = 4
WEBHOOK_RETRY_DELAYS = (0.05, 0.1, 0.2)
WEBHOOK_TIMEOUT_SECONDS = 5.0
FIRST_CONTACT_ID = 1001

SYSTEM_PROPERTIES = ("hs_object_id", "createdate", "lastmodifieddate")
# Properties the API never lets a client write.
READ_ONLY_PROPERTIES = frozenset({"hs_object_id", "lastmodifieddate"})
STANDARD_PROPERTIES = frozenset(
    {
        "email",
        "firstname",
        "lastname",
        "phone",
        "mobilephone",
        "company",
        "website",
        "lifecyclestage",
        "hs_lead_status",
        "hubspot_owner_id",
        "address",
        "city",
        "state",
        "zip",
        "country",
        "jobtitle",
        "industry",
        "salutation",
        "date_of_birth",
        "fax",
        "annualrevenue",
        "numemployees",
        "message",
        "hs_language",
        "hs_timezone",
        "hs_persona",
        "hs_legal_basis",
        "hs_content_membership_status",
        "hs_marketable_status",
        "createdate",
    }
)
LIFECYCLE_STAGES = (
    "subscriber",
    "lead",
    "marketingqualifiedlead",
    "salesqualifiedlead",
    "opportunity",
    "customer",
    "evangelist",
    "other",
)
LEAD_STATUSES = (
    "NEW",
    "OPEN",
    "IN_PROGRESS",
    "OPEN_DEAL",
    "UNQUALIFIED",
    "ATTEMPTED_TO_CONTACT",
    "CONNECTED",
    "BAD_TIMING",
)
ENUMERATIONS: dict[str, tuple[str, ...]] = {
    "lifecyclestage": LIFECYCLE_STAGES,
    "hs_lead_status": LEAD_STATUSES,
}
# Properties compared as timestamps or numbers in search filters and sorts.
NUMERIC_PROPERTIES = frozenset({"hs_object_id", "createdate", "lastmodifieddate"})
SEARCH_OPERATORS = frozenset(
    {"EQ", "NEQ", "LT", "LTE", "GT", "GTE", "IN", "NOT_IN", "HAS_PROPERTY", "NOT_HAS_PROPERTY"}
)
WRITE_ENDPOINTS = frozenset({"create", "update", "batch/create", "batch/update", "batch/upsert"})

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s.]{2,}$")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


# --------------------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=65_536)
def iso_ms(epoch_ms: int) -> str:
    """HubSpot's timestamp format: ISO 8601 in UTC with milliseconds and a Z."""
    moment = datetime.fromtimestamp(epoch_ms // 1000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{epoch_ms % 1000:03d}Z"


def epoch_ms(moment: datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _correlation_id() -> str:
    return str(uuid.uuid4())


def _timestamp_value(value: Any) -> int | None:
    """A filter value for a date property: epoch milliseconds, or an ISO 8601 string."""
    text = str(value).strip()
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    try:
        return epoch_ms(datetime.fromisoformat(text.replace("Z", "+00:00")))
    except ValueError:
        return None


def _stringify(value: Any) -> str:
    """HubSpot keeps every property value as a string; null clears the property."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# --------------------------------------------------------------------------- errors


class HubSpotError(Exception):
    """An error answer, rendered as HubSpot's `{"status": "error", ...}` body."""

    def __init__(
        self,
        status: int,
        message: str,
        category: str,
        *,
        errors: list[dict[str, Any]] | None = None,
        context: dict[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.category = category
        self.errors = errors
        self.context = context
        self.headers = dict(headers or {})
        self.raw_body = body

    def body(self) -> dict[str, Any]:
        if self.raw_body is not None:
            return self.raw_body
        body: dict[str, Any] = {
            "status": "error",
            "message": self.message,
            "correlationId": _correlation_id(),
            "category": self.category,
        }
        if self.errors is not None:
            body["errors"] = self.errors
        if self.context is not None:
            body["context"] = self.context
        return body


def _validation(message: str, **extra: Any) -> HubSpotError:
    return HubSpotError(400, message, "VALIDATION_ERROR", **extra)


def _unauthenticated() -> HubSpotError:
    return HubSpotError(
        401,
        "Authentication credentials not found. This API supports OAuth 2.0 authentication "
        "and you can find more details at https://developers.hubspot.com/docs/methods/auth/"
        "oauth-overview",
        "INVALID_AUTHENTICATION",
    )


def _injected(status: int) -> HubSpotError:
    if status == 429:
        return _rate_limited(100, 10.0)
    messages = {
        500: ("internal error", "INTERNAL_ERROR"),
        502: ("Bad Gateway", "INTERNAL_ERROR"),
        503: ("Service Unavailable", "INTERNAL_ERROR"),
        504: ("Gateway Timeout", "INTERNAL_ERROR"),
        400: ("There was a problem with the request.", "VALIDATION_ERROR"),
        401: ("Authentication credentials not found.", "INVALID_AUTHENTICATION"),
        403: (
            "This app hasn't been granted all required scopes to make this call.",
            "MISSING_SCOPES",
        ),
        404: ("Object not found.", "OBJECT_NOT_FOUND"),
        409: ("Conflict", "CONFLICT"),
    }
    message, category = messages.get(
        status, ("internal error" if status >= 500 else "error", "INTERNAL_ERROR")
    )
    return HubSpotError(status, message, category)


def _rate_limited(
    max_requests: int, interval_seconds: float, *, search: bool = False
) -> HubSpotError:
    policy = "SECONDLY" if search else "TEN_SECONDLY_ROLLING"
    limit_name = "secondly" if search else "ten_secondly_rolling"
    return HubSpotError(
        429,
        f"You have reached your {limit_name} limit.",
        "RATE_LIMIT",
        headers=_rate_limit_headers(max_requests, 0, interval_seconds),
        body={
            "status": "error",
            "message": f"You have reached your {limit_name} limit.",
            "errorType": "RATE_LIMIT",
            "correlationId": _correlation_id(),
            "policyName": policy,
        },
    )


def _rate_limit_headers(max_requests: int, remaining: int, interval: float) -> dict[str, str]:
    return {
        "X-HubSpot-RateLimit-Interval-Milliseconds": str(int(interval * 1000)),
        "X-HubSpot-RateLimit-Max": str(max_requests),
        "X-HubSpot-RateLimit-Remaining": str(max(remaining, 0)),
    }


def _property_errors(problems: list[tuple[str, str, str]]) -> tuple[str, list[dict[str, Any]]]:
    """The message and `errors` of HubSpot's "Property values were not valid" answer, from
    (property name, error code, message) triples."""
    details = [
        {
            "isValid": False,
            "message": message,
            "error": code,
            "name": name,
            "localizedErrorMessage": message,
        }
        for name, code, message in problems
    ]
    errors = [
        {"message": message, "code": code, "context": {"propertyName": [name]}}
        for name, code, message in problems
    ]
    return f"Property values were not valid: {json.dumps(details)}", errors


class _InputFailed(Exception):
    """One input of a batch failed; the others still apply (answered 207)."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error["message"])
        self.error = error


def _input_error(category: str, message: str, input_id: str) -> _InputFailed:
    return _InputFailed(
        {
            "status": "error",
            "category": category,
            "message": message,
            "context": {"ids": [input_id]},
        }
    )


# --------------------------------------------------------------------------- records


class HubSpotRequest(NamedTuple):
    """One request as answered: query decoded, JSON body parsed (None when absent)."""

    method: str
    path: str
    query: dict[str, str]
    body: Any
    status: int


@dataclass
class _Logged:
    request: HubSpotRequest
    reached_endpoint: bool
    endpoint: str | None
    changed: bool


@dataclass
class _Contact:
    id: str
    properties: dict[str, str]
    created_ms: int
    modified_ms: int

    def value(self, name: str) -> str | None:
        if name == "hs_object_id":
            return self.id
        if name == "createdate":
            return self.properties.get("createdate") or iso_ms(self.created_ms)
        if name == "lastmodifieddate":
            return iso_ms(self.modified_ms)
        return self.properties.get(name)

    def sort_key(self, name: str) -> tuple[int, str]:
        if name == "hs_object_id":
            return (int(self.id), "")
        if name == "createdate":
            return (self.created_ms, "")
        if name == "lastmodifieddate":
            return (self.modified_ms, "")
        return (0, (self.properties.get(name) or "").lower())

    def render(self, requested: list[str] | None, *, new: bool | None = None) -> dict[str, Any]:
        if requested:
            names = list(dict.fromkeys([*requested, *SYSTEM_PROPERTIES]))
            properties: dict[str, Any] = {name: self.value(name) for name in names}
        else:
            properties = {name: value for name, value in self.properties.items() if value}
            for name in SYSTEM_PROPERTIES:
                properties[name] = self.value(name)
        result: dict[str, Any] = {
            "id": self.id,
            "properties": properties,
            "createdAt": iso_ms(self.created_ms),
            "updatedAt": iso_ms(self.modified_ms),
            "archived": False,
        }
        if new is not None:
            result["new"] = new
        return result


@dataclass(frozen=True)
class WebhookDelivery:
    """One POST of a batch of events to the subscribed target, whatever its outcome."""

    target_url: str
    attempt: int  # 0 for the first try, as HubSpot's `attemptNumber`
    events: list[dict[str, Any]]
    body: bytes
    headers: dict[str, str]
    status: int | None  # None when no answer came (connection error, timeout)
    error: str | None
    at: float = field(default_factory=time.monotonic)

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@dataclass(frozen=True)
class _Subscription:
    target_url: str
    client_secret: str
    app_id: int
    properties: frozenset[str] | None


def sign_v3(client_secret: str, method: str, uri: str, body: bytes, timestamp_ms: int) -> str:
    """HubSpot's v3 signature: base64(HMAC-SHA256(secret, method + uri + body + timestamp))."""
    source = method.encode() + uri.encode() + body + str(timestamp_ms).encode()
    digest = hmac.new(client_secret.encode(), source, hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


# --------------------------------------------------------------------------- the fake


class FakeHubSpot:
    """The fake's state, programming and what it has seen; safe to use from any thread."""

    def __init__(self, url: str, access_token: str = DEFAULT_TOKEN) -> None:
        self.url = url
        self.access_token = access_token
        self._lock = threading.Lock()
        self._webhook_wakeup = threading.Condition(self._lock)
        self._closed = False
        self._webhook_thread: threading.Thread | None = None
        self.reset()

    def reset(self) -> None:
        """Forget every contact, request, subscription and programming, as a fresh fake."""
        with self._lock:
            self._contacts: dict[str, _Contact] = {}
            self._ids: list[int] = []  # ascending, for paging by id
            self._by_email: dict[str, str] = {}
            self._next_id = FIRST_CONTACT_ID
            self._custom_properties: set[str] = set()
            self._search_delay = 0.0
            # What search sees: a snapshot per contact, updated from `_pending_index` once
            # each change's indexing delay has passed.
            self._indexed: dict[str, _Contact] = {}
            self._pending_index: list[tuple[float, int, _Contact]] = []
            self._index_sequence = itertools.count()
            self._index_version = 0
            # The last search's matches, sorted: paging through one query reuses them.
            self._search_cache: tuple[str, int, list[_Contact]] | None = None
            self._log: list[_Logged] = []
            self._failures: deque[int] = deque()
            self._rate_limited_next = 0
            self._random_rate = 0.0
            self._random: random.Random = random.Random(0)
            self._random_statuses: tuple[int, ...] = (500, 502, 503)
            self._rate_max: int | None = None
            self._rate_interval = 10.0
            self._search_per_second: int | None = None
            self._accepted_at: deque[float] = deque()
            self._search_accepted_at: deque[float] = deque()
            self._latency = 0.0
            self._subscription: _Subscription | None = None
            self._events: deque[dict[str, Any]] = deque()
            self._delivering = False
            self._deliveries: list[WebhookDelivery] = []
            self._event_ids = itertools.count(7_000_001)
            self._webhook_wakeup.notify_all()

    def close(self) -> None:
        """Stop the webhook sender (called when the server stops)."""
        with self._lock:
            self._closed = True
            self._webhook_wakeup.notify_all()
            thread = self._webhook_thread
        if thread is not None:
            thread.join(WEBHOOK_TIMEOUT_SECONDS * 2)

    # ------------------------------------------------------------------ programming

    def fail_next(self, n: int, status: int = 500) -> None:
        """Answer the next `n` API requests with `status` and HubSpot's error body."""
        with self._lock:
            self._failures.extend(status for _ in range(n))

    def rate_limit_next(self, n: int) -> None:
        """Answer the next `n` API requests with 429 TEN_SECONDLY_ROLLING."""
        with self._lock:
            self._rate_limited_next += n

    def random_failures(
        self, rate: float, seed: int = 0, statuses: Iterable[int] = (500, 502, 503)
    ) -> None:
        """Fail each API request with probability `rate` (0 turns it off), with a status
        drawn from `statuses`, reproducibly for a given `seed`."""
        with self._lock:
            self._random_rate = rate
            self._random = random.Random(seed)
            self._random_statuses = tuple(statuses)

    def set_rate_limit(
        self,
        max_requests: int | None,
        interval_seconds: float = 10.0,
        search_per_second: int | None = SEARCH_REQUESTS_PER_SECOND,
    ) -> None:
        """Accept at most `max_requests` in any rolling `interval_seconds` (None: no limit),
        and at most `search_per_second` searches in any rolling second (None: no limit).
        Requests refused with 429 don't count; while on, every answer carries the
        `X-HubSpot-RateLimit-*` headers."""
        with self._lock:
            self._rate_max = max_requests
            self._rate_interval = interval_seconds
            self._search_per_second = search_per_second if max_requests is not None else None
            self._accepted_at.clear()
            self._search_accepted_at.clear()

    def set_latency(self, seconds: float) -> None:
        """Wait `seconds` before handling each request."""
        with self._lock:
            self._latency = seconds

    def set_search_delay(self, seconds: float) -> None:
        """Let search see a change only `seconds` after it was made (HubSpot's indexing)."""
        with self._lock:
            self._search_delay = seconds

    def add_property(self, name: str) -> None:
        """Create a custom contact property, so writes to it are accepted."""
        with self._lock:
            self._custom_properties.add(name)

    # ------------------------------------------------------------------ state

    def add_contact(
        self, properties: Mapping[str, Any], modified_at: datetime | None = None
    ) -> str:
        """Make a contact exist, as if created in HubSpot by a user; returns its id.

        `modified_at` sets both its creation and last modification time (default: now).
        """
        values = {name: _stringify(value) for name, value in properties.items()}
        self._check_properties_exist(values)
        at_ms = epoch_ms(modified_at) if modified_at is not None else _now_ms()
        with self._lock:
            email = values.get("email", "").lower()
            if email and email in self._by_email:
                raise ValueError(f"a contact with email {email} exists: {self._by_email[email]}")
            contact = self._create_locked(values, at_ms, source="CRM_UI")
            return contact.id

    def update_contact(
        self, contact_id: str, properties: Mapping[str, Any], modified_at: datetime | None = None
    ) -> None:
        """Edit a contact as a user would in HubSpot: webhooks say `CRM_UI`.

        `lastmodifieddate` becomes `modified_at` (default: now) if a value changed or
        `modified_at` is given.
        """
        values = {name: _stringify(value) for name, value in properties.items()}
        self._check_properties_exist(values)
        at_ms = epoch_ms(modified_at) if modified_at is not None else _now_ms()
        with self._lock:
            contact = self._contacts[contact_id]
            changed = self._apply_locked(contact, values, at_ms, source="CRM_UI")
            if not changed and modified_at is not None:
                contact.modified_ms = at_ms
                self._queue_index_locked(contact)

    @property
    def contacts(self) -> dict[str, dict[str, str]]:
        """Every contact's set properties by id (a copy), with the system properties."""
        with self._lock:
            return {cid: self._snapshot(contact) for cid, contact in self._contacts.items()}

    def contact_by_email(self, email: str) -> dict[str, str] | None:
        """A contact's properties (see `contacts`), found case-insensitively by email."""
        with self._lock:
            contact_id = self._by_email.get(email.lower())
            if contact_id is None:
                return None
            return self._snapshot(self._contacts[contact_id])

    @staticmethod
    def _snapshot(contact: _Contact) -> dict[str, str]:
        properties = {name: value for name, value in contact.properties.items() if value}
        for name in SYSTEM_PROPERTIES:
            properties[name] = contact.value(name) or ""
        return properties

    @property
    def requests(self) -> list[HubSpotRequest]:
        """Every request so far, in the order answered, whatever it was answered."""
        with self._lock:
            return [logged.request for logged in self._log]

    def count(self, method: str | None = None, path_prefix: str = "") -> int:
        """Requests with `method` (any if None) to a path starting with `path_prefix` that
        reached an endpoint: not refused with 401, 429 or an injected failure."""
        with self._lock:
            return sum(
                1
                for logged in self._log
                if logged.reached_endpoint and _matches(logged.request, method, path_prefix)
            )

    def count_all(self, method: str | None = None, path_prefix: str = "") -> int:
        """Every request received with `method` to a path starting with `path_prefix`."""
        with self._lock:
            return sum(1 for logged in self._log if _matches(logged.request, method, path_prefix))

    def writes(self, *, changed_only: bool = False) -> int:
        """Write requests (create, update, upsert; single or batch) answered 200, 201 or 207.
        Searches and reads are not writes. With `changed_only`, only those that created or
        changed at least one contact."""
        with self._lock:
            return sum(
                1
                for logged in self._log
                if logged.endpoint in WRITE_ENDPOINTS
                and logged.request.status in (200, 201, 207)
                and (logged.changed or not changed_only)
            )

    # ------------------------------------------------------------------ webhooks

    def subscribe(
        self,
        target_url: str,
        client_secret: str,
        app_id: int = 1,
        properties: Iterable[str] | None = None,
    ) -> None:
        """Send contact events to `target_url`, signed with `client_secret`; property
        changes only for `properties` if given (HubSpot subscribes per property)."""
        with self._lock:
            self._subscription = _Subscription(
                target_url,
                client_secret,
                app_id,
                None if properties is None else frozenset(properties),
            )
            if self._webhook_thread is None:
                self._webhook_thread = threading.Thread(
                    target=self._deliver_forever, name="fake-hubspot-webhooks", daemon=True
                )
                self._webhook_thread.start()

    def unsubscribe(self) -> None:
        """Stop sending events; events not yet sent are dropped."""
        with self._lock:
            self._subscription = None
            self._events.clear()

    @property
    def webhook_deliveries(self) -> list[WebhookDelivery]:
        """Every delivery attempt so far, failed ones included."""
        with self._lock:
            return list(self._deliveries)

    @property
    def webhook_events_delivered(self) -> list[dict[str, Any]]:
        """The events of every successful delivery, in order."""
        with self._lock:
            return [event for d in self._deliveries if d.ok for event in d.events]

    async def webhooks_idle(self, timeout: float = 10) -> None:  # noqa: ASYNC109
        """Wait until every queued event was delivered (or given up on)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if not self._events and not self._delivering:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"webhooks still pending after {timeout}s")
            await asyncio.sleep(0.01)

    def _queue_event_locked(
        self, subscription_type: str, contact: _Contact, at_ms: int, source: str, **extra: str
    ) -> None:
        subscription = self._subscription
        if subscription is None:
            return
        if (
            "propertyName" in extra
            and subscription.properties is not None
            and extra["propertyName"] not in subscription.properties
        ):
            return
        event: dict[str, Any] = {
            "eventId": next(self._event_ids),
            "subscriptionId": _subscription_id(subscription_type, extra.get("propertyName")),
            "portalId": PORTAL_ID,
            "appId": subscription.app_id,
            "occurredAt": at_ms,
            "subscriptionType": subscription_type,
            "attemptNumber": 0,
            "objectId": int(contact.id),
            **extra,
            "changeSource": source,
            "sourceId": str(subscription.app_id) if source == "INTEGRATION" else "userId:1234567",
        }
        if subscription_type == "contact.creation":
            event["changeFlag"] = "CREATED"
        self._events.append(event)
        self._webhook_wakeup.notify_all()

    def _deliver_forever(self) -> None:
        with httpx.Client(timeout=WEBHOOK_TIMEOUT_SECONDS) as client:
            while True:
                with self._lock:
                    while not self._closed and (not self._events or self._subscription is None):
                        self._webhook_wakeup.wait(0.5)
                    if self._closed:
                        return
                    subscription = self._subscription
                    batch = [
                        self._events.popleft()
                        for _ in range(min(MAX_WEBHOOK_BATCH, len(self._events)))
                    ]
                    self._delivering = True
                try:
                    if subscription is not None:
                        self._deliver(client, subscription, batch)
                finally:
                    with self._lock:
                        self._delivering = False

    def _deliver(
        self, client: httpx.Client, subscription: _Subscription, batch: list[dict[str, Any]]
    ) -> None:
        for attempt in range(WEBHOOK_MAX_ATTEMPTS):
            events = [{**event, "attemptNumber": attempt} for event in batch]
            body = json.dumps(events).encode()
            timestamp = _now_ms()
            headers = {
                "Content-Type": "application/json",
                "X-HubSpot-Request-Timestamp": str(timestamp),
                "X-HubSpot-Signature-v3": sign_v3(
                    subscription.client_secret, "POST", subscription.target_url, body, timestamp
                ),
                # The older signature HubSpot still sends alongside v3.
                "X-HubSpot-Signature": hashlib.sha256(
                    subscription.client_secret.encode() + body
                ).hexdigest(),
                "X-HubSpot-Signature-Version": "v1",
                "User-Agent": "HubSpot Connect 2.0 (http://dev.hubspot.com/)",
            }
            status: int | None = None
            error: str | None = None
            try:
                response = client.post(subscription.target_url, content=body, headers=headers)
                status = response.status_code
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
            delivery = WebhookDelivery(
                subscription.target_url, attempt, events, body, headers, status, error
            )
            with self._lock:
                self._deliveries.append(delivery)
                if self._closed or self._subscription != subscription:
                    return
            if delivery.ok:
                return
            if attempt < len(WEBHOOK_RETRY_DELAYS):
                time.sleep(WEBHOOK_RETRY_DELAYS[attempt])

    # ------------------------------------------------------------------ writing contacts

    def _known_locked(self, name: str) -> bool:
        return name in STANDARD_PROPERTIES or name in self._custom_properties

    def _check_properties_exist(self, values: Mapping[str, str]) -> None:
        """Raise HubSpot's 400 for properties that don't exist or can't be written."""
        problems: list[tuple[str, str, str]] = []
        with self._lock:
            for name in values:
                if name in READ_ONLY_PROPERTIES:
                    problems.append(
                        (name, "READ_ONLY_VALUE", f'Property "{name}" is a read only property')
                    )
                elif not self._known_locked(name):
                    problems.append(
                        (name, "PROPERTY_DOESNT_EXIST", f'Property "{name}" does not exist')
                    )
        if problems:
            message, errors = _property_errors(problems)
            raise _validation(message, errors=errors)

    @staticmethod
    def _value_problems(values: Mapping[str, str]) -> list[tuple[str, str, str]]:
        problems: list[tuple[str, str, str]] = []
        email = values.get("email")
        if email and not _EMAIL.match(email):
            problems.append(("email", "INVALID_EMAIL", f"Email address {email} is invalid"))
        for name, allowed in ENUMERATIONS.items():
            value = values.get(name)
            if value and value not in allowed:
                problems.append(
                    (
                        name,
                        "INVALID_OPTION",
                        f"{value} was not one of the allowed options: [{', '.join(allowed)}]",
                    )
                )
        return problems

    def _check_values(self, values: Mapping[str, str], input_id: str) -> None:
        problems = self._value_problems(values)
        if problems:
            message, _ = _property_errors(problems)
            raise _input_error("VALIDATION_ERROR", message, input_id)

    def _create_locked(self, values: dict[str, str], at_ms: int, *, source: str) -> _Contact:
        if values.get("email"):
            values["email"] = values["email"].lower()
        contact_id = str(self._next_id)
        self._next_id += 1
        contact = _Contact(
            contact_id,
            {name: value for name, value in values.items() if value},
            at_ms,
            at_ms,
        )
        self._contacts[contact_id] = contact
        self._ids.append(int(contact_id))
        if contact.properties.get("email"):
            self._by_email[contact.properties["email"]] = contact_id
        self._queue_index_locked(contact)
        self._queue_event_locked("contact.creation", contact, at_ms, source)
        for name, value in contact.properties.items():
            self._queue_event_locked(
                "contact.propertyChange",
                contact,
                at_ms,
                source,
                propertyName=name,
                propertyValue=value,
            )
        return contact

    def _apply_locked(
        self, contact: _Contact, values: Mapping[str, str], at_ms: int, *, source: str
    ) -> bool:
        """Write `values` to `contact`; True if any value changed."""
        changes: dict[str, str] = {}
        for name, value in values.items():
            if name == "email":
                value = value.lower()
            if contact.properties.get(name, "") != value:
                changes[name] = value
        if not changes:
            return False
        if "email" in changes:
            old = contact.properties.get("email")
            if old:
                self._by_email.pop(old, None)
            if changes["email"]:
                self._by_email[changes["email"]] = contact.id
        for name, value in changes.items():
            if value:
                contact.properties[name] = value
            else:
                contact.properties.pop(name, None)
        contact.modified_ms = at_ms
        self._queue_index_locked(contact)
        for name, value in changes.items():
            self._queue_event_locked(
                "contact.propertyChange",
                contact,
                at_ms,
                source,
                propertyName=name,
                propertyValue=value,
            )
        return True

    def _email_conflict(self, contact_id: str | None, email: str | None) -> str | None:
        """The id of another contact already holding `email`, if any (lock held)."""
        if not email:
            return None
        holder = self._by_email.get(email.lower())
        return holder if holder is not None and holder != contact_id else None

    # ------------------------------------------------------------------ search index

    def _queue_index_locked(self, contact: _Contact) -> None:
        snapshot = _Contact(
            contact.id, dict(contact.properties), contact.created_ms, contact.modified_ms
        )
        visible_at = time.monotonic() + self._search_delay
        heapq.heappush(self._pending_index, (visible_at, next(self._index_sequence), snapshot))

    def _refresh_index_locked(self) -> None:
        now = time.monotonic()
        while self._pending_index and self._pending_index[0][0] <= now:
            _, _, snapshot = heapq.heappop(self._pending_index)
            self._indexed[snapshot.id] = snapshot
            self._index_version += 1

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        method = request.method
        path = request.url.path
        raw_body = await request.body()
        query_pairs = parse_qsl(scope.get("query_string", b"").decode("latin-1"))
        query = dict(query_pairs)
        with self._lock:
            latency = self._latency
        if latency > 0:
            await asyncio.sleep(latency)
        body: Any = None
        reached = False
        endpoint: str | None = None
        changed = False
        headers: dict[str, str] = {}
        try:
            if raw_body:
                try:
                    body = json.loads(raw_body)
                except ValueError as exc:
                    body = raw_body.decode(errors="replace")
                    raise _validation(f"Invalid input JSON on line 1, column 1: {exc}") from None
            headers = self._admit(request.headers.get("authorization", ""), method, path)
            reached = True
            endpoint, status, payload, changed = self._route(method, path, query_pairs, body)
        except HubSpotError as error:
            status, payload = error.status, error.body()
            headers = {**headers, **error.headers}
        with self._lock:
            self._log.append(
                _Logged(
                    HubSpotRequest(method, path, query, body, status), reached, endpoint, changed
                )
            )
        response = Response(
            content=json.dumps(payload).encode() if payload is not None else b"",
            status_code=status,
            media_type="application/json;charset=utf-8",
            headers=headers,
        )
        await response(scope, receive, send)

    def _admit(self, authorization: str, method: str, path: str) -> dict[str, str]:
        """Raise the error for a request that must not reach an endpoint; else the
        rate-limit headers to answer with."""
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or token.strip() != self.access_token:
            raise _unauthenticated()
        with self._lock:
            if self._failures:
                raise _injected(self._failures.popleft())
            if self._rate_limited_next > 0:
                self._rate_limited_next -= 1
                raise _rate_limited(self._rate_max or 100, self._rate_interval)
            if self._random_rate > 0 and self._random.random() < self._random_rate:
                raise _injected(self._random.choice(self._random_statuses))
            if self._rate_max is None:
                return {}
            now = time.monotonic()
            is_search = method == "POST" and path.rstrip("/").endswith("/search")
            if is_search and self._search_per_second is not None:
                searches = self._search_accepted_at
                while searches and searches[0] <= now - 1.0:
                    searches.popleft()
                if len(searches) >= self._search_per_second:
                    raise _rate_limited(self._search_per_second, 1.0, search=True)
            accepted = self._accepted_at
            while accepted and accepted[0] <= now - self._rate_interval:
                accepted.popleft()
            if len(accepted) >= self._rate_max:
                raise _rate_limited(self._rate_max, self._rate_interval)
            accepted.append(now)
            if is_search and self._search_per_second is not None:
                self._search_accepted_at.append(now)
            return _rate_limit_headers(
                self._rate_max, self._rate_max - len(accepted), self._rate_interval
            )

    def _route(
        self, method: str, path: str, query: list[tuple[str, str]], body: Any
    ) -> tuple[str | None, int, Any, bool]:
        """(endpoint name, status, payload, whether a contact was created or changed)."""
        base = CONTACTS_PATH.strip("/").split("/")
        parts = path.strip("/").split("/")
        if parts[: len(base)] != base:
            raise _not_found_route(method, path)
        rest = parts[len(base) :]
        match method, rest:
            case "GET", []:
                return None, 200, self._list(query, path), False
            case "POST", []:
                status, payload, changed = self._create_one(_object(body))
                return "create", status, payload, changed
            case "POST", ["batch", "create"]:
                return "batch/create", *self._batch_create(_object(body))
            case "POST", ["batch", "upsert"]:
                return "batch/upsert", *self._batch_upsert(_object(body))
            case "POST", ["batch", "update"]:
                return "batch/update", *self._batch_update(_object(body))
            case "POST", ["batch", "read"]:
                status, payload = self._batch_read(_object(body))
                return None, status, payload, False
            case "POST", ["search"]:
                return None, 200, self._search(_object(body)), False
            case "GET", [contact_id]:
                return None, 200, self._get_one(contact_id, query), False
            case "PATCH", [contact_id]:
                payload, changed = self._update_one(contact_id, query, _object(body))
                return "update", 200, payload, changed
        raise _not_found_route(method, path)

    # ------------------------------------------------------------------ endpoints

    def _list(self, query: list[tuple[str, str]], path: str) -> dict[str, Any]:
        params = dict(query)
        limit = _int_param(params.get("limit"), "limit", DEFAULT_LIST_LIMIT)
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise _validation(f"limit must be between 1 and {MAX_LIST_LIMIT}, got {limit}")
        after = _int_param(params.get("after"), "after", 0)
        requested = _properties_param(query)
        with self._lock:
            start = bisect.bisect_left(self._ids, after)
            page_ids = self._ids[start : start + limit + 1]
            results = [self._contacts[str(i)].render(requested) for i in page_ids[:limit]]
        payload: dict[str, Any] = {"results": results}
        if len(page_ids) > limit:
            next_after = str(page_ids[limit])
            link_query = urlencode(
                [*((k, v) for k, v in query if k != "after"), ("after", next_after)]
            )
            payload["paging"] = {
                "next": {"after": next_after, "link": f"{self.url}{path}?{link_query}"}
            }
        return payload

    def _get_one(self, contact_id: str, query: list[tuple[str, str]]) -> dict[str, Any]:
        params = dict(query)
        requested = _properties_param(query)
        with self._lock:
            contact = self._find_locked(contact_id, params.get("idProperty"))
            if contact is None:
                raise _object_not_found(contact_id)
            return contact.render(requested)

    def _find_locked(self, input_id: str, id_property: str | None) -> _Contact | None:
        if id_property in (None, "", "hs_object_id"):
            return self._contacts.get(str(input_id))
        if id_property == "email":
            found = self._by_email.get(str(input_id).lower())
            return None if found is None else self._contacts[found]
        raise _validation(f"Unsupported idProperty {id_property!r}: the fake supports email")

    def _create_one(self, body: dict[str, Any]) -> tuple[int, dict[str, Any], bool]:
        values = _properties_of(body, "properties")
        self._check_properties_exist(values)
        problems = self._value_problems(values)
        if problems:
            message, errors = _property_errors(problems)
            raise _validation(message, errors=errors)
        with self._lock:
            existing = self._email_conflict(None, values.get("email"))
            if existing is not None:
                raise _conflict(existing)
            contact = self._create_locked(values, _now_ms(), source="INTEGRATION")
            return 201, contact.render(None), True

    def _update_one(
        self, contact_id: str, query: list[tuple[str, str]], body: dict[str, Any]
    ) -> tuple[dict[str, Any], bool]:
        values = _properties_of(body, "properties")
        self._check_properties_exist(values)
        problems = self._value_problems(values)
        if problems:
            message, errors = _property_errors(problems)
            raise _validation(message, errors=errors)
        with self._lock:
            contact = self._find_locked(contact_id, dict(query).get("idProperty"))
            if contact is None:
                raise _object_not_found(contact_id)
            existing = self._email_conflict(contact.id, values.get("email"))
            if existing is not None:
                raise _conflict(existing)
            changed = self._apply_locked(contact, values, _now_ms(), source="INTEGRATION")
            return contact.render(None), changed

    def _batch_inputs(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        inputs = body.get("inputs")
        if not isinstance(inputs, list) or not all(isinstance(i, dict) for i in inputs):
            raise _validation("Invalid input JSON: inputs must be a list of objects")
        if len(inputs) > MAX_BATCH_INPUTS:
            raise _validation(
                f"Batch input has {len(inputs)} inputs, more than the limit of {MAX_BATCH_INPUTS}.",
                context={"limit": [str(MAX_BATCH_INPUTS)]},
            )
        return inputs

    @staticmethod
    def _check_unique(ids: list[str]) -> None:
        seen: set[str] = set()
        repeated: set[str] = set()
        for input_id in ids:
            (repeated if input_id in seen else seen).add(input_id)
        duplicates = sorted(repeated)
        if duplicates:
            raise _validation(
                f"Duplicate IDs found in batch input: [{', '.join(duplicates)}]. IDs must be unique"
            )

    def _batch_answer(
        self, started_ms: int, results: list[dict[str, Any]], errors: list[dict[str, Any]]
    ) -> tuple[int, dict[str, Any]]:
        payload: dict[str, Any] = {"status": "COMPLETE", "results": results}
        if errors:
            payload["numErrors"] = len(errors)
            payload["errors"] = errors
        payload["startedAt"] = iso_ms(started_ms)
        payload["completedAt"] = iso_ms(_now_ms())
        return (207 if errors else 200), payload

    def _batch_create(self, body: dict[str, Any]) -> tuple[int, dict[str, Any], bool]:
        started = _now_ms()
        inputs = self._batch_inputs(body)
        all_values = [_properties_of(item, "properties") for item in inputs]
        for values in all_values:
            self._check_properties_exist(values)
        results: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        with self._lock:
            for values in all_values:
                try:
                    self._check_values(values, values.get("email", ""))
                    existing = self._email_conflict(None, values.get("email"))
                    if existing is not None:
                        raise _input_error(
                            "CONFLICT",
                            f"Contact already exists. Existing ID: {existing}",
                            values["email"],
                        )
                except _InputFailed as failed:
                    errors.append(failed.error)
                    continue
                contact = self._create_locked(values, _now_ms(), source="INTEGRATION")
                results.append(contact.render(None))
        status, payload = self._batch_answer(started, results, errors)
        return (201 if status == 200 else status), payload, bool(results)

    def _batch_upsert(self, body: dict[str, Any]) -> tuple[int, dict[str, Any], bool]:
        started = _now_ms()
        inputs = self._batch_inputs(body)
        parsed: list[tuple[str, dict[str, str]]] = []
        for item in inputs:
            if item.get("idProperty") != "email":
                raise _validation(
                    "The fake upserts contacts by email only: idProperty must be 'email', "
                    f"got {item.get('idProperty')!r}"
                )
            if not isinstance(item.get("id"), str) or not item["id"]:
                raise _validation("Each input needs an id")
            parsed.append((item["id"], _properties_of(item, "properties")))
        self._check_unique([email.lower() for email, _ in parsed])
        for _, values in parsed:
            self._check_properties_exist(values)
        results: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        changed = False
        with self._lock:
            for email, values in parsed:
                at_ms = _now_ms()
                try:
                    self._check_values({**values, "email": values.get("email", email)}, email)
                except _InputFailed as failed:
                    errors.append(failed.error)
                    continue
                found = self._by_email.get(email.lower())
                if found is None:
                    contact = self._create_locked(
                        {"email": email, **values}, at_ms, source="INTEGRATION"
                    )
                    changed = True
                    results.append(contact.render(None, new=True))
                    continue
                contact = self._contacts[found]
                conflict = self._email_conflict(contact.id, values.get("email"))
                if conflict is not None:
                    errors.append(
                        _input_error(
                            "CONFLICT", f"Contact already exists. Existing ID: {conflict}", email
                        ).error
                    )
                    continue
                changed |= self._apply_locked(contact, values, at_ms, source="INTEGRATION")
                results.append(contact.render(None, new=False))
        return *self._batch_answer(started, results, errors), changed

    def _batch_update(self, body: dict[str, Any]) -> tuple[int, dict[str, Any], bool]:
        started = _now_ms()
        inputs = self._batch_inputs(body)
        id_property = body.get("idProperty") or None
        parsed: list[tuple[str, dict[str, str]]] = []
        for item in inputs:
            if item.get("id") in (None, ""):
                raise _validation("Each input needs an id")
            parsed.append((str(item["id"]), _properties_of(item, "properties")))
        self._check_unique([i.lower() if id_property == "email" else i for i, _ in parsed])
        for _, values in parsed:
            self._check_properties_exist(values)
        results: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        missing: list[str] = []
        changed = False
        with self._lock:
            for input_id, values in parsed:
                contact = self._find_locked(input_id, id_property)
                if contact is None:
                    missing.append(input_id)
                    continue
                try:
                    self._check_values(values, input_id)
                    conflict = self._email_conflict(contact.id, values.get("email"))
                    if conflict is not None:
                        raise _input_error(
                            "CONFLICT", f"Contact already exists. Existing ID: {conflict}", input_id
                        )
                except _InputFailed as failed:
                    errors.append(failed.error)
                    continue
                changed |= self._apply_locked(contact, values, _now_ms(), source="INTEGRATION")
                results.append(contact.render(None))
        if missing:
            errors.append(_not_found_error(missing))
        return *self._batch_answer(started, results, errors), changed

    def _batch_read(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        started = _now_ms()
        inputs = self._batch_inputs(body)
        requested = body.get("properties") or None
        if requested is not None and not isinstance(requested, list):
            raise _validation("properties must be a list of property names")
        id_property = body.get("idProperty") or None
        results: list[dict[str, Any]] = []
        missing: list[str] = []
        with self._lock:
            seen: set[str] = set()
            for item in inputs:
                input_id = str(item.get("id", ""))
                contact = self._find_locked(input_id, id_property)
                if contact is None:
                    missing.append(input_id)
                elif contact.id not in seen:
                    seen.add(contact.id)
                    results.append(contact.render(requested))
        errors = [_not_found_error(missing)] if missing else []
        return self._batch_answer(started, results, errors)

    def _search(self, body: dict[str, Any]) -> dict[str, Any]:
        limit = body.get("limit", DEFAULT_SEARCH_LIMIT)
        if not isinstance(limit, int) or not 0 <= limit <= MAX_SEARCH_LIMIT:
            raise _validation(f"limit must be between 0 and {MAX_SEARCH_LIMIT}, got {limit}")
        after = _int_param(body.get("after"), "after", 0)
        if after + limit > MAX_SEARCH_RESULTS:
            raise _validation(
                "There was a problem with the request. Search results are limited to "
                f"{MAX_SEARCH_RESULTS} total; after + limit must not exceed it "
                f"(after={after}, limit={limit})."
            )
        groups = _filter_groups(body.get("filterGroups") or [])
        sort_name, descending = _sort(body.get("sorts") or [])
        requested = body.get("properties") or None
        if requested is not None and not isinstance(requested, list):
            raise _validation("properties must be a list of property names")
        query = body.get("query")
        cache_key = json.dumps([groups, sort_name, descending, query], sort_keys=True)
        with self._lock:
            self._refresh_index_locked()
            version = self._index_version
            cached = self._search_cache
            hit = cached[2] if cached is not None and cached[:2] == (cache_key, version) else None
            candidates = [] if hit is not None else self._search_candidates_locked(groups)
        if hit is not None:
            matching = hit
        else:
            matching = [
                contact
                for contact in candidates
                if (not groups or any(all(_passes(contact, f) for f in g) for g in groups))
                and (not query or _matches_query(contact, str(query)))
            ]
            if sort_name is None:
                matching.sort(key=lambda c: int(c.id))
            else:
                name = sort_name
                matching.sort(key=lambda c: (c.sort_key(name), int(c.id)), reverse=descending)
            with self._lock:
                self._search_cache = (cache_key, version, matching)
        page = matching[after : after + limit]
        payload: dict[str, Any] = {
            "total": len(matching),
            "results": [contact.render(requested) for contact in page],
        }
        if after + limit < len(matching) and limit > 0:
            payload["paging"] = {"next": {"after": str(after + limit)}}
        return payload

    def _search_candidates_locked(self, groups: list[list[dict[str, Any]]]) -> list[_Contact]:
        """The indexed contacts a search must check; only the email's when every filter
        group asks for one email, so such lookups stay cheap."""
        emails: list[str] = []
        for group in groups:
            email = next(
                (
                    str(f.get("value", "")).lower()
                    for f in group
                    if f.get("propertyName") == "email" and f.get("operator") == "EQ"
                ),
                None,
            )
            if email is None:
                return list(self._indexed.values())
            emails.append(email)
        if not groups:
            return list(self._indexed.values())
        found: dict[str, _Contact] = {}
        for email in emails:
            # Search sees the indexed email, which may lag behind the current one.
            current = self._by_email.get(email)
            indexed = self._indexed.get(current) if current is not None else None
            if indexed is not None and indexed.properties.get("email") == email:
                found[indexed.id] = indexed
        if len(found) < len(emails):
            return list(self._indexed.values())
        return list(found.values())


# --------------------------------------------------------------------------- search parts


def _filter_groups(raw: Any) -> list[list[dict[str, Any]]]:
    if not isinstance(raw, list) or not all(isinstance(g, dict) for g in raw):
        raise _validation("filterGroups must be a list of objects")
    if len(raw) > MAX_FILTER_GROUPS:
        raise _validation(
            f"Too many filter groups: {len(raw)}. The maximum is {MAX_FILTER_GROUPS}."
        )
    groups: list[list[dict[str, Any]]] = []
    total = 0
    for group in raw:
        filters = group.get("filters") or []
        if not isinstance(filters, list) or len(filters) > MAX_FILTERS_PER_GROUP:
            raise _validation(f"A filter group may have at most {MAX_FILTERS_PER_GROUP} filters.")
        total += len(filters)
        for item in filters:
            if not isinstance(item, dict) or not item.get("propertyName"):
                raise _validation("Each filter needs a propertyName")
            operator = item.get("operator", "EQ")
            if operator not in SEARCH_OPERATORS:
                raise _validation(f"Unsupported filter operator {operator!r}")
            needs_timestamp = item["propertyName"] in NUMERIC_PROPERTIES and operator not in (
                "HAS_PROPERTY",
                "NOT_HAS_PROPERTY",
                "IN",
                "NOT_IN",
            )
            if needs_timestamp and _timestamp_value(item.get("value", "")) is None:
                raise _validation(f"Invalid value {item.get('value')!r} for {item['propertyName']}")
        groups.append(filters)
    if total > MAX_FILTERS_TOTAL:
        raise _validation(f"Too many filters: {total}. The maximum is {MAX_FILTERS_TOTAL}.")
    return groups


def _sort(raw: Any) -> tuple[str | None, bool]:
    if not isinstance(raw, list):
        raise _validation("sorts must be a list")
    if len(raw) > 1:
        raise _validation("Search requests may have only one sort.")
    if not raw:
        return None, False
    item = raw[0]
    if isinstance(item, str):
        # HubSpot also accepts a bare property name, or one prefixed with "-" (descending).
        return item.lstrip("-"), item.startswith("-")
    if not isinstance(item, dict) or not item.get("propertyName"):
        raise _validation("Each sort needs a propertyName")
    direction = item.get("direction", "ASCENDING")
    if direction not in ("ASCENDING", "DESCENDING"):
        raise _validation(f"Unsupported sort direction {direction!r}")
    return str(item["propertyName"]), direction == "DESCENDING"


def _passes(contact: _Contact, item: Mapping[str, Any]) -> bool:
    name = str(item["propertyName"])
    operator = item.get("operator", "EQ")
    current = contact.value(name)
    if operator == "HAS_PROPERTY":
        return bool(current)
    if operator == "NOT_HAS_PROPERTY":
        return not current
    if operator in ("IN", "NOT_IN"):
        values = {str(v).lower() for v in item.get("values") or []}
        inside = current is not None and current.lower() in values
        return inside if operator == "IN" else not inside
    if name in NUMERIC_PROPERTIES:
        left: Any = contact.sort_key(name)[0]
        right: Any = _timestamp_value(item.get("value", ""))
    else:
        if current is None:
            return operator == "NEQ"
        left, right = current.lower(), str(item.get("value", "")).lower()
    match operator:
        case "EQ":
            return bool(left == right)
        case "NEQ":
            return bool(left != right)
        case "LT":
            return bool(left < right)
        case "LTE":
            return bool(left <= right)
        case "GT":
            return bool(left > right)
        case "GTE":
            return bool(left >= right)
    return False


def _matches_query(contact: _Contact, query: str) -> bool:
    needle = query.lower()
    return any(
        needle in (contact.properties.get(name) or "").lower()
        for name in ("email", "firstname", "lastname", "phone", "company")
    )


# --------------------------------------------------------------------------- small parts


def _matches(request: HubSpotRequest, method: str | None, path_prefix: str) -> bool:
    return (method is None or request.method == method.upper()) and request.path.startswith(
        path_prefix
    )


def _subscription_id(subscription_type: str, property_name: str | None) -> int:
    if property_name is None:
        return 100 + sum(subscription_type.encode())
    return 1000 + int(hashlib.sha256(property_name.encode()).hexdigest()[:6], 16) % 100_000


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _validation("Invalid input JSON: expected an object")
    return body


def _properties_of(item: Mapping[str, Any], key: str) -> dict[str, str]:
    raw = item.get(key) or {}
    if not isinstance(raw, dict):
        raise _validation(f"Invalid input JSON: {key} must be an object")
    return {str(name): _stringify(value) for name, value in raw.items()}


def _properties_param(query: list[tuple[str, str]]) -> list[str] | None:
    names = [
        name.strip()
        for key, value in query
        if key == "properties"
        for name in value.split(",")
        if name.strip()
    ]
    return names or None


def _int_param(value: Any, name: str, default: int) -> int:
    if value in (None, ""):
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise _validation(f"Invalid value for {name}: {value!r} is not an integer") from None
    if number < 0:
        raise _validation(f"Invalid value for {name}: {number} is negative")
    return number


def _object_not_found(object_id: str) -> HubSpotError:
    return HubSpotError(
        404,
        f"Object not found.  objectId are usually numeric. (id: {object_id})",
        "OBJECT_NOT_FOUND",
        context={"id": [object_id]},
    )


def _not_found_error(ids: list[str]) -> dict[str, Any]:
    return {
        "status": "error",
        "category": "OBJECT_NOT_FOUND",
        "message": "Could not get some CONTACT objects, they may be deleted or not exist. "
        "Check that ids are valid.",
        "context": {"ids": ids},
    }


def _conflict(existing_id: str) -> HubSpotError:
    return HubSpotError(409, f"Contact already exists. Existing ID: {existing_id}", "CONFLICT")


def _not_found_route(method: str, path: str) -> HubSpotError:
    return HubSpotError(
        404, f"No route for {method} {path} in the fake HubSpot API", "OBJECT_NOT_FOUND"
    )


@asynccontextmanager
async def running_fake_hubspot(access_token: str = DEFAULT_TOKEN) -> AsyncIterator[FakeHubSpot]:
    """Serve a fresh `FakeHubSpot` accepting `access_token` on 127.0.0.1 until the block
    ends; its webhook sender stops with it."""
    sock, base_url = bind_local_socket()
    fake = FakeHubSpot(base_url, access_token)
    try:
        async with serving_in_thread(
            fake, sock, name="fake-hubspot", lifespan="off", graceful_shutdown=1
        ):
            yield fake
    finally:
        await asyncio.to_thread(fake.close)
