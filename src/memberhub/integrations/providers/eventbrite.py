"""Eventbrite (API v3): attendees of chosen events become `event.registered` and
`event.attended` activities.

Eventbrite's webhooks are not signed and carry no data: the body names an action and an
`api_url` to fetch (`{"config": {"action": "order.placed", ...}, "api_url":
"https://www.eventbriteapi.com/v3/orders/123/"}`). Nothing in the body is trusted: the
`api_url` is followed only when it points at the integration's Eventbrite API host, and it
is fetched through the gateway with the integration's own token, so what is recorded is
what Eventbrite says, never what the sender claims.

Each attendee gives one activity per kind, with the source id `<attendee id>:registered`
or `<attendee id>:attended`: a repeated webhook, an update of an attendee already seen and
a re-import are replays and earn nothing again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import EmailStr, Field, StringConstraints, TypeAdapter, ValidationError

from memberhub.activities.schemas import ActivityAttributes, ActivityIn
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
    OAuthSettings,
    Provider,
    aware_time,
)
from memberhub.kit.clock import utcnow
from memberhub.kit.types import Input

SOURCE = "eventbrite"
REGISTERED = "event.registered"
ATTENDED = "event.attended"
# The actions that lead to activities; others (the test ping on creating a webhook, event
# changes) are stored and ignored.
ACTIONS = frozenset({"order.placed", "attendee.updated", "attendee.checked_in"})
MAX_EVENT_ID_CHARS = 255
# Pages of one import, at Eventbrite's 50 attendees a page: 100,000 attendees per event.
MAX_PAGES = 2000

Secret = Annotated[str, StringConstraints(strip_whitespace=True, min_length=8, max_length=500)]
EventId = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,30}$")]
_email = TypeAdapter(EmailStr)


class EventbriteEvent(Input):
    event_id: EventId = Field(description="The Eventbrite event's id (digits).")
    cpd_hours: float | None = Field(
        default=None,
        ge=0,
        le=1000,
        allow_inf_nan=False,
        description="CPD hours attending it is worth, recorded on its `event.attended` "
        "activities as `cpd_hours`.",
    )


class EventbriteConfig(BaseConfig):
    events: list[EventbriteEvent] = Field(
        default_factory=list,
        max_length=500,
        description="The events whose attendees are imported and whose webhooks act; "
        "empty: webhooks of every event of the account act (without CPD hours) and there "
        "is nothing to import.",
    )

    def event(self, event_id: str) -> EventbriteEvent | None:
        return next((e for e in self.events if e.event_id == event_id), None)


class EventbriteCredentials(BaseCredentials):
    private_token: Secret | None = Field(
        default=None, description="The API key's private token (Account settings → API keys)."
    )
    access_token: Secret | None = Field(default=None, description="An OAuth access token.")
    client_id: Secret | None = None
    client_secret: Secret | None = None


class EventbriteError(ConnectionFailed):
    """Eventbrite refused a request (bad token, unknown event): the message says why."""


class UntrustedUrl(ValueError):
    """A webhook's `api_url` that does not point at the integration's Eventbrite API."""


def api_path(api_url: str, base_url: str) -> str:
    """The path (and query) of an `api_url` on the Eventbrite API at `base_url`.

    Raises UntrustedUrl unless the URL has the base URL's scheme, host and port and a
    path under `/v3/`: a webhook must not make memberhub call anywhere else."""
    try:
        url, base = urlsplit(api_url), urlsplit(base_url)
        origin = (url.scheme, url.hostname, url.port)
        same_origin = origin == (base.scheme, base.hostname, base.port)
    except ValueError:
        same_origin = False
    if not same_origin or url.username or url.password:
        raise UntrustedUrl(f"api_url does not point at the Eventbrite API ({base_url})")
    if not url.path.startswith("/v3/") or ".." in url.path or "\\" in url.path:
        raise UntrustedUrl("api_url is not an Eventbrite API v3 resource")
    return url.path + (f"?{url.query}" if url.query else "")


def _notification(body: bytes) -> tuple[str, str]:
    """The action and api_url of a webhook body; ValueError if it is not one."""
    try:
        payload = json.loads(body)
    except RecursionError:  # nested deeper than any parser goes: no webhook
        raise ValueError("the body is not an Eventbrite webhook (nested too deep)") from None
    config = payload.get("config") if isinstance(payload, dict) else None
    action = config.get("action") if isinstance(config, dict) else None
    api_url = payload.get("api_url") if isinstance(payload, dict) else None
    if not isinstance(action, str) or not action or not isinstance(api_url, str):
        raise ValueError("the body is not an Eventbrite webhook (config.action, api_url)")
    return action[:MAX_EVENT_ID_CHARS], api_url


def _error_message(status: int, text: str) -> str:
    """Eventbrite's `error_description`, or the start of the body."""
    try:
        body = json.loads(text)
        message = f"{body['error']}: {body.get('error_description', '')}"
    except (ValueError, KeyError, TypeError):
        message = text[:200]
    return f"Eventbrite answered {status}: {message}"


