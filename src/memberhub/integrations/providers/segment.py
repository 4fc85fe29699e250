"""Segment: members' events through the HTTP Tracking API, batched.

Each request is one `POST /v1/batch` with `identify` calls (the member's traits: tier,
status, points balance) and `track` calls (one per event), authenticated with the
source's write key as the Basic user name. Segment takes at most 500 KB per batch request
and 32 KB per call within it, and answers 400 beyond either; a batch is packed under both
(a call larger than 32 KB on its own is never sent and is reported instead). Every call's
`messageId` is derived from our event id, so a batch sent twice after a lost answer is
deduplicated by Segment. Segment answers 200 to everything else, even calls it drops: the
source's Debugger is where those show.

Deletion: the Tracking API has none. With a Public API token (`public_api_token`, a
workspace token with the Source Admin or Workspace Owner role), withdrawing consent files
a `SUPPRESS_WITH_DELETE` regulation for the member's `userId` through `POST /regulations`
of the Public API; without one, nothing more is sent and the member's data at Segment
stays until deleted there.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar
from urllib.parse import urlsplit

import httpx
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
    SinkRefused,
    SinkRequest,
    SinkUnavailable,
)

WriteKey = Annotated[str, StringConstraints(strip_whitespace=True, min_length=8, max_length=200)]
Token = Annotated[str, StringConstraints(strip_whitespace=True, min_length=8, max_length=500)]

BATCH_PATH = "/v1/batch"
REGULATIONS_PATH = "/regulations"
# Segment's limits: 500 KB per batch request, 32 KB per call (read as thousands of bytes,
# the stricter reading).
MAX_BATCH_BYTES = 500_000
MAX_CALL_BYTES = 32_000
# Segment keeps messageId to 100 characters.
MAX_MESSAGE_ID_CHARS = 100
# The batch's envelope around its calls: {"batch":[…],"sentAt":"…"} and the commas.
_ENVELOPE_BYTES = 64
DEFAULT_MAPPING: dict[str, str] = {
    "member.created": "Member Created",
    "member.status.changed": "Membership Status Changed",
    "member.tier.changed": "Tier Changed",
    "points.earned": "Points Earned",
    "points.redeemed": "Points Redeemed",
    "points.deducted": "Points Deducted",
    "points.adjusted": "Points Adjusted",
    "points.expired": "Points Expired",
    "reward.claimed": "Reward Claimed",
}


PUBLIC_API_URL = "https://api.segmentapis.com"


class SegmentConfig(BaseConfig):
    public_api_url: str = Field(
        default=PUBLIC_API_URL,
        max_length=2048,
        description="The Public API, where deletion regulations are filed "
        "(https://eu1.api.segmentapis.com for EU workspaces).",
    )
    regulation_type: str = Field(
        default="SUPPRESS_WITH_DELETE",
        pattern=r"^(SUPPRESS_WITH_DELETE|DELETE_ONLY|SUPPRESS_ONLY)$",
        description="What a withdrawal of consent asks of Segment's Public API.",
    )


class SegmentCredentials(BaseCredentials):
    write_key: WriteKey = Field(description="The HTTP API source's write key.")
    public_api_token: Token | None = Field(
        default=None,
        description="A Public API token, to ask Segment to delete a member's data when they "
        "withdraw consent. Optional: without it no deletion is requested.",
    )


_CONTEXT: dict[str, Any] = {"library": {"name": "memberhub", "version": "1"}}
# One encoder for every call: `json.dumps` with options builds a new one each time.
_ENCODER = json.JSONEncoder(separators=(",", ":"), default=str)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _encode(value: Any) -> bytes:
    return _ENCODER.encode(value).encode()


class Segment(Provider):
    name = "segment"
    title = "Segment"
    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.ANALYTICS_SINK})
    config_model = SegmentConfig
    credentials_model = SegmentCredentials
    base_url = "https://api.segment.io"
    consent_purpose = "analytics"
    # No hard limit is published; Segment asks to stay under 500 requests a second. Retries
    # are few: the sink schedules its own, so a down vendor never holds a worker tick long.
    policy: ClassVar[GatewayPolicy] = GatewayPolicy(
        rate_limit="500 per second", max_attempts=2, timeout=15.0, backoff_max=2.0
    )

    def outbound_urls(self, config: BaseConfig) -> dict[str, str]:
        assert isinstance(config, SegmentConfig)
        if config.public_api_url == PUBLIC_API_URL:  # Segment's own, as the base URL's is
            return {}
        return {"config.public_api_url": config.public_api_url}  # with the API token

    def auth_headers(self, credentials: Mapping[str, Any]) -> dict[str, str]:
        write_key = credentials.get("write_key")
        if not write_key:
            return {}
        basic = base64.b64encode(f"{write_key}:".encode()).decode("ascii")
        return {"Authorization": f"Basic {basic}"}

    def request_auth_headers(
        self, credentials: Mapping[str, Any], request: httpx.Request
    ) -> dict[str, str]:
        # The Public API (deletion) takes a bearer token, the Tracking API the write key.
        if request.url.path.startswith(REGULATIONS_PATH) and credentials.get("public_api_token"):
            return {"Authorization": f"Bearer {credentials['public_api_token']}"}
        return self.auth_headers(credentials)

    async def check_connection(self, connection: Connection) -> str:
        response = await connection.gateway.request(
            "POST", BATCH_PATH, json={"batch": []}, retry_safe=True
        )
        if response.status_code != 200:
            raise ConnectionFailed(f"Segment answered {response.status_code}: {_error(response)}")
        return (
            "Segment accepted an empty batch (the HTTP API accepts any write key: events sent "
            "with a wrong one show in no source's Debugger)"
        )

    # ------------------------------------------------------------ events

    def default_mapping(self) -> Mapping[str, str]:
        return DEFAULT_MAPPING

    def mapping_errors(self, mapping: Mapping[str, str]) -> list[str]:
        return []  # Segment takes any event name

    def calls(self, event: SinkEvent, timestamp: str | None = None) -> list[dict[str, Any]]:
        """The identify (when the member's traits changed) and track calls of an event;
        `timestamp`, when given, is the event's time as Segment reads it."""
        if timestamp is None:
            timestamp = _iso(event.occurred_at)
        calls: list[dict[str, Any]] = []
        if event.identify:
            calls.append(
                {
                    "type": "identify",
                    "userId": event.member_id,
                    "traits": dict(event.traits),
                    "messageId": f"{event.id}-identify"[:MAX_MESSAGE_ID_CHARS],
                    "timestamp": timestamp,
                    "context": _CONTEXT,
                }
            )
        calls.append(
            {
                "type": "track",
                "userId": event.member_id,
                "event": event.name,
                "properties": dict(event.properties),
                "messageId": event.id[:MAX_MESSAGE_ID_CHARS],
                "timestamp": timestamp,
                "context": _CONTEXT,
            }
        )
        return calls

    def plan_requests(
        self, config: BaseConfig, events: Sequence[SinkEvent]
    ) -> tuple[list[SinkRequest], list[tuple[SinkEvent, str]]]:
        requests: list[SinkRequest] = []
        refused: list[tuple[SinkEvent, str]] = []
        # Each call is encoded once: to measure it, and as part of the body sent.
        calls: list[dict[str, Any]] = []
        encoded: list[bytes] = []
        in_batch: list[SinkEvent] = []
        size = _ENVELOPE_BYTES

        def close() -> None:
            nonlocal calls, encoded, in_batch, size
            if calls:
                sent_at = _iso(datetime.now(UTC))
                body = {"batch": calls, "sentAt": sent_at}
                content = b'{"batch":[' + b",".join(encoded) + b'],"sentAt":"'
                content += sent_at.encode() + b'"}'
                requests.append(SinkRequest(tuple(in_batch), body, BATCH_PATH, content))
            calls, encoded, in_batch, size = [], [], [], _ENVELOPE_BYTES

        # Events emitted together share their time: each is formatted once.
        stamps: dict[datetime, str] = {}
        for event in events:
            stamp = stamps.get(event.occurred_at)
            if stamp is None:
                stamp = stamps[event.occurred_at] = _iso(event.occurred_at)
            event_calls = self.calls(event, stamp)
            event_encoded = [_encode(call) for call in event_calls]
            if max(len(item) for item in event_encoded) > MAX_CALL_BYTES:
                refused.append((event, f"larger than Segment's {MAX_CALL_BYTES:,} bytes a call"))
                continue
            needed = sum(len(item) + 1 for item in event_encoded)
            if size + needed > MAX_BATCH_BYTES:
                close()
            calls.extend(event_calls)
            encoded.extend(event_encoded)
            in_batch.append(event)
            size += needed
        close()
        return requests, refused

    async def send(self, connection: Connection, request: SinkRequest) -> None:
        # Safe to resend: Segment deduplicates on messageId.
        if request.content is not None:
            response = await connection.gateway.request(
                "POST",
                request.path,
                content=request.content,
                headers={"Content-Type": "application/json"},
                retry_safe=True,
            )
        else:
            response = await connection.gateway.request(
                "POST", request.path, json=request.body, retry_safe=True
            )
        if response.status_code == 400:
            raise SinkRefused(f"Segment refused the batch: {_error(response)}")
        if response.status_code >= 300:
            raise SinkUnavailable(f"Segment answered {response.status_code}: {_error(response)}")

    async def request_deletion(self, connection: Connection, member_id: str) -> bool:
        if not connection.credentials.get("public_api_token"):
            return False
        config = connection.config
        assert isinstance(config, SegmentConfig)
        url = config.public_api_url.rstrip("/") + REGULATIONS_PATH
        if urlsplit(url).scheme not in ("http", "https"):
            raise SinkUnavailable("the Public API URL is not an http(s) URL")
        response = await connection.gateway.request(
            "POST",
            url,
            json={
                "regulationType": config.regulation_type,
                "subjectType": "USER_ID",
                "subjectIds": [member_id],
            },
            retry_safe=True,
        )
        if response.status_code >= 300:
            # The request itself refused (400, 404, 422): filing it again cannot change that;
            # the token refused, or no answer: it may be fixed, and is tried again.
            refused = SinkRefused if response.status_code in (400, 404, 422) else SinkUnavailable
            raise refused(
                f"Segment's Public API refused the deletion ({response.status_code}): "
                f"{_error(response)}"
            )
        return True


def _error(response: httpx.Response) -> str:
    try:
        answer = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(answer, dict):
        errors = answer.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            return str(errors[0].get("message", ""))[:300]
        for key in ("message", "error"):
            if isinstance(answer.get(key), str):
                return str(answer[key])[:300]
    return response.text[:300]
