"""Firebase Cloud Messaging: push notifications through the HTTP v1 API.

Each notification is one `POST /v1/projects/{project_id}/messages:send` to one device
token. FCM takes a Google OAuth 2.0 access token, which a service account gets with the
JWT bearer grant (RFC 7523): a JWT naming the account (`iss`), the FCM scope, the token
endpoint (`aud`) and a lifetime of an hour at most, signed RS256 with the account's
private key, posted to the account's `token_uri`. The token is kept per integration until
shortly before it expires, so a send costs one request; a 401 from FCM drops it and the
send is made once more with a fresh one.

FCM's errors name their cause in `details[].errorCode`: UNREGISTERED (the app was
uninstalled or the token expired) and INVALID_ARGUMENT (no such token, a bad payload) can
never succeed and are permanent, and the refusal's message starts with the code so the
sender can drop the device token; QUOTA_EXCEEDED (429), UNAVAILABLE (503) and INTERNAL
(500) reach the caller as GatewayError for its retry schedule.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from pydantic import Field, StringConstraints, field_validator

from memberhub.integrations.gateway import GatewayPolicy
from memberhub.integrations.providers.base import (
    BaseConfig,
    BaseCredentials,
    Capability,
    Connection,
    ConnectionFailed,
    DeliveryReport,
    OutgoingMessage,
    Provider,
    SendRejected,
    SendResult,
)

ProjectId = Annotated[
    str, StringConstraints(strip_whitespace=True, pattern=r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")
]

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# Google accepts assertions valid for an hour at most.
ASSERTION_LIFETIME_SECONDS = 3600
# A token is renewed this long before Google says it expires.
TOKEN_MARGIN_SECONDS = 300
PERMANENT_ERRORS = frozenset({"UNREGISTERED", "INVALID_ARGUMENT", "SENDER_ID_MISMATCH"})
CHECK_TOPIC = "memberhub-connection-check"
MAX_SERVICE_ACCOUNT_CHARS = 20_000


@dataclass(frozen=True)
class ServiceAccount:
    """What a service-account key file says, as far as getting a token needs it."""

    client_email: str
    private_key_id: str
    private_key: rsa.RSAPrivateKey
    token_uri: str
    project_id: str | None

    @classmethod
    def parse(cls, value: Any) -> ServiceAccount:
        """The key file's JSON (text or object); ValueError naming what is wrong."""
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise ValueError("is not JSON: paste the service account's key file") from None
        if not isinstance(value, Mapping) or value.get("type") != "service_account":
            raise ValueError(
                'is not a service account key file (its "type" is not service_account)'
            )
        missing = [
            name
            for name in ("client_email", "private_key", "token_uri")
            if not isinstance(value.get(name), str) or not value.get(name)
        ]
        if missing:
            raise ValueError(f"lacks {', '.join(missing)}")
        token_uri = str(value["token_uri"])
        if not token_uri.startswith(("https://", "http://")):
            raise ValueError("has a token_uri that is not an http(s) URL")
        try:
            key = serialization.load_pem_private_key(
                str(value["private_key"]).encode("ascii"), password=None
            )
        except (ValueError, TypeError, UnicodeEncodeError):
            raise ValueError("has a private_key that is not an unencrypted PEM key") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("has a private_key that is not an RSA key")
        project_id = value.get("project_id")
        return cls(
            client_email=str(value["client_email"]),
            private_key_id=str(value.get("private_key_id") or ""),
            private_key=key,
            token_uri=token_uri,
            project_id=project_id if isinstance(project_id, str) and project_id else None,
        )

    def assertion(self, now: float) -> str:
        """The signed JWT of the JWT bearer grant."""
        header = {"alg": "RS256", "typ": "JWT"}
        if self.private_key_id:
            header["kid"] = self.private_key_id
        issued = int(now)
        claims = {
            "iss": self.client_email,
            "scope": SCOPE,
            "aud": self.token_uri,
            "iat": issued,
            "exp": issued + ASSERTION_LIFETIME_SECONDS,
        }
        signing_input = f"{_b64url(_compact(header))}.{_b64url(_compact(claims))}".encode()
        signature = self.private_key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input.decode()}.{_b64url(signature)}"


class FcmConfig(BaseConfig):
    project_id: ProjectId | None = Field(
        default=None,
        description="The Firebase project to send through. Default: the service account's.",
    )


