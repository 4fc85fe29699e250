"""The write of a credit (an award, an earn) in as few statements as the database allows:
the transaction, the batch it created (each naming the other), the account's new balances,
the event and the audit entry.

On PostgreSQL this is one statement: both ids are drawn first (`nextval`), and every row is
written by a data-modifying CTE, all in the caller's transaction. On SQLite, whose statements
run on the request's own thread, it is one Core statement per row, all sent in one call on
the session's connection. Neither goes through the ORM's flush: the objects handed back are
transient, built from the values written.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import (
    Connection,
    Insert,
    Table,
    bindparam,
    func,
    insert,
    select,
    union_all,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.attributes import set_committed_value

from memberhub.audit.models import AuditEntry
from memberhub.events.models import Event
from memberhub.events.sequencer import mark_for_sequencing
from memberhub.kit.db import DriverStatement, column_binds, column_values
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
_INSERT_TXN = DriverStatement(
    insert(TXNS)
    .values(
        batch_id=select(func.coalesce(func.max(BATCHES.c.id), 0) + 1).scalar_subquery(),
        **column_binds(TXNS, "t", _TXN_OWN),
    )
    .returning(TXNS.c.id, TXNS.c.batch_id)
)
_INSERT_BATCH = DriverStatement(
    insert(BATCHES).values(
        id=bindparam("b_id", type_=BATCHES.c.id.type),
        transaction_id=bindparam("b_transaction_id", type_=BATCHES.c.transaction_id.type),
        **column_binds(BATCHES, "b", _BATCH_OWN),
    )
)
_INSERT_EVENT = insert(EVENTS).values(column_binds(EVENTS, "e", _ID))
_INSERT_AUDIT = insert(AUDIT_LOG).values(column_binds(AUDIT_LOG, "l", _ID))
_UPDATE_ACCOUNT_NOW = DriverStatement(_UPDATE_ACCOUNT)
_INSERT_EVENT_NOW = DriverStatement(_INSERT_EVENT)
_INSERT_AUDIT_NOW = DriverStatement(_INSERT_AUDIT)


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

        def write(connection: Connection) -> tuple[int, int]:
            ((txn_id, batch_id),) = _INSERT_TXN.rows(connection, txn_row)
            batch_row["b_id"], batch_row["b_transaction_id"] = batch_id, txn_id
            _INSERT_BATCH.rows(connection, batch_row)
            _UPDATE_ACCOUNT_NOW.rows(connection, account_row)
            _INSERT_EVENT_NOW.rows(connection, event_row)
            _INSERT_AUDIT_NOW.rows(connection, audit_row)
            return txn_id, batch_id

        # Core statements on the session's connection, all in one call: no ORM execution
        # layer, one switch into SQLAlchemy's synchronous side instead of five, and each
        # statement straight to the driver (`DriverStatement`).
        txn_id, batch_id = await (await session.connection()).run_sync(write)
    txn.id, txn.batch_id = int(txn_id), int(batch_id)
    batch.id, batch.transaction_id = int(batch_id), int(txn_id)
    for key, value in balances.items():
        set_committed_value(account, key, value)
    mark_for_sequencing(session)


def _values(obj: PointTransaction | PointBatch) -> dict[str, Any]:
    """The column values set on a new (transient) object."""
    return {k: v for k, v in obj.__dict__.items() if not k.startswith("_")}


# -- several credits of one member at once ------------------------------------------------------
#
# An activity that meets several earning rules credits each in its own transaction and batch.
# They are written together: on PostgreSQL in one statement whatever their number (the ids of
# every transaction and batch drawn in one row of `nextval`s, each table's rows inserted by
# one data-modifying CTE); on SQLite in one statement per table (`executemany`), with the
# ids worked out from the largest rowids as `_INSERT_TXN` does. The account is updated once,
# to the balances after the last credit. `linked` rows (one per credit, e.g. what a rule
# did) are inserted naming their credit's transaction.


def _rows(table: Table, prefix: str, leave_out: tuple[str, ...], count: int) -> list[Any]:
    return [column_binds(table, f"{prefix}{k}", leave_out) for k in range(count)]


def _one_per_credit(
    ids: Any, table: Table, prefix: str, leave_out: tuple[str, ...], count: int, **from_ids: str
) -> Insert:
    """An INSERT of one row per credit; `from_ids` maps columns to the credit's ids in `ids`
    (`t`: its transaction's, `b`: its batch's)."""
    binds = _rows(table, prefix, leave_out, count)
    selects = [
        select(*(ids.c[f"{name}{k}"] for name in from_ids.values()), *binds[k].values())
        for k in range(count)
    ]
    rows = selects[0] if count == 1 else union_all(*selects)
    return insert(table).from_select([*from_ids, *binds[0]], rows)


def _insert_rows(table: Table, prefix: str, count: int) -> Insert:
    """An INSERT of `count` rows of bound values: as a SELECT of each (a multi-VALUES
    insert would be compiled again for every execution)."""
    binds = _rows(table, prefix, _ID, count)
    selects = [select(*row.values()) for row in binds]
    return insert(table).from_select(
        list(binds[0]), selects[0] if count == 1 else union_all(*selects)
    )


@functools.cache
def _credits_on_postgresql(credits: int, events: int, audits: int, linked: Table | None) -> Insert:
    ids = select(
        *(
            column
            for k in range(credits)
            for column in (
                func.nextval("point_transactions_id_seq").label(f"t{k}"),
                func.nextval("point_batches_id_seq").label(f"b{k}"),
            )
        )
    ).cte("ids")
    ctes: list[Any] = [
        _one_per_credit(ids, TXNS, "t", _TXN_OWN, credits, id="t", batch_id="b").cte("txns"),
        _UPDATE_ACCOUNT.cte("account"),
        _insert_rows(EVENTS, "e", events).cte("events"),
        _insert_rows(AUDIT_LOG, "l", audits).cte("audit"),
    ]
    if linked is not None:
        linked_rows = _one_per_credit(ids, linked, "k", _LINKED_OWN, credits, transaction_id="t")
        ctes.append(linked_rows.cte("linked"))
    batches = _one_per_credit(ids, BATCHES, "b", _BATCH_OWN, credits, id="b", transaction_id="t")
    return batches.add_cte(*ctes)


_LINKED_OWN = ("transaction_id", "id")
_LAST_TXN_ID = select(func.max(TXNS.c.id)).scalar_subquery()
# SQLite, row by row in one `executemany`: the k-th of n transactions names the batch that
# will be the k-th inserted after them; the k-th batch (and linked row) names the
# transaction n - 1 - k rows before the last.
_INSERT_TXNS = insert(TXNS).values(
    batch_id=select(
        func.coalesce(func.max(BATCHES.c.id), 0) + bindparam("t_batch_offset")
    ).scalar_subquery(),
    **column_binds(TXNS, "t", _TXN_OWN),
)
_INSERT_BATCHES = insert(BATCHES).values(
    transaction_id=_LAST_TXN_ID - bindparam("b_back"),
    **column_binds(BATCHES, "b", _BATCH_OWN),
)


@functools.cache
def _insert_linked_on_sqlite(linked: Table) -> Insert:
    return insert(linked).values(
        transaction_id=_LAST_TXN_ID - bindparam("k_back"),
        **column_binds(linked, "k", _LINKED_OWN),
    )


async def write_credits(
    session: AsyncSession,
    account: PointAccount,
    credits: Sequence[tuple[PointTransaction, PointBatch]],
    balances: dict[str, Any],
    events: Sequence[dict[str, Any]],
    audits: Sequence[dict[str, Any]],
    linked: tuple[Table, Sequence[dict[str, Any]]] | None = None,
) -> None:
    """Write new transactions, each with its batch (transient objects; they are linked here,
    but their ids are not read back), the account's `balances` after the last (set on
    `account` as saved), the `events` and `audits` rows, and `linked` rows (one per credit,
    given its transaction's id), in the caller's transaction."""
    assert credits, "at least one credit"
    assert events, "each credit has its event"
    assert audits, "each credit has its audit entry"
    linked_rows = linked[1] if linked is not None else ()
    assert linked is None or len(linked_rows) == len(credits)
    account_row = {f"a_{k}": v for k, v in balances.items()} | {"a_member_id": account.member_id}
    if session.get_bind().dialect.name == "postgresql":
        params = dict(account_row)
        for k, (txn, batch) in enumerate(credits):
            params |= column_values(TXNS, _values(txn), f"t{k}", _TXN_OWN)
            params |= column_values(BATCHES, _values(batch), f"b{k}", _BATCH_OWN)
        for j, row in enumerate(events):
            params |= column_values(EVENTS, row, f"e{j}", _ID)
        for j, row in enumerate(audits):
            params |= column_values(AUDIT_LOG, row, f"l{j}", _ID)
        for k, row in enumerate(linked_rows):
            assert linked is not None
            params |= column_values(linked[0], row, f"k{k}", _LINKED_OWN)
        statement = _credits_on_postgresql(
            len(credits), len(events), len(audits), linked[0] if linked is not None else None
        )
        await session.execute(statement, params)
    else:
        last = len(credits) - 1
        await session.execute(
            _INSERT_TXNS,
            [
                column_values(TXNS, _values(txn), "t", _TXN_OWN) | {"t_batch_offset": k + 1}
                for k, (txn, _batch) in enumerate(credits)
            ],
        )
        await session.execute(
            _INSERT_BATCHES,
            [
                column_values(BATCHES, _values(batch), "b", _BATCH_OWN) | {"b_back": last - k}
                for k, (_txn, batch) in enumerate(credits)
            ],
        )
        await session.execute(_UPDATE_ACCOUNT, account_row)
        await session.execute(_INSERT_EVENT, [column_values(EVENTS, r, "e", _ID) for r in events])
        await session.execute(
            _INSERT_AUDIT, [column_values(AUDIT_LOG, r, "l", _ID) for r in audits]
        )
        if linked is not None:
            await session.execute(
                _insert_linked_on_sqlite(linked[0]),
                [
                    column_values(linked[0], row, "k", _LINKED_OWN) | {"k_back": last - k}
                    for k, row in enumerate(linked_rows)
                ],
            )
    for key, value in balances.items():
        set_committed_value(account, key, value)
    mark_for_sequencing(session)
