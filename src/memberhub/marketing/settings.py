"""What a marketing-list integration keeps in step: its part of the integration's config.

A provider's config model inherits `MarketingSyncSettings` (as CRM providers carry
`SyncSettings` and search indices `SearchSyncSettings`), so the sync reads the audience,
its merge fields, segments and journey rules without knowing the vendor. Segments and
rules are data validated here, never code: a segment is a conjunction of conditions on
member columns, a rule one of two known triggers.
"""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import Field, StringConstraints, model_validator

from memberhub.kit.types import Input

MergeTag = Annotated[
    str, StringConstraints(strip_whitespace=True, pattern=r"^[A-Z][A-Z0-9_]{0,9}$")
]
Key = Annotated[
    str, StringConstraints(strip_whitespace=True, pattern=r"^[a-z0-9][a-z0-9_-]{0,59}$")
]
VendorId = Annotated[str, StringConstraints(strip_whitespace=True, pattern=r"^[A-Za-z0-9]{1,50}$")]
TierCode = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=50)]
TagText = Annotated[str, StringConstraints(max_length=40, pattern=r"^[^\x00-\x1f]*$")]
Status = Literal["pending", "active", "grace", "lapsed", "suspended", "cancelled"]


class MergeFields(Input):
    """The audience's merge field tag for each member value; null sends none."""

    first_name: MergeTag | None = "FNAME"
    last_name: MergeTag | None = "LNAME"
    tier: MergeTag | None = "TIER"
    points_balance: MergeTag | None = "POINTS"
    status: MergeTag | None = "STATUS"
    term_end: MergeTag | None = Field(
        default="TERMEND", description="A date merge field: the current term's end, YYYY-MM-DD."
    )

    @model_validator(mode="after")
    def _distinct(self) -> Self:
        tags = [t for t in self.model_dump().values() if t]
        if len(tags) != len(set(tags)):
            raise ValueError("each member value needs its own merge field tag")
        return self


class SegmentConditions(Input):
    """All conditions given must hold; none given means every subscribed member."""

    tiers: list[TierCode] | None = Field(default=None, min_length=1, max_length=20)
    statuses: list[Status] | None = Field(default=None, min_length=1, max_length=6)
    points_min: int | None = Field(default=None, ge=0, description="Balance at least this.")
    points_max: int | None = Field(default=None, ge=0, description="Balance at most this.")
    inactive_days: int | None = Field(
        default=None,
        ge=1,
        le=3650,
        description="No points activity for at least this many days (members who never had "
        "any count from when they joined).",
    )
    organisation_ids: (
        list[Annotated[str, StringConstraints(pattern=r"^org_[A-Za-z0-9]{1,40}$")]] | None
    ) = Field(
        default=None,
        min_length=1,
        max_length=50,
        description="Members of these organisations (their chapters included).",
    )

    @model_validator(mode="after")
    def _range(self) -> Self:
        if (
            self.points_min is not None
            and self.points_max is not None
            and self.points_min > self.points_max
        ):
            raise ValueError("points_min must not exceed points_max")
        return self


class SegmentDefinition(Input):
    key: Key = Field(description="Stable id of the segment within the integration.")
    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
    conditions: SegmentConditions = Field(default_factory=SegmentConditions)


class JourneyRule(Input):
    """Starts a Customer Journey step for a member, once per member and rule.

    `tier_reached`: the member's tier changed to `tier` from a lower one (or none).
    `points_expiring`: a points-expiring notice, when the member's points expiring within
    `within_days` add up to at least `min_points`.
    """

    key: Key
    trigger: Literal["tier_reached", "points_expiring"]
    tier: TierCode | None = None
    min_points: int = Field(default=500, ge=1)
    within_days: int = Field(default=30, ge=1, le=365)
    journey_id: VendorId
    step_id: VendorId

    @model_validator(mode="after")
    def _trigger_fields(self) -> Self:
        if self.trigger == "tier_reached" and not self.tier:
            raise ValueError("a tier_reached rule names its tier")
        return self


class MarketingSyncSettings(Input):
    list_id: VendorId = Field(description="The audience (list) members are kept in.")
    merge_fields: MergeFields = Field(default_factory=MergeFields)
    tier_tag_prefix: TagText = Field(
        default="tier:", description="Members are tagged with their tier after this prefix."
    )
    status_tag_prefix: TagText = Field(
        default="status:", description="And with their membership status after this one."
    )
    full_sync_hours: int = Field(
        default=24,
        ge=0,
        le=24 * 30,
        description="A full comparison of every member this often (0: only when asked); "
        "changes are sent one worker interval after they happen either way.",
    )
    segment_minutes: int = Field(
        default=60,
        ge=1,
        le=24 * 60,
        description="How often segments are recomputed (they depend on time: inactivity).",
    )
    segments: list[SegmentDefinition] = Field(default_factory=list, max_length=50)
    journeys: list[JourneyRule] = Field(default_factory=list, max_length=50)

    @model_validator(mode="after")
    def _unique_keys(self) -> Self:
        for name, items in (("segments", self.segments), ("journeys", self.journeys)):
            keys = [item.key for item in items]
            if len(keys) != len(set(keys)):
                raise ValueError(f"{name} need distinct keys")
        names = [s.name for s in self.segments]
        if len(names) != len(set(names)):
            raise ValueError("segments need distinct names")
        return self
