from __future__ import annotations

import html
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import HTMLResponse
from pydantic import BaseModel

from memberhub.auth.dependencies import (
    MembersReader,
    MembersWriter,
    NotificationsReader,
    NotificationsWriter,
)
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.kit.errors import ValidationFailed
from memberhub.kit.http import ERROR_RESPONSES, DbSession, UnitOfWorkRoute
from memberhub.kit.pagination import Page, PageParams, build_page, page_params
from memberhub.kit.types import IdPath
from memberhub.members.service import get_member
from memberhub.notifications import service, template_service
from memberhub.notifications.catalog import MESSAGE_TYPES
from memberhub.notifications.models import Channel, NotificationStatus
from memberhub.notifications.repository import NotificationFilters
from memberhub.notifications.schemas import (
    DeviceIn,
    DeviceOut,
    MessageTypeOut,
    NotificationOut,
    NotificationSettingsOut,
    NotificationSettingsPatch,
    PreferencesOut,
    PreferencesPatch,
    PreviewOut,
    PreviewRequest,
    SuppressionIn,
    SuppressionOut,
    TemplateIn,
    TemplateOut,
    TemplatePatch,
)

router = APIRouter(
    prefix="/api/v1",
    tags=["notifications"],
    route_class=UnitOfWorkRoute,
    responses=ERROR_RESPONSES,
)
# Unsubscribe links: no API key, the link's signature is the authority.
public = APIRouter(prefix="/api/v1", tags=["notifications"])


def _one_of(values: tuple[str, ...]) -> str:
    return "^(" + "|".join(values) + ")$"


StatusFilter = Annotated[str | None, Query(pattern=_one_of(NotificationStatus.ALL))]
ChannelFilter = Annotated[str | None, Query(pattern=_one_of(Channel.ALL))]
TypeFilter = Annotated[str | None, Query(pattern=_one_of(tuple(MESSAGE_TYPES)))]
PublicIdFilter = Annotated[str | None, Query(pattern=r"^[a-z]{2,4}_[0-9a-z]{1,40}$", max_length=45)]


# ---------------------------------------------------------------- settings


@router.get("/notification-settings")
async def get_notification_settings(
    session: DbSession, principal: NotificationsReader
) -> NotificationSettingsOut:
    """Staff recipients, default locale, quiet hours, renewal notice periods, deduplication
    and the retry schedule."""
    return await service.settings_out(session)


@router.patch("/notification-settings")
async def update_notification_settings(
    payload: NotificationSettingsPatch, session: DbSession, principal: NotificationsWriter
) -> NotificationSettingsOut:
    """Change the fields given (with a key bound to no organisation: they are the whole
    installation's)."""
    return await service.update_settings(session, principal, payload)


@router.get("/notification-message-types")
async def list_message_types(principal: NotificationsReader) -> list[MessageTypeOut]:
    """Every message type: its event, audience, category, default channels and the
    variables its templates may use."""
    return [template_service.message_type_out(message) for message in MESSAGE_TYPES.values()]


# ---------------------------------------------------------------- templates


@router.get("/notification-templates")
async def list_templates(
    session: DbSession,
    principal: NotificationsReader,
    message_type: TypeFilter = None,
    channel: ChannelFilter = None,
    include_defaults: bool = True,
) -> list[TemplateOut]:
    """The installation's templates, then the built-in defaults (`default: true`, no id),
    which apply where no template of the installation does."""
    return await template_service.list_templates(
        session, message_type=message_type, channel=channel, defaults=include_defaults
    )


@router.post("/notification-templates", status_code=201)
async def create_template(
    payload: TemplateIn, session: DbSession, principal: NotificationsWriter, response: Response
) -> TemplateOut:
    """A template for a message type, channel and locale. It is rendered against the
    message type's sample data before it is saved: one that does not parse, reads an
    unknown variable or a forbidden attribute is refused (422 INVALID_TEMPLATE with the
    part, line and reason)."""
    template = await template_service.create_template(session, principal, payload)
    response.headers["Location"] = f"/api/v1/notification-templates/{template.public_id}"
    return template_service.template_out(template)


