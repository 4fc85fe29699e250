"""The connection pool: no ping on a busy pool, and a connection the server dropped while it
sat idle is replaced before a request uses it; SQLite's connections on the loop's thread;
statements sent straight to the driver."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, cast

import asyncpg
import pytest
from fastapi import FastAPI
from sqlalchemy import Table, bindparam, event, insert, literal, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from memberhub.events.models import Event
from memberhub.kit import db as kit_db
from tests.conftest import _asyncpg_dsn
from tests.support import ApiClient


async def drop_other_connections(database_url: str) -> int:
    """What a server restart or an idle timeout does to the pool's connections."""
    conn = await asyncpg.connect(_asyncpg_dsn(database_url))
    try:
        return int(
            await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        )
    finally:
        await conn.close()


@pytest.fixture
async def postgres_only(is_postgres: bool, db: kit_db.Database) -> AsyncIterator[None]:
    if not is_postgres:
        pytest.skip("SQLite has no server to drop a connection")
    yield
    # The pool is shared with the tests that follow: none of them gets a dropped connection.
    await db.engine.dispose()


@pytest.mark.usefixtures("postgres_only")
async def test_a_connection_dropped_while_idle_is_replaced_before_a_request_uses_it(
    app: FastAPI, api: ApiClient, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert (await api.get("/api/v1/members")).status_code == 200
    assert await drop_other_connections(database_url) >= 1
    monkeypatch.setattr(kit_db, "IDLE_PING_SECONDS", 0.0)  # every pooled connection is idle

    response = await api.get("/api/v1/members")

    assert response.status_code == 200, response.text


@pytest.mark.usefixtures("postgres_only")
async def test_a_busy_pool_sends_no_ping_and_a_dead_connection_is_a_503_to_retry(
    app: FastAPI, api: ApiClient, database_url: str
) -> None:
    assert (await api.get("/api/v1/members")).status_code == 200
    assert await drop_other_connections(database_url) >= 1

    response = await api.get("/api/v1/members")

    # Used within the idle period, the dead connection is not pinged: the request fails as
    # a retryable 503 and the pool discards the connection; the retry succeeds.
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] == "1"
    assert (await api.get("/api/v1/members")).status_code == 200


async def test_a_request_waiting_for_the_sqlite_write_lock_leaves_the_event_loop_free(
    app: FastAPI, api: ApiClient, database_url: str, is_postgres: bool
) -> None:
    """Requests' statements run on the loop's thread, but BEGIN IMMEDIATE waits for another
    process's writer in the connection's thread: the loop keeps serving meanwhile."""
    if is_postgres:
        pytest.skip("SQLite only")
    path = make_url(database_url).database
    assert path is not None
    other_process = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other_process.execute("BEGIN IMMEDIATE")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    beat = asyncio.create_task(ticker())
    creating = asyncio.create_task(api.post("/api/v1/members", {"email": "wait@example.com"}))
    try:
        await asyncio.sleep(0.3)
        assert not creating.done()
        assert ticks >= 10
    finally:
        other_process.execute("COMMIT")
        other_process.close()
    response = await creating
    beat.cancel()
    assert response.status_code == 201, response.text


def _size(path: str) -> int:
    return os.path.getsize(path)


async def test_the_worker_tick_checkpoints_what_the_loops_connections_wrote_into_sqlite(
    db: kit_db.Database, is_postgres: bool
) -> None:
    """Connections on the loop's thread never checkpoint the write-ahead log; the worker's
    tick does, so the log is reused instead of growing while only they write."""
    from sqlalchemy import text

    from memberhub.worker.runner import Worker

    if is_postgres:
        assert await db.checkpoint() == (0, 0)
        return
    path = make_url(db.url).database
    assert path is not None
    wal = f"{path}-wal"

    async def write(tag: str) -> None:
        for n in range(30):
            async with db.transaction(short=True) as session:
                await session.execute(
                    text("INSERT INTO daily_job_runs (name) VALUES (:name)"),
                    {"name": f"{tag}-{n}-{'x' * 2000}"},
                )

    await Worker(db).tick()
    # Whatever earlier tests wrote, copied and the log emptied: its size is this test's.
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as own:
        assert own.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    assert _size(wal) == 0
    await write("first")
    first = _size(wal)
    await write("second")  # no checkpoint between: the log grows by what was written
    grown = _size(wal)
    batch = grown - first
    assert batch > 30 * 2000
    await Worker(db).tick()
    await write("third")  # the log starts again from its beginning: it hardly grows
    assert _size(wal) - grown < batch / 4
    frames, copied = await db.checkpoint()
    assert frames == copied > 0


# -- DriverStatement ----------------------------------------------------------------------------

