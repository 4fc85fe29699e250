"""Our events as a sink receives them: chosen by type, mapped to the vendor's names, and
only about members who consent to the sink's purpose."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import null, select
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.events.models import Event
from memberhub.integrations.providers.base import AnalyticsSink, SinkEvent
from memberhub.members.consent import PURPOSES, consent_column
from memberhub.members.models import Member
from memberhub.points.models import PointAccount
from memberhub.webhooks.signing import TypeMatcher

CONSENT_CHANGED = "member.consent_changed"
# Events after which the member's traits (tier, status, points) may differ: the first of
# them for a member in a window carries an identify.
TRAIT_EVENTS = frozenset(
    {
        "member.created",
        "member.updated",
        "member.status.changed",
        "member.tier.changed",
        "points.earned",
        "points.redeemed",
        "points.deducted",
        "points.adjusted",
        "points.expired",
    }
)
# Staff notices, never a member's doing: an alert about a member (a large redemption, a
# failed payment) names the member but carries staff-facing text. Never sent.
STAFF_NOTICES = frozenset({"alert.raised"})
# Event fields that name the member or organisation (sent as the user) or carry a whole
# profile (personal data a sink has no use for).
_LEFT_OUT = frozenset({"member_id", "organisation_id", "member", "occurred_at"})
# Values a property may hold, as JSON reads them (checked by exact type: a hot loop).
_PLAIN = frozenset({str, int, float, bool, type(None)})


class FeedEvent(NamedTuple):
    """One event of the feed (a tuple: a window builds thousands)."""

    position: int
    public_id: str
    type: str
    occurred_at: datetime
    organisation_id: int | None
    member_public_id: str | None
    data: Mapping[str, Any]


@dataclass
class Window:
    """What one window of the feed asks of a sink."""

    first_position: int
    last_position: int
    events: list[SinkEvent] = field(default_factory=list)
    skipped: int = 0
    # Members who withdrew the sink's purpose in this window: ask for deletion.
    withdrawn: list[str] = field(default_factory=list)


async def events_after(
    session: AsyncSession, position: int, limit: int, *, until: int | None = None
) -> list[FeedEvent]:
    query = (
        select(
            Event.position,
            Event.public_id,
            Event.type,
            Event.occurred_at,
            Event.organisation_id,
            Event.member_public_id,
            Event.data,
        )
        .where(Event.position > position)
        .order_by(Event.position)
        .limit(limit)
    )
    if until is not None:
        query = query.where(Event.position <= until)
    # Plain rows through the session's connection: a window is thousands of rows, and the
    # ORM's result handling would cost more than the read.
    connection = await session.connection()
    return [
        FeedEvent(
            int(position),
            public_id,
            type_,
            occurred_at,
            organisation_id,
            member_id,
            data if isinstance(data, dict) else {},
        )
        for position, public_id, type_, occurred_at, organisation_id, member_id, data in (
            await connection.execute(query)
        )
    ]


def event_name(event_type: str, mapping: Mapping[str, str]) -> str:
    """The vendor's name of an event type: the mapping's, else the type with underscores."""
    return mapping.get(event_type) or event_type.replace(".", "_")


def properties_of(data: Mapping[str, Any]) -> dict[str, Any]:
    """The event's plain values, without who it is about."""
    return {
        key: value for key, value in data.items() if type(value) in _PLAIN and key not in _LEFT_OUT
    }


@dataclass(frozen=True)
class SinkSettings:
    purpose: str
    event_types: Sequence[str]
    mapping: Mapping[str, str]
    request_deletion: bool
    scope: frozenset[int] | None  # the integration's organisations; None for all
    client_id_key: str | None


