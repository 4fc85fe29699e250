"""Inbound webhooks: received and stored by the API, processed by the worker.

Receiving verifies the signature (and the source address, when the integration limits it),
stores the exact body under the provider's event id, and answers. A provider that sends an
event again gets 200 and nothing is processed twice: the event id is unique per
integration. Processing runs in the worker, each event in one transaction with everything
it changes; an error that retrying cannot fix fails the event at once, anything else is
retried with backoff.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.crm.sync import apply_webhook
from memberhub.finance.queue import record_payment_notice, record_payout
from memberhub.finance.webhooks import apply_accounting_events
from memberhub.integrations.activity_feed import Fetched, apply_fetched, prefetch
from memberhub.integrations.activity_mapping import ActivityMapping
from memberhub.integrations.gateway import redact
from memberhub.integrations.hub import parse_config
from memberhub.integrations.mapped_activities import record_mapped_activity
from memberhub.integrations.models import InboundEvent, InboundStatus, Integration
from memberhub.integrations.orders import apply_order_notice
from memberhub.integrations.payments import PaymentNotYetApplied, PaymentSettings, apply_notice
from memberhub.integrations.providers import (
    as_accounting,
    as_events_source,
    as_marketing_list,
    as_message_channel,
    as_orders,
    as_payments,
    get_provider,
)
from memberhub.integrations.providers.base import (
    Capability,
    CrmWebhooks,
    InboundIdentity,
    InboundRequest,
    PayoutsSource,
)
from memberhub.integrations.signatures import SignatureInvalid
from memberhub.integrations.vault import unseal
from memberhub.kit.clock import utcnow
from memberhub.kit.crypto import SecretBox
from memberhub.kit.db import Database
from memberhub.kit.errors import Conflict, Forbidden, MemberhubError, NotFound, ValidationFailed
from memberhub.kit.ids import new_public_id
from memberhub.marketing.webhooks import apply_audience_changes
from memberhub.notifications.service import apply_delivery_reports

if TYPE_CHECKING:
    from memberhub.integrations.hub import IntegrationHub

log = structlog.get_logger("memberhub.integrations.inbound")

MAX_ATTEMPTS = 8
RETRY_BASE_SECONDS = 30.0
RETRY_MAX_SECONDS = 6 * 3600.0
BATCH = 100


class IntegrationNotFound(NotFound):
    code = "INTEGRATION_NOT_FOUND"


class IntegrationDisabled(Conflict):
    code = "INTEGRATION_DISABLED"
    default_message = "The integration is disabled."


class SourceRefused(Forbidden):
    code = "INBOUND_SOURCE_REFUSED"


class SignatureRejected(MemberhubError):
    code = "SIGNATURE_INVALID"
    status_code = 400
    # The provider wants a bare 401 with an empty body (Xero's intent-to-receive check).
    bare = False


class BareSignatureRejected(SignatureRejected):
    status_code = 401
    bare = True


@dataclass(frozen=True)
class Received:
    event: InboundEvent
    duplicate: bool
    # Answer with an empty body (the provider's handshake requires it).
    bare: bool = False


def _source_allowed(source_ip: str | None, allowed: list[str]) -> bool:
    if not allowed:
        return True
    if source_ip is None:
        return False
    try:
        parsed = ipaddress.ip_address(source_ip)
    except ValueError:
        return False
    # A dual-stack listener reports IPv4 senders as ::ffff:a.b.c.d.
    address = (parsed.ipv4_mapped if isinstance(parsed, ipaddress.IPv6Address) else None) or parsed
    networks = []
    for cidr in allowed:
        with contextlib.suppress(ValueError):  # validated when saved; never fatal here
            networks.append(ipaddress.ip_network(cidr, strict=False))
    return any(address in network for network in networks)


async def receive(
    db: Database,
    box: SecretBox,
    integration_public_id: str,
    request: InboundRequest,
    *,
    source_ip: str | None,
) -> Received:
    """Verify and store one webhook; raise a MemberhubError for the provider to see."""
    async with db.transaction(read_only=True) as session:
        integration = await session.scalar(
            select(Integration).where(Integration.public_id == integration_public_id)
        )
    provider = get_provider(integration.provider) if integration is not None else None
    source = as_events_source(provider) if provider is not None else None
    if integration is None or provider is None or source is None:
        raise IntegrationNotFound(
            f"No integration {integration_public_id} receives webhooks.",
        )
    if not integration.enabled:
        raise IntegrationDisabled()
    config = parse_config(provider, integration.config)
    if not _source_allowed(source_ip, config.inbound_allowed_ips):
        raise SourceRefused(
            f"Webhooks for this integration are not accepted from {source_ip}.",
            details={"source_ip": source_ip},
        )
    try:
        source.verify(request, unseal(box, integration.credentials), config)
    except SignatureInvalid as exc:
        rejected = (
            BareSignatureRejected
            if getattr(provider, "bare_inbound_replies", False)
            else SignatureRejected
        )
        raise rejected(
            f"The webhook signature was rejected: {exc.message}.", details={"reason": exc.reason}
        ) from None
    try:
        identity = source.identify(request)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ValidationFailed(f"The webhook body was not understood: {exc}.") from None
    received = await _store(db, integration, identity, request, source_ip=source_ip)
    if getattr(provider, "bare_inbound_replies", False):
        return Received(received.event, received.duplicate, bare=True)
    return received


async def check_url(
    db: Database, box: SecretBox, integration_public_id: str, request: InboundRequest
) -> None:
    """Answer a provider's check of its webhook URL (Mailchimp GETs the URL before it posts
    to it): only for providers that make one, and only with the URL's secret right."""
    async with db.transaction(read_only=True) as session:
        integration = await session.scalar(
            select(Integration).where(Integration.public_id == integration_public_id)
        )
    provider = get_provider(integration.provider) if integration is not None else None
    source = as_events_source(provider) if provider is not None else None
    if (
        integration is None
        or source is None
        or not getattr(provider, "answers_validation_get", False)
    ):
        raise IntegrationNotFound(f"No integration {integration_public_id} checks its URL.")
    if not integration.enabled:
        raise IntegrationDisabled()
    assert provider is not None
    try:
        source.verify(
            request,
            unseal(box, integration.credentials),
            parse_config(provider, integration.config),
        )
    except SignatureInvalid as exc:
        raise SignatureRejected(
            f"The webhook URL was rejected: {exc.message}.", details={"reason": exc.reason}
        ) from None


