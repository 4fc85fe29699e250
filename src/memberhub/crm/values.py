"""The values of members and leads as field mappings read them, loaded in bulk."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.crm.mapping import EntityType
from memberhub.leads.models import Lead
from memberhub.members.consent import consent_column
from memberhub.members.models import Member
from memberhub.members.repository import normalize_email
from memberhub.organisations.repository import OrganisationRepository
from memberhub.points.models import PointAccount


@dataclass(frozen=True)
class EntityValues:
    entity_id: int
    public_id: str
    email: str | None
    updated_at: datetime
    values: dict[str, Any]


async def scope_ids(session: AsyncSession, organisation_id: int | None) -> frozenset[int] | None:
    """The organisations an integration syncs: its own and its chapters; None for all."""
    if organisation_id is None:
        return None
    return await OrganisationRepository(session).subtree_ids(organisation_id)


def entity_ids_query(
    entity: EntityType,
    scope: frozenset[int] | None,
    *,
    after_id: int,
    limit: int,
    purpose: str | None = None,
) -> Select[int]:
    """Ids of the records a full push reads; members only with consent for `purpose`."""
    model: type[Member] | type[Lead] = Member if entity == "members" else Lead
    query = select(model.id).where(model.id > after_id).order_by(model.id).limit(limit)
    if entity == "members":
        query = query.where(Member.deleted_at.is_(None))
        if purpose is not None:
            query = query.where(consent_column(purpose).is_(True))
    if scope is not None:
        query = query.where(model.organisation_id.in_(scope))
    return query


def _full_name(first: str | None, last: str | None) -> str | None:
    name = " ".join(part for part in (first, last) if part)
    return name or None


def _custom(values: dict[str, Any], custom_fields: dict[str, Any]) -> None:
    for key, value in custom_fields.items():
        values[f"custom.{key}"] = value


async def load_values(
    session: AsyncSession,
    entity: EntityType,
    ids: Sequence[int],
    scope: frozenset[int] | None,
    *,
    purpose: str | None = None,
) -> dict[int, EntityValues]:
    """Each record's values by id; records deleted or outside `scope` are left out, and
    members without consent for `purpose` when one is given (a push gives `crm`)."""
    if not ids:
        return {}
    if entity == "members":
        return await _member_values(session, ids, scope, purpose)
    return await _lead_values(session, ids, scope)


async def _member_values(
    session: AsyncSession, ids: Sequence[int], scope: frozenset[int] | None, purpose: str | None
) -> dict[int, EntityValues]:
    query = (
        select(Member, PointAccount)
        .outerjoin(PointAccount, PointAccount.member_id == Member.id)
        .where(Member.id.in_(ids), Member.deleted_at.is_(None))
    )
    if purpose is not None:
        query = query.where(consent_column(purpose).is_(True))
    if scope is not None:
        query = query.where(Member.organisation_id.in_(scope))
    result: dict[int, EntityValues] = {}
    for member, account in (await session.execute(query)).all():
        since = member.member_since or member.created_at
        values: dict[str, Any] = {
            "id": member.public_id,
            "email": member.email,
            "first_name": member.first_name,
            "last_name": member.last_name,
            "full_name": _full_name(member.first_name, member.last_name),
            "phone": member.phone,
            "status": member.status,
            "tier": member.tier,
            "points_balance": account.current if account is not None else 0,
            "lifetime_points": account.lifetime_earned if account is not None else 0,
            "member_since": since.date() if since is not None else None,
            "last_activity": account.last_activity_at if account is not None else None,
            "tags": ";".join(
                ["memberhub", f"status:{member.status}"]
                + ([f"tier:{member.tier}"] if member.tier else [])
            ),
        }
        _custom(values, member.custom_fields)
        result[member.id] = EntityValues(
            member.id, member.public_id, member.email, member.updated_at, values
        )
    return result


async def _lead_values(
    session: AsyncSession, ids: Sequence[int], scope: frozenset[int] | None
) -> dict[int, EntityValues]:
    query = (
        select(Lead, Member.public_id)
        .outerjoin(Member, Member.id == Lead.member_id)
        .where(Lead.id.in_(ids))
    )
    if scope is not None:
        query = query.where(Lead.organisation_id.in_(scope))
    result: dict[int, EntityValues] = {}
    for lead, member_public_id in (await session.execute(query)).all():
        values: dict[str, Any] = {
            "id": lead.public_id,
            "email": lead.email,
            "first_name": lead.first_name,
            "last_name": lead.last_name,
            "full_name": _full_name(lead.first_name, lead.last_name),
            "phone": lead.phone,
            "status": lead.status,
            "source": lead.source,
            "agent_id": lead.agent_id,
            "lost_reason": lead.lost_reason,
            "member_id": member_public_id,
            "created_at": lead.created_at,
        }
        _custom(values, lead.custom_fields)
        result[lead.id] = EntityValues(lead.id, lead.public_id, lead.email, lead.updated_at, values)
    return result


async def find_by_email(
    session: AsyncSession, entity: EntityType, email: str, scope: frozenset[int] | None
) -> tuple[int, str] | None:
    """The (id, public id) of the record with this email, compared case-insensitively."""
    model: type[Member] | type[Lead] = Member if entity == "members" else Lead
    query = select(model.id, model.public_id).where(
        model.email_normalized == normalize_email(email)
    )
    if entity == "members":
        query = query.where(Member.deleted_at.is_(None))
    if scope is not None:
        query = query.where(model.organisation_id.in_(scope))
    row = (await session.execute(query.order_by(model.id).limit(1))).first()
    return (row[0], row[1]) if row is not None else None
