"""The integration hub: one gateway per integration, credentials from the vault, OAuth
tokens kept fresh, and the payload log written from what the gateways observe.

An API process and each worker have a hub of their own (breakers and rate limits are per
process). `drain()` writes the observed calls; the app and the worker call it every few
seconds and on shutdown.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import quote_plus

import httpx
import structlog
from prometheus_client import CollectorRegistry
from sqlalchemy import select

from memberhub.alerts.models import AlertType
from memberhub.alerts.service import raise_alert
from memberhub.events.catalog import IntegrationIncidentClosed, IntegrationIncidentOpened
from memberhub.events.service import emit
from memberhub.integrations import vault
from memberhub.integrations.gateway import CallRecord, Clock, Gateway, GatewayPolicy, Sleep
from memberhub.integrations.models import Integration, IntegrationCall, IntegrationIncident
from memberhub.integrations.providers import get_provider
from memberhub.integrations.providers.base import BaseConfig, Connection, Provider
from memberhub.kit.crypto import SecretBox
from memberhub.kit.db import Database
from memberhub.webhooks.ssrf import UrlPolicy, guarded_transport

if TYPE_CHECKING:
    from memberhub.ops.tracing import Tracing

log = structlog.get_logger("memberhub.integrations")

# Refresh an access token this long before it expires.
REFRESH_MARGIN_SECONDS = 60
# The token endpoint is called once per attempt of the call it serves: no retries of its own.
TOKEN_POLICY = GatewayPolicy(timeout=15.0, max_attempts=2, rate_limit=None)
MAX_PENDING_CALLS = 50_000
LOGGED_ERROR_CHARS = 1000


class UnknownProvider(Exception):
    pass


@dataclass
class _Entry:
    version: datetime
    provider: Provider
    config: BaseConfig
    credentials: dict[str, Any]
    gateway: Gateway
    token_gateway: Gateway | None
    token_url: str | None
    lock: asyncio.Lock


def parse_config(provider: Provider, config: Mapping[str, Any]) -> BaseConfig:
    return provider.config_model.model_validate(dict(config))


def auth_credentials(config: BaseConfig, credentials: Mapping[str, Any]) -> dict[str, Any]:
    """Credentials plus the config that says how to present them (for generic APIs)."""
    merged = dict(credentials)
    for name in ("auth", "auth_header"):
        value = getattr(config, name, None)
        if value is not None:
            merged[f"_{name}"] = value
    return merged


class IntegrationHub:
    def __init__(
        self,
        db: Database,
        box: SecretBox,
        url_policy: UrlPolicy,
        *,
        registry: CollectorRegistry | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        retry_sleep: Sleep = asyncio.sleep,
        tracing: Tracing | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        """`retry_sleep` waits out the gateways' retry backoffs and Retry-After answers
        (tests shorten it; rate limits keep real time). `tracing`: a span for each call.
        `clock` times the gateways' circuit breakers (tests advance it instead of waiting)."""
        self.db = db
        self.box = box
        self.url_policy = url_policy
        self.registry = registry if registry is not None else CollectorRegistry()
        self._transport = transport
        # Read at each gateway's creation: tests may shorten it after the hub is built.
        self.retry_sleep = retry_sleep
        self._tracing = tracing
        self._clock = clock
        self._entries: dict[int, _Entry] = {}
        self._calls: deque[tuple[int, CallRecord]] = deque(maxlen=MAX_PENDING_CALLS)
        self._drain_lock = asyncio.Lock()

    # ------------------------------------------------------------ connections

    def connection(self, integration: Integration) -> Connection:
        """The integration's connection, its gateway reused while its settings are unchanged."""
        entry = self._entry(integration)
        return Connection(
            integration_id=integration.public_id,
            config=entry.config,
            credentials=entry.credentials,
            gateway=entry.gateway,
            url_policy=self.url_policy,
        )

    def _entry(self, integration: Integration) -> _Entry:
        entry = self._entries.get(integration.id)
        if entry is not None and entry.version == integration.updated_at:
            return entry
        if entry is not None:
            asyncio.get_running_loop().create_task(self._close(entry))
        provider = get_provider(integration.provider)
        if provider is None:
            raise UnknownProvider(integration.provider)
        config = parse_config(provider, integration.config)
        credentials = vault.unseal(self.box, integration.credentials)
        base_url = provider.base_url_for(config, credentials) or ""
        integration_id = integration.id
        label = integration.public_id

        def observe(record: CallRecord) -> None:
            self._calls.append((integration_id, record))

        # The hooks find the entry when called: it is stored before any call is made.
        policy = provider.policy
        if config.rate_limit is not None:
            policy = dataclasses.replace(policy, rate_limit=config.rate_limit)
        gateway = Gateway(
            label,
            base_url,
            policy=policy,
            auth=lambda request: self._authenticate(integration_id, request),
            refresh=lambda: self.refresh(integration_id),
            observer=observe,
            transport=self._new_transport(),
            registry=self.registry,
            sleep=self.retry_sleep,
            clock=self._clock,
        )
        token_gateway = None
        oauth = provider.oauth_settings(config)
        if oauth is not None and oauth.token_url:
            token_gateway = Gateway(
                label,
                oauth.token_url,
                policy=TOKEN_POLICY,
                observer=observe,
                transport=self._new_transport(),
                registry=self.registry,
            )
        entry = _Entry(
            version=integration.updated_at,
            provider=provider,
            config=config,
            credentials=credentials,
            gateway=gateway,
            token_gateway=token_gateway,
            token_url=oauth.token_url if oauth is not None else None,
            lock=asyncio.Lock(),
        )
        self._entries[integration.id] = entry
        return entry

    def breaker_state(self, integration_id: int) -> str | None:
        entry = self._entries.get(integration_id)
        return entry.gateway.breaker.state.name.lower() if entry is not None else None

    async def request_token(
        self, integration: Integration, form: Mapping[str, str]
    ) -> httpx.Response | None:
        """POST to the integration's OAuth token endpoint; None when it has none."""
        return await self._token_request(self._entry(integration), form)

    @staticmethod
    async def _token_request(entry: _Entry, form: Mapping[str, str]) -> httpx.Response | None:
        if entry.token_gateway is None or entry.token_url is None:
            return None
        fields = dict(form)
        headers = {}
        if entry.provider.token_client_auth == "basic":
            # RFC 6749 §2.3.1: each form-encoded, then joined and base64-encoded.
            client = ":".join(
                quote_plus(fields.pop(name, "")) for name in ("client_id", "client_secret")
            )
            headers["Authorization"] = "Basic " + base64.b64encode(client.encode()).decode()
        # An absolute URL: httpx would add a slash to a base URL ending in the endpoint.
        return await entry.token_gateway.request(
            "POST", entry.token_url, data=fields, headers=headers
        )

    def _new_transport(self) -> httpx.AsyncBaseTransport:
        transport = self._transport
        if transport is None:
            transport = guarded_transport(self.url_policy)
        if self._tracing is not None:
            return self._tracing.traced_transport(transport, show_path=True)
        return transport

    async def _authenticate(self, integration_id: int, request: httpx.Request) -> None:
        entry = self._entries[integration_id]
        expires_at = entry.credentials.get("expires_at")
        if (
            isinstance(expires_at, int | float)
            and entry.credentials.get("refresh_token")
            and time.time() >= expires_at - REFRESH_MARGIN_SECONDS
        ):
            await self.refresh(integration_id)
        credentials = auth_credentials(entry.config, entry.credentials)
        request.headers.update(entry.provider.request_auth_headers(credentials, request))

    async def refresh(self, integration_id: int) -> bool:
        """Renew the OAuth access token; True when the call may be sent again.

        Another process may have refreshed first (the refresh token then rotated): the
        stored credentials are read again before asking the authorization server.
        """
        entry = self._entries[integration_id]
        stale_token = entry.credentials.get("access_token")
        async with entry.lock:
            if entry.credentials.get("access_token") != stale_token:
                return True  # refreshed by another call meanwhile
            async with self.db.transaction(read_only=True) as session:
                stored = await session.get(Integration, integration_id)
                if stored is None:
                    return False
                credentials = vault.unseal(self.box, stored.credentials)
            if credentials.get("access_token") != stale_token and not _expired(credentials):
                entry.credentials = credentials
                return True
            refresh_token = credentials.get("refresh_token")
            if not refresh_token:
                return False
            response = await self._token_request(
                entry,
                {
                    "grant_type": "refresh_token",
                    "refresh_token": refresh_token,
                    "client_id": credentials.get("client_id", ""),
                    "client_secret": credentials.get("client_secret", ""),
                },
            )
            if response is None:
                return False
            if response.status_code != 200:
                log.warning(
                    "oauth_refresh_failed", integration=integration_id, status=response.status_code
                )
                return False
            try:
                renewed = token_fields(response.json(), now=time.time())
            except ValueError as exc:
                log.warning("oauth_refresh_failed", integration=integration_id, error=str(exc))
                return False
            updated = {**credentials, **renewed}
            await self.store_credentials(integration_id, updated)
            entry.credentials = updated
            return True

    async def store_credentials(self, integration_id: int, credentials: dict[str, Any]) -> None:
        """Write renewed tokens, keeping the integration's version (its gateway stays)."""
        async with self.db.transaction() as session:
            integration = await session.get(Integration, integration_id, with_for_update=True)
            if integration is None:
                return
            integration.credentials = vault.seal(self.box, credentials)
            integration.credential_hints = vault.hints(credentials)
        entry = self._entries.get(integration_id)
        if entry is not None:
            entry.credentials = credentials

    async def merge_credentials(self, integration_id: int, changes: dict[str, Any]) -> None:
        """Set some credential fields, keeping the others as stored now: never a copy read
        earlier, whose refresh token a refresh since may have spent (it rotates)."""
        entry = self._entries.get(integration_id)
        async with entry.lock if entry is not None else contextlib.nullcontext():
            async with self.db.transaction() as session:
                integration = await session.get(Integration, integration_id, with_for_update=True)
                if integration is None:
                    return
                credentials = {**vault.unseal(self.box, integration.credentials), **changes}
                integration.credentials = vault.seal(self.box, credentials)
                integration.credential_hints = vault.hints(credentials)
            if entry is not None:
                entry.credentials = credentials

    async def aclose(self) -> None:
        entries, self._entries = list(self._entries.values()), {}
        for entry in entries:
            await self._close(entry)

    @staticmethod
    async def _close(entry: _Entry) -> None:
        await entry.gateway.aclose()
        if entry.token_gateway is not None:
            await entry.token_gateway.aclose()

    # ------------------------------------------------------------ payload log and health

    def pending_calls(self) -> int:
        return len(self._calls)

    async def drain(self) -> int:
        """Write the observed calls to the payload log and update each integration's health."""
        async with self._drain_lock:
            records = []
            while self._calls:
                records.append(self._calls.popleft())
            if not records:
                return 0
            try:
                async with self.db.transaction() as session:
                    await _write_calls(session, records)
            except Exception:
                # Kept for the next drain rather than lost.
                self._calls.extendleft(reversed(records))
                raise
            return len(records)


