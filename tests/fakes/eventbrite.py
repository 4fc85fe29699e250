"""A stateful fake of Eventbrite's API v3 (events, orders, attendees), and the webhook
notifications Eventbrite sends.

`running_fake_eventbrite` serves it on a free port of 127.0.0.1, under uvicorn in a thread
with its own event loop (as `tests.fakes.stripe` does). `fake.url` stands for
`https://www.eventbriteapi.com`, so paths start with `/v3/`:

    async with running_fake_eventbrite(token="PRIVATETOKEN123") as fake:
        event_id = fake.add_event("Annual conference")
        order = fake.place_order(event_id, "ana@example.com", tickets=2)
        attendee = fake.check_in(order["attendees"][0]["id"])
        body = fake.notification("attendee.checked_in", fake.attendee_url(attendee))
        ...post body to the integration's inbound endpoint...

Endpoints, in the shapes of the real API:

- `GET /v3/users/me/` — the token's user.
- `GET /v3/events/{event_id}/attendees/` — `{"pagination": {...}, "attendees": [...]}`,
  `page_size` attendees a page (Eventbrite's 50 unless set), oldest first, paged with the
  `continuation` token of the previous page's pagination object (`page_number`,
  `page_size`, `page_count`, `object_count`, `has_more_items`, and `continuation` while
  there are more); an unknown token is a 400 `INVALID_CONTINUATION_TOKEN`.
- `GET /v3/events/{event_id}/attendees/{attendee_id}/` — one attendee.
- `GET /v3/orders/{order_id}/` — an order; `?expand=attendees` adds its attendees.

Authentication: `Authorization: Bearer <token>` or `?token=<token>`; anything else is a
401 `INVALID_AUTH`. Errors have Eventbrite's shape: `{"status_code", "error",
"error_description"}`. `rate_limit_next(n)` answers the next n requests with 429
`HIT_RATE_LIMIT`. Every request is kept in `requests` (method, path, query).

A notification is what Eventbrite posts to a webhook's endpoint: the action and the API URL
of the object it concerns, never the object itself.
"""

from __future__ import annotations

import itertools
import secrets
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, NamedTuple

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.support_server import bind_local_socket, serving_in_thread

DEFAULT_TOKEN = "EVENTBRITEPRIVATETOKEN0001"
DEFAULT_PAGE_SIZE = 50
USER_ID = "1000000001"


class Call(NamedTuple):
    method: str
    path: str
    query: dict[str, str]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _error(status: int, error: str, description: str) -> JSONResponse:
    body = {"status_code": status, "error": error, "error_description": description}
    return JSONResponse(body, status_code=status)


