"""Twilio: SMS through Programmable Messaging, and its signed status callbacks.

Each notification is one form-encoded `POST /2010-04-01/Accounts/{AccountSid}/Messages.json`
(To, Body, From or MessagingServiceSid, StatusCallback), authenticated with HTTP Basic:
the Account SID and Auth Token, or an API key's SID and secret. Twilio answers 201 with
the Message's `sid`.

Twilio posts each status change of the message (sent, delivered, undelivered, failed) to
the StatusCallback URL, form-encoded, signed with `X-Twilio-Signature`: base64 of the
HMAC-SHA1, keyed with the account's Auth Token, of the URL Twilio called followed by the
sorted parameters. The URL is part of the signed content, so `config.status_callback_url`
is both what Twilio is told to call and what the signature is checked against, whatever a
proxy in front of memberhub makes of it. The signature covers no time: a repeated callback
is caught by its event id (the message's SID and status).
"""

from __future__ import annotations

import base64
import json
import urllib.parse
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, StringConstraints, model_validator

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

E164 = Annotated[str, StringConstraints(strip_whitespace=True, pattern=r"^\+[1-9][0-9]{6,14}$")]
AccountSid = Annotated[str, StringConstraints(strip_whitespace=True, pattern=r"^AC[0-9a-f]{32}$")]
ServiceSid = Annotated[str, StringConstraints(strip_whitespace=True, pattern=r"^MG[0-9a-f]{32}$")]
ApiKeySid = Annotated[str, StringConstraints(strip_whitespace=True, pattern=r"^SK[0-9a-f]{32}$")]
Token = Annotated[str, StringConstraints(strip_whitespace=True, min_length=16, max_length=200)]
CallbackUrl = Annotated[
    str, StringConstraints(strip_whitespace=True, pattern=r"^https?://[^\s]+$", max_length=2048)
]

API_VERSION = "2010-04-01"
SIGNATURE_HEADER = "x-twilio-signature"
# Twilio's newer webhook signing names its algorithm here; without it, HMAC-SHA1.
SIGNATURE_SETTINGS_HEADER = "x-twilio-webhooks-signature-settings"
MAX_EVENT_ID_CHARS = 255
# Message statuses a callback reports on; queued, accepted, sending, scheduled and
# receiving are steps on the way and report nothing.
STATUSES: dict[str, str] = {
    "sent": "sent",
    "delivered": "delivered",
    "read": "delivered",
    "undelivered": "failed",
    "failed": "failed",
}
# Error codes saying the number will never take messages from us.
UNSUBSCRIBED_CODES = frozenset({"21610"})  # the recipient replied STOP
UNREACHABLE_CODES = frozenset(
    {
        "21211",  # invalid 'To' number
        "21614",  # not a mobile number
        "30005",  # unknown destination handset
        "30006",  # landline or unreachable carrier
    }
)


class TwilioConfig(BaseConfig):
    from_number: E164 | None = Field(
        default=None, description="The sending number (E.164), one of the account's numbers."
    )
    messaging_service_sid: ServiceSid | None = Field(
        default=None,
        description="A Messaging Service (MG…) to send from instead of one number: Twilio "
        "picks the sender from its pool.",
    )
    status_callback_url: CallbackUrl | None = Field(
        default=None,
        description="The integration's inbound URL as Twilio reaches it; Twilio reports "
        "each message's delivery there, signed over this exact URL. Without it, no "
        "delivery reports.",
    )

    @model_validator(mode="after")
    def _one_sender(self) -> TwilioConfig:
        if not self.from_number and not self.messaging_service_sid:
            raise ValueError("set from_number or messaging_service_sid: Twilio needs a sender")
        return self


class TwilioCredentials(BaseCredentials):
    account_sid: AccountSid = Field(description="The account's SID (AC…).")
    auth_token: Token | None = Field(
        default=None,
        description="The account's Auth Token: authenticates calls unless an API key is set, "
        "and verifies status callbacks.",
    )
    previous_auth_token: Token | None = Field(
        default=None,
        description="The secondary Auth Token, also accepted on callbacks while promoting it.",
    )
    api_key_sid: ApiKeySid | None = Field(default=None, description="An API key's SID (SK…).")
    api_key_secret: Token | None = None
    webhook_shared_key_secret: Token | None = Field(
        default=None,
        description="The secret of the SharedKey a Webhooks Rule signs the callback URL with: "
        "callbacks that carry X-Twilio-Webhooks-Signature-Settings are verified with it "
        "instead of the Auth Token.",
    )


