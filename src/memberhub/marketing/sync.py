"""Keeping marketing lists (a Mailchimp audience) in step with the members.

Every worker tick, for each enabled integration whose provider is a marketing list:

1. Claim it: one short transaction locks its state row and takes a lease, unless another
   worker holds one or the integration waits out a backoff after a failure. The first
   claim starts at the feed's end and asks for a full comparison.
2. A full comparison, when due or asked for, reads every member and writes those whose
   content (status, merge fields, tags) differs from the hash kept for them: a second run
   with nothing changed writes nothing.
3. Then the committed event feed is read after the position, a window at a time: the
   members its events name are compared and written the same way, and the journey rules
   the window's events match are recorded as firings, in the transaction that moves the
   position past the window.
4. Segments, when due (or their definitions changed), are recomputed from the database
   and the differences sent (`segments.py`); pending journey firings are sent last, after
   the members they need are on the list (`journeys.py`).

Writes go in whole batches of the vendor's size (500 for Mailchimp's batch subscribe), at
most `concurrency` at once, so N members cost ceil(N / 500) calls. Only once the vendor
accepted a batch are the hashes kept; a failure leaves the position where it was and the
next attempt (after a backoff) compares the same members again. No transaction stays
open across a call to the vendor.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import structlog

from memberhub.integrations.gateway import CircuitOpen, GatewayError
from memberhub.integrations.hub import IntegrationHub
from memberhub.integrations.providers.base import (
    Connection,
    ConnectionFailed,
    MarketingListError,
    WriteResult,
)
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.marketing.audience import Sharer, Write, plan_address
from memberhub.marketing.journeys import fire_journeys, queue_firings
from memberhub.marketing.models import ContactStatus, MarketingContact, MarketingSyncState
from memberhub.marketing.repository import MarketingRepository
from memberhub.marketing.segments import sync_segments
from memberhub.marketing.settings import MarketingSyncSettings
from memberhub.marketing.targets import Tally, Target, marketing_providers, marketing_target
from memberhub.program.service import get_program

log = structlog.get_logger("memberhub.marketing")

EVENTS_PER_WINDOW = 5000
WINDOWS_PER_TICK = 10
MEMBER_CHUNK = 1000
# Writes waiting before whole batches are sent: a multiple of the batch size, so a full
# comparison sends full batches only.
FLUSH_BATCHES = 10
LEASE = timedelta(minutes=15)
MAX_BACKOFF_SECONDS = 600
# The events after which a member's audience content may differ.
MEMBER_EVENT_PREFIXES = ("member.", "points.")


@dataclass(frozen=True)
class Claim:
    position: int
    full_requested_at: datetime | None
    last_full_sync_at: datetime | None
    last_segments_at: datetime | None
    segments_fingerprint: str | None


def segments_fingerprint(settings: MarketingSyncSettings) -> str:
    shape = [s.model_dump() for s in settings.segments]
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()


def backoff(failures: int) -> timedelta:
    return timedelta(seconds=min(MAX_BACKOFF_SECONDS, 5 * 2 ** max(0, failures - 1)))


# ---------------------------------------------------------------- the worker's pass


async def run_marketing_sync(db: Database, hub: IntegrationHub, now: datetime) -> int:
    """One pass over every marketing-list integration; returns how many members were
    written."""
    async with db.transaction(read_only=True) as session:
        integrations = await MarketingRepository(session).integrations(marketing_providers())
    written = 0
    for integration in integrations:
        try:
            target = marketing_target(integration)
            if target is None:
                continue
            written += (await sync_integration(db, hub, target, now)).written
        except Exception:
            # One integration's trouble leaves the others' sync running.
            log.exception("marketing_sync_failed", integration=integration.public_id)
    return written


async def sync_integration(
    db: Database, hub: IntegrationHub, target: Target, now: datetime
) -> Tally:
    tally = Tally()
    claim = await _claim(db, target, now)
    if claim is None:
        return tally
    integration_id = target.integration.id
    try:
        connection = hub.connection(target.integration)
        full = claim.full_requested_at is not None or _due(
            claim.last_full_sync_at, target.settings.full_sync_hours * 3600, now
        )
        if full:
            await _full_comparison(db, connection, target, tally)
        position = await _catch_up(db, connection, target, claim.position, tally)
        fingerprint = segments_fingerprint(target.settings)
        segments_due = (
            full
            or claim.segments_fingerprint != fingerprint
            or _due(claim.last_segments_at, target.settings.segment_minutes * 60, now)
        )
        # Journeys before segments: a segment the vendor refuses holds no journey up.
        await fire_journeys(db, connection, target, tally, now)
        if segments_due and target.settings.segments:
            await sync_segments(db, connection, target, tally, now)
        await _record_success(
            db,
            integration_id,
            position=position,
            tally=tally,
            full=claim if full else None,
            segments_fingerprint=fingerprint if segments_due else None,
            now=now,
        )
    except Exception as exc:
        await _record_failure(db, integration_id, exc, tally, utcnow())
        expected = isinstance(
            exc, GatewayError | CircuitOpen | ConnectionFailed | MarketingListError
        )
        (log.warning if expected else log.exception)(
            "marketing_sync_attempt_failed",
            integration=target.integration.public_id,
            error=str(exc)[:300],
        )
    return tally


def _due(last: datetime | None, every_seconds: float, now: datetime) -> bool:
    if every_seconds <= 0:
        return False
    return last is None or now - last >= timedelta(seconds=every_seconds)


async def _claim(db: Database, target: Target, now: datetime) -> Claim | None:
    async with db.transaction() as session:
        repo = MarketingRepository(session)
        state = await repo.state(target.integration.id, for_update=True)
        if state is None:
            # From now on, after comparing every member once.
            state = MarketingSyncState(
                integration_id=target.integration.id,
                event_position=await repo.latest_position(),
                full_requested_at=now,
                members_written=0,
                last_run_writes=0,
                last_run_requests=0,
                failures=0,
            )
            session.add(state)
        if state.lease_until is not None and state.lease_until > now:
            return None
        if state.list_id != target.settings.list_id:
            if state.list_id is not None:
                # Another audience: nothing of ours is in it yet.
                await repo.forget_audience(target.integration.id)
                state.full_requested_at = now
            state.list_id = target.settings.list_id
        if state.next_attempt_at is not None and state.next_attempt_at > now:
            return None
        state.lease_until = now + LEASE
        return Claim(
            state.event_position,
            state.full_requested_at,
            state.last_full_sync_at,
            state.last_segments_at,
            state.segments_fingerprint,
        )


async def _record_success(
    db: Database,
    integration_id: int,
    *,
    position: int,
    tally: Tally,
    full: Claim | None,
    segments_fingerprint: str | None,
    now: datetime,
) -> None:
    async with db.transaction() as session:
        state = await MarketingRepository(session).state(integration_id, for_update=True)
        if state is None:
            return  # the integration was deleted meanwhile
        state.event_position = max(state.event_position, position)
        state.members_written += tally.written
        state.last_run_writes = tally.written
        state.last_run_requests = tally.requests
        state.last_synced_at = utcnow()
        state.failures = 0
        state.next_attempt_at = None
        state.last_error = "; ".join(tally.errors)[:1000] or None
        state.last_error_at = now if tally.errors else state.last_error_at
        if full is not None:
            state.last_full_sync_at = now
            # A comparison asked for while this one ran is still to do.
            if state.full_requested_at == full.full_requested_at:
                state.full_requested_at = None
        if segments_fingerprint is not None:
            state.last_segments_at = now
            state.segments_fingerprint = segments_fingerprint
        state.lease_until = None


async def _record_failure(
    db: Database, integration_id: int, exc: BaseException, tally: Tally, now: datetime
) -> None:
    async with db.transaction() as session:
        state = await MarketingRepository(session).state(integration_id, for_update=True)
        if state is None:
            return
        state.failures += 1
        state.members_written += tally.written
        state.last_run_writes = tally.written
        state.last_run_requests = tally.requests
        state.last_error = (str(exc) or type(exc).__name__)[:1000]
        state.last_error_at = now
        state.next_attempt_at = now + backoff(state.failures)
        state.lease_until = None


# ---------------------------------------------------------------- members


async def plan_members(
    repo: MarketingRepository,
    target: Target,
    member_ids: Sequence[int],
    planned: set[str] | None = None,
) -> list[Write]:
    """The writes the members' addresses need: each address they have, or are held at,
    planned once with every member sharing it (`audience.plan_address`); unsubscribes
    first, then in the owners' id order.

    `planned` carries, from one call to the next of a full comparison, the addresses
    planned already with members outside the call's ids, so none is planned twice."""
    integration_id = target.integration.id
    scope = await repo.scope(target.integration.organisation_id)
    zone = ZoneInfo((await get_program(repo.session)).timezone)
    chunk = set(member_ids)
    sharers: dict[int, Sharer] = {}
    asked: set[int] = set()
    wanted = set(member_ids)
    # Closed under sharing: a member pulled in for one address may be held at another,
    # which is then planned too (an owner who moved leaves the old address to plan).
    while missing := wanted - asked:
        asked |= missing
        rows = await repo.members_with_accounts(sorted(missing))
        contacts = await repo.contacts(integration_id, [m.id for m, _ in rows])
        addresses: set[str] = set()
        for member, account in rows:
            sharer = Sharer(
                member,
                account,
                contacts.get(member.id),
                in_scope=scope is None or member.organisation_id in scope,
            )
            sharers[member.id] = sharer
            addresses |= sharer.addresses()
        wanted |= await repo.members_sharing(integration_id, addresses)
    groups: dict[str, list[Sharer]] = {}
    for sharer in sharers.values():
        for address in sharer.addresses():
            groups.setdefault(address, []).append(sharer)
    planned = set() if planned is None else planned
    writes: list[Write] = []
    for address, group in groups.items():
        if address in planned:
            continue
        if any(s.member.id not in chunk for s in group):
            planned.add(address)
        writes.extend(plan_address(target.settings, address, group, zone=zone))
    # An owner's old address is unsubscribed before the new one is subscribed.
    writes.sort(key=lambda w: (w.member.status != "unsubscribed", w.member_id))
    return writes


