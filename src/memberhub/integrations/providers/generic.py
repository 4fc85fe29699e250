"""Generic providers: any HTTP API (with API-key, basic or OAuth auth) and any signed
webhook source (Standard Webhooks or a configurable HMAC)."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

import httpx
from pydantic import Field, StringConstraints

from memberhub.integrations import signatures
from memberhub.integrations.activity_mapping import ActivityMapping
from memberhub.integrations.providers.base import (
    BaseConfig,
    BaseCredentials,
    Capability,
    Connection,
    ConnectionFailed,
    InboundIdentity,
    InboundRequest,
    Provider,
)

Secret = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000)]
Path = Annotated[str, StringConstraints(min_length=1, max_length=500, pattern=r"^/[^\s]*$")]
HeaderName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9-]{1,100}$")]


class HttpConfig(BaseConfig):
    auth: Literal["none", "bearer", "header", "basic", "oauth2"] = "bearer"
    auth_header: HeaderName = Field(
        default="X-API-Key", description="The header carrying credentials.api_key (auth=header)."
    )
    test_path: Path = Field(default="/", description="GET here checks the connection.")
    notify_path: Path | None = Field(
        default=None, description="POST here sends a notification (JSON recipient, subject, body)."
    )


class HttpCredentials(BaseCredentials):
    api_key: Secret | None = None
    username: Secret | None = None
    password: Secret | None = None
    client_id: Secret | None = None
    client_secret: Secret | None = None
    access_token: Secret | None = None
    refresh_token: Secret | None = None


class GenericHttp(Provider):
    """An HTTP API of the organisation's choosing: a base URL, an auth type, a test path."""

    name = "http"
    title = "HTTP API"
    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.NOTIFIER})
    config_model: ClassVar[type[BaseConfig]] = HttpConfig
    credentials_model = HttpCredentials

    def validate(self, config: BaseConfig, credentials: BaseCredentials) -> None:
        assert isinstance(config, HttpConfig)
        if not config.base_url:
            raise ValueError("config.base_url is required for an HTTP API integration")
        if config.auth == "oauth2" and (
            config.oauth is None or not config.oauth.authorize_url or not config.oauth.token_url
        ):
            raise ValueError("auth oauth2 needs config.oauth.authorize_url and token_url")

    def auth_headers(self, credentials: Mapping[str, Any]) -> dict[str, str]:
        # The auth type is config, not a credential; the hub passes it in as `_auth`.
        auth = credentials.get("_auth", "bearer")
        if auth == "header" and credentials.get("api_key"):
            return {credentials.get("_auth_header", "X-API-Key"): credentials["api_key"]}
        if auth == "basic" and credentials.get("username") is not None:
            pair = f"{credentials['username']}:{credentials.get('password') or ''}"
            return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}
        if auth in ("bearer", "oauth2"):
            return super().auth_headers(credentials)
        return {}

    async def check_connection(self, connection: Connection) -> str:
        assert isinstance(connection.config, HttpConfig)
        response = await connection.gateway.request("GET", connection.config.test_path)
        _require_success(response, f"GET {connection.config.test_path}")
        return f"GET {connection.config.test_path} answered {response.status_code}"

    async def notify(self, connection: Connection, recipient: str, subject: str, body: str) -> None:
        assert isinstance(connection.config, HttpConfig)
        if connection.config.notify_path is None:
            raise ConnectionFailed("config.notify_path is not set")
        response = await connection.gateway.request(
            "POST",
            connection.config.notify_path,
            json={"recipient": recipient, "subject": subject, "body": body},
        )
        _require_success(response, f"POST {connection.config.notify_path}")


def _require_success(response: httpx.Response, call: str) -> None:
    """Only a 2xx is an answer: a redirect (to a login page, say) is not followed, and says
    where it pointed, so the configured address can be corrected."""
    if 200 <= response.status_code < 300:
        return
    message = f"{call} answered {response.status_code}"
    if 300 <= response.status_code < 400 and "location" in response.headers:
        message += f", redirecting to {response.headers['location'][:200]}"
    raise ConnectionFailed(message)


class WebhookConfig(BaseConfig):
    scheme: Literal["standard", "hmac"] = Field(
        default="standard", description="Standard Webhooks, or a plain HMAC header."
    )
    signature_header: HeaderName = "X-Signature"
    algorithm: Literal["sha256", "sha512"] = "sha256"
    encoding: Literal["hex", "base64"] = "hex"
    prefix: Annotated[str, StringConstraints(max_length=20)] = ""
    timestamp_header: HeaderName | None = None
    tolerance_seconds: int = Field(default=300, ge=30, le=3600)
    activity: ActivityMapping | None = Field(
        default=None,
        description="Record each event as an activity, read from its JSON by these pointers.",
    )


class WebhookCredentials(BaseCredentials):
    signing_secret: Secret


class GenericWebhook(Provider):
    """Any system that signs its webhooks with Standard Webhooks or an HMAC header."""

    name = "webhook"
    title = "Signed webhooks"
    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.EVENTS_SOURCE})
    config_model = WebhookConfig
    credentials_model = WebhookCredentials

    def validate(self, config: BaseConfig, credentials: BaseCredentials) -> None:
        assert isinstance(config, WebhookConfig)
        assert isinstance(credentials, WebhookCredentials)
        if config.scheme == "standard":
            problem = signatures.standard_secret_problem(credentials.signing_secret)
            if problem is not None:
                raise ValueError(f"credentials.signing_secret: {problem}")

    def verify(
        self, request: InboundRequest, connection_secrets: Mapping[str, Any], config: BaseConfig
    ) -> None:
        assert isinstance(config, WebhookConfig)
        secret = str(connection_secrets.get("signing_secret") or "")
        if config.scheme == "standard":
            signatures.verify_standard(
                request.body,
                request.headers,
                secret,
                now=request.now,
                tolerance=config.tolerance_seconds,
            )
            return
        scheme = signatures.HmacScheme(
            header=config.signature_header,
            algorithm=config.algorithm,
            encoding=config.encoding,
            prefix=config.prefix,
            timestamp_header=config.timestamp_header,
            tolerance=config.tolerance_seconds,
        )
        signatures.verify_hmac(request.body, request.headers, secret, scheme, now=request.now)

    def identify(self, request: InboundRequest) -> InboundIdentity:
        """The `webhook-id` header, else the body's `id`; the type is the body's `type`."""
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            body = json.loads(request.body)
        except ValueError:
            body = None
        fields: dict[str, Any] = body if isinstance(body, dict) else {}
        event_id = headers.get("webhook-id") or fields.get("id")
        event_type = fields.get("type")
        if not event_id:
            # Nothing names the event: the same bytes are the same event.
            event_id = "sha256-" + hashlib.sha256(request.body).hexdigest()
        return InboundIdentity(
            event_id=str(event_id)[:255], event_type=str(event_type or "unknown")[:255]
        )
