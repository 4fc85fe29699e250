"""A stateful fake of Mailchimp's Marketing API 3.0, for the Mailchimp provider and the
audience sync.

`running_fake_mailchimp` serves it on a free port of 127.0.0.1 (uvicorn in a thread, as
the other fakes). The real API lives at `https://<dc>.api.mailchimp.com/3.0`, the data
centre being the API key's suffix (`…-us21`); in tests the integration's `base_url` is
`fake.url` (which ends in `/3.0`).

    async with running_fake_mailchimp() as fake:
        list_id = fake.add_list("Members")
        ...create the integration with base_url=fake.url, api_key=fake.api_key...
        assert fake.member(list_id, "ana@example.com")["merge_fields"]["TIER"] == "GOLD"

Authentication as Mailchimp's: HTTP Basic with any user name and the API key as the
password, or `Authorization: Bearer <OAuth token>`; anything else is 401 "API Key
Invalid". Every error is the problem-detail document Mailchimp answers with
(`application/problem+json`): `type`, `title`, `status`, `detail`, `instance`, plus
`errors` (field, message) for invalid resources.

- `GET /ping` (`{"health_status": "Everything's Chimpy!"}`), `GET /lists/{list_id}`.
- `POST /lists/{list_id}`: batch subscribe or unsubscribe, `members` (at most 500),
  `update_existing`, `sync_tags` (replace each member's tags with the request's). Answers
  200 with `new_members`, `updated_members`, `errors` (`email_address`, `error`,
  `error_code`, `field`, `field_message`), `total_created`, `total_updated`,
  `error_count`, even when some members were refused. A cleaned address is never
  subscribed again; unknown merge fields and values of the wrong type are per-member
  errors.
- `PUT|GET /lists/{list_id}/members/{subscriber_hash}` (MD5 of the lower-cased email):
  upsert with `status_if_new`, read.
- `POST /lists/{list_id}/members/{subscriber_hash}/tags` `{"tags": [{name, status}]}`: 204.
- `GET|POST /lists/{list_id}/segments`: list, or create a static segment
  (`static_segment`: emails already on the list).
- `POST /lists/{list_id}/segments/{segment_id}`: `members_to_add` / `members_to_remove`
  (at most 500 each); emails not on the list are reported in `errors`.
- `POST /customer-journeys/journeys/{journey_id}/steps/{step_id}/actions/trigger`
  `{"email_address"}`: 204 for a subscribed contact of the journey's audience, 400
  otherwise, 404 for a step the journey does not have.

Limits: at most `max_connections` (10, as Mailchimp allows per API key) requests in flight
at once; one more is answered 429 "Too Many Requests". `latency` holds each request that
long so concurrency is real; `max_in_flight` is the most seen at once.

Programming: `fail_next(n, status)` (5xx before anything happens).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import re
import threading
import urllib.parse
import uuid
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from tests.support_server import bind_local_socket, serving_in_thread

DEFAULT_API_KEY = "0123456789abcdef0123456789abcdef-us21"
ERROR_DOCS = "https://mailchimp.com/developer/marketing/docs/errors/"
MAX_BATCH_MEMBERS = 500
MAX_SEGMENT_CHANGES = 500
MAX_CONNECTIONS = 10
STATUSES = frozenset({"subscribed", "unsubscribed", "cleaned", "pending", "transactional"})
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# The merge fields a new list has, and their types.
DEFAULT_MERGE_FIELDS: dict[str, str] = {
    "FNAME": "text",
    "LNAME": "text",
    "TIER": "text",
    "POINTS": "number",
    "STATUS": "text",
    "TERMEND": "date",
}


def subscriber_hash(email: str) -> str:
    return hashlib.md5(email.lower().encode("utf-8"), usedforsecurity=False).hexdigest()


class MailchimpProblem(Exception):
    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        errors: list[dict[str, str]] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.document: dict[str, Any] = {
            "type": ERROR_DOCS,
            "title": title,
            "status": status,
            "detail": detail,
            "instance": str(uuid.uuid4()),
        }
        if errors:
            self.document["errors"] = errors


def _invalid(detail: str, errors: list[dict[str, str]] | None = None) -> MailchimpProblem:
    return MailchimpProblem(400, "Invalid Resource", detail, errors=errors)


def _not_found() -> MailchimpProblem:
    return MailchimpProblem(404, "Resource Not Found", "The requested resource could not be found.")


@dataclass
class MailchimpRequest:
    method: str
    path: str
    body: Any
    status: int = 0


@dataclass
class _Member:
    email_address: str
    status: str
    merge_fields: dict[str, Any]
    tags: set[str]
    last_changed: str

    def document(self, list_id: str) -> dict[str, Any]:
        return {
            "id": subscriber_hash(self.email_address),
            "email_address": self.email_address,
            "unique_email_id": subscriber_hash(self.email_address)[:10],
            "status": self.status,
            "merge_fields": dict(self.merge_fields),
            "tags_count": len(self.tags),
            "tags": [{"id": abs(hash(tag)) % 100_000, "name": tag} for tag in sorted(self.tags)],
            "list_id": list_id,
            "last_changed": self.last_changed,
        }


@dataclass
class _Segment:
    id: int
    name: str
    members: set[str] = field(default_factory=set)  # subscriber hashes


@dataclass
class _List:
    id: str
    name: str
    merge_fields: dict[str, str]
    members: dict[str, _Member] = field(default_factory=dict)
    segments: dict[int, _Segment] = field(default_factory=dict)


@dataclass(frozen=True)
class JourneyTrigger:
    journey_id: int
    step_id: int
    email_address: str


class FakeMailchimp:
    """The fake's state, programming and what it has seen; safe to use from any thread."""

    def __init__(self, url: str, api_key: str) -> None:
        self.url = url
        self.api_key = api_key
        self.oauth_tokens: set[str] = set()
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._lists: dict[str, _List] = {}
            self._journeys: dict[int, tuple[str, set[int]]] = {}  # id → (list id, step ids)
            self._triggers: list[JourneyTrigger] = []
            self._requests: list[MailchimpRequest] = []
            self._failures: deque[int] = deque()
            self._segment_ids = itertools.count(1001)
            self._in_flight = 0
            self.max_in_flight = 0
            self.max_connections = MAX_CONNECTIONS
            self.latency = 0.0

    # ------------------------------------------------------------------ programming

    def add_list(self, name: str = "Members", merge_fields: Mapping[str, str] | None = None) -> str:
        list_id = hashlib.sha1(name.encode(), usedforsecurity=False).hexdigest()[:10]
        with self._lock:
            self._lists[list_id] = _List(list_id, name, dict(merge_fields or DEFAULT_MERGE_FIELDS))
        return list_id

    def add_journey(self, journey_id: int, list_id: str, step_ids: set[int]) -> None:
        """A journey whose steps `step_ids` start with the API trigger."""
        with self._lock:
            self._journeys[journey_id] = (list_id, set(step_ids))

    def fail_next(self, n: int, status: int = 503) -> None:
        with self._lock:
            self._failures.extend(status for _ in range(n))

    def up(self) -> None:
        """Forget the failures still programmed: the next requests are served."""
        with self._lock:
            self._failures.clear()

    # ------------------------------------------------------------------ state

    @property
    def requests(self) -> list[MailchimpRequest]:
        with self._lock:
            return list(self._requests)

    def writes(self) -> list[MailchimpRequest]:
        """Requests that may change something (anything but GET), answered or not."""
        return [r for r in self.requests if r.method != "GET"]

    def member(self, list_id: str, email: str) -> dict[str, Any] | None:
        with self._lock:
            found = self._lists[list_id].members.get(subscriber_hash(email))
            return found.document(list_id) if found is not None else None

    def members(self, list_id: str) -> dict[str, dict[str, Any]]:
        """Every member by lower-cased email."""
        with self._lock:
            return {
                m.email_address.lower(): m.document(list_id)
                for m in self._lists[list_id].members.values()
            }

    def segment_members(self, list_id: str, name: str) -> set[str] | None:
        """The lower-cased emails of the static segment called `name`; None if none is."""
        with self._lock:
            lst = self._lists[list_id]
            for segment in lst.segments.values():
                if segment.name == name:
                    return {lst.members[h].email_address.lower() for h in segment.members}
        return None

    def delete_segment(self, list_id: str, name: str) -> None:
        """Delete the segment called `name`, as someone in Mailchimp's own app may."""
        with self._lock:
            segments = self._lists[list_id].segments
            for segment_id in [k for k, s in segments.items() if s.name == name]:
                del segments[segment_id]

    @property
    def triggers(self) -> list[JourneyTrigger]:
        with self._lock:
            return list(self._triggers)

    # ------------------------------------------------------------------ list webhooks

    def set_status(self, list_id: str, email: str, status: str) -> None:
        """Change a member's status as a subscriber (or Mailchimp's cleaning) would."""
        with self._lock:
            member = self._lists[list_id].members[subscriber_hash(email)]
            member.status = status
            member.last_changed = _now()

    def webhook_body(self, kind: str, list_id: str, email: str, **data: str) -> bytes:
        """The form-encoded body Mailchimp posts to a list webhook: `type`, `fired_at`
        (`Y-m-d H:i:s`) and `data[...]` fields (`merges` as `data[merges][FNAME]`)."""
        fields: list[tuple[str, str]] = [
            ("type", kind),
            ("fired_at", datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")),
            ("data[list_id]", list_id),
        ]
        if kind == "upemail":
            fields += [
                ("data[new_id]", subscriber_hash(data["new_email"])),
                ("data[new_email]", data["new_email"]),
                ("data[old_email]", email),
            ]
        else:
            fields += [("data[id]", subscriber_hash(email)), ("data[email]", email)]
            fields += [("data[email_type]", "html")]
            if kind == "unsubscribe":
                fields += [("data[action]", data.get("action", "unsub"))]
                fields += [("data[reason]", data.get("reason", "manual"))]
            if kind == "cleaned":
                fields += [("data[reason]", data.get("reason", "hard"))]
            for name, value in data.items():
                if name.isupper():
                    fields.append((f"data[merges][{name}]", value))
        return urllib.parse.urlencode(fields).encode()

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        request = Request(scope, receive)
        raw = await request.body()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        path = request.url.path
        record = MailchimpRequest(request.method, path, body)
        with self._lock:
            self._requests.append(record)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            crowded = self._in_flight > self.max_connections
        try:
            if self.latency:
                await asyncio.sleep(self.latency)
            try:
                self._admit(request.headers.get("authorization", ""), crowded)
                if not path.startswith("/3.0/"):
                    raise _not_found()
                status, payload = self._route(request.method, path[len("/3.0") :], body, raw)
            except MailchimpProblem as problem:
                status, payload = problem.status, problem.document
        finally:
            with self._lock:
                self._in_flight -= 1
        record.status = status
        is_problem = status >= 400
        response = Response(
            content=b"" if payload is None else json.dumps(payload).encode(),
            status_code=status,
            media_type=None
            if payload is None
            else ("application/problem+json" if is_problem else "application/json"),
            headers={"x-request-id": str(uuid.uuid4())},
        )
        await response(scope, receive, send)

    def _admit(self, authorization: str, crowded: bool) -> None:
        scheme, _, credentials = authorization.partition(" ")
        allowed = False
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(credentials.strip()).decode("utf-8")
            except ValueError:
                decoded = ""
            allowed = decoded.partition(":")[2] == self.api_key
        elif scheme.lower() in ("bearer", "oauth"):
            allowed = credentials.strip() in self.oauth_tokens
        if not allowed:
            raise MailchimpProblem(
                401,
                "API Key Invalid",
                "Your API key may be invalid, or you've attempted to access the wrong datacenter.",
            )
        if crowded:
            raise MailchimpProblem(
                429,
                "Too Many Requests",
                f"You have exceeded the limit of {self.max_connections} simultaneous connections.",
            )
        with self._lock:
            failure = self._failures.popleft() if self._failures else None
        if failure is not None:
            raise MailchimpProblem(
                failure, "Service Unavailable", "The service is temporarily unavailable."
            )

    def _route(self, method: str, path: str, body: Any, raw: bytes) -> tuple[int, Any]:
        parts = [p for p in path.split("/") if p]
        if parts == ["ping"] and method == "GET":
            return 200, {"health_status": "Everything's Chimpy!"}
        if len(parts) >= 2 and parts[0] == "lists":
            with self._lock:
                lst = self._lists.get(parts[1])
            if lst is None:
                raise _not_found()
            return self._list_route(method, lst, parts[2:], body)
        if (
            len(parts) == 7
            and parts[:2] == ["customer-journeys", "journeys"]
            and parts[3] == "steps"
            and parts[5:] == ["actions", "trigger"]
            and method == "POST"
        ):
            return self._trigger(parts[2], parts[4], body)
        raise _not_found()

    def _list_route(self, method: str, lst: _List, rest: list[str], body: Any) -> tuple[int, Any]:
        if not rest:
            if method == "GET":
                with self._lock:
                    count = sum(m.status == "subscribed" for m in lst.members.values())
                return 200, {"id": lst.id, "name": lst.name, "stats": {"member_count": count}}
            if method == "POST":
                return 200, self._batch_subscribe(lst, body)
        elif rest[0] == "members" and len(rest) == 2:
            if method == "GET":
                with self._lock:
                    found = lst.members.get(rest[1])
                    if found is None:
                        raise _not_found()
                    return 200, found.document(lst.id)
            if method == "PUT":
                return 200, self._upsert(lst, rest[1], body)
        elif rest[0] == "members" and len(rest) == 3 and rest[2] == "tags" and method == "POST":
            return self._tags(lst, rest[1], body)
        elif rest[0] == "segments" and len(rest) == 1:
            if method == "GET":
                with self._lock:
                    segments = [
                        {
                            "id": s.id,
                            "name": s.name,
                            "type": "static",
                            "member_count": len(s.members),
                        }
                        for s in lst.segments.values()
                    ]
                return 200, {"segments": segments, "list_id": lst.id, "total_items": len(segments)}
            if method == "POST":
                return 200, self._create_segment(lst, body)
        elif rest[0] == "segments" and len(rest) == 2 and method == "POST":
            return 200, self._change_segment(lst, rest[1], body)
        if method not in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            raise MailchimpProblem(
                405, "Method Not Allowed", "The requested method is not allowed."
            )
        raise _not_found()

    # ------------------------------------------------------------------ members

    def _member_errors(
        self, lst: _List, item: Any, *, status_field: str = "status"
    ) -> tuple[str, str, str] | None:
        """(error, error_code, field) of the first thing wrong with a member body."""
        if not isinstance(item, dict):
            return "The member is not an object.", "ERROR_GENERIC", ""
        email = item.get("email_address")
        if not isinstance(email, str) or not _EMAIL.match(email):
            return (
                f"{email!r} looks fake or invalid, please enter a real email address.",
                "ERROR_GENERIC",
                "email_address",
            )
        status = item.get(status_field)
        if status not in STATUSES:
            return (
                f"The status {status!r} is not one of {sorted(STATUSES)}.",
                "ERROR_GENERIC",
                status_field,
            )
        merge_fields = item.get("merge_fields") or {}
        if not isinstance(merge_fields, dict):
            return "merge_fields must be an object.", "ERROR_GENERIC", "merge_fields"
        for tag, value in merge_fields.items():
            kind = lst.merge_fields.get(tag)
            if kind is None:
                return (
                    f"Your merge fields were invalid: {tag} is not a merge field of this list.",
                    "ERROR_GENERIC",
                    f"merge_fields.{tag}",
                )
            if value in ("", None):
                continue
            if kind == "number" and (not isinstance(value, int | float) or isinstance(value, bool)):
                return (
                    f"Please enter a number for {tag}.",
                    "ERROR_GENERIC",
                    f"merge_fields.{tag}",
                )
            if kind == "date" and (not isinstance(value, str) or not _DATE.match(value)):
                return (
                    f"Please enter a date (YYYY-MM-DD) for {tag}.",
                    "ERROR_GENERIC",
                    f"merge_fields.{tag}",
                )
        tags = item.get("tags", [])
        if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
            return "tags must be a list of names.", "ERROR_GENERIC", "tags"
        return None

    def _batch_subscribe(self, lst: _List, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or not isinstance(body.get("members"), list):
            raise _invalid(
                "The resource submitted could not be validated.",
                [{"field": "members", "message": "Required fields were not provided: members"}],
            )
        members = body["members"]
        if len(members) > MAX_BATCH_MEMBERS:
            raise _invalid(
                f"You may only add or update up to {MAX_BATCH_MEMBERS} members per call.",
                [{"field": "members", "message": "Schema describes array, too many items"}],
            )
        update_existing = body.get("update_existing") is True
        sync_tags = body.get("sync_tags") is True
        created: list[dict[str, Any]] = []
        updated: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        now = _now()
        with self._lock:
            for item in members:
                problem = self._member_errors(lst, item)
                if problem is not None:
                    errors.append(_batch_error(item, *problem))
                    continue
                key = subscriber_hash(item["email_address"])
                existing = lst.members.get(key)
                if existing is None:
                    member = _Member(
                        item["email_address"],
                        item["status"],
                        {**_blank(lst), **(item.get("merge_fields") or {})},
                        set(item.get("tags") or []),
                        now,
                    )
                    lst.members[key] = member
                    created.append(member.document(lst.id))
                    continue
                if not update_existing:
                    errors.append(
                        _batch_error(
                            item,
                            f"{item['email_address']} is already a list member, do you want "
                            "to update? please provide update_existing:true in the request body",
                            "ERROR_CONTACT_EXISTS",
                            "email_address",
                        )
                    )
                    continue
                if existing.status == "cleaned" and item["status"] == "subscribed":
                    errors.append(
                        _batch_error(
                            item,
                            f"{item['email_address']} is in a compliance state due to "
                            "unsubscribe, bounce, or compliance review and cannot be subscribed.",
                            "ERROR_GENERIC",
                            "status",
                        )
                    )
                    continue
                existing.status = item["status"]
                existing.merge_fields.update(item.get("merge_fields") or {})
                if sync_tags:
                    existing.tags = set(item.get("tags") or [])
                existing.last_changed = now
                updated.append(existing.document(lst.id))
        return {
            "new_members": created,
            "updated_members": updated,
            "errors": errors,
            "total_created": len(created),
            "total_updated": len(updated),
            "error_count": len(errors),
            "_links": [],
        }

    def _upsert(self, lst: _List, key: str, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise _invalid("The resource submitted could not be validated.")
        status_field = "status" if "status" in body else "status_if_new"
        problem = self._member_errors(lst, body, status_field=status_field)
        if problem is not None:
            raise _invalid(problem[0], [{"field": problem[2], "message": problem[0]}])
        if subscriber_hash(body["email_address"]) != key:
            raise _invalid(
                "The email address passed does not match the subscriber hash in the URL."
            )
        with self._lock:
            existing = lst.members.get(key)
            if existing is None:
                member = _Member(
                    body["email_address"],
                    body.get("status_if_new") or body["status"],
                    {**_blank(lst), **(body.get("merge_fields") or {})},
                    set(body.get("tags") or []),
                    _now(),
                )
                lst.members[key] = member
                return member.document(lst.id)
            if "status" in body:
                existing.status = body["status"]
            existing.merge_fields.update(body.get("merge_fields") or {})
            existing.last_changed = _now()
            return existing.document(lst.id)

    def _tags(self, lst: _List, key: str, body: Any) -> tuple[int, Any]:
        tags = body.get("tags") if isinstance(body, dict) else None
        if not isinstance(tags, list):
            raise _invalid("The resource submitted could not be validated.")
        with self._lock:
            member = lst.members.get(key)
            if member is None:
                raise _not_found()
            for tag in tags:
                if not isinstance(tag, dict) or tag.get("status") not in ("active", "inactive"):
                    raise _invalid("Each tag needs a name and a status of active or inactive.")
                if tag["status"] == "active":
                    member.tags.add(str(tag["name"]))
                else:
                    member.tags.discard(str(tag["name"]))
        return 204, None

    # ------------------------------------------------------------------ segments

    def _create_segment(self, lst: _List, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not body["name"]:
            raise _invalid(
                "The resource submitted could not be validated.",
                [{"field": "name", "message": "Required fields were not provided: name"}],
            )
        emails = body.get("static_segment")
        if not isinstance(emails, list):
            raise _invalid("Only static segments are kept by this fake: send static_segment.")
        with self._lock:
            if any(s.name == body["name"] for s in lst.segments.values()):
                raise _invalid(f"A segment named {body['name']!r} already exists.")
            segment = _Segment(next(self._segment_ids), body["name"])
            for email in emails:
                key = subscriber_hash(str(email))
                if key in lst.members:
                    segment.members.add(key)
            lst.segments[segment.id] = segment
            return {
                "id": segment.id,
                "name": segment.name,
                "member_count": len(segment.members),
                "type": "static",
                "list_id": lst.id,
            }

    def _change_segment(self, lst: _List, segment_id: str, body: Any) -> dict[str, Any]:
        with self._lock:
            segment = lst.segments.get(int(segment_id)) if segment_id.isdigit() else None
        if segment is None:
            raise _not_found()
        if not isinstance(body, dict):
            raise _invalid("The resource submitted could not be validated.")
        to_add = body.get("members_to_add") or []
        to_remove = body.get("members_to_remove") or []
        if not isinstance(to_add, list) or not isinstance(to_remove, list):
            raise _invalid("members_to_add and members_to_remove must be lists of emails.")
        if len(to_add) > MAX_SEGMENT_CHANGES or len(to_remove) > MAX_SEGMENT_CHANGES:
            raise _invalid(
                f"You may only add or remove up to {MAX_SEGMENT_CHANGES} members per call."
            )
        added: list[dict[str, Any]] = []
        removed: list[dict[str, Any]] = []
        missing: list[str] = []
        with self._lock:
            for email in to_add:
                member = lst.members.get(subscriber_hash(str(email)))
                if member is None:
                    missing.append(str(email))
                    continue
                segment.members.add(subscriber_hash(str(email)))
                added.append(member.document(lst.id))
            for email in to_remove:
                member = lst.members.get(subscriber_hash(str(email)))
                if member is None:
                    missing.append(str(email))
                    continue
                segment.members.discard(subscriber_hash(str(email)))
                removed.append(member.document(lst.id))
        errors = (
            [{"email_addresses": missing, "error": "Email addresses are not list members."}]
            if missing
            else []
        )
        return {
            "members_added": added,
            "members_removed": removed,
            "errors": errors,
            "total_added": len(added),
            "total_removed": len(removed),
            "error_count": len(missing),
        }

    # ------------------------------------------------------------------ journeys

    def _trigger(self, journey_id: str, step_id: str, body: Any) -> tuple[int, Any]:
        with self._lock:
            journey = self._journeys.get(int(journey_id)) if journey_id.isdigit() else None
        if journey is None or not step_id.isdigit() or int(step_id) not in journey[1]:
            raise _not_found()
        email = body.get("email_address") if isinstance(body, dict) else None
        if not isinstance(email, str):
            raise _invalid(
                "The resource submitted could not be validated.",
                [{"field": "email_address", "message": "Required fields were not provided"}],
            )
        with self._lock:
            member = self._lists[journey[0]].members.get(subscriber_hash(email))
            if member is None or member.status != "subscribed":
                raise _invalid(f"{email} is not a subscribed contact of this audience.")
            self._triggers.append(JourneyTrigger(int(journey_id), int(step_id), email))
        return 204, None


def _batch_error(item: Any, error: str, code: str, field_name: str) -> dict[str, Any]:
    email = item.get("email_address") if isinstance(item, dict) else None
    return {
        "email_address": email if isinstance(email, str) else "",
        "error": error,
        "error_code": code,
        "field": field_name,
        "field_message": error,
    }


def _blank(lst: _List) -> dict[str, Any]:
    return dict.fromkeys(lst.merge_fields, "")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@asynccontextmanager
async def running_fake_mailchimp(api_key: str = DEFAULT_API_KEY) -> AsyncIterator[FakeMailchimp]:
    """Serve a fresh `FakeMailchimp` on 127.0.0.1 until the block ends; its `url` is the
    API root (`…/3.0`)."""
    sock, base_url = bind_local_socket()
    fake = FakeMailchimp(f"{base_url}/3.0", api_key)
    async with serving_in_thread(fake, sock, name="fake-mailchimp", lifespan="off"):
        yield fake
