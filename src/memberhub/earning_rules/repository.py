from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from datetime import datetime

from sqlalchemy import Select, bindparam, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.earning_rules.models import EarningRule, EarningRuleVersion, RuleAward
from memberhub.organisations.models import Organisation


class EarningRuleRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get_by_public_id(
        self, public_id: str, *, for_update: bool = False
    ) -> EarningRule | None:
        query = select(EarningRule).where(EarningRule.public_id == public_id)
        if for_update:
            query = query.with_for_update().execution_options(populate_existing=True)
        return await self.session.scalar(query)

    async def list(
        self, *, active: bool | None, archived: bool, after_id: int | None, limit: int
    ) -> Sequence[EarningRule]:
        query = select(EarningRule).order_by(EarningRule.id).limit(limit + 1)
        if after_id is not None:
            query = query.where(EarningRule.id > after_id)
        if active is not None:
            query = query.where(EarningRule.active.is_(active))
        if archived:
            query = query.where(EarningRule.archived_at.is_not(None))
        else:
            query = query.where(EarningRule.archived_at.is_(None))
        return (await self.session.scalars(query)).all()

    async def evaluated(self) -> Sequence[EarningRule]:
        """The rules activities are evaluated against: active and not archived."""
        return (
            await self.session.scalars(
                select(EarningRule).where(
                    EarningRule.active.is_(True), EarningRule.archived_at.is_(None)
                )
            )
        ).all()

    async def versions(
        self, rule_id: int, *, after_id: int | None, limit: int
    ) -> Sequence[EarningRuleVersion]:
        query = (
            select(EarningRuleVersion)
            .where(EarningRuleVersion.rule_id == rule_id)
            .order_by(EarningRuleVersion.id)
            .limit(limit + 1)
        )
        if after_id is not None:
            query = query.where(EarningRuleVersion.id > after_id)
        return (await self.session.scalars(query)).all()

    async def lock(self, rule_ids: Iterable[int]) -> None:
        """Lock rule rows until the transaction ends, in id order (so two evaluations
        locking several never deadlock)."""
        wanted = sorted(set(rule_ids))
        if wanted:
            await self.session.execute(
                select(EarningRule.id)
                .where(EarningRule.id.in_(wanted))
                .order_by(EarningRule.id)
                .with_for_update()
            )

    async def award_usage(
        self,
        rule_id: int,
        *,
        member_id: int | None,
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> tuple[int, int]:
        """(awards, points) of the rule: for one member (None: every member), for
        activities that occurred in [start, end) when given (both or neither)."""
        assert (start is None) == (end is None), "a period has a start and an end"
        params: dict[str, object] = {"rule_id": rule_id}
        if member_id is not None:
            params["member_id"] = member_id
        if start is not None:
            params |= {"start": start, "end": end}
        statement = _award_usage(member_id is not None, start is not None)
        row = (await self.session.execute(statement, params)).one()
        return int(row[0]), int(row[1])

    async def organisation_ids(self, public_ids: Iterable[str]) -> dict[str, int]:
        wanted = set(public_ids)
        if not wanted:
            return {}
        rows = await self.session.execute(
            select(Organisation.public_id, Organisation.id).where(
                Organisation.public_id.in_(wanted)
            )
        )
        return {row[0]: row[1] for row in rows}


@functools.cache
def _award_usage(per_member: bool, in_period: bool) -> Select[int, int]:
    """Built once per shape: caps are counted for every activity a rule meets."""
    query = select(func.count(), func.coalesce(func.sum(RuleAward.points), 0)).where(
        RuleAward.rule_id == bindparam("rule_id")
    )
    if per_member:
        query = query.where(RuleAward.member_id == bindparam("member_id"))
    if in_period:
        query = query.where(
            RuleAward.occurred_at >= bindparam("start", type_=RuleAward.occurred_at.type),
            RuleAward.occurred_at < bindparam("end", type_=RuleAward.occurred_at.type),
        )
    return query
