"""A stateful fake of Pipedrive's persons API (v2) and `personFields` (v1).

`running_fake_pipedrive` serves it on a free port of 127.0.0.1, under uvicorn in a thread with
its own event loop (as `tests.fakes.stripe` does). `fake.url` stands for the company domain
(`https://{company}.pipedrive.com`), so paths start with `/api/...`:

    async with running_fake_pipedrive(api_token="abc") as fake:
        tier = fake.add_field("Tier")
        person_id = fake.add_person("Ada Lovelace", "ada@example.com", {tier: "gold"})
        ...point the Pipedrive connection at fake.url and run a sync...
        assert fake.writes() == 0

Endpoints, in the shapes of the real API:

- `GET /api/v2/persons` — cursor-paginated list; `updated_since` (inclusive, `>=`) and
  `updated_until` (exclusive, `<`) as documented, `sort_by` id|update_time|add_time (default
  id), `sort_direction` asc|desc, `limit` (default 100, at most 500), `cursor`.
- `GET /api/v2/persons/search` — `term`, `fields`, `exact_match`, `limit`, `cursor`.
- `POST /api/v2/persons`, `GET|PATCH /api/v2/persons/{id}`.
- `GET /v1/personFields` (also under `/api/v1/`) — standard and custom person fields.

Authentication: `x-api-token: <token>` header, `api_token=<token>` query parameter, or
`Authorization: Bearer <oauth token>` once `set_oauth_token` is called.

Checks apply in this order: latency, authentication (401), programmed failures (`fail_next`,
then `random_failures`), programmed rate limiting (`rate_limit_next`), the rate-limit window,
then the endpoint. Everything before the endpoint leaves the state untouched, so a retried
request is safe.

Where Pipedrive's documentation is silent the fake does what Pipedrive does in practice:
v2 creates answer 200 (not v1's 201); v2 errors carry a string `code`
(`ERR_SCHEMA_VALIDATION_FAILED`, `ERR_NOT_FOUND`) while 401/429/5xx keep the v1-style numeric
`errorCode`; update times have second precision; the rate-limit window is fixed (it starts at
the first request and `x-ratelimit-reset` counts the seconds until it ends).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import copy
import json
import math
import random
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from starlette.requests import Request
from starlette.responses import Response

from tests.support_server import bind_local_socket, serving_in_thread

DEFAULT_TOKEN = "0123456789abcdef0123456789abcdef01234567"
ERROR_INFO = "Please check developers.pipedrive.com for more information about Pipedrive API."
# The authorized user: owner of persons created without an `owner_id`.
AUTHORIZED_USER_ID = 1
DEFAULT_LIMIT = 100
MAX_LIMIT = 500
# Essential plan, api_token: what `rate_limit_next` reports when no window is set.
DEFAULT_RATE_LIMIT = 20
DEFAULT_WINDOW_SECONDS = 2.0
SEARCH_FIELDS = frozenset({"custom_fields", "email", "notes", "phone", "name"})
VISIBLE_TO_ENTIRE_COMPANY = 3
CREATE_KEYS = frozenset(
    {
        "name",
        "first_name",
        "last_name",
        "owner_id",
        "org_id",
        "add_time",
        "update_time",
        "emails",
        "phones",
        "visible_to",
        "label_ids",
        "marketing_status",
        "custom_fields",
    }
)
WRITE_METHODS = frozenset({"POST", "PATCH", "PUT"})

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# (key, name, field_type) of the standard person fields `personFields` lists.
STANDARD_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("name", "Name", "varchar"),
    ("first_name", "First name", "varchar"),
    ("last_name", "Last name", "varchar"),
    ("email", "Email", "varchar"),
    ("phone", "Phone", "phone"),
    ("owner_id", "Owner", "user"),
    ("org_id", "Organization", "org"),
    ("label_ids", "Labels", "set"),
    ("visible_to", "Visible to", "visible_to"),
    ("add_time", "Person created", "date"),
    ("update_time", "Update time", "date"),
)


# --------------------------------------------------------------------------- errors


class PipedriveError(Exception):
    """An error answer in Pipedrive's `{"success": false, ...}` shape."""

    def __init__(
        self,
        status: int,
        error: str,
        *,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"success": False, "error": self.error}
        if self.code is None:
            body["errorCode"] = self.status
        else:
            body["code"] = self.code
        body.update({"error_info": ERROR_INFO, "data": None, "additional_data": None})
        return body


def _invalid(message: str) -> PipedriveError:
    return PipedriveError(400, f"Validation failed: {message}", code="ERR_SCHEMA_VALIDATION_FAILED")


