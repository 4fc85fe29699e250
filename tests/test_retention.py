"""Retention: finished history older than RETENTION_DAYS is deleted in batches; anything
in flight, anything recent and the audit log are kept."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, cast

import pytest
from pydantic import ValidationError
from sqlalchemy import Table, insert, select

from memberhub.audit.models import AuditEntry
from memberhub.crm.models import SyncRun, SyncRunRecord
from memberhub.events.models import Event
from memberhub.integrations.models import InboundEvent, Integration
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database, column_values
from memberhub.kit.ids import new_public_id
from memberhub.members.models import Member
from memberhub.notifications.models import Notification, Suppression
from memberhub.ops.retention import purge_expired_history
from memberhub.settings import Settings
from memberhub.webhooks.delivery import fan_out
from memberhub.webhooks.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from tests.support import ApiClient, age_the_feed

EVENTS = cast(Table, Event.__table__)
DELIVERIES = cast(Table, WebhookDelivery.__table__)
ATTEMPTS = cast(Table, WebhookAttempt.__table__)
INBOUND = cast(Table, InboundEvent.__table__)
RUNS = cast(Table, SyncRun.__table__)
RECORDS = cast(Table, SyncRunRecord.__table__)


def _row(table: Table, **values: Any) -> dict[str, Any]:
    return {k[2:]: v for k, v in column_values(table, values, "x", ("id",)).items()}


async def _insert(db: Database, table: Table, **values: Any) -> int:
    async with db.transaction() as session:
        return int(
            await session.scalar(insert(table).values(_row(table, **values)).returning(table.c.id))
        )


async def _ids(db: Database, table: Table) -> set[int]:
    async with db.transaction(read_only=True) as session:
        return set(await session.scalars(select(table.c.id)))


async def test_old_finished_history_goes_and_everything_else_stays(
    api: ApiClient, db: Database
) -> None:
    endpoint = await api.post(
        "/api/v1/webhook-endpoints", {"url": "http://127.0.0.1:9/hook", "event_types": ["*"]}
    )
    assert endpoint.status_code == 201, endpoint.text
    integration = await api.post(
        "/api/v1/integrations",
        {"provider": "http", "name": "P", "config": {"base_url": "http://127.0.0.1:9"}},
    )
    assert integration.status_code == 201, integration.text
    async with db.transaction(read_only=True) as session:
        endpoint_id = await session.scalar(select(WebhookEndpoint.id))
        integration_id = await session.scalar(select(Integration.id))
    now = utcnow()
    old, recent = now - timedelta(days=91), now - timedelta(days=89)

    async def event(at: datetime, *, sequenced: bool = True, position: int = 0) -> int:
        return await _insert(
            db,
            EVENTS,
            public_id=new_public_id("evt"),
            type="member.created",
            occurred_at=at,
            data={},
            position=position if sequenced else None,
            dispatched_at=at if sequenced else None,
        )

    async def delivery(event_id: int, status: str, at: datetime) -> int:
        return await _insert(
            db,
            DELIVERIES,
            public_id=new_public_id("dlv"),
            endpoint_id=endpoint_id,
            event_id=event_id,
            event_position=1,
            status=status,
            created_at=at,
        )

    gone_event = await event(old, position=10_001)
    delivered_event = await event(old, position=10_002)
    done = await delivery(delivered_event, "succeeded", old)
    await _insert(
        db, ATTEMPTS, delivery_id=done, number=1, started_at=old, duration_ms=5, succeeded=True
    )
    waiting_event = await event(old, position=10_003)
    pending = await delivery(waiting_event, "pending", old)
    unsequenced = await event(old, sequenced=False)
    young = await event(recent, position=10_004)

    async def inbound(status: str, at: datetime) -> int:
        return await _insert(
            db,
            INBOUND,
            public_id=new_public_id("ibe"),
            integration_id=integration_id,
            provider_event_id=new_public_id("pe"),
            event_type="x",
            body="{}",
            status=status,
            received_at=at,
        )

    old_processed, old_pending = await inbound("processed", old), await inbound("pending", old)

    async def run(status: str, at: datetime) -> int:
        return await _insert(
            db,
            RUNS,
            public_id=new_public_id("run"),
            integration_id=integration_id,
            mode="push",
            trigger="manual",
            status=status,
            requested_by="test",
            created_at=at,
        )

    finished, running = await run("completed", old), await run("running", old)
    await _insert(db, RECORDS, run_id=finished, outcome="created")
    audit_before = await _ids(db, cast(Table, AuditEntry.__table__))

    deleted = await purge_expired_history(db, older_than=now - timedelta(days=90), batch_rows=2)

    assert deleted == {
        "webhook_deliveries": 1,
        "events": 2,
        "inbound_events": 1,
        "crm_sync_runs": 1,
    }
    events = await _ids(db, EVENTS)
    assert {gone_event, delivered_event} & events == set()
    assert {waiting_event, unsequenced, young} <= events
    assert await _ids(db, DELIVERIES) == {pending}
    assert await _ids(db, ATTEMPTS) == set()
    assert old_pending in await _ids(db, INBOUND)
    assert old_processed not in await _ids(db, INBOUND)
    assert await _ids(db, RUNS) & {finished, running} == {running}
    assert await _ids(db, RECORDS) == set()
    assert await _ids(db, cast(Table, AuditEntry.__table__)) >= audit_before
    assert await purge_expired_history(db, older_than=now - timedelta(days=90)) == dict.fromkeys(
        deleted, 0
    )


async def test_a_feed_cursor_and_an_endpoint_get_new_events_after_all_history_was_purged(
    api: ApiClient, db: Database
) -> None:
    for _ in range(3):
        await api.create_member()
    first = (await api.get("/api/v1/events")).json()
    assert len(first["data"]) == 3
    cursor = first["pagination"]["next_cursor"]
    endpoint = await api.post(
        "/api/v1/webhook-endpoints", {"url": "http://127.0.0.1:9/hook", "event_types": ["*"]}
    )
    assert endpoint.status_code == 201, endpoint.text
    # A quiet installation: 91 days on, the purge finds the whole feed finished and old.
    await age_the_feed(db)
    deleted = await purge_expired_history(db, older_than=utcnow() - timedelta(days=90))
    # All but the newest: the sequencer numbers new events after it.
    assert deleted["events"] == 2
    new = await api.create_member()
    polled = (await api.get("/api/v1/events", params={"cursor": cursor})).json()
    assert [e["member_id"] for e in polled["data"]] == [new["id"]]
    async with db.transaction() as session:
        await fan_out(session, utcnow())
    deliveries = await api.get(f"/api/v1/webhook-endpoints/{endpoint.json()['id']}/deliveries")
    assert [d["event_id"] for d in deliveries.json()["data"]] == [polled["data"][0]["id"]]


async def test_settled_notifications_go_after_their_own_retention_and_queued_ones_stay(
    api: ApiClient, db: Database
) -> None:
    notifications = cast(Table, Notification.__table__)
    member = await api.create_member(email="kept@example.com")
    async with db.transaction(read_only=True) as session:
        member_id = await session.scalar(select(Member.id).where(Member.public_id == member["id"]))
    now = utcnow()
    old, recent = now - timedelta(days=181), now - timedelta(days=179)

    async def notification(status: str, at: datetime) -> int:
        return await _insert(
            db,
            notifications,
            public_id=new_public_id("ntf"),
            event_public_id=new_public_id("evt"),
            message_type="points_earned",
            category="transactional",
            channel="email",
            audience="member",
            member_id=member_id,
            recipient="kept@example.com",
            recipient_key="kept@example.com",
            subject="You earned points",
            text="Hi Ann, you earned 40 points.",
            status=status,
            next_attempt_at=at if status == "queued" else None,
            created_at=at,
            updated_at=at,
        )

    gone = {
        await notification(status, old)
        for status in ("sent", "delivered", "bounced", "failed", "suppressed")
    }
    waiting = await notification("queued", old)
    young = await notification("sent", recent)
    async with db.transaction() as session:
        suppressed = await session.scalar(
            insert(Suppression)
            .values(
                public_id=new_public_id("sup"),
                channel="email",
                address="kept@example.com",
                reason="bounced",
                created_at=old,
            )
            .returning(Suppression.id)
        )

    # The general retention (90 days) does not reach notifications: they have their own.
    kept = await purge_expired_history(db, older_than=now - timedelta(days=90))
    assert "notifications" not in kept
    assert await _ids(db, notifications) == gone | {waiting, young}

    deleted = await purge_expired_history(
        db,
        older_than=now - timedelta(days=90),
        notifications_older_than=now - timedelta(days=180),
        batch_rows=2,
    )

    assert deleted["notifications"] == 5
    assert await _ids(db, notifications) == {waiting, young}
    assert await _ids(db, cast(Table, Suppression.__table__)) == {suppressed}
    again = await purge_expired_history(
        db,
        older_than=now - timedelta(days=90),
        notifications_older_than=now - timedelta(days=180),
    )
    assert again["notifications"] == 0


def test_the_notification_retention_defaults_to_180_days_and_is_at_least_31() -> None:
    assert Settings().notification_retention_days == 180
    assert Settings(notification_retention_days=31).notification_retention_days == 31
    with pytest.raises(ValidationError):
        Settings(notification_retention_days=30)
