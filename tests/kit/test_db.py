"""The connection pool: no ping on a busy pool, and a connection the server dropped while it
sat idle is replaced before a request uses it."""

from __future__ import annotations

import asyncpg
import pytest
from fastapi import FastAPI

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
def postgres_only(is_postgres: bool) -> None:
    if not is_postgres:
        pytest.skip("SQLite has no server to drop a connection")


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
