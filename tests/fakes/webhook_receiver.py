"""A programmable receiver of outbound webhooks, for end-to-end tests.

`running_receiver` serves a real HTTP endpoint on a free port of 127.0.0.1, under uvicorn
in a thread with its own event loop, so the code under test can reach it from the test's
event loop, from other threads and from worker subprocesses alike:

    async with running_receiver() as receiver:
        receiver.set_secrets("crm", endpoint_secret)
        receiver.set_handler("crm", fail_times(2))
        ...point a webhook endpoint at receiver.url("crm") and trigger an event...
        await receiver.wait_for_count("crm", 1, timeout=5)
        [delivery] = [r for r in receiver.received("crm") if r.status == 200]
        assert delivery.verified

Every POST to `/hooks/{name}` is recorded as a `Received` when it arrives, with the status
its handler chose, before any `Reply.delay` is waited out: a reply that hangs longer than
the sender's timeout still shows in `received()` and `ids()`. `successful_ids()` and
`wait_for_count(successful=True)` count only 2xx replies that were actually sent, so a
hung reply whose sender gave up (or that the shutdown cut short) is never a success.

Signatures are checked with the official `standardwebhooks` library, which also refuses
timestamps more than five minutes from the real clock: a sender with a frozen clock fails
verification.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from standardwebhooks import Webhook

from tests.support_server import bind_local_socket, serving_in_thread

# Hung replies are cancelled this long after the receiver is asked to stop.
GRACEFUL_SHUTDOWN_SECONDS = 1
POLL_INTERVAL_SECONDS = 0.02

HOOKS_PREFIX = "/hooks/"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass(frozen=True)
class Reply:
    """How the receiver answers one request."""

    status: int = 200
    body: str = "ok"
    headers: dict[str, str] = field(default_factory=dict)
    # Waited out with asyncio.sleep in the server's loop: other requests are served meanwhile.
    delay: float = 0.0


@dataclass(frozen=True)
class Received:
    """One request to `/hooks/{path_name}`, as it arrived."""

    path_name: str
    webhook_id: str
    timestamp: str
    signature: str
    headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "
    body: bytes
    payload: Any  # the body parsed as JSON, or None when it is not JSON
    # None when no secrets are set for the name; else whether any secret verified it.
    verified: bool | None
    verified_with: tuple[int, ...]  # indexes into the secrets given to set_secrets
    status: int  # the status chosen for the reply; 0 in the view given to the handler
    at: float  # time.monotonic() when the request arrived


# (request, how many times its webhook id reached this name before, from 0) -> reply
Handler = Callable[[Received, int], Reply]


def always(reply: Reply) -> Handler:
    """Answer every request with `reply`."""
    return lambda _request, _previous: reply


def fail_times(n: int, status: int = 500) -> Handler:
    """Answer `status` to the first `n` receipts of each webhook id, then 200."""
    return _fail_ids_when(lambda _webhook_id: True, n, status)


def fail_ids(ids: set[str], times: int, status: int = 500) -> Handler:
    """Answer `status` to the first `times` receipts of the webhook ids in `ids`; else 200."""
    failing = frozenset(ids)
    return _fail_ids_when(failing.__contains__, times, status)


def _fail_ids_when(should_fail: Callable[[str], bool], times: int, status: int = 500) -> Handler:
    """Answer `status` to the first `times` receipts of the webhook ids `should_fail` picks."""

    def handler(request: Received, previous: int) -> Reply:
        if previous < times and should_fail(request.webhook_id):
            return Reply(status=status, body="failing on purpose")
        return Reply()

    return handler


def retry_after(seconds: float, status: int = 429, times: int = 1) -> Handler:
    """Answer `status` with `Retry-After: seconds` to the first `times` receipts of each id."""
    refusal = Reply(status=status, body="try later", headers={"retry-after": f"{seconds:g}"})

    def handler(_request: Received, previous: int) -> Reply:
        return refusal if previous < times else Reply()

    return handler


def hang(seconds: float) -> Handler:
    """Wait `seconds` before answering 200, holding the connection open meanwhile."""
    return always(Reply(delay=seconds))


def _default_handler(_request: Received, _previous: int) -> Reply:
    return Reply()


@dataclass
class _Record:
    received: Received
    answered: bool = False


class WebhookReceiver:
    """The receiver's programming and what it has received; safe to use from any thread.

    Build it with `running_receiver`. Configuration is per endpoint name and takes effect
    for requests arriving after the call.
    """

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self._lock = threading.Lock()
        self._secrets: dict[str, tuple[Webhook, ...]] = {}
        self._handlers: dict[str, Handler] = {}
        self._records: dict[str, list[_Record]] = {}
        self._receipts: dict[tuple[str, str], int] = {}

    def url(self, name: str) -> str:
        return f"{self.base_url}{HOOKS_PREFIX}{name}"

    def set_secrets(self, name: str, *secrets: str) -> None:
        """Verify requests to `name` against each of `secrets` (`whsec_…`); none: don't."""
        # Built here so that a malformed secret fails the test at this line.
        webhooks = tuple(Webhook(secret) for secret in secrets)
        with self._lock:
            if webhooks:
                self._secrets[name] = webhooks
            else:
                self._secrets.pop(name, None)

    def set_handler(self, name: str, handler: Handler | None) -> None:
        """Answer requests to `name` with `handler`; None restores the default, 200 "ok".

        The handler runs in the receiver's thread and must not block; use `Reply.delay`
        to answer late.
        """
        with self._lock:
            if handler is None:
                self._handlers.pop(name, None)
            else:
                self._handlers[name] = handler

    def received(self, name: str) -> list[Received]:
        """Every request to `name` so far, in arrival order, answered or not."""
        with self._lock:
            return [record.received for record in self._records.get(name, [])]

    def ids(self, name: str) -> list[str]:
        """The webhook id of every request to `name`, in arrival order, repeats included."""
        return [request.webhook_id for request in self.received(name)]

    def successful_ids(self, name: str) -> list[str]:
        """The webhook ids of the requests to `name` answered with a 2xx status."""
        with self._lock:
            return [
                record.received.webhook_id
                for record in self._records.get(name, [])
                if record.answered and 200 <= record.received.status < 300
            ]

    async def wait_for(
        self,
        predicate: Callable[[], bool],
        timeout: float,  # noqa: ASYNC109 - a deadline for polling, with our own message
        message: str = "",
    ) -> None:
        """Poll `predicate` until it holds; AssertionError with `message` after `timeout`."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() >= deadline:
                raise AssertionError(message or f"condition not met within {timeout}s")
            await asyncio.sleep(POLL_INTERVAL_SECONDS)

    async def wait_for_count(
        self,
        name: str,
        count: int,
        timeout: float,  # noqa: ASYNC109 - see wait_for
        *,
        successful: bool = True,
    ) -> None:
        """Wait until `name` has at least `count` requests (only 2xx replies if `successful`).

        Requests are counted, not distinct ids: a webhook delivered twice counts twice.
        """

        def seen() -> int:
            return len(self.successful_ids(name) if successful else self.received(name))

        try:
            await self.wait_for(lambda: seen() >= count, timeout)
        except AssertionError:
            kind = "successful requests" if successful else "requests"
            arrivals = [(r.webhook_id, r.status) for r in self.received(name)]
            raise AssertionError(
                f"expected {count} {kind} at {name!r} within {timeout}s, saw {seen()}; "
                f"(webhook id, status) of every arrival: {arrivals}"
            ) from None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI application: one request, start to finish, in the server's loop."""
        if scope["type"] != "http":
            return
        arrived_at = time.monotonic()
        path: str = scope["path"]
        name = path.removeprefix(HOOKS_PREFIX)
        if not path.startswith(HOOKS_PREFIX) or not name or "/" in name:
            await _respond(send, Reply(status=404, body="not found"))
            return
        if scope["method"] != "POST":
            await _respond(send, Reply(status=405, body="only POST", headers={"allow": "POST"}))
            return
        headers = _header_dict(scope["headers"])
        body = await _read_body(receive)
        if body is None:
            return  # the sender went away mid-request: nothing arrived
        record, reply = self._record_arrival(name, headers, body, arrived_at)
        if reply.delay > 0:
            try:
                if await _client_left_within(receive, reply.delay):
                    return
            except asyncio.CancelledError:
                # The receiver is stopping and cancels replies that still hang. Answering
                # 503 ourselves, rather than letting the cancellation through, spares the
                # log uvicorn's "Exception in ASGI application" (it would answer 500).
                await _respond(send, Reply(status=503, body="receiver stopped"))
                return
        await _respond(send, reply)
        with self._lock:
            record.answered = True

    def _record_arrival(
        self, name: str, headers: dict[str, str], body: bytes, arrived_at: float
    ) -> tuple[_Record, Reply]:
        webhook_id = headers.get("webhook-id", "")
        with self._lock:
            webhooks = self._secrets.get(name, ())
            handler = self._handlers.get(name, _default_handler)
            previous = self._receipts.get((name, webhook_id), 0)
            self._receipts[name, webhook_id] = previous + 1
        verified_with = tuple(
            index for index, webhook in enumerate(webhooks) if _verifies(webhook, body, headers)
        )
        request = Received(
            path_name=name,
            webhook_id=webhook_id,
            timestamp=headers.get("webhook-timestamp", ""),
            signature=headers.get("webhook-signature", ""),
            headers=headers,
            body=body,
            payload=_parse_json(body),
            verified=bool(verified_with) if webhooks else None,
            verified_with=verified_with,
            status=0,
            at=arrived_at,
        )
        try:
            reply = handler(request, previous)
        except Exception as exc:
            # Answer rather than drop the connection, so a broken handler shows up as a
            # 500 in received() instead of as a mysterious network error in the sender.
            reply = Reply(status=500, body=f"handler raised {exc!r}")
        record = _Record(replace(request, status=reply.status))
        with self._lock:
            self._records.setdefault(name, []).append(record)
        return record, reply


