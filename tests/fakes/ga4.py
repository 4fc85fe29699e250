"""A stateful fake of the GA4 Measurement Protocol and its validation server.

`running_fake_ga4` serves it on a free port of 127.0.0.1:

    async with running_fake_ga4(measurement_id="G-TEST1234", api_secret=SECRET) as fake:
        ...a GA4 integration with base_url=fake.url...
        fake.events_for("mem_…")    # the events GA4 recorded for that user_id, in order

As Google documents: `POST /mp/collect?measurement_id=…&api_secret=…` answers 204 to
whatever it receives — a payload with a wrong secret, a reserved or invalid event name,
too many events or parameters is dropped silently (kept in `dropped` with the reason, as
the property's reports would simply lack it). `POST /debug/mp/collect` records nothing and
answers 200 `{"validationMessages": [...]}` with `fieldPath`, `description` and
`validationCode` for each problem (it does not check the API secret). `down(503)` answers
every request with that status until `up()`.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import Response

from tests.support_server import bind_local_socket, serving_in_thread

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_EVENTS = 25
MAX_PARAMS = 25
MAX_USER_PROPERTIES = 25
MAX_NAME = 40
MAX_PARAM_VALUE = 100
MAX_USER_PROPERTY_NAME = 24
MAX_USER_PROPERTY_VALUE = 36
MAX_BODY_BYTES = 130 * 1024
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
RESERVED = frozenset(
    {
        "ad_activeview",
        "ad_click",
        "ad_exposure",
        "ad_impression",
        "ad_query",
        "ad_reward",
        "adunit_exposure",
        "app_clear_data",
        "app_exception",
        "app_remove",
        "app_update",
        "error",
        "first_open",
        "first_visit",
        "in_app_purchase",
        "notification_dismiss",
        "notification_foreground",
        "notification_open",
        "notification_receive",
        "os_update",
        "session_start",
        "user_engagement",
    }
)
RESERVED_PREFIXES = ("_", "firebase_", "ga_", "google_", "gtag.")


def _message(path: str, description: str, code: str) -> dict[str, str]:
    return {"fieldPath": path, "description": description, "validationCode": code}


def validate(body: Any) -> list[dict[str, str]]:
    """The validation server's messages for a request body."""
    if not isinstance(body, dict):
        return [_message("", "The payload must be a JSON object.", "VALUE_INVALID")]
    messages = []
    if not isinstance(body.get("client_id"), str) or not body["client_id"]:
        messages.append(
            _message("client_id", "Measurement requires a client_id.", "VALUE_REQUIRED")
        )
    user_id = body.get("user_id")
    if user_id is not None and (not isinstance(user_id, str) or len(user_id) > 256):
        messages.append(_message("user_id", "user_id must be a string.", "VALUE_INVALID"))
    consent = body.get("consent") or {}
    for key, value in consent.items() if isinstance(consent, dict) else []:
        if key not in ("ad_user_data", "ad_personalization") or value not in (
            "GRANTED",
            "DENIED",
        ):
            messages.append(
                _message(f"consent.{key}", f"Invalid consent value {value!r}.", "VALUE_INVALID")
            )
    properties = body.get("user_properties") or {}
    if len(properties) > MAX_USER_PROPERTIES:
        messages.append(
            _message("user_properties", "Too many user properties.", "EXCEEDED_MAX_ENTITIES")
        )
    for name, holder in properties.items():
        value = holder.get("value") if isinstance(holder, dict) else None
        if len(name) > MAX_USER_PROPERTY_NAME or not _NAME.match(name):
            messages.append(
                _message(f"user_properties.{name}", "Invalid user property name.", "NAME_INVALID")
            )
        if isinstance(value, str) and len(value) > MAX_USER_PROPERTY_VALUE:
            messages.append(
                _message(
                    f"user_properties.{name}.value",
                    f"User property value exceeds {MAX_USER_PROPERTY_VALUE} characters.",
                    "VALUE_INVALID",
                )
            )
    events = body.get("events")
    if not isinstance(events, list) or not events:
        messages.append(_message("events", "Measurement requires events.", "VALUE_REQUIRED"))
        return messages
    if len(events) > MAX_EVENTS:
        messages.append(
            _message(
                "events",
                f"A request can have at most {MAX_EVENTS} events.",
                "EXCEEDED_MAX_ENTITIES",
            )
        )
    for index, event in enumerate(events):
        name = event.get("name") if isinstance(event, dict) else None
        path = f"events[{index}]"
        if not isinstance(name, str) or len(name) > MAX_NAME or not _NAME.match(name):
            messages.append(
                _message(
                    f"{path}.name",
                    f"Event at index: [{index}] has invalid name [{name}]. Names must start "
                    "with an alphabetic character.",
                    "NAME_INVALID",
                )
            )
            continue
        if name.lower() in RESERVED or name.lower().startswith(RESERVED_PREFIXES):
            messages.append(
                _message(f"{path}.name", f"Event name {name} is reserved.", "NAME_RESERVED")
            )
        params = event.get("params") or {}
        if len(params) > MAX_PARAMS:
            messages.append(
                _message(f"{path}.params", "Too many parameters.", "EXCEEDED_MAX_ENTITIES")
            )
        for key, value in params.items() if isinstance(params, dict) else []:
            if len(key) > MAX_NAME or not _NAME.match(key):
                messages.append(
                    _message(f"{path}.params.{key}", "Invalid parameter name.", "NAME_INVALID")
                )
            if isinstance(value, str) and len(value) > MAX_PARAM_VALUE:
                messages.append(
                    _message(
                        f"{path}.params.{key}",
                        f"Parameter value exceeds {MAX_PARAM_VALUE} characters.",
                        "VALUE_INVALID",
                    )
                )
    return messages


