"""SendGrid: email through the v3 Mail Send API, and its signed Event Webhook.

Each notification is one `POST /v3/mail/send` with one personalization. Its
`custom_args.memberhub_reference` carries our notification id: SendGrid copies custom
arguments into every event of the message, so a report names the notification even when
the message id is missing (SendGrid omits it from asynchronous bounces). SendGrid answers
202 with the message id in `X-Message-Id`; an event's `sg_message_id` is that id followed
by a suffix of SendGrid's (`.filter…`, `.recvd-…`), which reports drop so they match what
the send returned.

The Event Webhook posts a JSON array of events, signed with ECDSA (P-256, SHA-256) over
the `X-Twilio-Email-Event-Webhook-Timestamp` value followed by the raw body. The
verification key shown under Settings → Mail Settings → Event Webhook (base64 DER, or PEM)
goes in `config.webhook_public_key`: it is public, so it is a setting, not a credential.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import functools
import hashlib
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key, load_pem_public_key
from pydantic import EmailStr, Field, StringConstraints, field_validator

from memberhub.integrations import signatures
from memberhub.integrations.gateway import GatewayPolicy
from memberhub.integrations.providers.base import (
    BaseConfig,
    BaseCredentials,
    Capability,
    Connection,
    ConnectionFailed,
    DeliveryReport,
    InboundIdentity,
    InboundRequest,
    OutgoingMessage,
    Provider,
    SendRejected,
    SendResult,
)

ApiKey = Annotated[str, StringConstraints(strip_whitespace=True, min_length=20, max_length=500)]
TemplateId = Annotated[str, StringConstraints(strip_whitespace=True, pattern=r"^d-[0-9a-f]{32}$")]

REFERENCE_ARG = "memberhub_reference"
MAIL_SEND_PATH = "/v3/mail/send"
MAX_EVENT_ID_CHARS = 200
MAX_REASON_CHARS = 500
# Statuses of the Event Webhook's events that say what became of a message; the others
# (processed, deferred, open, click, group_resubscribe) change nothing we track.
EVENT_STATUSES: dict[str, str] = {
    "delivered": "delivered",
    "bounce": "bounced",
    "dropped": "dropped",
    "spamreport": "spam_report",
    "unsubscribe": "unsubscribed",
    "group_unsubscribe": "unsubscribed",
}
_MESSAGE_ID_SUFFIX = re.compile(r"\.(filter|recvd-)")


@functools.lru_cache(maxsize=64)
def load_public_key(text: str) -> ec.EllipticCurvePublicKey:
    """The Event Webhook's verification key from its base64 DER or PEM text; ValueError
    unless it is a P-256 public key."""
    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = load_pem_public_key(text.encode("ascii"))
        else:
            key = load_der_public_key(base64.b64decode("".join(text.split()), validate=True))
    except (ValueError, binascii.Error, UnicodeEncodeError):
        raise ValueError(
            "is not a public key: paste the verification key SendGrid shows (base64), or PEM"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("is not an ECDSA P-256 public key, as SendGrid's verification key is")
    return key


class SendGridConfig(BaseConfig):
    from_email: EmailStr = Field(
        description="The sender address: a verified Sender Identity or an address of an "
        "authenticated domain."
    )
    from_name: str | None = Field(default=None, max_length=200)
    reply_to: EmailStr | None = None
    template_id: TemplateId | None = Field(
        default=None,
        description="A dynamic template (d-…) to send instead of memberhub's rendered content; "
        "it receives `subject`, `text`, `html` and `reference` as dynamic template data.",
    )
    webhook_public_key: str | None = Field(
        default=None,
        max_length=2000,
        description="The Signed Event Webhook's verification key (base64 DER, as SendGrid "
        "shows it, or PEM). Events are refused until it is set.",
    )
    tolerance_seconds: int = Field(default=300, ge=30, le=3600)

    @field_validator("webhook_public_key")
    @classmethod
    def _public_key(cls, value: str | None) -> str | None:
        if value is not None:
            load_public_key(value)
        return value


class SendGridCredentials(BaseCredentials):
    api_key: ApiKey = Field(description="An API key (SG.…) with the Mail Send permission.")


class SendGrid(Provider):
    name = "sendgrid"
    title = "SendGrid"
    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {Capability.MESSAGES, Capability.EVENTS_SOURCE}
    )
    message_channels: ClassVar[frozenset[str]] = frozenset({"email"})
    config_model = SendGridConfig
    credentials_model = SendGridCredentials
    base_url = "https://api.sendgrid.com"
    # Mail Send takes up to 10,000 requests per second; SendGrid answers 429 with
    # X-RateLimit-Reset beyond it.
    policy: ClassVar[GatewayPolicy] = GatewayPolicy(rate_limit="10000 per second")

    async def check_connection(self, connection: Connection) -> str:
        response = await connection.gateway.request("GET", "/v3/scopes")
        if response.status_code != 200:
            raise ConnectionFailed(_error_message(response.status_code, response.text))
        scopes = response.json().get("scopes") or []
        if "mail.send" not in scopes:
            raise ConnectionFailed(
                "the SendGrid API key lacks the Mail Send (mail.send) permission"
            )
        return "connected to SendGrid; the API key may send mail"

    # ------------------------------------------------------------ messages

    async def send_message(self, connection: Connection, message: OutgoingMessage) -> SendResult:
        config = connection.config
        assert isinstance(config, SendGridConfig)
        if message.channel != "email":
            raise SendRejected(f"SendGrid sends email, not {message.channel}", permanent=True)
        response = await connection.gateway.request(
            "POST", MAIL_SEND_PATH, json=mail_body(config, message)
        )
        if response.status_code in (200, 202):
            # 200: accepted in sandbox mode, which sends nothing and assigns no id.
            return SendResult(provider_message_id=response.headers.get("x-message-id"))
        raise SendRejected(
            _error_message(response.status_code, response.text),
            permanent=response.status_code != 408,
        )

    def delivery_reports(self, event_type: str, body: bytes) -> list[DeliveryReport]:
        reports = []
        for event in _events(body):
            status = EVENT_STATUSES.get(str(event.get("event")))
            if status is None:
                continue
            if status == "bounced" and event.get("type") == "blocked":
                # A block is the receiving server refusing for now (reputation, content):
                # not a reason to stop writing to the address.
                status = "failed"
            reports.append(
                DeliveryReport(
                    status=status,  # type: ignore[arg-type]
                    provider_message_id=_message_id(event.get("sg_message_id")),
                    recipient=_text(event.get("email")),
                    reference=_text(event.get(REFERENCE_ARG)),
                    reason=_reason(event),
                    occurred_at=_when(event.get("timestamp")),
                )
            )
        return reports

    # ------------------------------------------------------------ events source

    def verify(
        self, request: InboundRequest, connection_secrets: Mapping[str, Any], config: BaseConfig
    ) -> None:
        assert isinstance(config, SendGridConfig)
        if not config.webhook_public_key:
            raise signatures.SignatureInvalid(
                signatures.NO_MATCHING_SIGNATURE,
                "the integration has no config.webhook_public_key to verify with",
            )
        signatures.verify_sendgrid(
            request.body,
            request.headers,
            load_public_key(config.webhook_public_key),
            now=request.now,
            tolerance=config.tolerance_seconds,
        )

    def identify(self, request: InboundRequest) -> InboundIdentity:
        """A batch of events, known by its events' ids: a retried batch is the same bytes."""
        events = json.loads(request.body)
        if not isinstance(events, list) or not events:
            raise ValueError("the body is not a SendGrid batch of events")
        ids: list[str] = []
        types: set[str] = set()
        for event in events:
            if not isinstance(event, dict) or not _text(event.get("sg_event_id")):
                raise ValueError("a SendGrid event has no sg_event_id")
            ids.append(str(event["sg_event_id"]))
            types.add(str(event.get("event", "unknown")))
        joined = ",".join(ids)
        event_id = (
            joined
            if len(joined) <= MAX_EVENT_ID_CHARS
            else "batch-" + hashlib.sha256(joined.encode()).hexdigest()
        )
        event_type = types.pop() if len(types) == 1 else "batch"
        return InboundIdentity(event_id=event_id, event_type=event_type[:255])