def _signed_headers(integration: Integration) -> list[str]:
    """The header an integration's configuration names for its signature, if any."""
    name = (integration.config or {}).get("signature_header")
    return [name] if isinstance(name, str) else []


async def _store(
    db: Database,
    integration: Integration,
    identity: InboundIdentity,
    request: InboundRequest,
    *,
    source_ip: str | None,
) -> Received:
    try:
        body = request.body.decode("utf-8").replace("\x00", "")
    except UnicodeDecodeError:
        raise ValidationFailed("The webhook body is not UTF-8 text.") from None
    for _ in range(2):
        try:
            async with db.transaction() as session:
                existing = await session.scalar(
                    select(InboundEvent).where(
                        InboundEvent.integration_id == integration.id,
                        InboundEvent.provider_event_id == identity.event_id,
                    )
                )
                if existing is not None:
                    existing.duplicates += 1
                    return Received(existing, duplicate=True)
                now = utcnow()
                event = InboundEvent(
                    public_id=new_public_id("ine"),
                    integration_id=integration.id,
                    provider_event_id=identity.event_id,
                    event_type=identity.event_type,
                    body=body,
                    headers=redact(dict(request.headers), also=_signed_headers(integration)),
                    source_ip=source_ip,
                    status=InboundStatus.PENDING,
                    next_attempt_at=now,
                    received_at=now,
                )
                session.add(event)
                await session.flush()
                return Received(event, duplicate=False)
        except IntegrityError:
            continue  # the same event arrived twice at once: the other copy was stored
    raise Conflict("The webhook could not be stored; send it again.")


