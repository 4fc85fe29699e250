"""The message types: which event makes each, who receives it, and its default templates.

A message type is sent on each channel that has a template for it (an installation's
own, or the default here) and an enabled integration able to send on that channel.
Templates see `member` (member messages) or `recipient` (staff messages), `event` (the
event's data, as the event schema documents it), `program` and, in marketing email,
`unsubscribe_url`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel

from memberhub.events import catalog as events
from memberhub.notifications.models import Category, Channel


@dataclass(frozen=True)
class DefaultTemplate:
    body: str
    subject: str | None = None
    format: Literal["text", "html"] = "text"


@dataclass(frozen=True)
class MessageType:
    name: str
    audience: Literal["member", "staff"]
    category: str
    event: type[events.EventData]
    description: str
    defaults: Mapping[str, DefaultTemplate] = field(default_factory=dict)
    # Staff messages: the roles of the staff recipients (notification settings) who get it.
    staff_roles: tuple[str, ...] = ()


_GREETING = "Hello {{ member.first_name or 'there' }},\n\n"
_SIGNATURE = "\n\n{{ program.name }}"


def _member(
    name: str,
    event: type[events.EventData],
    description: str,
    subject: str,
    text: str,
    short: str | None = None,
    *,
    category: str = Category.TRANSACTIONAL,
) -> MessageType:
    defaults = {Channel.EMAIL: DefaultTemplate(subject=subject, body=_GREETING + text + _SIGNATURE)}
    if short is not None:
        defaults[Channel.SMS] = DefaultTemplate(body=short)
        defaults[Channel.PUSH] = DefaultTemplate(subject=subject, body=short)
    return MessageType(name, "member", category, event, description, defaults)


def _staff(
    name: str,
    event: type[events.EventData],
    description: str,
    subject: str,
    text: str,
    roles: tuple[str, ...],
) -> MessageType:
    body = "Hello {{ recipient.name or recipient.email }},\n\n" + text + _SIGNATURE
    defaults = {Channel.EMAIL: DefaultTemplate(subject=subject, body=body)}
    return MessageType(
        name, "staff", Category.TRANSACTIONAL, event, description, defaults, staff_roles=roles
    )


MESSAGE_TYPES: dict[str, MessageType] = {
    message.name: message
    for message in (
        _member(
            "member_welcome",
            events.MemberCreated,
            "A member was created.",
            "Welcome to {{ program.name }}",
            "Welcome! Your member id is {{ member.id }}.",
        ),
        _member(
            "membership_joined",
            events.MemberStatusChanged,
            "A member joined a plan.",
            "Your membership is active",
            "Your membership is active until {{ event.term_ends_at | date }}.",
        ),
        _member(
            "membership_renewed",
            events.MemberStatusChanged,
            "A member renewed.",
            "Your membership was renewed",
            "Thank you for renewing: your membership now runs until "
            "{{ event.term_ends_at | date }}.",
        ),
        _member(
            "membership_renewal_due",
            events.MembershipRenewalDue,
            "A member's term ends soon (`membership.renewal_due`).",
            "Your membership ends in {{ event.days_left }} days",
            "Your membership ends on {{ event.term_ends_at | date }}. Renew now to keep "
            "your benefits.",
            "Your membership ends on {{ event.term_ends_at | date }}. Renew to keep your benefits.",
            category=Category.MARKETING,
        ),
        _member(
            "membership_grace",
            events.MemberStatusChanged,
            "A member's membership entered its grace period.",
            "Your membership needs attention",
            "Your membership is in its grace period until {{ event.grace_ends_at | date }}. "
            "Renew before then to keep it.",
        ),
        _member(
            "membership_lapsed",
            events.MemberStatusChanged,
            "A member's membership lapsed.",
            "Your membership has lapsed",
            "Your membership has lapsed. You can rejoin at any time.",
        ),
        _member(
            "points_earned",
            events.PointsEarned,
            "Points were credited with `notify: true`.",
            "You earned {{ event.points }} points",
            "You earned {{ event.points }} points{% if event.reason %} ({{ event.reason }})"
            "{% endif %}. Your balance is {{ event.balance_after }} points.",
            "You earned {{ event.points }} points. Balance: {{ event.balance_after }}.",
        ),
        _member(
            "points_expiring",
            events.PointsExpiring,
            "A batch of points expires soon (one per `points.expiring` notice).",
            "{{ event.points }} points expire on {{ event.expires_at | date }}",
            "{{ event.points }} of your points expire on {{ event.expires_at | date }}, in "
            "{{ event.days_left }} days. Use them before then.",
            "{{ event.points }} points expire on {{ event.expires_at | date }}.",
            category=Category.MARKETING,
        ),
        _member(
            "points_expired",
            events.PointsExpired,
            "Points expired.",
            "{{ event.points }} points expired",
            "{{ event.points }} of your points expired. Your balance is "
            "{{ event.balance_after }} points.",
        ),
        _member(
            "tier_upgraded",
            events.MemberTierChanged,
            "A member moved up a tier.",
            "Welcome to {{ event.new_tier }}",
            "Congratulations: you are now {{ event.new_tier }}.",
            "Congratulations: you are now {{ event.new_tier }}.",
        ),
        _member(
            "tier_downgraded",
            events.MemberTierChanged,
            "A member moved down a tier (or lost their tier).",
            "Your tier changed",
            "Your tier is now {{ event.new_tier or 'none' }}.",
        ),
        _member(
            "reward_claimed",
            events.RewardClaimed,
            "A member claimed a reward.",
            "Your reward {{ event.reward_code }}",
            "You claimed {{ event.reward_code }} for {{ event.points }} points.",
            "You claimed {{ event.reward_code }} for {{ event.points }} points.",
        ),
        _staff(
            "staff_alert_raised",
            events.AlertRaised,
            "An alert was raised (incidents and disabled endpoints have their own messages).",
            "[{{ event.priority }}] {{ event.alert_type }}",
            "{{ event.message }}",
            ("manager", "admin"),
        ),
        _staff(
            "staff_approval_requested",
            events.ApprovalRequested,
            "A points operation awaits a manager's approval.",
            "Approval requested: {{ event.operation }} of {{ event.points }} points",
            "{{ event.requested_by }} asks to {{ event.operation }} {{ event.points }} points "
            "of {{ event.member_id }}: {{ event.reason }}. Approval {{ event.approval_id }}.",
            ("manager", "admin"),
        ),
        _staff(
            "staff_integration_incident",
            events.IntegrationIncidentOpened,
            "An integration stopped working.",
            "Integration {{ event.name }} is failing",
            "{{ event.name }} ({{ event.provider }}) is failing: {{ event.reason }}",
            ("admin",),
        ),
        _staff(
            "staff_webhook_disabled",
            events.WebhookEndpointDisabled,
            "A webhook endpoint was disabled.",
            "Webhook endpoint disabled",
            "The endpoint {{ event.url }} was disabled: {{ event.reason }}",
            ("admin",),
        ),
    )
}

# Alerts whose cause has a staff message of its own.
ALERTS_WITH_OWN_MESSAGE = frozenset({"INTEGRATION_INCIDENT", "WEBHOOK_ENDPOINT_DISABLED"})
EVENT_TYPES = frozenset(message.event.event_type for message in MESSAGE_TYPES.values())


def message_types_of(event_type: str, data: Mapping[str, Any]) -> list[str]:
    """The message types an event makes, tier changes aside (their direction needs the
    tiers: `planning.py`)."""
    if event_type == "member.created":
        return ["member_welcome"]
    if event_type == "member.status.changed":
        if data.get("reason") == "join":
            return ["membership_joined"]
        if data.get("reason") == "renew":
            return ["membership_renewed"]
        if data.get("to_status") == "grace":
            return ["membership_grace"]
        if data.get("to_status") == "lapsed":
            return ["membership_lapsed"]
        return []
    if event_type == "membership.renewal_due":
        return ["membership_renewal_due"]
    if event_type == "points.earned":
        return ["points_earned"] if data.get("notify") is True else []
    if event_type == "points.expiring":
        return ["points_expiring"]
    if event_type == "points.expired":
        return ["points_expired"]
    if event_type == "reward.claimed":
        return ["reward_claimed"]
    if event_type == "alert.raised":
        return [] if data.get("alert_type") in ALERTS_WITH_OWN_MESSAGE else ["staff_alert_raised"]
    if event_type == "approval.requested":
        return ["staff_approval_requested"]
    if event_type == "integration.incident.opened":
        return ["staff_integration_incident"]
    if event_type == "webhook.endpoint.disabled":
        return ["staff_webhook_disabled"]
    return []


# ---------------------------------------------------------------- sample data


_SAMPLE_TIME = datetime(2027, 1, 31, 9, 30, tzinfo=UTC)


def _sample_value(annotation: Any, name: str) -> Any:
    origin = get_origin(annotation)
    if origin is not None and type(None) in get_args(annotation):
        inner = [arg for arg in get_args(annotation) if arg is not type(None)]
        return _sample_value(inner[0], name) if inner else None
    if annotation is bool:
        return True
    if annotation is int:
        return 120
    if annotation is float:
        return 1.5
    if annotation is datetime:
        return _SAMPLE_TIME
    if origin is list or annotation is list:
        return []
    if origin is dict or annotation is dict:
        return {}
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {
            field_name: _sample_value(info.annotation, field_name)
            for field_name, info in annotation.model_fields.items()
        }
    if name.endswith("_id") or name == "id":
        return f"{name.removesuffix('_id') or 'obj'}_example"
    return name.replace("_", " ")


def sample_event(message: MessageType) -> dict[str, Any]:
    """Event data of the message type's event, every field filled, for validating and
    previewing templates (as JSON, as the event feed has it)."""
    model = message.event
    values = {
        field_name: _sample_value(info.annotation, field_name)
        for field_name, info in model.model_fields.items()
    }
    if message.name == "tier_upgraded":
        values.update(previous_tier="SILVER", new_tier="GOLD")
    try:
        return model.model_validate(values).model_dump(mode="json")
    except ValueError:
        return {key: _jsonable(value) for key, value in values.items()}


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    return value


def variables(message: MessageType) -> list[str]:
    """The variables a template of this message type may use, as dotted names."""
    names = ["program.name", "program.currency"]
    if message.audience == "member":
        names += [f"member.{name}" for name in MEMBER_VARIABLES]
        if message.category == Category.MARKETING:
            names.append("unsubscribe_url")
    else:
        names += ["recipient.email", "recipient.name", "recipient.roles"]
    names += [f"event.{name}" for name in message.event.model_fields]
    return names


MEMBER_VARIABLES = (
    "id",
    "first_name",
    "last_name",
    "email",
    "phone",
    "tier",
    "status",
    "member_since",
    "term_ends_at",
)
