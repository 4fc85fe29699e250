"""A stateful fake of an organisation's own CRM, shaped like seed 003's custom CRM: a REST
API with an API key header, contacts under `/v2/contacts`, and a changes feed.

    async with running_fake_custom_crm(api_key="key") as fake:
        ...configure a custom_crm integration with base_url fake.url + "/v2"...
        assert fake.writes() == 10

Endpoints (JSON; `X-API-Key: <key>` or 401 `{"error": "unauthorized"}`):
- `GET /v2/contacts?email=` → `{"data": [contact…]}` (email compared case-insensitively)
- `POST /v2/contacts` → 201 contact; 422 `{"error": …}` without a valid `email`
- `PATCH /v2/contacts/{id}` → 200 contact; 404 when unknown
- `GET /v2/contacts/changes?updated_since=&cursor=&limit=` → `{"data": […], "next_cursor":
  …}`, ordered by (updated_at, id), `updated_since` inclusive; the cursor carries both
  values so records sharing a timestamp are neither skipped nor repeated.

A contact is `{"id", "email", "updated_at", …its properties}`. `rate_limit_next(n)` answers
429 with `Retry-After: 0`; `fail_next` and `random_failures` answer 503, before any change.
"""

from __future__ import annotations

import base64
import json
import random
import threading
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, NamedTuple

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.support_server import bind_local_socket, serving_in_thread

DEFAULT_KEY = "custom-crm-key-0123456789"
PAGE = 100


class CustomRequest(NamedTuple):
    method: str
    path: str
    status: int


