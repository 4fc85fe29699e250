"""A programmable third-party API that fails, goes down and rate-limits on demand.

`running_flaky_api` serves it on a free port of 127.0.0.1, under uvicorn in a thread with
its own event loop (as `tests.fakes.webhook_receiver` does), so that the gateway under test
talks to it over real HTTP:

    async with running_flaky_api() as api:
        api.fail_next(2, status=503)
        ...call api.base_url through the gateway...
        assert api.count("/contacts") == 3

Any method on any path answers 200 with a small JSON body unless the programming says
otherwise. Checks apply in this order: down (503), the next programmed failures, the rate
limit (429 with `Retry-After` and `X-RateLimit-Reset`). Every request is recorded with the
status it got, after `latency` is waited out.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from tests.support_server import bind_local_socket, serving_in_thread

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass(frozen=True)
class Arrival:
    """One request, as the fake answered it."""

    method: str
    path: str
    status: int
    idempotency_key: str | None
    headers: dict[str, str]  # lower-cased names


class FlakyApi:
    """The fake's programming and what it has seen; safe to use from any thread."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self._lock = threading.Lock()
        self._down = False
        self._failures: deque[tuple[int, dict[str, str]]] = deque()
        self._rate_limit: tuple[int, float] | None = None
        self._accepted_at: deque[float] = deque()
        self._latency = 0.0
        self._arrivals: list[Arrival] = []

    def fail_next(self, n: int, status: int = 503, headers: dict[str, str] | None = None) -> None:
        """Answer the next `n` requests with `status` (and `headers`)."""
        with self._lock:
            self._failures.extend((status, dict(headers or {})) for _ in range(n))

    def set_down(self, down: bool) -> None:
        """While down, every request gets 503."""
        with self._lock:
            self._down = down

    def set_rate_limit(self, amount: int | None, per_seconds: float = 1.0) -> None:
        """Accept at most `amount` requests in any moving window of `per_seconds`; None: all."""
        with self._lock:
            self._rate_limit = None if amount is None else (amount, per_seconds)
            self._accepted_at.clear()

    def set_latency(self, seconds: float) -> None:
        """Wait `seconds` before answering each request."""
        with self._lock:
            self._latency = seconds

    def arrivals(self, path: str | None = None) -> list[Arrival]:
        with self._lock:
            return [a for a in self._arrivals if path is None or a.path == path]

    def count(self, path: str | None = None, status: int | None = None) -> int:
        """Requests to `path` (any if None) answered with `status` (any if None)."""
        return sum(1 for a in self.arrivals(path) if status is None or a.status == status)

    def idempotency_keys(self, path: str | None = None) -> list[str | None]:
        return [a.idempotency_key for a in self.arrivals(path)]

    def _decide(self) -> tuple[int, dict[str, str]]:
        with self._lock:
            if self._down:
                return 503, {}
            if self._failures:
                return self._failures.popleft()
            if self._rate_limit is not None:
                amount, seconds = self._rate_limit
                now = time.monotonic()
                while self._accepted_at and self._accepted_at[0] <= now - seconds:
                    self._accepted_at.popleft()
                if len(self._accepted_at) >= amount:
                    reset = max(0.0, self._accepted_at[0] + seconds - now)
                    # Whole seconds, as HTTP's Retry-After; rounded up so it is enough.
                    wait = str(max(1, math.ceil(reset)))
                    return 429, {"retry-after": wait, "x-ratelimit-reset": wait}
                self._accepted_at.append(now)
            return 200, {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await _read_body(receive)
        headers = {
            name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in scope["headers"]
        }
        with self._lock:
            latency = self._latency
        if latency > 0:
            await asyncio.sleep(latency)
        status, reply_headers = self._decide()
        arrival = Arrival(
            method=scope["method"],
            path=scope["path"],
            status=status,
            idempotency_key=headers.get("idempotency-key"),
            headers=headers,
        )
        with self._lock:
            self._arrivals.append(arrival)
        body = json.dumps({"path": arrival.path, "status": status}).encode()
        reply_headers = {
            **reply_headers,
            "content-type": "application/json",
            "content-length": str(len(body)),
        }
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (k.encode("latin-1"), v.encode("latin-1")) for k, v in reply_headers.items()
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


@asynccontextmanager
async def running_flaky_api() -> AsyncIterator[FlakyApi]:
    """Serve a fresh `FlakyApi` on 127.0.0.1 until the block ends."""
    sock, base_url = bind_local_socket()
    api = FlakyApi(base_url)
    async with serving_in_thread(api, sock, name="flaky-api", lifespan="off", graceful_shutdown=1):
        yield api