def _expired(credentials: Mapping[str, Any]) -> bool:
    expires_at = credentials.get("expires_at")
    return (
        isinstance(expires_at, int | float) and time.time() >= expires_at - REFRESH_MARGIN_SECONDS
    )


# Longer lifetimes than this are taken as "does not expire" being spelled oddly.
MAX_TOKEN_LIFETIME_SECONDS = 10 * 365 * 86400


def token_fields(answer: Any, *, now: float) -> dict[str, Any]:
    """The credentials an OAuth token response sets (RFC 6749 §5.1); ValueError when the
    answer is not one."""
    if not isinstance(answer, Mapping):
        raise ValueError("the token response is not a JSON object")
    token = answer.get("access_token")
    if not isinstance(token, str) or not token:
        raise ValueError("the token response has no access_token")
    fields: dict[str, Any] = {"access_token": token}
    if answer.get("refresh_token"):
        fields["refresh_token"] = str(answer["refresh_token"])
    lifetime = answer.get("expires_in")
    if isinstance(lifetime, str) and lifetime.isdigit():
        lifetime = int(lifetime)
    if (
        isinstance(lifetime, int | float)
        and not isinstance(lifetime, bool)
        and 0 <= lifetime <= MAX_TOKEN_LIFETIME_SECONDS  # NaN and infinity fail this too
    ):
        fields["expires_at"] = int(now + lifetime)
    if answer.get("token_type"):
        fields["token_type"] = str(answer["token_type"])
    if answer.get("scope"):
        fields["scope"] = str(answer["scope"])
    return fields