# ---------------------------------------------------------------- processing


def _retry_delay(attempts: int) -> float:
    ceiling = min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2 ** (attempts - 1))
    return random.uniform(ceiling / 2, ceiling)


async def process_inbound(db: Database, now: datetime, hub: IntegrationHub | None = None) -> int:
    """Process the inbound events that are due; return how many were finished. `hub`
    reads what the events of activity feeds (Eventbrite) name."""
    async with db.transaction(read_only=True) as session:
        due = list(
            await session.scalars(
                select(InboundEvent.id)
                .where(
                    InboundEvent.status == InboundStatus.PENDING,
                    InboundEvent.next_attempt_at <= now,
                )
                .order_by(InboundEvent.id)
                .limit(BATCH)
            )
        )
    finished = 0
    for event_id in due:
        finished += await process_one(db, event_id, hub)
    return finished


async def process_one(db: Database, event_id: int, hub: IntegrationHub | None = None) -> int:
    """1 when the event was finished (processed, ignored or failed), else 0."""
    try:
        # Read from the vendor before the transaction: no lock waits on its answer.
        fetched = await prefetch(db, hub, event_id)
        async with db.transaction() as session:
            query = select(InboundEvent).where(
                InboundEvent.id == event_id, InboundEvent.status == InboundStatus.PENDING
            )
            if not db.is_sqlite:
                query = query.with_for_update(skip_locked=True)
            event = await session.scalar(query)
            if event is None:
                return 0  # taken by another worker, or done
            integration = await session.get(Integration, event.integration_id)
            assert integration is not None
            now = utcnow()
            status, result = await _handle(session, integration, event, now, fetched)
            event.status = status
            event.result = result
            event.attempts += 1
            event.error = None
            event.processed_at = now
            return 1
    except MemberhubError as exc:
        # The data does not allow it (no such member, a transition not allowed): retrying
        # would give the same answer. Staff can retry once they fixed the data.
        await _record_failure(
            db, event_id, exc.message, final=True, code=exc.code, details=exc.details
        )
        return 1
    except PaymentNotYetApplied as exc:
        log.info("inbound_event_waiting", inbound_event=event_id, reason=str(exc))
        return await _record_failure(db, event_id, str(exc), final=False)
    except Exception as exc:
        log.exception("inbound_event_failed", inbound_event=event_id)
        return await _record_failure(db, event_id, f"{type(exc).__name__}: {exc}", final=False)