async def _full_comparison(
    db: Database, connection: Connection, target: Target, tally: Tally
) -> None:
    size = max(1, target.audience.batch_size)
    waiting: list[Write] = []
    planned: set[str] = set()
    after_id = 0
    while True:
        async with db.transaction(read_only=True) as session:
            repo = MarketingRepository(session)
            ids = await repo.member_ids(after_id=after_id, limit=MEMBER_CHUNK)
            if ids:
                waiting.extend(await plan_members(repo, target, ids, planned))
        if not ids:
            break
        after_id = ids[-1]
        if len(waiting) >= size * FLUSH_BATCHES:
            whole = len(waiting) - len(waiting) % size
            await _write(db, connection, target, waiting[:whole], tally)
            waiting = waiting[whole:]
    if waiting:
        await _write(db, connection, target, waiting, tally)


async def _catch_up(
    db: Database, connection: Connection, target: Target, position: int, tally: Tally
) -> int:
    for _ in range(WINDOWS_PER_TICK):
        async with db.transaction(read_only=True) as session:
            repo = MarketingRepository(session)
            events = await repo.events_after(position, EVENTS_PER_WINDOW)
            if not events:
                return position
            public_ids = {
                e.member_public_id
                for e in events
                if e.member_public_id and e.type.startswith(MEMBER_EVENT_PREFIXES)
            }
            by_public_id = await repo.member_ids_by_public_id(public_ids)
            writes = await plan_members(repo, target, sorted(by_public_id.values()))
        await _write(db, connection, target, writes, tally)
        position = events[-1].position
        async with db.transaction() as session:
            repo = MarketingRepository(session)
            await queue_firings(repo, target, events, utcnow())
            state = await repo.state(target.integration.id, for_update=True)
            if state is not None:
                state.event_position = max(state.event_position, position)
        if len(events) < EVENTS_PER_WINDOW:
            break
    return position


