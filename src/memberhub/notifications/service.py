"""Notification settings, templates, preferences, devices, suppressions and the log.

Sending is the worker's (`planning.py` makes notifications from committed events,
`sending.py` sends them); this module is what the API and the inbound webhook processing
change and read. `apply_delivery_reports` is how providers' delivery callbacks reach the
log and the suppression list.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.audit.service import record_write
from memberhub.auth.principal import Principal
from memberhub.integrations.providers.base import DeliveryReport
from memberhub.kit.actor import Actor
from memberhub.kit.clock import utcnow
from memberhub.kit.errors import Conflict, NotFound, ValidationFailed
from memberhub.kit.ids import new_public_id
from memberhub.members.models import Member
from memberhub.members.service import get_member
from memberhub.notifications import catalog, templates
from memberhub.notifications.catalog import MESSAGE_TYPES, MessageType
from memberhub.notifications.models import (
    Channel,
    DeviceToken,
    Notification,
    NotificationPreference,
    NotificationSettingsRow,
    NotificationStatus,
    NotificationTemplate,
    Suppression,
)
from memberhub.notifications.repository import NotificationFilters, NotificationRepository
from memberhub.notifications.schemas import (
    DeviceIn,
    DeviceOut,
    MessageTypeOut,
    NotificationOut,
    NotificationSettings,
    NotificationSettingsOut,
    NotificationSettingsPatch,
    PreferencesOut,
    PreferencesPatch,
    PreviewIn,
    PreviewOut,
    PreviewRequest,
    SuppressionIn,
    SuppressionOut,
    TemplateIn,
    TemplateOut,
    TemplatePatch,
    normalise_address,
)
from memberhub.program import service as program_service

log = structlog.get_logger("memberhub.notifications")

SETTINGS_ROW_ID = 1


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
    try:
        updated = NotificationSettings.model_validate({**current.model_dump(), **changes})
    except ValueError as exc:
        raise ValidationFailed(str(exc)) from None
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


# ---------------------------------------------------------------- message types


def message_type_out(message: MessageType) -> MessageTypeOut:
    return MessageTypeOut(
        name=message.name,
        audience=message.audience,
        category=message.category,
        event_type=message.event.event_type,
        description=message.description,
        channels=sorted(message.defaults),
        staff_roles=list(message.staff_roles),
        variables=catalog.variables(message),
    )


def _message_type(name: str) -> MessageType:
    message = MESSAGE_TYPES.get(name)
    if message is None:
        raise ValidationFailed(
            f"Unknown message type {name!r}.",
            details={"field": "message_type", "known": sorted(MESSAGE_TYPES)},
            code="UNKNOWN_MESSAGE_TYPE",
        )
    return message


# ---------------------------------------------------------------- templates


def member_context(member: Member) -> dict[str, Any]:
    return {
        "id": member.public_id,
        "first_name": member.first_name,
        "last_name": member.last_name,
        "email": member.email,
        "phone": member.phone,
        "tier": member.tier,
        "status": member.status,
        "member_since": member.member_since.isoformat() if member.member_since else None,
        "term_ends_at": member.term_ends_at.isoformat() if member.term_ends_at else None,
    }


def sample_member() -> dict[str, Any]:
    return {
        "id": "mem_example",
        "first_name": "Alex",
        "last_name": "Example",
        "email": "alex@example.com",
        "phone": "+60123456789",
        "tier": "GOLD",
        "status": "active",
        "member_since": "2025-01-31T09:30:00+00:00",
        "term_ends_at": "2027-01-31T09:30:00+00:00",
    }


def render_context(
    message: MessageType,
    *,
    settings: NotificationSettings,
    currency: str,
    event: Mapping[str, Any],
    member: Mapping[str, Any] | None = None,
    recipient: Mapping[str, Any] | None = None,
    unsubscribe_url: str | None = None,
) -> dict[str, Any]:
    context: dict[str, Any] = {
        "program": {"name": settings.program_name, "currency": currency},
        "event": dict(event),
    }
    if message.audience == "member":
        context["member"] = dict(member or sample_member())
        if message.category == "marketing":
            context["unsubscribe_url"] = unsubscribe_url or "https://example.com/unsubscribe"
    else:
        context["recipient"] = dict(
            recipient or {"email": "staff@example.com", "name": "Staff", "roles": ["manager"]}
        )
    return context


def check_template(
    message: MessageType, channel: str, subject: str | None, body: str, format: str
) -> None:
    """Refuse a template that cannot be sent: wrong parts for its channel, or one that
    does not parse or render against the message type's sample data (422, with the part,
    line and reason)."""
    if format == "html" and channel != Channel.EMAIL:
        raise ValidationFailed(
            "Only email templates may be html.",
            details={"field": "format"},
            code="INVALID_TEMPLATE",
        )
    if channel == Channel.EMAIL and subject is None:
        raise ValidationFailed(
            "An email template needs a subject.",
            details={"field": "subject"},
            code="INVALID_TEMPLATE",
        )
    context = render_context(
        message,
        settings=NotificationSettings(),
        currency="MYR",
        event=catalog.sample_event(message),
    )
    try:
        templates.render(subject=subject, body=body, format=format, context=context)
    except templates.TemplateInvalid as exc:
        raise ValidationFailed(
            f"The template does not render: {exc}.",
            details={"part": exc.part, "line": exc.line, "reason": exc.reason},
            code="INVALID_TEMPLATE",
        ) from None


def template_out(template: NotificationTemplate) -> TemplateOut:
    return TemplateOut(
        id=template.public_id,
        message_type=template.message_type,
        channel=template.channel,
        locale=template.locale,
        subject=template.subject,
        body=template.body,
        format=template.format,
        enabled=template.enabled,
        default=False,
        created_at=template.created_at,
        updated_at=template.updated_at,
    )


def default_templates(message_type: str | None, channel: str | None) -> list[TemplateOut]:
    found = []
    for message in MESSAGE_TYPES.values():
        if message_type is not None and message.name != message_type:
            continue
        for name, default in sorted(message.defaults.items()):
            if channel is not None and name != channel:
                continue
            found.append(
                TemplateOut(
                    id=None,
                    message_type=message.name,
                    channel=name,
                    locale=None,
                    subject=default.subject,
                    body=default.body,
                    format=default.format,
                    enabled=True,
                    default=True,
                    created_at=None,
                    updated_at=None,
                )
            )
    return found


async def list_templates(
    session: AsyncSession, *, message_type: str | None, channel: str | None, defaults: bool
) -> list[TemplateOut]:
    """The installation's templates, then (with `defaults`) the built-in ones."""
    found = [
        template_out(template)
        for template in await NotificationRepository(session).templates()
        if (message_type is None or template.message_type == message_type)
        and (channel is None or template.channel == channel)
    ]
    if defaults:
        found += default_templates(message_type, channel)
    return found


