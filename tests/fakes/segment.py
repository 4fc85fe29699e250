"""A stateful fake of Segment's HTTP Tracking API (`/v1/batch`) and of the Public API's
regulations, for the event sink tests.

`running_fake_segment` serves it on a free port of 127.0.0.1 (uvicorn in a thread, as the
other fakes):

    async with running_fake_segment(write_key=KEY) as fake:
        ...a Segment integration with base_url=fake.url...
        fake.calls_for("mem_…")     # the member's identify and track calls, in order

As Segment documents: a batch is authenticated with the write key as the Basic user name
(or `writeKey` in the body); a body that is not JSON, larger than 500 KB, or holding a
call larger than 32 KB is answered 400; everything else is answered 200
`{"success": true}`, including calls Segment drops (an unknown write key, a call without
`userId`/`anonymousId`, a track without `event`): those are kept in `dropped`, as the
source's Debugger would not show them. Calls are deduplicated on `messageId`.

`POST /regulations` (Public API, bearer token) files deletion regulations; `down(503)`
answers every request with that status until `up()`, `fail_next` the next few, `hang`
waits before answering.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from tests.support_server import bind_local_socket, serving_in_thread

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_BATCH_BYTES = 500 * 1024
MAX_CALL_BYTES = 32 * 1024
CALL_TYPES = frozenset({"identify", "track", "page", "screen", "group", "alias"})
REGULATION_TYPES = frozenset(
    {
        "SUPPRESS_WITH_DELETE",
        "SUPPRESS_WITH_DELETE_INTERNAL",
        "DELETE_ONLY",
        "DELETE_INTERNAL",
        "DELETE_ARCHIVE_ONLY",
        "SUPPRESS_ONLY",
        "UNSUPPRESS",
    }
)


@dataclass(frozen=True)
class Batch:
    """One batch request Segment answered 200, with its calls as sent."""

    calls: list[dict[str, Any]]
    size: int


@dataclass
class _State:
    batches: list[Batch] = field(default_factory=list)
    accepted: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    message_ids: set[str] = field(default_factory=set)
    duplicates: int = 0
    regulations: list[dict[str, Any]] = field(default_factory=list)
    requests: int = 0
    refused: int = 0
    failures: deque[int | None] = field(default_factory=deque)
    down_status: int | None = None
    delay: float = 0.0


class FakeSegment:
    """The fake's state and programming; safe to use from any thread."""

    def __init__(self, url: str, write_key: str, public_api_token: str) -> None:
        self.url = url
        self.write_key = write_key
        self.public_api_token = public_api_token
        self._lock = threading.Lock()
        self._state = _State()

    # ------------------------------------------------------------ programming

    def down(self, status: int = 503) -> None:
        """Answer every request with `status` until `up()`."""
        with self._lock:
            self._state.down_status = status

    def up(self) -> None:
        with self._lock:
            self._state.down_status = None

    def hang(self, seconds: float) -> None:
        """Wait `seconds` before answering each request (0: answer at once)."""
        with self._lock:
            self._state.delay = seconds

    def fail_next(self, n: int, status: int = 500) -> None:
        with self._lock:
            self._state.failures.extend(status for _ in range(n))

    def answer_next(self, *statuses: int | None) -> None:
        """The next requests' answers in turn: a status, or None to serve it as usual."""
        with self._lock:
            self._state.failures.extend(statuses)

    # ------------------------------------------------------------ what it saw

    @property
    def requests(self) -> int:
        """Every request received, whatever its answer."""
        with self._lock:
            return self._state.requests

    @property
    def batches(self) -> list[Batch]:
        with self._lock:
            return list(self._state.batches)

    @property
    def accepted(self) -> list[dict[str, Any]]:
        """Calls taken (not dropped, not duplicates), in the order received."""
        with self._lock:
            return list(self._state.accepted)

    @property
    def dropped(self) -> list[tuple[dict[str, Any], str]]:
        with self._lock:
            return list(self._state.dropped)

    @property
    def duplicates(self) -> int:
        with self._lock:
            return self._state.duplicates

    @property
    def regulations(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._state.regulations)

    def calls_for(self, user_id: str) -> list[dict[str, Any]]:
        return [call for call in self.accepted if call.get("userId") == user_id]

    def tracks(self) -> list[dict[str, Any]]:
        return [call for call in self.accepted if call["type"] == "track"]

    # ------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        request = Request(scope, receive)
        body = await request.body()
        headers = {name.lower(): value for name, value in request.headers.items()}
        with self._lock:
            self._state.requests += 1
            status = self._state.down_status
            if status is None and self._state.failures:
                status = self._state.failures.popleft()
            delay = self._state.delay
        if delay:
            await asyncio.sleep(delay)
        if status is not None:
            payload: Any = {"message": "Service Unavailable"}
        elif request.method == "POST" and request.url.path == "/v1/batch":
            status, payload = self._batch(headers, body)
        elif request.method == "POST" and request.url.path == "/regulations":
            status, payload = self._regulation(headers, body)
        else:
            status, payload = 404, {"message": "Not Found"}
        response = Response(
            content=json.dumps(payload).encode(),
            status_code=status,
            media_type="application/json",
        )
        await response(scope, receive, send)

    def _write_key(self, headers: dict[str, str], body: Any) -> str | None:
        scheme, _, encoded = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "basic":
            try:
                user, _, _password = base64.b64decode(encoded).decode().partition(":")
            except ValueError:
                return None
            return user
        if isinstance(body, dict) and isinstance(body.get("writeKey"), str):
            return str(body["writeKey"])
        return None

    def _batch(self, headers: dict[str, str], raw: bytes) -> tuple[int, Any]:
        if len(raw) > MAX_BATCH_BYTES:
            return self._refuse("Payload too large: a batch is at most 500KB")
        try:
            body = json.loads(raw)
        except ValueError:
            return self._refuse("Invalid JSON")
        calls = body.get("batch") if isinstance(body, dict) else None
        if not isinstance(calls, list):
            return self._refuse("batch must be an array")
        for call in calls:
            if len(json.dumps(call, separators=(",", ":")).encode()) > MAX_CALL_BYTES:
                return self._refuse("Payload too large: a call is at most 32KB")
        known = self._write_key(headers, body) == self.write_key
        with self._lock:
            self._state.batches.append(Batch([dict(c) for c in calls], len(raw)))
            for call in calls:
                reason = self._invalid(call) if known else "unknown write key"
                if reason is not None:
                    self._state.dropped.append((call, reason))
                    continue
                message_id = str(call.get("messageId") or uuid.uuid4())
                if message_id in self._state.message_ids:
                    self._state.duplicates += 1
                    continue
                self._state.message_ids.add(message_id)
                self._state.accepted.append(dict(call))
        return 200, {"success": True}

    def _refuse(self, message: str) -> tuple[int, Any]:
        with self._lock:
            self._state.refused += 1
        return 400, {"success": False, "message": message}

    @staticmethod
    def _invalid(call: Any) -> str | None:
        if not isinstance(call, dict) or call.get("type") not in CALL_TYPES:
            return "unknown call type"
        if not call.get("userId") and not call.get("anonymousId"):
            return "userId or anonymousId is required"
        if call["type"] == "track" and not call.get("event"):
            return "track requires event"
        if call.get("messageId") is not None and len(str(call["messageId"])) > 100:
            return "messageId longer than 100 characters"
        return None

    def _regulation(self, headers: dict[str, str], raw: bytes) -> tuple[int, Any]:
        if headers.get("authorization") != f"Bearer {self.public_api_token}":
            return 401, {"errors": [{"type": "unauthorized", "message": "Unauthorized"}]}
        try:
            body = json.loads(raw)
        except ValueError:
            return 400, {"errors": [{"type": "bad-request", "message": "invalid JSON"}]}
        if (
            not isinstance(body, dict)
            or body.get("regulationType") not in REGULATION_TYPES
            or body.get("subjectType") not in ("USER_ID", "OBJECT_ID")
            or not isinstance(body.get("subjectIds"), list)
            or not body["subjectIds"]
        ):
            return 400, {"errors": [{"type": "bad-request", "message": "invalid regulation"}]}
        regulate_id = uuid.uuid4().hex[:24]
        with self._lock:
            self._state.regulations.append({**body, "regulateId": regulate_id})
        return 200, {"data": {"regulateId": regulate_id}}


@asynccontextmanager
async def running_fake_segment(
    write_key: str = "segment-write-key-0001", public_api_token: str = "sgp_public_api_token_01"
) -> AsyncIterator[FakeSegment]:
    """Serve a fresh `FakeSegment` on 127.0.0.1 until the block ends."""
    sock, base_url = bind_local_socket()
    fake = FakeSegment(base_url, write_key, public_api_token)
    async with serving_in_thread(fake, sock, name="fake-segment", lifespan="off"):
        yield fake