@router.post("/notification-templates/preview")
async def preview_template(
    payload: PreviewRequest, session: DbSession, principal: NotificationsReader
) -> PreviewOut:
    """Render a template (a draft, or the one that would be sent) for a chosen member,
    or for sample data."""
    return await template_service.preview(session, principal, payload)


@router.get("/notification-templates/{template_id}")
async def get_template(
    template_id: IdPath, session: DbSession, principal: NotificationsReader
) -> TemplateOut:
    """One of the installation's templates."""
    return template_service.template_out(await template_service.get_template(session, template_id))


@router.patch("/notification-templates/{template_id}")
async def update_template(
    template_id: IdPath,
    payload: TemplatePatch,
    session: DbSession,
    principal: NotificationsWriter,
) -> TemplateOut:
    """Change the fields given; checked as a new template is."""
    return template_service.template_out(
        await template_service.update_template(session, principal, template_id, payload)
    )


@router.delete("/notification-templates/{template_id}", status_code=204)
async def delete_template(
    template_id: IdPath, session: DbSession, principal: NotificationsWriter
) -> Response:
    """Remove the template: the next locale's, or the default, applies again."""
    await template_service.delete_template(session, principal, template_id)
    return Response(status_code=204)


# ---------------------------------------------------------------- the log


async def _notifications_page(
    session: DbSession, filters: NotificationFilters, page: PageParams
) -> Page[NotificationOut]:
    rows = await service.list_notifications(
        session, filters, after_id=page.after_id, limit=page.limit
    )
    items, pagination = build_page([row[0] for row in rows], page.limit)
    by_id = {row[0].id: row for row in rows}
    return Page(
        data=[service.notification_out(*by_id[item.id]) for item in items],
        pagination=pagination,
    )


@router.get("/notifications")
async def list_notifications(
    session: DbSession,
    principal: NotificationsReader,
    page: Annotated[PageParams, Depends(page_params)],
    status: StatusFilter = None,
    channel: ChannelFilter = None,
    message_type: TypeFilter = None,
    member_id: PublicIdFilter = None,
    event_id: PublicIdFilter = None,
) -> Page[NotificationOut]:
    """Every notification, newest first: its status (`suppressed` and `failed` with a
    reason), attempts and the provider's message id. A key bound to an organisation sees
    its members' notifications only."""
    member = await get_member(session, principal, member_id) if member_id else None
    filters = NotificationFilters(
        organisation_ids=principal.visible_organisation_ids,
        member_id=member.id if member is not None else None,
        status=status,
        channel=channel,
        message_type=message_type,
        event_public_id=event_id,
    )
    return await _notifications_page(session, filters, page)


@router.get("/members/{member_id}/notifications")
async def list_member_notifications(
    member_id: IdPath,
    session: DbSession,
    principal: NotificationsReader,
    page: Annotated[PageParams, Depends(page_params)],
    status: StatusFilter = None,
    channel: ChannelFilter = None,
    message_type: TypeFilter = None,
) -> Page[NotificationOut]:
    """The member's notifications, newest first."""
    member = await get_member(session, principal, member_id)
    filters = NotificationFilters(
        member_id=member.id, status=status, channel=channel, message_type=message_type
    )
    return await _notifications_page(session, filters, page)


# ---------------------------------------------------------------- preferences and devices


@router.get("/members/{member_id}/notification-preferences")
async def get_notification_preferences(
    member_id: IdPath, session: DbSession, principal: MembersReader
) -> PreferencesOut:
    """Consent per channel (email and SMS are the member's consent flags), marketing per
    channel, locale and time zone (for quiet hours)."""
    return await service.get_preferences(session, principal, member_id)


@router.patch("/members/{member_id}/notification-preferences")
async def update_notification_preferences(
    member_id: IdPath, payload: PreferencesPatch, session: DbSession, principal: MembersWriter
) -> PreferencesOut:
    """Change the fields given: push consent, marketing per channel, locale, time zone."""
    return await service.update_preferences(session, principal, member_id, payload)


@router.post(
    "/members/{member_id}/devices",
    status_code=201,
    responses={200: {"model": DeviceOut, "description": "The token was registered already"}},
)
async def register_device(
    member_id: IdPath,
    payload: DeviceIn,
    session: DbSession,
    principal: MembersWriter,
    response: Response,
) -> DeviceOut:
    """Register a device's push token (201); the same token again returns it (200)."""
    device, created = await service.register_device(session, principal, member_id, payload)
    if not created:
        response.status_code = 200
    return device


