"""The console's session: a signed cookie, with idle and absolute expiry and a CSRF token.

The cookie holds no secret, only who is signed in (the staff public id and the account's
session version, so a password change or deactivation ends every session), the session's
random id (signing out records it as ended, so a copy of the cookie signs no one in), when,
and the CSRF token; it is signed (itsdangerous, with a key derived from the master secret) so it
cannot be forged, and is sent HttpOnly, SameSite=Lax, and Secure outside development.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.datastructures import MutableHeaders
from starlette.requests import HTTPConnection, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from memberhub.settings import Settings

COOKIE_NAME = "memberhub_console"
CONSOLE_PREFIX = "/console"
# A second-factor or SSO step must be finished within this.
PENDING_STEP_SECONDS = 300
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "cross-origin-opener-policy": "same-origin",
    "permissions-policy": "camera=(), microphone=(), geolocation=()",
    "cache-control": "no-store",
}


def _serializer(settings: Settings) -> URLSafeTimedSerializer:
    key = hashlib.sha256(b"memberhub-console-session:" + settings.resolved_secret_key.encode())
    return URLSafeTimedSerializer(key.hexdigest(), salt="console-session")


@dataclass
class ConsoleSession:
    data: dict[str, Any] = field(default_factory=dict)
    changed: bool = False
    # Set when a signed-in session ended by expiry on this request; the anonymous session
    # that follows remembers it until the sign-in page has said so (`take_expired`).
    expired: bool = False
    # That session, (staff id, session id, signed in at), to record as ended: a copy of
    # its cookie kept busy elsewhere would not have expired.
    ended: tuple[str, str, int] | None = None

    @property
    def csrf_token(self) -> str:
        token = self.data.get("csrf")
        if not isinstance(token, str):
            token = self.data["csrf"] = secrets.token_urlsafe(32)
            self.changed = True
        return token

    @property
    def staff_id(self) -> str | None:
        value = self.data.get("stf")
        return value if isinstance(value, str) else None

    @property
    def session_id(self) -> str | None:
        value = self.data.get("sid")
        return value if isinstance(value, str) else None

    @property
    def signed_in_at(self) -> int | None:
        value = self.data.get("at")
        return value if isinstance(value, int) else None

    @property
    def signed_in_as(self) -> tuple[str, str, int] | None:
        """(staff id, session id, signed in at) of a signed-in session."""
        staff_id, session_id, at = self.staff_id, self.session_id, self.signed_in_at
        if staff_id is None or session_id is None or at is None:
            return None
        return staff_id, session_id, at

    @property
    def version(self) -> int | None:
        value = self.data.get("ver")
        return value if isinstance(value, int) else None

    def sign_in(self, staff_id: str, version: int) -> None:
        now = int(time.time())
        # A new CSRF token for the signed-in session, and nothing of the anonymous one.
        self.data = {
            "csrf": secrets.token_urlsafe(32),
            "stf": staff_id,
            "sid": secrets.token_urlsafe(18),
            "ver": version,
            "at": now,
            "seen": now,
        }
        self.changed = True

    def sign_out(self) -> None:
        self.data = {"csrf": secrets.token_urlsafe(32)}
        self.changed = True

    def set_version(self, version: int) -> None:
        self.data["ver"] = version
        self.changed = True

    def touch(self, now: int) -> None:
        if self.staff_id is not None and self.data.get("seen") != now:
            self.data["seen"] = now
            self.changed = True

    def put_pending(self, name: str, value: dict[str, Any]) -> None:
        self.data[name] = {**value, "at": int(time.time())}
        self.changed = True

    def take_pending(self, name: str) -> dict[str, Any] | None:
        """A pending step (second factor, SSO) stored by `put_pending`, removed; None when
        absent or too old."""
        value = self.data.pop(name, None)
        if value is not None:
            self.changed = True
        if not isinstance(value, dict):
            return None
        at = value.get("at")
        if not isinstance(at, int) or time.time() - at > PENDING_STEP_SECONDS:
            return None
        return value

    def peek_pending(self, name: str) -> dict[str, Any] | None:
        value = self.data.get(name)
        if not isinstance(value, dict):
            return None
        at = value.get("at")
        if not isinstance(at, int) or time.time() - at > PENDING_STEP_SECONDS:
            return None
        return value

    def flash(self, message: str) -> None:
        self.data["flash"] = message[:300]
        self.changed = True

    def take_expired(self) -> bool:
        """Whether a session ended by expiry since the sign-in page last showed; asked once
        (the request that found it expired is usually redirected to that page)."""
        noted = self.data.pop("expired", None) is not None
        if noted:
            self.changed = True
        return noted or self.expired

    def take_flash(self) -> str | None:
        message = self.data.pop("flash", None)
        if message is not None:
            self.changed = True
        return message if isinstance(message, str) else None


def load_session(settings: Settings, cookie: str | None, now: float) -> ConsoleSession:
    if not cookie or len(cookie) > 4096:
        return ConsoleSession()
    try:
        data = _serializer(settings).loads(
            cookie, max_age=int(settings.console_session_hours * 3600)
        )
    except BadSignature:
        return ConsoleSession()
    if not isinstance(data, dict):
        return ConsoleSession()
    session = ConsoleSession(data=data)
    if session.staff_id is not None:
        seen, at = data.get("seen"), data.get("at")
        idle = not isinstance(seen, int) or now - seen > settings.console_idle_minutes * 60
        too_old = not isinstance(at, int) or now - at > settings.console_session_hours * 3600
        if idle or too_old:
            session.ended = session.signed_in_as
            session.sign_out()
            session.expired = True
            session.data["expired"] = 1
    return session


def session_digest(session_id: str) -> str:
    """How an ended session is recorded: never by its id itself."""
    return hashlib.sha256(b"memberhub-console-session-id:" + session_id.encode()).hexdigest()


def console_session(request: Request) -> ConsoleSession:
    session: ConsoleSession = request.state.console_session
    return session


def is_console_path(path: str) -> bool:
    return path == CONSOLE_PREFIX or path.startswith(CONSOLE_PREFIX + "/")


class ConsoleMiddleware:
    """For /console paths: loads the session before the page runs, writes the cookie back
    when it changed, and adds the security headers to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_console_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        settings: Settings = scope["app"].state.settings
        cookie = HTTPConnection(scope).cookies.get(COOKIE_NAME)
        session = load_session(settings, cookie, time.time())
        scope.setdefault("state", {})["console_session"] = session

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
                if settings.console_secure_cookie:
                    headers.setdefault("strict-transport-security", "max-age=31536000")
                if session.changed:
                    headers.append("set-cookie", _cookie_header(settings, session))
            await send(message)

        await self.app(scope, receive, send_with_cookie)


def _cookie_header(settings: Settings, session: ConsoleSession) -> str:
    value = _serializer(settings).dumps(session.data)
    parts = [
        f"{COOKIE_NAME}={value}",
        f"Path={CONSOLE_PREFIX}",
        "HttpOnly",
        "SameSite=Lax",
        f"Max-Age={int(settings.console_session_hours * 3600)}",
    ]
    if settings.console_secure_cookie:
        parts.append("Secure")
    return "; ".join(parts)
