"""The expiry of one chunk of members, in as few statements and passes over the batches as
the database allows.

Each member whose batches expire gets one expire transaction summarising them (the points,
and `details.batches`: how many), its account loses those points, and each batch keeps what
it lost in `expired_points` and names the transaction in `expired_transaction_id`: no row is
written per batch besides the batch's own update. One `points.expired` event per member
carries the transaction's totals.

An active batch has never lost anything to expiry (a batch expires once, and nothing makes
an expired batch active again; a recovery gives the points back as a new batch), so setting
`expired_points` to what remained is what the batch lost, and reading `expired_points` back
from the update is what this expiry took.

PostgreSQL: the chunk's accounts are locked first, skipping those another worker holds (it
has those members; the next run takes any it leaves). A second statement, whose snapshot is
taken with the locks held so it reads the batches as they are, does everything else with
data-modifying CTEs: it draws the transaction ids (`nextval`), updates the batches once and
totals what that update returns per member, updates the accounts, and inserts the
transactions and events from those totals.

SQLite: the transaction holds the database's write lock from its BEGIN IMMEDIATE, so nothing
changes between its statements and no row lock is needed. The due batches are read once to
total them per member (with the balances and members' references in the same statement),
the transactions are inserted, and then the batches and the accounts are updated from them,
the batches in the one pass that expires them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    ColumnElement,
    Insert,
    Select,
    Sequence,
    String,
    Table,
    any_,
    bindparam,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.events.catalog import PointsExpired
from memberhub.events.models import Event
from memberhub.events.sequencer import mark_for_sequencing
from memberhub.kit.actor import Actor
from memberhub.kit.db import UTCDateTime
from memberhub.kit.ids import new_public_ids
from memberhub.members.models import Member
from memberhub.points.models import (
    BatchStatus,
    PointAccount,
    PointBatch,
    PointTransaction,
    TxnType,
)
from memberhub.points.repository import PointsRepository

TXNS = cast(Table, PointTransaction.__table__)
BATCHES = cast(Table, PointBatch.__table__)
ACCOUNTS = cast(Table, PointAccount.__table__)
MEMBERS = cast(Table, Member.__table__)
EVENTS = cast(Table, Event.__table__)

REASON = "Points expired"
# Who expires points, in the job and before a spend alike.
SCHEDULER = Actor.system("system:scheduler")


@dataclass(frozen=True)
class ChunkExpired:
    """What expiring a chunk did: the last member id it looked at (the next chunk starts
    after it), and the members, batches and points expired."""

    last_member_id: int
    members: int
    batches: int
    points: int


def _due(now: ColumnElement[Any]) -> list[ColumnElement[bool]]:
    return [
        BATCHES.c.status == BatchStatus.ACTIVE,
        BATCHES.c.expires_at.is_not(None),
        BATCHES.c.expires_at <= now,
    ]


def _event_template(now: datetime) -> dict[str, Any]:
    """The `points.expired` data as the event model dumps it, with the values that are the
    same for every member of the run; each member's own are put over it."""
    return PointsExpired(
        member_id="", transaction_id="", points=0, balance_after=0, batches=0, occurred_at=now
    ).model_dump(mode="json")


# -- PostgreSQL -----------------------------------------------------------------------------

_MEMBER_IDS = bindparam("member_ids", type_=ARRAY(BigInteger))
_NOW = bindparam("now", type_=UTCDateTime())

_LOCK_ON_POSTGRESQL = (
    select(ACCOUNTS.c.member_id)
    .where(ACCOUNTS.c.member_id == any_(_MEMBER_IDS))
    .order_by(ACCOUNTS.c.member_id)
    .with_for_update(skip_locked=True)
)


