"""A stateful fake of Algolia's indexing API, for the search-index provider and sync.

`running_fake_algolia` serves it on a free port of 127.0.0.1 (uvicorn in a thread, as the
other fakes), with the shapes of the real API:

    async with running_fake_algolia(application_id="APP0TEST01", api_key=KEY) as fake:
        fake.fail_next(3)
        ...point the integration's base_url at fake.url and run the sync...
        assert fake.records("memberhub_rewards") == {...}

Every request carries `X-Algolia-Application-Id` and `X-Algolia-API-Key`; a wrong pair is
answered 403 `{"message": "Invalid Application-ID or API key", "status": 403}`. Errors
are `{"message", "status"}` throughout.

- `POST /1/indexes/{index}/batch` `{"requests": [{"action", "body"}]}`: actions
  `addObject`, `updateObject`, `partialUpdateObject`, `partialUpdateObjectNoCreate`,
  `deleteObject`, `delete`, `clear`, applied in order, all or none: a batch with an
  invalid operation, a record over `max_record_bytes` (10 KB, the Build plan's limit) or
  more than `max_batch_operations` operations (1,000) is refused with 400 and changes
  nothing. Answers `{"taskID", "objectIDs"}`.
- `GET /1/indexes/{index}/task/{taskID}`: `notPublished` for the first `publish_after`
  looks, then `published`.
- `POST /1/indexes/{index}/operation` `{"operation": "copy"|"move", "destination",
  "scope"?}`: a copy with a scope copies only those parts (no records); a move replaces
  the destination and removes the source. 404 when the source does not exist.
- `DELETE /1/indexes/{index}`, `POST /1/indexes/{index}/clear`, `GET /1/indexes`,
  `GET /1/indexes/{index}/{objectID}`, `GET|PUT /1/indexes/{index}/settings`.

Programming: `fail_next` (5xx before anything happens), `rate_limit_next` (429),
`go_down`/`come_back` (every request 503 until further notice).
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import threading
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

from starlette.requests import Request
from starlette.responses import Response

from tests.support_server import bind_local_socket, serving_in_thread

DEFAULT_APPLICATION_ID = "FAKEAPP001"
DEFAULT_API_KEY = "fake-algolia-admin-key-0123456789abcdef"
MAX_RECORD_BYTES = 10_000
MAX_BATCH_OPERATIONS = 1000
ACTIONS = frozenset(
    {
        "addObject",
        "updateObject",
        "partialUpdateObject",
        "partialUpdateObjectNoCreate",
        "deleteObject",
        "delete",
        "clear",
    }
)


@dataclass
class AlgoliaRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    accepted: bool = False  # answered 2xx


@dataclass
class _Index:
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    synonyms: list[Any] = field(default_factory=list)
    rules: list[Any] = field(default_factory=list)
    updated_at: datetime = field(default_factory=lambda: datetime.now(UTC))


def error(status: int, message: str, **headers: str) -> Response:
    return Response(
        json.dumps({"message": message, "status": status}),
        status,
        media_type="application/json",
        headers=headers,
    )


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status, media_type="application/json")


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class FakeAlgolia:
    """The fake's state, programming and what it has seen; safe to use from any thread."""

    def __init__(self, url: str, application_id: str, api_key: str) -> None:
        self.url = url
        self.application_id = application_id
        self.api_key = api_key
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._indices: dict[str, _Index] = {}
            self._tasks: dict[int, int] = {}  # task id → looks left before published
            self._task_ids = itertools.count(1000)
            self._auto_ids = itertools.count(1)
            self._requests: list[AlgoliaRequest] = []
            self._failures: deque[int] = deque()
            self._rate_limited = 0
            self._down = False
            self.publish_after = 0
            self.max_record_bytes = MAX_RECORD_BYTES
            self.max_batch_operations = MAX_BATCH_OPERATIONS

    # ------------------------------------------------------------------ programming

    def fail_next(self, n: int, status: int = 500) -> None:
        with self._lock:
            self._failures.extend(status for _ in range(n))

    def rate_limit_next(self, n: int) -> None:
        with self._lock:
            self._rate_limited += n

    def go_down(self) -> None:
        """Answer every request 503 until `come_back`."""
        with self._lock:
            self._down = True

    def come_back(self) -> None:
        with self._lock:
            self._down = False

    def put_records(self, index: str, records: list[dict[str, Any]]) -> None:
        with self._lock:
            target = self._indices.setdefault(index, _Index())
            for record in records:
                target.records[str(record["objectID"])] = copy.deepcopy(record)

    def put_settings(self, index: str, settings: dict[str, Any]) -> None:
        with self._lock:
            self._indices.setdefault(index, _Index()).settings.update(settings)

    # ------------------------------------------------------------------ inspection

    def records(self, index: str) -> dict[str, dict[str, Any]]:
        with self._lock:
            found = self._indices.get(index)
            return copy.deepcopy(found.records) if found else {}

    def settings(self, index: str) -> dict[str, Any]:
        with self._lock:
            found = self._indices.get(index)
            return dict(found.settings) if found else {}

    def index_names(self) -> list[str]:
        with self._lock:
            return sorted(self._indices)

    def requests(self) -> list[AlgoliaRequest]:
        with self._lock:
            return list(self._requests)

    def batches(self, index: str | None = None) -> list[list[dict[str, Any]]]:
        """The operations of each batch request accepted so far, in order."""
        with self._lock:
            return [
                list(r.body["requests"])
                for r in self._requests
                if r.method == "POST"
                and r.path.endswith("/batch")
                and isinstance(r.body, dict)
                and (index is None or r.path == f"/1/indexes/{index}/batch")
                and r.accepted
            ]

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: Mapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        request = Request(dict(scope), receive)
        raw = await request.body()
        response = await asyncio.to_thread(self._handle, request, raw)
        await response(dict(scope), receive, send)

    def _handle(self, request: Request, raw: bytes) -> Response:
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = ValueError
        headers = {k.lower(): v for k, v in request.headers.items()}
        with self._lock:
            entry = AlgoliaRequest(request.method, request.url.path, headers, body)
            self._requests.append(entry)
            if (
                headers.get("x-algolia-application-id") != self.application_id
                or headers.get("x-algolia-api-key") != self.api_key
            ):
                return error(403, "Invalid Application-ID or API key")
            if self._down:
                return error(503, "Service Unavailable")
            if self._failures:
                return error(self._failures.popleft(), "Internal Server Error")
            if self._rate_limited:
                self._rate_limited -= 1
                return error(429, "Too many requests", **{"Retry-After": "1"})
            if body is ValueError:
                return error(400, "Invalid JSON")
            response = self._route(request.method, request.url.path, body)
            entry.accepted = response.status_code < 300
            return response

    def _route(self, method: str, path: str, body: Any) -> Response:
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if parts[:2] != ["1", "indexes"]:
            return error(404, "Not found")
        if len(parts) == 2 and method == "GET":
            return _json(
                {
                    "items": [
                        {"name": name, "entries": len(index.records), "updatedAt": _now()}
                        for name, index in sorted(self._indices.items())
                    ],
                    "nbPages": 1,
                }
            )
        if len(parts) < 3:
            return error(404, "Not found")
        name = parts[2]
        rest = parts[3:]
        if rest == [] and method == "DELETE":
            self._indices.pop(name, None)
            return _json({"taskID": self._task(), "deletedAt": _now()})
        if rest == ["batch"] and method == "POST":
            return self._batch(name, body)
        if rest == ["clear"] and method == "POST":
            if name in self._indices:
                self._indices[name].records.clear()
            return _json({"taskID": self._task(), "updatedAt": _now()})
        if rest == ["operation"] and method == "POST":
            return self._operation(name, body)
        if rest == ["settings"]:
            if method == "GET":
                found = self._indices.get(name)
                return _json(found.settings) if found else error(404, "Index does not exist")
            if method == "PUT" and isinstance(body, dict):
                self._indices.setdefault(name, _Index()).settings.update(body)
                return _json({"taskID": self._task(), "updatedAt": _now()})
        if len(rest) == 2 and rest[0] == "task" and method == "GET":
            return self._task_status(rest[1])
        if len(rest) == 1 and method == "GET":
            found = self._indices.get(name)
            record = found.records.get(rest[0]) if found else None
            if record is None:
                return error(404, "ObjectID does not exist")
            return _json(record)
        return error(404, "Not found")

    def _batch(self, name: str, body: Any) -> Response:
        requests = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(requests, list):
            return error(400, "Invalid batch: requests must be an array")
        if len(requests) > self.max_batch_operations:
            return error(400, f"Too many operations in one batch (max {self.max_batch_operations})")
        # Check every operation first: a batch is applied all or none.
        for position, operation in enumerate(requests):
            if not isinstance(operation, dict) or operation.get("action") not in ACTIONS:
                return error(400, f"invalid action at position {position}")
            action = operation["action"]
            record = operation.get("body")
            if action in ("delete", "clear"):
                continue
            if not isinstance(record, dict):
                return error(400, f"body is missing at position {position}")
            if action != "addObject" and not isinstance(record.get("objectID"), str | int):
                return error(400, f"objectID is missing at position {position}")
            size = len(json.dumps(record, separators=(",", ":")).encode())
            if size > self.max_record_bytes:
                return error(
                    400,
                    f"Record at the position {position} objectID={record.get('objectID')} is "
                    f"too big size={size}/{self.max_record_bytes} bytes. Please have a look at "
                    "https://www.algolia.com/doc/guides/sending-and-managing-data/"
                    "prepare-your-data/in-depth/index-and-records-size-and-usage-limitations/",
                )
        index = self._indices.setdefault(name, _Index())
        object_ids: list[str] = []
        for operation in requests:
            action = operation["action"]
            record = dict(operation.get("body") or {})
            if action == "addObject" and "objectID" not in record:
                record["objectID"] = f"auto-{next(self._auto_ids)}"
            object_id = str(record.get("objectID", ""))
            if action in ("addObject", "updateObject"):
                index.records[object_id] = {**record, "objectID": object_id}
            elif action in ("partialUpdateObject", "partialUpdateObjectNoCreate"):
                if object_id in index.records:
                    index.records[object_id].update(record)
                elif action == "partialUpdateObject":
                    index.records[object_id] = {**record, "objectID": object_id}
            elif action == "deleteObject":
                index.records.pop(object_id, None)
            elif action == "clear":
                index.records.clear()
            elif action == "delete":
                index.records.clear()
                index.settings.clear()
            if object_id:
                object_ids.append(object_id)
        index.updated_at = datetime.now(UTC)
        return _json({"taskID": self._task(), "objectIDs": object_ids})

    def _operation(self, name: str, body: Any) -> Response:
        if not isinstance(body, dict) or body.get("operation") not in ("copy", "move"):
            return error(400, "operation must be copy or move")
        destination = body.get("destination")
        if not isinstance(destination, str) or not destination or destination == name:
            return error(400, "destination is missing or the same index")
        source = self._indices.get(name)
        if source is None:
            return error(404, "Index does not exist")
        scope = body.get("scope")
        if body["operation"] == "move":
            self._indices[destination] = source
            del self._indices[name]
        elif scope is None:
            self._indices[destination] = copy.deepcopy(source)
        else:
            target = self._indices.setdefault(destination, _Index())
            for part in scope:
                if part not in ("settings", "synonyms", "rules"):
                    return error(400, f"unknown scope {part!r}")
                setattr(target, part, copy.deepcopy(getattr(source, part)))
        return _json({"taskID": self._task(), "updatedAt": _now()})

    def _task(self) -> int:
        task_id = next(self._task_ids)
        self._tasks[task_id] = self.publish_after
        return task_id

    def _task_status(self, raw_id: str) -> Response:
        if not raw_id.isdigit() or int(raw_id) not in self._tasks:
            return error(404, "Task does not exist")
        task_id = int(raw_id)
        left = self._tasks[task_id]
        if left > 0:
            self._tasks[task_id] = left - 1
            return _json({"status": "notPublished", "pendingTask": True})
        return _json({"status": "published", "pendingTask": False})


@asynccontextmanager
async def running_fake_algolia(
    application_id: str = DEFAULT_APPLICATION_ID, api_key: str = DEFAULT_API_KEY
) -> AsyncIterator[FakeAlgolia]:
    """Serve a fresh `FakeAlgolia` on 127.0.0.1 until the block ends."""
    sock, base_url = bind_local_socket()
    fake = FakeAlgolia(base_url, application_id, api_key)
    async with serving_in_thread(
        fake, sock, name="fake-algolia", lifespan="off", graceful_shutdown=1
    ):
        yield fake
