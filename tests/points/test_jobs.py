"""The scheduled ledger jobs with a controllable clock: activation, expiry and notices,
each safe to run twice and from two workers at once."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from memberhub.events.catalog import PointsExpired
from memberhub.kit.actor import Actor
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.kit.errors import Conflict, ValidationFailed
from memberhub.members.models import Member
from memberhub.points import jobs, service
from memberhub.points.jobs import activate_pending_points, expire_points, notify_expiring_points
from memberhub.points.models import BatchStatus, PointAccount, PointBatch, PointTransaction, TxnType
from memberhub.settings import Settings
from memberhub.worker.runner import Worker
from tests.points.conftest import award, check_ledger, op, set_program, summary
from tests.support import ApiClient


def days(n: float) -> str:
    return (utcnow() + timedelta(days=n)).isoformat()


async def event_types(api: ApiClient, event_type: str) -> list[dict[str, Any]]:
    response = await api.get("/api/v1/events", params={"type": event_type, "limit": 500})
    return list(response.json()["data"])


async def count_transactions(db: Database, txn_type: str) -> int:
    async with db.transaction(read_only=True) as session:
        total = await session.scalar(select(func.count()).where(PointTransaction.type == txn_type))
        return int(total or 0)


async def test_expiry_takes_only_batches_past_their_date_and_runs_once(
    api: ApiClient, db: Database
) -> None:
    member = await api.create_member()
    await award(api, member["id"], 100, expires_at=days(5))
    await award(api, member["id"], 30, expires_at=days(5))
    await award(api, member["id"], 50, expires_at=days(20))
    await award(api, member["id"], 7)
    assert await expire_points(db, utcnow() + timedelta(days=4)) == 0
    assert await expire_points(db, utcnow() + timedelta(days=6)) == 2
    assert await expire_points(db, utcnow() + timedelta(days=6)) == 0
    points = await summary(api, member["id"])
    assert (points["current_balance"], points["lifetime_expired"]) == (57, 130)
    (event,) = await event_types(api, "points.expired")
    assert (event["data"]["points"], event["data"]["batches"]) == (130, 2)
    assert event["data"]["balance_after"] == 57
    await check_ledger(db)


async def test_expiry_follows_the_program_policy_in_its_time_zone(
    api: ApiClient, db: Database
) -> None:
    await set_program(
        api, expiry_policy="days_after_earn", expiry_days=10, timezone="Asia/Kuala_Lumpur"
    )
    member = await api.create_member()
    result = await award(api, member["id"], 100)
    batches = await api.get(f"/api/v1/members/{member['id']}/points/batches")
    (batch,) = batches.json()["data"]
    expires = batch["expires_at"]
    # Valid through the 10th local day after earning: expires at local midnight (16:00 UTC).
    assert expires.endswith("16:00:00Z")
    earned = result["transaction"]["occurred_at"]
    assert expires > earned
    await check_ledger(db)


async def test_two_workers_expiring_at_once_expire_each_batch_once(
    api: ApiClient, db: Database, settings: Settings
) -> None:
    members = [await api.create_member() for _ in range(12)]
    for member in members:
        for n in range(3):
            await award(api, member["id"], 10 + n, expires_at=days(1))
    now = utcnow() + timedelta(days=2)
    other = Database(settings.resolved_database_url, pool_size=2)
    try:
        results = await asyncio.gather(expire_points(db, now), expire_points(other, now))
    finally:
        await other.dispose()
    assert sum(results) == 36
    assert await count_transactions(db, TxnType.EXPIRE) == 12
    per_member = Counter(e["data"]["member_id"] for e in await event_types(api, "points.expired"))
    assert per_member == {m["id"]: 1 for m in members}
    for member in members:
        assert (await summary(api, member["id"]))["lifetime_expired"] == 33
    await check_ledger(db)


async def test_points_past_their_expiry_are_never_spent_before_the_job_runs(
    api: ApiClient, db: Database
) -> None:
    member = await api.create_member()
    await award(api, member["id"], 30, expires_at=days(5))
    await award(api, member["id"], 20)
    later = utcnow() + timedelta(days=6)  # the batch of 30 is due; the job has not run

    async def redeem(points: int) -> service.LedgerResult:
        async with db.transaction() as session:
            found = await session.scalar(select(Member).where(Member.public_id == member["id"]))
            assert found is not None
            return await service.spend_points(
                session,
                Actor.system("test"),
                found,
                TxnType.REDEEM,
                points=points,
                reason=None,
                reference_id=None,
                now=later,
            )

    with pytest.raises(service.InsufficientPoints) as refused:
        await redeem(25)
    assert refused.value.details == {"balance": 20, "requested": 25}
    assert await count_transactions(db, "expire") == 0, "a refused spend writes nothing"

    result = await redeem(15)
    assert result.allocations is not None
    assert [points for _, points in result.allocations] == [15], "only the unexpired batch"
    points = await summary(api, member["id"])
    assert (points["current_balance"], points["lifetime_expired"]) == (5, 30)
    (event,) = await event_types(api, "points.expired")
    assert (event["data"]["points"], event["data"]["balance_after"]) == (30, 20)
    async with db.transaction(read_only=True) as session:
        kinds = list(
            await session.scalars(select(PointTransaction.type).order_by(PointTransaction.id))
        )
    assert kinds == ["award", "award", "expire", "redeem"], "the expiry comes before the spend"
    assert await expire_points(db, later) == 0, "nothing left for the job"
    await check_ledger(db)


async def test_points_past_their_expiry_are_not_extended_before_the_job_runs(
    api: ApiClient, db: Database
) -> None:
    member = await api.create_member()
    awarded = await award(api, member["id"], 30, expires_at=days(5))
    later = utcnow() + timedelta(days=6)  # the batch is due; the job has not run

    async def extend(expires_at: datetime) -> service.LedgerResult:
        async with db.transaction() as session:
            found = await session.scalar(select(Member).where(Member.public_id == member["id"]))
            batch = await session.scalar(
                select(PointBatch).where(PointBatch.public_id == awarded["transaction"]["batch_id"])
            )
            assert found is not None
            assert batch is not None
            return await service.extend_expiry(
                session,
                Actor.system("test"),
                found,
                batch,
                expires_at=expires_at,
                reason="goodwill",
                now=later,
            )

    with pytest.raises(ValidationFailed):
        await extend(later - timedelta(seconds=1))
    with pytest.raises(Conflict) as refused:
        await extend(later + timedelta(days=30))
    assert refused.value.code == "BATCH_NOT_EXTENDABLE"
    assert "expired" in refused.value.message
    points = await summary(api, member["id"])
    assert (points["current_balance"], points["lifetime_expired"]) == (30, 0), "unchanged"
    assert await count_transactions(db, "extend") == 0
    # A date in the past is refused through the API too.
    body = {"batch_id": awarded["transaction"]["batch_id"], "reason": "x"}
    past = (utcnow() - timedelta(minutes=1)).isoformat()
    await op(api, "extend", {**body, "expires_at": past}, expect=422)
    await check_ledger(db)


async def test_expiry_writes_one_summarised_transaction_and_event_per_member(
    api: ApiClient, db: Database
) -> None:
    member = await api.create_member()
    await award(api, member["id"], 100, expires_at=days(5))
    await award(api, member["id"], 30, expires_at=days(5))
    await award(api, member["id"], 7)
    await op(api, "redeem", {"member_id": member["id"], "points": 40})
    now = utcnow() + timedelta(days=6)
    assert await expire_points(db, now) == 2
    async with db.transaction(read_only=True) as session:
        txn = (
            await session.scalars(select(PointTransaction).where(PointTransaction.type == "expire"))
        ).one()
        batches = (await session.scalars(select(PointBatch).order_by(PointBatch.id))).all()
    assert (txn.points, txn.balance_after, txn.pending_after) == (-90, 7, 0)
    assert (txn.details, txn.reason, txn.actor) == (
        {"batches": 2},
        "Points expired",
        jobs.SCHEDULER.id,
    )
    assert txn.occurred_at == now
    expired = [(b.status, b.remaining, b.expired_points, b.expired_transaction_id) for b in batches]
    assert expired == [
        (BatchStatus.EXPIRED, 0, 60, txn.id),
        (BatchStatus.EXPIRED, 0, 30, txn.id),
        (BatchStatus.ACTIVE, 7, 0, None),
    ]
    (event,) = await event_types(api, "points.expired")
    assert event["data"] == PointsExpired(
        member_id=member["id"],
        transaction_id=txn.public_id,
        points=90,
        balance_after=7,
        batches=2,
        occurred_at=now,
    ).model_dump(mode="json")
    await check_ledger(db)


async def test_two_workers_expiring_chunk_after_chunk_expire_each_batch_once(
    api: ApiClient, db: Database, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs, "CHUNK_MEMBERS", 3)
    monkeypatch.setattr(jobs, "SQLITE_EXPIRY_CHUNK_MEMBERS", 3)
    members = [await api.create_member() for _ in range(16)]
    for member in members:
        for n in range(2):
            await award(api, member["id"], 10 + n, expires_at=days(1))
        await award(api, member["id"], 5, expires_at=days(9))
    now = utcnow() + timedelta(days=2)
    other = Database(settings.resolved_database_url, pool_size=2)
    try:
        results = await asyncio.gather(*(expire_points(d, now) for d in (db, other, db, other)))
    finally:
        await other.dispose()
    assert sum(results) == 32
    assert await count_transactions(db, TxnType.EXPIRE) == 16
    per_member = Counter(e["data"]["member_id"] for e in await event_types(api, "points.expired"))
    assert per_member == {m["id"]: 1 for m in members}
    for member in members:
        points = await summary(api, member["id"])
        assert (points["current_balance"], points["lifetime_expired"]) == (5, 21)
    await check_ledger(db)


async def test_expiry_leaves_a_member_another_transaction_holds_to_the_next_run(
    api: ApiClient, db: Database, is_postgres: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not is_postgres:
        pytest.skip("SQLite has one writer at a time: no account is held while the job runs")
    monkeypatch.setattr(jobs, "CHUNK_MEMBERS", 2)
    members = [await api.create_member() for _ in range(3)]
    for member in members:
        await award(api, member["id"], 10, expires_at=days(1))
    now = utcnow() + timedelta(days=2)
    async with db.transaction() as holder:
        # The last member of the first chunk: the job must still go on to the next chunk.
        held = await holder.scalar(select(Member.id).where(Member.public_id == members[1]["id"]))
        await holder.execute(
            select(PointAccount).where(PointAccount.member_id == held).with_for_update()
        )
        assert await expire_points(db, now) == 2
    assert (await summary(api, members[1]["id"]))["current_balance"] == 10
    assert await expire_points(db, now) == 1
    assert await expire_points(db, now) == 0
    for member in members:
        assert (await summary(api, member["id"]))["lifetime_expired"] == 10
    await check_ledger(db)


async def test_two_workers_activating_at_once_activate_each_batch_once(
    api: ApiClient, db: Database, settings: Settings
) -> None:
    await set_program(api, pending_days=3)
    members = [await api.create_member() for _ in range(10)]
    for i, member in enumerate(members):
        body = {
            "member_id": member["id"],
            "amount": 2000,
            "currency": "MYR",
            "reference_id": f"order-{i}",
        }
        await op(api, "earn", body)
    now = utcnow() + timedelta(days=4)
    other = Database(settings.resolved_database_url, pool_size=2)

    async def activate(database: Database) -> int:
        async with database.transaction() as session:
            return await activate_pending_points(session, now)

    try:
        results = await asyncio.gather(activate(db), activate(other))
    finally:
        await other.dispose()
    assert sum(results) == 10
    assert await count_transactions(db, TxnType.ACTIVATE) == 10
    for member in members:
        points = await summary(api, member["id"])
        assert (points["current_balance"], points["pending_balance"]) == (10, 0)
    await check_ledger(db)


async def test_activation_pays_a_deficit_first(api: ApiClient, db: Database) -> None:
    await set_program(api, negative_balance_policy="allow_for_reversals")
    member = await api.create_member()
    await op(
        api,
        "earn",
        {"member_id": member["id"], "amount": 20_000, "currency": "MYR", "reference_id": "o-1"},
    )
    await op(api, "redeem", {"member_id": member["id"], "points": 100})
    await op(
        api,
        "reverse",
        {"member_id": member["id"], "earn_reference_id": "o-1", "reference_id": "refund-1"},
    )
    assert (await summary(api, member["id"]))["current_balance"] == -100
    await set_program(api, pending_days=2)
    await op(
        api,
        "earn",
        {"member_id": member["id"], "amount": 30_000, "currency": "MYR", "reference_id": "o-2"},
    )
    async with db.transaction() as session:
        assert await activate_pending_points(session, utcnow() + timedelta(days=3)) == 1
    assert (await summary(api, member["id"]))["current_balance"] == 50
    await op(api, "redeem", {"member_id": member["id"], "points": 50})
    await check_ledger(db)


async def test_expiring_notice_is_sent_once_per_batch_and_again_after_an_extension(
    api: ApiClient, db: Database
) -> None:
    member = await api.create_member()
    soon = await award(api, member["id"], 100, expires_at=days(20))
    await award(api, member["id"], 100, expires_at=days(90))
    now = utcnow()
    async with db.transaction() as session:
        assert await notify_expiring_points(session, now) == 1
    async with db.transaction() as session:
        assert await notify_expiring_points(session, now) == 0
    (notice,) = await event_types(api, "points.expiring")
    assert notice["data"]["batch_id"] == soon["transaction"]["batch_id"]
    assert notice["data"]["points"] == 100
    # 20 days less the moments the test took: a part of a day counts as a day.
    assert notice["data"]["days_left"] == 20
    alerts = await event_types(api, "alert.raised")
    assert [a["data"]["alert_type"] for a in alerts] == ["POINTS_EXPIRING"]

    await op(
        api,
        "extend",
        {"batch_id": soon["transaction"]["batch_id"], "expires_at": days(45), "reason": "goodwill"},
    )
    async with db.transaction() as session:
        # 25 days before its new expiry; the other batch is still 70 days away.
        assert await notify_expiring_points(session, now + timedelta(days=20)) == 1
    async with db.transaction() as session:
        assert await notify_expiring_points(session, now + timedelta(days=61)) == 1
    assert len(await event_types(api, "points.expiring")) == 3


async def test_the_worker_runs_the_ledger_jobs(api: ApiClient, db: Database) -> None:
    member = await api.create_member()
    await award(api, member["id"], 10)
    results = await Worker(db).tick(force=True)
    assert {"points.activate_pending", "points.expire", "points.notify_expiring"} <= set(results)
