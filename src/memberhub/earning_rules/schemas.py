from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    TypeAdapter,
    model_validator,
)

from memberhub.kit.types import Input, LongText, PatchInput, ShortText
from memberhub.memberships.schemas import Currency

# Every effect credits a bounded number of points per activity.
MAX_EFFECT_POINTS = 10**9
MAX_AMOUNT = 2**53 - 1
MAX_PRIORITY = 1_000_000
MAX_CAP_AWARDS = 10**9
MAX_CAP_POINTS = 10**12

RuleName = Annotated[ShortText, StringConstraints(min_length=1)]
EffectPoints = Annotated[int, Field(ge=1, le=MAX_EFFECT_POINTS)]
Period = Literal["day", "week", "month", "year", "all_time"]


class FixedPoints(Input):
    """The same points for every activity the rule applies to."""

    type: Literal["fixed_points"]
    points: EffectPoints


class PointsPerAmount(Input):
    """`points` for every whole `per_amount` minor units of the activity's `amount` in
    `currency` (rounded down), at most `max_points` per activity. An activity without an
    amount, or in another currency, gets nothing from it."""

    type: Literal["points_per_amount"]
    points: EffectPoints
    per_amount: int = Field(ge=1, le=MAX_AMOUNT, description="Minor units.")
    currency: Currency
    max_points: EffectPoints | None = Field(
        default=None, description="Required: the most one activity earns from this rule."
    )


class Multiplier(Input):
    """More of what the rules evaluated before this one credited for the same activity:
    `percent` 200 doubles it (adds as much again), at most `max_points`."""

    type: Literal["multiplier"]
    percent: int = Field(gt=100, le=1000)
    max_points: EffectPoints | None = Field(
        default=None, description="Required: the most one activity earns from this rule."
    )


class NthActivityBonus(Input):
    """`points` for the member's `nth` activity of the activity's type in the `period`
    (the program's time zone) that holds the activity; with `repeat`, for every nth."""

    type: Literal["nth_activity_bonus"]
    points: EffectPoints
    nth: int = Field(ge=1, le=100_000)
    period: Period
    repeat: bool = False


class ExtendExpiry(Input):
    """Move the expiry of all the member's active and pending points. `renew` (the default)
    gives them the expiry points earned at the activity's time would get (the program's
    policy, or `days` after the activity's day), never an earlier one; `add` moves each
    batch's expiry `days` later."""

    type: Literal["extend_expiry"]
    mode: Literal["renew", "add"] = "renew"
    days: int | None = Field(default=None, ge=1, le=3660)


def _effect_type(value: Any) -> str | None:
    if isinstance(value, dict):
        kind = value.get("type")
        return kind if isinstance(kind, str) else None
    return getattr(value, "type", None)


# Told apart by `type` (a callable discriminator: `Input` checks every field's JSON type
# before validation, which pydantic's field discriminators do not allow).
Effect = Annotated[
    Annotated[FixedPoints, Tag("fixed_points")]
    | Annotated[PointsPerAmount, Tag("points_per_amount")]
    | Annotated[Multiplier, Tag("multiplier")]
    | Annotated[NthActivityBonus, Tag("nth_activity_bonus")]
    | Annotated[ExtendExpiry, Tag("extend_expiry")],
    Discriminator(
        _effect_type,
        custom_error_type="effect_type",
        custom_error_message="type must be fixed_points, points_per_amount, multiplier, "
        "nth_activity_bonus or extend_expiry",
    ),
]
EFFECT: TypeAdapter[Effect] = TypeAdapter(Effect)


class CapLimit(Input):
    awards: int | None = Field(
        default=None, ge=1, le=MAX_CAP_AWARDS, description="Times the rule may apply."
    )
    points: int | None = Field(
        default=None, ge=1, le=MAX_CAP_POINTS, description="Points the rule may credit."
    )

    @model_validator(mode="after")
    def _something(self) -> Self:
        if self.awards is None and self.points is None:
            raise ValueError("a cap limits awards, points or both")
        return self