class Twilio(Provider):
    name = "twilio"
    title = "Twilio"
    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {Capability.MESSAGES, Capability.EVENTS_SOURCE}
    )
    message_channels: ClassVar[frozenset[str]] = frozenset({"sms"})
    config_model = TwilioConfig
    credentials_model = TwilioCredentials
    base_url = "https://api.twilio.com"
    # Twilio limits an account's concurrent API requests (100 by default), not their rate;
    # messages beyond a sender's throughput wait in Twilio's queue. 429 (code 20429) when
    # crossed.
    policy: ClassVar[GatewayPolicy] = GatewayPolicy(rate_limit="100 per second")

    def validate(self, config: BaseConfig, credentials: BaseCredentials) -> None:
        assert isinstance(config, TwilioConfig)
        assert isinstance(credentials, TwilioCredentials)
        if bool(credentials.api_key_sid) != bool(credentials.api_key_secret):
            raise ValueError("Set both credentials.api_key_sid and credentials.api_key_secret.")
        if not credentials.auth_token and not credentials.api_key_sid:
            raise ValueError("Set credentials.auth_token, or an API key (api_key_sid and secret).")
        if config.status_callback_url and not credentials.auth_token:
            raise ValueError(
                "Status callbacks are signed with the Auth Token: set credentials.auth_token "
                "or remove config.status_callback_url."
            )

    def auth_headers(self, credentials: Mapping[str, Any]) -> dict[str, str]:
        if credentials.get("api_key_sid") and credentials.get("api_key_secret"):
            user, password = credentials["api_key_sid"], credentials["api_key_secret"]
        elif credentials.get("account_sid") and credentials.get("auth_token"):
            user, password = credentials["account_sid"], credentials["auth_token"]
        else:
            return {}
        basic = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        return {"Authorization": f"Basic {basic}"}

    async def check_connection(self, connection: Connection) -> str:
        account_sid = connection.credentials.get("account_sid")
        response = await connection.gateway.request(
            "GET", f"/{API_VERSION}/Accounts/{account_sid}.json"
        )
        if response.status_code != 200:
            raise ConnectionFailed(_error_message(response.status_code, response.text))
        account = response.json()
        if account.get("status") != "active":
            raise ConnectionFailed(f"the Twilio account is {account.get('status')}")
        return f"connected to Twilio account {account.get('friendly_name', account_sid)}"

    # ------------------------------------------------------------ messages

    async def send_message(self, connection: Connection, message: OutgoingMessage) -> SendResult:
        config = connection.config
        assert isinstance(config, TwilioConfig)
        if message.channel != "sms":
            raise SendRejected(f"Twilio sends SMS, not {message.channel}", permanent=True)
        form = {"To": message.to, "Body": message.text}
        if message.sender:
            form["From"] = message.sender
        elif config.messaging_service_sid:
            form["MessagingServiceSid"] = config.messaging_service_sid
        else:
            assert config.from_number is not None
            form["From"] = config.from_number
        if config.status_callback_url:
            form["StatusCallback"] = config.status_callback_url
        account_sid = connection.credentials.get("account_sid")
        response = await connection.gateway.request(
            "POST", f"/{API_VERSION}/Accounts/{account_sid}/Messages.json", data=form
        )
        if response.status_code in (200, 201):
            sid = response.json().get("sid")
            return SendResult(provider_message_id=sid if isinstance(sid, str) else None)
        raise SendRejected(
            _error_message(response.status_code, response.text),
            permanent=response.status_code != 408,
        )

    def delivery_reports(self, event_type: str, body: bytes) -> list[DeliveryReport]:
        fields = _form(body)
        status = STATUSES.get(fields.get("MessageStatus", ""))
        if status is None:
            return []
        code = fields.get("ErrorCode") or None
        if status == "failed" and code in UNSUBSCRIBED_CODES:
            status = "unsubscribed"
        elif status == "failed" and code in UNREACHABLE_CODES:
            status = "bounced"
        reason = None
        if code:
            message = fields.get("ErrorMessage")
            reason = f"Twilio error {code}" + (f": {message}" if message else "")
        return [
            DeliveryReport(
                status=status,  # type: ignore[arg-type]
                provider_message_id=fields.get("MessageSid") or fields.get("SmsSid") or None,
                recipient=fields.get("To") or None,
                reason=reason,
                occurred_at=_dlr_done(fields.get("RawDlrDoneDate")),
            )
        ]

    # ------------------------------------------------------------ events source

    def verify(
        self, request: InboundRequest, connection_secrets: Mapping[str, Any], config: BaseConfig
    ) -> None:
        assert isinstance(config, TwilioConfig)
        headers = {name.lower(): value for name, value in request.headers.items()}
        settings = headers.get(SIGNATURE_SETTINGS_HEADER)
        # A Webhooks Rule signs with its SharedKey's secret (and names the key and the
        # algorithm in the settings header); without one, Twilio signs with the Auth Token.
        names: tuple[str, ...]
        if settings is not None:
            names = ("webhook_shared_key_secret",)
            missing = (
                "credentials.webhook_shared_key_secret (the callback is signed by a Webhooks Rule)"
            )
        else:
            names = ("auth_token", "previous_auth_token")
            missing = "credentials.auth_token"
        secrets = [str(connection_secrets[name]) for name in names if connection_secrets.get(name)]
        if not secrets:
            raise signatures.SignatureInvalid(
                signatures.NO_MATCHING_SIGNATURE,
                f"the integration has no {missing} to verify with",
            )
        signatures.verify_twilio(
            url=_signed_url(config.status_callback_url, request.url),
            body=request.body,
            signature=headers.get(SIGNATURE_HEADER),
            secrets=secrets,
            algorithm=_algorithm(settings),
        )

    def identify(self, request: InboundRequest) -> InboundIdentity:
        fields = _form(request.body)
        sid = fields.get("MessageSid") or fields.get("SmsSid")
        status = fields.get("MessageStatus") or fields.get("SmsStatus")
        if not sid or not status:
            raise ValueError("the callback has no MessageSid or MessageStatus")
        event_id = f"{sid}:{status}"
        if len(event_id) > MAX_EVENT_ID_CHARS:
            raise ValueError("the message SID is longer than Twilio's SIDs are")
        return InboundIdentity(event_id=event_id, event_type=status[:MAX_EVENT_ID_CHARS])