class FakeEventbrite:
    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token
        self.page_size = DEFAULT_PAGE_SIZE
        self.events: dict[str, dict[str, Any]] = {}
        self.orders: dict[str, dict[str, Any]] = {}
        self.attendees: dict[str, dict[str, Any]] = {}
        self.requests: list[Call] = []
        self._continuations: dict[str, tuple[str, int]] = {}
        self._rate_limited = 0
        self._ids = itertools.count(700_000_001)
        self._lock = threading.Lock()

    # ------------------------------------------------------------ the account's data

    def _id(self) -> str:
        return str(next(self._ids))

    def add_event(self, name: str = "Event") -> str:
        with self._lock:
            event_id = self._id()
            self.events[event_id] = {
                "id": event_id,
                "name": {"text": name, "html": name},
                "status": "live",
                "created": _now(),
                "changed": _now(),
                "resource_uri": f"{self.url}/v3/events/{event_id}/",
            }
            return event_id

    def place_order(
        self,
        event_id: str,
        email: str,
        *,
        first_name: str = "Ana",
        last_name: str = "Silva",
        tickets: int = 1,
    ) -> dict[str, Any]:
        """An order of `tickets` tickets by one buyer: one attendee per ticket, all with
        the buyer's profile (as when attendee details are not collected per ticket)."""
        with self._lock:
            assert event_id in self.events, f"no event {event_id}"
            order_id = self._id()
            now = _now()
            profile = {
                "first_name": first_name,
                "last_name": last_name,
                "name": f"{first_name} {last_name}",
                "email": email,
            }
            attendee_ids = []
            for _ in range(tickets):
                attendee_id = self._id()
                self.attendees[attendee_id] = {
                    "id": attendee_id,
                    "event_id": event_id,
                    "order_id": order_id,
                    "created": now,
                    "changed": now,
                    "ticket_class_name": "General Admission",
                    "profile": dict(profile),
                    "barcodes": [
                        {
                            "barcode": secrets.token_hex(8),
                            "status": "unused",
                            "created": now,
                            "changed": now,
                        }
                    ],
                    "checked_in": False,
                    "cancelled": False,
                    "refunded": False,
                    "status": "Attending",
                    "resource_uri": f"{self.url}/v3/events/{event_id}/attendees/{attendee_id}/",
                }
                attendee_ids.append(attendee_id)
            self.orders[order_id] = {
                "id": order_id,
                "event_id": event_id,
                "created": now,
                "changed": now,
                "name": profile["name"],
                "first_name": first_name,
                "last_name": last_name,
                "email": email,
                "status": "placed",
                "resource_uri": f"{self.url}/v3/orders/{order_id}/",
                "_attendees": attendee_ids,
            }
            return self._order(order_id, expand=True)

    def check_in(self, attendee_id: str) -> dict[str, Any]:
        """Scan the attendee's barcode at the door."""
        with self._lock:
            attendee = self.attendees[attendee_id]
            now = _now()
            attendee.update(checked_in=True, status="Checked In", changed=now)
            for barcode in attendee["barcodes"]:
                barcode.update(status="used", changed=now)
            return dict(attendee)

    def cancel(self, attendee_id: str) -> dict[str, Any]:
        with self._lock:
            attendee = self.attendees[attendee_id]
            attendee.update(cancelled=True, status="Not Attending", changed=_now())
            return dict(attendee)

    def rate_limit_next(self, count: int = 1) -> None:
        self._rate_limited = count

    def count(self, path_prefix: str) -> int:
        return sum(1 for call in self.requests if call.path.startswith(path_prefix))

    # ------------------------------------------------------------ notifications

    def order_url(self, order_id: str) -> str:
        return f"{self.url}/v3/orders/{order_id}/"

    def attendee_url(self, attendee: dict[str, Any]) -> str:
        return f"{self.url}/v3/events/{attendee['event_id']}/attendees/{attendee['id']}/"

    def notification(self, action: str, api_url: str, *, webhook_id: str = "9000001") -> dict:
        """The body Eventbrite posts to a webhook's endpoint."""
        return {
            "config": {
                "action": action,
                "user_id": USER_ID,
                "endpoint_url": "https://memberhub.example/api/v1/inbound/int_x",
                "webhook_id": webhook_id,
            },
            "api_url": api_url,
        }

    # ------------------------------------------------------------ the API

    def _order(self, order_id: str, *, expand: bool) -> dict[str, Any]:
        order = {k: v for k, v in self.orders[order_id].items() if not k.startswith("_")}
        if expand:
            order["attendees"] = [
                dict(self.attendees[a]) for a in self.orders[order_id]["_attendees"]
            ]
        return order

    def _check(self, request: Request) -> JSONResponse | None:
        self.requests.append(Call(request.method, request.url.path, dict(request.query_params)))
        header = request.headers.get("authorization", "")
        token = header.removeprefix("Bearer ") if header.startswith("Bearer ") else None
        token = token or request.query_params.get("token")
        if token != self.token:
            return _error(401, "INVALID_AUTH", "The OAuth token you provided was invalid.")
        if self._rate_limited > 0:
            self._rate_limited -= 1
            return _error(
                429, "HIT_RATE_LIMIT", "Hourly rate limit has been reached for this token."
            )
        return None

    async def me(self, request: Request) -> JSONResponse:
        refused = self._check(request)
        if refused is not None:
            return refused
        return JSONResponse(
            {"id": USER_ID, "name": "Events Team", "emails": [{"email": "events@example.com"}]}
        )

    async def list_attendees(self, request: Request) -> JSONResponse:
        refused = self._check(request)
        if refused is not None:
            return refused
        event_id = request.path_params["event_id"]
        with self._lock:
            if event_id not in self.events:
                return _error(404, "NOT_FOUND", "The event you requested does not exist.")
            attendees = sorted(
                (a for a in self.attendees.values() if a["event_id"] == event_id),
                key=lambda a: int(a["id"]),
            )
            offset = 0
            token = request.query_params.get("continuation")
            if token:
                found = self._continuations.get(token)
                if found is None or found[0] != event_id:
                    return _error(
                        400, "INVALID_CONTINUATION_TOKEN", "The continuation token is invalid."
                    )
                offset = found[1]
            page = attendees[offset : offset + self.page_size]
            more = offset + self.page_size < len(attendees)
            pagination: dict[str, Any] = {
                "object_count": len(attendees),
                "page_number": offset // self.page_size + 1,
                "page_size": self.page_size,
                "page_count": max(1, -(-len(attendees) // self.page_size)),
                "has_more_items": more,
            }
            if more:
                next_token = secrets.token_urlsafe(24)
                self._continuations[next_token] = (event_id, offset + self.page_size)
                pagination["continuation"] = next_token
            return JSONResponse({"pagination": pagination, "attendees": [dict(a) for a in page]})

    async def get_attendee(self, request: Request) -> JSONResponse:
        refused = self._check(request)
        if refused is not None:
            return refused
        with self._lock:
            attendee = self.attendees.get(request.path_params["attendee_id"])
            if attendee is None or attendee["event_id"] != request.path_params["event_id"]:
                return _error(404, "NOT_FOUND", "The attendee you requested does not exist.")
            return JSONResponse(dict(attendee))

    async def get_order(self, request: Request) -> JSONResponse:
        refused = self._check(request)
        if refused is not None:
            return refused
        order_id = request.path_params["order_id"]
        with self._lock:
            if order_id not in self.orders:
                return _error(404, "NOT_FOUND", "The order you requested does not exist.")
            expand = "attendees" in request.query_params.get("expand", "").split(",")
            return JSONResponse(self._order(order_id, expand=expand))

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v3/users/me/", self.me),
                Route("/v3/events/{event_id}/attendees/", self.list_attendees),
                Route("/v3/events/{event_id}/attendees/{attendee_id}/", self.get_attendee),
                Route("/v3/orders/{order_id}/", self.get_order),
            ]
        )


@asynccontextmanager
async def running_fake_eventbrite(token: str = DEFAULT_TOKEN) -> AsyncIterator[FakeEventbrite]:
    sock, url = bind_local_socket()
    fake = FakeEventbrite(url, token)
    async with serving_in_thread(fake.app(), sock, name="fake-eventbrite", lifespan="off"):
        yield fake