class Caps(Input):
    """Limits on what the rule does. Per member per day or month, counted by the day or
    month (in the program's time zone) the activities occurred in; `overall` for all
    members together."""

    per_member_per_day: CapLimit | None = None
    per_member_per_month: CapLimit | None = None
    overall: CapLimit | None = None


_CONDITIONS_EXAMPLE: Any = {
    "all": [
        {"field": "activity.type", "op": "eq", "value": "booking.completed"},
        {"field": "member.tier", "op": "in", "value": ["gold", "platinum"]},
    ]
}
Conditions = Annotated[
    dict[str, Any],
    Field(
        description="A condition tree (see the README: `all`/`any`/`not` nodes and "
        "`{field, op, value}` comparisons); `{}` holds for every activity.",
        json_schema_extra={"examples": [_CONDITIONS_EXAMPLE]},
    ),
]

_EXAMPLE: Any = {
    "name": "Bookings earn 1 point per 1 MYR",
    "priority": 10,
    "conditions": {"field": "activity.type", "op": "eq", "value": "booking.completed"},
    "effect": {
        "type": "points_per_amount",
        "points": 1,
        "per_amount": 100,
        "currency": "MYR",
        "max_points": 5000,
    },
    "caps": {"per_member_per_day": {"awards": 3}},
}


class RuleCreate(Input):
    model_config = ConfigDict(json_schema_extra={"examples": [_EXAMPLE]})

    name: RuleName
    description: LongText | None = None
    active: bool = True
    priority: int = Field(
        default=0, ge=0, le=MAX_PRIORITY, description="Higher first; ties in creation order."
    )
    stop_processing: bool = Field(
        default=False,
        description="When this rule's conditions hold, rules after it are not evaluated.",
    )
    conditions: Conditions = Field(default_factory=dict)
    effect: Effect
    caps: Caps = Field(default_factory=Caps)


class RulePatch(PatchInput):
    """Fields to change; any change saves a new version. `conditions` or `caps` null
    removes them (the rule then holds for every activity, or is not capped)."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"priority": 20, "caps": {"overall": {"points": 10000}}}]}
    )

    not_nullable = ("name", "active", "priority", "stop_processing", "effect")

    name: RuleName | None = None
    description: LongText | None = None
    active: bool | None = None
    priority: int | None = Field(default=None, ge=0, le=MAX_PRIORITY)
    stop_processing: bool | None = None
    conditions: Conditions | None = None
    effect: Effect | None = None
    caps: Caps | None = None


class RuleOut(BaseModel):
    id: str
    name: str
    description: str | None
    active: bool
    archived_at: datetime | None
    priority: int
    stop_processing: bool
    conditions: dict[str, Any]
    effect: dict[str, Any]
    caps: dict[str, Any]
    version: int
    created_at: datetime
    updated_at: datetime


class RuleVersionOut(BaseModel):
    rule_id: str
    version: int
    definition: dict[str, Any] = Field(description="The rule as this version saved it.")
    actor: str
    created_at: datetime


class SimulatedRule(BaseModel):
    rule_id: str
    rule_version: int
    name: str
    effect: str
    points: int = Field(description="What the rule would credit, after its caps.")
    computed_points: int = Field(description="What its effect gives before caps.")
    capped_by: str | None = Field(description="The cap that cut the points, if one did.")
    extended_batches: int = Field(description="Batches whose expiry would move.")


class SimulationOut(BaseModel):
    member_id: str | None = Field(description="The member the activity matches; null if none.")
    matched_by: str | None
    replay_of: str | None = Field(
        description="An activity with this source id is recorded already: recording this "
        "one would return it and credit nothing."
    )
    rules: list[SimulatedRule] = Field(
        description="Rules whose conditions hold, in evaluation order (up to a rule that "
        "stops processing)."
    )
    total_points: int
