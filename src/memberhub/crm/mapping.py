"""Field mappings: which member and lead fields go to which CRM properties, and how.

A CRM integration's `config.sync` holds them, one list per kind of record:

    "sync": {
      "members": {"object": "contacts", "fields": [
        {"source": "first_name", "target": "firstname"},
        {"source": "tier", "target": "memberhub_tier"},
        {"source": "custom.plan_interest", "target": "plan_interest", "direction": "pull"}
      ]},
      "leads": {"object": "contacts", "fields": [
        {"source": "status", "target": "hs_lead_status",
         "transform": {"new": "NEW", "contacted": "ATTEMPTED_TO_CONTACT"}}
      ]},
      "conflict_policy": "memberhub_wins"
    }

A source is a field of the record, a computed value (tier, points balance, lifetime
points, member since, last activity, tags) or `custom.<key>` for a custom field. A
transform maps our values to the CRM's and, read backwards, the CRM's to ours. Computed
values are only sent; editable fields go both ways unless `direction` says otherwise.
Everything is checked when the integration is saved.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from datetime import date, datetime
from typing import Any, Literal

from pydantic import Field, model_validator

from memberhub.kit.types import Input

Direction = Literal["push", "pull", "both"]
Policy = Literal["memberhub_wins", "crm_wins", "newest", "manual"]
EntityType = Literal["members", "leads"]

ENTITY_TYPES: tuple[EntityType, ...] = ("members", "leads")

_CUSTOM_KEY = re.compile(r"custom\.[A-Za-z0-9_\-]{1,64}")

# Fields a CRM may change (pull), per kind of record; the rest are sent only.
EDITABLE: dict[EntityType, frozenset[str]] = {
    "members": frozenset({"email", "first_name", "last_name", "phone"}),
    "leads": frozenset(
        {"email", "first_name", "last_name", "phone", "status", "source", "agent_id"}
    ),
}
READ_ONLY: dict[EntityType, frozenset[str]] = {
    "members": frozenset(
        {
            "id",
            "status",
            "full_name",
            "tier",
            "points_balance",
            "lifetime_points",
            "member_since",
            "last_activity",
            "tags",
        }
    ),
    "leads": frozenset({"id", "full_name", "lost_reason", "member_id", "created_at"}),
}


def known_source(entity: EntityType, source: str) -> bool:
    return (
        source in EDITABLE[entity]
        or source in READ_ONLY[entity]
        or _CUSTOM_KEY.fullmatch(source) is not None
    )


def editable(entity: EntityType, source: str) -> bool:
    return source in EDITABLE[entity] or _CUSTOM_KEY.fullmatch(source) is not None


Scalar = str | int | float | bool | None


class FieldMap(Input):
    source: str = Field(min_length=1, max_length=80, description="The memberhub field.")
    target: str = Field(min_length=1, max_length=100, description="The CRM property.")
    direction: Direction | None = Field(
        default=None,
        description="push: memberhub → CRM only; pull: CRM → memberhub only; both. Default: "
        "both for editable fields, push for computed ones.",
    )
    transform: dict[str, str] | None = Field(
        default=None,
        max_length=100,
        description="Our value → the CRM's (e.g. lead status new → Open); read backwards on "
        "pull, so two of our values may share a CRM value only on push-only fields.",
    )
    default: str | None = Field(
        default=None,
        max_length=255,
        description="Sent when the field is empty (a CRM may require a value, as Salesforce "
        "requires a lead's Company).",
    )
    conflict: Policy | None = Field(
        default=None, description="This field's conflict policy; default: the integration's."
    )


class ObjectSync(Input):
    enabled: bool = True
    object: str = Field(min_length=1, max_length=100, description="The CRM object written.")
    fields: list[FieldMap] = Field(min_length=1, max_length=200)


class SyncSettings(Input):
    """How a CRM integration keeps members and leads in step (see `memberhub.crm`)."""

    members: ObjectSync | None = None
    leads: ObjectSync | None = None
    conflict_policy: Policy = "memberhub_wins"
    push: bool = Field(default=True, description="Send changes to the CRM.")
    pull: bool = Field(default=True, description="Take changes from the CRM.")
    pull_creates_leads: bool = Field(
        default=True, description="A CRM record that matches nothing here becomes a lead."
    )
    coalesce_seconds: float = Field(
        default=5.0,
        ge=0,
        le=3600,
        description="Changes to one record within this quiet period become one write.",
    )
    max_delay_seconds: float = Field(
        default=60.0,
        ge=0,
        le=86400,
        description="A record changing all the time is still sent at least this often.",
    )
    pull_interval_seconds: float = Field(default=300.0, ge=5, le=86400)
    pull_lookback_seconds: float = Field(
        default=300.0,
        ge=0,
        le=86400,
        description="Each pull starts this long before the last change seen, for records the "
        "CRM's search made visible late; what was already taken is skipped.",
    )
    full_push_interval_hours: float = Field(
        default=24.0, ge=0, le=24 * 365, description="A full push for backfills; 0: never."
    )
    echo_ttl_seconds: float = Field(
        default=3600.0,
        ge=60,
        le=7 * 86400,
        description="How long a value we wrote is recognised when the CRM sends it back.",
    )

    @model_validator(mode="after")
    def _check(self) -> SyncSettings:
        for entity in ENTITY_TYPES:
            spec = getattr(self, entity)
            if spec is None:
                continue
            problems = mapping_problems(entity, spec)
            if problems:
                raise ValueError(f"sync.{entity}: " + "; ".join(problems))
        return self

    def objects(self) -> list[tuple[EntityType, ObjectSync]]:
        return [
            (entity, spec)
            for entity in ENTITY_TYPES
            if (spec := getattr(self, entity)) is not None and spec.enabled
        ]

    def policy_for(self, field: FieldMap) -> Policy:
        return field.conflict or self.conflict_policy


def direction_of(entity: EntityType, field: FieldMap) -> Direction:
    if field.direction is not None:
        return field.direction
    return "both" if editable(entity, field.source) else "push"


def pushes(entity: EntityType, field: FieldMap) -> bool:
    return direction_of(entity, field) in ("push", "both")


def pulls(entity: EntityType, field: FieldMap) -> bool:
    return direction_of(entity, field) in ("pull", "both")


def mapping_problems(entity: EntityType, spec: ObjectSync) -> list[str]:
    problems: list[str] = []
    targets: set[str] = set()
    for index, field in enumerate(spec.fields):
        where = f"fields[{index}]"
        if not known_source(entity, field.source):
            problems.append(
                f"{where}.source {field.source!r} is not a {entity[:-1]} field; use one of "
                f"{', '.join(sorted(EDITABLE[entity] | READ_ONLY[entity]))} or custom.<key>"
            )
            continue
        direction = direction_of(entity, field)
        if direction != "push" and not editable(entity, field.source):
            problems.append(
                f"{where}: {field.source} is computed by memberhub and can only be pushed"
            )
        if field.target.lower() in targets:
            problems.append(f"{where}.target {field.target!r} is mapped twice")
        targets.add(field.target.lower())
        if field.transform is not None and direction != "push":
            crm_values = list(field.transform.values())
            if len(set(crm_values)) != len(crm_values):
                problems.append(
                    f"{where}.transform maps two values to one CRM value, so it cannot be "
                    "read backwards; make the field push-only"
                )
    if not any(f.source == "email" for f in spec.fields):
        problems.append("email must be mapped: records are matched by it")
    return problems


# ---------------------------------------------------------------- values


def json_scalar(value: Any) -> Scalar:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def comparable(value: Any) -> str:
    """Values as the two sides are compared: CRMs answer strings for most types, and an
    empty property is the same as an absent one."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def same(left: Any, right: Any) -> bool:
    return comparable(left) == comparable(right)


