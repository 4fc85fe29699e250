"""A stateful fake of Twilio's Programmable Messaging API and of its status callbacks.

`running_fake_twilio` serves it on a free port of 127.0.0.1 (uvicorn in a thread, as the
other fakes):

    async with running_fake_twilio(ACCOUNT_SID, AUTH_TOKEN) as fake:
        fake.add_number("+15005550006")
        ...send through the provider with base_url=fake.url...
        [message] = fake.messages.values()
        await fake.report(message["sid"], "delivered", via=http)

Endpoints: `POST /2010-04-01/Accounts/{AccountSid}/Messages.json` (form-encoded; 201 with
the Message resource) and `GET /2010-04-01/Accounts/{AccountSid}.json`. HTTP Basic
authenticates with the Account SID and Auth Token, or with an API key added by
`add_api_key`; a request for another account than the credentials' is refused. Parameters
are checked as Twilio does, each error in Twilio's `{"code", "message", "more_info",
"status"}` shape: To (21604, 21211), From or MessagingServiceSid (21603, 21606, 21701),
Body (21602, 21617), StatusCallback (21609), recipients who replied STOP (21610, see
`opt_out`). A sliding one-second rate limit and `rate_limit_next` answer 429 (20429).

`report` posts a status callback for a sent message to its StatusCallback, form-encoded
and signed with `X-Twilio-Signature` by the official `twilio` library's
`RequestValidator`, exactly as Twilio signs it.
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
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from contextlib import asynccontextmanager, suppress
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx
from starlette.requests import Request
from starlette.responses import Response
from twilio.request_validator import RequestValidator

from tests.support_server import bind_local_socket, serving_in_thread

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

API_VERSION = "2010-04-01"
MAX_BODY_CHARS = 1600
_E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
MESSAGE_PARAMS = frozenset(
    {
        "To",
        "From",
        "MessagingServiceSid",
        "Body",
        "StatusCallback",
        "ApplicationSid",
        "MaxPrice",
        "ProvideFeedback",
        "Attempt",
        "ValidityPeriod",
        "ForceDelivery",
        "ContentRetention",
        "AddressRetention",
        "SmartEncoded",
        "PersistentAction",
        "ShortenUrls",
        "ScheduleType",
        "SendAt",
        "SendAsMms",
        "ContentSid",
        "ContentVariables",
        "RiskCheck",
        "MediaUrl",
    }
)


def twilio_sid(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


class TwilioError(Exception):
    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.body = {
            "code": code,
            "message": message,
            "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status,
        }


class FakeTwilio:
    """The fake's state, programming and what it has seen; safe to use from any thread."""

    def __init__(self, url: str, account_sid: str, auth_token: str) -> None:
        self.url = url
        self.account_sid = account_sid
        self.auth_token = auth_token
        self._lock = threading.Lock()
        self._api_keys: dict[str, str] = {}
        self._numbers: set[str] = set()
        self._services: set[str] = set()
        self._opted_out: set[str] = set()
        self._messages: dict[str, dict[str, Any]] = {}
        self._requests: list[tuple[str, str, dict[str, str]]] = []
        self._rate_limited_next = 0
        self._rate_limit: float | None = None
        self._accepted_at: deque[float] = deque()
        self._failures: deque[int] = deque()
        self.callbacks: list[httpx.Response] = []

    # ------------------------------------------------------------ programming

    def add_number(self, number: str) -> None:
        """Make `number` one of the account's SMS-capable numbers."""
        with self._lock:
            self._numbers.add(number)

    def add_messaging_service(self) -> str:
        sid = twilio_sid("MG")
        with self._lock:
            self._services.add(sid)
        return sid

    def add_api_key(self) -> tuple[str, str]:
        """A new API key of the account: (its SID, its secret)."""
        sid, secret = twilio_sid("SK"), secrets.token_urlsafe(24)
        with self._lock:
            self._api_keys[sid] = secret
        return sid, secret

    def opt_out(self, number: str) -> None:
        """The recipient replied STOP: messages to it are refused with 21610."""
        with self._lock:
            self._opted_out.add(number)

    def fail_next(self, n: int, status: int = 500) -> None:
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
    def messages(self) -> dict[str, dict[str, Any]]:
        """Every accepted message by SID (a copy), as the API would show it."""
        with self._lock:
            return copy.deepcopy(self._messages)

    @property
    def requests(self) -> list[tuple[str, str, dict[str, str]]]:
        with self._lock:
            return list(self._requests)

    # ------------------------------------------------------------ status callbacks

    def callback(
        self, sid: str, status: str, *, error_code: int | None = None
    ) -> tuple[str, bytes, dict[str, str]]:
        """The URL, body and headers of the status callback Twilio would post for the
        message `sid` reaching `status`; the message takes that status."""
        with self._lock:
            message = self._messages[sid]
            message["status"] = status
            message["error_code"] = error_code
            address = message["status_callback"]
        assert address, "the message was sent without a StatusCallback"
        params = {
            "AccountSid": self.account_sid,
            "ApiVersion": API_VERSION,
            "From": message["from"],
            "MessageSid": sid,
            "MessageStatus": status,
            "SmsSid": sid,
            "SmsStatus": status,
            "To": message["to"],
        }
        if message["messaging_service_sid"]:
            params["MessagingServiceSid"] = message["messaging_service_sid"]
        if error_code is not None:
            params["ErrorCode"] = str(error_code)
        if status == "delivered":
            params["RawDlrDoneDate"] = time.strftime("%y%m%d%H%M", time.gmtime())
        signature = RequestValidator(self.auth_token).compute_signature(address, params)
        headers = {
            "Content-Type": "application/x-www-form-urlencoded; charset=utf-8",
            "User-Agent": "TwilioProxy/1.1",
            "X-Twilio-Signature": signature,
            "I-Twilio-Idempotency-Token": secrets.token_hex(16),
        }
        return address, urlencode(params).encode(), headers

    async def report(
        self, sid: str, status: str, *, via: httpx.AsyncClient, error_code: int | None = None
    ) -> httpx.Response:
        """Post the status callback of `sid` reaching `status` through `via`."""
        address, body, headers = self.callback(sid, status, error_code=error_code)
        response = await via.post(address, content=body, headers=headers)
        self.callbacks.append(response)
        return response

    # ------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        request = Request(scope, receive)
        body = await request.body()
        headers = {name.lower(): value for name, value in request.headers.items()}
        with self._lock:
            self._requests.append((request.method, request.url.path, headers))
        try:
            self._admit(headers, request.url.path)
            status, payload = self._route(request.method, request.url.path, body)
        except TwilioError as error:
            status, payload = error.status, error.body
        response = Response(
            content=json.dumps(payload).encode(),
            status_code=status,
            media_type="application/json",
            headers={"twilio-request-id": twilio_sid("RQ"), "twilio-concurrent-requests": "1"},
        )
        await response(scope, receive, send)

    def _admit(self, headers: Mapping[str, str], path: str) -> None:
        scheme, _, encoded = headers.get("authorization", "").partition(" ")
        user = password = ""
        if scheme.lower() == "basic":
            with suppress(ValueError):
                user, _, password = base64.b64decode(encoded).decode().partition(":")
        with self._lock:
            valid = (user == self.account_sid and password == self.auth_token) or (
                user in self._api_keys and self._api_keys[user] == password
            )
        if not valid:
            raise TwilioError(401, 20003, "Authentication Error - invalid username")
        if not path.startswith(f"/{API_VERSION}/Accounts/{self.account_sid}"):
            raise TwilioError(404, 20404, f"The requested resource {path} was not found")
        with self._lock:
            if self._failures:
                self._failures.popleft()
                raise TwilioError(500, 20500, "An internal server error has occurred")
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
            raise TwilioError(429, 20429, "Too Many Requests")

    def _route(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        account = f"/{API_VERSION}/Accounts/{self.account_sid}"
        if method == "GET" and path == f"{account}.json":
            return 200, self._account()
        if method == "POST" and path == f"{account}/Messages.json":
            return 201, self._create_message(parse_qsl(body.decode(), keep_blank_values=True))
        raise TwilioError(404, 20404, f"The requested resource {path} was not found")

    def _account(self) -> dict[str, Any]:
        now = formatdate(usegmt=True).replace("GMT", "+0000")
        return {
            "sid": self.account_sid,
            "owner_account_sid": self.account_sid,
            "friendly_name": "Memberhub Test Club",
            "status": "active",
            "type": "Full",
            "date_created": now,
            "date_updated": now,
            "uri": f"/{API_VERSION}/Accounts/{self.account_sid}.json",
        }

    def _create_message(self, pairs: list[tuple[str, str]]) -> dict[str, Any]:
        params = dict(pairs)
        for name in params:
            if name not in MESSAGE_PARAMS:
                raise TwilioError(400, 21612, f"Unknown parameter: {name}")
        to = params.get("To", "")
        if not to:
            raise TwilioError(400, 21604, "A 'To' phone number is required.")
        if not _E164.match(to):
            raise TwilioError(400, 21211, f"Invalid 'To' Phone Number: {to}")
        sender, service = params.get("From", ""), params.get("MessagingServiceSid", "")
        with self._lock:
            numbers, services, opted_out = (
                set(self._numbers),
                set(self._services),
                set(self._opted_out),
            )
        if not sender and not service:
            raise TwilioError(400, 21603, "A 'From' phone number is required.")
        if service and service not in services:
            raise TwilioError(400, 21701, f"The Messaging Service Sid {service} is invalid.")
        if sender and sender not in numbers:
            raise TwilioError(
                400,
                21606,
                f"The From phone number {sender} is not a valid, SMS-capable inbound phone "
                "number or short code for your account.",
            )
        text = params.get("Body", "")
        if not text and "MediaUrl" not in params and "ContentSid" not in params:
            raise TwilioError(400, 21602, "Message body is required.")
        if len(text) > MAX_BODY_CHARS:
            raise TwilioError(
                400, 21617, "The concatenated message body exceeds the 1600 character limit."
            )
        callback = params.get("StatusCallback")
        # Twilio wants a valid host name: no underscores there, anywhere else is fine.
        if callback is not None and not re.match(
            r"^https?://[A-Za-z0-9.-]+(:[0-9]+)?(/\S*)?$", callback
        ):
            raise TwilioError(400, 21609, f"The StatusCallback URL {callback} is not valid.")
        if to in opted_out:
            raise TwilioError(400, 21610, "Attempt to send to unsubscribed recipient")
        sid = twilio_sid("SM")
        now = formatdate(usegmt=True).replace("GMT", "+0000")
        message = {
            "account_sid": self.account_sid,
            "api_version": API_VERSION,
            "body": text,
            "date_created": now,
            "date_sent": None,
            "date_updated": now,
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": sender or None,
            "messaging_service_sid": service or None,
            "num_media": "0",
            "num_segments": "0" if service else str(max(1, -(-len(text) // 153))),
            "price": None,
            "price_unit": "USD",
            "sid": sid,
            "status": "accepted" if service else "queued",
            "subresource_uris": {
                "media": f"/{API_VERSION}/Accounts/{self.account_sid}/Messages/{sid}/Media.json"
            },
            "to": to,
            "uri": f"/{API_VERSION}/Accounts/{self.account_sid}/Messages/{sid}.json",
        }
        with self._lock:
            self._messages[sid] = {**copy.deepcopy(message), "status_callback": callback}
            if service:
                # The service picks a sender from its pool: any of the account's numbers.
                self._messages[sid]["from"] = min(numbers) if numbers else "+15005550006"
        return message


@asynccontextmanager
async def running_fake_twilio(account_sid: str, auth_token: str) -> AsyncIterator[FakeTwilio]:
    """Serve a fresh `FakeTwilio` on 127.0.0.1 until the block ends."""
    sock, base_url = bind_local_socket()
    fake = FakeTwilio(base_url, account_sid, auth_token)
    async with serving_in_thread(fake, sock, name="fake-twilio", lifespan="off"):
        yield fake
