"""Segments defined in the settings, kept as static segments at the vendor: recomputed
from the database and only the differences sent, 500 addresses a call."""

from __future__ import annotations

from datetime import datetime

import structlog

from memberhub.integrations.providers.base import Connection, SegmentMissing
from memberhub.kit.db import Database
from memberhub.marketing.models import MarketingSegment
from memberhub.marketing.repository import MarketingRepository
from memberhub.marketing.targets import Tally, Target

log = structlog.get_logger("memberhub.marketing")


async def plan_segments(
    repo: MarketingRepository, target: Target, now: datetime
) -> list[tuple[str, str, set[str], set[str], MarketingSegment | None]]:
    """Per segment: (key, name, addresses to add, to remove, its row)."""
    rows = await repo.segment_rows(target.integration.id)
    plans = []
    for definition in target.settings.segments:
        wanted = await repo.segment_emails(target.integration.id, definition.conditions, now)
        row = rows.get(definition.key)
        held = set(row.emails) if row is not None and row.remote_id else set()
        plans.append((definition.key, definition.name, wanted - held, held - wanted, row))
    return plans


async def _change(
    connection: Connection,
    target: Target,
    tally: Tally,
    remote_id: str,
    adds: list[str],
    removes: list[str],
) -> None:
    size = max(1, target.audience.segment_batch_size)
    for start in range(0, max(len(adds), len(removes)), size):
        tally.requests += 1
        await target.audience.change_segment(
            connection,
            target.settings.list_id,
            remote_id,
            add=adds[start : start + size],
            remove=removes[start : start + size],
        )


async def sync_segments(
    db: Database, connection: Connection, target: Target, tally: Tally, now: datetime
) -> None:
    async with db.transaction(read_only=True) as session:
        plans = await plan_segments(MarketingRepository(session), target, now)
    list_id = target.settings.list_id
    for key, name, add, remove, row in plans:
        remote_id = row.remote_id if row is not None else None
        if remote_id is None:
            tally.requests += 1
            remote_id = await target.audience.create_static_segment(connection, list_id, name)
        try:
            await _change(connection, target, tally, remote_id, sorted(add), sorted(remove))
        except SegmentMissing:
            # Deleted in Mailchimp meanwhile: made again, with every member it should hold.
            log.warning("marketing_segment_recreated", segment=key)
            wanted = (set(row.emails) if row is not None else set()) | add
            add, remove = wanted - remove, set()
            tally.requests += 1
            remote_id = await target.audience.create_static_segment(connection, list_id, name)
            await _change(connection, target, tally, remote_id, sorted(add), [])
        async with db.transaction() as session:
            rows = await MarketingRepository(session).segment_rows(target.integration.id)
            stored = rows.get(key)
            if stored is None:
                stored = MarketingSegment(integration_id=target.integration.id, key=key)
                session.add(stored)
            held = set(stored.emails) if stored.remote_id == remote_id else set()
            stored.name = name
            stored.remote_id = remote_id
            stored.emails = sorted((held | add) - remove)
            stored.synced_at = now