async def get_template(session: AsyncSession, public_id: str) -> NotificationTemplate:
    template = await NotificationRepository(session).template(public_id)
    if template is None:
        raise NotFound(f"Template {public_id} does not exist.", code="TEMPLATE_NOT_FOUND")
    return template


async def create_template(
    session: AsyncSession, principal: Principal, payload: TemplateIn
) -> NotificationTemplate:
    message = _message_type(payload.message_type)
    check_template(message, payload.channel, payload.subject, payload.body, payload.format)
    repository = NotificationRepository(session)
    if await repository.template_for(payload.message_type, payload.channel, payload.locale):
        raise Conflict(
            f"A {payload.channel} template of {payload.message_type} in {payload.locale} "
            "exists already; change it instead.",
            code="TEMPLATE_EXISTS",
        )
    now = utcnow()
    template = NotificationTemplate(
        public_id=new_public_id("tpl"),
        message_type=payload.message_type,
        channel=payload.channel,
        locale=payload.locale,
        subject=payload.subject,
        body=payload.body,
        format=payload.format,
        enabled=payload.enabled,
        created_at=now,
        updated_at=now,
    )
    session.add(template)
    try:
        await session.flush()
    except IntegrityError:
        raise Conflict("The template was created meanwhile.", code="TEMPLATE_EXISTS") from None
    record_write(
        session,
        principal.actor,
        action="notification_template.create",
        object_type="notification_template",
        object_id=template.public_id,
        changes=payload.model_dump(),
    )
    return template


async def update_template(
    session: AsyncSession, principal: Principal, public_id: str, patch: TemplatePatch
) -> NotificationTemplate:
    template = await get_template(session, public_id)
    changes = patch.model_dump(exclude_unset=True)
    subject = changes.get("subject", template.subject)
    body = changes.get("body", template.body)
    format = changes.get("format", template.format)
    check_template(_message_type(template.message_type), template.channel, subject, body, format)
    for name, value in changes.items():
        setattr(template, name, value)
    template.updated_at = utcnow()
    await session.flush()
    record_write(
        session,
        principal.actor,
        action="notification_template.update",
        object_type="notification_template",
        object_id=template.public_id,
        changes=changes,
    )
    return template


