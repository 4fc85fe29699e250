"""What the benchmarks share: scratch PostgreSQL databases, an admin key, and the
application served by uvicorn in a child process (`python -m bench.common` is that child).

Run the benchmarks from the repository root as modules, e.g. `python -m bench.ledger`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import asyncpg
import httpx
from sqlalchemy.engine import make_url

from memberhub.auth.roles import Role
from memberhub.auth.service import create_api_key
from memberhub.kit.actor import Actor
from memberhub.kit.db import Database
from memberhub.kit.migrate import upgrade

DEFAULT_POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
# The benchmarks measure the API, not the rate limiter refusing it.
UNLIMITED = "100000000/minute"
SERVER_START_TIMEOUT = 60.0
SERVER_STOP_TIMEOUT = 15.0
SERVE_URL_ENV = "MEMBERHUB_BENCH_SERVE_DATABASE_URL"
SERVE_DATA_DIR_ENV = "MEMBERHUB_BENCH_SERVE_DATA_DIR"
SERVE_PORT_ENV = "MEMBERHUB_BENCH_SERVE_PORT"
REPOSITORY_ROOT = Path(__file__).resolve().parent.parent


# -- databases ------------------------------------------------------------------------------


def asyncpg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def pg_execute(server_url: str, statement: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(server_url), timeout=10)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


class BareReader:
    """Reads through the bare driver, stdlib sqlite3 (autocommit: each read sees the latest
    commit) or one asyncpg connection, for a bench's raw side or a probe that must cost the
    measured process little. Queries name their parameters {0}, {1}, ..., written as each
    driver wants them."""

    def __init__(self, url: str) -> None:
        self.url = make_url(url)
        self.sqlite: sqlite3.Connection | None = None
        self.pg: asyncpg.Connection | None = None

    async def __aenter__(self) -> Self:
        if self.url.get_backend_name() == "sqlite":
            self.sqlite = sqlite3.connect(self.url.database or "", isolation_level=None)
        else:
            self.pg = await asyncpg.connect(asyncpg_dsn(self.url.render_as_string(False)))
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self.sqlite is not None:
            self.sqlite.close()
        if self.pg is not None:
            await self.pg.close()

    async def rows(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        if self.sqlite is not None:
            return self.sqlite.execute(query.format(*["?"] * len(args)), args).fetchall()
        assert self.pg is not None
        marks = [f"${number}" for number in range(1, len(args) + 1)]
        return [tuple(row) for row in await self.pg.fetch(query.format(*marks), *args)]


def postgres_reachable(server_url: str) -> str | None:
    """None when the server answers, else why not."""
    try:
        asyncio.run(pg_execute(server_url, "SELECT 1"))
    except (OSError, asyncpg.PostgresError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def backends_named(choice: str) -> list[str]:
    """The backends a bench's `--backend` choice names ("all" or "both": both)."""
    return ["sqlite", "postgresql"] if choice in ("all", "both") else [choice]


def postgres_usable(pg_url: str, *, required: bool, label: str = "postgresql") -> bool | None:
    """Whether the PostgreSQL part of a bench can run: True when the server answers; when
    it does not, False with a note that the part is skipped, or None, said on stderr, when
    the part was `required` (asked for by name or by URL) and the bench must fail. `label`:
    how the note names PostgreSQL, aligned with the bench's own lines."""
    problem = postgres_reachable(pg_url)
    if problem is None:
        return True
    if required:
        print(f"postgresql unreachable at {pg_url}: {problem}", file=sys.stderr)
        return None
    print(f"{label} skipped: unreachable at {pg_url} ({problem})")
    return False


async def issue_admin_key(url: str) -> str:
    db = Database(url, pool_size=1)
    try:
        async with db.transaction() as session:
            issued = await create_api_key(
                session, Actor.system("bench"), name="bench", role=Role.ADMIN, rate_limit=UNLIMITED
            )
            return issued.secret
    finally:
        await db.dispose()


# -- the server -----------------------------------------------------------------------------