class FcmCredentials(BaseCredentials):
    service_account: str = Field(
        max_length=MAX_SERVICE_ACCOUNT_CHARS,
        description="The service account's JSON key file (as text or as an object), from "
        "Project settings → Service accounts; the account needs the Firebase Cloud "
        "Messaging API Admin role.",
    )

    @field_validator("service_account", mode="before")
    @classmethod
    def _key_file(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            value = json.dumps(dict(value))
        ServiceAccount.parse(value)
        return value


@dataclass(frozen=True)
class _Token:
    value: str
    renew_at: float  # Unix seconds


class Fcm(Provider):
    name = "fcm"
    title = "Firebase Cloud Messaging"
    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.MESSAGES})
    message_channels: ClassVar[frozenset[str]] = frozenset({"push"})
    config_model = FcmConfig
    credentials_model = FcmCredentials
    base_url = "https://fcm.googleapis.com"
    # 600,000 messages per minute per project.
    policy: ClassVar[GatewayPolicy] = GatewayPolicy(rate_limit="600000 per minute")

    def __init__(self) -> None:
        # Access tokens by integration and key, and the lock that lets one call at a time
        # fetch one.
        self._tokens: dict[tuple[str, str, str], _Token] = {}
        self._locks: dict[tuple[str, str, str], asyncio.Lock] = {}

    def validate(self, config: BaseConfig, credentials: BaseCredentials) -> None:
        assert isinstance(config, FcmConfig)
        assert isinstance(credentials, FcmCredentials)
        if (
            not config.project_id
            and not ServiceAccount.parse(credentials.service_account).project_id
        ):
            raise ValueError(
                "Set config.project_id: the service account's key file names no project_id."
            )

    def auth_headers(self, credentials: Mapping[str, Any]) -> dict[str, str]:
        # The access token is fetched and applied by the provider itself (`_token`).
        return {}

    async def check_connection(self, connection: Connection) -> str:
        """Get a token and validate (without sending) a message to a topic."""
        account = _account(connection)
        try:
            await self._send(connection, {"topic": CHECK_TOPIC}, validate_only=True)
        except SendRejected as exc:
            raise ConnectionFailed(str(exc)) from None
        return (
            f"connected to Firebase project {_project(connection, account)} "
            f"as {account.client_email}"
        )

    # ------------------------------------------------------------ messages

    async def send_message(self, connection: Connection, message: OutgoingMessage) -> SendResult:
        if message.channel != "push":
            raise SendRejected(
                f"FCM sends push notifications, not {message.channel}", permanent=True
            )
        notification = {"body": message.text}
        if message.subject:
            notification["title"] = message.subject
        target: dict[str, Any] = {"token": message.to, "notification": notification}
        if message.data:
            target["data"] = dict(message.data)
        name = await self._send(connection, target)
        return SendResult(provider_message_id=name)

    def delivery_reports(self, event_type: str, body: bytes) -> list[DeliveryReport]:
        # FCM reports nothing back: a message it accepted counts as sent.
        return []

    async def _send(
        self, connection: Connection, message: dict[str, Any], *, validate_only: bool = False
    ) -> str | None:
        account = _account(connection)
        path = f"/v1/projects/{_project(connection, account)}/messages:send"
        body: dict[str, Any] = {"message": message}
        if validate_only:
            body["validate_only"] = True
        for renewed in (False, True):
            token = await self._token(connection, account, renew=renewed)
            response = await connection.gateway.request(
                "POST", path, json=body, headers={"Authorization": f"Bearer {token}"}
            )
            if response.status_code != 401 or renewed:
                break
        if response.status_code == 200:
            name = response.json().get("name")
            return name if isinstance(name, str) else None
        code, text = _fcm_error(response.status_code, response.text)
        raise SendRejected(
            f"{code}: FCM answered {response.status_code}: {text}",
            permanent=code in PERMANENT_ERRORS,
            recipient_gone=code == "UNREGISTERED",
        )

    async def _token(self, connection: Connection, account: ServiceAccount, *, renew: bool) -> str:
        key = (connection.integration_id, account.client_email, account.private_key_id)
        lock = self._locks.setdefault(key, asyncio.Lock())
        stale = self._tokens.get(key)
        async with lock:
            cached = self._tokens.get(key)
            # A fresh token serves, unless it is the one FCM just refused (another call
            # may have renewed it meanwhile).
            if (
                cached is not None
                and cached.renew_at > time.time()
                and (not renew or cached is not stale)
            ):
                return cached.value
            now = time.time()
            response = await connection.gateway.request(
                "POST",
                account.token_uri,
                data={"grant_type": JWT_BEARER, "assertion": account.assertion(now)},
            )
            answer = _json(response.text)
            value = answer.get("access_token")
            if response.status_code != 200 or not isinstance(value, str) or not value:
                reason = answer.get("error_description") or answer.get("error") or response.text
                raise SendRejected(
                    f"Google refused the service account {account.client_email}: "
                    f"{str(reason)[:200]}",
                    # The message is fine: it can go once the credentials are fixed.
                    permanent=False,
                )
            lifetime = answer.get("expires_in")
            seconds = float(lifetime) if isinstance(lifetime, int | float) else 3600.0
            self._tokens[key] = _Token(value, now + max(0.0, seconds - TOKEN_MARGIN_SECONDS))
            return value


def _account(connection: Connection) -> ServiceAccount:
    return _parsed(str(connection.credentials.get("service_account", "")))


@functools.lru_cache(maxsize=64)
def _parsed(text: str) -> ServiceAccount:
    """A key file parsed once per process: loading an RSA key is not free."""
    return ServiceAccount.parse(text)


def _project(connection: Connection, account: ServiceAccount) -> str:
    config = connection.config
    assert isinstance(config, FcmConfig)
    project = config.project_id or account.project_id
    assert project is not None  # checked when the settings were saved
    return project


def _fcm_error(status: int, text: str) -> tuple[str, str]:
    """FCM's errorCode (or the error's status) and message."""
    error = _json(text).get("error")
    if not isinstance(error, Mapping):
        return f"HTTP_{status}", text[:200]
    code = error.get("status") or f"HTTP_{status}"
    for detail in error.get("details") or []:
        if isinstance(detail, Mapping) and detail.get("errorCode"):
            code = detail["errorCode"]
            break
    return str(code), str(error.get("message") or "")[:500]


def _json(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _compact(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")