def _expire_on_postgresql() -> Select[Any]:
    # `= ANY(:member_ids)` next to a join keeps the members and the accounts read by index:
    # the planner cannot tell how few rows the CTEs hold. The batches are read member by
    # member from the chunk, by the (status, member, expiry) index.
    given = (
        func.unnest(
            _MEMBER_IDS,
            bindparam("txn_public_ids", type_=ARRAY(String)),
            bindparam("event_public_ids", type_=ARRAY(String)),
        )
        .table_valued("member_id", "txn_public_id", "event_public_id")
        .render_derived(name="given")
    )
    # One transaction id per member, drawn before the batches are updated to name it.
    chunk = (
        select(
            given.c.member_id,
            given.c.txn_public_id,
            given.c.event_public_id,
            Sequence("point_transactions_id_seq").next_value().label("txn_id"),
            MEMBERS.c.public_id.label("member_public_id"),
            MEMBERS.c.organisation_id,
        )
        .join_from(given, MEMBERS, MEMBERS.c.id == given.c.member_id)
        .where(MEMBERS.c.id == any_(_MEMBER_IDS))
        .cte("chunk")
    )
    carried = [c for c in chunk.c if c.name != "member_id"]
    expired = (
        update(BATCHES)
        .where(
            BATCHES.c.member_id == chunk.c.member_id,
            *_due(_NOW),
        )
        .values(
            status=BatchStatus.EXPIRED,
            expired_points=BATCHES.c.remaining,
            remaining=0,
            expired_transaction_id=chunk.c.txn_id,
        )
        .returning(BATCHES.c.member_id, BATCHES.c.expired_points.label("points"), *carried)
        .cte("expired")
    )
    per_member = [expired.c.member_id, *(expired.c[c.name] for c in carried)]
    totals = (
        select(
            *per_member,
            func.sum(expired.c.points).label("points"),
            func.count().label("batches"),
        )
        .group_by(*per_member)
        .cte("totals")
    )
    rows = (
        update(ACCOUNTS)
        .where(
            ACCOUNTS.c.member_id == totals.c.member_id, ACCOUNTS.c.member_id == any_(_MEMBER_IDS)
        )
        .values(
            current=ACCOUNTS.c.current - totals.c.points,
            lifetime_expired=ACCOUNTS.c.lifetime_expired + totals.c.points,
            last_activity_at=_NOW,
            updated_at=_NOW,
        )
        .returning(
            ACCOUNTS.c.current.label("balance_after"),
            ACCOUNTS.c.pending.label("pending_after"),
            *totals.c,
        )
        .cte("rows")
    )
    txn_columns: dict[str, ColumnElement[Any]] = {
        "id": rows.c.txn_id,
        "public_id": rows.c.txn_public_id,
        "member_id": rows.c.member_id,
        "type": literal(TxnType.EXPIRE),
        "points": -rows.c.points,
        "pending_points": literal(0),
        "balance_after": rows.c.balance_after,
        "pending_after": rows.c.pending_after,
        "reason": literal(REASON),
        "details": func.jsonb_build_object("batches", rows.c.batches),
        "actor": bindparam("actor", type_=String()),
        "occurred_at": _NOW,
    }
    txns = (
        insert(TXNS)
        .from_select(list(txn_columns), select(*txn_columns.values()).order_by(rows.c.member_id))
        .cte("txns")
    )
    event_columns: dict[str, ColumnElement[Any]] = {
        "public_id": rows.c.event_public_id,
        "type": literal(PointsExpired.event_type),
        "version": literal(PointsExpired.version),
        "occurred_at": _NOW,
        "organisation_id": rows.c.organisation_id,
        "member_public_id": rows.c.member_public_id,
        "data": bindparam("event_template", type_=JSONB()).op("||")(
            func.jsonb_build_object(
                "member_id",
                rows.c.member_public_id,
                "transaction_id",
                rows.c.txn_public_id,
                "points",
                rows.c.points,
                "balance_after",
                rows.c.balance_after,
                "batches",
                rows.c.batches,
            )
        ),
    }
    # Events in member order, as the transactions: ids are drawn in the order rows arrive.
    events = (
        insert(EVENTS)
        .from_select(
            list(event_columns), select(*event_columns.values()).order_by(rows.c.member_id)
        )
        .cte("events")
    )
    return select(
        func.count(),
        func.coalesce(func.sum(rows.c.batches), 0),
        func.coalesce(func.sum(rows.c.points), 0),
    ).add_cte(txns, events)


_EXPIRE_ON_POSTGRESQL = _expire_on_postgresql()


async def _expire_on_postgresql_chunk(
    session: AsyncSession, after_member_id: int, limit: int, now: datetime, actor_id: str
) -> ChunkExpired | None:
    member_ids = await PointsRepository(session).members_with_due_batches(
        BatchStatus.ACTIVE, "expires_at", now, after_member_id, limit
    )
    if not member_ids:
        return None
    locked = list((await session.scalars(_LOCK_ON_POSTGRESQL, {"member_ids": member_ids})).all())
    if not locked:
        return ChunkExpired(member_ids[-1], 0, 0, 0)
    members, batches, points = (
        await session.execute(
            _EXPIRE_ON_POSTGRESQL,
            {
                "member_ids": locked,
                "txn_public_ids": new_public_ids("txn", len(locked)),
                "event_public_ids": new_public_ids("evt", len(locked)),
                "now": now,
                "actor": actor_id,
                "event_template": _event_template(now),
            },
        )
    ).one()
    return ChunkExpired(member_ids[-1], int(members), int(batches), int(points))