_EVENTS = cast(Table, Event.__table__)
_INSERT_EVENT = kit_db.DriverStatement(
    insert(_EVENTS)
    .values(**kit_db.column_binds(_EVENTS, "e", ("id", "version")), version=literal(7) + 1)
    .returning(_EVENTS.c.id)
)
_TOUCH_EVENT = kit_db.DriverStatement(
    update(_EVENTS)
    .where(_EVENTS.c.id == bindparam("event_id"))
    .values(dispatched_at=bindparam("at", type_=_EVENTS.c.dispatched_at.type))
)
AT = datetime(2026, 3, 4, 5, 6, 7, 890000, tzinfo=UTC)


def _event(public_id: str) -> dict[str, Any]:
    values = {"public_id": public_id, "type": "test.driver", "occurred_at": AT, "data": {"n": [1]}}
    return kit_db.column_values(_EVENTS, values, "e", ("id", "version"))


async def _written(db: kit_db.Database, event_id: int) -> Event:
    async with db.transaction(read_only=True) as session:
        event = await session.get(Event, event_id)
        assert event is not None
        return event


async def test_a_driver_statement_writes_what_sqlalchemy_would(
    db: kit_db.Database, is_postgres: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[str] = []
    execute_now = kit_db._InlineSQLiteConnection.execute_now

    def counted(self: Any, sql: str, parameters: Any) -> list[Any]:
        sent.append(sql.split()[0])
        return execute_now(self, sql, parameters)

    monkeypatch.setattr(kit_db._InlineSQLiteConnection, "execute_now", counted)
    async with db.transaction(short=True) as session:
        connection = await session.connection()
        ((event_id,),) = await connection.run_sync(_INSERT_EVENT.rows, _event("evt_driver_1"))
        touched = await connection.run_sync(_TOUCH_EVENT.rows, {"event_id": event_id, "at": AT})

    # Straight to the driver on SQLite; through SQLAlchemy on PostgreSQL.
    assert sent == ([] if is_postgres else ["INSERT", "UPDATE"])
    assert touched == []  # no RETURNING: no rows
    event = await _written(db, event_id)
    # The literal in the statement, the JSON and the aware time went through their types.
    assert (event.public_id, event.version, event.data) == ("evt_driver_1", 8, {"n": [1]})
    assert event.occurred_at == AT
    assert event.dispatched_at == AT
    assert event.member_public_id is None  # not given, no default: NULL


async def test_a_statement_the_driver_refuses_raises_sqlalchemys_error_and_writes_nothing(
    db: kit_db.Database, is_postgres: bool
) -> None:
    async with db.transaction(short=True) as session:
        connection = await session.connection()
        ((kept,),) = await connection.run_sync(_INSERT_EVENT.rows, _event("evt_driver_2"))
        # An error ends a PostgreSQL transaction, unless within a savepoint.
        savepoint = await connection.begin_nested() if is_postgres else None
        # The unique public id, as SQLAlchemy reports it (and the error handler knows it).
        with pytest.raises(IntegrityError):
            await connection.run_sync(_INSERT_EVENT.rows, _event("evt_driver_2"))
        if savepoint is not None:
            await savepoint.rollback()
        # The transaction goes on: the refused statement changed nothing.
        ((other,),) = await connection.run_sync(_INSERT_EVENT.rows, _event("evt_driver_3"))

    async with db.transaction(read_only=True) as session:
        ids = (await session.scalars(select(Event.id).where(Event.type == "test.driver"))).all()
    assert sorted(ids) == sorted([kept, other])


async def test_listeners_on_statements_see_every_driver_statement(db: kit_db.Database) -> None:
    engine = db.request_engine.sync_engine
    seen: list[str] = []

    def listener(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen.append(statement.split()[0])

    event.listen(engine, "before_cursor_execute", listener)
    try:
        async with db.transaction(short=True) as session:
            connection = await session.connection()
            ((event_id,),) = await connection.run_sync(_INSERT_EVENT.rows, _event("evt_driver_4"))
            touched = await connection.run_sync(_TOUCH_EVENT.rows, {"event_id": event_id, "at": AT})
    finally:
        event.remove(engine, "before_cursor_execute", listener)

    # Through SQLAlchemy, with the same results.
    assert seen[-2:] == ["INSERT", "UPDATE"]
    assert touched == []
    assert (await _written(db, event_id)).version == 8


async def test_an_error_that_ended_the_transaction_is_not_run_again_outside_it(
    db: kit_db.Database, is_postgres: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if is_postgres:
        pytest.skip("statements go to the driver on SQLite only")

    def failing(self: Any, sql: str, parameters: Any) -> list[Any]:
        self._conn.rollback()  # what SQLite does on a full disk or an I/O error
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(kit_db._InlineSQLiteConnection, "execute_now", failing)
    async with db.transaction(short=True) as session:
        connection = await session.connection()
        with pytest.raises(sqlite3.OperationalError):
            await connection.run_sync(_INSERT_EVENT.rows, _event("evt_driver_5"))

    # Not written on its own, out of the transaction, by a second try.
    async with db.transaction(read_only=True) as session:
        assert await session.scalar(select(Event.id).where(Event.type == "test.driver")) is None
