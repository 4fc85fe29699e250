from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, Field, StringConstraints

from memberhub.kit.types import Input, Name, PatchInput
from memberhub.members.schemas import OrganisationRef
from memberhub.sinks.schemas import SinkStatus

ProviderName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]{1,50}$")]
Reason = Annotated[str, StringConstraints(max_length=500, pattern=r"^[^\x00]*$")]
Url = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=2048, pattern=r"^[^\s]+$"),
]
PublicRef = Annotated[str, StringConstraints(min_length=1, max_length=45)]


class IntegrationCreate(Input):
    provider: ProviderName = Field(description="See GET /api/v1/integration-providers.")
    name: Name
    organisation_id: OrganisationRef | None = None
    config: dict[str, Any] = Field(default_factory=dict, description="Provider settings.")
    credentials: dict[str, Any] = Field(
        default_factory=dict,
        description="Secrets (API keys, signing secrets): stored encrypted, never returned.",
    )


class IntegrationPatch(PatchInput):
    """`config` replaces the whole config; `credentials` sets the keys given (null removes
    one) and keeps the others."""

    not_nullable = ("name", "config", "credentials", "enabled")

    name: Name | None = None
    config: dict[str, Any] | None = None
    credentials: dict[str, Any] | None = None
    enabled: bool | None = None
    disabled_reason: Reason | None = None


class OAuthState(BaseModel):
    connected: bool
    expires_at: datetime | None


class IntegrationOut(BaseModel):
    id: str
    provider: str
    name: str
    organisation_id: str | None
    capabilities: list[str]
    config: dict[str, Any]
    credentials: dict[str, Any] = Field(
        description="Each credential's last four characters only (`…abcd`)."
    )
    oauth: OAuthState | None
    inbound_url: str | None = Field(description="Where the provider sends its webhooks.")
    enabled: bool
    disabled_reason: str | None
    last_success_at: datetime | None
    last_failure_at: datetime | None
    incident_opened_at: datetime | None
    created_at: datetime
    updated_at: datetime


class ProviderOut(BaseModel):
    name: str
    title: str
    capabilities: list[str]
    oauth: bool
    config_schema: dict[str, Any]
    credentials_schema: dict[str, Any]


class ConnectionTest(BaseModel):
    ok: bool
    message: str
    duration_ms: int


class InboundEventOut(BaseModel):
    id: str
    integration_id: str
    provider_event_id: str
    event_type: str
    status: str
    attempts: int
    duplicates: int
    result: dict[str, Any]
    error: str | None
    source_ip: str | None
    received_at: datetime
    processed_at: datetime | None
    next_attempt_at: datetime | None


class InboundEventDetail(InboundEventOut):
    headers: dict[str, Any]
    body: str


class InboundAccepted(BaseModel):
    id: str
    status: str = Field(description="accepted, or duplicate for an event already received.")


class CallOut(BaseModel):
    method: str
    url: str
    outcome: str
    status: int | None
    attempts: int
    duration_ms: int
    started_at: datetime
    request_headers: dict[str, Any]
    request_body: str
    response_body: str
    error: str | None


class LatencyOut(BaseModel):
    p50: float | None
    p95: float | None
    p99: float | None


class IncidentOut(BaseModel):
    opened_at: datetime
    closed_at: datetime | None
    reason: str


class HealthOut(BaseModel):
    integration_id: str
    window_hours: float
    calls: int
    succeeded: int
    client_errors: int
    failed: int
    success_rate: float | None = Field(
        description="Percent of calls in the window that succeeded; null without calls."
    )
    latency_ms: LatencyOut
    last_success_at: datetime | None
    last_failure_at: datetime | None
    last_error: str | None
    open_incident: IncidentOut | None
    incidents: int = Field(description="Incidents opened in the last 30 days.")
    mean_time_to_recovery_seconds: float | None
    uptime_percent: float | None = Field(
        description="Percent of the last 30 days (or of the integration's life, if shorter) "
        "without an open incident."
    )
    breaker_state: str | None = Field(
        description="This API process's circuit breaker for the integration, if it made calls."
    )
    inbound_pending: int
    inbound_failed: int
    healthy: bool


class MarketingSyncBrief(BaseModel):
    """A marketing list's audience sync, for the sync status (details under
    `/integrations/{id}/marketing`)."""

    last_synced_at: datetime | None
    last_full_sync_at: datetime | None
    last_run_requests: int
    last_run_writes: int
    failures: int
    last_error: str | None


class IntegrationStatus(BaseModel):
    id: str
    provider: str
    name: str
    enabled: bool
    healthy: bool
    last_success_at: datetime | None
    last_failure_at: datetime | None
    open_incident_since: datetime | None
    inbound_pending: int
    inbound_failed: int
    marketing: MarketingSyncBrief | None = Field(
        default=None, description="The audience sync, for marketing-list integrations."
    )


class SyncStatusOut(BaseModel):
    last_sync: datetime | None = Field(
        description="The latest successful call or processed inbound event of any integration."
    )
    pending_updates: int = Field(description="Inbound events waiting to be processed.")
    sync_errors: int = Field(
        description="Inbound events that failed, plus integrations with an open incident or "
        "a failing audience sync."
    )
    connected: list[str] = Field(description="Providers with an enabled integration.")
    integrations: list[IntegrationStatus]
    event_sinks: list[SinkStatus] = Field(
        default_factory=list,
        description="Each event sink: its lag behind the feed, health and events sent.",
    )


class AuthorizeOut(BaseModel):
    authorization_url: str
    expires_at: datetime


class CallbackOut(BaseModel):
    integration_id: str
    connected: bool
    expires_at: datetime | None


class CheckoutCreate(Input):
    member_id: PublicRef
    plan_id: PublicRef
    success_url: Url
    cancel_url: Url | None = None


class CheckoutOut(BaseModel):
    id: str
    url: str
    mode: str
    customer_id: str