@dataclass
class _State:
    collected: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    collect_requests: int = 0
    debug_requests: int = 0
    down_status: int | None = None


class FakeGa4:
    def __init__(self, url: str, measurement_id: str, api_secret: str) -> None:
        self.url = url
        self.measurement_id = measurement_id
        self.api_secret = api_secret
        self._lock = threading.Lock()
        self._state = _State()

    def down(self, status: int = 503) -> None:
        with self._lock:
            self._state.down_status = status

    def up(self) -> None:
        with self._lock:
            self._state.down_status = None

    @property
    def collect_requests(self) -> int:
        with self._lock:
            return self._state.collect_requests

    @property
    def debug_requests(self) -> int:
        with self._lock:
            return self._state.debug_requests

    @property
    def collected(self) -> list[dict[str, Any]]:
        """Request bodies recorded (valid, with the right secret), in order."""
        with self._lock:
            return list(self._state.collected)

    @property
    def dropped(self) -> list[tuple[dict[str, Any], str]]:
        with self._lock:
            return list(self._state.dropped)

    def events_for(self, user_id: str) -> list[dict[str, Any]]:
        return [
            event
            for body in self.collected
            if body.get("user_id") == user_id
            for event in body["events"]
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        request = Request(scope, receive)
        raw = await request.body()
        query = {k: v[0] for k, v in parse_qs(request.url.query).items()}
        path = request.url.path
        with self._lock:
            if path == "/mp/collect":
                self._state.collect_requests += 1
            elif path == "/debug/mp/collect":
                self._state.debug_requests += 1
            down = self._state.down_status
        if down is not None:
            response = Response(status_code=down)
        elif request.method != "POST" or path not in ("/mp/collect", "/debug/mp/collect"):
            response = Response(status_code=404)
        else:
            try:
                body: Any = json.loads(raw)
            except ValueError:
                body = None
            messages = (
                validate(body)
                if len(raw) <= MAX_BODY_BYTES
                else [_message("", "The payload is too large.", "VALUE_INVALID")]
            )
            if path == "/debug/mp/collect":
                response = Response(
                    content=json.dumps({"validationMessages": messages}).encode(),
                    status_code=200,
                    media_type="application/json",
                )
            else:
                reason = None
                if query.get("measurement_id") != self.measurement_id:
                    reason = "unknown measurement_id"
                elif query.get("api_secret") != self.api_secret:
                    reason = "wrong api_secret"
                elif messages:
                    reason = messages[0]["validationCode"]
                with self._lock:
                    if reason is None:
                        self._state.collected.append(body)
                    else:
                        self._state.dropped.append((body, reason))
                # Silent: 2xx whatever happened to the payload.
                response = Response(status_code=204)
        await response(scope, receive, send)


@asynccontextmanager
async def running_fake_ga4(
    measurement_id: str = "G-TEST1234", api_secret: str = "ga4-api-secret-0001"
) -> AsyncIterator[FakeGa4]:
    sock, base_url = bind_local_socket()
    fake = FakeGa4(base_url, measurement_id, api_secret)
    async with serving_in_thread(fake, sock, name="fake-ga4", lifespan="off"):
        yield fake
