"""The integrations registry: create, read, change and check integrations."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.audit.service import diff, record_write
from memberhub.auth.principal import Principal
from memberhub.integrations import vault
from memberhub.integrations.gateway import CircuitOpen, GatewayError
from memberhub.integrations.hub import IntegrationHub
from memberhub.integrations.models import (
    InboundEvent,
    InboundStatus,
    Integration,
    IntegrationCall,
    IntegrationIncident,
)
from memberhub.integrations.providers import get_provider, provider_names
from memberhub.integrations.providers.base import (
    BaseConfig,
    BaseCredentials,
    Capability,
    ConnectionFailed,
    Provider,
)
from memberhub.integrations.schemas import (
    ConnectionTest,
    HealthOut,
    InboundEventDetail,
    InboundEventOut,
    IncidentOut,
    IntegrationCreate,
    IntegrationOut,
    IntegrationPatch,
    IntegrationStatus,
    LatencyOut,
    MarketingSyncBrief,
    OAuthState,
    SyncStatusOut,
)
from memberhub.kit.clock import utcnow
from memberhub.kit.crypto import SecretBox
from memberhub.kit.errors import NotFound, ValidationFailed
from memberhub.kit.ids import new_public_id
from memberhub.kit.types import field_errors
from memberhub.marketing.models import MarketingSyncState
from memberhub.members.service import resolve_organisation
from memberhub.organisations.repository import OrganisationRepository
from memberhub.webhooks import ssrf

HEALTH_WINDOW = timedelta(hours=24)
INCIDENT_WINDOW = timedelta(days=30)
# Latency percentiles are taken over the window's latest calls, at most this many.
LATENCY_SAMPLE = 10_000
HEALTHY_SUCCESS_RATE = 95.0


class IntegrationNotFound(NotFound):
    code = "INTEGRATION_NOT_FOUND"


class InboundEventNotFound(NotFound):
    code = "INBOUND_EVENT_NOT_FOUND"


def require_provider(name: str) -> Provider:
    provider = get_provider(name)
    if provider is None:
        raise ValidationFailed(
            f"Unknown provider {name!r}.",
            details={"field": "provider", "providers": provider_names()},
            code="UNKNOWN_PROVIDER",
        )
    return provider


def _validated(
    provider: Provider, config: Mapping[str, Any], credentials: Mapping[str, Any]
) -> tuple[BaseConfig, BaseCredentials]:
    """The settings as the provider reads them; 422 naming each bad field otherwise."""
    errors: list[dict[str, Any]] = []
    parsed_config = parsed_credentials = None
    for where, model, value in (
        ("config", provider.config_model, config),
        ("credentials", provider.credentials_model, credentials),
    ):
        try:
            parsed = model.model_validate(dict(value))
        except ValidationError as exc:
            errors.extend(field_errors(exc, prefix=(where,)))
            continue
        if where == "config":
            parsed_config = parsed
        else:
            parsed_credentials = parsed
    if errors or parsed_config is None or parsed_credentials is None:
        raise ValidationFailed(
            f"The {provider.name} integration's settings are not valid.",
            details={"fields": errors},
        )
    assert isinstance(parsed_config, BaseConfig)
    assert isinstance(parsed_credentials, BaseCredentials)
    try:
        provider.validate(parsed_config, parsed_credentials)
    except ValueError as exc:
        raise ValidationFailed(str(exc)) from None
    return parsed_config, parsed_credentials


async def _check_urls(provider: Provider, config: BaseConfig, policy: ssrf.UrlPolicy) -> None:
    """The hosts a user configured (URLs, and other hosts such as an SMTP server) must be
    reachable under the outbound URL policy."""
    oauth = config.oauth
    urls = {
        "config.base_url": config.base_url,
        "config.oauth.token_url": oauth.token_url if oauth else None,
        # Storage providers' own clients (the S3 SDK) call this endpoint.
        "config.endpoint_url": getattr(config, "endpoint_url", None),
        **provider.outbound_urls(config),
    }
    for field, url in urls.items():
        if url is None:
            continue
        try:
            await ssrf.check_url(url, policy)
        except ssrf.WebhookUrlRefused as exc:
            raise ValidationFailed(
                f"{field} may not be used: {exc.message}",
                details={**exc.details, "field": field},
                code="INTEGRATION_URL_REFUSED",
            ) from None
    for field, (host, port) in provider.outbound_hosts(config).items():
        try:
            await ssrf.check_host(host, port, policy, what=f"{provider.title} host")
        except ssrf.WebhookUrlRefused as exc:
            raise ValidationFailed(
                f"{field} may not be used: {exc.message}",
                details={**exc.details, "field": field},
                code="INTEGRATION_URL_REFUSED",
            ) from None


async def get_integration(
    session: AsyncSession, principal: Principal, public_id: str, *, for_update: bool = False
) -> Integration:
    query = select(Integration).where(Integration.public_id == public_id)
    if for_update:
        query = query.with_for_update().execution_options(populate_existing=True)
    integration = await session.scalar(query)
    if integration is None or not principal.can_see_organisation(integration.organisation_id):
        raise IntegrationNotFound(f"Integration {public_id} does not exist.")
    return integration


def _snapshot(integration: Integration) -> dict[str, Any]:
    return {
        "name": integration.name,
        "config": integration.config,
        # Which credentials are set, never their values.
        "credentials": sorted(integration.credential_hints),
        "enabled": integration.enabled,
        "disabled_reason": integration.disabled_reason,
    }


async def create_integration(
    session: AsyncSession,
    principal: Principal,
    payload: IntegrationCreate,
    *,
    box: SecretBox,
    policy: ssrf.UrlPolicy,
) -> Integration:
    provider = require_provider(payload.provider)
    config, credentials = _validated(provider, payload.config, payload.credentials)
    await _check_urls(provider, config, policy)
    organisation = await resolve_organisation(session, principal, payload.organisation_id)
    secrets = credentials.model_dump(exclude_none=True)
    now = utcnow()
    integration = Integration(
        public_id=new_public_id("int"),
        organisation_id=organisation.id if organisation else None,
        provider=provider.name,
        name=payload.name,
        config=config.model_dump(exclude_unset=True),
        credentials=vault.seal(box, secrets),
        credential_hints=vault.hints(secrets),
        enabled=True,
        created_at=now,
        updated_at=now,
    )
    session.add(integration)
    await session.flush()
    record_write(
        session,
        principal.actor,
        action="integration.create",
        object_type="integration",
        object_id=integration.public_id,
        changes=diff({}, {"provider": provider.name, **_snapshot(integration)}),
    )
    return integration


async def update_integration(
    session: AsyncSession,
    principal: Principal,
    public_id: str,
    payload: IntegrationPatch,
    *,
    box: SecretBox,
    policy: ssrf.UrlPolicy,
) -> Integration:
    integration = await get_integration(session, principal, public_id, for_update=True)
    provider = require_provider(integration.provider)
    before = _snapshot(integration)
    changes = payload.model_dump(exclude_unset=True)
    if "config" in changes or "credentials" in changes:
        secrets = vault.unseal(box, integration.credentials)
        for name, value in (changes.get("credentials") or {}).items():
            if value is None:
                secrets.pop(name, None)
            else:
                secrets[name] = value
        config_in = changes.get("config", integration.config)
        # Tokens from an OAuth connection are kept, not validated as user input.
        user_secrets = {k: v for k, v in secrets.items() if k not in _TOKEN_FIELDS}
        config, credentials = _validated(provider, config_in, user_secrets)
        if "config" in changes:
            await _check_urls(provider, config, policy)
        stored = {
            **{k: v for k, v in secrets.items() if k in _TOKEN_FIELDS},
            **credentials.model_dump(exclude_none=True),
        }
        integration.config = config.model_dump(exclude_unset=True)
        integration.credentials = vault.seal(box, stored)
        integration.credential_hints = vault.hints(stored)
    if "name" in changes:
        integration.name = changes["name"]
    if changes.get("enabled") is True:
        integration.enabled = True
        integration.disabled_reason = None
    elif changes.get("enabled") is False:
        integration.enabled = False
        integration.disabled_reason = changes.get("disabled_reason") or "Disabled through the API."
    changed = diff(before, _snapshot(integration))
    if changed or "credentials" in changes:
        integration.updated_at = utcnow()
        await session.flush()
        record_write(
            session,
            principal.actor,
            action="integration.update",
            object_type="integration",
            object_id=integration.public_id,
            changes=changed or {"credentials": "replaced"},
        )
    return integration


_TOKEN_FIELDS = frozenset({"access_token", "refresh_token", "expires_at", "token_type", "scope"})


async def to_out_many(
    session: AsyncSession, integrations: Sequence[Integration], *, public_url: str
) -> list[IntegrationOut]:
    organisations = await OrganisationRepository(session).public_ids(
        {i.organisation_id for i in integrations if i.organisation_id is not None}
    )
    return [
        to_out(i, organisations.get(i.organisation_id or 0), public_url=public_url)
        for i in integrations
    ]


def to_out(
    integration: Integration, organisation_public_id: str | None, *, public_url: str
) -> IntegrationOut:
    provider = get_provider(integration.provider)
    capabilities = sorted(c.value for c in provider.capabilities) if provider else []
    hints = integration.credential_hints
    oauth = None
    if provider is not None and provider.oauth_settings(
        provider.config_model.model_validate(integration.config)
    ):
        expires_at = hints.get("expires_at")
        oauth = OAuthState(
            connected="access_token" in hints,
            expires_at=datetime.fromtimestamp(expires_at, tz=utcnow().tzinfo)
            if isinstance(expires_at, int | float)
            else None,
        )
    inbound = (
        f"{public_url.rstrip('/')}/api/v1/inbound/{integration.public_id}"
        if Capability.EVENTS_SOURCE in capabilities
        else None
    )
    return IntegrationOut(
        id=integration.public_id,
        provider=integration.provider,
        name=integration.name,
        organisation_id=organisation_public_id,
        capabilities=capabilities,
        config=integration.config,
        credentials=dict(hints),
        oauth=oauth,
        inbound_url=inbound,
        enabled=integration.enabled,
        disabled_reason=integration.disabled_reason,
        last_success_at=integration.last_success_at,
        last_failure_at=integration.last_failure_at,
        incident_opened_at=integration.incident_opened_at,
        created_at=integration.created_at,
        updated_at=integration.updated_at,
    )


async def list_integrations(
    session: AsyncSession, principal: Principal, *, after_id: int | None, limit: int
) -> Sequence[Integration]:
    query = select(Integration).order_by(Integration.id).limit(limit + 1)
    if after_id is not None:
        query = query.where(Integration.id > after_id)
    if principal.visible_organisation_ids is not None:
        query = query.where(Integration.organisation_id.in_(principal.visible_organisation_ids))
    return list(await session.scalars(query))


async def check_connection(hub: IntegrationHub, integration: Integration) -> ConnectionTest:
    """One authenticated call to the vendor; the answer, never an exception."""
    provider = require_provider(integration.provider)
    started = time.perf_counter()
    try:
        message = await provider.check_connection(hub.connection(integration))
        ok = True
    except (ConnectionFailed, CircuitOpen, GatewayError) as exc:
        message, ok = str(exc), False
    except NotImplementedError:
        message, ok = f"{provider.title} integrations have no connection to check.", False
    except Exception as exc:  # DestinationRefused and other transport refusals
        message, ok = f"{type(exc).__name__}: {exc}", False
    finally:
        await hub.drain()
    return ConnectionTest(
        ok=ok, message=message, duration_ms=round((time.perf_counter() - started) * 1000)
    )


# ---------------------------------------------------------------- inbound events


def inbound_out(event: InboundEvent, integration_public_id: str) -> InboundEventOut:
    return InboundEventOut(
        id=event.public_id,
        integration_id=integration_public_id,
        provider_event_id=event.provider_event_id,
        event_type=event.event_type,
        status=event.status,
        attempts=event.attempts,
        duplicates=event.duplicates,
        result=event.result,
        error=event.error,
        source_ip=event.source_ip,
        received_at=event.received_at,
        processed_at=event.processed_at,
        next_attempt_at=event.next_attempt_at if event.status == InboundStatus.PENDING else None,
    )


def inbound_detail(event: InboundEvent, integration_public_id: str) -> InboundEventDetail:
    return InboundEventDetail(
        **inbound_out(event, integration_public_id).model_dump(),
        headers=event.headers,
        body=event.body,
    )


async def list_inbound(
    session: AsyncSession,
    integration: Integration,
    *,
    status: str | None,
    event_type: str | None,
    after_id: int | None,
    limit: int,
) -> Sequence[InboundEvent]:
    """Newest first."""
    query = (
        select(InboundEvent)
        .where(InboundEvent.integration_id == integration.id)
        .order_by(InboundEvent.id.desc())
        .limit(limit + 1)
    )
    if after_id is not None:
        query = query.where(InboundEvent.id < after_id)
    if status is not None:
        query = query.where(InboundEvent.status == status)
    if event_type is not None:
        query = query.where(InboundEvent.event_type == event_type)
    return list(await session.scalars(query))


async def get_inbound(
    session: AsyncSession, principal: Principal, public_id: str
) -> tuple[InboundEvent, Integration]:
    row = (
        await session.execute(
            select(InboundEvent, Integration)
            .join(Integration, Integration.id == InboundEvent.integration_id)
            .where(InboundEvent.public_id == public_id)
        )
    ).first()
    if row is None or not principal.can_see_organisation(row[1].organisation_id):
        raise InboundEventNotFound(f"Inbound event {public_id} does not exist.")
    return row[0], row[1]


# ---------------------------------------------------------------- health


def _percentile(sorted_values: Sequence[int], fraction: float) -> float | None:
    if not sorted_values:
        return None
    rank = max(0, math.ceil(fraction * len(sorted_values)) - 1)
    return float(sorted_values[rank])


async def _inbound_counts(
    session: AsyncSession, integration_ids: Sequence[int]
) -> dict[tuple[int, str], int]:
    if not integration_ids:
        return {}
    rows = await session.execute(
        select(InboundEvent.integration_id, InboundEvent.status, func.count())
        .where(
            InboundEvent.integration_id.in_(integration_ids),
            InboundEvent.status.in_((InboundStatus.PENDING, InboundStatus.FAILED)),
        )
        .group_by(InboundEvent.integration_id, InboundEvent.status)
    )
    return {(row[0], row[1]): row[2] for row in rows}


async def health(
    session: AsyncSession, integration: Integration, *, hub: IntegrationHub | None
) -> HealthOut:
    now = utcnow()
    since = now - HEALTH_WINDOW
    outcome_rows = await session.execute(
        select(IntegrationCall.outcome, func.count())
        .where(
            IntegrationCall.integration_id == integration.id,
            IntegrationCall.started_at >= since,
        )
        .group_by(IntegrationCall.outcome)
    )
    outcomes: dict[str, int] = {row[0]: row[1] for row in outcome_rows}
    durations = sorted(
        await session.scalars(
            select(IntegrationCall.duration_ms)
            .where(
                IntegrationCall.integration_id == integration.id,
                IntegrationCall.started_at >= since,
                IntegrationCall.outcome.in_(("ok", "client_error", "failed")),
            )
            .order_by(IntegrationCall.id.desc())
            .limit(LATENCY_SAMPLE)
        )
    )
    incidents = list(
        await session.scalars(
            select(IntegrationIncident)
            .where(
                IntegrationIncident.integration_id == integration.id,
                (IntegrationIncident.opened_at >= now - INCIDENT_WINDOW)
                | IntegrationIncident.closed_at.is_(None),
            )
            .order_by(IntegrationIncident.id)
        )
    )
    # Uptime counts every incident that overlapped the 30 days (or the integration's life,
    # if shorter), also one opened before them.
    uptime_from = max(now - INCIDENT_WINDOW, integration.created_at)
    overlapping = await session.execute(
        select(IntegrationIncident.opened_at, IntegrationIncident.closed_at).where(
            IntegrationIncident.integration_id == integration.id,
            IntegrationIncident.opened_at < now,
            IntegrationIncident.closed_at.is_(None) | (IntegrationIncident.closed_at > uptime_from),
        )
    )
    uptime = uptime_percent([(row[0], row[1]) for row in overlapping], start=uptime_from, end=now)
    closed = [i for i in incidents if i.closed_at is not None]
    open_incident = next((i for i in incidents if i.closed_at is None), None)
    mttr = (
        sum((i.closed_at - i.opened_at).total_seconds() for i in closed if i.closed_at)
        / len(closed)
        if closed
        else None
    )
    calls = sum(outcomes.values())
    succeeded = outcomes.get("ok", 0)
    client_errors = outcomes.get("client_error", 0)
    failed = outcomes.get("failed", 0) + outcomes.get("circuit_open", 0)
    success_rate = round(100.0 * succeeded / calls, 2) if calls else None
    counts = await _inbound_counts(session, [integration.id])
    breaker = hub.breaker_state(integration.id) if hub is not None else None
    return HealthOut(
        integration_id=integration.public_id,
        window_hours=HEALTH_WINDOW.total_seconds() / 3600,
        calls=calls,
        succeeded=succeeded,
        client_errors=client_errors,
        failed=failed,
        success_rate=success_rate,
        latency_ms=LatencyOut(
            p50=_percentile(durations, 0.50),
            p95=_percentile(durations, 0.95),
            p99=_percentile(durations, 0.99),
        ),
        last_success_at=integration.last_success_at,
        last_failure_at=integration.last_failure_at,
        last_error=integration.last_error,
        open_incident=IncidentOut(
            opened_at=open_incident.opened_at, closed_at=None, reason=open_incident.reason
        )
        if open_incident
        else None,
        incidents=len(incidents),
        mean_time_to_recovery_seconds=round(mttr, 3) if mttr is not None else None,
        uptime_percent=uptime,
        breaker_state=breaker,
        inbound_pending=counts.get((integration.id, InboundStatus.PENDING), 0),
        inbound_failed=counts.get((integration.id, InboundStatus.FAILED), 0),
        healthy=_healthy(integration, success_rate),
    )


def uptime_percent(
    incidents: Sequence[tuple[datetime, datetime | None]], *, start: datetime, end: datetime
) -> float | None:
    """The share of [start, end] outside every incident (open ones last until `end`), in
    percent to 3 decimals; None for an empty span. Overlapping incidents count once."""
    span = (end - start).total_seconds()
    if span <= 0:
        return None
    down = 0.0
    reached = start
    for opened, closed in sorted((max(o, start), min(c or end, end)) for o, c in incidents):
        if closed <= reached:
            continue
        down += (closed - max(opened, reached)).total_seconds()
        reached = closed
    return round(100.0 * (1 - down / span), 3)


def _healthy(integration: Integration, success_rate: float | None) -> bool:
    return (
        integration.enabled
        and integration.incident_opened_at is None
        and (success_rate is None or success_rate >= HEALTHY_SUCCESS_RATE)
    )


async def sync_status(session: AsyncSession, principal: Principal) -> SyncStatusOut:
    query = select(Integration).order_by(Integration.id)
    if principal.visible_organisation_ids is not None:
        query = query.where(Integration.organisation_id.in_(principal.visible_organisation_ids))
    integrations = list(await session.scalars(query))
    ids = [i.id for i in integrations]
    counts = await _inbound_counts(session, ids)
    last_processed = (
        await session.scalar(
            select(func.max(InboundEvent.processed_at)).where(
                InboundEvent.integration_id.in_(ids),
                InboundEvent.status == InboundStatus.PROCESSED,
            )
        )
        if ids
        else None
    )
    marketing = {
        state.integration_id: state
        for state in (
            await session.scalars(
                select(MarketingSyncState).where(MarketingSyncState.integration_id.in_(ids))
            )
            if ids
            else []
        )
    }
    moments = [i.last_success_at for i in integrations if i.last_success_at] + (
        [last_processed] if last_processed else []
    )
    moments += [m.last_synced_at for m in marketing.values() if m.last_synced_at]
    statuses = [
        IntegrationStatus(
            id=i.public_id,
            provider=i.provider,
            name=i.name,
            enabled=i.enabled,
            healthy=_healthy(i, None),
            last_success_at=i.last_success_at,
            last_failure_at=i.last_failure_at,
            open_incident_since=i.incident_opened_at,
            inbound_pending=counts.get((i.id, InboundStatus.PENDING), 0),
            inbound_failed=counts.get((i.id, InboundStatus.FAILED), 0),
            marketing=_marketing_brief(marketing.get(i.id)),
        )
        for i in integrations
    ]
    # Imported here: event sinks sit above integrations.
    from memberhub.sinks.service import sink_statuses

    sinks = await sink_statuses(session, principal)
    moments += [s.last_success_at for s in sinks if s.last_success_at]
    return SyncStatusOut(
        last_sync=max(moments) if moments else None,
        pending_updates=sum(s.inbound_pending for s in statuses),
        sync_errors=sum(s.inbound_failed for s in statuses)
        + sum(1 for s in statuses if s.open_incident_since is not None)
        + sum(1 for s in statuses if s.marketing is not None and s.marketing.failures > 0),
        connected=sorted({i.provider for i in integrations if i.enabled}),
        integrations=statuses,
        event_sinks=sinks,
    )


def _marketing_brief(state: MarketingSyncState | None) -> MarketingSyncBrief | None:
    if state is None:
        return None
    return MarketingSyncBrief(
        last_synced_at=state.last_synced_at,
        last_full_sync_at=state.last_full_sync_at,
        last_run_requests=state.last_run_requests,
        last_run_writes=state.last_run_writes,
        failures=state.failures,
        last_error=state.last_error,
    )


async def purge_call_log(session: AsyncSession, *, older_than: datetime) -> int:
    """The payload log's retention: delete calls that started before `older_than`."""
    from sqlalchemy import delete

    result = await session.execute(
        delete(IntegrationCall).where(IntegrationCall.started_at < older_than)
    )
    return int(getattr(result, "rowcount", 0) or 0)