@router.get("/members/{member_id}/devices")
async def list_devices(
    member_id: IdPath, session: DbSession, principal: MembersReader
) -> list[DeviceOut]:
    """The member's registered devices, oldest first."""
    return await service.list_devices(session, principal, member_id)


@router.delete("/members/{member_id}/devices/{device_id}", status_code=204)
async def delete_device(
    member_id: IdPath, device_id: IdPath, session: DbSession, principal: MembersWriter
) -> Response:
    """Forget a device: push notifications no longer go to it."""
    await service.delete_device(session, principal, member_id, device_id)
    return Response(status_code=204)


# ---------------------------------------------------------------- suppressions


@router.get("/notification-suppressions")
async def list_suppressions(
    session: DbSession,
    principal: NotificationsReader,
    page: Annotated[PageParams, Depends(page_params)],
    channel: ChannelFilter = None,
) -> Page[SuppressionOut]:
    """Addresses nothing is sent to: bounced, dropped, reported spam, unsubscribed at the
    provider, or added by staff. Newest first. Installation-wide: not for a key bound to
    an organisation (they hold every organisation's addresses)."""
    rows = await service.list_suppressions(
        session, principal, channel=channel, after_id=page.after_id, limit=page.limit
    )
    items, pagination = build_page(rows, page.limit)
    return Page(data=[service.suppression_out(s) for s in items], pagination=pagination)


@router.post("/notification-suppressions", status_code=201)
async def add_suppression(
    payload: SuppressionIn, session: DbSession, principal: NotificationsWriter
) -> SuppressionOut:
    """Stop sending to an address on a channel (an existing entry is returned as it is)."""
    return service.suppression_out(await service.add_suppression(session, principal, payload))


@router.delete("/notification-suppressions/{suppression_id}", status_code=204)
async def delete_suppression(
    suppression_id: IdPath, session: DbSession, principal: NotificationsWriter
) -> Response:
    """Send to the address again."""
    await service.delete_suppression(session, principal, suppression_id)
    return Response(status_code=204)


# ---------------------------------------------------------------- unsubscribe


class Unsubscribed(BaseModel):
    unsubscribed: bool
    channel: str


def _secret(request: Request) -> str:
    secret: str = request.app.state.settings.resolved_secret_key
    return secret


# The page is HTML; its errors are the usual JSON (as ERROR_RESPONSES documents them).
@public.get("/unsubscribe/{token}", response_class=HTMLResponse, responses=ERROR_RESPONSES)
async def unsubscribe_page(token: str, request: Request) -> HTMLResponse:
    """The page an unsubscribe link opens: a button that confirms (a GET changes nothing,
    so mail scanners following links unsubscribe no one)."""
    service.read_unsubscribe_token(_secret(request), _checked_token(token))
    escaped = html.escape(token, quote=True)
    return HTMLResponse(
        "<!doctype html><html><head><meta charset='utf-8'><title>Unsubscribe</title></head>"
        "<body><form method='post' action='" + escaped + "'>"
        "<p>Stop receiving these messages?</p><button type='submit'>Unsubscribe</button>"
        "</form></body></html>"
    )


@public.post("/unsubscribe/{token}", responses=ERROR_RESPONSES)
async def unsubscribe(token: str, request: Request) -> Unsubscribed:
    """One-click unsubscribe (RFC 8058: `List-Unsubscribe=One-Click` posted here): turns
    off the member's marketing messages on the link's channel."""
    db: Database = request.app.state.db
    async with db.transaction(short=True) as session:
        channel = await service.unsubscribe(
            session, _secret(request), _checked_token(token), utcnow()
        )
    return Unsubscribed(unsubscribed=True, channel=channel)


def _checked_token(token: str) -> str:
    if (
        not 3 <= len(token) <= 502
        or token.count(".") != 1
        or not all((c.isascii() and c.isalnum()) or c in "-_." for c in token)
    ):
        raise ValidationFailed(
            "This unsubscribe link is not valid.", code="UNSUBSCRIBE_LINK_INVALID"
        )
    return token
