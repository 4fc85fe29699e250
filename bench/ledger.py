"""The points ledger over HTTP and in the expiry job, as ratios to raw SQL measured in the same run.

For each backend, on databases the bench creates and removes (temporary SQLite files; new
PostgreSQL databases on MEMBERHUB_BENCH_POSTGRES_URL, else MEMBERHUB_TEST_DATABASE_URL, else
postgresql+asyncpg://postgres@127.0.0.1:5432/postgres):

- award: 8 concurrent clients sending `POST /api/v1/points/award` with an admin key to the
  application under uvicorn in a child process, each request for a different member, against
  8 concurrent connections each running the bare award transaction (lock the account row,
  insert the transaction and the batch, add to the balance, commit; on SQLite one writer at a
  time, as the application's engine allows). `award-one` is the same with every award for
  one member, so the account lock serialises them. Median of 3 rounds of 500 per side.
- redeem50: one client redeeming, for members holding 50 batches with 50 different expiries,
  points that take something from every batch; p50 and p95 of `POST /api/v1/points/redeem`
  over 200 redemptions against the bare transaction doing the same drawing (lock the account
  and the 50 batches in expiry order, update them, insert the transaction and 50
  allocations, update the account). Each redemption is on a member prepared beforehand.
- expire: 1,000,000 due batches over 100,000 members (plus one batch per member that is not
  due), timed through `memberhub.points.jobs.expire_points`, against one plain UPDATE of the
  same batches. Each of 3 rounds runs both on fresh copies of one prepared database, the
  sides alternating which goes first, each once what the copying left dirty is written out;
  the medians count. Afterwards every account must equal the sum of its active batches, no
  batch may be left due, the batch that was not due must keep its points, and every member
  must have one expire transaction and one `points.expired` event, with every expired batch
  naming that transaction; otherwise the bench exits 1.

Ratios: http / raw for throughput (higher is better), http / raw and job / update for time
(lower is better; 1.0 would mean the application cost nothing over the bare SQL). The load
average is printed with the expiry line and at the end: the machine may be shared.

    python -m bench.ledger                      # both backends
    python -m bench.ledger --quick              # a breakage check: small numbers
    python -m bench.ledger --backend postgresql --batches 200000 --members 20000
    python -m bench.ledger --backend postgresql --only expire --expire-rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sqlite3
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import (
    ColumnElement,
    FromClause,
    Integer,
    String,
    bindparam,
    cast,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection

from bench.common import (
    DEFAULT_POSTGRES_URL,
    Scratch,
    backends_named,
    issue_admin_key,
    pg_execute,
    postgres_usable,
    running_server,
    scratch_space,
)
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Base, Database, JSONType, UTCDateTime
from memberhub.kit.ids import new_public_id
from memberhub.members.models import MemberStatus
from memberhub.points.jobs import expire_points
from memberhub.points.models import BatchSource, BatchStatus, TxnType

CONCURRENCY = 8
FULL_AWARDS, QUICK_AWARDS = 500, 40
FULL_REDEEMS, QUICK_REDEEMS = 200, 10
FULL_BATCHES, QUICK_BATCHES = 1_000_000, 20_000
FULL_MEMBERS, QUICK_MEMBERS = 100_000, 2_000
ROUNDS = 3
AWARD_POINTS = 10
# The redemption: 50 batches of 10 points, and 495 points take something from every one.
REDEEM_BATCHES = 50
REDEEM_BATCH_POINTS = 10
REDEEM_POINTS = REDEEM_BATCHES * REDEEM_BATCH_POINTS - REDEEM_BATCH_POINTS // 2
REDEEM_WARMUP = 5
# Awards cycle through this many members per client, so concurrent ones never share one.
AWARD_MEMBERS_PER_CLIENT = 8
# Every expiry member also holds one batch that is not due, which the job must leave alone.
NOT_DUE_POINTS = 100
BENCH_ACTOR = "system:bench"

TABLES = Base.metadata.tables
MEMBERS = TABLES["members"]
ACCOUNTS = TABLES["point_accounts"]
TRANSACTIONS = TABLES["point_transactions"]
BATCHES = TABLES["point_batches"]
ALLOCATIONS = TABLES["point_allocations"]
EVENTS = TABLES["events"]


# -- results --------------------------------------------------------------------------------


def _prefix(backend: str, kind: str) -> str:
    return f"{backend:<11} {kind:<9}"


@dataclass(frozen=True)
class AwardResult:
    backend: str
    kind: str
    http_per_second: float
    raw_per_second: float

    @property
    def ratio(self) -> float:
        return self.http_per_second / self.raw_per_second

    def line(self) -> str:
        return (
            f"{_prefix(self.backend, self.kind)} http {self.http_per_second:8.1f} awards/s   "
            f"raw {self.raw_per_second:8.1f} awards/s   ratio {self.ratio:.3f}"
        )


@dataclass(frozen=True)
class Latencies:
    seconds: list[float]

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.seconds) * 1000

    @property
    def p95_ms(self) -> float:
        return statistics.quantiles(self.seconds, n=20)[18] * 1000


@dataclass(frozen=True)
class RedeemResult:
    backend: str
    http: Latencies
    raw: Latencies

    @property
    def ratio(self) -> float:
        return self.http.p50_ms / self.raw.p50_ms

    def line(self) -> str:
        return (
            f"{_prefix(self.backend, 'redeem50')} "
            f"http p50 {self.http.p50_ms:.1f} ms p95 {self.http.p95_ms:.1f} ms   "
            f"raw p50 {self.raw.p50_ms:.1f} ms p95 {self.raw.p95_ms:.1f} ms   "
            f"ratio {self.ratio:.2f}"
        )


@dataclass(frozen=True)
class ExpiryResult:
    """The timings of every round; the medians count."""

    backend: str
    batches: int
    job_seconds: list[float]
    update_seconds: list[float]

    @property
    def ratio(self) -> float:
        return statistics.median(self.job_seconds) / statistics.median(self.update_seconds)

    def line(self) -> str:
        return (
            f"{_prefix(self.backend, 'expire')} job {self.batches} batches "
            f"{statistics.median(self.job_seconds):.2f} s   plain update "
            f"{statistics.median(self.update_seconds):.2f} s   ratio {self.ratio:.2f}   "
            f"load {os.getloadavg()[0]:.2f}"
        )


@dataclass(frozen=True)
class Sizes:
    awards: int
    rounds: int
    redeems: int
    batches: int
    members: int
    concurrency: int
    expire_rounds: int

    @property
    def batches_per_member(self) -> int:
        return max(1, self.batches // self.members)


# -- databases ------------------------------------------------------------------------------


def settle(url: str) -> None:
    """Leave the data as a long-running database would have it: statistics gathered and the
    visibility map set (PostgreSQL), the write-ahead log folded in (SQLite)."""
    if url.startswith("sqlite"):
        path = make_url(url).database
        assert path is not None
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return
    asyncio.run(pg_execute(url, "VACUUM ANALYZE"))


# -- data, in set-based SQL -----------------------------------------------------------------


@dataclass(frozen=True)
class BatchSpec:
    points: int
    expires_at: datetime | None


@dataclass(frozen=True)
class BenchMember:
    id: int
    public_id: str


def number_series(conn: AsyncConnection, count: int) -> FromClause:
    """Rows n = 1..count."""
    if conn.dialect.name == "postgresql":
        return func.generate_series(1, count).table_valued("n").render_derived(name="numbers")
    numbers = select(literal(1, Integer).label("n")).cte("numbers", recursive=True)
    return numbers.union_all(select(numbers.c.n + 1).where(numbers.c.n < count))


def _text(prefix: str, number: ColumnElement[Any]) -> ColumnElement[str]:
    return literal(prefix, String).concat(cast(number, String))


def _at(moment: datetime | None) -> ColumnElement[Any]:
    return literal(moment, UTCDateTime())


async def insert_members(
    conn: AsyncConnection, label: str, count: int, now: datetime
) -> list[BenchMember]:
    numbers = number_series(conn, count)
    columns: dict[str, ColumnElement[Any]] = {
        "public_id": _text(f"mem_{label}", numbers.c.n),
        "first_name": literal("Bench", String),
        "status": literal(MemberStatus.ACTIVE, String),
        "consent_email": literal(False),
        "consent_sms": literal(False),
        "consent_analytics": literal(False),
        "consent_profiling": literal(False),
        "custom_fields": literal({}, JSONType),
        "external_ids": literal({}, JSONType),
        "cancel_at_period_end": literal(False),
        "version": literal(1, Integer),
        "member_since": _at(now),
        "created_at": _at(now),
        "updated_at": _at(now),
    }
    rows = await conn.execute(
        insert(MEMBERS)
        .from_select(list(columns), select(*columns.values()).select_from(numbers))
        .returning(MEMBERS.c.id, MEMBERS.c.public_id)
    )
    return sorted((BenchMember(row.id, row.public_id) for row in rows), key=lambda m: m.id)


async def seed_ledgers(
    conn: AsyncConnection,
    members: Sequence[BenchMember] | None,
    specs: Sequence[BatchSpec],
    now: datetime,
) -> None:
    """For each member (None: every member): one award transaction and one active batch per
    spec, and the account holding their sum, as the ledger would have written them."""
    member_ids = [m.id for m in members] if members is not None else None

    def chosen(column: Any) -> Any:
        return column.in_(member_ids) if member_ids is not None else literal(True)

    balance = 0
    for number, spec in enumerate(specs):
        balance += spec.points
        occurred_at = now - timedelta(seconds=len(specs) - number)
        marker = f"bench seed {number}"
        txn_columns: dict[str, ColumnElement[Any]] = {
            "public_id": _text(f"txn_s{number}x", MEMBERS.c.id),
            "member_id": MEMBERS.c.id,
            "type": literal(TxnType.AWARD, String),
            "points": literal(spec.points, Integer),
            "pending_points": literal(0, Integer),
            "balance_after": literal(balance, Integer),
            "pending_after": literal(0, Integer),
            "reason": literal(marker, String),
            "details": literal({}, JSONType),
            "actor": literal(BENCH_ACTOR, String),
            "occurred_at": _at(occurred_at),
        }
        await conn.execute(
            insert(TRANSACTIONS).from_select(
                list(txn_columns), select(*txn_columns.values()).where(chosen(MEMBERS.c.id))
            )
        )
        batch_columns: dict[str, ColumnElement[Any]] = {
            "public_id": _text(f"pbt_s{number}x", TRANSACTIONS.c.member_id),
            "member_id": TRANSACTIONS.c.member_id,
            "status": literal(BatchStatus.ACTIVE, String),
            "source": literal(BatchSource.AWARD, String),
            "initial": literal(spec.points, Integer),
            "remaining": literal(spec.points, Integer),
            "expired_points": literal(0, Integer),
            "recovered_points": literal(0, Integer),
            "reversed_points": literal(0, Integer),
            "cancelled_points": literal(0, Integer),
            "transaction_id": TRANSACTIONS.c.id,
            "expires_at": _at(spec.expires_at),
            "created_at": _at(occurred_at),
        }
        await conn.execute(
            insert(BATCHES).from_select(
                list(batch_columns),
                select(*batch_columns.values()).where(
                    TRANSACTIONS.c.type == TxnType.AWARD,
                    TRANSACTIONS.c.occurred_at == occurred_at,
                    TRANSACTIONS.c.reason == marker,
                    chosen(TRANSACTIONS.c.member_id),
                ),
            )
        )
    account_columns: dict[str, ColumnElement[Any]] = {
        "member_id": MEMBERS.c.id,
        "current": literal(balance, Integer),
        "pending": literal(0, Integer),
        "lifetime_earned": literal(balance, Integer),
        "lifetime_redeemed": literal(0, Integer),
        "lifetime_expired": literal(0, Integer),
        "last_activity_at": _at(now if specs else None),
        "updated_at": _at(now),
    }
    await conn.execute(
        insert(ACCOUNTS).from_select(
            list(account_columns), select(*account_columns.values()).where(chosen(MEMBERS.c.id))
        )
    )


def redeem_specs(now: datetime) -> list[BatchSpec]:
    # Expiries run against insertion order, so the drawing order is not the id order.
    return [
        BatchSpec(REDEEM_BATCH_POINTS, now + timedelta(days=REDEEM_BATCHES - number))
        for number in range(REDEEM_BATCHES)
    ]


def expiry_specs(now: datetime, due_per_member: int) -> list[BatchSpec]:
    due = [
        BatchSpec(10 + number, now - timedelta(hours=due_per_member - number))
        for number in range(due_per_member)
    ]
    return [*due, BatchSpec(NOT_DUE_POINTS, now + timedelta(days=365))]


@dataclass(frozen=True)
class LedgerFixtures:
    award_members: list[BenchMember]
    one_member: BenchMember
    http_redeemers: list[BenchMember]
    raw_redeemers: list[BenchMember]


async def prepare_ledger(url: str, sizes: Sizes) -> LedgerFixtures:
    now = utcnow()
    db = Database(url, pool_size=1)
    try:
        async with db.transaction() as session:
            conn = await session.connection()
            awardees = await insert_members(
                conn, "a", sizes.concurrency * AWARD_MEMBERS_PER_CLIENT + 1, now
            )
            await seed_ledgers(conn, awardees, [], now)
            per_side = REDEEM_WARMUP + sizes.redeems
            redeemers = await insert_members(conn, "r", 2 * per_side, now)
            await seed_ledgers(conn, redeemers, redeem_specs(now), now)
    finally:
        await db.dispose()
    return LedgerFixtures(
        award_members=awardees[:-1],
        one_member=awardees[-1],
        http_redeemers=redeemers[:per_side],
        raw_redeemers=redeemers[per_side:],
    )


# -- award ----------------------------------------------------------------------------------


Operation = Callable[[int], Awaitable[None]]


async def rate(operation: Operation, count: int, concurrency: int) -> float:
    """Operations per second for `operation(i)`, i in range(count), from `concurrency` workers."""
    indexes = iter(range(count))

    async def worker() -> None:
        for index in indexes:  # shared: each index is taken by exactly one worker
            await operation(index)

    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(worker())
    return count / (time.perf_counter() - started)


async def median_rate(operation: Operation, sizes: Sizes) -> float:
    await rate(operation, sizes.concurrency * 2, sizes.concurrency)
    rates = [await rate(operation, sizes.awards, sizes.concurrency) for _ in range(sizes.rounds)]
    return statistics.median(rates)


async def raw_award(conn: AsyncConnection, member_id: int, points: int) -> None:
    """The bare award: lock the account, append the transaction and the batch, add."""
    now = utcnow()
    current = await conn.scalar(
        select(ACCOUNTS.c.current).where(ACCOUNTS.c.member_id == member_id).with_for_update()
    )
    assert current is not None
    txn_id = await conn.scalar(
        insert(TRANSACTIONS).returning(TRANSACTIONS.c.id),
        {
            "public_id": new_public_id("txn"),
            "member_id": member_id,
            "type": TxnType.AWARD,
            "points": points,
            "pending_points": 0,
            "balance_after": current + points,
            "pending_after": 0,
            "reason": "bench",
            "details": {"requested_points": points},
            "actor": BENCH_ACTOR,
            "occurred_at": now,
        },
    )
    await conn.execute(
        insert(BATCHES),
        {
            "public_id": new_public_id("pbt"),
            "member_id": member_id,
            "status": BatchStatus.ACTIVE,
            "source": BatchSource.AWARD,
            "initial": points,
            "remaining": points,
            "expired_points": 0,
            "recovered_points": 0,
            "reversed_points": 0,
            "cancelled_points": 0,
            "transaction_id": txn_id,
            "created_at": now,
        },
    )
    await conn.execute(
        update(ACCOUNTS)
        .where(ACCOUNTS.c.member_id == member_id)
        .values(
            current=ACCOUNTS.c.current + points,
            lifetime_earned=ACCOUNTS.c.lifetime_earned + points,
            last_activity_at=now,
            updated_at=now,
        )
    )


async def measure_raw_awards(
    url: str, fixtures: LedgerFixtures, sizes: Sizes
) -> tuple[float, float]:
    """(distinct members, one member) awards per second."""
    db = Database(url, pool_size=sizes.concurrency)

    def award_to(pick: Callable[[int], BenchMember]) -> Operation:
        async def one(index: int) -> None:
            # On SQLite one writer at a time, queued as the application queues its writers.
            async with db.writer_slot(read_only=False), db.engine.begin() as conn:
                await raw_award(conn, pick(index).id, AWARD_POINTS)

        return one

    members = fixtures.award_members
    try:
        distinct = await median_rate(award_to(lambda i: members[i % len(members)]), sizes)
        one = await median_rate(award_to(lambda _i: fixtures.one_member), sizes)
    finally:
        await db.dispose()
    return distinct, one


def _client(base_url: str, key: str, concurrency: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(
        base_url=base_url,
        headers={"Authorization": f"Bearer {key}"},
        limits=limits,
        timeout=120,
    )


async def measure_http_awards(
    base_url: str, key: str, fixtures: LedgerFixtures, sizes: Sizes
) -> tuple[float, float]:
    """(distinct members, one member) awards per second."""
    async with _client(base_url, key, sizes.concurrency) as client:

        def award_to(pick: Callable[[int], BenchMember]) -> Operation:
            async def one(index: int) -> None:
                body = {
                    "member_id": pick(index).public_id,
                    "points": AWARD_POINTS,
                    "reason": "bench",
                }
                response = await client.post("/api/v1/points/award", json=body)
                if response.status_code != 201:
                    raise RuntimeError(
                        f"POST /api/v1/points/award: {response.status_code} {response.text}"
                    )

            return one

        members = fixtures.award_members
        distinct = await median_rate(award_to(lambda i: members[i % len(members)]), sizes)
        one = await median_rate(award_to(lambda _i: fixtures.one_member), sizes)
    return distinct, one


# -- redeem across 50 batches ---------------------------------------------------------------


async def raw_redeem(conn: AsyncConnection, member_id: int, points: int) -> None:
    """The bare redemption: lock the account and the batches, soonest expiry first, take from
    them, append the transaction and its allocations, subtract."""
    now = utcnow()
    current = await conn.scalar(
        select(ACCOUNTS.c.current).where(ACCOUNTS.c.member_id == member_id).with_for_update()
    )
    assert current is not None
    assert current >= points
    batches = (
        await conn.execute(
            select(BATCHES.c.id, BATCHES.c.remaining)
            .where(
                BATCHES.c.member_id == member_id,
                BATCHES.c.status == BatchStatus.ACTIVE,
                BATCHES.c.remaining > 0,
            )
            .order_by(BATCHES.c.expires_at.is_(None), BATCHES.c.expires_at, BATCHES.c.id)
            .with_for_update()
        )
    ).all()
    taken: list[tuple[int, int, int]] = []  # (batch id, points taken, points left)
    left = points
    for batch_id, remaining in batches:
        if left == 0:
            break
        take = min(remaining, left)
        taken.append((batch_id, take, remaining - take))
        left -= take
    assert left == 0
    await conn.execute(
        update(BATCHES)
        .where(BATCHES.c.id == bindparam("b_id"))
        .values(remaining=bindparam("b_remaining"), status=bindparam("b_status")),
        [
            {
                "b_id": batch_id,
                "b_remaining": rest,
                "b_status": BatchStatus.ACTIVE if rest else BatchStatus.SPENT,
            }
            for batch_id, _take, rest in taken
        ],
    )
    txn_id = await conn.scalar(
        insert(TRANSACTIONS).returning(TRANSACTIONS.c.id),
        {
            "public_id": new_public_id("txn"),
            "member_id": member_id,
            "type": TxnType.REDEEM,
            "points": -points,
            "pending_points": 0,
            "balance_after": current - points,
            "pending_after": 0,
            "reason": "bench",
            "details": {"requested_points": points},
            "actor": BENCH_ACTOR,
            "occurred_at": now,
        },
    )
    await conn.execute(
        insert(ALLOCATIONS),
        [
            {"transaction_id": txn_id, "batch_id": batch_id, "points": take}
            for batch_id, take, _rest in taken
        ],
    )
    await conn.execute(
        update(ACCOUNTS)
        .where(ACCOUNTS.c.member_id == member_id)
        .values(
            current=ACCOUNTS.c.current - points,
            lifetime_redeemed=ACCOUNTS.c.lifetime_redeemed + points,
            last_activity_at=now,
            updated_at=now,
        )
    )


async def latencies(operation: Operation, members: int) -> Latencies:
    """One after another: the first REDEEM_WARMUP uncounted, the rest timed."""
    seconds = []
    for index in range(members):
        started = time.perf_counter()
        await operation(index)
        if index >= REDEEM_WARMUP:
            seconds.append(time.perf_counter() - started)
    return Latencies(seconds)


async def measure_raw_redeems(url: str, fixtures: LedgerFixtures) -> Latencies:
    db = Database(url, pool_size=1)
    members = fixtures.raw_redeemers

    async def one(index: int) -> None:
        async with db.writer_slot(read_only=False), db.engine.begin() as conn:
            await raw_redeem(conn, members[index].id, REDEEM_POINTS)

    try:
        return await latencies(one, len(members))
    finally:
        await db.dispose()


async def measure_http_redeems(base_url: str, key: str, fixtures: LedgerFixtures) -> Latencies:
    members = fixtures.http_redeemers
    async with _client(base_url, key, 1) as client:

        async def one(index: int) -> None:
            body = {"member_id": members[index].public_id, "points": REDEEM_POINTS}
            response = await client.post("/api/v1/points/redeem", json=body)
            if response.status_code != 201:
                raise RuntimeError(
                    f"POST /api/v1/points/redeem: {response.status_code} {response.text}"
                )
            drawn = len(response.json()["transaction"]["allocations"])
            if drawn != REDEEM_BATCHES:
                raise RuntimeError(f"the redemption drew from {drawn} batches, not 50")

        return await latencies(one, len(members))


# -- expiry ---------------------------------------------------------------------------------


async def prepare_expiry(url: str, sizes: Sizes, now: datetime) -> None:
    db = Database(url, pool_size=1)
    try:
        async with db.transaction() as session:
            conn = await session.connection()
            await insert_members(conn, "e", sizes.members, now)
            await seed_ledgers(conn, None, expiry_specs(now, sizes.batches_per_member), now)
    finally:
        await db.dispose()


async def warm(db: Database) -> None:
    """Read the batches once, so neither side pays for a cold cache the other does not."""
    async with db.transaction(read_only=True) as session:
        await session.execute(select(func.count(), func.sum(BATCHES.c.remaining)))


async def time_plain_update(url: str, now: datetime) -> tuple[float, int]:
    db = Database(url, pool_size=1)
    try:
        await warm(db)
        started = time.perf_counter()
        async with db.transaction() as session:
            result = await session.execute(
                update(BATCHES)
                .where(
                    BATCHES.c.status == BatchStatus.ACTIVE,
                    BATCHES.c.expires_at.is_not(None),
                    BATCHES.c.expires_at <= now,
                )
                .values(
                    status=BatchStatus.EXPIRED,
                    expired_points=BATCHES.c.expired_points + BATCHES.c.remaining,
                    remaining=0,
                )
            )
        elapsed = time.perf_counter() - started
        return elapsed, int(getattr(result, "rowcount", -1))
    finally:
        await db.dispose()


async def time_job(url: str, now: datetime) -> tuple[float, int]:
    db = Database(url, pool_size=2)
    try:
        await warm(db)
        started = time.perf_counter()
        expired = await expire_points(db, now)
        return time.perf_counter() - started, expired
    finally:
        await db.dispose()


# -- checks ---------------------------------------------------------------------------------


async def _count(conn: AsyncConnection, query: Any) -> int:
    return int(await conn.scalar(query) or 0)


async def ledger_problems(url: str) -> list[str]:
    """Accounts whose balance is not the sum of their active batches."""
    db = Database(url, pool_size=1)
    try:
        async with db.engine.connect() as conn:
            held = (
                select(BATCHES.c.member_id, func.sum(BATCHES.c.remaining).label("points"))
                .where(BATCHES.c.status == BatchStatus.ACTIVE)
                .group_by(BATCHES.c.member_id)
                .subquery()
            )
            mismatched = await _count(
                conn,
                select(func.count())
                .select_from(ACCOUNTS.outerjoin(held, held.c.member_id == ACCOUNTS.c.member_id))
                .where(ACCOUNTS.c.current != func.coalesce(held.c.points, 0)),
            )
    finally:
        await db.dispose()
    return [f"{mismatched} accounts differ from the sum of their active batches"] * (mismatched > 0)


async def expiry_problems(url: str, now: datetime, sizes: Sizes, expired: int) -> list[str]:
    problems = await ledger_problems(url)
    due_per_member = sizes.batches_per_member
    expected = sizes.members * due_per_member
    db = Database(url, pool_size=1)
    try:
        async with db.engine.connect() as conn:
            due = await _count(
                conn,
                select(func.count()).where(
                    BATCHES.c.status == BatchStatus.ACTIVE,
                    BATCHES.c.expires_at.is_not(None),
                    BATCHES.c.expires_at <= now,
                ),
            )
            kept = await _count(
                conn,
                select(func.count()).where(
                    BATCHES.c.status == BatchStatus.ACTIVE,
                    BATCHES.c.remaining == NOT_DUE_POINTS,
                ),
            )
            expire_txns = await _count(
                conn, select(func.count()).where(TRANSACTIONS.c.type == TxnType.EXPIRE)
            )
            expired_events = await _count(
                conn, select(func.count()).where(EVENTS.c.type == "points.expired")
            )
            named = await _count(
                conn,
                select(func.count())
                .select_from(
                    BATCHES.join(
                        TRANSACTIONS, TRANSACTIONS.c.id == BATCHES.c.expired_transaction_id
                    )
                )
                .where(
                    TRANSACTIONS.c.type == TxnType.EXPIRE,
                    TRANSACTIONS.c.member_id == BATCHES.c.member_id,
                ),
            )
    finally:
        await db.dispose()
    if due:
        problems.append(f"{due} batches are still due after the job")
    if expired != expected:
        problems.append(f"the job expired {expired} batches, not {expected}")
    if kept != sizes.members:
        problems.append(f"{sizes.members - kept} batches that were not due lost their points")
    if expire_txns != sizes.members:
        problems.append(f"{expire_txns} expire transactions for {sizes.members} members")
    if expired_events != sizes.members:
        problems.append(f"{expired_events} points.expired events for {sizes.members} members")
    if named != expected:
        problems.append(f"{named} expired batches name their expire transaction, of {expected}")
    return problems


# -- main -----------------------------------------------------------------------------------


def bench_ledger(backend: str, scratch: Scratch, sizes: Sizes, parts: set[str]) -> list[str]:
    """Awards and redemptions: print their lines; return what the checks found wrong."""
    url = scratch.new("ledger")
    key = asyncio.run(issue_admin_key(url))
    fixtures = asyncio.run(prepare_ledger(url, sizes))
    settle(url)
    if "award" in parts:
        raw_distinct, raw_one = asyncio.run(measure_raw_awards(url, fixtures, sizes))
    if "redeem" in parts:
        raw_redeems = asyncio.run(measure_raw_redeems(url, fixtures))
    with running_server(url) as base_url:
        if "award" in parts:
            http_distinct, http_one = asyncio.run(
                measure_http_awards(base_url, key, fixtures, sizes)
            )
        if "redeem" in parts:
            http_redeems = asyncio.run(measure_http_redeems(base_url, key, fixtures))
    if "award" in parts:
        print(AwardResult(backend, "award", http_distinct, raw_distinct).line(), flush=True)
        print(AwardResult(backend, "award-one", http_one, raw_one).line(), flush=True)
    if "redeem" in parts:
        print(RedeemResult(backend, http_redeems, raw_redeems).line(), flush=True)
    return asyncio.run(ledger_problems(url))


def quiesce(scratch: Scratch) -> None:
    """Write out what copying the databases left dirty, so the side timed next does not pay
    for it: the file system's buffers, and on PostgreSQL a checkpoint."""
    os.sync()
    if scratch.server_url is not None:
        asyncio.run(pg_execute(scratch.server_url, "CHECKPOINT"))


