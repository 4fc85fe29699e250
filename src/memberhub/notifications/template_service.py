"""Message types as the API shows them, and templates: checked when saved, chosen per
locale, previewed for a member.

A template is stored only once it renders against its message type's sample data
(`check_template`); the planner chooses among the stored ones and the defaults with
`choose_template` and renders them with `render_context`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.audit.service import record_write
from memberhub.auth.principal import Principal
from memberhub.kit.clock import utcnow
from memberhub.kit.errors import Conflict, NotFound, ValidationFailed
from memberhub.kit.ids import new_public_id
from memberhub.members.models import Member
from memberhub.members.service import get_member
from memberhub.notifications import catalog, templates
from memberhub.notifications.catalog import MESSAGE_TYPES, MessageType
from memberhub.notifications.models import Channel, NotificationPreference, NotificationTemplate
from memberhub.notifications.repository import NotificationRepository
from memberhub.notifications.schemas import (
    MessageTypeOut,
    NotificationSettings,
    PreviewIn,
    PreviewOut,
    PreviewRequest,
    TemplateIn,
    TemplateOut,
    TemplatePatch,
)
from memberhub.notifications.service import get_settings
from memberhub.program import service as program_service

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
    if message.audience == "staff" and channel != Channel.EMAIL:
        raise ValidationFailed(
            f"{message.name} goes to staff, who get email only: a {channel} template would "
            "never be sent.",
            details={"field": "channel"},
            code="INVALID_TEMPLATE",
        )
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
    principal.require_installation_wide("Notification templates")
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
    principal.require_installation_wide("Notification templates")
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
    principal.require_installation_wide("Notification templates")
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


def locale_candidates(locales: Sequence[str | None]) -> list[str]:
    """The locale tags to look for, in order and lower-cased: each locale, then the tag cut
    back a subtag at a time (`zh-Hant-TW`, `zh-Hant`, `zh`), before the next: RFC 4647's
    lookup, which also drops a single-letter subtag left at the end (`x` of `de-x-foo`)."""
    wanted: list[str] = []
    for locale in locales:
        if not locale:
            continue
        subtags = locale.lower().split("-")
        for end in range(len(subtags), 0, -1):
            if end < len(subtags) and len(subtags[end - 1]) == 1:
                continue
            tag = "-".join(subtags[:end])
            if tag not in wanted:
                wanted.append(tag)
    return wanted


TEMPLATE_DISABLED = "template_disabled"
NO_TEMPLATE = "no_template"


def choose_template(
    stored: Mapping[tuple[str, str, str], NotificationTemplate],
    message: MessageType,
    channel: str,
    locales: Sequence[str | None],
) -> tuple[str | None, str, str, str | None] | str:
    """(subject, body, format, locale) of the template to send: the installation's in the
    first of `locales` it has, else the default; else why nothing is sent, the reason a
    notification is logged with: TEMPLATE_DISABLED (the one found is disabled) or
    NO_TEMPLATE (none in those locales, and no built-in one for the channel). Locales
    compare case aside, and a tag falls back subtag by subtag (`zh-Hant-TW` to `zh-Hant`
    to `zh`) before the next locale is tried, as BCP 47 tags do."""
    own = {
        locale.lower(): template
        for (name, on, locale), template in stored.items()
        if name == message.name and on == channel
    }
    for tag in locale_candidates(locales):
        template = own.get(tag)
        if template is not None:
            if not template.enabled:
                return TEMPLATE_DISABLED
            return template.subject, template.body, template.format, template.locale
    default = message.defaults.get(channel)
    if default is None:
        return NO_TEMPLATE
    return default.subject, default.body, default.format, None


async def preview_template(
    session: AsyncSession,
    principal: Principal,
    template: TemplateOut,
    payload: PreviewIn,
    member: Member | None = None,
) -> PreviewOut:
    """Render `template` for `payload.member_id` (`member`, when the caller has looked it up
    already) or the sample data."""
    message = _message_type(template.message_type)
    settings = await get_settings(session)
    program = await program_service.get_program(session)
    shown = None
    zone = ZoneInfo(program.timezone)
    if payload.member_id is not None:
        if message.audience != "member":
            raise ValidationFailed(
                f"{message.name} goes to staff, not to a member.",
                details={"field": "member_id"},
                code="NOT_A_MEMBER_MESSAGE",
            )
        chosen = member or await get_member(session, principal, payload.member_id)
        shown = member_context(chosen)
        preference = await session.get(NotificationPreference, chosen.id)
        if preference is not None and preference.timezone:
            zone = ZoneInfo(preference.timezone)
    event = catalog.sample_event(message)
    if payload.event is not None:
        event.update(payload.event)
    context = render_context(
        message,
        settings=settings,
        currency=program.currency,
        event=event,
        member=shown,
    )
    try:
        rendered = templates.render(
            subject=template.subject,
            body=template.body,
            format=template.format,
            context=context,
            zone=zone,
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
    would be sent in `locale` (with a member and no `locale`, the member's own, as sending
    does; else the default locale, else the built-in one)."""
    message = _message_type(payload.message_type)
    locale = payload.locale
    member = None
    if locale is None and payload.member_id is not None and message.audience == "member":
        # The member is looked up once, for the preview too (a member the key cannot see
        # is a 404 before anything of it shows).
        member = await get_member(session, principal, payload.member_id)
        preference = await session.get(NotificationPreference, member.id)
        locale = preference.locale if preference is not None else None
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
            t.locale.lower(): t
            for t in await list_templates(
                session, message_type=message.name, channel=payload.channel, defaults=False
            )
            if t.locale is not None
        }
        chosen = [
            stored[tag]
            for tag in locale_candidates((locale, settings.default_locale))
            if tag in stored
        ] + default_templates(message.name, payload.channel)
        if not chosen:
            raise ValidationFailed(
                f"{message.name} has no {payload.channel} template.",
                details={"field": "channel"},
                code="NO_TEMPLATE",
            )
        template = chosen[0]
        if not template.enabled:
            raise Conflict(
                f"The {template.locale} {payload.channel} template of {message.name} is "
                "disabled: nothing would be sent (preview its subject and body as a draft).",
                code="TEMPLATE_DISABLED",
                details={"template_id": template.id},
            )
    return await preview_template(
        session,
        principal,
        template,
        PreviewIn(member_id=payload.member_id, event=payload.event),
        member,
    )
