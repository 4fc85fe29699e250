"""What a search-index integration keeps in step: its part of the integration's config.

A provider's config model inherits `SearchSyncSettings` (as CRM providers carry
`SyncSettings`), so the sync reads index names and member fields without knowing the vendor.
"""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import Field, StringConstraints, field_validator, model_validator

from memberhub.kit.types import Input

IndexName = Annotated[
    str, StringConstraints(strip_whitespace=True, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
]
# The member fields a directory may show. Nothing else about a member is ever indexed.
MemberField = Literal[
    "first_name", "last_name", "email", "phone", "tier", "status", "member_since", "organisation_id"
]
# The consents a member gives (`members.consent`); the directory names the one that lets
# a member be listed, as there is no consent for a directory as such.
DirectoryConsent = Literal["email", "sms", "analytics", "profiling"]


def _default_member_fields() -> list[MemberField]:
    return ["first_name", "last_name", "tier"]


class MemberDirectory(Input):
    index: IndexName = Field(description="The index members are listed in.")
    consent: DirectoryConsent = Field(
        description="The member consent that lets a member be listed: members without it are "
        "never indexed, and are removed from the index when they withdraw it."
    )
    fields: list[MemberField] = Field(
        default_factory=_default_member_fields,
        min_length=1,
        max_length=8,
        description="The member fields a record carries (beside its objectID, the member id).",
    )

    @field_validator("fields")
    @classmethod
    def _distinct(cls, fields: list[str]) -> list[str]:
        return list(dict.fromkeys(fields))


class SearchSyncSettings(Input):
    rewards_index: IndexName | None = Field(
        default="memberhub_rewards",
        description="The index of the rewards catalog (active rewards); null keeps none.",
    )
    member_directory: MemberDirectory | None = Field(
        default=None, description="A directory of consenting members; off unless set."
    )

    @model_validator(mode="after")
    def _distinct_indices(self) -> Self:
        if self.member_directory is not None and self.member_directory.index == self.rewards_index:
            raise ValueError("member_directory.index must differ from rewards_index")
        return self

    def indices(self) -> list[str]:
        names = [self.rewards_index] if self.rewards_index else []
        if self.member_directory is not None:
            names.append(self.member_directory.index)
        return names
