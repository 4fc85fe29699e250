"""Finding an activity's member by the key it was sent with: an external id first, then an
email, among the members of the activity's organisation and its chapters (every member for
an activity without one). A key that fits two members (the same email in two chapters)
matches neither: the activity waits, unmatched, until staff name the member.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.activities.models import Activity, MatchedBy
from memberhub.activities.repository import ActivityRepository
from memberhub.auth.principal import Principal
from memberhub.kit.errors import ValidationFailed
from memberhub.members.models import Member
from memberhub.organisations.repository import OrganisationRepository


@dataclass(frozen=True)
class MemberKey:
    email_normalized: str | None
    external_key: str | None  # SYSTEM:ID

    @classmethod
    def of(cls, activity: Activity) -> MemberKey:
        return cls(activity.email_normalized, activity.external_key)


async def scope_organisations(
    session: AsyncSession, organisation_id: int | None, principal: Principal | None = None
) -> frozenset[int] | None:
    """The organisations whose members an activity of `organisation_id` may match: it and
    its chapters; None (no restriction) for an activity without an organisation."""
    if organisation_id is None:
        return None
    if (
        principal is not None
        and principal.organisation_id == organisation_id
        and principal.visible_organisation_ids is not None
    ):
        return principal.visible_organisation_ids  # the key's view is exactly its subtree
    return await OrganisationRepository(session).subtree_ids(organisation_id)


async def find_member(
    session: AsyncSession, key: MemberKey, organisations: frozenset[int] | None
) -> tuple[Member | None, str | None]:
    """The one member the key fits within `organisations`, and how it was found."""
    repo = ActivityRepository(session)
    if key.external_key is not None:
        system, _, value = key.external_key.partition(":")
        found = await repo.members_by_external_id(system, value, organisations)
        if len(found) == 1:
            return found[0], MatchedBy.EXTERNAL_ID
    if key.email_normalized is not None:
        found = await repo.members_by_email(key.email_normalized, organisations)
        if len(found) == 1:
            return found[0], MatchedBy.EMAIL
    return None, None


async def require_within(
    session: AsyncSession, member: Member, organisation_id: int | None
) -> None:
    """A member named for an activity of an organisation belongs to it or its chapters."""
    if organisation_id is None or member.organisation_id == organisation_id:
        return
    organisations = await OrganisationRepository(session).subtree_ids(organisation_id)
    if member.organisation_id not in organisations:
        raise ValidationFailed(
            f"Member {member.public_id} is not in the activity's organisation.",
            code="MEMBER_OUTSIDE_ORGANISATION",
            details={"member_id": member.public_id},
        )