def _person_not_found() -> PipedriveError:
    return PipedriveError(404, "Person not found", code="ERR_NOT_FOUND")


_SERVER_ERRORS = {
    500: "Internal server error",
    502: "Bad gateway",
    503: "Service unavailable",
    504: "Gateway timeout",
}


# --------------------------------------------------------------------------- time


def format_time(moment: datetime) -> str:
    """Pipedrive v2's RFC 3339 form at second precision: `2024-05-01T12:00:00Z`."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value: str, param: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise _invalid(f"{param}: must be a valid RFC 3339 date-time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _bound_key(value: str, param: str) -> str:
    """The second-precision key equivalent to a bound: update times are whole seconds, so
    `t >= 12:00:00.5` is `t >= 12:00:01`, and `t < 12:00:00.5` is `t < 12:00:01`."""
    moment = _parse_time(value, param)
    if moment.microsecond:
        moment = moment.replace(microsecond=0) + timedelta(seconds=1)
    return format_time(moment)


# --------------------------------------------------------------------------- records


class PipedriveRequest(NamedTuple):
    """One request as it arrived and the status it was answered with."""

    method: str
    path: str
    query: dict[str, str]
    body: Any
    status: int


@dataclass
class _Logged:
    request: PipedriveRequest
    reached: bool
    wrote: bool


@dataclass
class _Window:
    """A fixed rate-limit window: `limit` requests from `started` for `seconds`."""

    limit: int
    seconds: float
    started: float = 0.0
    used: int = 0

    def roll(self, now: float) -> None:
        if now >= self.started + self.seconds:
            self.started = now
            self.used = 0

    def reset_in(self, now: float) -> int:
        return max(1, math.ceil(self.started + self.seconds - now))

    def headers(self, now: float) -> dict[str, str]:
        return {
            "x-ratelimit-limit": str(self.limit),
            "x-ratelimit-remaining": str(max(0, self.limit - self.used)),
            "x-ratelimit-reset": str(self.reset_in(now)),
        }


def _rate_limited(headers: Mapping[str, str]) -> PipedriveError:
    return PipedriveError(
        429,
        "Request over limit",
        headers={**headers, "retry-after": headers.get("x-ratelimit-reset", "2")},
    )


def _split_name(name: str) -> tuple[str, str]:
    first, _, last = name.strip().partition(" ")
    return first, last.strip()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _encode_cursor(payload: Mapping[str, Any]) -> str:
    raw = json.dumps(payload, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> dict[str, Any]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        decoded = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (ValueError, binascii.Error):
        raise _invalid("cursor: invalid cursor") from None
    if not isinstance(decoded, dict):
        raise _invalid("cursor: invalid cursor")
    return decoded


def _limit(query: Mapping[str, str]) -> int:
    raw = query.get("limit")
    if raw is None or raw == "":
        return DEFAULT_LIMIT
    try:
        limit = int(raw)
    except ValueError:
        raise _invalid("limit: must be an integer") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise _invalid(f"limit: must be between 1 and {MAX_LIMIT}")
    return limit


def _boolean(query: Mapping[str, str], name: str) -> bool:
    raw = query.get(name)
    if raw is None or raw == "":
        return False
    # v2 is strict: only true/false, no 1/0.
    if raw not in ("true", "false"):
        raise _invalid(f"{name}: must be a boolean (true or false)")
    return raw == "true"


# --------------------------------------------------------------------------- the fake


class FakePipedrive:
    """The fake's state, programming and what it has seen; safe to use from any thread."""

    def __init__(self, url: str, api_token: str = DEFAULT_TOKEN) -> None:
        self.url = url
        self.api_token = api_token
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forget every person, custom field, request and programming."""
        with self._lock:
            self._persons: dict[int, dict[str, Any]] = {}
            self._by_email: dict[str, list[int]] = {}
            # (update_time, id) of every person, sorted: the list endpoint pages through it.
            self._by_update: list[tuple[str, int]] = []
            self._next_person_id = 1
            self._fields: list[dict[str, Any]] = [
                _field_object(index + 1, key, name, field_type, custom=False)
                for index, (key, name, field_type) in enumerate(STANDARD_FIELDS)
            ]
            self._custom_fields: dict[str, dict[str, Any]] = {}
            self._log: list[_Logged] = []
            self._failures: deque[int] = deque()
            self._random_failure_rate = 0.0
            self._random_statuses: tuple[int, ...] = (500, 502, 503)
            self._random = random.Random(0)
            self._rate_limited_next = 0
            self._window: _Window | None = None
            self._search_window: _Window | None = None
            self._latency = 0.0
            self._oauth_token: str | None = None
            self._now: datetime | None = None

    # ------------------------------------------------------------------ programming

    def fail_next(self, n: int, status: int = 500) -> None:
        """Answer the next `n` authenticated requests with `status` and a server error body."""
        with self._lock:
            self._failures.extend(status for _ in range(n))

    def rate_limit_next(self, n: int) -> None:
        """Answer the next `n` authenticated requests with 429 "Request over limit"."""
        with self._lock:
            self._rate_limited_next += n

    def set_rate_limit(
        self,
        max_requests: int | None,
        window_seconds: float = DEFAULT_WINDOW_SECONDS,
        *,
        search_max_requests: int | None = None,
    ) -> None:
        """Accept at most `max_requests` per fixed window of `window_seconds` (None: no limit),
        and, if given, at most `search_max_requests` search requests per window (Pipedrive's
        Search API has its own, lower limit: 10 per 2 seconds). Refused requests don't count.
        """
        with self._lock:
            self._window = None if max_requests is None else _Window(max_requests, window_seconds)
            self._search_window = (
                None
                if search_max_requests is None
                else _Window(search_max_requests, window_seconds)
            )

    def random_failures(
        self, rate: float, seed: int = 0, statuses: Iterable[int] = (500, 502, 503)
    ) -> None:
        """Fail each authenticated request with probability `rate` (0 turns it off), with a
        status drawn from `statuses`, reproducibly for a given `seed`."""
        with self._lock:
            self._random_failure_rate = rate
            self._random_statuses = tuple(statuses)
            self._random = random.Random(seed)

    def set_latency(self, seconds: float) -> None:
        """Wait `seconds` before handling each request."""
        with self._lock:
            self._latency = seconds

    def set_oauth_token(self, token: str | None) -> None:
        """Also accept `Authorization: Bearer <token>` (None: stop accepting it)."""
        with self._lock:
            self._oauth_token = token

    def set_now(self, moment: datetime | None) -> None:
        """Stamp writes with `moment` instead of the wall clock (None: the wall clock)."""
        with self._lock:
            self._now = moment

    # ------------------------------------------------------------------ state

    def add_field(self, name: str, field_type: str = "varchar") -> str:
        """Create a custom person field; returns its 40-hex-digit key."""
        key = secrets.token_hex(20)
        with self._lock:
            field = _field_object(len(self._fields) + 1, key, name, field_type, custom=True)
            field["add_time"] = field["update_time"] = self._stamp().replace("T", " ")[:-1]
            self._fields.append(field)
            self._custom_fields[key] = field
        return key

    @property
    def fields(self) -> list[dict[str, Any]]:
        """Every person field, standard then custom, as `personFields` lists them (a copy)."""
        with self._lock:
            return copy.deepcopy(self._fields)

    def add_person(
        self,
        name: str,
        email: str | None,
        fields: Mapping[str, Any] | None = None,
        update_time: datetime | None = None,
        *,
        phone: str | None = None,
        owner_id: int = AUTHORIZED_USER_ID,
        org_id: int | None = None,
    ) -> int:
        """Make a person exist, as if created in Pipedrive; returns its id.

        `fields` holds custom field values by key or by field name.
        """
        with self._lock:
            custom = self._custom_values(fields or {})
            stamp = format_time(update_time) if update_time is not None else self._stamp()
            body: dict[str, Any] = {
                "name": name,
                "owner_id": owner_id,
                "org_id": org_id,
                "emails": [] if email is None else [{"value": email}],
                "phones": [] if phone is None else [{"value": phone}],
                "custom_fields": custom,
            }
            person = self._build_person(body, stamp)
            self._store_new(person)
            return int(person["id"])

    def update_person(
        self, person_id: int, changes: Mapping[str, Any], update_time: datetime | None = None
    ) -> dict[str, Any]:
        """Apply a user's edit made in Pipedrive; returns the person.

        `changes` is in the API's shape (`name`, `emails`, `custom_fields`, ...); `email` (a
        string) replaces the emails, and `custom_fields` may name fields instead of keys.
        The update time becomes `update_time` if given, else now if anything changed.
        """
        with self._lock:
            person = self._persons[person_id]
            normalized = dict(changes)
            if "email" in normalized:
                email = normalized.pop("email")
                normalized["emails"] = [] if email is None else [{"value": email}]
            if "custom_fields" in normalized:
                normalized["custom_fields"] = self._custom_values(normalized["custom_fields"])
            stamp = format_time(update_time) if update_time is not None else None
            self._apply_changes(person, normalized, stamp, force_stamp=stamp is not None)
            return copy.deepcopy(person)

    @property
    def persons(self) -> dict[int, dict[str, Any]]:
        """Every person by id (a copy)."""
        with self._lock:
            return copy.deepcopy(self._persons)

    def person(self, person_id: int) -> dict[str, Any] | None:
        """One person (a copy), or None."""
        with self._lock:
            found = self._persons.get(person_id)
            return None if found is None else copy.deepcopy(found)

    def person_by_email(self, email: str) -> dict[str, Any] | None:
        """The oldest person having `email` (any case) among their emails, or None."""
        with self._lock:
            ids = self._by_email.get(email.strip().lower())
            return copy.deepcopy(self._persons[ids[0]]) if ids else None

    # ------------------------------------------------------------------ inspection

    @property
    def requests(self) -> list[PipedriveRequest]:
        """Every request so far, in arrival order, whatever it was answered."""
        with self._lock:
            return [logged.request for logged in self._log]

    def count(self, method: str | None = None, path_prefix: str = "") -> int:
        """Requests that reached an endpoint (not refused with 401, 429 or an injected
        failure) with `method` (any if None) to a path starting with `path_prefix`."""
        with self._lock:
            return sum(
                1
                for logged in self._log
                if logged.reached and _matches(logged.request, method, path_prefix)
            )

    def count_all(self, method: str | None = None, path_prefix: str = "") -> int:
        """Every request received with `method` to a path starting with `path_prefix`."""
        with self._lock:
            return sum(1 for logged in self._log if _matches(logged.request, method, path_prefix))

    def writes(self) -> int:
        """Successful requests that created a person or changed one."""
        with self._lock:
            return sum(1 for logged in self._log if logged.wrote)

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        method = request.method
        path = request.url.path
        query = dict(request.query_params)
        raw_body = await request.body()
        body: Any = None
        body_error: PipedriveError | None = None
        if raw_body:
            try:
                body = json.loads(raw_body)
            except ValueError:
                body_error = PipedriveError(400, "Invalid JSON body", code="ERR_INVALID_JSON")
        headers = {name.lower(): value for name, value in request.headers.items()}
        with self._lock:
            latency = self._latency
        if latency > 0:
            await asyncio.sleep(latency)
        reached = wrote = False
        extra_headers: dict[str, str] = {}
        try:
            extra_headers = self._admit(headers, query, path)
            reached = True
            if body_error is not None:
                raise body_error
            status, payload, wrote = self._route(method, path, query, body)
        except PipedriveError as error:
            status, payload = error.status, error.body()
            extra_headers = {**extra_headers, **error.headers}
        with self._lock:
            self._log.append(
                _Logged(PipedriveRequest(method, path, query, body, status), reached, wrote)
            )
        response = Response(
            content=json.dumps(payload).encode(),
            status_code=status,
            media_type="application/json",
            headers=extra_headers,
        )
        await response(scope, receive, send)

    def _admit(
        self, headers: Mapping[str, str], query: Mapping[str, str], path: str
    ) -> dict[str, str]:
        """Raise the error for a request that must not reach an endpoint; else return the
        rate-limit headers to send with the answer."""
        with self._lock:
            if not self._authenticated(headers, query):
                raise PipedriveError(401, "unauthorized access")
            if self._failures:
                raise _server_error(self._failures.popleft())
            if (
                self._random_failure_rate > 0
                and self._random_statuses
                and self._random.random() < self._random_failure_rate
            ):
                raise _server_error(self._random.choice(self._random_statuses))
            now = time.monotonic()
            if self._rate_limited_next > 0:
                self._rate_limited_next -= 1
                window = self._window or _Window(DEFAULT_RATE_LIMIT, DEFAULT_WINDOW_SECONDS, now)
                window.roll(now)
                headers_now = window.headers(now)
                headers_now["x-ratelimit-remaining"] = "0"
                raise _rate_limited(headers_now)
            windows = [self._window]
            if path.endswith("/search"):
                windows.append(self._search_window)
            active = [window for window in windows if window is not None]
            for window in active:
                window.roll(now)
                if window.used >= window.limit:
                    raise _rate_limited(window.headers(now))
            for window in active:
                window.used += 1
            return active[0].headers(now) if active else {}

    def _authenticated(self, headers: Mapping[str, str], query: Mapping[str, str]) -> bool:
        if headers.get("x-api-token") == self.api_token:
            return True
        if query.get("api_token") == self.api_token:
            return True
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        return (
            self._oauth_token is not None
            and scheme.lower() == "bearer"
            and credentials.strip() == self._oauth_token
        )

    def _route(
        self, method: str, path: str, query: dict[str, str], body: Any
    ) -> tuple[int, dict[str, Any], bool]:
        """(status, payload, whether it wrote) for a request that reached the endpoints."""
        parts = path.strip("/").split("/")
        match method, parts:
            case "GET", ["api", "v2", "persons"]:
                return 200, self._list_persons(query), False
            case "GET", ["api", "v2", "persons", "search"]:
                return 200, self._search_persons(query), False
            case "POST", ["api", "v2", "persons"]:
                return 200, {"success": True, "data": self._create_person(body)}, True
            case "GET", ["api", "v2", "persons", person_id]:
                return 200, {"success": True, "data": self._get_person(person_id)}, False
            case "PATCH", ["api", "v2", "persons", person_id]:
                person, changed = self._patch_person(person_id, body)
                return 200, {"success": True, "data": person}, changed
            case "GET", ["v1", "personFields"] | ["api", "v1", "personFields"]:
                return 200, self._list_fields(query), False
        raise PipedriveError(404, "Unknown method .", code="ERR_NOT_FOUND")

    # ------------------------------------------------------------------ endpoints

    def _list_persons(self, query: Mapping[str, str]) -> dict[str, Any]:
        limit = _limit(query)
        sort_by = query.get("sort_by") or "id"
        if sort_by not in ("id", "update_time", "add_time"):
            raise _invalid("sort_by: must be one of id, update_time, add_time")
        direction = query.get("sort_direction") or "asc"
        if direction not in ("asc", "desc"):
            raise _invalid("sort_direction: must be one of asc, desc")
        since = query.get("updated_since")
        until = query.get("updated_until")
        since_key = _bound_key(since, "updated_since") if since else None
        until_key = _bound_key(until, "updated_until") if until else None
        cursor_key: tuple[Any, int] | None = None
        if query.get("cursor"):
            decoded = _decode_cursor(query["cursor"])
            if decoded.get("sort_by") != sort_by or decoded.get("direction") != direction:
                raise _invalid("cursor: does not match sort_by and sort_direction")
            cursor_id = decoded.get("id")
            if not isinstance(cursor_id, int):
                raise _invalid("cursor: invalid cursor")
            cursor_key = (decoded.get("key"), cursor_id)
        with self._lock:
            if sort_by == "update_time":
                # Bounds are on update_time itself: bisect the maintained index.
                keys: list[tuple[Any, int]] = self._by_update
                low = 0 if since_key is None else bisect.bisect_left(keys, (since_key, 0))
                high = len(keys) if until_key is None else bisect.bisect_left(keys, (until_key, 0))
            else:
                keys = sorted(
                    (person["id"] if sort_by == "id" else person["add_time"], person["id"])
                    for person in self._persons.values()
                    if (since_key is None or person["update_time"] >= since_key)
                    and (until_key is None or person["update_time"] < until_key)
                )
                low, high = 0, len(keys)
            try:
                page_keys, next_key = _page(keys, low, high, cursor_key, limit, direction)
            except TypeError:
                raise _invalid("cursor: invalid cursor") from None
            data = [copy.deepcopy(self._persons[person_id]) for _, person_id in page_keys]
        next_cursor = (
            None
            if next_key is None
            else _encode_cursor(
                {
                    "sort_by": sort_by,
                    "direction": direction,
                    "key": next_key[0],
                    "id": next_key[1],
                }
            )
        )
        return {"success": True, "data": data, "additional_data": {"next_cursor": next_cursor}}

    def _search_persons(self, query: Mapping[str, str]) -> dict[str, Any]:
        term = query.get("term", "")
        exact = _boolean(query, "exact_match")
        if len(term.strip()) < (1 if exact else 2):
            raise _invalid(
                "term: must contain at least 1 character with exact_match, 2 without"
                if exact
                else "term: must contain at least 2 characters"
            )
        fields = (
            {name.strip() for name in query["fields"].split(",") if name.strip()}
            if query.get("fields")
            else set(SEARCH_FIELDS)
        )
        unknown = fields - SEARCH_FIELDS
        if unknown:
            raise _invalid(
                f"fields: unknown {', '.join(sorted(unknown))}; allowed are "
                f"{', '.join(sorted(SEARCH_FIELDS))}"
            )
        limit = _limit(query)
        offset = 0
        if query.get("cursor"):
            offset = _decode_cursor(query["cursor"]).get("offset", 0)
            if not _is_int(offset) or offset < 0:
                raise _invalid("cursor: invalid cursor")
        needle = term.strip().lower()
        with self._lock:
            if fields == {"email"} and exact:
                # The lookup integrations make per record: answered from the index.
                matching = sorted(self._by_email.get(needle, []))
            else:
                matching = [
                    person_id
                    for person_id, person in self._persons.items()
                    if _search_matches(person, needle, fields, exact)
                ]
            page = matching[offset : offset + limit]
            items = [
                {
                    "result_score": 1.0 if exact else 0.5,
                    "item": _search_item(self._persons[person_id]),
                }
                for person_id in page
            ]
        more = offset + limit < len(matching)
        return {
            "success": True,
            "data": {"items": items},
            "additional_data": {
                "next_cursor": _encode_cursor({"offset": offset + limit}) if more else None
            },
        }

    def _create_person(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise _invalid("body: must be a JSON object")
        unknown = set(body) - CREATE_KEYS
        if unknown:
            raise _invalid(f"{sorted(unknown)[0]}: is not allowed")
        if not isinstance(body.get("name"), str) or not body["name"].strip():
            raise _invalid("name: is required")
        _check_person_body(body)
        with self._lock:
            self._check_custom_keys(body.get("custom_fields") or {})
            stamp = self._stamp()
            if isinstance(body.get("update_time"), str):
                stamp = format_time(_parse_time(body["update_time"], "update_time"))
            person = self._build_person(body, stamp)
            if isinstance(body.get("add_time"), str):
                person["add_time"] = format_time(_parse_time(body["add_time"], "add_time"))
            self._store_new(person)
            return copy.deepcopy(person)

    def _get_person(self, raw_id: str) -> dict[str, Any]:
        person_id = _path_id(raw_id)
        with self._lock:
            person = self._persons.get(person_id)
            if person is None:
                raise _person_not_found()
            return copy.deepcopy(person)

    def _patch_person(self, raw_id: str, body: Any) -> tuple[dict[str, Any], bool]:
        person_id = _path_id(raw_id)
        if not isinstance(body, dict):
            raise _invalid("body: must be a JSON object")
        unknown = set(body) - CREATE_KEYS
        if unknown:
            raise _invalid(f"{sorted(unknown)[0]}: is not allowed")
        if "name" in body and (not isinstance(body["name"], str) or not body["name"].strip()):
            raise _invalid("name: must be a non-empty string")
        _check_person_body(body)
        with self._lock:
            person = self._persons.get(person_id)
            if person is None:
                raise _person_not_found()
            self._check_custom_keys(body.get("custom_fields") or {})
            changes = {
                key: value for key, value in body.items() if key not in ("add_time", "update_time")
            }
            changed = self._apply_changes(person, changes, None, force_stamp=False)
            return copy.deepcopy(person), changed

    def _list_fields(self, query: Mapping[str, str]) -> dict[str, Any]:
        try:
            start = int(query.get("start") or 0)
        except ValueError:
            raise PipedriveError(400, "start must be an integer") from None
        limit = _limit(query)
        with self._lock:
            page = copy.deepcopy(self._fields[start : start + limit])
            more = start + limit < len(self._fields)
        pagination: dict[str, Any] = {
            "start": start,
            "limit": limit,
            "more_items_in_collection": more,
        }
        if more:
            pagination["next_start"] = start + limit
        return {"success": True, "data": page, "additional_data": {"pagination": pagination}}

    # ------------------------------------------------------------------ helpers (lock held)

    def _stamp(self) -> str:
        return format_time(self._now or datetime.now(UTC))

    def _custom_values(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        by_name = {field["name"]: key for key, field in self._custom_fields.items()}
        values: dict[str, Any] = {}
        for name, value in fields.items():
            key = name if name in self._custom_fields else by_name.get(name)
            if key is None:
                raise KeyError(f"no custom person field {name!r}: add it with add_field")
            values[key] = value
        return values

    def _check_custom_keys(self, custom: Mapping[str, Any]) -> None:
        for key, value in custom.items():
            field = self._custom_fields.get(key)
            if field is None:
                raise _invalid(f"custom_fields.{key}: custom field does not exist")
            if value is None:
                continue
            field_type = field["field_type"]
            if field_type in ("double", "monetary", "int") and not (
                isinstance(value, int | float) and not isinstance(value, bool)
            ):
                raise _invalid(f"custom_fields.{key}: must be a number")
            if field_type in ("varchar", "varchar_auto", "text", "phone") and not isinstance(
                value, str
            ):
                raise _invalid(f"custom_fields.{key}: must be a string")

    def _build_person(self, body: Mapping[str, Any], stamp: str) -> dict[str, Any]:
        name = str(body["name"]).strip()
        first, last = _split_name(name)
        person_id = self._next_person_id
        self._next_person_id += 1
        return {
            "id": person_id,
            "name": name,
            "first_name": body.get("first_name", first),
            "last_name": body.get("last_name", last),
            "owner_id": body.get("owner_id", AUTHORIZED_USER_ID),
            "org_id": body.get("org_id"),
            "add_time": stamp,
            "update_time": stamp,
            "is_deleted": False,
            "emails": _contact_list(body.get("emails") or [], "work"),
            "phones": _contact_list(body.get("phones") or [], "work"),
            "label_ids": list(body.get("label_ids") or []),
            "visible_to": body.get("visible_to", VISIBLE_TO_ENTIRE_COMPANY),
            "picture_id": None,
            "custom_fields": {
                **{key: None for key in self._custom_fields},
                **dict(body.get("custom_fields") or {}),
            },
        }

    def _store_new(self, person: dict[str, Any]) -> None:
        self._persons[person["id"]] = person
        self._index_emails(person, add=True)
        bisect.insort(self._by_update, (person["update_time"], person["id"]))

    def _index_emails(self, person: Mapping[str, Any], *, add: bool) -> None:
        for email in {entry["value"].strip().lower() for entry in person["emails"]}:
            ids = self._by_email.setdefault(email, [])
            if add:
                bisect.insort(ids, person["id"])
            else:
                ids.remove(person["id"])
                if not ids:
                    del self._by_email[email]

    def _apply_changes(
        self,
        person: dict[str, Any],
        changes: Mapping[str, Any],
        stamp: str | None,
        *,
        force_stamp: bool,
    ) -> bool:
        """Apply API-shaped `changes`; True if a value changed. The update time moves only
        then (or always, to `stamp`, with `force_stamp`)."""
        updated = copy.deepcopy(person)
        for key, value in changes.items():
            if key == "custom_fields":
                updated["custom_fields"].update(value or {})
            elif key in ("emails", "phones"):
                updated[key] = _contact_list(value or [], "work")
            elif key == "label_ids":
                updated[key] = list(value or [])
            else:
                updated[key] = value
        if "name" in changes:
            updated["name"] = str(changes["name"]).strip()
            first, last = _split_name(updated["name"])
            updated["first_name"] = changes.get("first_name", first)
            updated["last_name"] = changes.get("last_name", last)
        changed = updated != person
        if not changed and not force_stamp:
            return False
        new_stamp = stamp or self._stamp()
        self._index_emails(person, add=False)
        old_key = (person["update_time"], person["id"])
        del self._by_update[bisect.bisect_left(self._by_update, old_key)]
        person.clear()
        person.update(updated)
        person["update_time"] = new_stamp
        self._index_emails(person, add=True)
        bisect.insort(self._by_update, (new_stamp, person["id"]))
        return changed


# --------------------------------------------------------------------------- module helpers


def _matches(request: PipedriveRequest, method: str | None, path_prefix: str) -> bool:
    return (method is None or request.method == method.upper()) and request.path.startswith(
        path_prefix
    )


def _server_error(status: int) -> PipedriveError:
    return PipedriveError(status, _SERVER_ERRORS.get(status, "Internal server error"))


def _path_id(raw_id: str) -> int:
    try:
        return int(raw_id)
    except ValueError:
        raise _invalid("id: must be an integer") from None


def _page(
    keys: list[tuple[Any, int]],
    low: int,
    high: int,
    cursor: tuple[Any, int] | None,
    limit: int,
    direction: str,
) -> tuple[list[tuple[Any, int]], tuple[Any, int] | None]:
    """One page of `keys[low:high]` (sorted ascending) from the `cursor` key (the first item
    of the page, inclusive), and the key of the next page's first item. Keys are
    (sort value, id), unique, so items sharing a sort value are neither skipped nor repeated
    across a page boundary."""
    if direction == "asc":
        if cursor is not None:
            low = max(low, bisect.bisect_left(keys, cursor))
        end = min(high, low + limit)
        return keys[low:end], keys[end] if end < high else None
    if cursor is not None:
        high = min(high, bisect.bisect_right(keys, cursor))
    start = max(low, high - limit)
    return list(reversed(keys[start:high])), keys[start - 1] if start > low else None


def _contact_list(entries: Any, default_label: str) -> list[dict[str, Any]]:
    result = [
        {
            "value": entry["value"],
            "primary": bool(entry.get("primary", False)),
            "label": entry.get("label") or default_label,
        }
        for entry in entries
    ]
    if result and not any(entry["primary"] for entry in result):
        result[0]["primary"] = True
    return result


def _check_person_body(body: Mapping[str, Any]) -> None:
    for key in ("first_name", "last_name", "marketing_status"):
        if key in body and body[key] is not None and not isinstance(body[key], str):
            raise _invalid(f"{key}: must be a string")
    for key in ("owner_id", "visible_to"):
        if key in body and not _is_int(body[key]):
            raise _invalid(f"{key}: must be an integer")
    if "org_id" in body and body["org_id"] is not None and not _is_int(body["org_id"]):
        raise _invalid("org_id: must be an integer")
    for key in ("emails", "phones"):
        entries = body.get(key)
        if entries is None:
            continue
        if not isinstance(entries, list):
            raise _invalid(f"{key}: must be an array")
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("value"), str):
                raise _invalid(f"{key}[{index}].value: is required")
            if "primary" in entry and not isinstance(entry["primary"], bool):
                raise _invalid(f"{key}[{index}].primary: must be a boolean")
            if "label" in entry and not isinstance(entry["label"], str):
                raise _invalid(f"{key}[{index}].label: must be a string")
    if "label_ids" in body and not (
        isinstance(body["label_ids"], list) and all(_is_int(i) for i in body["label_ids"])
    ):
        raise _invalid("label_ids: must be an array of integers")
    if "custom_fields" in body and not isinstance(body["custom_fields"], dict | None):
        raise _invalid("custom_fields: must be an object")


def _search_matches(person: Mapping[str, Any], needle: str, fields: set[str], exact: bool) -> bool:
    candidates: list[str] = []
    if "name" in fields:
        candidates.append(person["name"])
    if "email" in fields:
        candidates.extend(entry["value"] for entry in person["emails"])
    if "phone" in fields:
        candidates.extend(entry["value"] for entry in person["phones"])
    if "custom_fields" in fields:
        candidates.extend(
            str(value) for value in person["custom_fields"].values() if value is not None
        )
    lowered = (candidate.lower() for candidate in candidates)
    return any(c == needle for c in lowered) if exact else any(needle in c for c in lowered)


def _search_item(person: Mapping[str, Any]) -> dict[str, Any]:
    org_id = person["org_id"]
    return {
        "id": person["id"],
        "type": "person",
        "name": person["name"],
        "phones": [entry["value"] for entry in person["phones"]],
        "emails": [entry["value"] for entry in person["emails"]],
        "visible_to": person["visible_to"],
        "owner": {"id": person["owner_id"]},
        "organization": None if org_id is None else {"id": org_id, "name": None, "address": None},
        "custom_fields": [],
        "notes": [],
        "update_time": person["update_time"],
    }


def _field_object(
    field_id: int, key: str, name: str, field_type: str, *, custom: bool
) -> dict[str, Any]:
    return {
        "id": field_id,
        "key": key,
        "name": name,
        "order_nr": field_id,
        "field_type": field_type,
        "add_time": "2024-01-01 00:00:00",
        "update_time": "2024-01-01 00:00:00",
        "last_updated_by_user_id": AUTHORIZED_USER_ID if custom else None,
        "created_by_user_id": AUTHORIZED_USER_ID if custom else None,
        "active_flag": True,
        "edit_flag": custom,
        "index_visible_flag": True,
        "details_visible_flag": True,
        "add_visible_flag": True,
        "important_flag": False,
        "bulk_edit_allowed": True,
        "searchable_flag": custom and field_type in ("varchar", "text", "double", "phone"),
        "filtering_allowed": True,
        "sortable_flag": True,
        "mandatory_flag": key == "name",
    }


@asynccontextmanager
async def running_fake_pipedrive(api_token: str = DEFAULT_TOKEN) -> AsyncIterator[FakePipedrive]:
    """Serve a fresh `FakePipedrive` accepting `api_token` on 127.0.0.1 until the block ends."""
    sock, base_url = bind_local_socket()
    fake = FakePipedrive(base_url, api_token)
    async with serving_in_thread(
        fake, sock, name="fake-pipedrive", lifespan="off", graceful_shutdown=1
    ):
        yield fake