def outbound_value(field: FieldMap, value: Any) -> Scalar:
    """Our value as the CRM gets it."""
    value = json_scalar(value)
    if field.transform is not None and value is not None:
        value = field.transform.get(str(value), value)
    if (value is None or value == "") and field.default is not None:
        return field.default
    return value


def inbound_value(field: FieldMap, value: Any) -> Scalar:
    """The CRM's value as ours; ValueError when a transformed field has no reverse."""
    value = json_scalar(value)
    if field.transform is not None and value is not None:
        reverse = {crm: ours for ours, crm in field.transform.items()}
        if str(value) in reverse:
            return reverse[str(value)]
        if str(value) in field.transform:
            return value  # already one of our values
        raise ValueError(f"{field.target} value {value!r} has no match in the transform")
    if field.default is not None and value == field.default:
        return None  # the placeholder we send for an empty field
    return value


def like_local(value: Scalar, local: Any) -> Scalar:
    """A CRM's value (most answer strings for every type: HubSpot's checkbox is "false")
    read as the type our current value has: a bool, an integer or a number stays one. A
    string that does not read as that type stays a string (and changes the type)."""
    if not isinstance(value, str) or local is None or isinstance(local, str):
        return value
    text = value.strip()
    if isinstance(local, bool):
        lowered = text.lower()
        return True if lowered == "true" else False if lowered == "false" else value
    try:
        if isinstance(local, int):
            return int(text)
        if isinstance(local, float):
            return float(text)
    except ValueError:
        return value
    return value


def desired_properties(
    entity: EntityType, spec: ObjectSync, values: Mapping[str, Any]
) -> dict[str, Scalar]:
    """The CRM properties a record should have, from its memberhub values."""
    return {
        field.target: outbound_value(field, values.get(field.source))
        for field in spec.fields
        if pushes(entity, field)
    }


def pulled_properties(entity: EntityType, spec: ObjectSync) -> list[str]:
    return [field.target for field in spec.fields if pulls(entity, field)]


def email_target(spec: ObjectSync) -> str:
    return next(field.target for field in spec.fields if field.source == "email")


DefaultsFactory = Callable[[], SyncSettings]


def person_fields(
    email: str,
    first_name: str,
    last_name: str,
    phone: str,
    *,
    defaults: Mapping[str, str] | None = None,
) -> list[FieldMap]:
    """The fields every CRM keeps of a person, under the CRM's names; `defaults` by source."""
    targets = {"email": email, "first_name": first_name, "last_name": last_name, "phone": phone}
    return [
        FieldMap(source=source, target=target, default=(defaults or {}).get(source))
        for source, target in targets.items()
    ]


def with_defaults(value: Any, defaults: DefaultsFactory) -> Any:
    """A provider's `sync` as given, with its default mapping for members or leads where
    the given settings do not mention them (null: not synced)."""
    if not isinstance(value, Mapping):
        return value
    merged = dict(value)
    default = defaults()
    for entity in ENTITY_TYPES:
        if entity not in merged:
            spec = getattr(default, entity)
            merged[entity] = spec.model_dump() if spec is not None else None
    return merged
