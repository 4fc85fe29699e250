from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from email_validator import EmailNotValidError, validate_email
from sqlalchemy import Select, bindparam, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from memberhub.members.models import ConsentChange, Member


@dataclass(frozen=True)
class MemberFilters:
    status: str | None = None
    tier: str | None = None
    organisation_ids: frozenset[int] | None = None  # None = no restriction
    email: str | None = None
    q: str | None = None
    updated_since: datetime | None = None
    created_from: datetime | None = None
    created_to: datetime | None = None
    external_id: tuple[str, str] | None = None  # (system, id)


def _escape_like(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def normalize_email(email: str) -> str:
    return email.strip().lower()


def searched_email(value: str) -> str:
    """An address a filter gives, in the form a member or lead created with it is stored:
    as the API's email fields normalise it (a punycode domain shown in Unicode, full-width
    letters plain, accents composed), lowercased; one that does not parse, lowercased."""
    with contextlib.suppress(EmailNotValidError, ValueError):
        value = validate_email(value, check_deliverability=False).normalized
    return normalize_email(value)


class MemberRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    def _base(self) -> Select[Member]:
        return (
            select(Member)
            .where(Member.deleted_at.is_(None))
            .options(selectinload(Member.organisation), selectinload(Member.plan))
        )

    async def get_by_public_id(self, public_id: str, *, for_update: bool = False) -> Member | None:
        return await self.session.scalar(_member_by("public_id", for_update), {"key": public_id})

    async def get_by_id(self, member_id: int, *, for_update: bool = False) -> Member | None:
        return await self.session.scalar(_member_by("id", for_update), {"key": member_id})

    async def email_taken(
        self, organisation_id: int | None, email_normalized: str, *, exclude_id: int | None = None
    ) -> bool:
        query = select(Member.id).where(
            func.coalesce(Member.organisation_id, 0) == (organisation_id or 0),
            Member.email_normalized == email_normalized,
        )
        if exclude_id is not None:
            query = query.where(Member.id != exclude_id)
        return await self.session.scalar(query.limit(1)) is not None

    async def list(
        self, filters: MemberFilters, *, after_id: int | None, limit: int
    ) -> Sequence[Member]:
        query = self._base().order_by(Member.id).limit(limit + 1)
        if after_id is not None:
            query = query.where(Member.id > after_id)
        if filters.organisation_ids is not None:
            query = query.where(Member.organisation_id.in_(filters.organisation_ids))
        if filters.status is not None:
            query = query.where(Member.status == filters.status)
        if filters.tier is not None:
            query = query.where(Member.tier == filters.tier)
        if filters.email is not None:
            query = query.where(Member.email_normalized == searched_email(filters.email))
        if filters.external_id is not None:
            system, value = filters.external_id
            query = query.where(Member.external_ids[system].as_string() == value)
        if filters.q:
            pattern = f"%{_escape_like(filters.q.lower())}%"
            full_name = func.lower(
                func.coalesce(Member.first_name, "") + " " + func.coalesce(Member.last_name, "")
            )
            query = query.where(
                or_(
                    Member.email_normalized.like(pattern, escape="\\"),
                    full_name.like(pattern, escape="\\"),
                )
            )
        if filters.updated_since is not None:
            query = query.where(Member.updated_at >= filters.updated_since)
        if filters.created_from is not None:
            query = query.where(Member.created_at >= filters.created_from)
        if filters.created_to is not None:
            query = query.where(Member.created_at < filters.created_to)
        return (await self.session.scalars(query)).all()


@functools.cache
def _member_by(column: str, for_update: bool) -> Select[Member]:
    """A member (not deleted) by `column` (bound as `key`), built once: nearly every request
    looks one up."""
    query = (
        select(Member)
        .where(Member.deleted_at.is_(None), Member.__table__.c[column] == bindparam("key"))
        .options(selectinload(Member.organisation), selectinload(Member.plan))
    )
    # FOR NO KEY UPDATE on PostgreSQL: a change to the member blocks other changes, not the
    # inserts that refer to it (ledger rows check their member with FOR KEY SHARE), so a
    # change that goes on to lock the member's account cannot deadlock with a points write.
    return query.with_for_update(key_share=True) if for_update else query


class ConsentChangeRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def for_member(
        self, member_id: int, *, after_id: int | None, limit: int
    ) -> Sequence[ConsentChange]:
        """A member's consent changes, oldest first, one more than `limit` to tell whether
        more follow."""
        query = (
            select(ConsentChange)
            .where(ConsentChange.member_id == member_id)
            .order_by(ConsentChange.id)
            .limit(limit + 1)
        )
        if after_id is not None:
            query = query.where(ConsentChange.id > after_id)
        return (await self.session.scalars(query)).all()