def mail_body(config: SendGridConfig, message: OutgoingMessage) -> dict[str, Any]:
    """The v3 Mail Send request for one message."""
    personalization: dict[str, Any] = {
        "to": [{"email": message.to}],
        "custom_args": {REFERENCE_ARG: message.reference},
    }
    body: dict[str, Any] = {
        "personalizations": [personalization],
        "from": _sender(config, message.sender),
    }
    if config.reply_to:
        body["reply_to"] = {"email": config.reply_to}
    if message.headers:
        body["headers"] = dict(message.headers)
    if config.template_id:
        body["template_id"] = config.template_id
        personalization["dynamic_template_data"] = {
            **message.data,
            "subject": message.subject or "",
            "text": message.text,
            "html": message.html or "",
            "reference": message.reference,
        }
    else:
        body["subject"] = message.subject or ""
        # text/plain must come first; SendGrid refuses other orders.
        content = [{"type": "text/plain", "value": message.text}]
        if message.html:
            content.append({"type": "text/html", "value": message.html})
        body["content"] = content
    if config.sandbox:
        body["mail_settings"] = {"sandbox_mode": {"enable": True}}
    return body


def _sender(config: SendGridConfig, override: str | None) -> dict[str, str]:
    if override:
        name, address = email.utils.parseaddr(override)
        if address:
            return {"email": address, **({"name": name} if name else {})}
    sender = {"email": str(config.from_email)}
    if config.from_name:
        sender["name"] = config.from_name
    return sender


def _events(body: bytes) -> list[Mapping[str, Any]]:
    try:
        events = json.loads(body)
    except ValueError:
        return []
    if not isinstance(events, list):
        return []
    return [event for event in events if isinstance(event, Mapping)]


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _message_id(value: Any) -> str | None:
    text = _text(value)
    if text is None:
        return None
    return _MESSAGE_ID_SUFFIX.split(text, maxsplit=1)[0]


def _reason(event: Mapping[str, Any]) -> str | None:
    """The event's `reason` (bounce, dropped) or `response` (delivered), with the SMTP
    `status` when it does not already say it."""
    text = _text(event.get("reason")) or _text(event.get("response")) or ""
    status = _text(event.get("status"))
    if status and status not in text:
        text = f"{text} ({status})" if text else status
    return text[:MAX_REASON_CHARS] or None


def _when(value: Any) -> datetime | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC)
    return None


def _error_message(status: int, text: str) -> str:
    """SendGrid's `errors` (message and field, joined), or the start of the body."""
    try:
        errors = json.loads(text)["errors"]
        parts = []
        for error in errors:
            field = error.get("field")
            parts.append(f"{error.get('message')}" + (f" ({field})" if field else ""))
        message = "; ".join(parts)[:500]
    except (ValueError, KeyError, TypeError, AttributeError):
        message = text[:200]
    return f"SendGrid answered {status}: {message}"
