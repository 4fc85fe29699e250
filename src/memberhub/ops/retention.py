"""Retention: records that only tell the history of deliveries and syncs are deleted once
they are older than `RETENTION_DAYS` (90 by default). The audit log is never purged, and
nothing still in flight is (pending deliveries, unsequenced or undispatched events, inbound
events waiting to be processed, sync runs not finished).

Events are also kept while a reader that follows the feed by position and sends it to a
vendor has still to send them, however long the vendor has been down: an enabled event
sink (from its position, or from the start of a replay it was asked for), an enabled
marketing-list sync, and a scheduled incremental export of the feed to an enabled storage
target (from its watermark: a target down for months still gets every event). Only what
runs by itself holds the feed: an incremental export run only on demand holds nothing
(nobody may ever run it again), nor does a sink or an integration that is disabled, or
deleted, so one switched off and forgotten cannot keep history forever; enabled again
after more than `RETENTION_DAYS`, it resumes at the oldest event still kept. Readers
that need no vendor to move on (the CRM's change marking, the notification planner) keep
up by themselves, and the search sync rebuilds its index when it finds events behind its
position purged.

Notifications have a retention of their own (`NOTIFICATION_RETENTION_DAYS`, 180 by
default): once sent, delivered, bounced, failed or suppressed, a notification and its
rendered subject and body (personal data) go when older than that; queued ones stay until
they are settled. Nothing else counts on them: the suppression list is kept apart and
lasts until an address is lifted.

Deletion goes in small batches, oldest first, each its own short transaction: a batch
names its rows by id, so no statement scans or locks more than a batch of a hot table.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    ScalarSelect,
    Table,
    and_,
    case,
    delete,
    exists,
    func,
    select,
    union_all,
)

from memberhub.crm.models import RunStatus, SyncRun, SyncRunRecord
from memberhub.events.models import Event
from memberhub.exports.models import Export, ExportMode
from memberhub.integrations.models import InboundEvent, InboundStatus, Integration
from memberhub.kit.db import Database
from memberhub.marketing.models import MarketingSyncState
from memberhub.notifications.models import Notification, NotificationStatus
from memberhub.sinks.models import EventSink
from memberhub.webhooks.models import DeliveryStatus, WebhookAttempt, WebhookDelivery

BATCH_ROWS = 500

_DELIVERIES = cast(Table, WebhookDelivery.__table__)
_ATTEMPTS = cast(Table, WebhookAttempt.__table__)
_EVENTS = cast(Table, Event.__table__)
_HIGHEST = _EVENTS.alias("highest")
_INBOUND = cast(Table, InboundEvent.__table__)
_RUNS = cast(Table, SyncRun.__table__)
_RUN_RECORDS = cast(Table, SyncRunRecord.__table__)
_NOTIFICATIONS = cast(Table, Notification.__table__)
_INTEGRATIONS = cast(Table, Integration.__table__)
_SINKS = cast(Table, EventSink.__table__)
_MARKETING = cast(Table, MarketingSyncState.__table__)
_EXPORTS = cast(Table, Export.__table__)


def _lowest_unsent_position() -> ScalarSelect[Any]:
    """The lowest position a vendor-bound reader of the feed has passed (NULL when there
    is none): the events after it are still to be sent."""
    sinks = (
        select(
            case(
                (
                    _SINKS.c.replay_from.is_not(None)
                    & (_SINKS.c.replay_from <= _SINKS.c.event_position),
                    _SINKS.c.replay_from - 1,
                ),
                else_=_SINKS.c.event_position,
            ).label("position")
        )
        .join(_INTEGRATIONS, _INTEGRATIONS.c.id == _SINKS.c.integration_id)
        .where(_SINKS.c.enabled.is_(True), _INTEGRATIONS.c.enabled.is_(True))
    )
    marketing = (
        select(_MARKETING.c.event_position.label("position"))
        .join(_INTEGRATIONS, _INTEGRATIONS.c.id == _MARKETING.c.integration_id)
        .where(_INTEGRATIONS.c.enabled.is_(True))
    )
    exports = (
        select(_EXPORTS.c.watermark.label("position"))
        .join(_INTEGRATIONS, _INTEGRATIONS.c.id == _EXPORTS.c.storage_integration_id)
        .where(
            _EXPORTS.c.table_name == "events",
            _EXPORTS.c.mode == ExportMode.INCREMENTAL,
            _EXPORTS.c.schedule.is_not(None),
            _EXPORTS.c.watermark.is_not(None),
            _INTEGRATIONS.c.enabled.is_(True),
        )
    )
    readers = union_all(sinks, marketing, exports).subquery("readers")
    return select(func.min(readers.c.position)).scalar_subquery()


@dataclass(frozen=True)
class _Kind:
    """Rows of `table` to purge, and the child rows (table, column naming the parent) that
    go first in the same batch."""

    name: str
    table: Table
    due: Any  # cutoff -> condition
    children: tuple[tuple[Table, str], ...] = ()


def _kinds() -> tuple[_Kind, ...]:
    def deliveries(cutoff: datetime) -> ColumnElement[bool]:
        return and_(
            _DELIVERIES.c.status != DeliveryStatus.PENDING, _DELIVERIES.c.created_at < cutoff
        )

    def events(cutoff: datetime) -> ColumnElement[bool]:
        # The event with the highest position is kept, whatever its age: the sequencer
        # numbers new events from it, and without it positions would be handed out again
        # (a feed cursor, an endpoint or a sink past them would skip the new events).
        highest = select(func.max(_HIGHEST.c.position)).scalar_subquery()
        # Computed once per batch, not per row; with no such reader it holds nothing.
        sent = func.coalesce(_lowest_unsent_position(), highest)
        return and_(
            _EVENTS.c.occurred_at < cutoff,
            _EVENTS.c.position.is_not(None),
            _EVENTS.c.position < highest,
            _EVENTS.c.position <= sent,
            _EVENTS.c.dispatched_at.is_not(None),
            ~exists().where(_DELIVERIES.c.event_id == _EVENTS.c.id),
        )

    def inbound(cutoff: datetime) -> ColumnElement[bool]:
        return and_(_INBOUND.c.status != InboundStatus.PENDING, _INBOUND.c.received_at < cutoff)

    def runs(cutoff: datetime) -> ColumnElement[bool]:
        return and_(
            _RUNS.c.status.in_((RunStatus.COMPLETED, RunStatus.FAILED)),
            _RUNS.c.created_at < cutoff,
        )

    def notifications(cutoff: datetime) -> ColumnElement[bool]:
        return and_(
            _NOTIFICATIONS.c.status != NotificationStatus.QUEUED,
            _NOTIFICATIONS.c.created_at < cutoff,
        )

    return (
        _Kind("notifications", _NOTIFICATIONS, notifications),
        _Kind("webhook_deliveries", _DELIVERIES, deliveries, ((_ATTEMPTS, "delivery_id"),)),
        _Kind("events", _EVENTS, events),
        _Kind("inbound_events", _INBOUND, inbound),
        _Kind("crm_sync_runs", _RUNS, runs, ((_RUN_RECORDS, "run_id"),)),
    )


async def purge_expired_history(
    db: Database,
    *,
    older_than: datetime,
    notifications_older_than: datetime | None = None,
    batch_rows: int = BATCH_ROWS,
) -> dict[str, int]:
    """Delete, batch by batch, what is older than `older_than` (notifications: older than
    `notifications_older_than`, none when it is None); rows deleted per table."""
    deleted: dict[str, int] = {}
    for kind in _kinds():
        cutoff = notifications_older_than if kind.table is _NOTIFICATIONS else older_than
        if cutoff is None:
            continue
        total = 0
        while True:
            async with db.transaction() as session:
                ids = list(
                    await session.scalars(
                        select(kind.table.c.id)
                        .where(kind.due(cutoff))
                        .order_by(kind.table.c.id)
                        .limit(batch_rows)
                    )
                )
                if not ids:
                    break
                for child, column in kind.children:
                    await session.execute(delete(child).where(child.c[column].in_(ids)))
                await session.execute(delete(kind.table).where(kind.table.c.id.in_(ids)))
            total += len(ids)
        deleted[kind.name] = total
    return deleted