class Eventbrite(Provider):
    name = "eventbrite"
    title = "Eventbrite"
    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.EVENTS_SOURCE})
    config_model = EventbriteConfig
    credentials_model = EventbriteCredentials
    base_url = "https://www.eventbriteapi.com"
    # 2,000 calls an hour per OAuth token or private token.
    policy: ClassVar[GatewayPolicy] = GatewayPolicy(rate_limit="2000 per hour")
    oauth_defaults = OAuthSettings(
        authorize_url="https://www.eventbrite.com/oauth/authorize",
        token_url="https://www.eventbrite.com/oauth/token",
    )

    def auth_headers(self, credentials: Mapping[str, Any]) -> dict[str, str]:
        token = credentials.get("access_token") or credentials.get("private_token")
        return {"Authorization": f"Bearer {token}"} if token else {}

    async def check_connection(self, connection: Connection) -> str:
        if not self.auth_headers(connection.credentials):
            raise ConnectionFailed("credentials.private_token is not set")
        response = await connection.gateway.request("GET", "/v3/users/me/")
        if response.status_code != 200:
            raise ConnectionFailed(_error_message(response.status_code, response.text))
        user = response.json()
        return f"connected to Eventbrite as {user.get('name') or user.get('id', '?')}"

    # ------------------------------------------------------------ events source

    def verify(
        self, request: InboundRequest, connection_secrets: Mapping[str, Any], config: BaseConfig
    ) -> None:
        """Eventbrite signs nothing: a webhook is only a hint to fetch its `api_url`, which
        must point at the integration's Eventbrite API (refused otherwise)."""
        try:
            _, api_url = _notification(request.body)
            api_path(api_url, self.resolve_base_url(config) or "")
        except UntrustedUrl as exc:
            raise signatures.SignatureInvalid("untrusted_api_url", str(exc)) from None
        except (ValueError, UnicodeDecodeError):
            return  # identify() refuses it with the reason

    def identify(self, request: InboundRequest) -> InboundIdentity:
        """Eventbrite gives a notification no id: a resend within the same minute is a
        duplicate; a later one is stored again, and replays the activities it leads to."""
        action, api_url = _notification(request.body)
        digest = hashlib.sha256(f"{action} {api_url}".encode()).hexdigest()[:32]
        return InboundIdentity(event_id=f"{digest}:{int(request.now // 60)}", event_type=action)

    # ------------------------------------------------------------ activities

    async def fetch_webhook_activities(
        self, connection: Connection, event_type: str, payload: Mapping[str, Any]
    ) -> list[ActivityIn] | None:
        """The activities a webhook leads to, read from Eventbrite; None when the action
        leads to none. Raises UntrustedUrl for an `api_url` elsewhere than the API."""
        if event_type not in ACTIONS:
            return None
        config = connection.config
        assert isinstance(config, EventbriteConfig)
        path = api_path(str(payload.get("api_url", "")), self.resolve_base_url(config) or "")
        if event_type == "order.placed":
            order = await self._get(connection, path, params={"expand": "attendees"})
            attendees = order.get("attendees") or []
            kinds: tuple[Literal["registered", "attended"], ...] = ("registered",)
        else:
            attendees = [await self._get(connection, path)]
            kinds = ("registered", "attended")
        activities = []
        for attendee in attendees:
            if isinstance(attendee, dict):
                activities.extend(self.attendee_activities(config, attendee, kinds))
        return activities

    async def import_activities(self, connection: Connection) -> AsyncIterator[list[ActivityIn]]:
        """The activities of every attendee of the configured events, a page at a time,
        paged with Eventbrite's continuation token."""
        config = connection.config
        assert isinstance(config, EventbriteConfig)
        for event in config.events:
            continuation: str | None = None
            for _ in range(MAX_PAGES):
                params = {"continuation": continuation} if continuation else None
                page = await self._get(
                    connection, f"/v3/events/{event.event_id}/attendees/", params=params
                )
                activities = []
                for attendee in page.get("attendees") or []:
                    if isinstance(attendee, dict):
                        activities.extend(
                            self.attendee_activities(config, attendee, ("registered", "attended"))
                        )
                yield activities
                pagination = page.get("pagination") or {}
                continuation = pagination.get("continuation")
                if not pagination.get("has_more_items") or not continuation:
                    break

    def attendee_activities(
        self,
        config: EventbriteConfig,
        attendee: Mapping[str, Any],
        kinds: tuple[Literal["registered", "attended"], ...],
    ) -> list[ActivityIn]:
        """An attendee's registration (unless cancelled or refunded) and attendance (once
        checked in), for an event the integration acts on; none without a usable email."""
        attendee_id, event_id = str(attendee.get("id") or ""), str(attendee.get("event_id") or "")
        event = config.event(event_id)
        if not attendee_id or not event_id or (config.events and event is None):
            return []
        profile = attendee.get("profile") or {}
        try:
            email = _email.validate_python(profile.get("email"))
        except ValidationError:
            return []
        attributes: dict[str, Any] = {"event_id": event_id}
        if attendee.get("order_id"):
            attributes["order_id"] = str(attendee["order_id"])[:200]
        try:
            return _attendee_activities(attendee, event, kinds, email, attributes)
        except ValidationError:
            return []  # an id or attribute an activity cannot hold

    async def _get(
        self, connection: Connection, path: str, *, params: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        response = await connection.gateway.request("GET", path, params=params)
        if response.status_code != 200:
            raise EventbriteError(_error_message(response.status_code, response.text))
        body = response.json()
        if not isinstance(body, dict):
            raise EventbriteError("Eventbrite answered with something other than an object")
        return body


def _attendee_activities(
    attendee: Mapping[str, Any],
    event: EventbriteEvent | None,
    kinds: tuple[Literal["registered", "attended"], ...],
    email: str,
    attributes: dict[str, Any],
) -> list[ActivityIn]:
    attendee_id = str(attendee["id"])
    registered_at = aware_time(attendee.get("created"))
    changed_at = aware_time(attendee.get("changed")) or registered_at
    activities = []
    if "registered" in kinds and not (attendee.get("cancelled") or attendee.get("refunded")):
        activities.append(
            _activity(REGISTERED, f"{attendee_id}:registered", registered_at, email, attributes)
        )
    if "attended" in kinds and attendee.get("checked_in") is True:
        if event is not None and event.cpd_hours is not None:
            attributes = {**attributes, "cpd_hours": event.cpd_hours}
        attended_at = _checked_in_at(attendee) or changed_at
        activities.append(
            _activity(ATTENDED, f"{attendee_id}:attended", attended_at, email, attributes)
        )
    return activities


def _checked_in_at(attendee: Mapping[str, Any]) -> datetime | None:
    """When a barcode was scanned: the `changed` time of a barcode whose status is `used`."""
    for barcode in attendee.get("barcodes") or []:
        if isinstance(barcode, dict) and barcode.get("status") == "used":
            return aware_time(barcode.get("changed"))
    return None


def _activity(
    activity_type: str,
    source_id: str,
    occurred_at: datetime | None,
    email: str,
    attributes: dict[str, Any],
) -> ActivityIn:
    now = utcnow()
    return ActivityIn(
        type=activity_type,
        # Eventbrite's clock may run ahead of ours; an activity is never in the future.
        occurred_at=min(occurred_at or now, now),
        source=SOURCE,
        source_id=source_id,
        email=email,
        attributes=ActivityAttributes.model_validate(attributes),
    )