def _stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class FakeCustomCrm:
    def __init__(self, url: str, api_key: str) -> None:
        self.url = url
        self.api_key = api_key
        self._lock = threading.Lock()
        self.reset()
        self.app = Starlette(
            routes=[
                Route("/v2/contacts", self._contacts, methods=["GET", "POST"]),
                Route("/v2/contacts/changes", self._changes, methods=["GET"]),
                Route("/v2/contacts/{contact_id}", self._contact, methods=["PATCH"]),
            ]
        )

    def reset(self) -> None:
        with self._lock:
            self._contacts_by_id: dict[str, dict[str, Any]] = {}
            self._by_email: dict[str, str] = {}
            self._next_id = 1
            self._writes = 0
            self._fail_next = 0
            self._rate_limited_next = 0
            self._random: random.Random | None = None
            self._failure_rate = 0.0
            self.requests: list[CustomRequest] = []

    # ------------------------------------------------------------ controls

    def fail_next(self, n: int) -> None:
        with self._lock:
            self._fail_next += n

    def rate_limit_next(self, n: int) -> None:
        with self._lock:
            self._rate_limited_next += n

    def random_failures(self, rate: float, seed: int = 0) -> None:
        with self._lock:
            self._failure_rate = rate
            self._random = random.Random(seed) if rate > 0 else None

    def add_contact(self, properties: dict[str, Any], updated_at: datetime) -> str:
        with self._lock:
            return self._create(properties, updated_at)["id"]

    def update_contact(
        self, contact_id: str, changes: dict[str, Any], updated_at: datetime
    ) -> None:
        with self._lock:
            self._update(contact_id, changes, updated_at)

    @property
    def contacts(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {cid: dict(c) for cid, c in self._contacts_by_id.items()}

    def count_all(self) -> int:
        """Every request received, refused ones included."""
        with self._lock:
            return len(self.requests)

    def writes(self) -> int:
        with self._lock:
            return self._writes

    # ------------------------------------------------------------ state

    def _create(self, properties: dict[str, Any], now: datetime) -> dict[str, Any]:
        contact_id = str(self._next_id)
        self._next_id += 1
        contact = {**properties, "id": contact_id, "updated_at": _stamp(now)}
        self._contacts_by_id[contact_id] = contact
        self._by_email[str(properties["email"]).lower()] = contact_id
        return contact

    def _update(self, contact_id: str, changes: dict[str, Any], now: datetime) -> dict[str, Any]:
        contact = self._contacts_by_id[contact_id]
        if all(contact.get(k) == v for k, v in changes.items()):
            return contact
        old_email = str(contact.get("email", "")).lower()
        contact.update(changes)
        contact["updated_at"] = _stamp(now)
        new_email = str(contact.get("email", "")).lower()
        if new_email != old_email:
            self._by_email.pop(old_email, None)
            self._by_email[new_email] = contact_id
        return contact

    # ------------------------------------------------------------ HTTP

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)

    def _admit(self, request: Request) -> Response | None:
        if request.headers.get("x-api-key") != self.api_key:
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        if self._fail_next > 0:
            self._fail_next -= 1
            return JSONResponse({"error": "unavailable"}, status_code=503)
        if self._rate_limited_next > 0:
            self._rate_limited_next -= 1
            return JSONResponse(
                {"error": "too many requests"}, status_code=429, headers={"Retry-After": "0"}
            )
        if self._random is not None and self._random.random() < self._failure_rate:
            return JSONResponse({"error": "unavailable"}, status_code=503)
        return None

    def _log(self, request: Request, response: Response) -> Response:
        self.requests.append(CustomRequest(request.method, request.url.path, response.status_code))
        return response

    async def _contacts(self, request: Request) -> Response:
        body = await request.body()
        with self._lock:
            refused = self._admit(request)
            if refused is not None:
                return self._log(request, refused)
            if request.method == "GET":
                email = request.query_params.get("email", "").lower()
                found = self._by_email.get(email)
                data = [dict(self._contacts_by_id[found])] if found else []
                return self._log(request, JSONResponse({"data": data}))
            properties = json.loads(body or b"{}")
            email = properties.get("email")
            if not isinstance(email, str) or "@" not in email:
                return self._log(request, JSONResponse({"error": "email is required"}, 422))
            if email.lower() in self._by_email:
                return self._log(request, JSONResponse({"error": "email already exists"}, 409))
            contact = self._create(properties, datetime.now(UTC))
            self._writes += 1
            return self._log(request, JSONResponse(dict(contact), status_code=201))

    async def _contact(self, request: Request) -> Response:
        body = await request.body()
        with self._lock:
            refused = self._admit(request)
            if refused is not None:
                return self._log(request, refused)
            contact_id = request.path_params["contact_id"]
            if contact_id not in self._contacts_by_id:
                return self._log(request, JSONResponse({"error": "not found"}, 404))
            before = dict(self._contacts_by_id[contact_id])
            contact = self._update(contact_id, json.loads(body or b"{}"), datetime.now(UTC))
            if contact != before:
                self._writes += 1
            return self._log(request, JSONResponse(dict(contact)))

    async def _changes(self, request: Request) -> Response:
        with self._lock:
            refused = self._admit(request)
            if refused is not None:
                return self._log(request, refused)
            since = request.query_params.get("updated_since", "")
            limit = min(int(request.query_params.get("limit", PAGE)), 500)
            after: tuple[str, int] | None = None
            if cursor := request.query_params.get("cursor"):
                stamp, last_id = json.loads(base64.urlsafe_b64decode(cursor))
                after = (stamp, int(last_id))
            since_value = (
                _stamp(datetime.fromisoformat(since.replace("Z", "+00:00"))) if since else ""
            )
            ordered = sorted(
                (c for c in self._contacts_by_id.values() if c["updated_at"] >= since_value),
                key=lambda c: (c["updated_at"], int(c["id"])),
            )
            if after is not None:
                ordered = [c for c in ordered if (c["updated_at"], int(c["id"])) > after]
            page = ordered[:limit]
            next_cursor = None
            if len(ordered) > limit:
                last = page[-1]
                next_cursor = base64.urlsafe_b64encode(
                    json.dumps([last["updated_at"], last["id"]]).encode()
                ).decode()
            return self._log(
                request,
                JSONResponse({"data": [dict(c) for c in page], "next_cursor": next_cursor}),
            )


def custom_crm_config(url: str, **sync: Any) -> dict[str, Any]:
    """An integration's config for the fake: endpoints as seed 003 describes them."""
    return {
        "base_url": f"{url}/v2",
        "auth": "header",
        "auth_header": "X-API-Key",
        "endpoints": {
            "search": "/contacts?email={email}",
            "create": "/contacts",
            "update": "/contacts/{id}",
            "changes": "/contacts/changes",
        },
        "sync": sync,
    }


def contacts_fields(extra: Iterable[tuple[str, str]] = ()) -> list[dict[str, str]]:
    pairs = [("email", "email"), ("first_name", "first_name"), ("last_name", "last_name"), *extra]
    return [{"source": source, "target": target} for source, target in pairs]


@asynccontextmanager
async def running_fake_custom_crm(api_key: str = DEFAULT_KEY) -> AsyncIterator[FakeCustomCrm]:
    sock, base_url = bind_local_socket()
    fake = FakeCustomCrm(base_url, api_key)
    async with serving_in_thread(
        fake, sock, name="fake-custom-crm", lifespan="off", graceful_shutdown=1
    ):
        yield fake
