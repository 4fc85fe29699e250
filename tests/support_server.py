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
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import uvicorn
from uvicorn.config import Config

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


class _PromptServer(uvicorn.Server):
    """uvicorn's server, stopped as soon as it is asked: uvicorn looks at `should_exit` every
    0.1 s and pauses 0.1 s more while stopping, which made the hundreds of servers the suite
    starts and stops wait minutes in all. Here the stop wakes the server's loop at once, and
    stopping waits only for the connections and requests still open."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._exit = asyncio.Event()

    def stop(self) -> None:
        """Ask the server to stop (from any thread)."""
        self.should_exit = True
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._exit.set)

    async def main_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        # `on_tick(0)` refreshes the Date header and tells whether to stop; a stop asked
        # before the loop was known is seen by it too.
        while not await self.on_tick(0):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exit.wait(), timeout=1.0)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        state = self.server_state
        for connection in list(state.connections):
            connection.shutdown()  # idle ones close now, busy ones after their response
        try:
            async with asyncio.timeout(self.config.timeout_graceful_shutdown):
                # uvicorn signals no event when its last connection or request ends.
                while (state.connections or state.tasks) and not self.force_exit:  # noqa: ASYNC110
                    await asyncio.sleep(0.005)
        except TimeoutError:
            for task in state.tasks:
                task.cancel()
        if not self.force_exit:
            await self.lifespan.shutdown()


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
    server = _PromptServer(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=name, daemon=True)
    thread.start()
    try:
        await _wait_until_started(server, thread, name)
        yield
    finally:
        server.stop()
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
