"""A stateful fake of Firebase Cloud Messaging's HTTP v1 API and of Google's OAuth 2.0
token endpoint for service accounts.

`running_fake_fcm` serves both on a free port of 127.0.0.1 (uvicorn in a thread, as the
other fakes):

    async with running_fake_fcm(project_id="club-app") as fake:
        key_file = fake.service_account()       # its token_uri is the fake's /token
        device = fake.register_device()
        ...send through the provider with base_url=fake.url...
        [sent] = fake.sent
        fake.unregister(device)                 # the app was uninstalled

`POST /token` takes the JWT bearer grant (RFC 7523) as Google does: the assertion's RS256
signature is checked (with PyJWT) against the public key of the service account it names
(`iss`), its `aud` must be the token URI, its `scope` must hold the FCM scope, and it may
live an hour at most; refusals are OAuth's `{"error", "error_description"}`. It answers
`{"access_token", "expires_in", "token_type"}`.

`POST /v1/projects/{project_id}/messages:send` needs one of those access tokens (401
UNAUTHENTICATED otherwise, also once `expire_tokens` was called) for the project of the
account (403 PERMISSION_DENIED), and a message with exactly one of token, topic or
condition, string data values and known notification fields. Tokens not registered are
INVALID_ARGUMENT, unregistered ones UNREGISTERED (404), in Google's error shape with the
`google.firebase.fcm.v1.FcmError` detail. `validate_only` checks without sending.
`fail_next` answers 503 UNAVAILABLE; a sliding one-second rate limit and
`rate_limit_next` 429 QUOTA_EXCEEDED.
"""

from __future__ import annotations

import copy
import json
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.requests import Request
from starlette.responses import Response

from tests.support_server import bind_local_socket, serving_in_thread

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TOKEN_LIFETIME_SECONDS = 3599
MAX_ASSERTION_LIFETIME_SECONDS = 3600
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
MESSAGE_FIELDS = frozenset(
    {"name", "data", "notification", "android", "webpush", "apns", "fcm_options"}
)
TARGETS = ("token", "topic", "condition")
NOTIFICATION_FIELDS = frozenset({"title", "body", "image"})
_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