async def _handle(
    session: AsyncSession,
    integration: Integration,
    event: InboundEvent,
    now: datetime,
    fetched: Fetched | None = None,
) -> tuple[str, dict[str, Any]]:
    if fetched is not None:
        return await apply_fetched(session, integration, fetched, now)
    provider = get_provider(integration.provider)
    if isinstance(provider, CrmWebhooks) and Capability.CRM in provider.capabilities:
        changes = provider.webhook_changes(event.event_type, json.loads(event.body))
        if not changes:
            return InboundStatus.IGNORED, {"reason": f"{event.event_type} carries no changes"}
        return InboundStatus.PROCESSED, await apply_webhook(session, integration, changes)
    audience = as_marketing_list(provider) if provider is not None else None
    if audience is not None:
        audience_changes = audience.audience_changes(event.event_type, event.body.encode())
        if not audience_changes:
            return InboundStatus.IGNORED, {"reason": f"{event.event_type} changes no member"}
        return InboundStatus.PROCESSED, await apply_audience_changes(
            session, integration, audience_changes, now
        )
    config = parse_config(provider, integration.config) if provider is not None else None
    mapping = getattr(config, "activity", None)
    if isinstance(mapping, ActivityMapping):
        result = await record_mapped_activity(session, integration, mapping, event, now=now)
        return InboundStatus.PROCESSED, result
    orders = as_orders(provider) if provider is not None else None
    if orders is not None:
        try:
            order = orders.interpret_order(event.event_type, json.loads(event.body))
        except ValueError as exc:
            raise ValidationFailed(
                f"The {event.event_type} event was not understood: {exc}."
            ) from None
        if order is None:
            return InboundStatus.IGNORED, {"reason": f"{event.event_type} needs no action"}
        outcome = await apply_order_notice(
            session, integration, order, event_type=event.event_type, now=now
        )
        if outcome.get("action") == "ignored":
            return InboundStatus.IGNORED, outcome
        return InboundStatus.PROCESSED, outcome
    if provider is not None and as_accounting(provider) is not None:
        if event.event_type == "intent_to_receive":
            return InboundStatus.IGNORED, {"reason": "Xero's intent-to-receive check"}
        result = await apply_accounting_events(session, integration, json.loads(event.body), now)
        return InboundStatus.PROCESSED, result
    channel = as_message_channel(provider) if provider is not None else None
    if channel is not None:
        reports = channel.delivery_reports(event.event_type, event.body.encode())
        if not reports:
            return InboundStatus.IGNORED, {"reason": f"{event.event_type} reports no delivery"}
        return InboundStatus.PROCESSED, await apply_delivery_reports(
            session, integration.id, reports
        )
    payments = as_payments(provider) if provider is not None else None
    if provider is None or payments is None:
        return InboundStatus.IGNORED, {"reason": "nothing acts on this provider's events yet"}
    if isinstance(provider, PayoutsSource):
        payout = provider.interpret_payout(event.event_type, json.loads(event.body))
        if payout is not None:
            booked = await record_payout(session, integration, payout, now=now)
            return InboundStatus.PROCESSED, {
                "action": "payout",
                "finance_entries": [entry.public_id for entry in booked],
            }
    notice = payments.interpret(event.event_type, json.loads(event.body))
    if notice is None:
        return InboundStatus.IGNORED, {"reason": f"{event.event_type} needs no action"}
    settings = PaymentSettings(parse_config(provider, integration.config))
    result = await apply_notice(session, integration, settings, notice, now=now)
    # Bookings for accounting, in this transaction: a payment applied is a payment booked.
    await record_payment_notice(session, integration, notice, result, now=now)
    if result.get("action") == "ignored":
        return InboundStatus.IGNORED, result
    return InboundStatus.PROCESSED, result


async def _record_failure(
    db: Database,
    event_id: int,
    message: str,
    *,
    final: bool,
    code: str | None = None,
    details: dict[str, Any] | None = None,
) -> int:
    async with db.transaction() as session:
        event = await session.get(InboundEvent, event_id, with_for_update=True)
        if event is None or event.status != InboundStatus.PENDING:
            return 0
        now = utcnow()
        event.attempts += 1
        event.error = message[:1000]
        if code or details:
            # The refusal's code (INSUFFICIENT_POINTS, say) and details, for a client to
            # key on.
            event.result = {
                **({"error_code": code} if code else {}),
                **({"error_details": details} if details else {}),
            }
        if final or event.attempts >= MAX_ATTEMPTS:
            event.status = InboundStatus.FAILED
            event.processed_at = now
            return 1
        event.next_attempt_at = now + timedelta(seconds=_retry_delay(event.attempts))
        return 0


async def retry(session: AsyncSession, event: InboundEvent) -> None:
    """Process a failed (or ignored) event again, at the worker's next pass."""
    await session.execute(
        update(InboundEvent)
        .where(InboundEvent.id == event.id)
        .values(status=InboundStatus.PENDING, next_attempt_at=utcnow(), error=None)
    )
