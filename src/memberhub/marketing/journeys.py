"""Journey rules: the feed's events matched to rules and recorded as firings (one per rule
and member, ever), then sent as Customer Journey triggers for subscribed, consenting
members. A firing is recorded before its call; a call that fails for a reason resending
may fix is tried again on later passes, up to `JOURNEY_ATTEMPTS`."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from memberhub.events.repository import FeedEvent
from memberhub.integrations.gateway import CircuitOpen, GatewayError
from memberhub.integrations.providers.base import Connection, MarketingListError
from memberhub.kit.db import Database
from memberhub.marketing.audience import has_marketing_consent
from memberhub.marketing.models import ContactStatus, FiringStatus, JourneyFiring
from memberhub.marketing.repository import MarketingRepository
from memberhub.marketing.settings import JourneyRule
from memberhub.marketing.targets import Tally, Target
from memberhub.members.models import Member

JOURNEY_ATTEMPTS = 5
FIRINGS_PER_TICK = 500


async def queue_firings(
    repo: MarketingRepository, target: Target, events: Sequence[FeedEvent], now: datetime
) -> int:
    """Record a firing for each (rule, member) the window's events match, unless the pair
    has one already: a rule fires once per member."""
    rules = target.settings.journeys
    if not rules:
        return 0
    ranks: dict[str, int] | None = None
    matches: dict[tuple[str, int], int] = {}  # (rule, member) → event position
    ids = await repo.member_ids_by_public_id(
        {e.member_public_id for e in events if e.member_public_id}
    )
    for event in events:
        member_id = ids.get(event.member_public_id or "")
        if member_id is None:
            continue
        for rule in rules:
            if (rule.key, member_id) in matches:
                continue
            if event.type == "member.tier.changed" and rule.trigger == "tier_reached":
                if ranks is None:
                    ranks = await repo.tier_ranks()
                if _reached(rule, event.data, ranks):
                    matches[(rule.key, member_id)] = event.position
            elif event.type == "points.expiring" and rule.trigger == "points_expiring":
                expiring = await repo.points_expiring(
                    member_id, now=now, within_days=rule.within_days
                )
                if expiring >= rule.min_points:
                    matches[(rule.key, member_id)] = event.position
    if not matches:
        return 0
    known = await repo.fired(target.integration.id, matches)
    for (rule_key, member_id), position in matches.items():
        if (rule_key, member_id) in known:
            continue
        repo.session.add(
            JourneyFiring(
                integration_id=target.integration.id,
                rule_key=rule_key,
                member_id=member_id,
                event_position=position,
                status=FiringStatus.PENDING,
                attempts=0,
            )
        )
    return len(matches) - len(known)


def _reached(rule: JourneyRule, data: dict[str, Any], ranks: dict[str, int]) -> bool:
    new, previous = data.get("new_tier"), data.get("previous_tier")
    if not isinstance(new, str) or rule.tier is None or new.lower() != rule.tier.lower():
        return False
    if not isinstance(previous, str) or not previous:
        return True
    if previous.lower() == new.lower():
        return False
    old_rank, new_rank = ranks.get(previous.lower()), ranks.get(new.lower())
    # Tiers without ranks: any change to the tier counts as reaching it.
    return old_rank is None or new_rank is None or old_rank < new_rank


async def _still_matches(
    repo: MarketingRepository, rule: JourneyRule, member: Member, now: datetime
) -> bool:
    if rule.trigger == "tier_reached":
        return (member.tier or "").lower() == (rule.tier or "").lower()
    if rule.trigger == "points_expiring":
        expiring = await repo.points_expiring(member.id, now=now, within_days=rule.within_days)
        return expiring >= rule.min_points
    return True


async def fire_journeys(
    db: Database, connection: Connection, target: Target, tally: Tally, now: datetime
) -> None:
    rules = {rule.key: rule for rule in target.settings.journeys}
    async with db.transaction(read_only=True) as session:
        repo = MarketingRepository(session)
        firings = await repo.pending_firings(target.integration.id, FIRINGS_PER_TICK)
        if not firings:
            return
        members = {
            m.id: m for m, _ in await repo.members_with_accounts([f.member_id for f in firings])
        }
        contacts = await repo.contacts(target.integration.id, [f.member_id for f in firings])
        # Matched when its event came, checked again now: a tier corrected back, points
        # spent meanwhile. Such a firing is dropped, free to match a later event.
        stale = {
            firing.id
            for firing in firings
            if (rule := rules.get(firing.rule_key)) is not None
            and (member := members.get(firing.member_id)) is not None
            and not await _still_matches(repo, rule, member, now)
        }
    outcomes: dict[int, tuple[str, str | None]] = {}
    sends: list[tuple[int, JourneyRule, str]] = []
    for firing in firings:
        rule = rules.get(firing.rule_key)
        member = members.get(firing.member_id)
        contact = contacts.get(firing.member_id)
        if firing.id in stale:
            continue
        if rule is None:
            outcomes[firing.id] = (FiringStatus.SKIPPED, "the rule is no longer configured")
        elif (
            member is None
            or member.deleted_at is not None
            or not has_marketing_consent(member)
            or contact is None
            or contact.status != ContactStatus.SUBSCRIBED
        ):
            outcomes[firing.id] = (FiringStatus.SKIPPED, "not a subscribed, consenting member")
        else:
            sends.append((firing.id, rule, contact.email))
    slots = asyncio.Semaphore(max(1, target.audience.concurrency))

    async def fire(firing_id: int, rule: JourneyRule, email: str) -> None:
        async with slots:
            tally.requests += 1
            try:
                await target.audience.trigger_journey(
                    connection, rule.journey_id, rule.step_id, email
                )
            except MarketingListError as exc:
                outcomes[firing_id] = (FiringStatus.FAILED, str(exc)[:500])
            except (GatewayError, CircuitOpen) as exc:
                outcomes[firing_id] = (FiringStatus.PENDING, str(exc)[:500])
            else:
                outcomes[firing_id] = (FiringStatus.SENT, None)

    await asyncio.gather(*(fire(*send) for send in sends))
    async with db.transaction() as session:
        for firing in firings:
            stored = await session.get(JourneyFiring, firing.id)
            if stored is not None and firing.id in stale:
                await session.delete(stored)
                continue
            if stored is None or firing.id not in outcomes:
                continue
            status, error = outcomes[firing.id]
            stored.error = error
            if firing.id in {s[0] for s in sends}:
                stored.attempts += 1
            if status == FiringStatus.PENDING and stored.attempts >= JOURNEY_ATTEMPTS:
                status = FiringStatus.FAILED
            stored.status = status
            if status == FiringStatus.SENT:
                stored.fired_at = now
