"""A stateful fake of SendGrid's v3 Mail Send API and of its signed Event Webhook.

`running_fake_sendgrid` serves it on a free port of 127.0.0.1 (uvicorn in a thread, as the
other fakes), so the provider talks to it over real HTTP with SendGrid's shapes:

    signing_key = ec.generate_private_key(ec.SECP256R1())
    async with running_fake_sendgrid(api_key=KEY, signing_key=signing_key) as fake:
        fake.verify_sender("club@example.com")
        ...send through the provider with base_url=fake.url...
        [mail] = fake.sent
        await fake.post_events(address, [fake.event(mail, "delivered")], via=http)

Endpoints: `POST /v3/mail/send` (202 with `X-Message-Id`; 200 and no id in sandbox mode)
and `GET /v3/scopes`. Requests are checked as SendGrid checks them: `Authorization:
Bearer <key>` (401), the JSON body, personalizations with valid recipients, a from
address that is a verified sender (403), subject and content unless a template is used,
text/plain before text/html, reserved headers, string custom arguments, each error in
SendGrid's `{"errors": [{"message", "field", "help"}]}` shape. A sliding one-second rate
limit and `rate_limit_next` answer 429 with `X-RateLimit-*` headers; `fail_next` answers
5xx.

The Event Webhook side: `event` builds an event of a sent mail as SendGrid posts it (the
message's custom arguments copied in, `sg_message_id` with SendGrid's suffix),
`signed_batch` the exact body and headers of a batch, signed with the test's P-256 key
(`public_key_base64` is what SendGrid shows as the verification key).
"""

from __future__ import annotations

import base64
import copy
import json
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from starlette.requests import Request
from starlette.responses import Response

from tests.support_server import bind_local_socket, serving_in_thread

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

HELP = "http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/errors.html"
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
MAX_PERSONALIZATIONS = 1000
MAX_SUBJECT_CHARS = 998
# Headers SendGrid sets itself and refuses in `headers`.
RESERVED_HEADERS = frozenset(
    {
        "x-sg-id",
        "x-sg-eid",
        "received",
        "dkim-signature",
        "content-type",
        "content-transfer-encoding",
        "to",
        "from",
        "subject",
        "reply-to",
        "cc",
        "bcc",
    }
)


class SendGridError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        field: str | None = None,
        *,
        help_anchor: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.errors = [
            {
                "message": message,
                "field": field,
                "help": f"{HELP}#message.{help_anchor or field}" if field else None,
            }
        ]
        self.headers = dict(headers or {})


@dataclass(frozen=True)
class SentMail:
    """One accepted Mail Send request."""

    message_id: str
    body: dict[str, Any]
    accepted_at: int

    @property
    def to(self) -> str:
        return str(self.body["personalizations"][0]["to"][0]["email"])

    @property
    def custom_args(self) -> dict[str, str]:
        return {
            **(self.body.get("custom_args") or {}),
            **(self.body["personalizations"][0].get("custom_args") or {}),
        }


@dataclass
class _Programming:
    failures: deque[int] = field(default_factory=deque)
    rate_limited_next: int = 0
    rate_limit: float | None = None
    accepted_at: deque[float] = field(default_factory=deque)