def _verifies(webhook: Webhook, body: bytes, headers: dict[str, str]) -> bool:
    try:
        webhook.verify(body, headers, json_parse=False)
    except Exception:
        # The library raises WebhookVerificationError for wrong signatures, but ValueError
        # and binascii.Error for malformed ones; to a receiver both are "not verified".
        return False
    return True


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _header_dict(raw_headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for raw_name, raw_value in raw_headers:
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


async def _read_body(receive: Receive) -> bytes | None:
    """The whole body; None when the client disconnected before sending all of it (a
    sender killed mid-request), as a real receiver would drop such a request."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _client_left_within(receive: Receive, seconds: float) -> bool:
    """Wait `seconds`; True as soon as the client disconnects meanwhile."""

    async def disconnected() -> None:
        # Once the body is read, uvicorn's receive() returns only at disconnection.
        while (await receive())["type"] != "http.disconnect":
            pass

    try:
        await asyncio.wait_for(disconnected(), seconds)
    except TimeoutError:
        return False
    return True


async def _respond(send: Send, reply: Reply) -> None:
    body = reply.body.encode()
    headers = {name.lower(): value for name, value in reply.headers.items()}
    headers.setdefault("content-type", "text/plain; charset=utf-8")
    headers["content-length"] = str(len(body))
    await send(
        {
            "type": "http.response.start",
            "status": reply.status,
            "headers": [
                (name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


@asynccontextmanager
async def running_receiver() -> AsyncIterator[WebhookReceiver]:
    """Serve a fresh `WebhookReceiver` on 127.0.0.1 until the block ends.

    Leaving the block stops the server: replies still hanging after
    GRACEFUL_SHUTDOWN_SECONDS are cut short with a 503 and never count as successful.
    """
    sock, base_url = bind_local_socket()
    receiver = WebhookReceiver(base_url)
    async with serving_in_thread(
        receiver,
        sock,
        name="webhook-receiver",
        lifespan="off",
        graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    ):
        yield receiver