def is_failure(record: CallRecord) -> bool:
    """A call that says the integration is not working: it failed for good, the breaker
    stopped it, or the vendor refused our credentials."""
    return record.outcome in ("failed", "circuit_open") or record.status in (401, 403)


async def _write_calls(session: Any, records: list[tuple[int, CallRecord]]) -> None:
    by_integration: dict[int, list[CallRecord]] = {}
    for integration_id, record in records:
        by_integration.setdefault(integration_id, []).append(record)
    integrations = {
        i.id: i
        for i in await session.scalars(
            select(Integration)
            .where(Integration.id.in_(by_integration))
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    }
    for integration_id, calls in by_integration.items():
        integration = integrations.get(integration_id)
        if integration is None:
            continue  # deleted meanwhile
        open_incident = None
        if integration.incident_opened_at is not None:
            open_incident = await session.scalar(
                select(IntegrationIncident)
                .where(
                    IntegrationIncident.integration_id == integration_id,
                    IntegrationIncident.closed_at.is_(None),
                )
                .order_by(IntegrationIncident.id.desc())
                .limit(1)
            )
        for call in calls:
            session.add(
                IntegrationCall(
                    integration_id=integration_id,
                    method=call.method,
                    url=call.url[:2048],
                    outcome=call.outcome,
                    status=call.status,
                    attempts=call.attempts,
                    duration_ms=call.duration_ms,
                    started_at=call.started_at,
                    request_headers=call.request_headers,
                    request_body=call.request_body.replace("\x00", ""),
                    response_body=call.response_body.replace("\x00", ""),
                    error=call.error[:LOGGED_ERROR_CHARS] if call.error else None,
                )
            )
            ended_at = call.started_at + timedelta(milliseconds=call.duration_ms)
            if is_failure(call):
                integration.last_failure_at = _later(integration.last_failure_at, ended_at)
                integration.last_error = (call.error or f"answered {call.status}")[:500]
                if open_incident is None:
                    open_incident = IntegrationIncident(
                        integration_id=integration_id,
                        opened_at=ended_at,
                        reason=integration.last_error,
                    )
                    session.add(open_incident)
                    integration.incident_opened_at = ended_at
                    await _incident_opened(session, integration, open_incident)
            else:
                integration.last_success_at = _later(integration.last_success_at, ended_at)
                if open_incident is not None:
                    open_incident.closed_at = max(ended_at, open_incident.opened_at)
                    _incident_closed(session, integration, open_incident)
                    open_incident = None
                    integration.incident_opened_at = None


async def _incident_opened(
    session: Any, integration: Integration, incident: IntegrationIncident
) -> None:
    """An incident opens: an `integration.incident.opened` event and a high alert."""
    reason = incident.reason or "failing"
    emit(
        session,
        IntegrationIncidentOpened(
            integration_id=integration.public_id,
            provider=integration.provider,
            name=integration.name,
            reason=reason,
            opened_at=incident.opened_at,
        ),
        organisation_id=integration.organisation_id,
        occurred_at=incident.opened_at,
    )
    await raise_alert(
        session,
        AlertType.INTEGRATION_INCIDENT,
        member=None,
        dedupe_key=f"integration-incident:{integration.public_id}:{incident.opened_at.isoformat()}",
        message=f"Integration {integration.name} ({integration.provider}) is failing: {reason}"[
            :1000
        ],
        now=incident.opened_at,
        data={"integration_id": integration.public_id, "provider": integration.provider},
    )


def _incident_closed(session: Any, integration: Integration, incident: IntegrationIncident) -> None:
    assert incident.closed_at is not None
    emit(
        session,
        IntegrationIncidentClosed(
            integration_id=integration.public_id,
            provider=integration.provider,
            name=integration.name,
            opened_at=incident.opened_at,
            closed_at=incident.closed_at,
        ),
        organisation_id=integration.organisation_id,
        occurred_at=incident.closed_at,
    )


def _later(current: datetime | None, candidate: datetime) -> datetime:
    return candidate if current is None or candidate > current else current