class FakeSendGrid:
    """The fake's state, programming and what it has seen; safe to use from any thread."""

    def __init__(self, url: str, api_key: str, signing_key: ec.EllipticCurvePrivateKey) -> None:
        self.url = url
        self.api_key = api_key
        self.signing_key = signing_key
        self.scopes = ["mail.send", "user.webhooks.event.settings.read"]
        self._lock = threading.Lock()
        self._senders: set[str] = set()
        self._sent: list[SentMail] = []
        self._requests: list[tuple[str, str, dict[str, str]]] = []
        self._programming = _Programming()

    # ------------------------------------------------------------ programming

    def verify_sender(self, address: str) -> None:
        """Make `address` a verified Sender Identity, allowed as the from address."""
        with self._lock:
            self._senders.add(address.lower())

    def fail_next(self, n: int, status: int = 500) -> None:
        with self._lock:
            self._programming.failures.extend(status for _ in range(n))

    def rate_limit_next(self, n: int) -> None:
        with self._lock:
            self._programming.rate_limited_next += n

    def set_rate_limit(self, per_second: float | None) -> None:
        """Accept at most `per_second` requests in any moving second; None: all."""
        with self._lock:
            self._programming.rate_limit = per_second
            self._programming.accepted_at.clear()

    # ------------------------------------------------------------ state

    @property
    def sent(self) -> list[SentMail]:
        with self._lock:
            return list(self._sent)

    @property
    def requests(self) -> list[tuple[str, str, dict[str, str]]]:
        """(method, path, lower-cased headers) of every request, whatever its answer."""
        with self._lock:
            return list(self._requests)

    def public_key_base64(self) -> str:
        """The verification key as SendGrid shows it: base64 of the DER public key."""
        der = self.signing_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return base64.b64encode(der).decode("ascii")

    # ------------------------------------------------------------ the Event Webhook

    def event(self, mail: SentMail, kind: str, **fields: Any) -> dict[str, Any]:
        """An event of `mail` as the Event Webhook posts it."""
        event: dict[str, Any] = {
            "email": mail.to,
            "timestamp": int(time.time()),
            "smtp-id": f"<{mail.message_id}@geopod-ismtpd-1>",
            "event": kind,
            "category": [],
            "sg_event_id": base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("="),
            "sg_message_id": f"{mail.message_id}.filterdrecv-7bf9d8b4c7-x2k4l-1-{mail.accepted_at}",
            **mail.custom_args,
        }
        if kind == "delivered":
            event.update(response="250 2.0.0 OK", ip="168.1.1.1", tls=1)
        elif kind == "bounce":
            event.update(
                reason="550 5.1.1 The email account that you tried to reach does not exist.",
                status="5.1.1",
                type="bounce",
                bounce_classification="Invalid Address",
            )
        elif kind == "dropped":
            event.update(reason="Bounced Address", status="5.0.0")
        event.update(fields)
        return event

    def signed_batch(
        self,
        events: Sequence[Mapping[str, Any]],
        *,
        timestamp: int | None = None,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> tuple[bytes, dict[str, str]]:
        """The exact body and headers SendGrid posts for `events` (signed now, with the
        fake's key unless `key` says otherwise)."""
        body = (json.dumps(list(events)) + "\r\n").encode()
        stamp = str(int(time.time()) if timestamp is None else timestamp)
        signature = (key or self.signing_key).sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
        return body, {
            "Content-Type": "application/json",
            "User-Agent": "SendGrid Event API",
            "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
            "X-Twilio-Email-Event-Webhook-Timestamp": stamp,
        }

    async def post_events(
        self, address: str, events: Sequence[Mapping[str, Any]], *, via: httpx.AsyncClient
    ) -> httpx.Response:
        body, headers = self.signed_batch(events)
        return await via.post(address, content=body, headers=headers)

    # ------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        request = Request(scope, receive)
        body = await request.body()
        headers = {name.lower(): value for name, value in request.headers.items()}
        with self._lock:
            self._requests.append((request.method, request.url.path, headers))
        extra: dict[str, str] = {}
        try:
            self._admit(headers)
            status, payload, extra = self._route(request.method, request.url.path, body)
        except SendGridError as error:
            status, payload, extra = error.status, {"errors": error.errors}, error.headers
        content = b"" if payload is None else json.dumps(payload).encode()
        response = Response(
            content=content,
            status_code=status,
            media_type="application/json" if payload is not None else None,
            headers={
                "server": "nginx",
                "access-control-allow-origin": "https://sendgrid.api-docs.io",
                **extra,
            },
        )
        await response(scope, receive, send)

    def _admit(self, headers: Mapping[str, str]) -> None:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or token.strip() != self.api_key:
            raise SendGridError(
                401, "The provided authorization grant is invalid, expired, or revoked"
            )
        with self._lock:
            programming = self._programming
            if programming.failures:
                raise SendGridError(programming.failures.popleft(), "Internal server error")
            limited = programming.rate_limited_next > 0
            if limited:
                programming.rate_limited_next -= 1
            elif programming.rate_limit is not None:
                now = time.monotonic()
                while programming.accepted_at and programming.accepted_at[0] <= now - 1.0:
                    programming.accepted_at.popleft()
                limited = len(programming.accepted_at) >= programming.rate_limit
                if not limited:
                    programming.accepted_at.append(now)
        if limited:
            raise SendGridError(
                429,
                "too many requests",
                headers={
                    "x-ratelimit-limit": "600",
                    "x-ratelimit-remaining": "0",
                    "x-ratelimit-reset": str(int(time.time()) + 1),
                },
            )

    def _route(self, method: str, path: str, body: bytes) -> tuple[int, Any, dict[str, str]]:
        if method == "GET" and path == "/v3/scopes":
            return 200, {"scopes": list(self.scopes)}, {}
        if method == "POST" and path == "/v3/mail/send":
            return self._mail_send(body)
        raise SendGridError(404, "resource not found")

    def _mail_send(self, raw: bytes) -> tuple[int, Any, dict[str, str]]:
        try:
            body = json.loads(raw)
        except ValueError:
            raise SendGridError(400, "Bad Request", None) from None
        if not isinstance(body, dict):
            raise SendGridError(400, "Bad Request", None)
        _check_mail(body)
        sender = body["from"]["email"].lower()
        with self._lock:
            verified = sender in self._senders
        if not verified:
            raise SendGridError(
                403,
                "The from address does not match a verified Sender Identity. Mail cannot be "
                "sent until this error is resolved. Visit https://sendgrid.com/docs/"
                "for-developers/sending-email/sender-identity/ to see the Sender Identity "
                "requirements",
                "from",
            )
        sandbox = (body.get("mail_settings") or {}).get("sandbox_mode", {}).get("enable")
        if sandbox is True:
            return 200, None, {}
        message_id = base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("=")
        with self._lock:
            self._sent.append(SentMail(message_id, copy.deepcopy(body), int(time.time())))
        return 202, None, {"x-message-id": message_id}


def _check_mail(body: Mapping[str, Any]) -> None:
    """Raise the first error SendGrid reports for a Mail Send body."""
    personalizations = body.get("personalizations")
    if not isinstance(personalizations, list) or not personalizations:
        raise SendGridError(
            400,
            "The personalizations field is required and must have at least one personalization.",
            "personalizations",
        )
    if len(personalizations) > MAX_PERSONALIZATIONS:
        raise SendGridError(
            400,
            "The personalization block is limited to 1000 personalizations per API request.",
            "personalizations",
        )
    for index, personalization in enumerate(personalizations):
        to = personalization.get("to") if isinstance(personalization, dict) else None
        if not isinstance(to, list) or not to:
            raise SendGridError(
                400,
                "The to array is required for all personalization objects, and must "
                "have at least one email object with a valid email address.",
                f"personalizations.{index}.to",
                help_anchor="personalizations.to",
            )
        for position, recipient in enumerate(to):
            address = recipient.get("email") if isinstance(recipient, dict) else None
            if not isinstance(address, str) or not _EMAIL.match(address):
                raise SendGridError(
                    400,
                    "Does not contain a valid address.",
                    f"personalizations.{index}.to.{position}.email",
                    help_anchor="personalizations.to",
                )
        for name, value in (personalization.get("custom_args") or {}).items():
            if not isinstance(value, str):
                raise SendGridError(
                    400,
                    f"Invalid type. Expected: string, given: {type(value).__name__}.",
                    f"personalizations.{index}.custom_args.{name}",
                    help_anchor="personalizations.custom_args",
                )
    sender = body.get("from")
    address = sender.get("email") if isinstance(sender, dict) else None
    if not isinstance(address, str) or not _EMAIL.match(address):
        raise SendGridError(
            400,
            "The from object must be provided for every email send. It is an object that "
            "requires the email parameter, but may also contain a name parameter.",
            "from.email" if isinstance(sender, dict) else "from",
            help_anchor="from",
        )
    template_id = body.get("template_id")
    if (
        template_id is not None
        and (not isinstance(template_id, str) or not template_id.startswith("d-"))
        and any("dynamic_template_data" in p for p in personalizations)
    ):
        raise SendGridError(
            400,
            "Dynamic template data is only available for dynamic templates (d-…).",
            "personalizations.0.dynamic_template_data",
            help_anchor="personalizations.dynamic_template_data",
        )
    if template_id is None:
        subject = body.get("subject")
        has_subject = (isinstance(subject, str) and subject.strip() != "") or all(
            isinstance(p.get("subject"), str) and p["subject"] for p in personalizations
        )
        if not has_subject:
            raise SendGridError(
                400,
                "The subject is required. You can get around this requirement if you "
                "use a template with a subject defined or if every personalization has a "
                "subject defined.",
                "subject",
            )
        if isinstance(subject, str) and len(subject) > MAX_SUBJECT_CHARS:
            raise SendGridError(400, "The subject is too long.", "subject")
        content = body.get("content")
        if not isinstance(content, list) or not content:
            raise SendGridError(
                400,
                "Unless a valid template_id is provided, the content parameter is "
                "required. There must be at least one defined content block. We typically "
                "suggest both text/plain and text/html blocks are included, but only one "
                "block is required.",
                "content",
            )
        types = []
        for index, block in enumerate(content):
            value = block.get("value") if isinstance(block, dict) else None
            if not isinstance(value, str) or not value:
                raise SendGridError(
                    400,
                    "The content value must be a string at least one character in length.",
                    f"content.{index}.value",
                    help_anchor="content.value",
                )
            types.append(block.get("type"))
        if "text/plain" in types and types[0] != "text/plain":
            raise SendGridError(
                400,
                "If present, text/plain content must be first, followed by text/html "
                "content, followed by any other content.",
                "content",
            )
    headers = body.get("headers") or {}
    for name, value in headers.items():
        if name.lower() in RESERVED_HEADERS:
            raise SendGridError(
                400,
                f"The header {name} is a reserved header and cannot be set.",
                "headers",
            )
        if not isinstance(value, str):
            raise SendGridError(
                400, "Header values must be strings.", f"headers.{name}", help_anchor="headers"
            )


@asynccontextmanager
async def running_fake_sendgrid(
    api_key: str, signing_key: ec.EllipticCurvePrivateKey | None = None
) -> AsyncIterator[FakeSendGrid]:
    """Serve a fresh `FakeSendGrid` on 127.0.0.1 until the block ends."""
    sock, base_url = bind_local_socket()
    fake = FakeSendGrid(base_url, api_key, signing_key or ec.generate_private_key(ec.SECP256R1()))
    async with serving_in_thread(fake, sock, name="fake-sendgrid", lifespan="off"):
        yield fake