def bench_expiry(backend: str, scratch: Scratch, sizes: Sizes) -> list[str]:
    """The job against the plain UPDATE in rounds on fresh copies of one prepared database,
    alternating which side goes first; print each round and the medians; return what the
    checks found wrong."""
    problems: list[str] = []
    expected = sizes.members * sizes.batches_per_member
    now = utcnow()
    template = scratch.new("expire")
    asyncio.run(prepare_expiry(template, sizes, now))
    settle(template)
    job_times: list[float] = []
    update_times: list[float] = []
    for round_number in range(sizes.expire_rounds):
        job_url = scratch.copy("expire", f"expire_job{round_number}")
        update_url = scratch.copy("expire", f"expire_plain{round_number}")
        job_first = round_number % 2 == 0
        timed: dict[str, tuple[float, int]] = {}
        for side in ("job", "update") if job_first else ("update", "job"):
            quiesce(scratch)
            timed[side] = asyncio.run(
                time_job(job_url, now) if side == "job" else time_plain_update(update_url, now)
            )
        (job_seconds, expired), (update_seconds, updated) = timed["job"], timed["update"]
        job_times.append(job_seconds)
        update_times.append(update_seconds)
        print(
            f"{_prefix(backend, 'expire')}   round {round_number + 1} "
            f"({'job' if job_first else 'update'} first): job {job_seconds:.2f} s   "
            f"plain update {update_seconds:.2f} s   ratio {job_seconds / update_seconds:.2f}   "
            f"load {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        if updated != expected:
            problems.append(f"the plain update changed {updated} batches, not {expected}")
        problems += asyncio.run(expiry_problems(job_url, now, sizes, expired))
    print(ExpiryResult(backend, expected, job_times, update_times).line(), flush=True)
    return problems


PARTS = ("award", "redeem", "expire")


def bench_backend(backend: str, scratch: Scratch, sizes: Sizes, parts: set[str]) -> list[str]:
    """Print the backend's lines as they come; return what the checks found wrong."""
    problems: list[str] = []
    if parts & {"award", "redeem"}:
        problems += bench_ledger(backend, scratch, sizes, parts)
    if "expire" in parts:
        problems += bench_expiry(backend, scratch, sizes)
    return [f"{backend}: {problem}" for problem in problems]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small numbers, to check it runs")
    parser.add_argument(
        "--requests", type=int, help=f"awards per round and side (default {FULL_AWARDS})"
    )
    parser.add_argument(
        "--rounds", type=int, help=f"award rounds, the median counts (default {ROUNDS})"
    )
    parser.add_argument(
        "--redeems", type=int, help=f"timed redemptions per side (default {FULL_REDEEMS})"
    )
    parser.add_argument(
        "--batches", type=int, help=f"due batches for the expiry (default {FULL_BATCHES})"
    )
    parser.add_argument(
        "--members", type=int, help=f"members holding them (default {FULL_MEMBERS})"
    )
    parser.add_argument(
        "--expire-rounds",
        type=int,
        help=f"expiry rounds per side, the median counts (default {ROUNDS})",
    )
    parser.add_argument(
        "--only", choices=PARTS, action="append", help="run only this part (repeatable)"
    )
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    parser.add_argument(
        "--backend",
        choices=("both", "all", "sqlite", "postgresql"),
        default="both",
        help="default: both",
    )
    return parser.parse_args(argv)


def sizes_from(args: argparse.Namespace) -> Sizes:
    quick = args.quick
    return Sizes(
        awards=args.requests or (QUICK_AWARDS if quick else FULL_AWARDS),
        rounds=args.rounds or (1 if quick else ROUNDS),
        redeems=max(2, args.redeems or (QUICK_REDEEMS if quick else FULL_REDEEMS)),
        batches=args.batches or (QUICK_BATCHES if quick else FULL_BATCHES),
        members=args.members or (QUICK_MEMBERS if quick else FULL_MEMBERS),
        concurrency=args.concurrency,
        expire_rounds=args.expire_rounds or (1 if quick else ROUNDS),
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = sizes_from(args)
    explicit_pg = os.environ.get("MEMBERHUB_BENCH_POSTGRES_URL")
    pg_url = explicit_pg or os.environ.get("MEMBERHUB_TEST_DATABASE_URL") or DEFAULT_POSTGRES_URL
    print(
        f"points ledger, HTTP and job vs raw SQL: awards from {sizes.concurrency} concurrent "
        f"clients (median of {sizes.rounds} x {sizes.awards}), {sizes.redeems} redemptions "
        f"across {REDEEM_BATCHES} batches, expiry of "
        f"{sizes.members * sizes.batches_per_member} batches over {sizes.members} members "
        f"(median of {sizes.expire_rounds} rounds); load average {os.getloadavg()[0]:.2f}"
    )
    problems: list[str] = []
    for backend in backends_named(args.backend):
        if backend == "postgresql":
            required = bool(explicit_pg) or args.backend == "postgresql"
            usable = postgres_usable(pg_url, required=required, label="postgresql ")
            if usable is None:
                return 1
            if not usable:
                continue
        with scratch_space(backend, pg_url) as scratch:
            problems += bench_backend(backend, scratch, sizes, set(args.only or PARTS))
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    for problem in problems:
        print(f"LEDGER CHECK FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