async def _write(
    db: Database, connection: Connection, target: Target, writes: Sequence[Write], tally: Tally
) -> None:
    """Send the writes in whole batches, at most `concurrency` at once, then keep what the
    vendor accepted."""
    if not writes:
        return
    size = max(1, target.audience.batch_size)
    batches = [writes[start : start + size] for start in range(0, len(writes), size)]
    slots = asyncio.Semaphore(max(1, target.audience.concurrency))
    list_id = target.settings.list_id

    async def send(batch: Sequence[Write]) -> list[WriteResult]:
        async with slots:
            tally.requests += 1
            return await target.audience.write_members(
                connection, list_id, [w.member for w in batch]
            )

    answers = await asyncio.gather(*(send(batch) for batch in batches), return_exceptions=True)
    failure: BaseException | None = None
    accepted: list[tuple[Write, WriteResult]] = []
    for batch, answer in zip(batches, answers, strict=True):
        if isinstance(answer, BaseException):
            failure = failure or answer
            continue
        accepted.extend(zip(batch, answer, strict=True))
    await _keep(db, target.integration.id, accepted, tally)
    if failure is not None:
        raise failure


async def _keep(
    db: Database,
    integration_id: int,
    accepted: Sequence[tuple[Write, WriteResult]],
    tally: Tally,
) -> None:
    """Record what the vendor accepted. A subscribe makes its member the one the audience
    holds at the address; an unsubscribe marks every contact still at the address; the
    contacts a new owner released are dropped last, unless a write here moved them to
    another address."""
    if not accepted:
        return
    now = utcnow()
    async with db.transaction() as session:
        repo = MarketingRepository(session)
        touched = {w.member_id for w, _ in accepted} | {
            member_id for w, _ in accepted for member_id in w.releases
        }
        contacts = await repo.contacts(integration_id, sorted(touched))
        released: list[tuple[int, str]] = []
        for write, result in accepted:
            contact = contacts.get(write.member_id)
            if result.error is not None:
                tally.refused += 1
                if len(tally.errors) < 3:
                    tally.errors.append(f"{write.member.key}: {result.error}"[:300])
                if contact is not None:
                    contact.last_error = result.error[:500]
                continue
            tally.written += 1
            address = write.member.email.lower()
            if write.member.status == ContactStatus.UNSUBSCRIBED:
                for member_id in (write.member_id, *write.releases):
                    held = contacts.get(member_id)
                    # Written at another address meanwhile: that one is what it holds.
                    if held is not None and held.email == address:
                        held.status = ContactStatus.UNSUBSCRIBED
                        held.content_hash = write.content_hash
                        held.last_error = None
                        held.synced_at = now
                continue
            if contact is None:
                contact = MarketingContact(integration_id=integration_id, member_id=write.member_id)
                session.add(contact)
                contacts[write.member_id] = contact
            contact.email = address
            contact.status = write.member.status
            contact.content_hash = write.content_hash
            contact.last_error = None
            contact.synced_at = now
            released.extend((member_id, address) for member_id in write.releases)
        for member_id, address in released:
            held = contacts.get(member_id)
            if (
                held is not None
                and held.email == address
                and held.status == ContactStatus.SUBSCRIBED
            ):
                await session.delete(held)