# -- SQLite ---------------------------------------------------------------------------------


def _due_totals_on_sqlite() -> Select[Any]:
    due = (
        select(
            BATCHES.c.member_id,
            func.sum(BATCHES.c.remaining).label("points"),
            func.count().label("batches"),
        )
        .where(BATCHES.c.member_id > bindparam("after"), *_due(_NOW))
        .group_by(BATCHES.c.member_id)
        .order_by(BATCHES.c.member_id)
        .limit(bindparam("limit"))
        .subquery("due")
    )
    # And the largest transaction id so far: this chunk's transactions will be those above.
    last_txn_id = select(func.coalesce(func.max(TXNS.c.id), 0)).scalar_subquery()
    return (
        select(
            due.c.member_id,
            MEMBERS.c.public_id.label("member_public_id"),
            MEMBERS.c.organisation_id,
            due.c.points,
            (ACCOUNTS.c.current - due.c.points).label("balance_after"),
            ACCOUNTS.c.pending.label("pending_after"),
            due.c.batches,
            last_txn_id.label("last_txn_id"),
        )
        .join_from(due, ACCOUNTS, ACCOUNTS.c.member_id == due.c.member_id)
        .join(MEMBERS, MEMBERS.c.id == due.c.member_id)
        .order_by(due.c.member_id)
    )


_DUE_TOTALS_ON_SQLITE = _due_totals_on_sqlite()

# The chunk's rows, one JSON array per member in the order of `_ROW_FIELDS`, sent as one
# parameter and read back with json_each: one statement inserts them all, with no work per
# row on this side beyond listing the values. A row is the member's two new public ids and
# its columns of the due totals (all but the last, the chunk's largest transaction id).
_ROW_FIELDS = (
    "txn_public_id",
    "event_public_id",
    *_DUE_TOTALS_ON_SQLITE.selected_columns.keys()[:-1],
)
_ROWS = func.json_each(bindparam("rows", type_=String())).table_valued("value")


def _field(name: str) -> ColumnElement[Any]:
    return func.json_extract(_ROWS.c.value, f"$[{_ROW_FIELDS.index(name)}]")


def _insert_txns_on_sqlite() -> Insert:
    columns: dict[str, ColumnElement[Any]] = {
        "public_id": _field("txn_public_id"),
        "member_id": _field("member_id"),
        "type": literal(TxnType.EXPIRE),
        "points": -_field("points"),
        "pending_points": literal(0),
        "balance_after": _field("balance_after"),
        "pending_after": _field("pending_after"),
        "reason": literal(REASON),
        "details": func.json_object("batches", _field("batches")),
        "actor": bindparam("actor", type_=String()),
        "occurred_at": _NOW,
    }
    return insert(TXNS).from_select(list(columns), select(*columns.values()))


def _insert_events_on_sqlite() -> Insert:
    columns: dict[str, ColumnElement[Any]] = {
        "public_id": _field("event_public_id"),
        "type": literal(PointsExpired.event_type),
        "version": literal(PointsExpired.version),
        "occurred_at": _NOW,
        "organisation_id": _field("organisation_id"),
        "member_public_id": _field("member_public_id"),
        "data": func.json_patch(
            bindparam("event_template", type_=JSON()),
            func.json_object(
                "member_id",
                _field("member_public_id"),
                "transaction_id",
                _field("txn_public_id"),
                "points",
                _field("points"),
                "balance_after",
                _field("balance_after"),
                "batches",
                _field("batches"),
            ),
        ),
    }
    return insert(EVENTS).from_select(list(columns), select(*columns.values()))


