"""The write of a credit (an award, an earn) in as few statements as the database allows:
the transaction, the batch it created (each naming the other), the account's new balances,
the event and the audit entry.

On PostgreSQL this is one statement: both ids are drawn first (`nextval`), and every row is
written by a data-modifying CTE, all in the caller's transaction. On SQLite, whose statements
run on the request's own thread, it is one Core statement per row. Neither goes through the
ORM's flush: the objects handed back are transient, built from the values written.
"""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import Insert, Table, bindparam, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.attributes import set_committed_value

from memberhub.audit.models import AuditEntry
from memberhub.events.models import Event
from memberhub.events.sequencer import mark_for_sequencing
from memberhub.kit.db import column_binds, column_values
from memberhub.points.models import PointAccount, PointBatch, PointTransaction

TXNS = cast(Table, PointTransaction.__table__)
BATCHES = cast(Table, PointBatch.__table__)
ACCOUNTS = cast(Table, PointAccount.__table__)
EVENTS = cast(Table, Event.__table__)
AUDIT_LOG = cast(Table, AuditEntry.__table__)

# What a credit changes on the account row.
BALANCE_COLUMNS = ("current", "pending", "lifetime_earned", "last_activity_at", "updated_at")
# Columns the statements fill themselves (ids, links) or leave to the sequencer's later pass.
_TXN_OWN = ("id", "batch_id")
_BATCH_OWN = ("id", "transaction_id")
_ID = ("id",)


def _credit_on_postgresql() -> Insert:
    ids = select(
        func.nextval("point_transactions_id_seq").label("txn_id"),
        func.nextval("point_batches_id_seq").label("batch_id"),
    ).cte("ids")
    txn_binds = column_binds(TXNS, "t", _TXN_OWN)
    txn_values = select(ids.c.txn_id, ids.c.batch_id, *txn_binds.values())
    txn = insert(TXNS).from_select(["id", "batch_id", *txn_binds], txn_values).cte("txn")
    account = _UPDATE_ACCOUNT.cte("account")
    event = insert(EVENTS).values(column_binds(EVENTS, "e", _ID)).cte("event")
    audit = insert(AUDIT_LOG).values(column_binds(AUDIT_LOG, "l", _ID)).cte("audit")
    batch_binds = column_binds(BATCHES, "b", _BATCH_OWN)
    return (
        insert(BATCHES)
        .from_select(
            ["id", "transaction_id", *batch_binds],
            select(ids.c.batch_id, ids.c.txn_id, *batch_binds.values()),
        )
        .add_cte(txn, account, event, audit)
        .returning(BATCHES.c.transaction_id, BATCHES.c.id)
    )


_UPDATE_ACCOUNT = (
    update(ACCOUNTS)
    .where(ACCOUNTS.c.member_id == bindparam("a_member_id", type_=ACCOUNTS.c.member_id.type))
    .values({name: bindparam(f"a_{name}", type_=ACCOUNTS.c[name].type) for name in BALANCE_COLUMNS})
)
_CREDIT_ON_POSTGRESQL = _credit_on_postgresql()
# SQLite: the same rows, one statement each. The transaction names the batch's id before the
# batch exists: a writing transaction holds the database's write lock from its BEGIN
# IMMEDIATE, so the next rowid (the largest plus one, as SQLite assigns them: these tables
# have no AUTOINCREMENT) is still free when the batch is inserted with it just after.
_INSERT_TXN = (
    insert(TXNS)
    .values(
        batch_id=select(func.coalesce(func.max(BATCHES.c.id), 0) + 1).scalar_subquery(),
        **column_binds(TXNS, "t", _TXN_OWN),
    )
    .returning(TXNS.c.id, TXNS.c.batch_id)
)
_INSERT_BATCH = insert(BATCHES).values(
    id=bindparam("b_id"),
    transaction_id=bindparam("b_transaction_id"),
    **column_binds(BATCHES, "b", _BATCH_OWN),
)
_INSERT_EVENT = insert(EVENTS).values(column_binds(EVENTS, "e", _ID))
_INSERT_AUDIT = insert(AUDIT_LOG).values(column_binds(AUDIT_LOG, "l", _ID))


async def write_credit(
    session: AsyncSession,
    account: PointAccount,
    txn: PointTransaction,
    batch: PointBatch,
    balances: dict[str, Any],
    event: dict[str, Any],
    audit: dict[str, Any],
) -> None:
    """Write a new transaction and its batch (transient objects; their ids and links are
    set here), the account's `balances` (set on `account` as saved), and the event and audit
    rows, in the caller's transaction."""
    txn_row = column_values(TXNS, _values(txn), "t", _TXN_OWN)
    batch_row = column_values(BATCHES, _values(batch), "b", _BATCH_OWN)
    account_row = {f"a_{k}": v for k, v in balances.items()} | {"a_member_id": account.member_id}
    event_row = column_values(EVENTS, event, "e", _ID)
    audit_row = column_values(AUDIT_LOG, audit, "l", _ID)
    if session.get_bind().dialect.name == "postgresql":
        params = txn_row | batch_row | account_row | event_row | audit_row
        txn_id, batch_id = (await session.execute(_CREDIT_ON_POSTGRESQL, params)).one()
    else:
        txn_id, batch_id = (await session.execute(_INSERT_TXN, txn_row)).one()
        batch_row["b_id"], batch_row["b_transaction_id"] = batch_id, txn_id
        await session.execute(_INSERT_BATCH, batch_row)
        await session.execute(_UPDATE_ACCOUNT, account_row)
        await session.execute(_INSERT_EVENT, event_row)
        await session.execute(_INSERT_AUDIT, audit_row)
    txn.id, txn.batch_id = int(txn_id), int(batch_id)
    batch.id, batch.transaction_id = int(batch_id), int(txn_id)
    for key, value in balances.items():
        set_committed_value(account, key, value)
    mark_for_sequencing(session)


def _values(obj: PointTransaction | PointBatch) -> dict[str, Any]:
    """The column values set on a new (transient) object."""
    return {k: v for k, v in obj.__dict__.items() if not k.startswith("_")}
