from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import ColumnElement, Insert, Select, Table, and_, bindparam, func, or_, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from memberhub.activities.models import Activity
from memberhub.earning_rules.models import EarningRule, RuleAward
from memberhub.kit.db import column_binds
from memberhub.leads.models import Lead
from memberhub.members.models import Member
from memberhub.organisations.models import Organisation
from memberhub.points.models import PointTransaction

ACTIVITIES = cast(Table, Activity.__table__)


@dataclass(frozen=True)
class ActivityFilters:
    member_id: int | None = None
    # None = no restriction: activities of these organisations or of their members.
    organisation_ids: frozenset[int] | None = None
    matched: bool | None = None
    lead_id: int | None = None
    type: str | None = None
    source: str | None = None
    date_from: datetime | None = None
    date_to: datetime | None = None


@dataclass(frozen=True)
class ListedActivity:
    activity: Activity
    member_public_id: str | None
    member_organisation_id: int | None
    organisation_public_id: str | None
    lead_public_id: str | None = None

    @property
    def id(self) -> int:
        return self.activity.id


@functools.cache
def _insert_activity(dialect: str) -> Insert:
    """One statement that records an activity unless its source id is taken in its scope
    (no row comes back then): no separate check, and no race between a check and the
    insert."""
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    return (
        insert(ACTIVITIES)
        .values(column_binds(ACTIVITIES, "a", ("id",)))
        .on_conflict_do_nothing(index_elements=["source_scope", "source", "source_id"])
        .returning(ACTIVITIES.c.id)
    )


class ActivityRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def insert(self, row: dict[str, Any]) -> int | None:
        """Insert an activity (`row`: `a_<column>` parameters); None when its source id is
        already recorded in its scope."""
        dialect = self.session.get_bind().dialect.name
        return await self.session.scalar(_insert_activity(dialect), row)

    async def by_source(self, scope: int, source: str, source_id: str) -> Activity | None:
        return await self.session.scalar(
            select(Activity).where(
                Activity.source_scope == scope,
                Activity.source == source,
                Activity.source_id == source_id,
            )
        )

    async def get_by_public_id(
        self, public_id: str, *, for_update: bool = False
    ) -> Activity | None:
        query = select(Activity).where(Activity.public_id == public_id)
        if for_update:
            query = query.with_for_update().execution_options(populate_existing=True)
        return await self.session.scalar(query)

    # ------------------------------------------------------------ matching

    def _members(self, organisation_ids: frozenset[int] | None) -> Select[Member]:
        # Only the member's own columns: matching and crediting read no relationship.
        query = select(Member).where(Member.deleted_at.is_(None)).order_by(Member.id).limit(2)
        if organisation_ids is not None:
            query = query.where(Member.organisation_id.in_(organisation_ids))
        return query

    async def members_by_external_id(
        self, system: str, value: str, organisation_ids: frozenset[int] | None
    ) -> Sequence[Member]:
        """Up to two members whose `external_ids` map `system` to `value` (two: ambiguous)."""
        query = self._members(organisation_ids).where(
            Member.external_ids[system].as_string() == value
        )
        return (await self.session.scalars(query)).all()

    async def members_by_email(
        self, email_normalized: str, organisation_ids: frozenset[int] | None
    ) -> Sequence[Member]:
        query = self._members(organisation_ids).where(Member.email_normalized == email_normalized)
        return (await self.session.scalars(query)).all()

    async def unmatched_with_keys(
        self,
        email_normalized: str | None,
        external_keys: Sequence[str],
        *,
        limit: int,
        after_id: int = 0,
    ) -> Sequence[Activity]:
        """Unmatched activities waiting with one of these keys, oldest first, locked. Every
        member created asks, and almost always none waits: the ids are looked up with a
        statement built once, and the activities loaded only when there are some."""
        if email_normalized is None and not external_keys:
            return []
        params: dict[str, Any] = {"limit": limit, "after_id": after_id}
        if email_normalized is not None:
            params["email"] = email_normalized
        if external_keys:
            params["keys"] = list(external_keys)
        statement = _waiting_ids(email_normalized is not None, bool(external_keys))
        ids = (await self.session.execute(statement, params)).scalars().all()
        if not ids:
            return []
        query = (
            select(Activity)
            .where(Activity.id.in_(ids))
            .order_by(Activity.id)
            .execution_options(populate_existing=True)
        )
        return (await self.session.scalars(query)).all()

    # ------------------------------------------------------------ rules' counts

    async def count_in_period(
        self,
        member_id: int,
        activity_type: str,
        *,
        start: datetime | None,
        end: datetime | None,
    ) -> int:
        """The member's activities of `activity_type` recorded so far in [start, end) (all
        of them without a period)."""
        assert (start is None) == (end is None), "a period has a start and an end"
        params: dict[str, object] = {"member_id": member_id, "type": activity_type}
        if start is not None:
            params |= {"start": start, "end": end}
        return int(await self.session.scalar(_count_in_period(start is not None), params) or 0)

    def _listing(self) -> Select[Activity, str, int | None, str, str]:
        owner = aliased(Organisation)
        return (
            select(
                Activity, Member.public_id, Member.organisation_id, owner.public_id, Lead.public_id
            )
            .outerjoin(Member, Member.id == Activity.member_id)
            .outerjoin(owner, owner.id == Activity.organisation_id)
            .outerjoin(Lead, Lead.id == Activity.lead_id)
        )

    async def listed(self, public_id: str) -> ListedActivity | None:
        """One activity with the public ids it refers to."""
        row = (
            await self.session.execute(self._listing().where(Activity.public_id == public_id))
        ).first()
        return None if row is None else ListedActivity(*row)

    async def list_activities(
        self, filters: ActivityFilters, *, after_id: int | None, limit: int
    ) -> list[ListedActivity]:
        """Newest first, paged by id, with the public ids each refers to."""
        query = self._listing().order_by(Activity.id.desc()).limit(limit + 1)
        if after_id is not None:
            query = query.where(Activity.id < after_id)
        if filters.member_id is not None:
            query = query.where(Activity.member_id == filters.member_id)
        if filters.organisation_ids is not None:
            query = query.where(
                or_(
                    Activity.organisation_id.in_(filters.organisation_ids),
                    Member.organisation_id.in_(filters.organisation_ids),
                )
            )
        if filters.matched is not None:
            matched = Activity.member_id.is_not(None)
            query = query.where(matched if filters.matched else Activity.member_id.is_(None))
        if filters.lead_id is not None:
            query = query.where(Activity.lead_id == filters.lead_id)
        if filters.type is not None:
            query = query.where(Activity.type == filters.type)
        if filters.source is not None:
            query = query.where(Activity.source == filters.source)
        if filters.date_from is not None:
            query = query.where(Activity.occurred_at >= filters.date_from)
        if filters.date_to is not None:
            query = query.where(Activity.occurred_at < filters.date_to)
        rows = await self.session.execute(query)
        return [ListedActivity(*row) for row in rows]

    async def credits_for(
        self, activity_ids: Iterable[int]
    ) -> dict[int, list[tuple[str, int, str, int, str | None]]]:
        """Per activity: (rule public id, version, effect, points, transaction public id)
        of what the rules did for it, in the order they did it."""
        wanted = set(activity_ids)
        if not wanted:
            return {}
        rows = await self.session.execute(
            select(
                RuleAward.activity_id,
                EarningRule.public_id,
                RuleAward.rule_version,
                RuleAward.effect,
                RuleAward.points,
                PointTransaction.public_id,
            )
            .join(EarningRule, EarningRule.id == RuleAward.rule_id)
            .outerjoin(PointTransaction, PointTransaction.id == RuleAward.transaction_id)
            .where(RuleAward.activity_id.in_(wanted))
            .order_by(RuleAward.id)
        )
        result: dict[int, list[tuple[str, int, str, int, str | None]]] = {}
        for activity_id, rule, version, effect, points, txn in rows:
            result.setdefault(activity_id, []).append((rule, version, effect, points, txn))
        return result