def _dlr_done(value: str | None) -> datetime | None:
    """The carrier's delivery receipt time, `RawDlrDoneDate` (YYMMDDhhmm, UTC)."""
    if not value:
        return None
    try:
        return datetime.strptime(value, "%y%m%d%H%M").replace(tzinfo=UTC)
    except ValueError:
        return None


def _signed_url(configured: str | None, received: str) -> str:
    """The URL Twilio signed: the configured callback URL, with the query string of the
    request when the configured one has none of its own."""
    if configured is None:
        return received
    query = urllib.parse.urlsplit(received).query
    if query and "?" not in configured:
        return f"{configured}?{query}"
    return configured


def _algorithm(settings: str | None) -> Literal["sha1", "sha256"]:
    for part in (settings or "").split(","):
        name, _, value = part.partition("=")
        if name.strip() == "algorithm" and value.strip().upper() == "HMAC_SHA256":
            return "sha256"
    return "sha1"


def _form(body: bytes) -> dict[str, str]:
    try:
        return dict(urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True))
    except UnicodeDecodeError:
        return {}


def _error_message(status: int, text: str) -> str:
    """Twilio's `message` with its error `code`, or the start of the body."""
    try:
        error = json.loads(text)
        code, message = error.get("code"), error.get("message")
        if not message:
            raise ValueError
    except (ValueError, AttributeError):
        return f"Twilio answered {status}: {text[:200]}"
    return f"Twilio answered {status} (error {code}): {message}"