class GoogleError(Exception):
    """An FCM error in Google's `{"error": {"code", "message", "status", "details"}}` shape."""

    def __init__(
        self,
        code: int,
        message: str,
        fcm_error: str | None = None,
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        error: dict[str, Any] = {"code": code, "message": message, "status": _STATUS[code]}
        if fcm_error is not None:
            error["details"] = [{"@type": FCM_ERROR_TYPE, "errorCode": fcm_error}]
        self.status = code
        self.body = {"error": error}
        self.headers = headers or {}


class OAuthError(Exception):
    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.status = status
        self.body = {"error": error, "error_description": description}


@dataclass(frozen=True)
class SentPush:
    name: str
    message: dict[str, Any]


class FakeFcm:
    """The fake's state, programming and what it has seen; safe to use from any thread."""

    def __init__(self, url: str, project_id: str) -> None:
        self.url = url
        self.project_id = project_id
        self.token_uri = f"{url}/token"
        self.token_lifetime = TOKEN_LIFETIME_SECONDS  # what `expires_in` says
        self._lock = threading.Lock()
        self._accounts: dict[str, tuple[str, rsa.RSAPublicKey, str]] = {}
        self._access_tokens: dict[str, tuple[str, float]] = {}
        self._devices: set[str] = set()
        self._unregistered: set[str] = set()
        self._sent: list[SentPush] = []
        self._token_requests: list[dict[str, str]] = []
        self._failures: deque[int] = deque()
        self._rate_limited_next = 0
        self._rate_limit: float | None = None
        self._accepted_at: deque[float] = deque()

    # ------------------------------------------------------------ programming

    def service_account(
        self, *, project_id: str | None = None, key: rsa.RSAPrivateKey | None = None
    ) -> dict[str, Any]:
        """A new service account of `project_id` (the fake's project by default): its JSON
        key file, as the Firebase console hands it out, with the fake's token URI."""
        project = project_id or self.project_id
        private_key = key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
        key_id = secrets.token_hex(20)
        email = f"firebase-adminsdk-{secrets.token_hex(3)}@{project}.iam.gserviceaccount.com"
        with self._lock:
            self._accounts[email] = (key_id, private_key.public_key(), project)
        pem = private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        return {
            "type": "service_account",
            "project_id": project,
            "private_key_id": key_id,
            "private_key": pem,
            "client_email": email,
            "client_id": str(secrets.randbelow(10**21)),
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_uri,
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": f"https://www.googleapis.com/robot/v1/metadata/x509/{email}",
            "universe_domain": "googleapis.com",
        }

    def register_device(self) -> str:
        """A registration token, as the app gets from the FCM SDK on a device."""
        token = f"{secrets.token_urlsafe(16)}:APA91b{secrets.token_urlsafe(100)}"
        with self._lock:
            self._devices.add(token)
        return token

    def unregister(self, token: str) -> None:
        """The app was uninstalled: sends to `token` answer UNREGISTERED from now on."""
        with self._lock:
            self._unregistered.add(token)

    def expire_tokens(self) -> None:
        """Every access token issued so far stops working (expired or revoked)."""
        with self._lock:
            self._access_tokens.clear()

    def fail_next(self, n: int, status: int = 503) -> None:
        with self._lock:
            self._failures.extend(status for _ in range(n))

    def rate_limit_next(self, n: int) -> None:
        with self._lock:
            self._rate_limited_next += n

    def set_rate_limit(self, per_second: float | None) -> None:
        with self._lock:
            self._rate_limit = per_second
            self._accepted_at.clear()

    # ------------------------------------------------------------ state

    @property
    def sent(self) -> list[SentPush]:
        with self._lock:
            return list(self._sent)

    @property
    def token_requests(self) -> list[dict[str, str]]:
        """The form of every request to the token endpoint."""
        with self._lock:
            return list(self._token_requests)

    # ------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        request = Request(scope, receive)
        body = await request.body()
        headers = {name.lower(): value for name, value in request.headers.items()}
        path = request.url.path
        extra: dict[str, str] = {}
        try:
            if request.method == "POST" and path == "/token":
                status, payload = 200, self._grant(dict(parse_qsl(body.decode())))
            elif request.method == "POST" and path.endswith("/messages:send"):
                status, payload = 200, self._messages_send(path, headers, body)
            else:
                raise GoogleError(404, f"Method not found: {path}")
        except (GoogleError, OAuthError) as error:
            status, payload = error.status, error.body
            extra = getattr(error, "headers", {})
        response = Response(
            content=json.dumps(payload).encode(),
            status_code=status,
            media_type="application/json",
            headers={"vary": "Origin, X-Origin, Referer", **extra},
        )
        await response(scope, receive, send)

    def _grant(self, form: dict[str, str]) -> dict[str, Any]:
        with self._lock:
            self._token_requests.append(dict(form))
        grant_type = form.get("grant_type", "")
        if grant_type != JWT_BEARER:
            raise OAuthError("unsupported_grant_type", f"Invalid grant_type: {grant_type}")
        assertion = form.get("assertion", "")
        try:
            claims = jwt.decode(assertion, options={"verify_signature": False})
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError:
            raise OAuthError("invalid_grant", "Invalid JWT: bad format.") from None
        with self._lock:
            account = self._accounts.get(str(claims.get("iss")))
        if account is None:
            raise OAuthError("invalid_grant", "Invalid grant: account not found")
        key_id, public_key, _project = account
        if header.get("kid") not in (None, key_id):
            raise OAuthError("invalid_grant", "Invalid JWT Signature.")
        try:
            claims = jwt.decode(
                assertion,
                public_key,
                algorithms=["RS256"],
                audience=self.token_uri,
                options={"require": ["iss", "aud", "iat", "exp"]},
                leeway=60,
            )
        except jwt.InvalidSignatureError:
            raise OAuthError("invalid_grant", "Invalid JWT Signature.") from None
        except jwt.InvalidAudienceError:
            raise OAuthError("invalid_grant", "Invalid JWT: Failed audience check.") from None
        except jwt.PyJWTError:
            raise OAuthError(
                "invalid_grant",
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a "
                "reasonable timeframe. Check your iat and exp values in the JWT claim.",
            ) from None
        if int(claims["exp"]) - int(claims["iat"]) > MAX_ASSERTION_LIFETIME_SECONDS:
            raise OAuthError(
                "invalid_grant",
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a "
                "reasonable timeframe. Check your iat and exp values in the JWT claim.",
            )
        if FCM_SCOPE not in str(claims.get("scope", "")).split():
            raise OAuthError("invalid_scope", "Invalid OAuth scope or ID token audience provided.")
        access_token = f"ya29.c.{secrets.token_urlsafe(64)}"
        with self._lock:
            self._access_tokens[access_token] = (
                str(claims["iss"]),
                time.time() + self.token_lifetime,
            )
        return {
            "access_token": access_token,
            "expires_in": self.token_lifetime,
            "token_type": "Bearer",
        }

    def _messages_send(self, path: str, headers: dict[str, str], raw: bytes) -> dict[str, Any]:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        with self._lock:
            issued = self._access_tokens.get(token.strip()) if scheme.lower() == "bearer" else None
            account = self._accounts.get(issued[0]) if issued else None
        if issued is None or account is None or issued[1] <= time.time():
            raise GoogleError(
                401,
                "Request had invalid authentication credentials. Expected OAuth 2 access "
                "token, login cookie or other valid authentication credential. See "
                "https://developers.google.com/identity/sign-in/web/devconsole-project.",
            )
        project = path.removeprefix("/v1/projects/").removesuffix("/messages:send")
        if project != account[2]:
            raise GoogleError(
                403,
                f"Permission 'cloudmessaging.messages.create' denied on resource "
                f"'//cloudresourcemanager.googleapis.com/projects/{project}' (or it may not "
                "exist).",
            )
        self._admit()
        try:
            body = json.loads(raw)
        except ValueError:
            raise GoogleError(400, "Invalid JSON payload received.") from None
        message = body.get("message") if isinstance(body, dict) else None
        if not isinstance(message, dict):
            raise GoogleError(400, "Request contains an invalid argument.", "INVALID_ARGUMENT")
        _check_message(message)
        device = message.get("token")
        if device is not None:
            with self._lock:
                known, gone = device in self._devices, device in self._unregistered
            if gone:
                raise GoogleError(404, "Requested entity was not found.", "UNREGISTERED")
            if not known:
                raise GoogleError(
                    400,
                    "The registration token is not a valid FCM registration token",
                    "INVALID_ARGUMENT",
                )
        name = f"projects/{project}/messages/0:{int(time.time() * 1000)}%{secrets.token_hex(8)}"
        if body.get("validate_only") is True:
            return {"name": f"projects/{project}/messages/fake_message_id"}
        with self._lock:
            self._sent.append(SentPush(name, copy.deepcopy(message)))
        return {"name": name}

    def _admit(self) -> None:
        with self._lock:
            if self._failures:
                status = self._failures.popleft()
                code = "UNAVAILABLE" if status == 503 else "INTERNAL"
                raise GoogleError(status, "The service is currently unavailable.", code)
            limited = self._rate_limited_next > 0
            if limited:
                self._rate_limited_next -= 1
            elif self._rate_limit is not None:
                now = time.monotonic()
                while self._accepted_at and self._accepted_at[0] <= now - 1.0:
                    self._accepted_at.popleft()
                limited = len(self._accepted_at) >= self._rate_limit
                if not limited:
                    self._accepted_at.append(now)
        if limited:
            raise GoogleError(
                429,
                "Quota exceeded for quota metric 'Send requests' and limit 'Send requests per "
                "minute per project'.",
                "QUOTA_EXCEEDED",
                headers={"retry-after": "1"},
            )


def _check_message(message: dict[str, Any]) -> None:
    for name in message:
        if name not in MESSAGE_FIELDS and name not in TARGETS:
            raise GoogleError(
                400,
                f"Invalid JSON payload received. Unknown name \"{name}\" at 'message': "
                "Cannot find field.",
            )
    if sum(1 for target in TARGETS if message.get(target)) != 1:
        raise GoogleError(
            400, "Exactly one of token, topic or condition must be specified.", "INVALID_ARGUMENT"
        )
    data = message.get("data", {})
    if not isinstance(data, dict):
        raise GoogleError(400, "Invalid value at 'message.data'.", "INVALID_ARGUMENT")
    for index, (key, value) in enumerate(data.items()):
        if not isinstance(value, str):
            raise GoogleError(
                400,
                f"Invalid value at 'message.data[{index}].value' (TYPE_STRING), {value}",
            )
        if key in ("from", "notification", "message_type") or key.startswith(("google", "gcm")):
            raise GoogleError(400, f"Invalid data payload key: {key}", "INVALID_ARGUMENT")
    notification = message.get("notification", {})
    if not isinstance(notification, dict):
        raise GoogleError(400, "Invalid value at 'message.notification'.", "INVALID_ARGUMENT")
    for name, value in notification.items():
        if name not in NOTIFICATION_FIELDS:
            raise GoogleError(
                400,
                f'Invalid JSON payload received. Unknown name "{name}" at '
                "'message.notification': Cannot find field.",
            )
        if not isinstance(value, str):
            raise GoogleError(
                400, f"Invalid value at 'message.notification.{name}' (TYPE_STRING), {value}"
            )


@asynccontextmanager
async def running_fake_fcm(project_id: str = "memberhub-club") -> AsyncIterator[FakeFcm]:
    """Serve a fresh `FakeFcm` for `project_id` on 127.0.0.1 until the block ends."""
    sock, base_url = bind_local_socket()
    fake = FakeFcm(base_url, project_id)
    async with serving_in_thread(fake, sock, name="fake-fcm", lifespan="off"):
        yield fake