_INSERT_TXNS_ON_SQLITE = _insert_txns_on_sqlite()
_INSERT_EVENTS_ON_SQLITE = _insert_events_on_sqlite()
# The transactions just inserted: those above the largest id before them, as the write lock
# let no other writer in. (Their time too, so that the batches' update finds each member's
# by one seek in the (member, time, id) index.)
_CHUNK_TXNS = (
    select(TXNS.c.id, TXNS.c.member_id, TXNS.c.points, TXNS.c.balance_after)
    .where(TXNS.c.occurred_at == _NOW, TXNS.c.id > bindparam("last_txn_id"))
    .subquery("chunk_txns")
)
# The chunk's members are all those with due batches in (after, last]: the range keeps the
# batches read by the (status, member) index to the chunk's.
_EXPIRE_BATCHES_ON_SQLITE = (
    update(BATCHES)
    .where(
        BATCHES.c.member_id == _CHUNK_TXNS.c.member_id,
        BATCHES.c.member_id > bindparam("after"),
        BATCHES.c.member_id <= bindparam("last_member_id"),
        *_due(_NOW),
    )
    .values(
        status=BatchStatus.EXPIRED,
        expired_points=BATCHES.c.remaining,
        remaining=0,
        expired_transaction_id=_CHUNK_TXNS.c.id,
    )
)
_UPDATE_ACCOUNTS_ON_SQLITE = (
    update(ACCOUNTS)
    .where(ACCOUNTS.c.member_id == _CHUNK_TXNS.c.member_id)
    .values(
        current=_CHUNK_TXNS.c.balance_after,
        lifetime_expired=ACCOUNTS.c.lifetime_expired - _CHUNK_TXNS.c.points,
        last_activity_at=_NOW,
        updated_at=_NOW,
    )
)


async def _expire_on_sqlite_chunk(
    session: AsyncSession, after_member_id: int, limit: int, now: datetime, actor_id: str
) -> ChunkExpired | None:
    due = (
        await session.execute(
            _DUE_TOTALS_ON_SQLITE, {"after": after_member_id, "limit": limit, "now": now}
        )
    ).all()
    if not due:
        return None
    txn_public_ids = new_public_ids("txn", len(due))
    event_public_ids = new_public_ids("evt", len(due))
    rows = [  # as _ROW_FIELDS
        (txn_public_ids[number], event_public_ids[number], *row[:-1])
        for number, row in enumerate(due)
    ]
    params = {
        "rows": json.dumps(rows),
        "now": now,
        "actor": actor_id,
        "event_template": _event_template(now),
        "last_txn_id": due[0].last_txn_id,
        "after": after_member_id,
        "last_member_id": due[-1].member_id,
    }
    await session.execute(_INSERT_TXNS_ON_SQLITE, params)
    await session.execute(_EXPIRE_BATCHES_ON_SQLITE, params)
    await session.execute(_UPDATE_ACCOUNTS_ON_SQLITE, params)
    await session.execute(_INSERT_EVENTS_ON_SQLITE, params)
    return ChunkExpired(
        last_member_id=due[-1].member_id,
        members=len(due),
        batches=sum(row.batches for row in due),
        points=sum(row.points for row in due),
    )


# -- the chunk ------------------------------------------------------------------------------


async def expire_chunk(
    session: AsyncSession, *, after_member_id: int, limit: int, now: datetime, actor_id: str
) -> ChunkExpired | None:
    """Expire the due batches of the next `limit` members with due batches after
    `after_member_id`, in the caller's transaction; None when there are none left."""
    if session.get_bind().dialect.name == "postgresql":
        done = await _expire_on_postgresql_chunk(session, after_member_id, limit, now, actor_id)
    else:
        done = await _expire_on_sqlite_chunk(session, after_member_id, limit, now, actor_id)
    if done is not None and done.members:
        mark_for_sequencing(session)
    return done


_ONE_DUE = (
    select(BATCHES.c.id).where(BATCHES.c.member_id == bindparam("member_id"), *_due(_NOW)).limit(1)
)


async def expire_member(
    session: AsyncSession, member_id: int, *, now: datetime, actor_id: str
) -> ChunkExpired | None:
    """Expire one member's batches whose expiry has passed, in the caller's transaction,
    which holds the member's account: what the next expiry run would do for the member,
    done before points are taken so that none is spent after it expired. None when none of
    the member's batches is due (one indexed lookup)."""
    if await session.scalar(_ONE_DUE, {"member_id": member_id, "now": now}) is None:
        return None
    # The member has due batches, so the chunk that starts just before it is the member.
    done = await expire_chunk(
        session, after_member_id=member_id - 1, limit=1, now=now, actor_id=actor_id
    )
    assert done is None or done.last_member_id == member_id
    return done