def serve(database_url: str, port: int, data_dir: str) -> None:
    """The child process: the application under uvicorn, as `memberhub serve` runs it."""
    import uvicorn

    from memberhub.app import create_app
    from memberhub.settings import Settings

    settings = Settings(
        database_url=database_url,
        data_dir=Path(data_dir),
        secret_key="bench-secret-key-not-for-production",
        redis_url=None,
        log_level="WARNING",
        rate_limit=UNLIMITED,
    )
    application = create_app(settings)
    uvicorn.run(application, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def running_server(database_url: str) -> Iterator[str]:
    """The application on `database_url`, in a child process; yields its base URL."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="memberhub-bench-data-") as data_dir:
        # The URL goes by environment, so a password in it stays out of the process list.
        env = {
            **os.environ,
            SERVE_URL_ENV: database_url,
            SERVE_DATA_DIR_ENV: data_dir,
            SERVE_PORT_ENV: str(port),
        }
        with running_child(["bench.common"], port, env=env) as base_url:
            yield base_url


@contextlib.contextmanager
def running_child(
    module_args: list[str], port: int, *, env: dict[str, str] | None = None
) -> Iterator[str]:
    """`python -m <module_args>` in a child process, serving on `port` (it answers
    `/health` once ready); yields its base URL and stops it when the block ends."""
    process = subprocess.Popen([sys.executable, "-m", *module_args], env=env, cwd=REPOSITORY_ROOT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(process, base_url)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=SERVER_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def serve_asgi(app: Any, port: int) -> None:
    """Serve a bare ASGI app (a benchmark's fake peer) on 127.0.0.1:`port`, quietly."""
    import uvicorn

    # Idle connections are kept for the whole run: a peer closing one after uvicorn's 5 s
    # while the client reuses it (between rounds, on a loaded machine) fails that request.
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_keep_alive=600,
    )


def wait_until_ready(process: subprocess.Popen[bytes], base_url: str) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    # One client for every poll: `httpx.get` would build a TLS context from the CA bundle
    # each time, CPU taken from the server starting beside it.
    with httpx.Client(trust_env=False) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with status {process.returncode}")
            with contextlib.suppress(httpx.TransportError):
                if client.get(f"{base_url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
    raise RuntimeError(f"the server did not answer within {SERVER_START_TIMEOUT:.0f}s")


# -- scratch databases ---------------------------------------------------------------------


@contextlib.contextmanager
def postgres_database(server_url: str) -> Iterator[str]:
    """A new, empty PostgreSQL database on `server_url`, dropped when the block ends."""
    name = f"memberhub_bench_{uuid.uuid4().hex[:12]}"
    asyncio.run(pg_execute(server_url, f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        asyncio.run(pg_execute(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


class Scratch:
    """The databases of one backend's run, all removed when it ends."""

    def __init__(self, directory: Path | None, server_url: str | None) -> None:
        self.directory = directory
        self.server_url = server_url
        self.prefix = f"memberhub_bench_{uuid.uuid4().hex[:12]}"
        self.created: list[str] = []

    def _url(self, name: str) -> str:
        if self.directory is not None:
            return f"sqlite+aiosqlite:///{self.directory / f'{name}.db'}"
        assert self.server_url is not None
        database = f"{self.prefix}_{name}"
        return make_url(self.server_url).set(database=database).render_as_string(False)

    def new(self, name: str) -> str:
        """An empty, migrated database."""
        if self.server_url is not None:
            self.created.append(f"{self.prefix}_{name}")
            asyncio.run(pg_execute(self.server_url, f'CREATE DATABASE "{self.prefix}_{name}"'))
        url = self._url(name)
        upgrade(url)
        return url

    def copy(self, source: str, name: str) -> str:
        """A copy of `source`, which nothing may be connected to."""
        if self.directory is not None:
            shutil.copyfile(self.directory / f"{source}.db", self.directory / f"{name}.db")
        else:
            assert self.server_url is not None
            self.created.append(f"{self.prefix}_{name}")
            asyncio.run(
                pg_execute(
                    self.server_url,
                    f'CREATE DATABASE "{self.prefix}_{name}" TEMPLATE "{self.prefix}_{source}"',
                )
            )
        return self._url(name)

    def drop_all(self) -> None:
        if self.server_url is None:
            return
        for database in self.created:
            asyncio.run(
                pg_execute(self.server_url, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            )


@contextlib.contextmanager
def scratch_space(backend: str, pg_url: str) -> Iterator[Scratch]:
    if backend == "sqlite":
        with tempfile.TemporaryDirectory(prefix="memberhub-bench-") as directory:
            yield Scratch(Path(directory), None)
        return
    scratch = Scratch(None, pg_url)
    try:
        yield scratch
    finally:
        scratch.drop_all()


if __name__ == "__main__":
    serve(
        os.environ[SERVE_URL_ENV], int(os.environ[SERVE_PORT_ENV]), os.environ[SERVE_DATA_DIR_ENV]
    )
