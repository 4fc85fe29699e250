"""The connection pool: no ping on a busy pool, and a connection the server dropped while it
sat idle is replaced before a request uses it."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator

import asyncpg
import pytest
from fastapi import FastAPI
from sqlalchemy.engine import make_url

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