async def build_window(
    session: AsyncSession,
    sink: AnalyticsSink,
    settings: SinkSettings,
    feed: Sequence[FeedEvent],
    *,
    already_sent: frozenset[str] = frozenset(),
) -> Window:
    """The window's events for the sink, read with the members as they are now; an event
    goes out only if the member consented to the sink's purpose when it happened and has
    not withdrawn since."""
    window = Window(feed[0].position, feed[-1].position)
    matcher = TypeMatcher(settings.event_types)
    wanted = [
        event
        for event in feed
        if event.member_public_id is not None
        and event.type not in STAFF_NOTICES
        and (settings.scope is None or event.organisation_id in settings.scope)
    ]
    member_ids = {e.member_public_id for e in wanted if e.member_public_id}
    members = await _members(session, member_ids, client_ids=settings.client_id_key is not None)
    consent = await ConsentTimeline.load(session, member_ids, settings.purpose)
    identified: set[str] = set()
    for event in wanted:
        member_id = event.member_public_id
        assert member_id is not None
        if (
            event.type == CONSENT_CHANGED
            and event.data.get("purpose") == settings.purpose
            and event.data.get("granted") is False
        ):
            if settings.request_deletion and member_id not in window.withdrawn:
                window.withdrawn.append(member_id)
            continue
        if not matcher(event.type) or event.public_id in already_sent:
            continue
        member = members.get(member_id)
        if (
            member is None
            or member.deleted
            or not consent.allows(member_id, event.position, member.consent.get(settings.purpose))
        ):
            window.skipped += 1
            continue
        identify = event.type in TRAIT_EVENTS and member_id not in identified
        if identify:
            identified.add(member_id)
        client_id = None
        if settings.client_id_key:
            value = member.external_ids.get(settings.client_id_key)
            client_id = str(value) if value else None
        window.events.append(
            SinkEvent(
                id=event.public_id,
                type=event.type,
                name=event_name(event.type, settings.mapping),
                member_id=member_id,
                occurred_at=event.occurred_at,
                properties=properties_of(event.data),
                traits=member.traits,
                consent=member.consent,
                client_id=client_id,
                identify=identify,
            )
        )
    return window


class ConsentTimeline:
    """Each member's changes of one purpose's consent, in commit order (the
    `member.consent_changed` events, those not yet sequenced last): whether an event may
    go out depends on the consent when it happened, not only on the consent now."""

    def __init__(self, changes: dict[str, list[tuple[float, bool]]]) -> None:
        self.changes = changes

    @classmethod
    async def load(
        cls, session: AsyncSession, member_ids: set[str], purpose: str
    ) -> ConsentTimeline:
        changes: dict[str, list[tuple[float, int, bool]]] = {}
        if member_ids:
            connection = await session.connection()
            rows = await connection.execute(
                select(Event.position, Event.id, Event.member_public_id, Event.data).where(
                    Event.type == CONSENT_CHANGED, Event.member_public_id.in_(member_ids)
                )
            )
            for position, id_, member_id, data in rows:
                if isinstance(data, dict) and data.get("purpose") == purpose:
                    at = float(position) if position is not None else math.inf
                    changes.setdefault(member_id, []).append((at, id_, data.get("granted") is True))
        return cls(
            {
                member: [(at, granted) for at, _, granted in sorted(found)]
                for member, found in changes.items()
            }
        )

    def allows(self, member_id: str, position: int, now: bool | None) -> bool:
        """Whether the member consented when the event at `position` committed, and has
        not withdrawn since (a withdrawal stops every event not yet sent)."""
        changes = self.changes.get(member_id)
        if not changes:
            return bool(now)  # never changed since the member was created
        before = [granted for at, granted in changes if at <= position]
        after = [granted for at, granted in changes if at > position]
        then = before[-1] if before else not after[0]
        return then and all(after)


@dataclass(frozen=True)
class MemberView:
    """What a sink reads of a member: consent, traits and the analytics client ids."""

    deleted: bool
    consent: dict[str, bool]
    traits: dict[str, Any]
    external_ids: Mapping[str, Any]


_CONSENT_COLUMNS = [consent_column(purpose) for purpose in PURPOSES]


async def _members(
    session: AsyncSession, public_ids: set[str], *, client_ids: bool
) -> dict[str, MemberView]:
    """The members, read as plain columns in one query (no ORM objects: a window reads
    up to a thousand); their external ids only when the sink maps a client id."""
    if not public_ids:
        return {}
    connection = await session.connection()
    rows = await connection.execute(
        select(
            Member.public_id,
            Member.deleted_at,
            Member.tier,
            Member.status,
            Member.member_since,
            Member.created_at,
            Member.external_ids if client_ids else null().label("external_ids"),
            PointAccount.current,
            *_CONSENT_COLUMNS,
        )
        .outerjoin(PointAccount, PointAccount.member_id == Member.id)
        .where(Member.public_id.in_(public_ids))
    )
    found: dict[str, MemberView] = {}
    for row in rows:
        since = row.member_since or row.created_at
        found[row.public_id] = MemberView(
            deleted=row.deleted_at is not None,
            consent={
                purpose: bool(value) for purpose, value in zip(PURPOSES, row[8:], strict=True)
            },
            traits={
                "tier": row.tier,
                "status": row.status,
                "points_balance": row.current if row.current is not None else 0,
                "member_since": since.date().isoformat() if since is not None else None,
            },
            external_ids=row.external_ids or {},
        )
    return found
