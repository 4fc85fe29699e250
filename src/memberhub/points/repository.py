from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, Row, and_, bindparam, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.kit.clock import utcnow
from memberhub.kit.errors import NotFound
from memberhub.members.models import Member
from memberhub.points.models import (
    BatchSource,
    BatchStatus,
    PointAccount,
    PointAllocation,
    PointBatch,
    PointTransaction,
    TxnType,
)

# Built once: an award sends it on every request. Its member's organisation and plan are
# not loaded (a credit needs only the member's own columns). The member's row is locked
# with its account (member first, as everywhere), in the mode a change to the member's
# profile takes (FOR NO KEY UPDATE, which rows referring to the member do not wait for):
# a points change and a profile change or erasure of the same member then follow one
# another, so the member's events are numbered in the order of its changes, and no points
# land on a member whose erasure is under way.
_MEMBER_WITH_ACCOUNT = (
    select(Member, PointAccount)
    .join(PointAccount, PointAccount.member_id == Member.id)
    .where(Member.public_id == bindparam("public_id"), Member.deleted_at.is_(None))
    .with_for_update(of=(Member, PointAccount), key_share=True)
    .execution_options(populate_existing=True)
)


@dataclass(frozen=True)
class TransactionFilters:
    member_id: int | None = None
    organisation_ids: frozenset[int] | None = None  # None = no restriction
    types: tuple[str, ...] = ()
    date_from: datetime | None = None
    date_to: datetime | None = None
    reference_id: str | None = None


class PointsRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    # ------------------------------------------------------------ accounts

    async def lock_account(self, member_id: int) -> PointAccount:
        """The member's account, created on first use, locked until the transaction ends;
        NotFound when the member is erased (meanwhile, too)."""
        account = await self.session.scalar(_LOCK_ACCOUNT, {"member_id": member_id})
        if account is not None:
            return account
        # First points of this member: create the row; a concurrent first write creating it
        # too is harmless (DO NOTHING), and both then lock the one row.
        dialect = self.session.get_bind().dialect.name
        insert = pg_insert if dialect == "postgresql" else sqlite_insert
        await self.session.execute(
            insert(PointAccount)
            .values(member_id=member_id, updated_at=utcnow())
            .on_conflict_do_nothing(index_elements=["member_id"])
        )
        account = await self.session.scalar(_LOCK_ACCOUNT, {"member_id": member_id})
        if account is None:
            raise NotFound("The member does not exist.", code="MEMBER_NOT_FOUND")
        return account

    async def member_with_locked_account(
        self, public_id: str
    ) -> tuple[Member, PointAccount] | None:
        """The member (not deleted) and its account, locked until the transaction ends, in
        one statement; None when there is no such member or it has no account yet."""
        row = (await self.session.execute(_MEMBER_WITH_ACCOUNT, {"public_id": public_id})).first()
        return None if row is None else (row[0], row[1])

    async def get_account(self, member_id: int) -> PointAccount | None:
        return await self.session.get(PointAccount, member_id)

    # ------------------------------------------------------------ transactions

    async def by_reference(
        self, txn_type: str, scope: int, reference_id: str
    ) -> PointTransaction | None:
        """The transaction of `txn_type` with this reference in `scope` (an organisation's
        id, or 0 for members without one: see `service.reference_scope`)."""
        return await self.session.scalar(
            _BY_REFERENCE, {"scope": scope, "type": txn_type, "reference_id": reference_id}
        )

    async def member_transaction_by_reference(
        self, member_id: int, txn_type: str, reference_id: str
    ) -> PointTransaction | None:
        """The member's transaction of `txn_type` with this reference, whatever scope it
        was written under (the member may have moved organisation since)."""
        return await self.session.scalar(
            select(PointTransaction)
            .where(
                PointTransaction.member_id == member_id,
                PointTransaction.type == txn_type,
                PointTransaction.reference_id == reference_id,
            )
            .limit(1)
        )

    async def transfer_in_of(self, transfer_out_id: int) -> PointTransaction | None:
        """The incoming side of a transfer, by its outgoing transaction."""
        return await self.session.scalar(
            select(PointTransaction).where(
                PointTransaction.related_transaction_id == transfer_out_id,
                PointTransaction.type == TxnType.TRANSFER_IN,
            )
        )

    async def transaction_by_public_id(self, public_id: str) -> PointTransaction | None:
        return await self.session.scalar(
            select(PointTransaction).where(PointTransaction.public_id == public_id)
        )

    async def list_transactions(
        self, filters: TransactionFilters, *, after_id: int | None, limit: int
    ) -> Sequence[Row[PointTransaction, str]]:
        """Newest first, paged by id, with each row's member public id."""
        query = (
            select(PointTransaction, Member.public_id)
            .join(Member, Member.id == PointTransaction.member_id)
            .order_by(PointTransaction.id.desc())
            .limit(limit + 1)
        )
        if after_id is not None:
            query = query.where(PointTransaction.id < after_id)
        if filters.member_id is not None:
            query = query.where(PointTransaction.member_id == filters.member_id)
        if filters.organisation_ids is not None:
            query = query.where(Member.organisation_id.in_(filters.organisation_ids))
        if filters.types:
            query = query.where(PointTransaction.type.in_(filters.types))
        if filters.date_from is not None:
            query = query.where(PointTransaction.occurred_at >= filters.date_from)
        if filters.date_to is not None:
            query = query.where(PointTransaction.occurred_at < filters.date_to)
        if filters.reference_id is not None:
            query = query.where(PointTransaction.reference_id == filters.reference_id)
        return (await self.session.execute(query)).all()

    async def recent_transactions(self, member_id: int, limit: int) -> Sequence[PointTransaction]:
        return (
            await self.session.scalars(
                select(PointTransaction)
                .where(PointTransaction.member_id == member_id)
                .order_by(PointTransaction.id.desc())
                .limit(limit)
            )
        ).all()

    async def balance_at(self, member_id: int, moment: datetime) -> tuple[int, int]:
        """(current, pending) after the last transaction at or before `moment`."""
        row = (
            await self.session.execute(
                select(PointTransaction.balance_after, PointTransaction.pending_after)
                .where(
                    PointTransaction.member_id == member_id,
                    PointTransaction.occurred_at <= moment,
                )
                .order_by(PointTransaction.occurred_at.desc(), PointTransaction.id.desc())
                .limit(1)
            )
        ).first()
        return (int(row[0]), int(row[1])) if row is not None else (0, 0)

    async def public_ids(self, ids: Iterable[int]) -> dict[int, str]:
        wanted = set(ids)
        if not wanted:
            return {}
        rows = await self.session.execute(
            select(PointTransaction.id, PointTransaction.public_id).where(
                PointTransaction.id.in_(wanted)
            )
        )
        return {row[0]: row[1] for row in rows}

    async def batch_public_ids(self, ids: Iterable[int]) -> dict[int, str]:
        wanted = set(ids)
        if not wanted:
            return {}
        rows = await self.session.execute(
            select(PointBatch.id, PointBatch.public_id).where(PointBatch.id.in_(wanted))
        )
        return {row[0]: row[1] for row in rows}

    async def allocations_for(
        self, transaction_ids: Iterable[int]
    ) -> dict[int, list[tuple[str, int]]]:
        wanted = set(transaction_ids)
        if not wanted:
            return {}
        rows = await self.session.execute(
            select(PointAllocation.transaction_id, PointBatch.public_id, PointAllocation.points)
            .join(PointBatch, PointBatch.id == PointAllocation.batch_id)
            .where(PointAllocation.transaction_id.in_(wanted))
            .order_by(PointAllocation.id)
        )
        result: dict[int, list[tuple[str, int]]] = {}
        for txn_id, batch_public_id, points in rows:
            result.setdefault(txn_id, []).append((batch_public_id, points))
        return result

    async def credited_since(self, member_id: int, since: datetime, types: Sequence[str]) -> int:
        """Points credited (current and pending) by transactions of `types` since `since`."""
        total = await self.session.scalar(
            select(
                func.coalesce(
                    func.sum(PointTransaction.points + PointTransaction.pending_points), 0
                )
            ).where(
                PointTransaction.member_id == member_id,
                PointTransaction.type.in_(types),
                PointTransaction.occurred_at >= since,
            )
        )
        return int(total or 0)

    # ------------------------------------------------------------ batches

    async def batch_by_public_id(
        self, public_id: str, *, for_update: bool = False
    ) -> PointBatch | None:
        query = select(PointBatch).where(PointBatch.public_id == public_id)
        if for_update:
            query = query.with_for_update().execution_options(populate_existing=True)
        return await self.session.scalar(query)

    async def batch_for_transaction(self, transaction_id: int) -> PointBatch | None:
        return await self.session.scalar(
            select(PointBatch)
            .where(PointBatch.transaction_id == transaction_id)
            .order_by(PointBatch.id)
            .limit(1)
            .with_for_update()
            .execution_options(populate_existing=True)
        )

    async def spendable_batches(self, member_id: int) -> Sequence[PointBatch]:
        """Active batches with points left, soonest expiry first (never-expiring last), then
        oldest first; locked for the spend."""
        return (
            await self.session.scalars(
                select(PointBatch)
                .where(
                    PointBatch.member_id == member_id,
                    PointBatch.status == BatchStatus.ACTIVE,
                    PointBatch.remaining > 0,
                )
                .order_by(
                    PointBatch.expires_at.is_(None),
                    PointBatch.expires_at,
                    PointBatch.id,
                )
                .with_for_update()
                .execution_options(populate_existing=True)
            )
        ).all()

    async def extendable_batches(
        self, member_id: int, *, valid_at: datetime, lock: bool
    ) -> Sequence[PointBatch]:
        """Active and pending batches with points left and an expiry after `valid_at`,
        soonest expiry first; locked for the change when `lock`."""
        query = (
            select(PointBatch)
            .where(
                PointBatch.member_id == member_id,
                PointBatch.status.in_((BatchStatus.ACTIVE, BatchStatus.PENDING)),
                PointBatch.remaining > 0,
                PointBatch.expires_at > valid_at,
            )
            .order_by(PointBatch.expires_at, PointBatch.id)
        )
        if lock:
            query = query.with_for_update().execution_options(populate_existing=True)
        return (await self.session.scalars(query)).all()

    async def batches_for_member(
        self, member_id: int, *, status: str | None, after_id: int | None, limit: int
    ) -> Sequence[PointBatch]:
        query = (
            select(PointBatch)
            .where(PointBatch.member_id == member_id)
            .order_by(PointBatch.id)
            .limit(limit + 1)
        )
        if status is not None:
            query = query.where(PointBatch.status == status)
        if after_id is not None:
            query = query.where(PointBatch.id > after_id)
        return (await self.session.scalars(query)).all()

    async def deficit_batch(self, member_id: int) -> PointBatch | None:
        return await self.session.scalar(
            select(PointBatch)
            .where(
                PointBatch.member_id == member_id,
                PointBatch.status == BatchStatus.ACTIVE,
                PointBatch.source == BatchSource.DEFICIT,
            )
            .limit(1)
            .with_for_update()
            .execution_options(populate_existing=True)
        )

    async def expiration_schedule(
        self, member_id: int, *, limit: int = 24
    ) -> list[tuple[datetime, int]]:
        rows = await self.session.execute(
            select(PointBatch.expires_at, func.sum(PointBatch.remaining))
            .where(
                PointBatch.member_id == member_id,
                PointBatch.status.in_((BatchStatus.ACTIVE, BatchStatus.PENDING)),
                PointBatch.remaining > 0,
                PointBatch.expires_at.is_not(None),
            )
            .group_by(PointBatch.expires_at)
            .order_by(PointBatch.expires_at)
            .limit(limit)
        )
        return [(row[0], int(row[1])) for row in rows if row[0] is not None]

    async def pending_schedule(
        self, member_id: int, *, limit: int = 24
    ) -> list[tuple[datetime, int]]:
        rows = await self.session.execute(
            select(PointBatch.activates_at, func.sum(PointBatch.remaining))
            .where(
                PointBatch.member_id == member_id,
                PointBatch.status == BatchStatus.PENDING,
                PointBatch.remaining > 0,
            )
            .group_by(PointBatch.activates_at)
            .order_by(PointBatch.activates_at)
            .limit(limit)
        )
        return [(row[0], int(row[1])) for row in rows if row[0] is not None]

    async def expiring_between(self, member_id: int, start: datetime, end: datetime) -> int:
        total = await self.session.scalar(
            select(func.coalesce(func.sum(PointBatch.remaining), 0)).where(
                PointBatch.member_id == member_id,
                PointBatch.status == BatchStatus.ACTIVE,
                PointBatch.remaining > 0,
                PointBatch.expires_at > start,
                PointBatch.expires_at <= end,
            )
        )
        return int(total or 0)

    async def allocated_from(self, transaction_id: int) -> Sequence[tuple[int, int]]:
        """(batch id, points) a transaction took, in the order it took them."""
        rows = await self.session.execute(
            select(PointAllocation.batch_id, PointAllocation.points)
            .where(PointAllocation.transaction_id == transaction_id)
            .order_by(PointAllocation.id)
        )
        return [(row[0], row[1]) for row in rows]

    # ------------------------------------------------------------ jobs

    async def members_with_due_batches(
        self, status: str, column_name: str, now: datetime, after_member_id: int, limit: int
    ) -> list[int]:
        """The next `limit` members, by id after `after_member_id`, with batches in `status`
        whose `column` time has come.

        Walks the (status, member_id, time) index forward from where the last chunk ended,
        so a whole run reads each batch's index entry about once.
        """
        column = getattr(PointBatch, column_name)
        query = (
            select(PointBatch.member_id)
            .where(
                PointBatch.status == status,
                PointBatch.member_id > after_member_id,
                column.is_not(None),
                column <= now,
            )
            .group_by(PointBatch.member_id)
            .order_by(PointBatch.member_id)
            .limit(limit)
        )
        return list((await self.session.scalars(query)).all())

    async def lock_accounts_skip_locked(self, member_ids: Sequence[int]) -> list[PointAccount]:
        """Lock the accounts nobody else holds; another worker has the rest."""
        query = (
            select(PointAccount)
            .join(Member, Member.id == PointAccount.member_id)
            .where(PointAccount.member_id.in_(member_ids))
            .order_by(PointAccount.member_id)
            .with_for_update(of=(Member, PointAccount), key_share=True, skip_locked=True)
            .execution_options(populate_existing=True)
        )
        return list((await self.session.scalars(query)).all())

    async def expired_by(self, transaction_id: int, member_id: int) -> Sequence[PointBatch]:
        """The batches an expire transaction took, oldest first."""
        return (
            await self.session.scalars(
                select(PointBatch)
                .where(
                    PointBatch.member_id == member_id,
                    PointBatch.status == BatchStatus.EXPIRED,
                    PointBatch.expired_transaction_id == transaction_id,
                )
                .order_by(PointBatch.id)
            )
        ).all()

    async def batches_due_notice(
        self, now: datetime, horizon: datetime, limit: int
    ) -> Sequence[PointBatch]:
        """Active batches expiring by `horizon` whose `points.expiring` notice is not sent."""
        return await self._expiring_by(
            now, horizon, limit, PointBatch.remaining > 0, PointBatch.expiring_notified_at.is_(None)
        )

    async def batches_due_expiring_alert(
        self, now: datetime, horizon: datetime, min_points: int, limit: int
    ) -> Sequence[PointBatch]:
        """Active batches of at least `min_points` expiring by `horizon` whose
        POINTS_EXPIRING alert was not raised yet."""
        return await self._expiring_by(
            now,
            horizon,
            limit,
            PointBatch.remaining >= max(min_points, 1),
            PointBatch.expiring_alerted_at.is_(None),
        )

    async def _expiring_by(
        self, now: datetime, horizon: datetime, limit: int, *conditions: ColumnElement[bool]
    ) -> Sequence[PointBatch]:
        """Active batches expiring after `now` and by `horizon` that meet `conditions`,
        locked (those another worker holds are left to it)."""
        return (
            await self.session.scalars(
                select(PointBatch)
                .where(
                    PointBatch.status == BatchStatus.ACTIVE,
                    PointBatch.expires_at.is_not(None),
                    and_(PointBatch.expires_at > now, PointBatch.expires_at <= horizon),
                    *conditions,
                )
                .order_by(PointBatch.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
        ).all()


# Built once: every operation on a member's points runs these.
# Of a member not erased: one erased while this waited for the lock is found gone (the
# condition is checked again on the row as the erasure left it).
_LOCK_ACCOUNT = (
    select(PointAccount)
    .join(Member, Member.id == PointAccount.member_id)
    .where(PointAccount.member_id == bindparam("member_id"), Member.deleted_at.is_(None))
    .with_for_update(of=(Member, PointAccount), key_share=True)
    .execution_options(populate_existing=True)
)
_BY_REFERENCE = select(PointTransaction).where(
    PointTransaction.reference_scope == bindparam("scope"),
    PointTransaction.type == bindparam("type"),
    PointTransaction.reference_id == bindparam("reference_id"),
)
