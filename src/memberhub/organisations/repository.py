from __future__ import annotations

from collections.abc import Iterable, Sequence

from sqlalchemy import Select, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.auth.models import ApiKey
from memberhub.members.models import Member
from memberhub.memberships.models import MembershipPlan
from memberhub.organisations.models import Organisation


class OrganisationRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get_by_public_id(self, public_id: str) -> Organisation | None:
        return await self.session.scalar(
            select(Organisation).where(Organisation.public_id == public_id)
        )

    async def get_by_slug(self, slug: str) -> Organisation | None:
        return await self.session.scalar(select(Organisation).where(Organisation.slug == slug))

    async def public_ids(self, ids: set[int]) -> dict[int, str]:
        if not ids:
            return {}
        rows = await self.session.execute(
            select(Organisation.id, Organisation.public_id).where(Organisation.id.in_(ids))
        )
        return {row.id: row.public_id for row in rows}

    async def subtree_ids(self, root_id: int) -> frozenset[int]:
        """The organisation and every chapter below it, at any depth."""
        return (await self.subtrees([root_id]))[root_id]

    async def subtrees(self, root_ids: Iterable[int]) -> dict[int, frozenset[int]]:
        """`subtree_ids` of several organisations, reading the hierarchy once."""
        edges = (await self.session.execute(select(Organisation.id, Organisation.parent_id))).all()
        children: dict[int, list[int]] = {}
        for org_id, parent_id in edges:
            if parent_id is not None:
                children.setdefault(parent_id, []).append(org_id)
        result = {}
        for root_id in root_ids:
            seen = {root_id}
            frontier = [root_id]
            while frontier:
                current = frontier.pop()
                for child in children.get(current, []):
                    if child not in seen:
                        seen.add(child)
                        frontier.append(child)
            result[root_id] = frozenset(seen)
        return result

    async def has_children(self, org_id: int) -> bool:
        child = await self.session.scalar(
            select(Organisation.id).where(Organisation.parent_id == org_id).limit(1)
        )
        return child is not None

    async def list(
        self,
        *,
        visible_ids: frozenset[int] | None,
        parent_id: int | None,
        after_id: int | None,
        limit: int,
    ) -> Sequence[Organisation]:
        query = select(Organisation).order_by(Organisation.id).limit(limit + 1)
        if visible_ids is not None:
            query = query.where(Organisation.id.in_(visible_ids))
        if parent_id is not None:
            query = query.where(Organisation.parent_id == parent_id)
        if after_id is not None:
            query = query.where(Organisation.id > after_id)
        return (await self.session.scalars(query)).all()

    async def usage(self, org_id: int) -> dict[str, int]:
        """What still refers to the organisation and stops it from being deleted, by kind:
        everything whose reference the database keeps it from dropping."""
        from memberhub.bulk.models import BulkJob
        from memberhub.integrations.models import Integration
        from memberhub.leads.models import Lead
        from memberhub.staff.models import StaffUser
        from memberhub.webhooks.models import WebhookEndpoint

        members = select(func.count(Member.id)).where(
            Member.organisation_id == org_id, Member.deleted_at.is_(None)
        )
        # A lead enrolled as a member since erased was erased with it: it counts no more
        # than the member does.
        leads = select(func.count(Lead.id)).where(
            Lead.organisation_id == org_id,
            or_(Lead.member_id.is_(None), Lead.member_id.not_in(_erased_members())),
        )
        counted = {"members": members, "leads": leads}
        for kind, model in (
            ("plans", MembershipPlan),
            ("api_keys", ApiKey),
            ("staff", StaffUser),
            ("integrations", Integration),
            ("webhook_endpoints", WebhookEndpoint),
            ("bulk_jobs", BulkJob),
        ):
            counted[kind] = select(func.count(model.id)).where(model.organisation_id == org_id)
        return {kind: await self.session.scalar(query) or 0 for kind, query in counted.items()}

    async def detach_erased_members(self, org_id: int) -> None:
        """Erased members, and the leads they were enrolled from (erased with them), no
        longer belong to the organisation."""
        from memberhub.leads.models import Lead

        await self.session.execute(
            update(Lead)
            .where(Lead.organisation_id == org_id, Lead.member_id.in_(_erased_members()))
            .values(organisation_id=None)
        )
        await self.session.execute(
            update(Member)
            .where(Member.organisation_id == org_id, Member.deleted_at.is_not(None))
            .values(organisation_id=None)
        )


def _erased_members() -> Select[int]:
    return select(Member.id).where(Member.deleted_at.is_not(None))
