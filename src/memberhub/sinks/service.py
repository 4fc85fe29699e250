"""Event sinks: subscriptions of analytics integrations (Segment, GA4) to the event feed.

A sink starts at the feed's end: it receives the events committed after it was created,
and a replay sends a past time range again. Sending is the worker's
(`sinks/forwarding.py`); everything here is one request's transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.audit.service import record_write
from memberhub.auth.principal import Principal
from memberhub.events.catalog import CATALOG
from memberhub.events.models import Event
from memberhub.events.sequencer import sequence_pending
from memberhub.integrations.gateway import CircuitOpen, GatewayError
from memberhub.integrations.hub import IntegrationHub
from memberhub.integrations.models import Integration
from memberhub.integrations.providers.base import ConnectionFailed, SinkUnavailable
from memberhub.integrations.service import get_integration
from memberhub.kit.clock import utcnow
from memberhub.kit.errors import Conflict, NotFound, ValidationFailed
from memberhub.kit.ids import new_public_id
from memberhub.sinks.events import build_window, events_after
from memberhub.sinks.forwarding import settings_for, sink_provider
from memberhub.sinks.models import EventSink, EventSinkDelivery
from memberhub.sinks.schemas import (
    DeliveryOut,
    DryRunOut,
    DryRunRequest,
    PlannedRequest,
    ReplayRequest,
    SinkCreate,
    SinkOut,
    SinkPatch,
    SinkStatus,
)
from memberhub.webhooks.signing import checked_event_types


class SinkNotFound(NotFound):
    code = "EVENT_SINK_NOT_FOUND"


class NotASink(Conflict):
    code = "INTEGRATION_NOT_AN_ANALYTICS_SINK"


class ReplayUnderWay(Conflict):
    code = "REPLAY_UNDER_WAY"


def _check_mapping(integration: Integration, mapping: dict[str, str]) -> None:
    unknown = sorted(set(mapping) - set(CATALOG))
    if unknown:
        raise ValidationFailed(
            "The mapping names event types that do not exist.",
            details={"field": "mapping", "unknown": unknown[:20]},
        )
    provider = sink_provider(integration)
    assert provider is not None
    problems = provider.mapping_errors(mapping)
    if problems:
        raise ValidationFailed(
            "The vendor would not take these event names.",
            details={"field": "mapping", "problems": problems[:20]},
        )


async def _integration(session: AsyncSession, principal: Principal, public_id: str) -> Integration:
    integration = await get_integration(session, principal, public_id)
    if sink_provider(integration) is None:
        raise NotASink(
            f"Integration {public_id} ({integration.provider}) does not receive events.",
            details={"provider": integration.provider},
        )
    return integration


async def latest_position(session: AsyncSession) -> int:
    return int(await session.scalar(select(func.max(Event.position))) or 0)


async def get_sink(
    session: AsyncSession, principal: Principal, public_id: str, *, for_update: bool = False
) -> tuple[EventSink, Integration]:
    query = (
        select(EventSink, Integration)
        .join(Integration, Integration.id == EventSink.integration_id)
        .where(EventSink.public_id == public_id)
    )
    if for_update:
        query = query.with_for_update(of=EventSink).execution_options(populate_existing=True)
    row = (await session.execute(query)).first()
    if row is None or not principal.can_see_organisation(row[1].organisation_id):
        raise SinkNotFound(f"Event sink {public_id} does not exist.")
    return row[0], row[1]


def to_out(sink: EventSink, integration: Integration, latest: int) -> SinkOut:
    provider = sink_provider(integration)
    assert provider is not None
    return SinkOut(
        id=sink.public_id,
        integration_id=integration.public_id,
        provider=integration.provider,
        name=sink.name,
        consent_purpose=provider.consent_purpose,
        event_types=list(sink.event_types.get("types") or []),
        mapping={**provider.default_mapping(), **(sink.mapping or {})},
        request_deletion=sink.request_deletion,
        enabled=sink.enabled,
        event_position=sink.event_position,
        lag=max(0, latest - sink.event_position),
        replay=(
            {"from_position": sink.replay_from, "to_position": sink.replay_to}
            if sink.replay_from is not None and sink.replay_to is not None
            else None
        ),
        failures=sink.failures,
        failing_since=sink.failing_since,
        next_attempt_at=sink.next_attempt_at,
        last_error=sink.last_error,
        last_success_at=sink.last_success_at,
        events_sent=sink.events_sent,
        events_skipped=sink.events_skipped,
        events_refused=sink.events_refused,
        requests_sent=sink.requests_sent,
        deletions_requested=sink.deletions_requested,
        created_at=sink.created_at,
        updated_at=sink.updated_at,
    )


def _snapshot(sink: EventSink) -> dict[str, Any]:
    return {
        "name": sink.name,
        "event_types": list(sink.event_types.get("types") or []),
        "mapping": dict(sink.mapping or {}),
        "request_deletion": sink.request_deletion,
        "enabled": sink.enabled,
    }


async def create_sink(session: AsyncSession, principal: Principal, payload: SinkCreate) -> SinkOut:
    integration = await _integration(session, principal, payload.integration_id)
    _check_mapping(integration, payload.mapping)
    now = utcnow()
    # Events committed before now are numbered first, so "from now on" means what it says.
    await sequence_pending(session)
    latest = await latest_position(session)
    sink = EventSink(
        public_id=new_public_id("snk"),
        integration_id=integration.id,
        name=payload.name,
        event_types={"types": checked_event_types(payload.event_types)},
        mapping=dict(payload.mapping),
        request_deletion=payload.request_deletion,
        enabled=payload.enabled,
        # Events committed from now on.
        event_position=latest,
        start_position=latest,
        window_sent={},
        failures=0,
        events_sent=0,
        events_skipped=0,
        events_refused=0,
        requests_sent=0,
        deletions_requested=0,
        created_at=now,
        updated_at=now,
    )
    session.add(sink)
    await session.flush()
    record_write(
        session,
        principal.actor,
        action="event_sink.create",
        object_type="event_sink",
        object_id=sink.public_id,
        changes={"integration_id": integration.public_id, **_snapshot(sink)},
    )
    return to_out(sink, integration, latest)


async def list_sinks(
    session: AsyncSession, principal: Principal, *, after_id: int | None, limit: int
) -> tuple[Sequence[tuple[EventSink, Integration]], int]:
    query = (
        select(EventSink, Integration)
        .join(Integration, Integration.id == EventSink.integration_id)
        .order_by(EventSink.id)
        .limit(limit + 1)
    )
    if after_id is not None:
        query = query.where(EventSink.id > after_id)
    if principal.visible_organisation_ids is not None:
        query = query.where(Integration.organisation_id.in_(principal.visible_organisation_ids))
    rows = [(row[0], row[1]) for row in await session.execute(query)]
    return rows, await latest_position(session)


async def show_sink(session: AsyncSession, principal: Principal, public_id: str) -> SinkOut:
    sink, integration = await get_sink(session, principal, public_id)
    return to_out(sink, integration, await latest_position(session))


async def update_sink(
    session: AsyncSession, principal: Principal, public_id: str, payload: SinkPatch
) -> SinkOut:
    sink, integration = await get_sink(session, principal, public_id, for_update=True)
    before = _snapshot(sink)
    fields = payload.model_dump(exclude_unset=True)
    if "mapping" in fields:
        _check_mapping(integration, fields["mapping"])
        sink.mapping = dict(fields["mapping"])
    if "event_types" in fields:
        sink.event_types = {"types": checked_event_types(fields["event_types"])}
    for name in ("name", "request_deletion", "enabled"):
        if name in fields:
            setattr(sink, name, fields[name])
    after = _snapshot(sink)
    changes = {k: {"before": before[k], "after": v} for k, v in after.items() if before[k] != v}
    if changes:
        sink.updated_at = utcnow()
        if fields.get("enabled") is True:
            # Re-enabled: try at once rather than at the end of a backoff.
            sink.next_attempt_at = None
        record_write(
            session,
            principal.actor,
            action="event_sink.update",
            object_type="event_sink",
            object_id=sink.public_id,
            changes=changes,
        )
    await session.flush()
    return to_out(sink, integration, await latest_position(session))


async def delete_sink(session: AsyncSession, principal: Principal, public_id: str) -> None:
    sink, _integration_row = await get_sink(session, principal, public_id, for_update=True)
    await session.delete(sink)
    record_write(
        session,
        principal.actor,
        action="event_sink.delete",
        object_type="event_sink",
        object_id=public_id,
        changes={},
    )


async def _position_range(
    session: AsyncSession, since: datetime, until: datetime
) -> tuple[int, int] | None:
    row = (
        await session.execute(
            select(func.min(Event.position), func.max(Event.position)).where(
                Event.position.is_not(None), Event.occurred_at >= since, Event.occurred_at < until
            )
        )
    ).first()
    if row is None or row[0] is None or row[1] is None:
        return None
    return int(row[0]), int(row[1])


async def request_replay(
    session: AsyncSession, principal: Principal, public_id: str, payload: ReplayRequest
) -> SinkOut:
    sink, integration = await get_sink(session, principal, public_id, for_update=True)
    if sink.replay_from is not None:
        raise ReplayUnderWay(
            "A replay of this sink is under way; ask again once it has finished.",
            details={"from_position": sink.replay_from, "to_position": sink.replay_to},
        )
    found = await _position_range(session, payload.since, payload.until)
    if found is None:
        raise ValidationFailed(
            "No event occurred in that range.",
            details={"since": payload.since.isoformat(), "until": payload.until.isoformat()},
        )
    # Only what the sink has already passed, since it was made: the rest it sends anyway,
    # and what came before it was never the sink's to send.
    first = max(found[0], sink.start_position + 1)
    last = min(found[1], sink.event_position)
    if found[1] <= sink.start_position:
        raise ValidationFailed(
            "That range ends before the sink was created: it never had those events to send.",
            details={"start_position": sink.start_position},
        )
    if first > last:
        raise ValidationFailed(
            "The sink has not reached that range yet: it will send it without a replay.",
            details={"event_position": sink.event_position},
        )
    now = utcnow()
    sink.replay_from, sink.replay_to, sink.replay_requested_at = first, last, now
    sink.updated_at = now
    record_write(
        session,
        principal.actor,
        action="event_sink.replay",
        object_type="event_sink",
        object_id=sink.public_id,
        changes={
            "since": payload.since.isoformat(),
            "until": payload.until.isoformat(),
            "from_position": first,
            "to_position": last,
        },
    )
    await session.flush()
    return to_out(sink, integration, await latest_position(session))


async def deliveries(
    session: AsyncSession,
    principal: Principal,
    public_id: str,
    *,
    after_id: int | None,
    limit: int,
) -> list[EventSinkDelivery]:
    sink, _integration_row = await get_sink(session, principal, public_id)
    query = (
        select(EventSinkDelivery)
        .where(EventSinkDelivery.sink_id == sink.id)
        .order_by(EventSinkDelivery.id.desc())
        .limit(limit + 1)
    )
    if after_id is not None:
        query = query.where(EventSinkDelivery.id < after_id)
    return list(await session.scalars(query))


def delivery_out(row: EventSinkDelivery) -> DeliveryOut:
    return DeliveryOut(
        id=row.id,
        replay=row.replay,
        first_position=row.first_position,
        last_position=row.last_position,
        status=row.status,
        events_sent=row.events_sent,
        events_skipped=row.events_skipped,
        events_refused=row.events_refused,
        requests=row.requests,
        deletions=row.deletions,
        error=row.error,
        started_at=row.started_at,
        duration_ms=row.duration_ms,
    )


async def dry_run(
    session: AsyncSession,
    hub: IntegrationHub,
    principal: Principal,
    public_id: str,
    payload: DryRunRequest,
) -> DryRunOut:
    """What the sink would send for the events it has still to send (or a time range):
    the vendor's requests as they would go, nothing sent, nothing written."""
    sink, integration = await get_sink(session, principal, public_id)
    provider = sink_provider(integration)
    assert provider is not None
    settings = await settings_for(session, sink, integration)
    if payload.since is not None and payload.until is not None:
        found = await _position_range(session, payload.since, payload.until)
        feed = (
            await events_after(session, found[0] - 1, payload.limit, until=found[1])
            if found is not None
            else []
        )
    else:
        feed = await events_after(session, sink.event_position, payload.limit)
    if not feed:
        return DryRunOut(
            events_read=0, events_to_send=0, events_skipped=0, deletions=[], requests=[], refused=[]
        )
    window = await build_window(session, provider, settings, feed)
    connection = hub.connection(integration)
    requests, refused = provider.plan_requests(connection.config, window.events)
    planned = []
    validator = getattr(provider, "validation_messages", None)
    for request in requests:
        messages = None
        if payload.validate_requests and validator is not None:
            try:
                messages = await validator(connection, request.body)
            except (GatewayError, CircuitOpen, ConnectionFailed, SinkUnavailable) as exc:
                messages = [f"the validation endpoint could not be asked: {exc}"]
        planned.append(
            PlannedRequest(
                path=request.path,
                events=[event.id for event in request.events],
                body=dict(request.body),
                validation_messages=messages,
            )
        )
    return DryRunOut(
        events_read=len(feed),
        events_to_send=len(window.events) - len(refused),
        events_skipped=window.skipped,
        deletions=list(window.withdrawn) if sink.request_deletion else [],
        requests=planned,
        refused=[{"event_id": event.id, "reason": reason} for event, reason in refused],
    )


async def sink_statuses(session: AsyncSession, principal: Principal) -> list[SinkStatus]:
    rows, latest = await list_sinks(session, principal, after_id=None, limit=10_000)
    return [
        SinkStatus(
            id=sink.public_id,
            integration_id=integration.public_id,
            provider=integration.provider,
            name=sink.name,
            enabled=sink.enabled and integration.enabled,
            healthy=sink.failing_since is None,
            lag=max(0, latest - sink.event_position),
            failures=sink.failures,
            failing_since=sink.failing_since,
            last_success_at=sink.last_success_at,
            last_error=sink.last_error,
            events_sent=sink.events_sent,
        )
        for sink, integration in rows
    ]
