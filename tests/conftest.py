"""Test harness: one migrated database per run (SQLite, or PostgreSQL when
MEMBERHUB_TEST_DATABASE_URL is set), emptied before every test."""

from __future__ import annotations

import asyncio
import functools
import gc
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import httpx
import pytest
from argon2 import PasswordHasher
from sqlalchemy import text
from sqlalchemy.engine import make_url

# The application is imported by the fixtures that use it, not here: pytest-xdist's
# controlling process loads this module too, and never runs a test (importing it there cost
# seconds before the test processes started).
if TYPE_CHECKING:
    from memberhub.auth.roles import Role
    from memberhub.kit.db import Database
    from memberhub.settings import Settings
    from tests.support import ApiClient

TEST_DATABASE_URL = os.environ.get("MEMBERHUB_TEST_DATABASE_URL")


def _asyncpg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _create_pg_database(server_url: str, name: str) -> None:
    try:
        conn = await asyncpg.connect(_asyncpg_dsn(server_url), timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        # CI must fail, never skip, when PostgreSQL is requested but unreachable.
        raise RuntimeError(f"PostgreSQL test database unreachable: {exc}") from exc
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
        # Commits of the tests' database return before their WAL reaches the disk: what a
        # test checks is the service's, and a crash the tests cause is of the service's
        # processes, never of the database server.
        await conn.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
    finally:
        await conn.close()


async def _drop_pg_database(server_url: str, name: str) -> None:
    conn = await asyncpg.connect(_asyncpg_dsn(server_url), timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


# Modules whose tests take seconds each (processes started, benches, large sizes), longest
# first: run at the start, the parallel test processes share them out while the many short
# tests are still queued to fill the gaps, instead of one process ending the run alone on
# one of them.
LONG_MODULES = (
    "tests/finance/test_worker_crash.py",
    "tests/ops/test_backup.py",
    "tests/test_bench.py",
    "tests/test_processes.py",
    "tests/bulk/test_member_import.py",
    "tests/notifications/test_worker_crash.py",
    "tests/webhooks/test_worker_processes.py",
    "tests/finance/test_flows.py",
    "tests/exports/test_resume.py",
    "tests/sinks/test_faults.py",
    "tests/leads/test_transfer.py",
    "tests/points/test_stateful.py",
    "tests/integrations/test_gateway.py",
    "tests/crm/test_push.py",
    "tests/bulk/test_processing.py",
    "tests/exports/test_memory.py",
    "tests/test_tracing.py",
)


def _run_order(item: pytest.Item) -> int:
    module = item.nodeid.partition("::")[0]
    return LONG_MODULES.index(module) if module in LONG_MODULES else len(LONG_MODULES)


def pytest_configure(config: pytest.Config) -> None:
    """The cyclic collector runs a tenth as often as by default: a test process holds the
    application, the test modules and their fakes (half a million objects), and a test
    makes many short-lived ones; collecting every 700 allocations cost about a twentieth of
    the run. Cycles are still collected, in larger batches."""
    gc.set_threshold(10_000, 50, 100)


def pytest_collection_finish(session: pytest.Session) -> None:
    """What was imported and collected lives as long as the run: out of the collector's
    sight (`gc.freeze`), full collections examine only what tests make."""
    gc.collect()
    gc.freeze()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests that reach a database (through the `database_url` fixture): the
    PostgreSQL pass of `make test` runs only those again (`-m database`). Put the long
    modules first (a stable sort: the rest keep their order)."""
    for item in items:
        if "database_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.database)
    items.sort(key=_run_order)


@pytest.fixture(scope="session", autouse=True)
def fast_password_hashing() -> Iterator[None]:
    """Passwords hashed with argon2id at its smallest cost in this process's tests: at the
    product's (64 MiB, 3 passes) each staff account made and each sign-in took a fifth of a
    second, a minute or more of every run. Hashes carry their parameters, so every code
    path is the same; the product's own parameters are tested with `real_password_hashing`,
    and processes the tests start (the CLI, `serve`) use them."""
    from memberhub.staff import passwords

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            passwords, "_HASHER", PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
        )
        passwords.decoy_hash.cache_clear()
        yield
    passwords.decoy_hash.cache_clear()


@pytest.fixture
def real_password_hashing() -> Iterator[None]:
    """The product's password hashing, for the test that asks for it."""
    from memberhub.staff import passwords

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(passwords, "_HASHER", PasswordHasher.from_parameters(passwords.PARAMETERS))
        passwords.decoy_hash.cache_clear()
        yield
    passwords.decoy_hash.cache_clear()


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from memberhub.kit.migrate import upgrade

    if TEST_DATABASE_URL:
        name = f"memberhub_test_{uuid.uuid4().hex[:12]}"
        asyncio.run(_create_pg_database(TEST_DATABASE_URL, name))
        url = make_url(TEST_DATABASE_URL).set(database=name).render_as_string(hide_password=False)
        try:
            upgrade(url)
            yield url
        finally:
            asyncio.run(_drop_pg_database(TEST_DATABASE_URL, name))
    else:
        path = tmp_path_factory.mktemp("db") / "memberhub.db"
        url = f"sqlite+aiosqlite:///{path}"
        upgrade(url)
        yield url


@pytest.fixture(scope="session")
def is_postgres(database_url: str) -> bool:
    return database_url.startswith("postgresql")


@functools.cache
def _all_tables() -> tuple[str, ...]:
    from memberhub.models import Base

    # Children first, so no foreign key is left dangling whatever the delete order.
    return tuple(t.name for t in reversed(Base.metadata.sorted_tables))


async def _empty_all_tables(db: Database) -> None:
    tables = _all_tables()
    # Short: on SQLite, on this thread, not a hand-off to the connection's thread per
    # statement (nothing else runs in this process between tests).
    async with db.transaction(short=True) as session:
        if db.is_sqlite:
            # A test leaves rows in a few of some sixty tables, and a statement per table
            # cost more than most tests: one query names the tables holding rows, and only
            # those are emptied (in the same children-first order).
            holding = {row[0] for row in await session.execute(text(_sqlite_holding(tables)))}
            if "organisations" in holding:
                # organisations refers to itself; detach chapters so any delete order works.
                await session.execute(text("UPDATE organisations SET parent_id = NULL"))
            for table in tables:
                if table in holding:
                    await session.execute(text(f'DELETE FROM "{table}"'))
        else:
            # DELETE, not TRUNCATE: a test leaves a few rows in a few of some sixty tables,
            # and TRUNCATE's new files cost far more than deleting them. One round trip.
            listed = "{" + ",".join(tables) + "}"
            await session.execute(
                text("SELECT set_config('memberhub.tables', :tables, true)"), {"tables": listed}
            )
            await session.execute(text(_DELETE_ALL))


@functools.cache
def _sqlite_holding(tables: tuple[str, ...]) -> str:
    """One SQLite query answering the names of the tables that hold at least one row."""
    return " UNION ALL ".join(
        f"SELECT '{table}' WHERE EXISTS (SELECT 1 FROM \"{table}\")" for table in tables
    )


# Every table emptied, and every sequence that moved (a row inserted, even one rolled back)
# restarted, so each test starts from empty tables and ids from 1.
_DELETE_ALL = """
DO $$
DECLARE
    name text;
    moved record;
BEGIN
    UPDATE organisations SET parent_id = NULL WHERE parent_id IS NOT NULL;
    FOREACH name IN ARRAY current_setting('memberhub.tables')::text[] LOOP
        EXECUTE format('DELETE FROM %I', name);
    END LOOP;
    FOR moved IN
        SELECT sequencename FROM pg_sequences
        WHERE schemaname = 'public' AND last_value IS NOT NULL
    LOOP
        PERFORM setval(format('%I', moved.sequencename)::regclass, 1, false);
    END LOOP;
END $$;
"""


TEST_SECRET_KEY = "test-secret-key-not-for-production"


@pytest.fixture(scope="session")
def base_settings(database_url: str) -> Settings:
    from memberhub.settings import Settings

    return Settings(
        database_url=database_url,
        secret_key=TEST_SECRET_KEY,
        env="test",
        log_level="WARNING",
        rate_limit="10000/minute",
        # Webhook receivers in tests listen on 127.0.0.1, over plain http.
        webhook_allowed_networks="127.0.0.0/8",
        webhook_allow_http=True,
    )


@pytest.fixture
def settings(base_settings: Settings, tmp_path: Path) -> Settings:
    """The test's settings, with its own data directory. Copied from one validated for the
    whole run: reading the environment and validating every field again took longer than
    many tests."""
    return base_settings.model_copy(update={"data_dir": tmp_path / "data"})


@pytest.fixture(scope="session")
async def shared_db(database_url: str) -> AsyncIterator[Database]:
    from memberhub.audit.chain import ChainKey
    from memberhub.audit.chain import session_info as chain_session_info
    from memberhub.kit.db import Database

    """One pool per test process, shared by the tests and their applications: opening
    connections for every test cost more than most tests. Its sessions seal the audit chain
    with the key of `settings`' secret, as the application's would."""
    database = Database(
        database_url, pool_size=10, session_info=chain_session_info(ChainKey(TEST_SECRET_KEY))
    )
    yield database
    await database.dispose()


@pytest.fixture
async def db(shared_db: Database) -> AsyncIterator[Database]:
    from memberhub.kit.cache import ProcessCache

    await _empty_all_tables(shared_db)
    # The tables were emptied behind the application's back: drop what it kept of them.
    ProcessCache.clear_all()
    yield shared_db
    if shared_db.is_sqlite:
        return
    # A test may have ended with transactions open (a cancelled task's, say) or with
    # connections the server dropped: start the next one from a fresh pool.
    pool = shared_db.engine.pool
    if pool.checkedout():  # type: ignore[attr-defined]
        await shared_db.engine.dispose()


@pytest.fixture
async def app(settings: Settings, db: Database) -> object:
    from memberhub.app import create_app
    from tests.support import shortened_sleep

    app = create_app(settings, db=db)
    app.state.integrations.retry_sleep = shortened_sleep
    return app


@pytest.fixture
async def http(app: object) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


async def issue_key(
    db: Database, role: Role | None = None, *, organisation: str | None = None, **kwargs: object
) -> str:
    """A new key's secret: an installation-wide admin's unless `role` says otherwise."""
    from memberhub.auth.roles import Role
    from memberhub.auth.service import create_api_key
    from memberhub.kit.actor import Actor

    role = role or Role.ADMIN
    async with db.transaction() as session:
        issued = await create_api_key(
            session,
            Actor.system("test"),
            name=f"test-{role.value}",
            role=role,
            organisation_public_id=organisation,
            **kwargs,  # type: ignore[arg-type]
        )
        return issued.secret


@pytest.fixture
async def admin_key(db: Database) -> str:
    return await issue_key(db)


@pytest.fixture
def process_env(database_url: str, tmp_path: Path, db: object) -> dict[str, str]:
    """Environment for `memberhub` processes (serve, worker, CLI) run against the test
    database, with their own data directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMBERHUB_")}
    env.update(
        MEMBERHUB_DATABASE_URL=database_url,
        MEMBERHUB_DATA_DIR=str(tmp_path / "data"),
        MEMBERHUB_WORKER_INTERVAL_SECONDS="0.2",
        MEMBERHUB_LOG_LEVEL="INFO",
    )
    return env


@pytest.fixture
def api(http: httpx.AsyncClient, admin_key: str) -> ApiClient:
    """An HTTP client authenticated as an installation-wide admin."""
    from tests.support import ApiClient

    return ApiClient(http, admin_key)
