"""Google Analytics 4: members' events through the Measurement Protocol.

A request is `POST /mp/collect?measurement_id=…&api_secret=…` carrying one user's events:
`client_id` and `user_id` are request fields, so events are grouped per member, at most
25 to a request (the protocol's limit), in their order. `user_id` is the member id;
`client_id` is the member's own analytics client id when `external_ids` holds one under
`client_id_key` (the `_ga` cookie's id, joining server events to the browser's session),
else a stable id derived from the member id. The member's tier, status and points balance
go as user properties. `consent.ad_user_data` is always DENIED (no member agreed to data
for advertising); `ad_personalization` follows the member's `profiling` consent.

Event names: `sign_up`, `join_group`, `earn_virtual_currency`, `spend_virtual_currency` and
`level_up` are GA4's recommended events and get their documented parameters; any other
name is a custom event whose parameters are the event's plain values. Names and values
are kept within the protocol's limits (40 characters a name, 100 a value, 25 parameters,
user properties 24 and 36); events GA4 would reject (a reserved name) are reported, never
sent.

The collection endpoint answers 2xx even to a payload it drops; `/debug/mp/collect`
answers with `validationMessages` instead and records nothing. The connection test sends
a sample request there, and a dry run can validate what it would send. GA4 has no
deletion through the Measurement Protocol (the separate User Deletion API needs OAuth
on the property): withdrawing consent stops further events, nothing more.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, timedelta
from typing import Annotated, Any, ClassVar

from pydantic import Field, StringConstraints

from memberhub.integrations.gateway import GatewayPolicy
from memberhub.integrations.providers.base import (
    BaseConfig,
    BaseCredentials,
    Capability,
    Connection,
    ConnectionFailed,
    Provider,
    SinkEvent,
    SinkRequest,
    SinkUnavailable,
)
from memberhub.kit.clock import utcnow

MeasurementId = Annotated[
    str, StringConstraints(strip_whitespace=True, pattern=r"^G-[A-Z0-9]{4,20}$")
]
ApiSecret = Annotated[str, StringConstraints(strip_whitespace=True, min_length=8, max_length=200)]

COLLECT_PATH = "/mp/collect"
DEBUG_PATH = "/debug/mp/collect"
MAX_EVENTS_PER_REQUEST = 25
MAX_PARAMS_PER_EVENT = 25
MAX_NAME_CHARS = 40
MAX_PARAM_VALUE_CHARS = 100
MAX_USER_PROPERTY_NAME_CHARS = 24
MAX_USER_PROPERTY_VALUE_CHARS = 36
MAX_BODY_BYTES = 130_000
# GA4 takes events dated up to 72 hours back (`timestamp_micros`) and silently drops older
# ones: those are refused here, where the delivery log shows them, a few minutes early so
# that a request on its way does not cross the line.
MAX_EVENT_AGE = timedelta(hours=72) - timedelta(minutes=5)
NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,39}$")
RESERVED_NAMES = frozenset(
    {
        "ad_activeview",
        "ad_click",
        "ad_exposure",
        "ad_impression",
        "ad_query",
        "ad_reward",
        "adunit_exposure",
        "app_background",
        "app_clear_data",
        "app_exception",
        "app_remove",
        "app_store_refund",
        "app_store_subscription_cancel",
        "app_store_subscription_convert",
        "app_store_subscription_renew",
        "app_update",
        "app_upgrade",
        "dynamic_link_app_open",
        "dynamic_link_app_update",
        "dynamic_link_first_open",
        "error",
        "first_open",
        "first_visit",
        "in_app_purchase",
        "notification_dismiss",
        "notification_foreground",
        "notification_open",
        "notification_receive",
        "os_update",
        "session_start",
        "session_start_with_rollout",
        "user_engagement",
    }
)
RESERVED_PREFIXES = ("_", "firebase_", "ga_", "google_", "gtag.")
DEFAULT_MAPPING: dict[str, str] = {
    "member.created": "sign_up",
    "member.status.changed": "join_group",
    "member.tier.changed": "level_up",
    "points.earned": "earn_virtual_currency",
    "points.redeemed": "spend_virtual_currency",
    "points.expired": "points_expired",
    "reward.claimed": "reward_claimed",
}
VIRTUAL_CURRENCY = "points"


class Ga4Config(BaseConfig):
    measurement_id: MeasurementId = Field(
        description="The web data stream's Measurement ID (G-…), under Admin → Data streams."
    )
    client_id_key: str = Field(
        default="ga4_client_id",
        pattern=r"^[a-z0-9][a-z0-9_-]{0,39}$",
        description="The member's `external_ids` key holding their analytics client id.",
    )


class Ga4Credentials(BaseCredentials):
    api_secret: ApiSecret = Field(
        description="A Measurement Protocol API secret of the data stream."
    )


def name_problem(name: str) -> str | None:
    """Why GA4 would not take `name` as an event name; None when it would."""
    if not NAME.match(name):
        return (
            f"{name!r} is not a GA4 event name: letters, digits and underscores, starting "
            f"with a letter, at most {MAX_NAME_CHARS} characters"
        )
    lowered = name.lower()
    if lowered in RESERVED_NAMES or lowered.startswith(RESERVED_PREFIXES):
        return f"{name!r} is reserved by GA4"
    return None


def _param_name(key: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_]", "_", key).lstrip("_") or "value"
    if not cleaned[0].isalpha():
        cleaned = f"p_{cleaned}"
    return cleaned[:MAX_NAME_CHARS]


def _param_value(value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float):
        return value
    return str(value)[:MAX_PARAM_VALUE_CHARS]


def client_id_for(member_id: str) -> str:
    """A stable client id for a member without one of their own, shaped like GA's
    (two integers joined by a dot)."""
    digest = hashlib.sha256(member_id.encode()).digest()
    first = int.from_bytes(digest[:4], "big")
    second = int.from_bytes(digest[4:8], "big")
    return f"{first}.{second}"


class Ga4(Provider):
    name = "ga4"
    title = "Google Analytics 4"
    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.ANALYTICS_SINK})
    config_model = Ga4Config
    credentials_model = Ga4Credentials
    base_url = "https://www.google-analytics.com"
    consent_purpose = "analytics"
    policy: ClassVar[GatewayPolicy] = GatewayPolicy(
        rate_limit="200 per second", max_attempts=2, timeout=15.0, backoff_max=2.0
    )

    def auth_headers(self, credentials: Mapping[str, Any]) -> dict[str, str]:
        return {}  # the API secret goes in the query string, as the protocol requires

    async def check_connection(self, connection: Connection) -> str:
        sample = {
            "client_id": client_id_for("connection-test"),
            "events": [
                {"name": "memberhub_connection_test", "params": {"engagement_time_msec": 1}}
            ],
        }
        messages = await self.validation_messages(connection, sample)
        if messages:
            raise ConnectionFailed("GA4's validation server: " + "; ".join(messages))
        return "GA4's validation server accepted a sample event for the measurement id"

    # ------------------------------------------------------------ events

    def default_mapping(self) -> Mapping[str, str]:
        return DEFAULT_MAPPING

    def mapping_errors(self, mapping: Mapping[str, str]) -> list[str]:
        return [problem for name in mapping.values() if (problem := name_problem(name))]

    def event_params(self, event: SinkEvent) -> dict[str, Any]:
        """The event's parameters: a recommended event's documented ones, else its plain
        values."""
        props = event.properties
        params: dict[str, Any]
        if event.name == "sign_up":
            params = {"method": "memberhub"}
        elif event.name == "join_group":
            params = {"group_id": _param_value(props.get("plan_id") or "membership")}
            if props.get("to_status") is not None:
                params["status"] = _param_value(props["to_status"])
        elif event.name in ("earn_virtual_currency", "spend_virtual_currency"):
            params = {
                "virtual_currency_name": VIRTUAL_CURRENCY,
                "value": abs(int(props.get("points") or 0)),
            }
            if event.name == "spend_virtual_currency":
                params["item_name"] = _param_value(props.get("reason") or event.type)
        elif event.name == "level_up":
            params = {"character": _param_value(props.get("new_tier") or "none")}
        else:
            params = {}
            for key, value in props.items():
                if value is None or isinstance(value, dict | list):
                    continue
                params[_param_name(key)] = _param_value(value)
        params["event_id"] = event.id
        params["engagement_time_msec"] = 1
        return dict(list(params.items())[:MAX_PARAMS_PER_EVENT])

    def _user_properties(self, event: SinkEvent) -> dict[str, Any]:
        properties: dict[str, Any] = {}
        for key, value in event.traits.items():
            if value is None:
                continue
            name = _param_name(key)[:MAX_USER_PROPERTY_NAME_CHARS]
            shown = (
                value
                if isinstance(value, int | float) and not isinstance(value, bool)
                else (str(value)[:MAX_USER_PROPERTY_VALUE_CHARS])
            )
            properties[name] = {"value": shown}
        return properties

    def _body(self, events: Sequence[SinkEvent]) -> dict[str, Any]:
        first = events[0]
        body: dict[str, Any] = {
            "client_id": first.client_id or client_id_for(first.member_id),
            "user_id": first.member_id,
            "timestamp_micros": int(first.occurred_at.astimezone(UTC).timestamp() * 1_000_000),
            "consent": {
                "ad_user_data": "DENIED",
                "ad_personalization": "GRANTED" if first.consent.get("profiling") else "DENIED",
            },
            "user_properties": self._user_properties(events[-1]),
            "events": [
                {
                    "name": event.name,
                    "params": self.event_params(event),
                    "timestamp_micros": int(
                        event.occurred_at.astimezone(UTC).timestamp() * 1_000_000
                    ),
                }
                for event in events
            ],
        }
        return body

    def plan_requests(
        self, config: BaseConfig, events: Sequence[SinkEvent]
    ) -> tuple[list[SinkRequest], list[tuple[SinkEvent, str]]]:
        refused: list[tuple[SinkEvent, str]] = []
        oldest = utcnow() - MAX_EVENT_AGE
        # One open request per member; a request is placed where its first event was.
        groups: list[list[SinkEvent]] = []
        open_group: dict[str, list[SinkEvent]] = {}
        for event in events:
            problem = name_problem(event.name)
            if problem is None and event.occurred_at < oldest:
                problem = "GA4 takes events up to 72 hours old; this one is older"
            if problem is not None:
                refused.append((event, problem))
                continue
            group = open_group.get(event.member_id)
            if group is None or len(group) >= MAX_EVENTS_PER_REQUEST:
                group = []
                groups.append(group)
                open_group[event.member_id] = group
            group.append(event)
        requests = [SinkRequest(tuple(group), self._body(group), COLLECT_PATH) for group in groups]
        return requests, refused

    def _params(self, connection: Connection) -> dict[str, str]:
        config = connection.config
        assert isinstance(config, Ga4Config)
        return {
            "measurement_id": config.measurement_id,
            "api_secret": str(connection.credentials.get("api_secret", "")),
        }

    async def send(self, connection: Connection, request: SinkRequest) -> None:
        response = await connection.gateway.request(
            "POST", request.path, params=self._params(connection), json=request.body
        )
        # The protocol answers 2xx to anything it receives, valid or not.
        if not 200 <= response.status_code < 300:
            raise SinkUnavailable(f"GA4 answered {response.status_code}")

    async def validation_messages(
        self, connection: Connection, body: Mapping[str, Any]
    ) -> list[str]:
        """What GA4's validation server says of a request body (nothing is recorded)."""
        response = await connection.gateway.request(
            "POST", DEBUG_PATH, params=self._params(connection), json=dict(body), retry_safe=True
        )
        if response.status_code != 200:
            raise ConnectionFailed(f"GA4's validation server answered {response.status_code}")
        try:
            answer = response.json()
        except ValueError:
            raise ConnectionFailed("GA4's validation server answered something not JSON") from None
        messages = answer.get("validationMessages") if isinstance(answer, dict) else None
        if not isinstance(messages, list):
            raise ConnectionFailed("GA4's validation server gave no validationMessages")
        return [
            f"{m.get('fieldPath', '')}: {m.get('description', '')} ({m.get('validationCode', '')})"
            for m in messages
            if isinstance(m, dict)
        ]

    async def request_deletion(self, connection: Connection, member_id: str) -> bool:
        return False  # the Measurement Protocol has no deletion
