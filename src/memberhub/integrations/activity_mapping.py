"""Activities from generic inbound events: a mapping, saved in a signed-webhook integration's
`config.activity`, that reads the sender's JSON with RFC 6901 JSON pointers and builds the
`ActivityIn` it stands for.

The mapping is checked when it is saved (pointer syntax, a type and a source id, at least
one member key, attribute names the activities schema knows); the values it points at are
checked when an event arrives, by the same `ActivityIn` validation an API call gets
(`integrations.mapped_activities` records it).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from memberhub.activities.schemas import ActivityAttributes, ActivityIn, ActivityType
from memberhub.kit.errors import ValidationFailed
from memberhub.kit.types import Input

MAX_ATTRIBUTES = 30
CUSTOM_PREFIX = "custom."
# Seconds since 1970 up to here; a larger number is taken as milliseconds.
LARGEST_SECONDS = 100_000_000_000

JsonPointer = Annotated[
    str,
    StringConstraints(max_length=500, pattern=r"^(/([^~/]|~[01])*)*$"),
    Field(description="An RFC 6901 JSON pointer into the event's body, e.g. `/data/email`."),
]
ExternalSystem = Annotated[
    str,
    StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,39}$"),
    Field(description="The `external_ids` system the external id pointer's value belongs to."),
]
KNOWN_ATTRIBUTES = frozenset(name for name in ActivityAttributes.model_fields if name != "custom")
CUSTOM_NAME = re.compile(r"^custom\.[A-Za-z_][A-Za-z0-9_]{0,63}$")


def _known_attribute(name: str) -> str:
    if name in KNOWN_ATTRIBUTES or CUSTOM_NAME.match(name):
        return name
    raise ValueError(
        f"{name!r} is not an activity attribute: use one of {', '.join(sorted(KNOWN_ATTRIBUTES))}"
        ", or custom.NAME for your own"
    )


AttributeName = Annotated[
    str,
    AfterValidator(_known_attribute),
    Field(
        description="An activity attribute (`amount`, `currency`, `event_id`, …) or "
        "`custom.NAME` for one of your own."
    ),
]


class ActivityMapping(Input):
    """How an inbound event's JSON becomes an activity. Pointers that find nothing (or
    `null`) leave optional parts out; a missing type, source id or member key fails the
    event."""

    type: JsonPointer | None = Field(default=None, description="Where the activity type is.")
    fixed_type: ActivityType | None = Field(
        default=None, description="The activity type of every event, instead of `type`."
    )
    source_id: JsonPointer = Field(
        description="The sender's id for what happened: a repeat of it is a replay."
    )
    occurred_at: JsonPointer | None = Field(
        default=None,
        description="ISO 8601, or seconds (or milliseconds) since 1970. Default: when the "
        "event arrived.",
    )
    member_id: JsonPointer | None = None
    email: JsonPointer | None = None
    external_id: JsonPointer | None = None
    external_system: ExternalSystem | None = Field(
        default=None,
        description="Prefixes the external id's value as `SYSTEM:ID`; without it the value "
        "must be `SYSTEM:ID` already.",
    )
    attributes: dict[AttributeName, JsonPointer] = Field(
        default_factory=dict,
        max_length=MAX_ATTRIBUTES,
        description="Attribute name → pointer.",
    )

    @model_validator(mode="after")
    def _complete(self) -> Self:
        if (self.type is None) == (self.fixed_type is None):
            raise ValueError("give type (a pointer) or fixed_type, not both")
        if self.member_id is None and self.email is None and self.external_id is None:
            raise ValueError("give at least one member key: member_id, email or external_id")
        if self.external_system is not None and self.external_id is None:
            raise ValueError("external_system goes with an external_id pointer")
        return self


class MappingProblem(BaseModel):
    field: str = Field(description="The activity's field, e.g. `attributes.amount`.")
    pointer: str | None = Field(description="The mapping's pointer for it, when one was read.")
    message: str


class MappingTest(Input):
    payload: dict[str, Any] | list[Any] = Field(description="A sample event body.")
    mapping: ActivityMapping | None = Field(
        default=None, description="A mapping to try instead of the saved one."
    )


class MappingTestOut(BaseModel):
    activity: ActivityIn | None = Field(description="What the payload would record; nothing is.")
    problems: list[MappingProblem]


class MappingFailed(ValidationFailed):
    code = "ACTIVITY_MAPPING_FAILED"


# ---------------------------------------------------------------- pointers


MISSING = object()


def resolve(document: Any, pointer: str) -> Any:
    """The value `pointer` names in `document`, or `MISSING` (RFC 6901)."""
    if pointer == "":
        return document
    value = document
    for token in pointer[1:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(value, dict):
            if token not in value:
                return MISSING
            value = value[token]
        elif isinstance(value, list):
            if not token.isdigit() or (token != "0" and token.startswith("0")):
                return MISSING
            index = int(token)
            if index >= len(value):
                return MISSING
            value = value[index]
        else:
            return MISSING
    return value


# ---------------------------------------------------------------- building


def _as_text(value: Any) -> Any:
    # Ids often come as numbers; the activity keeps them as text. Anything else is left for
    # the schema to refuse with its own message.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def _as_time(value: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = value / 1000 if abs(value) >= LARGEST_SECONDS else value
        try:
            return datetime.fromtimestamp(seconds, UTC).isoformat()
        except (OverflowError, OSError, ValueError):
            return value
    return value


def build_activity(
    mapping: ActivityMapping, payload: Any, *, source: str, received_at: datetime
) -> tuple[ActivityIn | None, list[MappingProblem]]:
    """The activity `payload` stands for under `mapping`, or the problems that prevent it."""
    problems: list[MappingProblem] = []
    body: dict[str, Any] = {"source": source}
    pointers: dict[str, str] = {}

    def read(field: str, pointer: str | None) -> Any:
        if pointer is None:
            return MISSING
        pointers[field] = pointer
        value = resolve(payload, pointer)
        return MISSING if value is None else value

    if mapping.fixed_type is not None:
        body["type"] = mapping.fixed_type
    else:
        body["type"] = read("type", mapping.type)
    body["source_id"] = _as_text(read("source_id", mapping.source_id))
    occurred_at = read("occurred_at", mapping.occurred_at)
    body["occurred_at"] = received_at.isoformat() if occurred_at is MISSING else occurred_at
    body["occurred_at"] = _as_time(body["occurred_at"])
    body["member_id"] = read("member_id", mapping.member_id)
    body["email"] = read("email", mapping.email)
    external_id = _as_text(read("external_id", mapping.external_id))
    if external_id is not MISSING and mapping.external_system is not None:
        external_id = f"{mapping.external_system}:{external_id}"
    body["external_id"] = external_id
    attributes: dict[str, Any] = {}
    for name, pointer in mapping.attributes.items():
        value = read(f"attributes.{name}", pointer)
        if value is MISSING:
            continue
        if name.startswith(CUSTOM_PREFIX):
            attributes.setdefault("custom", {})[name.removeprefix(CUSTOM_PREFIX)] = value
        else:
            attributes[name] = value
    body["attributes"] = attributes

    for field in ("type", "source_id"):
        if body[field] is MISSING:
            problems.append(
                MappingProblem(
                    field=field,
                    pointer=pointers.get(field),
                    message=f"the payload has no value at {pointers.get(field)!r}",
                )
            )
    keys = ("member_id", "email", "external_id")
    if all(body[key] is MISSING for key in keys):
        named = ", ".join(f"{key} {pointers[key]!r}" for key in keys if key in pointers)
        problems.append(
            MappingProblem(
                field="member",
                pointer=None,
                message=f"the payload has no member key: nothing at {named}",
            )
        )
    if problems:
        return None, problems
    try:
        activity = ActivityIn.model_validate(
            {name: value for name, value in body.items() if value is not MISSING}
        )
    except ValidationError as exc:
        for error in exc.errors(include_url=False, include_input=False):
            location = [str(part) for part in error["loc"]]
            field = ".".join(location) or "activity"
            where = pointers.get(field)
            if where is None and location[:1] == ["attributes"] and len(location) > 1:
                if location[1] == "custom" and len(location) > 2:
                    where = pointers.get(f"attributes.custom.{location[2]}")
                else:
                    where = pointers.get(f"attributes.{location[1]}")
            problems.append(MappingProblem(field=field, pointer=where, message=error["msg"]))
        return None, problems
    return activity, []
