"""Forwarding the event feed to analytics sinks (Segment, GA4): the worker's side.

Every worker tick, each enabled sink is forwarded on its own, all at once, so a slow or
failing vendor holds up only its own sink (webhook endpoints have their own loop):

1. Claim the sink: one short transaction locks its row and takes a lease, unless another
   worker holds one or the sink waits out a backoff after a failure.
2. Read a window of the committed feed after the sink's position, in commit order, and
   turn the events it subscribes to into the vendor's events, only for members who consent
   to the sink's purpose (as they are now: a withdrawal stops what was not yet read).
   The next window is read while this one is sent, so the vendor's answers and the
   database's overlap; windows are still sent and recorded one after another.
3. Send the window's requests one after another, so each member's events reach the vendor
   in the order they were committed. A request the vendor refuses for good (a 400) is
   split to find the events at fault, which are logged and dropped; any other failure
   stops the window: the position stays, the events the vendor did take are remembered
   (`window_sent`), and the next attempt, after an exponential backoff, sends the rest.
4. Record the window in one transaction: the new position, the totals and a delivery log
   row. Members who withdrew consent in the window get a deletion request where the vendor
   has an API for it.

A requested replay sends a range of the feed again, a window per pass after the live feed
is caught up; Segment deduplicates what it already has on `messageId`.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy import func, select

from memberhub.events.models import Event
from memberhub.integrations.gateway import CircuitOpen, GatewayError
from memberhub.integrations.hub import IntegrationHub, parse_config
from memberhub.integrations.models import Integration
from memberhub.integrations.providers import as_analytics_sink, get_provider
from memberhub.integrations.providers.base import (
    AnalyticsSink,
    Connection,
    ConnectionFailed,
    SinkEvent,
    SinkRefused,
    SinkRequest,
    SinkUnavailable,
)
from memberhub.kit.db import Database
from memberhub.organisations.repository import OrganisationRepository
from memberhub.sinks.events import SinkSettings, Window, build_window, events_after
from memberhub.sinks.models import EventSink, EventSinkDelivery, SinkDeliveryStatus

log = structlog.get_logger("memberhub.sinks")

EVENTS_PER_WINDOW = 5000
WINDOWS_PER_PASS = 10
LEASE = timedelta(minutes=5)
BACKOFF_BASE_SECONDS = 5.0
MAX_BACKOFF_SECONDS = 300.0
ERROR_CHARS = 1000
# Failures a sink may have while it still counts as healthy in the sync status.
TRANSIENT = (GatewayError, CircuitOpen, SinkUnavailable, ConnectionFailed)


def backoff(failures: int) -> timedelta:
    return timedelta(
        seconds=min(MAX_BACKOFF_SECONDS, BACKOFF_BASE_SECONDS * 2 ** max(0, failures - 1))
    )


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter(
            "memberhub_event_sink_events",
            "Events handled by each sink: sent, skipped (no consent) or refused by the vendor.",
            ["sink", "outcome"],
            registry=registry,
        )
        self.requests = Counter(
            "memberhub_event_sink_requests",
            "Requests each sink made to its vendor, by outcome: ok, refused or failed.",
            ["sink", "outcome"],
            registry=registry,
        )
        self.lag = Gauge(
            "memberhub_event_sink_lag_events",
            "Events committed to the feed that each sink has not reached yet.",
            ["sink"],
            registry=registry,
            multiprocess_mode="livemax",
        )


_metrics_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, _Metrics] = (
    weakref.WeakKeyDictionary()
)


def metrics_for(registry: CollectorRegistry) -> _Metrics:
    metrics = _metrics_by_registry.get(registry)
    if metrics is None:
        metrics = _metrics_by_registry[registry] = _Metrics(registry)
    return metrics


@dataclass(frozen=True)
class Target:
    sink_id: int
    public_id: str
    integration: Integration
    provider: AnalyticsSink
    settings: SinkSettings


@dataclass(frozen=True)
class Claim:
    position: int
    window_sent: frozenset[str]
    replay_from: int | None
    replay_to: int | None


@dataclass
class Sent:
    """What sending one window achieved."""

    sent_ids: list[str] = field(default_factory=list)
    refused: int = 0
    requests: int = 0
    deletions: int = 0
    error: BaseException | None = None


def sink_provider(integration: Integration) -> AnalyticsSink | None:
    provider = get_provider(integration.provider)
    return as_analytics_sink(provider) if provider is not None else None


async def settings_for(session: Any, sink: EventSink, integration: Integration) -> SinkSettings:
    provider = sink_provider(integration)
    assert provider is not None
    generic = get_provider(integration.provider)
    assert generic is not None
    config = parse_config(generic, integration.config)
    scope = (
        await OrganisationRepository(session).subtree_ids(integration.organisation_id)
        if integration.organisation_id is not None
        else None
    )
    return SinkSettings(
        purpose=provider.consent_purpose,
        event_types=list(sink.event_types.get("types") or []),
        mapping={**provider.default_mapping(), **(sink.mapping or {})},
        request_deletion=sink.request_deletion,
        scope=scope,
        client_id_key=getattr(config, "client_id_key", None),
    )


# ---------------------------------------------------------------- the worker's pass


async def run_event_sinks(db: Database, hub: IntegrationHub, now: datetime) -> int:
    """One pass over every enabled sink, all at once; returns the events sent."""
    async with db.transaction(read_only=True) as session:
        ids = list(
            await session.scalars(
                select(EventSink.id)
                .join(Integration, Integration.id == EventSink.integration_id)
                .where(EventSink.enabled.is_(True), Integration.enabled.is_(True))
                .order_by(EventSink.id)
            )
        )
    if not ids:
        return 0
    results = await asyncio.gather(
        *(forward_sink(db, hub, sink_id, now) for sink_id in ids), return_exceptions=True
    )
    sent = 0
    for sink_id, result in zip(ids, results, strict=True):
        if isinstance(result, BaseException):
            log.error("event_sink_pass_failed", sink_id=sink_id, error=repr(result)[:300])
        else:
            sent += result
    return sent


async def forward_sink(db: Database, hub: IntegrationHub, sink_id: int, now: datetime) -> int:
    claimed = await _claim(db, sink_id, now)
    if claimed is None:
        return 0
    target, claim = claimed
    metrics = metrics_for(hub.registry)
    try:
        connection = hub.connection(target.integration)
    except Exception as exc:
        await _record_failure(db, target, now, exc, Sent(), None)
        return 0
    sent = 0
    caught_up = False
    # The next window is read while this one is sent: sends stay one after another, in
    # commit order, and a window is recorded only once it is sent.
    reading = asyncio.create_task(_read_window(db, target, claim.position, claim.window_sent))
    try:
        for number in range(WINDOWS_PER_PASS):
            full, window = await reading
            if window is None:
                caught_up = True
                break
            if full and number + 1 < WINDOWS_PER_PASS:
                reading = asyncio.create_task(
                    _read_window(db, target, window.last_position, frozenset())
                )
            outcome = await _send_window(connection, target, window, metrics)
            if outcome.error is not None:
                await _record_failure(db, target, now, outcome.error, outcome, window)
                return sent
            await _record_window(db, target, now, window, outcome, metrics, replay=False)
            sent += len(outcome.sent_ids)
            if not full:
                caught_up = True
                break
    finally:
        await _drop(reading)
    if caught_up and claim.replay_from is not None and claim.replay_to is not None:
        replayed = await _replay_window(db, connection, target, claim, now, metrics)
        if replayed is None:
            return sent
        sent += replayed
    await _release(db, target.sink_id)
    await _show_lag(db, target, metrics)
    return sent


async def _read_window(
    db: Database, target: Target, position: int, already: frozenset[str]
) -> tuple[bool, Window | None]:
    """The window of the feed after `position` (None at its end), and whether it was full
    (more may follow)."""
    async with db.transaction(read_only=True) as session:
        feed = await events_after(session, position, EVENTS_PER_WINDOW)
        if not feed:
            return False, None
        window = await build_window(
            session, target.provider, target.settings, feed, already_sent=already
        )
    return len(feed) >= EVENTS_PER_WINDOW, window


async def _drop(task: asyncio.Task[Any]) -> None:
    """Stop a read that is no longer wanted, and wait until it has let go of its connection
    (a finished one's failure is taken and ignored: the read ahead is of no interest now)."""
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _replay_window(
    db: Database,
    connection: Connection,
    target: Target,
    claim: Claim,
    now: datetime,
    metrics: _Metrics,
) -> int | None:
    """Send the next window of the replayed range; None when it failed (recorded)."""
    assert claim.replay_from is not None
    assert claim.replay_to is not None
    async with db.transaction(read_only=True) as session:
        feed = await events_after(
            session, claim.replay_from - 1, EVENTS_PER_WINDOW, until=claim.replay_to
        )
        window = (
            await build_window(session, target.provider, target.settings, feed) if feed else None
        )
    if window is None:
        await _finish_replay(db, target.sink_id, claim)
        return 0
    # Deletions were asked for when the live feed passed these events.
    window.withdrawn = []
    outcome = await _send_window(connection, target, window, metrics)
    if outcome.error is not None:
        await _record_failure(db, target, now, outcome.error, outcome, window, replay=True)
        return None
    await _record_window(db, target, now, window, outcome, metrics, replay=True)
    return len(outcome.sent_ids)


async def _claim(db: Database, sink_id: int, now: datetime) -> tuple[Target, Claim] | None:
    async with db.transaction() as session:
        sink = await session.scalar(
            select(EventSink)
            .where(EventSink.id == sink_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        if sink is None or not sink.enabled:
            return None
        if sink.lease_until is not None and sink.lease_until > now:
            return None
        if sink.next_attempt_at is not None and sink.next_attempt_at > now:
            return None
        integration = await session.get(Integration, sink.integration_id)
        if integration is None or not integration.enabled:
            return None
        provider = sink_provider(integration)
        if provider is None:
            return None
        settings = await settings_for(session, sink, integration)
        sink.lease_until = now + LEASE
        target = Target(sink.id, sink.public_id, integration, provider, settings)
        claim = Claim(
            position=sink.event_position,
            window_sent=frozenset(sink.window_sent.get("ids") or []),
            replay_from=sink.replay_from,
            replay_to=sink.replay_to,
        )
        return target, claim


async def _send_window(
    connection: Connection, target: Target, window: Window, metrics: _Metrics
) -> Sent:
    outcome = Sent()
    requests, refused = target.provider.plan_requests(connection.config, window.events)
    for event, reason in refused:
        _refused(target, metrics, outcome, [event], reason)
    try:
        for request in requests:
            await _send_request(connection, target, metrics, outcome, request)
        for member_id in window.withdrawn:
            try:
                if await target.provider.request_deletion(connection, member_id):
                    outcome.deletions += 1
            except SinkRefused as exc:
                # Refused for good (not for credentials, which may be fixed): sending it
                # again cannot help, and the sink's other events must not wait on it.
                metrics.requests.labels(target.public_id, "refused").inc()
                log.warning(
                    "event_sink_deletion_refused",
                    sink=target.public_id,
                    member=member_id,
                    reason=str(exc)[:300],
                )
    except TRANSIENT as exc:
        metrics.requests.labels(target.public_id, "failed").inc()
        outcome.error = exc
    except Exception as exc:  # an answer not understood: tried again later, never dropped
        log.exception("event_sink_send_failed", sink=target.public_id)
        outcome.error = exc
    return outcome


async def _send_request(
    connection: Connection, target: Target, metrics: _Metrics, outcome: Sent, request: SinkRequest
) -> None:
    try:
        outcome.requests += 1
        await target.provider.send(connection, request)
    except SinkRefused as exc:
        metrics.requests.labels(target.public_id, "refused").inc()
        events = list(request.events)
        if len(events) == 1:
            _refused(target, metrics, outcome, events, str(exc))
            return
        # Refused as a whole: halve it until the events at fault are found.
        middle = len(events) // 2
        for half in (events[:middle], events[middle:]):
            parts, refused = target.provider.plan_requests(connection.config, half)
            for event, reason in refused:
                _refused(target, metrics, outcome, [event], reason)
            for part in parts:
                await _send_request(connection, target, metrics, outcome, part)
        return
    metrics.requests.labels(target.public_id, "ok").inc()
    outcome.sent_ids.extend(event.id for event in request.events)


def _refused(
    target: Target, metrics: _Metrics, outcome: Sent, events: list[SinkEvent], reason: str
) -> None:
    outcome.refused += len(events)
    metrics.events.labels(target.public_id, "refused").inc(len(events))
    log.warning(
        "event_sink_events_refused",
        sink=target.public_id,
        events=[event.id for event in events][:20],
        reason=reason[:300],
    )


def _log_row(
    target: Target,
    window: Window | None,
    outcome: Sent,
    status: str,
    started: datetime,
    *,
    replay: bool,
    error: str | None = None,
) -> EventSinkDelivery:
    return EventSinkDelivery(
        sink_id=target.sink_id,
        replay=replay,
        first_position=window.first_position if window is not None else 0,
        last_position=window.last_position if window is not None else 0,
        status=status,
        events_sent=len(outcome.sent_ids),
        events_skipped=window.skipped if window is not None else 0,
        events_refused=outcome.refused,
        requests=outcome.requests,
        deletions=outcome.deletions,
        error=error,
        started_at=started,
        duration_ms=0,
    )


async def _record_window(
    db: Database,
    target: Target,
    now: datetime,
    window: Window,
    outcome: Sent,
    metrics: _Metrics,
    *,
    replay: bool,
) -> None:
    began = time.perf_counter()
    metrics_sent = len(outcome.sent_ids)
    async with db.transaction() as session:
        sink = await _locked(session, target.sink_id)
        if sink is None:
            return
        if replay:
            sink.replay_from = window.last_position + 1
            if sink.replay_to is None or sink.replay_from > sink.replay_to:
                sink.replay_from = sink.replay_to = None
                sink.replay_requested_at = None
        else:
            sink.event_position = max(sink.event_position, window.last_position)
            sink.window_sent = {}
        sink.events_sent += metrics_sent
        sink.events_skipped += window.skipped
        sink.events_refused += outcome.refused
        sink.requests_sent += outcome.requests
        sink.deletions_requested += outcome.deletions
        sink.failures = 0
        sink.failing_since = None
        sink.next_attempt_at = None
        sink.last_success_at = now
        row = _log_row(target, window, outcome, SinkDeliveryStatus.SUCCEEDED, now, replay=replay)
        row.duration_ms = round((time.perf_counter() - began) * 1000)
        session.add(row)
    metrics.events.labels(target.public_id, "sent").inc(metrics_sent)
    metrics.events.labels(target.public_id, "skipped").inc(window.skipped)


async def _record_failure(
    db: Database,
    target: Target,
    now: datetime,
    exc: BaseException,
    outcome: Sent,
    window: Window | None,
    *,
    replay: bool = False,
) -> None:
    message = (str(exc) or type(exc).__name__)[:ERROR_CHARS]
    (log.warning if isinstance(exc, TRANSIENT) else log.error)(
        "event_sink_attempt_failed", sink=target.public_id, error=message[:300]
    )
    async with db.transaction() as session:
        sink = await _locked(session, target.sink_id)
        if sink is None:
            return
        sink.failures += 1
        sink.last_error = message
        sink.last_error_at = now
        sink.failing_since = sink.failing_since or now
        sink.next_attempt_at = now + backoff(sink.failures)
        sink.lease_until = None
        sink.requests_sent += outcome.requests
        sink.events_refused += outcome.refused
        if outcome.sent_ids and not replay:
            # Taken by the vendor: not sent again when the window is retried.
            kept = set(sink.window_sent.get("ids") or []) | set(outcome.sent_ids)
            sink.window_sent = {"ids": sorted(kept)}
            sink.events_sent += len(outcome.sent_ids)
        status = SinkDeliveryStatus.PARTIAL if outcome.sent_ids else SinkDeliveryStatus.FAILED
        session.add(_log_row(target, window, outcome, status, now, replay=replay, error=message))


async def _release(db: Database, sink_id: int) -> None:
    async with db.transaction() as session:
        sink = await _locked(session, sink_id)
        if sink is not None:
            sink.lease_until = None


async def _finish_replay(db: Database, sink_id: int, claim: Claim) -> None:
    async with db.transaction() as session:
        sink = await _locked(session, sink_id)
        if sink is None:
            return
        sink.lease_until = None
        if sink.replay_from == claim.replay_from:
            sink.replay_from = sink.replay_to = None
            sink.replay_requested_at = None


async def _locked(session: Any, sink_id: int) -> EventSink | None:
    sink: EventSink | None = await session.scalar(
        select(EventSink)
        .where(EventSink.id == sink_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    return sink


async def _show_lag(db: Database, target: Target, metrics: _Metrics) -> None:
    async with db.transaction(read_only=True) as session:
        latest = await session.scalar(select(func.max(Event.position)))
        position = await session.scalar(
            select(EventSink.event_position).where(EventSink.id == target.sink_id)
        )
    metrics.lag.labels(target.public_id).set(max(0, int(latest or 0) - int(position or 0)))
