"""Notification settings, preferences, devices, suppressions, unsubscribe links and the
log (templates: `template_service.py`).

Sending is the worker's (`planning.py` makes notifications from committed events,
`sending.py` sends them); this module is what the API and the inbound webhook processing
change and read. `apply_delivery_reports` is how providers' delivery callbacks reach the
log and the suppression list.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence
from datetime import datetime

import structlog
from pydantic import ValidationError
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.audit.service import record_write
from memberhub.auth.principal import Principal
from memberhub.integrations.providers.base import DeliveryReport
from memberhub.kit.actor import Actor
from memberhub.kit.clock import utcnow
from memberhub.kit.db import lock_key_slots
from memberhub.kit.errors import NotFound, ValidationFailed
from memberhub.kit.ids import new_public_id
from memberhub.kit.types import refusal
from memberhub.members.consent import ConsentSource, set_consent
from memberhub.members.models import Member
from memberhub.members.service import get_member
from memberhub.notifications.catalog import MESSAGE_TYPES
from memberhub.notifications.models import (
    Channel,
    DeviceToken,
    Notification,
    NotificationPreference,
    NotificationSettingsRow,
    NotificationStatus,
    Suppression,
)
from memberhub.notifications.repository import NotificationFilters, NotificationRepository
from memberhub.notifications.schemas import (
    DeviceIn,
    DeviceOut,
    NotificationOut,
    NotificationSettings,
    NotificationSettingsOut,
    NotificationSettingsPatch,
    PreferencesOut,
    PreferencesPatch,
    SuppressionIn,
    SuppressionOut,
    normalise_address,
)

log = structlog.get_logger("memberhub.notifications")

SETTINGS_ROW_ID = 1
# Push tokens share this many locks (see `lock_key_slots`).
DEVICE_TOKEN_LOCK_SLOTS = 1024


# ---------------------------------------------------------------- settings


async def get_settings(session: AsyncSession) -> NotificationSettings:
    row = await session.get(NotificationSettingsRow, SETTINGS_ROW_ID)
    return NotificationSettings.model_validate(row.settings if row is not None else {})


async def settings_out(session: AsyncSession) -> NotificationSettingsOut:
    row = await session.get(NotificationSettingsRow, SETTINGS_ROW_ID)
    current = NotificationSettings.model_validate(row.settings if row is not None else {})
    return NotificationSettingsOut(
        **current.model_dump(), updated_at=row.updated_at if row is not None else None
    )


async def update_settings(
    session: AsyncSession, principal: Principal, patch: NotificationSettingsPatch
) -> NotificationSettingsOut:
    principal.require_installation_wide("Notification settings")
    row = await session.get(NotificationSettingsRow, SETTINGS_ROW_ID, with_for_update=True)
    current = NotificationSettings.model_validate(row.settings if row is not None else {})
    changes = patch.model_dump(exclude_unset=True)
    unknown = [
        name
        for name in [*changes.get("disabled_message_types", []), *changes.get("dedup_windows", {})]
        if name not in MESSAGE_TYPES
    ]
    if unknown:
        raise ValidationFailed(
            f"Unknown message types: {', '.join(sorted(set(unknown)))}.",
            details={"unknown": sorted(set(unknown)), "known": sorted(MESSAGE_TYPES)},
            code="UNKNOWN_MESSAGE_TYPE",
        )
    merged = current.model_dump()
    if isinstance(changes.get("quiet_hours"), dict):
        # The window's ends change one at a time: `{"start": "23:00"}` keeps the end.
        changes["quiet_hours"] = {**merged["quiet_hours"], **changes["quiet_hours"]}
    try:
        updated = NotificationSettings.model_validate({**merged, **changes})
    except ValidationError as exc:
        raise refusal(exc) from None
    now = utcnow()
    stored = updated.model_dump(mode="json")
    if row is None:
        row = NotificationSettingsRow(id=SETTINGS_ROW_ID, settings=stored, updated_at=now)
        session.add(row)
    else:
        row.settings = stored
        row.updated_at = now
    await session.flush()
    record_write(
        session,
        principal.actor,
        action="notification_settings.update",
        object_type="notification_settings",
        object_id="notification_settings",
        # Staff addresses are personal data: the audit says the list changed, not to what.
        changes={
            name: ("changed" if name == "staff" else value) for name, value in changes.items()
        },
    )
    return NotificationSettingsOut(**updated.model_dump(), updated_at=now)


# ---------------------------------------------------------------- preferences and devices


async def _preference(
    session: AsyncSession, member: Member, *, for_update: bool = False
) -> NotificationPreference | None:
    return await session.get(NotificationPreference, member.id, with_for_update=for_update)


def preferences_out(member: Member, preference: NotificationPreference | None) -> PreferencesOut:
    return PreferencesOut(
        member_id=member.public_id,
        email=member.consent_email,
        sms=member.consent_sms,
        push=preference.push if preference is not None else False,
        marketing_email=preference.marketing_email if preference is not None else True,
        marketing_sms=preference.marketing_sms if preference is not None else True,
        marketing_push=preference.marketing_push if preference is not None else True,
        locale=preference.locale if preference is not None else None,
        timezone=preference.timezone if preference is not None else None,
        updated_at=preference.updated_at if preference is not None else None,
    )


async def get_preferences(
    session: AsyncSession, principal: Principal, member_public_id: str
) -> PreferencesOut:
    member = await get_member(session, principal, member_public_id)
    return preferences_out(member, await _preference(session, member))


def new_preference(member_id: int) -> NotificationPreference:
    return NotificationPreference(
        member_id=member_id,
        push=False,
        marketing_email=True,
        marketing_sms=True,
        marketing_push=True,
        updated_at=utcnow(),
    )


async def update_preferences(
    session: AsyncSession, principal: Principal, member_public_id: str, patch: PreferencesPatch
) -> PreferencesOut:
    member = await get_member(session, principal, member_public_id)
    preference = await _preference(session, member, for_update=True)
    if preference is None:
        preference = new_preference(member.id)
        session.add(preference)
    changes = patch.model_dump(exclude_unset=True)
    for name, value in changes.items():
        setattr(preference, name, value)
    preference.updated_at = utcnow()
    await session.flush()
    record_write(
        session,
        principal.actor,
        action="notification_preferences.update",
        object_type="member",
        object_id=member.public_id,
        changes=changes,
    )
    return preferences_out(member, preference)


def device_out(device: DeviceToken, member: Member) -> DeviceOut:
    return DeviceOut(
        id=device.public_id,
        member_id=member.public_id,
        platform=device.platform,
        token=device.token,
        created_at=device.created_at,
    )


async def register_device(
    session: AsyncSession, principal: Principal, member_public_id: str, payload: DeviceIn
) -> tuple[DeviceOut, bool]:
    """Register a push token; registering it again returns the first registration.
    Returns the device and whether it was new. A token is one app on one phone: registered
    for another member (the phone changed hands, another account signed in), it leaves
    that member, so their pushes no longer reach it."""
    member = await get_member(session, principal, member_public_id, for_update=True)
    # Two members registering the token at once would each find it nowhere else and both
    # keep it: the token's lock makes the second see the first's registration and move it.
    await lock_key_slots(session, "device-token", [payload.token], DEVICE_TOKEN_LOCK_SLOTS)
    for device in await NotificationRepository(session).devices(member.id):
        if device.token == payload.token:
            return device_out(device, member), False
    others = (
        await session.execute(
            select(DeviceToken.id, DeviceToken.public_id, Member.public_id)
            .join(Member, Member.id == DeviceToken.member_id)
            .where(DeviceToken.token == payload.token)
        )
    ).all()
    if others:
        await session.execute(
            delete(DeviceToken).where(DeviceToken.id.in_([row_id for row_id, _, _ in others]))
        )
        for _, device_id, other_member in others:
            record_write(
                session,
                principal.actor,
                action="device.moved",
                object_type="member",
                object_id=other_member,
                changes={"device_id": device_id, "to_member_id": member.public_id},
            )
    device = DeviceToken(
        public_id=new_public_id("dev"),
        member_id=member.id,
        token=payload.token,
        platform=payload.platform,
        created_at=utcnow(),
    )
    session.add(device)
    await session.flush()
    record_write(
        session,
        principal.actor,
        action="device.register",
        object_type="member",
        object_id=member.public_id,
        changes={"device_id": device.public_id, "platform": device.platform},
    )
    return device_out(device, member), True


async def list_devices(
    session: AsyncSession, principal: Principal, member_public_id: str
) -> list[DeviceOut]:
    member = await get_member(session, principal, member_public_id)
    return [
        device_out(device, member)
        for device in await NotificationRepository(session).devices(member.id)
    ]


async def delete_device(
    session: AsyncSession, principal: Principal, member_public_id: str, device_public_id: str
) -> None:
    member = await get_member(session, principal, member_public_id)
    for device in await NotificationRepository(session).devices(member.id):
        if device.public_id == device_public_id:
            await session.delete(device)
            await session.flush()
            record_write(
                session,
                principal.actor,
                action="device.delete",
                object_type="member",
                object_id=member.public_id,
                changes={"device_id": device_public_id},
            )
            return
    raise NotFound(f"Device {device_public_id} does not exist.", code="DEVICE_NOT_FOUND")


# ---------------------------------------------------------------- the log


def notification_out(
    notification: Notification, member_public_id: str | None, integration_public_id: str | None
) -> NotificationOut:
    return NotificationOut(
        id=notification.public_id,
        event_id=notification.event_public_id,
        message_type=notification.message_type,
        category=notification.category,
        channel=notification.channel,
        audience=notification.audience,
        member_id=member_public_id,
        recipient=notification.recipient,
        locale=notification.locale,
        subject=notification.subject,
        status=notification.status,
        reason=notification.reason,
        error=notification.error,
        attempts=notification.attempts,
        next_attempt_at=notification.next_attempt_at,
        integration_id=integration_public_id,
        provider_message_id=notification.provider_message_id,
        created_at=notification.created_at,
        sent_at=notification.sent_at,
        delivered_at=notification.delivered_at,
    )


async def list_notifications(
    session: AsyncSession, filters: NotificationFilters, *, after_id: int | None, limit: int
) -> list[tuple[Notification, str | None, str | None]]:
    rows = await NotificationRepository(session).list(filters, after_id=after_id, limit=limit)
    return [(row[0], row[1], row[2]) for row in rows]


# ---------------------------------------------------------------- suppressions


def suppression_out(suppression: Suppression) -> SuppressionOut:
    return SuppressionOut(
        id=suppression.public_id,
        channel=suppression.channel,
        address=suppression.address,
        reason=suppression.reason,
        source=suppression.source,
        created_at=suppression.created_at,
    )


async def suppress(
    session: AsyncSession, channel: str, address: str, reason: str, source: str | None
) -> Suppression:
    """Add an address to the suppression list (or return its entry)."""
    normalised = normalise_address(channel, address)
    repository = NotificationRepository(session)
    existing = await repository.suppression(channel, normalised)
    if existing is not None:
        return existing
    suppression = Suppression(
        public_id=new_public_id("sup"),
        channel=channel,
        address=normalised,
        reason=reason,
        source=source,
        created_at=utcnow(),
    )
    try:
        async with session.begin_nested():
            session.add(suppression)
            await session.flush()
    except IntegrityError:
        found = await repository.suppression(channel, normalised)
        assert found is not None
        return found
    return suppression


async def list_suppressions(
    session: AsyncSession,
    principal: Principal,
    *,
    channel: str | None,
    after_id: int | None,
    limit: int,
) -> Sequence[Suppression]:
    # Addresses of every organisation's members.
    principal.require_installation_wide("Suppression lists")
    return await NotificationRepository(session).suppressions(
        channel=channel, after_id=after_id, limit=limit
    )


async def add_suppression(
    session: AsyncSession, principal: Principal, payload: SuppressionIn
) -> Suppression:
    principal.require_installation_wide("Suppression lists")
    suppression = await suppress(
        session, payload.channel, payload.address, payload.reason, f"api:{principal.actor.id}"
    )
    record_write(
        session,
        principal.actor,
        action="notification_suppression.add",
        object_type="notification_suppression",
        object_id=suppression.public_id,
        changes={"channel": payload.channel, "reason": payload.reason},
    )
    return suppression


async def delete_suppression(session: AsyncSession, principal: Principal, public_id: str) -> None:
    principal.require_installation_wide("Suppression lists")
    suppression = await session.scalar(
        select(Suppression).where(Suppression.public_id == public_id)
    )
    if suppression is None:
        raise NotFound(f"Suppression {public_id} does not exist.", code="SUPPRESSION_NOT_FOUND")
    await session.delete(suppression)
    await session.flush()
    record_write(
        session,
        principal.actor,
        action="notification_suppression.delete",
        object_type="notification_suppression",
        object_id=public_id,
        changes={},
    )


# What a delivery report does to the notification it concerns, and whether it suppresses
# the address from then on.
_REPORT_STATUS = {
    "sent": None,
    "delivered": NotificationStatus.DELIVERED,
    "bounced": NotificationStatus.BOUNCED,
    "dropped": NotificationStatus.BOUNCED,
    "failed": NotificationStatus.FAILED,
    "spam_report": None,
    "unsubscribed": None,
}
SUPPRESSING_REPORTS = frozenset({"bounced", "dropped", "spam_report", "unsubscribed"})


async def apply_delivery_reports(
    session: AsyncSession, integration_id: int, reports: Sequence[DeliveryReport]
) -> dict[str, int]:
    """Record what a provider's callbacks say: each notification's delivery status, and the
    addresses that bounced, were dropped, reported spam or unsubscribed on the suppression
    list. Returns counts of what was done."""
    repository = NotificationRepository(session)
    updated = suppressed = unmatched = 0
    for report in reports:
        notification = await repository.by_reference_or_message_id(
            integration_id, report.reference, report.provider_message_id
        )
        if notification is None:
            unmatched += 1
        else:
            status = _REPORT_STATUS[report.status]
            if status is not None and _may_become(notification.status, status):
                notification.status = status
                notification.reason = (report.reason or report.status)[:100]
                if status == NotificationStatus.DELIVERED:
                    notification.delivered_at = report.occurred_at or utcnow()
                notification.updated_at = utcnow()
                updated += 1
        if report.status in SUPPRESSING_REPORTS:
            address = report.recipient or (notification.recipient if notification else None)
            channel = (
                notification.channel
                if notification is not None
                else (Channel.EMAIL if address and "@" in address else Channel.SMS)
            )
            if address:
                await suppress(
                    session, channel, address, report.status, f"integration:{integration_id}"
                )
                suppressed += 1
    await session.flush()
    return {"updated": updated, "suppressed": suppressed, "unmatched": unmatched}


def _may_become(current: str, new: str) -> bool:
    """Reports arrive out of order: a delivered message may still bounce later (an
    asynchronous bounce), but a late "delivered" does not undo a bounce or a failure."""
    if current in (NotificationStatus.QUEUED, NotificationStatus.SUPPRESSED):
        return False
    if new == NotificationStatus.DELIVERED:
        return current == NotificationStatus.SENT
    return True


# ---------------------------------------------------------------- unsubscribe links


def _unsubscribe_key(secret: str) -> bytes:
    return hashlib.sha256(b"memberhub-unsubscribe:" + secret.encode()).digest()


def unsubscribe_token(secret: str, member_public_id: str, channel: str) -> str:
    """A token naming a member and channel, signed: the link needs no login."""
    payload = f"{member_public_id}:{channel}".encode()
    signature = hmac.new(_unsubscribe_key(secret), payload, hashlib.sha256).digest()[:16]
    return (
        base64.urlsafe_b64encode(payload).decode().rstrip("=")
        + "."
        + base64.urlsafe_b64encode(signature).decode().rstrip("=")
    )


def read_unsubscribe_token(secret: str, token: str) -> tuple[str, str]:
    invalid = NotFound("This unsubscribe link is not valid.", code="UNSUBSCRIBE_LINK_INVALID")
    encoded_payload, _, encoded_signature = token.partition(".")
    try:
        payload = base64.urlsafe_b64decode(encoded_payload + "=" * (-len(encoded_payload) % 4))
        signature = base64.urlsafe_b64decode(
            encoded_signature + "=" * (-len(encoded_signature) % 4)
        )
    except ValueError:
        raise invalid from None
    expected = hmac.new(_unsubscribe_key(secret), payload, hashlib.sha256).digest()[:16]
    if not hmac.compare_digest(expected, signature):
        raise invalid
    member_public_id, _, channel = payload.decode(errors="replace").partition(":")
    if channel not in Channel.ALL:
        raise invalid
    return member_public_id, channel


async def unsubscribe(session: AsyncSession, secret: str, token: str, now: datetime) -> str:
    """Turn off marketing messages on the link's channel for its member; returns the
    channel. From an email, the member's `marketing_email` consent is withdrawn too (with
    its history and events), so every connector that sends marketing email stops as well.
    Idempotent: a second click changes nothing."""
    member_public_id, channel = read_unsubscribe_token(secret, token)
    member = await session.scalar(select(Member).where(Member.public_id == member_public_id))
    if member is None:
        raise NotFound("This unsubscribe link is not valid.", code="UNSUBSCRIBE_LINK_INVALID")
    preference = await session.get(NotificationPreference, member.id, with_for_update=True)
    if preference is None:
        preference = new_preference(member.id)
        session.add(preference)
    field = f"marketing_{channel}"
    if getattr(preference, field):
        setattr(preference, field, False)
        preference.updated_at = now
        await session.flush()
        record_write(
            session,
            Actor.system("system:unsubscribe"),
            action="notification_preferences.unsubscribe",
            object_type="member",
            object_id=member.public_id,
            changes={field: False},
        )
    if channel == Channel.EMAIL:
        await set_consent(
            session,
            Actor.system("system:unsubscribe"),
            member,
            "marketing_email",
            False,
            source=ConsentSource.UNSUBSCRIBE_LINK,
        )
    return channel