async def delete_template(session: AsyncSession, principal: Principal, public_id: str) -> None:
    template = await get_template(session, public_id)
    await session.delete(template)
    await session.flush()
    record_write(
        session,
        principal.actor,
        action="notification_template.delete",
        object_type="notification_template",
        object_id=public_id,
        changes={},
    )


def choose_template(
    stored: Mapping[tuple[str, str, str], NotificationTemplate],
    message: MessageType,
    channel: str,
    locales: Sequence[str | None],
) -> tuple[str | None, str, str, str | None] | None:
    """(subject, body, format, locale) of the template to send: the installation's in the
    first of `locales` it has, else the default; None when there is none or it is
    disabled."""
    for locale in locales:
        if locale is None:
            continue
        template = stored.get((message.name, channel, locale))
        if template is not None:
            if not template.enabled:
                return None
            return template.subject, template.body, template.format, locale
    default = message.defaults.get(channel)
    if default is None:
        return None
    return default.subject, default.body, default.format, None


async def preview_template(
    session: AsyncSession, principal: Principal, template: TemplateOut, payload: PreviewIn
) -> PreviewOut:
    message = _message_type(template.message_type)
    settings = await get_settings(session)
    program = await program_service.get_program(session)
    member = None
    if payload.member_id is not None:
        if message.audience != "member":
            raise ValidationFailed(
                f"{message.name} goes to staff, not to a member.",
                details={"field": "member_id"},
                code="NOT_A_MEMBER_MESSAGE",
            )
        member = member_context(await get_member(session, principal, payload.member_id))
    event = catalog.sample_event(message)
    if payload.event is not None:
        event.update(payload.event)
    context = render_context(
        message,
        settings=settings,
        currency=program.currency,
        event=event,
        member=member,
    )
    try:
        rendered = templates.render(
            subject=template.subject, body=template.body, format=template.format, context=context
        )
    except templates.TemplateInvalid as exc:
        raise ValidationFailed(
            f"The template does not render: {exc}.",
            details={"part": exc.part, "line": exc.line, "reason": exc.reason},
            code="INVALID_TEMPLATE",
        ) from None
    return PreviewOut(subject=rendered.subject, text=rendered.text, html=rendered.html)


async def preview(
    session: AsyncSession, principal: Principal, payload: PreviewRequest
) -> PreviewOut:
    """Render a draft (`body` given, checked as a new template is) or the template that
    would be sent in `locale` (else the default locale, else the built-in one)."""
    message = _message_type(payload.message_type)
    if payload.body is not None:
        check_template(message, payload.channel, payload.subject, payload.body, payload.format)
        template = TemplateOut(
            id=None,
            message_type=message.name,
            channel=payload.channel,
            locale=payload.locale,
            subject=payload.subject,
            body=payload.body,
            format=payload.format,
            enabled=True,
            default=False,
            created_at=None,
            updated_at=None,
        )
    else:
        settings = await get_settings(session)
        stored = {
            (t.channel, t.locale): t
            for t in await list_templates(
                session, message_type=message.name, channel=payload.channel, defaults=False
            )
        }
        chosen = [
            stored[(payload.channel, locale)]
            for locale in (payload.locale, settings.default_locale)
            if locale is not None and (payload.channel, locale) in stored
        ] + default_templates(message.name, payload.channel)
        if not chosen:
            raise ValidationFailed(
                f"{message.name} has no {payload.channel} template.",
                details={"field": "channel"},
                code="NO_TEMPLATE",
            )
        template = chosen[0]
    return await preview_template(
        session, principal, template, PreviewIn(member_id=payload.member_id, event=payload.event)
    )


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
    Returns the device and whether it was new."""
    member = await get_member(session, principal, member_public_id, for_update=True)
    for device in await NotificationRepository(session).devices(member.id):
        if device.token == payload.token:
            return device_out(device, member), False
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
    session: AsyncSession, *, channel: str | None, after_id: int | None, limit: int
) -> Sequence[Suppression]:
    return await NotificationRepository(session).suppressions(
        channel=channel, after_id=after_id, limit=limit
    )


async def add_suppression(
    session: AsyncSession, principal: Principal, payload: SuppressionIn
) -> Suppression:
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
    channel. Idempotent: a second click changes nothing."""
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
    return channel
