"""A real SMTP server (aiosmtpd) on 127.0.0.1 that keeps what it receives.

It runs in a thread with its own event loop, so a test's worker, subprocess or bench can
send to it while the test waits. Recipients can be refused for good (550) or for now
(451), as a mail server refuses an unknown mailbox or greylists.

    with SmtpServer() as server:
        ... send to 127.0.0.1:server.port ...
        server.wait_for(lambda: len(server.messages) >= 1)
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from types import TracebackType
from typing import Any, Self

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session


@dataclass(frozen=True)
class Received:
    sender: str
    recipients: list[str]
    message: EmailMessage

    @property
    def reference(self) -> str | None:
        return self.message["X-Memberhub-Notification"]

    def part(self, subtype: str) -> str | None:
        body = self.message.get_body(preferencelist=(subtype,))
        return body.get_content() if body is not None else None


class _Handler:
    def __init__(self, server: SmtpServer) -> None:
        self.server = server

    async def handle_RCPT(
        self, _server: SMTP, _session: Session, envelope: Envelope, address: str, _options: Any
    ) -> str:
        if address in self.server.refused:
            return "550 5.1.1 No such mailbox here"
        if address in self.server.deferred:
            return "451 4.7.1 Try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, _server: SMTP, _session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or envelope.content or b""
        if isinstance(content, str):
            content = content.encode()
        message = email.message_from_bytes(content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        with self.server.lock:
            self.server.messages.append(
                Received(
                    sender=str(envelope.mail_from),
                    recipients=list(envelope.rcpt_tos),
                    message=message,
                )
            )
        return "250 Message accepted for delivery"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SmtpServer:
    """`credentials`: the (user, password) a client logging in must give (AUTH PLAIN or
    LOGIN, offered without TLS here); None offers no login. `tls`: serve implicit TLS
    with this context; `starttls`: require STARTTLS with it."""

    def __init__(
        self,
        credentials: tuple[str, str] | None = None,
        *,
        tls: ssl.SSLContext | None = None,
        starttls: ssl.SSLContext | None = None,
    ) -> None:
        self.port = _free_port()
        self.messages: list[Received] = []
        self.refused: set[str] = set()
        self.deferred: set[str] = set()
        self.lock = threading.Lock()
        self.credentials = credentials
        extra: dict[str, Any] = {}
        if credentials is not None:
            extra = {
                "authenticator": self._authenticate,
                "auth_require_tls": False,
            }
        if tls is not None:
            extra["ssl_context"] = tls  # implicit TLS, as on port 465
        if starttls is not None:
            extra.update(tls_context=starttls, require_starttls=True)
        self._controller = Controller(
            _Handler(self), hostname="127.0.0.1", port=self.port, decode_data=False, **extra
        )

    def _authenticate(
        self, _server: Any, _session: Any, _envelope: Any, _mechanism: str, data: Any
    ) -> AuthResult:
        if not isinstance(data, LoginPassword) or self.credentials is None:
            return AuthResult(success=False, handled=False)
        given = (data.login.decode(), data.password.decode())
        return AuthResult(success=given == self.credentials, handled=False)

    def __enter__(self) -> Self:
        self._controller.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._controller.stop()

    def received(self) -> list[Received]:
        with self.lock:
            return list(self.messages)

    def to(self, address: str) -> list[Received]:
        return [m for m in self.received() if address in m.recipients]

    async def wait_for(
        self,
        condition: Callable[[], bool],
        *,
        timeout: float = 30.0,  # noqa: ASYNC109 - a deadline for polling, with our own message
        message: str = "",
    ) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(message or "the SMTP server did not receive what was expected")
            await asyncio.sleep(0.05)
