"""HubSpot: connection (private-app token or OAuth) and signed webhooks (v3)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar

from pydantic import Field, StringConstraints

from memberhub.integrations import signatures
from memberhub.integrations.gateway import VENDOR_POLICIES, GatewayPolicy
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
)

Secret = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000)]


class HubSpotConfig(BaseConfig):
    webhook_url: str | None = Field(
        default=None,
        max_length=2048,
        description="The URL HubSpot calls, as configured in the app, when a proxy in front "
        "of memberhub changes it; it is part of the signed content.",
    )
    tolerance_seconds: int = Field(default=300, ge=30, le=3600)


class HubSpotCredentials(BaseCredentials):
    access_token: Secret | None = Field(default=None, description="A private app's token.")
    client_id: Secret | None = None
    client_secret: Secret | None = Field(
        default=None, description="The app's client secret: OAuth and webhook signatures."
    )
    refresh_token: Secret | None = None


class HubSpot(Provider):
    name = "hubspot"
    title = "HubSpot"
    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.EVENTS_SOURCE})
    config_model = HubSpotConfig
    credentials_model = HubSpotCredentials
    base_url = "https://api.hubapi.com"
    policy: ClassVar[GatewayPolicy] = VENDOR_POLICIES["hubspot"]
    oauth_defaults = OAuthSettings(
        authorize_url="https://app.hubspot.com/oauth/authorize",
        token_url="https://api.hubapi.com/oauth/v1/token",
        scopes=["crm.objects.contacts.read", "crm.objects.contacts.write"],
    )

    async def check_connection(self, connection: Connection) -> str:
        if not connection.credentials.get("access_token"):
            raise ConnectionFailed("no access token: set credentials.access_token or connect OAuth")
        response = await connection.gateway.request(
            "GET", "/crm/v3/objects/contacts", params={"limit": 1}
        )
        if response.status_code != 200:
            raise ConnectionFailed(
                f"HubSpot answered {response.status_code}: {response.text[:200]}"
            )
        return "connected to HubSpot"

    def verify(
        self, request: InboundRequest, connection_secrets: Mapping[str, Any], config: BaseConfig
    ) -> None:
        assert isinstance(config, HubSpotConfig)
        secret = connection_secrets.get("client_secret")
        if not secret:
            raise signatures.SignatureInvalid(
                signatures.NO_MATCHING_SIGNATURE,
                "the integration has no credentials.client_secret to verify with",
            )
        headers = {k.lower(): v for k, v in request.headers.items()}
        signatures.verify_hubspot_v3(
            method=request.method,
            uri=config.webhook_url or request.url,
            body=request.body,
            signature=headers.get("x-hubspot-signature-v3"),
            timestamp_ms=headers.get("x-hubspot-request-timestamp"),
            secret=secret,
            now=request.now,
            tolerance=config.tolerance_seconds,
        )

    def identify(self, request: InboundRequest) -> InboundIdentity:
        """HubSpot posts a batch: a JSON array of events, each with `eventId`. A retried
        batch is the same bytes, so the batch is known by its events' ids."""
        events = json.loads(request.body)
        if not isinstance(events, list) or not events:
            raise ValueError("the body is not a HubSpot batch of events")
        ids: list[str] = []
        types: set[str] = set()
        for event in events:
            if not isinstance(event, dict) or "eventId" not in event:
                raise ValueError("a HubSpot event has no eventId")
            ids.append(str(event["eventId"]))
            types.add(str(event.get("subscriptionType", "unknown")))
        joined = ",".join(ids)
        event_id = (
            joined if len(joined) <= 200 else "batch-" + hashlib.sha256(joined.encode()).hexdigest()
        )
        event_type = types.pop() if len(types) == 1 else "batch"
        return InboundIdentity(event_id=event_id, event_type=event_type[:255])
