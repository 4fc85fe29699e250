"""The application served over real HTTP, for tests that need a real server.

`httpx.ASGITransport` calls the application inside the test's own event loop: good for
most tests, but it is not how requests arrive in production. Tests of concurrency (many
requests racing for the same rows), of connection handling or of anything else that
depends on requests being served independently of the client use `running_server`
instead: the application under uvicorn, in a thread with its own event loop, listening on
a free port of 127.0.0.1.

    async def test_claims_race(settings: Settings, db: Database) -> None:
        async with running_server(settings) as base_url:
            async with httpx.AsyncClient(base_url=base_url) as client:
                await asyncio.gather(*(client.post(...) for _ in range(20)))

The server builds its own application from `settings` (normally the test's `settings`
fixture, so it uses the test's database; request the `db` fixture too so the tables are
emptied first). Its lifespan runs as in production, without the embedded worker. Leaving
the block stops the server gracefully: requests in flight finish, then the application
shuts down and its database engine is disposed. Close clients before leaving it.

The server has its own engine and connection pool. On SQLite it shares the database file
with the test's `db` (writers wait for each other through SQLite's busy timeout); on
PostgreSQL its requests run in transactions of their own, truly in parallel.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import uvicorn

from memberhub.app import create_app
from memberhub.settings import Settings

STARTUP_TIMEOUT_SECONDS = 30.0
SHUTDOWN_TIMEOUT_SECONDS = 30.0


def bind_local_socket() -> tuple[socket.socket, str]:
    """A listening address on 127.0.0.1 and its base URL. Bound here and handed to uvicorn,
    the port is ours from the start: no other process can take it meanwhile."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock, f"http://127.0.0.1:{sock.getsockname()[1]}"


@asynccontextmanager
async def serving_in_thread(
    app: Any,
    sock: socket.socket,
    *,
    name: str,
    lifespan: Literal["on", "off"] = "on",
    graceful_shutdown: int | None = None,
) -> AsyncIterator[None]:
    """Serve the ASGI `app` on `sock` under uvicorn, in a thread with its own event loop,
    until the block ends; then stop it (requests still running after `graceful_shutdown`
    seconds are cancelled) and close the socket."""
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        # Keep uvicorn from reconfiguring the test process's logging.
        log_config=None,
        lifespan=lifespan,
        timeout_graceful_shutdown=graceful_shutdown,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=name, daemon=True)
    thread.start()
    try:
        await _wait_until_started(server, thread, name)
        yield
    finally:
        server.should_exit = True
        await asyncio.to_thread(thread.join, SHUTDOWN_TIMEOUT_SECONDS)
        if thread.is_alive():
            # Requests that never finish: close their connections rather than hang the run.
            server.force_exit = True
            await asyncio.to_thread(thread.join, SHUTDOWN_TIMEOUT_SECONDS)
        sock.close()


@asynccontextmanager
async def running_server(settings: Settings) -> AsyncIterator[str]:
    """Serve the application for `settings` on 127.0.0.1; yields its base URL."""
    sock, base_url = bind_local_socket()
    async with serving_in_thread(create_app(settings), sock, name="memberhub-test-server"):
        yield base_url


async def _wait_until_started(server: uvicorn.Server, thread: threading.Thread, name: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"{name} exited during startup")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start in {STARTUP_TIMEOUT_SECONDS:.0f}s")
        await asyncio.sleep(0.01)
