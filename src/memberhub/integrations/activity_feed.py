"""Activities from connectors: providers that turn a vendor's records into activities
(Eventbrite's attendees), by webhook and by import.

A provider feeds activities when it implements `ActivityFeed`. Its webhooks name what to
read rather than carry it, so reading happens before the inbound event's transaction
(`prefetch`), through the integration's gateway, and no database lock is held while the
vendor answers; the activities read are then recorded in the transaction that marks the
event processed (`record_all`). An import reads page after page and records each page in a
transaction of its own. Recording goes through `record_activity` with the integration as
the actor and its organisation as the activities' scope, so a repeat of an activity (a
second webhook, a re-import) is a replay and earns nothing again.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.activities.schemas import ActivityIn
from memberhub.activities.service import record_activity
from memberhub.auth.principal import Principal
from memberhub.integrations.models import InboundEvent, InboundStatus, Integration
from memberhub.integrations.providers import get_provider
from memberhub.integrations.providers.base import Connection, Provider
from memberhub.kit.actor import Actor
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.kit.errors import ValidationFailed

if TYPE_CHECKING:
    from memberhub.integrations.hub import IntegrationHub


@runtime_checkable
class ActivityFeed(Protocol):
    """A provider whose records become activities."""

    async def fetch_webhook_activities(
        self, connection: Connection, event_type: str, payload: Mapping[str, Any]
    ) -> list[ActivityIn] | None:
        """The activities an inbound event leads to, read from the vendor; None when its
        type leads to none. ValueError when the event cannot be acted on at all."""

    def import_activities(self, connection: Connection) -> AsyncIterator[list[ActivityIn]]:
        """Every activity the integration's settings choose, a page at a time."""


def as_activity_feed(provider: Provider | None) -> ActivityFeed | None:
    return provider if isinstance(provider, ActivityFeed) else None


class NotAnActivitySource(ValidationFailed):
    code = "NOT_AN_ACTIVITY_SOURCE"


class NoHub(RuntimeError):
    """This process has no integration hub to read the vendor with (a worker started
    without settings): the event waits for one that has."""


@dataclass(frozen=True)
class Fetched:
    """What an inbound event leads to, read before its transaction."""

    activities: list[ActivityIn] | None


class ImportOut(BaseModel):
    recorded: int = Field(description="Activities recorded for the first time.")
    replayed: int = Field(description="Activities recorded before (nothing earned again).")
    matched: int = Field(description="Of those recorded, the ones that found their member.")
    unmatched: int = Field(description="Of those recorded, the ones that wait for a member.")
    points: int = Field(description="Points the earning rules credited.")


@dataclass
class Counts:
    recorded: int = 0
    replayed: int = 0
    matched: int = 0
    unmatched: int = 0
    points: int = 0

    def add(self, other: Counts) -> None:
        for name in ("recorded", "replayed", "matched", "unmatched", "points"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def out(self) -> ImportOut:
        return ImportOut(**dataclasses.asdict(self))


def _principal(integration: Integration) -> Principal:
    system = Principal.system(Actor.system(f"integration:{integration.public_id}"))
    return dataclasses.replace(system, organisation_id=integration.organisation_id)


async def record_all(
    session: AsyncSession, integration: Integration, activities: list[ActivityIn], now: datetime
) -> Counts:
    """Record the activities in the caller's transaction, as the integration."""
    principal = _principal(integration)
    counts = Counts()
    for payload in activities:
        result = await record_activity(session, principal, payload, now=now)
        if result.replayed:
            counts.replayed += 1
            continue
        counts.recorded += 1
        if result.activity.member_id is None:
            counts.unmatched += 1
        else:
            counts.matched += 1
        counts.points += sum(credit.points for credit in result.activity.credits)
    return counts


async def prefetch(db: Database, hub: IntegrationHub | None, event_id: int) -> Fetched | None:
    """Read what a pending inbound event of an activity feed leads to; None for events of
    other providers (and events no longer pending). Raises ValidationFailed for an event
    that can never be acted on, anything else for a failure worth retrying."""
    async with db.transaction(read_only=True) as session:
        row = (
            await session.execute(
                select(InboundEvent, Integration)
                .join(Integration, Integration.id == InboundEvent.integration_id)
                .where(InboundEvent.id == event_id, InboundEvent.status == InboundStatus.PENDING)
            )
        ).first()
    if row is None:
        return None
    event, integration = row
    feed = as_activity_feed(get_provider(integration.provider))
    if feed is None:
        return None
    if hub is None:
        raise NoHub("no integration hub in this process to read the vendor with")
    try:
        payload = json.loads(event.body)
        if not isinstance(payload, dict):
            raise ValueError("the body is not a JSON object")
        activities = await feed.fetch_webhook_activities(
            hub.connection(integration), event.event_type, payload
        )
    except ValueError as exc:
        raise ValidationFailed(f"The event cannot be acted on: {exc}.") from None
    return Fetched(activities)


async def apply_fetched(
    session: AsyncSession, integration: Integration, fetched: Fetched, now: datetime
) -> tuple[str, dict[str, Any]]:
    """Record what `prefetch` read; the inbound event's status and result."""
    if fetched.activities is None:
        return InboundStatus.IGNORED, {"reason": "this action leads to no activities"}
    counts = await record_all(session, integration, fetched.activities, now)
    return InboundStatus.PROCESSED, {"activities": dataclasses.asdict(counts)}


async def run_import(db: Database, hub: IntegrationHub, integration: Integration) -> Counts:
    """Import the integration's activities, each page recorded in its own transaction (a
    failure part-way keeps the pages before it; importing again replays them)."""
    feed = as_activity_feed(get_provider(integration.provider))
    if feed is None:
        raise NotAnActivitySource(
            f"{integration.provider} integrations import no activities.",
        )
    totals = Counts()
    async for page in feed.import_activities(hub.connection(integration)):
        if not page:
            continue
        async with db.transaction() as session:
            stored = await session.get(Integration, integration.id)
            assert stored is not None
            totals.add(await record_all(session, stored, page, utcnow()))
    return totals
