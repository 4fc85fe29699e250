"""Keeping hosted search indices in step with the rewards catalog and the member directory.

Every worker tick, for each enabled integration whose provider is a search index:

1. Claim it: one short transaction locks its state row and takes a lease, unless another
   worker holds one or the integration waits out a backoff after a failure. The first
   claim starts at the feed's end and asks for a full reindex; so does a change of the
   index settings (another index name, other member fields or consent).
2. A full reindex, when asked for, rebuilds each index from the database (atomically where
   the provider can swap a rebuilt index in), then moves the position to where the feed
   stood when it began: changes committed meanwhile are read again, which is harmless.
3. Otherwise the committed event feed is read after the position, one window at a time.
   The rewards and members a window's events name are read as they are now and saved or
   deleted in batches; only once the vendor has accepted them does a second transaction
   move the position past the window. Events purged (RETENTION_DAYS) before the index took
   them leave a gap after the position: then the index is rebuilt whole, as in 2.

A failure leaves the position where it was and records the error: the next attempt (after
a backoff) reads the same window again, so no change is lost and windows reach the index in
feed order. Records are written as the database holds them when sent, so sending one twice
changes nothing. No transaction stays open across a call to the vendor.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import structlog

from memberhub.events.repository import FeedEvent
from memberhub.integrations.gateway import CircuitOpen, GatewayError
from memberhub.integrations.hub import IntegrationHub, parse_config
from memberhub.integrations.models import Integration
from memberhub.integrations.providers import as_search_index, get_provider, provider_names
from memberhub.integrations.providers.base import (
    Capability,
    Connection,
    ConnectionFailed,
    RebuildableSearchIndex,
    SearchIndex,
    SearchRecord,
)
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.search.models import SearchSyncState
from memberhub.search.records import member_record, reward_record
from memberhub.search.repository import SearchRepository
from memberhub.search.settings import MemberDirectory, SearchSyncSettings

log = structlog.get_logger("memberhub.search")

EVENTS_PER_WINDOW = 1000
WINDOWS_PER_TICK = 20
LEASE = timedelta(minutes=15)
MAX_BACKOFF_SECONDS = 600
REINDEX_CHUNK = 1000
# Events that change what a reward's record holds (claims move its stock).
REWARD_EVENTS = frozenset(
    {"reward.created", "reward.updated", "reward.claimed", "reward.claim.cancelled"}
)
# Events that change a member's directory record or whether the member is listed.
MEMBER_EVENTS = frozenset(
    {
        "member.created",
        "member.updated",
        "member.deleted",
        "member.status.changed",
        "member.tier.changed",
    }
)


@dataclass(frozen=True)
class Target:
    """An integration that keeps search indices: its provider and index settings."""

    integration: Integration
    index: SearchIndex
    settings: SearchSyncSettings


@dataclass(frozen=True)
class Claim:
    position: int
    reindex_requested_at: datetime | None


@dataclass
class Changes:
    """What one window asks of each index: records to save and ids to delete."""

    saves: dict[str, list[SearchRecord]] = field(default_factory=dict)
    deletes: dict[str, list[str]] = field(default_factory=dict)

    def save(self, index: str, record: SearchRecord) -> None:
        self.saves.setdefault(index, []).append(record)

    def delete(self, index: str, object_id: str) -> None:
        self.deletes.setdefault(index, []).append(object_id)

    @property
    def saved(self) -> int:
        return sum(len(records) for records in self.saves.values())

    @property
    def deleted(self) -> int:
        return sum(len(ids) for ids in self.deletes.values())


def search_target(integration: Integration) -> Target | None:
    """The integration as a search index with its settings; None for other providers."""
    provider = get_provider(integration.provider)
    if provider is None:
        return None
    index = as_search_index(provider)
    if index is None:
        return None
    config = parse_config(provider, integration.config)
    if not isinstance(config, SearchSyncSettings):
        return None
    return Target(integration, index, config)


def search_providers() -> list[str]:
    names = []
    for name in provider_names():
        provider = get_provider(name)
        if provider is not None and Capability.SEARCH_INDEX in provider.capabilities:
            names.append(name)
    return names


def settings_fingerprint(settings: SearchSyncSettings) -> str:
    shape = {
        "rewards_index": settings.rewards_index,
        "member_directory": settings.member_directory.model_dump()
        if settings.member_directory
        else None,
    }
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()


def backoff(failures: int) -> timedelta:
    return timedelta(seconds=min(MAX_BACKOFF_SECONDS, 5 * 2 ** max(0, failures - 1)))


# ---------------------------------------------------------------- the worker's pass


async def run_search_sync(db: Database, hub: IntegrationHub, now: datetime) -> int:
    """One pass over every search-index integration; returns how many records were written
    (saved or deleted)."""
    async with db.transaction(read_only=True) as session:
        integrations = await SearchRepository(session).integrations(search_providers())
    written = 0
    for integration in integrations:
        try:
            target = search_target(integration)
            if target is None:
                continue
            written += await sync_integration(db, hub, target, now)
        except Exception:
            # One integration's trouble (settings no longer valid, a lost database
            # connection) leaves the others' sync running.
            log.exception("search_sync_failed", integration=integration.public_id)
    return written


async def sync_integration(db: Database, hub: IntegrationHub, target: Target, now: datetime) -> int:
    claim = await _claim(db, target, now)
    if claim is None:
        return 0
    integration_id = target.integration.id
    try:
        connection = hub.connection(target.integration)
        if claim.reindex_requested_at is not None:
            return await _reindex(db, connection, target, claim)
        return await _catch_up(db, connection, target, claim.position)
    except Exception as exc:
        # The position stays: the next attempt, after a backoff, sends the same window.
        await _record_failure(db, integration_id, exc, utcnow())
        expected = isinstance(exc, GatewayError | CircuitOpen | ConnectionFailed)
        (log.warning if expected else log.exception)(
            "search_sync_attempt_failed",
            integration=target.integration.public_id,
            error=str(exc)[:300],
        )
        return 0


async def _claim(db: Database, target: Target, now: datetime) -> Claim | None:
    fingerprint = settings_fingerprint(target.settings)
    async with db.transaction() as session:
        repo = SearchRepository(session)
        state = await repo.state(target.integration.id, for_update=True)
        if state is None:
            # From now on, after building the indices whole.
            state = SearchSyncState(
                integration_id=target.integration.id,
                event_position=await repo.latest_position(),
                settings_fingerprint=fingerprint,
                reindex_requested_at=now,
                records_saved=0,
                records_deleted=0,
                failures=0,
            )
            session.add(state)
        if state.settings_fingerprint != fingerprint and state.reindex_requested_at is None:
            state.reindex_requested_at = now
        if state.lease_until is not None and state.lease_until > now:
            return None
        if state.next_attempt_at is not None and state.next_attempt_at > now:
            return None
        state.lease_until = now + LEASE
        return Claim(state.event_position, state.reindex_requested_at)


async def _record_failure(
    db: Database, integration_id: int, exc: BaseException, now: datetime
) -> None:
    async with db.transaction() as session:
        state = await SearchRepository(session).state(integration_id, for_update=True)
        if state is None:
            return
        state.failures += 1
        state.last_error = (str(exc) or type(exc).__name__)[:1000]
        state.last_error_at = now
        state.next_attempt_at = now + backoff(state.failures)
        state.lease_until = None


async def _record_success(
    db: Database,
    integration_id: int,
    *,
    position: int,
    saved: int,
    deleted: int,
    release: bool,
    reindexed: Claim | None = None,
    fingerprint: str | None = None,
) -> None:
    now = utcnow()
    async with db.transaction() as session:
        state = await SearchRepository(session).state(integration_id, for_update=True)
        if state is None:
            return  # the integration was deleted meanwhile
        state.event_position = max(state.event_position, position)
        state.records_saved += saved
        state.records_deleted += deleted
        state.last_synced_at = now
        state.failures = 0
        state.last_error = None
        state.next_attempt_at = None
        if reindexed is not None:
            state.last_reindex_at = now
            state.settings_fingerprint = fingerprint
            # A reindex asked for while this one ran is still to do.
            if state.reindex_requested_at == reindexed.reindex_requested_at:
                state.reindex_requested_at = None
        state.lease_until = None if release else now + LEASE


# ---------------------------------------------------------------- following the feed


async def _catch_up(db: Database, connection: Connection, target: Target, position: int) -> int:
    written = 0
    purged = False
    for _ in range(WINDOWS_PER_TICK):
        async with db.transaction(read_only=True) as session:
            repo = SearchRepository(session)
            events = await repo.events_after(position, EVENTS_PER_WINDOW)
            if not events:
                break
            if events[0].position != position + 1:
                # Positions run without a gap, so the events after the position were purged
                # (RETENTION_DAYS) while the index could not be written: what they changed
                # (an erasure, a consent withdrawn) is unknown, and the index is rebuilt.
                purged = True
                break
            scope = await repo.scope(target.integration.organisation_id)
            changes = await _changes(repo, target.settings, events, scope)
        await _send(connection, target.index, changes)
        position = events[-1].position
        last_window = len(events) < EVENTS_PER_WINDOW
        await _record_success(
            db,
            target.integration.id,
            position=position,
            saved=changes.saved,
            deleted=changes.deleted,
            release=last_window,
        )
        written += changes.saved + changes.deleted
        if last_window:
            return written
    if purged:
        claim = await _ask_reindex(db, target.integration.id, position)
        return written + await _reindex(db, connection, target, claim)
    await _release(db, target.integration.id)
    return written


async def _ask_reindex(db: Database, integration_id: int, position: int) -> Claim:
    async with db.transaction() as session:
        state = await SearchRepository(session).state(integration_id, for_update=True)
        assert state is not None
        if state.reindex_requested_at is None:
            state.reindex_requested_at = utcnow()
        log.warning("search_feed_purged_behind_position", integration_id=integration_id)
        return Claim(position, state.reindex_requested_at)


async def _release(db: Database, integration_id: int) -> None:
    async with db.transaction() as session:
        state = await SearchRepository(session).state(integration_id, for_update=True)
        if state is not None:
            state.lease_until = None


async def _changes(
    repo: SearchRepository,
    settings: SearchSyncSettings,
    events: Sequence[FeedEvent],
    scope: frozenset[int] | None,
) -> Changes:
    """Each record the window touches once, as the database holds it now; members outside
    `scope` (the integration's organisations; None: all) are not listed."""
    reward_ids: dict[str, None] = {}
    member_ids: dict[str, None] = {}
    directory = settings.member_directory
    for event in events:
        if event.type in REWARD_EVENTS and settings.rewards_index:
            reward_id = event.data.get("reward_id")
            if isinstance(reward_id, str):
                reward_ids[reward_id] = None
        elif (
            event.type in MEMBER_EVENTS
            and directory is not None
            and event.member_public_id
            and await _concerns(repo, event, scope)
        ):
            member_ids[event.member_public_id] = None
    changes = Changes()
    if reward_ids and settings.rewards_index:
        rewards = await repo.rewards_by_public_id(list(reward_ids))
        for reward_id in reward_ids:
            reward = rewards.get(reward_id)
            record = reward_record(reward) if reward is not None else None
            if record is None:
                changes.delete(settings.rewards_index, reward_id)
            else:
                changes.save(settings.rewards_index, record)
    if member_ids and directory is not None:
        members = await repo.members_by_public_id(list(member_ids))
        organisations = await repo.organisation_public_ids(
            {m.organisation_id for m in members.values() if m.organisation_id is not None}
        )
        for member_id in member_ids:
            member = members.get(member_id)
            listed = member is not None and (scope is None or member.organisation_id in scope)
            record = member_record(member, directory, organisations) if member and listed else None
            if record is None:
                changes.delete(directory.index, member_id)
            else:
                changes.save(directory.index, record)
    return changes


async def _concerns(repo: SearchRepository, event: FeedEvent, scope: frozenset[int] | None) -> bool:
    """Whether a member's event is the integration's to act on: one of its organisations'
    members, or one that just moved out of them (to be taken out of the directory). Other
    organisations' members are never named to the vendor, not even in a delete."""
    if scope is None or event.organisation_id in scope:
        return True
    changed = event.data.get("changed_fields")
    if event.type != "member.updated" or not (
        isinstance(changed, list) and "organisation_id" in changed
    ):
        return False
    assert event.member_public_id is not None
    found, before = await repo.organisation_before(event.member_public_id, event.position)
    # With the earlier events purged, where it was is unknown: take it out to be sure.
    return not found or before in scope


async def _send(connection: Connection, index: SearchIndex, changes: Changes) -> None:
    size = max(1, index.batch_size)
    for name, records in changes.saves.items():
        for start in range(0, len(records), size):
            await index.save_records(connection, name, records[start : start + size])
    for name, object_ids in changes.deletes.items():
        for start in range(0, len(object_ids), size):
            await index.delete_records(connection, name, object_ids[start : start + size])


# ---------------------------------------------------------------- full reindex


async def _reindex(db: Database, connection: Connection, target: Target, claim: Claim) -> int:
    async with db.transaction(read_only=True) as session:
        # Changes committed from here on are read again afterwards.
        start_position = await SearchRepository(session).latest_position()
    settings = target.settings
    written = 0
    size = max(1, min(target.index.batch_size, REINDEX_CHUNK))
    if settings.rewards_index:
        written += await _rebuild(
            connection, target.index, settings.rewards_index, _reward_batches(db, size)
        )
    if settings.member_directory is not None:
        directory = settings.member_directory
        async with db.transaction(read_only=True) as session:
            scope = await SearchRepository(session).scope(target.integration.organisation_id)
        written += await _rebuild(
            connection, target.index, directory.index, _member_batches(db, directory, size, scope)
        )
    await _record_success(
        db,
        target.integration.id,
        position=max(start_position, claim.position),
        saved=written,
        deleted=0,
        release=True,
        reindexed=claim,
        fingerprint=settings_fingerprint(settings),
    )
    return written


async def _rebuild(
    connection: Connection,
    index: SearchIndex,
    name: str,
    batches: AsyncIterator[Sequence[SearchRecord]],
) -> int:
    if isinstance(index, RebuildableSearchIndex):
        return await index.replace_records(connection, name, batches)
    # Without a swap, every record is written; records of the index that memberhub no
    # longer has stay until deleted by their change.
    written = 0
    async for batch in batches:
        await index.save_records(connection, name, batch)
        written += len(batch)
    return written


async def _reward_batches(db: Database, size: int) -> AsyncIterator[Sequence[SearchRecord]]:
    after_id = 0
    while True:
        async with db.transaction(read_only=True) as session:
            rewards = await SearchRepository(session).active_rewards(after_id=after_id, limit=size)
        if not rewards:
            return
        after_id = rewards[-1].id
        records = [record for reward in rewards if (record := reward_record(reward)) is not None]
        if records:
            yield records


async def _member_batches(
    db: Database, directory: MemberDirectory, size: int, scope: frozenset[int] | None
) -> AsyncIterator[Sequence[SearchRecord]]:
    after_id = 0
    while True:
        async with db.transaction(read_only=True) as session:
            repo = SearchRepository(session)
            members = await repo.listed_members(
                directory.consent, after_id=after_id, limit=size, organisation_ids=scope
            )
            organisations = await repo.organisation_public_ids(
                {m.organisation_id for m in members if m.organisation_id is not None}
            )
        if not members:
            return
        after_id = members[-1].id
        records = [
            record
            for member in members
            if (record := member_record(member, directory, organisations)) is not None
        ]
        if records:
            yield records