@functools.cache
def _count_in_period(in_period: bool) -> Select[int]:
    """Built once per shape: an Nth-activity rule counts for every activity it meets."""
    occurred = Activity.occurred_at
    query = select(func.count()).where(
        Activity.member_id == bindparam("member_id"), Activity.type == bindparam("type")
    )
    if in_period:
        query = query.where(
            occurred >= bindparam("start", type_=occurred.type),
            occurred < bindparam("end", type_=occurred.type),
        )
    return query


def waiting_with_keys(
    by_email: bool, by_external_key: bool, *, prefix: str = ""
) -> ColumnElement[bool]:
    """Whether an unmatched activity waits with an email (`<prefix>email`) and/or one of
    some external keys (`<prefix>keys`)."""
    keys = []
    if by_email:
        keys.append(ACTIVITIES.c.email_normalized == bindparam(f"{prefix}email"))
    if by_external_key:
        keys.append(ACTIVITIES.c.external_key.in_(bindparam(f"{prefix}keys", expanding=True)))
    return and_(ACTIVITIES.c.member_id.is_(None), or_(*keys))


@functools.cache
def _waiting_ids(by_email: bool, by_external_key: bool) -> Select[tuple[int]]:
    """The ids of the unmatched activities waiting with an email (`email`) and/or one of
    some external keys (`keys`), after `after_id`, oldest first, at most `limit`, locked."""
    return (
        select(ACTIVITIES.c.id)
        .where(
            waiting_with_keys(by_email, by_external_key),
            ACTIVITIES.c.id > bindparam("after_id"),
        )
        .order_by(ACTIVITIES.c.id)
        .limit(bindparam("limit"))
        .with_for_update()
    )
