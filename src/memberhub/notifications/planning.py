"""The planner: committed events become notifications, exactly once.

The event table is the outbox: every change that tells someone something wrote its event
in its own transaction. The planner reads the feed in position order from a durable
cursor (`notification_feed_state`) and, in one transaction per batch, writes the batch's
notifications and moves the cursor past it, so a crash either keeps both or neither. The
unique (event, recipient, channel) key makes a second reading of an event (two workers,
a restored cursor) write nothing: `INSERT … ON CONFLICT DO NOTHING`.

Everything about a notification is decided here, once: its recipients, the template
(rendered now, so the log shows what was sent), consent and preferences
(`suppressed: no_consent`), the suppression list, deduplication, and for SMS and push the
quiet hours (`next_attempt_at` at their end). What can change before the message goes
out (consent, preferences, the suppression list, the quiet hours for a retry) the sender
checks again when it claims it (`sending._withhold`, with `withheld_reason` shared).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import Any, cast
from zoneinfo import ZoneInfo

from sqlalchemy import Table, delete, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.events.models import Event
from memberhub.events.sequencer import run_passes
from memberhub.integrations.models import Integration
from memberhub.integrations.providers import as_message_channel, get_provider
from memberhub.kit.db import Database
from memberhub.kit.ids import new_public_ids
from memberhub.members.models import Member
from memberhub.notifications import catalog, service, template_service, templates
from memberhub.notifications.catalog import MESSAGE_TYPES, MessageType
from memberhub.notifications.models import (
    Category,
    Channel,
    DeviceToken,
    Notification,
    NotificationFeedState,
    NotificationPreference,
    NotificationStatus,
    NotificationTemplate,
)
from memberhub.notifications.repository import NotificationRepository
from memberhub.notifications.schemas import (
    NotificationSettings,
    listed_as,
    normalise_address,
)
from memberhub.program import service as program_service
from memberhub.tiers.models import Tier

EVENTS_PER_BATCH = 500
ERASED = "member.deleted"
PLANNED_EVENT_TYPES = catalog.EVENT_TYPES | {ERASED}
_NOTIFICATIONS = cast(Table, Notification.__table__)
_STATE_ID = 1


@dataclass(frozen=True)
class LinkSettings:
    """What unsubscribe links are made of: the public URL and the signing secret."""

    public_url: str
    secret: str

    def unsubscribe_url(self, member_public_id: str, channel: str) -> str:
        token = service.unsubscribe_token(self.secret, member_public_id, channel)
        return f"{self.public_url.rstrip('/')}/api/v1/unsubscribe/{token}"


async def plan_notifications(db: Database, now: datetime, links: LinkSettings) -> int:
    """Plan the notifications of every event committed so far; returns how many were made."""
    await run_passes(db, wait=False)
    # Most ticks find nothing new: a read, not a write lock, tells.
    async with db.transaction(read_only=True) as session:
        position = await session.scalar(
            select(NotificationFeedState.event_position).where(
                NotificationFeedState.id == _STATE_ID
            )
        )
        top = await session.scalar(select(func.max(Event.position)))
    if top is None or (position is not None and top <= position):
        return 0
    made = 0
    while True:
        async with db.transaction() as session:
            done = await plan_batch(session, now, links)
        if done is None:
            return made
        made += done


async def _cursor(session: AsyncSession) -> NotificationFeedState:
    """The feed state, locked: one planner at a time moves it."""
    dialect = session.get_bind().dialect.name
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    await session.execute(
        insert(NotificationFeedState)
        .values(id=_STATE_ID, event_position=0)
        .on_conflict_do_nothing(index_elements=["id"])
    )
    state = await session.scalar(
        select(NotificationFeedState)
        .where(NotificationFeedState.id == _STATE_ID)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    assert state is not None
    return state


async def plan_batch(session: AsyncSession, now: datetime, links: LinkSettings) -> int | None:
    """One batch of events; the number of notifications made, None when the cursor is at
    the end of the feed."""
    state = await _cursor(session)
    top = await session.scalar(select(func.max(Event.position)))
    if top is None or top <= state.event_position:
        return None
    events = (
        await session.execute(
            select(
                Event.position,
                Event.public_id,
                Event.type,
                Event.organisation_id,
                Event.member_public_id,
                Event.data,
            )
            .where(
                Event.position > state.event_position,
                Event.position <= top,
                Event.type.in_(PLANNED_EVENT_TYPES),
            )
            .order_by(Event.position)
            .limit(EVENTS_PER_BATCH)
        )
    ).all()
    state.event_position = events[-1].position if len(events) == EVENTS_PER_BATCH else top
    if not events:
        return 0
    erased = [e.member_public_id for e in events if e.type == ERASED and e.member_public_id]
    events = [e for e in events if e.type != ERASED]
    planner = await _Planner.load(session, now, links, events)
    rows = planner.plan(events)
    if rows:
        dialect = session.get_bind().dialect.name
        insert = pg_insert if dialect == "postgresql" else sqlite_insert
        ids = new_public_ids("ntf", len(rows))
        for row, public_id in zip(rows, ids, strict=True):
            row["public_id"] = public_id
        await session.execute(
            insert(_NOTIFICATIONS).on_conflict_do_nothing(
                index_elements=["event_public_id", "recipient_key", "channel"]
            ),
            rows,
        )
    if erased:
        await _forget_members(session, erased, now)
    return len(rows)


async def _forget_members(
    session: AsyncSession, member_public_ids: list[str], now: datetime
) -> None:
    """A member's personal data was erased (`member.deleted`): what their notifications say
    and where they went is erased too, those still queued are never sent, and their
    devices are forgotten."""
    member_ids = select(Member.id).where(Member.public_id.in_(member_public_ids))
    await session.execute(
        update(_NOTIFICATIONS)
        .where(
            _NOTIFICATIONS.c.member_id.in_(member_ids),
            _NOTIFICATIONS.c.status == NotificationStatus.QUEUED,
        )
        .values(
            status=NotificationStatus.SUPPRESSED,
            reason="member_deleted",
            next_attempt_at=None,
            claim=None,
            updated_at=now,
        )
    )
    # The normalised address goes too: each row keeps a key of its own, unique as before.
    await session.execute(
        update(_NOTIFICATIONS)
        .where(_NOTIFICATIONS.c.member_id.in_(member_ids))
        .values(
            recipient=None,
            recipient_key="erased:" + _NOTIFICATIONS.c.public_id,
            subject=None,
            text="",
            html=None,
            headers={},
            updated_at=now,
        )
    )
    await session.execute(delete(DeviceToken).where(DeviceToken.member_id.in_(member_ids)))


@dataclass
class _Recipient:
    channel: str
    address: str | None
    key: str


class _Planner:
    """What one batch's notifications are made from, loaded in a few statements."""

    def __init__(self) -> None:
        self.now: datetime
        self.links: LinkSettings
        self.settings: NotificationSettings
        self.currency = "MYR"
        self.program_zone = ZoneInfo("UTC")
        self.integrations: dict[str, int] = {}  # channel -> integration id
        self.templates: dict[tuple[str, str, str], NotificationTemplate] = {}
        self.members: dict[str, Member] = {}
        self.preferences: dict[int, NotificationPreference] = {}
        self.devices: dict[int, list[DeviceToken]] = defaultdict(list)
        self.suppressed: dict[str, dict[str, str]] = {}
        self.tier_ranks: dict[str, int] = {}
        self.recent: set[tuple[int, str, str]] = set()  # member, type, channel sent lately

    @classmethod
    async def load(
        cls, session: AsyncSession, now: datetime, links: LinkSettings, events: Sequence[Any]
    ) -> _Planner:
        planner = cls()
        planner.now = now
        planner.links = links
        planner.settings = await service.get_settings(session)
        program = await program_service.get_program(session)
        planner.currency = program.currency
        planner.program_zone = ZoneInfo(program.timezone)
        for integration in await session.scalars(
            select(Integration).where(Integration.enabled.is_(True)).order_by(Integration.id)
        ):
            provider = get_provider(integration.provider)
            channel = as_message_channel(provider) if provider is not None else None
            if channel is None:
                continue
            for name in channel.message_channels:
                planner.integrations.setdefault(name, integration.id)
        if not planner.integrations:
            return planner
        planner.templates = {
            (t.message_type, t.channel, t.locale): t
            for t in await NotificationRepository(session).templates()
        }
        member_ids = {e.member_public_id for e in events if e.member_public_id}
        if member_ids:
            planner.members = {
                m.public_id: m
                for m in await session.scalars(
                    select(Member).where(Member.public_id.in_(member_ids))
                )
            }
        ids = [m.id for m in planner.members.values()]
        if ids:
            planner.preferences = {
                p.member_id: p
                for p in await session.scalars(
                    select(NotificationPreference).where(NotificationPreference.member_id.in_(ids))
                )
            }
            if Channel.PUSH in planner.integrations:
                for device in await session.scalars(
                    select(DeviceToken)
                    .where(DeviceToken.member_id.in_(ids))
                    .order_by(DeviceToken.id)
                ):
                    planner.devices[device.member_id].append(device)
            await planner._load_recent(session, ids)
        if any(e.type == "member.tier.changed" for e in events):
            planner.tier_ranks = {
                code: rank for code, rank in await session.execute(select(Tier.code, Tier.rank))
            }
        repository = NotificationRepository(session)
        emails = {normalise_address("email", s.email) for s in planner.settings.staff}
        phones: set[str] = set()
        for member in planner.members.values():
            if member.email:
                emails.add(normalise_address("email", member.email))
            if member.phone:
                phones.add(normalise_address("sms", member.phone))
        tokens = {d.token for devices in planner.devices.values() for d in devices}
        planner.suppressed = {
            Channel.EMAIL: await repository.suppressed_addresses(Channel.EMAIL, emails),
            Channel.SMS: await repository.suppressed_addresses(Channel.SMS, phones),
            Channel.PUSH: await repository.suppressed_addresses(Channel.PUSH, tokens),
        }
        return planner

    def _dedup_window(self, message_type: str) -> int:
        """Minutes within which a member gets one message of the type per channel."""
        return self.settings.dedup_windows.get(message_type, self.settings.dedup_window_minutes)

    async def _load_recent(self, session: AsyncSession, member_ids: list[int]) -> None:
        windows = {name: self._dedup_window(name) for name in MESSAGE_TYPES}
        longest = max(windows.values(), default=0)
        if longest <= 0:
            return
        rows = await session.execute(
            select(
                Notification.member_id,
                Notification.message_type,
                Notification.channel,
                Notification.created_at,
            ).where(
                Notification.member_id.in_(member_ids),
                Notification.created_at >= self.now - timedelta(minutes=longest),
                Notification.status != NotificationStatus.SUPPRESSED,
            )
        )
        for member_id, message_type, channel, created_at in rows:
            window = windows.get(message_type, 0)
            if member_id is not None and created_at >= self.now - timedelta(minutes=window):
                self.recent.add((member_id, message_type, channel))

    # ------------------------------------------------------------ planning

    def plan(self, events: Sequence[Any]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        if not self.integrations:
            return rows
        disabled = set(self.settings.disabled_message_types)
        for event in events:
            data = event.data if isinstance(event.data, Mapping) else {}
            names = catalog.message_types_of(event.type, data)
            if event.type == "member.tier.changed":
                names = [self._tier_direction(data)]
            for name in names:
                if name in disabled:
                    continue
                message = MESSAGE_TYPES[name]
                if message.audience == "staff":
                    rows += self._staff_rows(message, event, data)
                else:
                    member = self.members.get(event.member_public_id or "")
                    if member is not None:
                        rows += self._member_rows(message, event, data, member)
        return rows

    def _tier_direction(self, data: Mapping[str, Any]) -> str:
        before = self.tier_ranks.get(str(data.get("previous_tier")), -1)
        after = self.tier_ranks.get(str(data.get("new_tier")), -1)
        return "tier_upgraded" if after > before else "tier_downgraded"

    def _channels(self, message: MessageType) -> list[str]:
        return [
            channel
            for channel in Channel.ALL
            if channel in self.integrations
            and (
                channel in message.defaults
                or any(key[0] == message.name and key[1] == channel for key in self.templates)
            )
        ]

    def _staff_rows(
        self, message: MessageType, event: Any, data: Mapping[str, Any]
    ) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        if Channel.EMAIL not in self._channels(message):
            return rows
        locales: list[str | None] = [self.settings.default_locale]
        for staff in self.settings.staff:
            if not set(staff.roles) & set(message.staff_roles):
                continue
            address = normalise_address("email", staff.email)
            row = self._row(message, event, Channel.EMAIL, staff.email, address, None, None)
            reason = self.suppressed[Channel.EMAIL].get(address)
            if reason is not None:
                rows.append(self._suppressed(row, f"suppressed_address:{reason}"))
                continue
            context = template_service.render_context(
                message,
                settings=self.settings,
                currency=self.currency,
                event=data,
                recipient={"email": staff.email, "name": staff.name, "roles": list(staff.roles)},
            )
            rows.append(
                self._rendered(row, message, Channel.EMAIL, locales, context, self.program_zone)
            )
        return rows

    def _member_rows(
        self, message: MessageType, event: Any, data: Mapping[str, Any], member: Member
    ) -> list[dict[str, Any]]:
        rows = []
        preference = self.preferences.get(member.id)
        locales = [
            preference.locale if preference is not None else None,
            self.settings.default_locale,
        ]
        zone = self.program_zone
        if preference is not None and preference.timezone:
            zone = ZoneInfo(preference.timezone)
        for channel in self._channels(message):
            # Deduplicated per member and channel: every device of the member gets a push.
            queued_on_channel = False
            for recipient in self._recipients(member, channel):
                row = self._row(
                    message, event, channel, recipient.address, recipient.key, member, locales[0]
                )
                reason = self._suppression_reason(message, member, preference, recipient)
                if reason is not None:
                    rows.append(self._suppressed(row, reason))
                    continue
                unsubscribe_url = (
                    self.links.unsubscribe_url(member.public_id, channel)
                    if message.category == Category.MARKETING
                    else None
                )
                context = template_service.render_context(
                    message,
                    settings=self.settings,
                    currency=self.currency,
                    event=data,
                    member=template_service.member_context(member),
                    unsubscribe_url=unsubscribe_url,
                )
                row = self._rendered(row, message, channel, locales, context, zone)
                if row["status"] != NotificationStatus.QUEUED:
                    rows.append(row)
                    continue
                if unsubscribe_url is not None and channel == Channel.EMAIL:
                    row["headers"] = {
                        "List-Unsubscribe": f"<{unsubscribe_url}>",
                        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
                    }
                if channel in (Channel.SMS, Channel.PUSH):
                    row["next_attempt_at"] = quiet_hours_end(
                        self.now, zone, *self.settings.quiet_hours.window()
                    )
                queued_on_channel = True
                rows.append(row)
            if queued_on_channel and self._dedup_window(message.name) > 0:
                self.recent.add((member.id, message.name, channel))
        return rows

    def _recipients(self, member: Member, channel: str) -> list[_Recipient]:
        if channel == Channel.EMAIL:
            address = member.email
            key = normalise_address(channel, address) if address else f"member:{member.public_id}"
            return [_Recipient(channel, address, key)]
        if channel == Channel.SMS:
            address = member.phone
            key = normalise_address(channel, address) if address else f"member:{member.public_id}"
            return [_Recipient(channel, address, key)]
        devices = self.devices.get(member.id, [])
        if not devices:
            return [_Recipient(channel, None, f"member:{member.public_id}")]
        return [_Recipient(channel, d.token, f"device:{d.public_id}") for d in devices]

    def _suppression_reason(
        self,
        message: MessageType,
        member: Member,
        preference: NotificationPreference | None,
        recipient: _Recipient,
    ) -> str | None:
        channel = recipient.channel
        withheld = withheld_reason(member, preference, channel, message.category)
        if withheld is not None:
            return withheld
        if recipient.address is None:
            return "no_address"
        suppressed = self.suppressed[channel].get(
            listed_as(channel, recipient.address, recipient.key)
        )
        if suppressed is not None:
            return f"suppressed_address:{suppressed}"
        if (member.id, message.name, channel) in self.recent:
            return "duplicate"
        return None

    def _row(
        self,
        message: MessageType,
        event: Any,
        channel: str,
        address: str | None,
        key: str,
        member: Member | None,
        locale: str | None,
    ) -> dict[str, Any]:
        return {
            "event_public_id": event.public_id,
            "message_type": message.name,
            "category": message.category,
            "channel": channel,
            "audience": message.audience,
            "member_id": member.id if member is not None else None,
            "organisation_id": member.organisation_id
            if member is not None
            else event.organisation_id,
            "recipient": address,
            "recipient_key": key[:200],
            "locale": locale,
            "subject": None,
            "text": "",
            "html": None,
            "headers": {},
            "status": NotificationStatus.QUEUED,
            "reason": None,
            "error": None,
            "attempts": 0,
            "next_attempt_at": self.now,
            "claim": None,
            "integration_id": self.integrations.get(channel),
            "provider_message_id": None,
            "created_at": self.now,
            "sent_at": None,
            "delivered_at": None,
            "updated_at": self.now,
        }

    @staticmethod
    def _suppressed(row: dict[str, Any], reason: str) -> dict[str, Any]:
        row.update(status=NotificationStatus.SUPPRESSED, reason=reason[:100], next_attempt_at=None)
        return row

    def _rendered(
        self,
        row: dict[str, Any],
        message: MessageType,
        channel: str,
        locales: list[str | None],
        context: dict[str, Any],
        zone: ZoneInfo,
    ) -> dict[str, Any]:
        chosen = template_service.choose_template(self.templates, message, channel, locales)
        if isinstance(chosen, str):  # nothing to send: why
            return self._suppressed(row, chosen)
        subject, body, format, locale = chosen
        try:
            rendered = templates.render(
                subject=subject, body=body, format=format, context=context, zone=zone
            )
        except templates.TemplateInvalid as exc:
            row.update(
                status=NotificationStatus.FAILED,
                reason="render_failed",
                error=str(exc)[:2000],
                next_attempt_at=None,
            )
            return row
        row.update(
            subject=rendered.subject[:998] if rendered.subject is not None else None,
            text=rendered.text,
            html=rendered.html,
            locale=locale,
        )
        return row


def withheld_reason(
    member: Member | None,
    preference: NotificationPreference | None,
    channel: str,
    category: str,
) -> str | None:
    """Why a member's message may not go out on `channel` as things stand: erased, no
    consent to the channel, or marketing turned off on it; None when it may. The planner
    asks when it writes a notification, the sender again just before sending it, since
    consent can be withdrawn in between."""
    if member is None or member.deleted_at is not None:
        return "member_deleted"
    consent = {
        Channel.EMAIL: member.consent_email,
        Channel.SMS: member.consent_sms,
        Channel.PUSH: preference.push if preference is not None else False,
    }[channel]
    if not consent:
        return "no_consent"
    if (
        category == Category.MARKETING
        and preference is not None
        and not getattr(preference, f"marketing_{channel}")
    ):
        return "opted_out"
    return None


def quiet_hours_end(now: datetime, zone: ZoneInfo, start: time, end: time) -> datetime:
    """`now` if it is outside the quiet hours in `zone`, else when they end (in UTC).
    The window may span midnight (21:00 to 08:00); an empty one never holds anything."""
    if start == end:
        return now
    local = now.astimezone(zone)
    clock = local.time().replace(tzinfo=None)
    if start < end:
        quiet = start <= clock < end
        ends_on = local.date()
    else:
        quiet = clock >= start or clock < end
        ends_on = local.date() + timedelta(days=1) if clock >= start else local.date()
    if not quiet:
        return now
    return datetime.combine(ends_on, end, tzinfo=zone).astimezone(now.tzinfo)
