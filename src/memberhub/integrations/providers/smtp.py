"""Any SMTP server as the email channel of notifications (`aiosmtplib`).

The gateway is an HTTP client; an SMTP session goes through `Gateway.exchange`, which
gives it the same rate limit, circuit breaker, metrics and payload-log record as an HTTP
call. Retries differ on purpose: a session is retried in place only when nothing was
sent (the connection, the greeting or the login failed), since SMTP has no idempotency
key and a message the server may have accepted must not be sent again. Every other
failure goes back to the notification's own retry schedule (`notifications/sending.py`).

Replies map as HTTP statuses do: a 5xx reply to the sender, a recipient or the data is the
server's final refusal (`SendRejected(permanent=True)`, like a 4xx); a 4xx reply is
temporary (like a 5xx or a 429) and is retried on schedule. A failed login is permanent
too: resending cannot fix the credentials.

Sessions are kept open between messages (up to `max_connections` per integration) and
reused, as HTTP keeps connections alive; one found closed by the server before the message
went out is replaced transparently.

The host is held to the outbound URL policy as every integration's URLs are: refused when
saved if it is, or resolves to, a private, loopback or otherwise not globally routable
address outside `MEMBERHUB_WEBHOOK_ALLOWED_NETWORKS` (a relay on the organisation's own
network is allowed by adding its network there); and resolved and checked again before
each connection, which goes to the very address checked (the host name still names the
server for TLS), so a DNS answer that changes in between (rebinding) cannot reach
elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import secrets
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.header import Header
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from typing import Annotated, Any, ClassVar, Literal

import aiosmtplib
from pydantic import EmailStr, Field, StringConstraints

from memberhub.integrations.gateway import ExchangeNotSent, ExchangeRefused, GatewayPolicy
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
from memberhub.webhooks.ssrf import DestinationRefused, UrlPolicy, allowed_addresses

# Where a connection without a policy of its own may go: globally routable addresses only.
_STRICT_POLICY = UrlPolicy(allow_http=False, allowed_networks=())

HostName = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=253, pattern=r"^\S+$")
]
Secret = Annotated[str, StringConstraints(min_length=1, max_length=2000)]
# Servers close idle sessions after a few minutes (RFC 5321 asks at least 5); reuse only
# those younger than this.
IDLE_REUSE_SECONDS = 60.0


class SmtpConfig(BaseConfig):
    host: HostName = Field(description="The SMTP server.")
    port: int = Field(default=587, ge=1, le=65535)
    security: Literal["starttls", "tls", "none"] = Field(
        default="starttls",
        description="starttls: upgrade a plain connection (port 587); tls: implicit TLS "
        "(port 465); none: plain text (a local relay only).",
    )
    from_address: EmailStr = Field(description="The sender of every message.")
    from_name: str | None = Field(default=None, max_length=200)
    ca_certificate: str | None = Field(
        default=None,
        max_length=20_000,
        description="A PEM certificate to trust for the server's TLS certificate, for a "
        "private relay with its own CA; default: the system's trusted CAs.",
    )
    timeout_seconds: float = Field(default=30.0, gt=0, le=300)
    max_connections: int = Field(
        default=4, ge=1, le=50, description="Sessions kept open and used at once."
    )


class SmtpCredentials(BaseCredentials):
    username: Secret | None = None
    password: Secret | None = None


@dataclass
class _Session:
    client: aiosmtplib.SMTP
    last_used: float


@dataclass
class _Pool:
    """The open sessions of one integration's settings."""

    key: tuple[Any, ...]
    # Sessions belong to the event loop that opened them.
    loop: asyncio.AbstractEventLoop
    slots: asyncio.Semaphore
    idle: list[_Session] = field(default_factory=list)


class Smtp(Provider):
    """Email through any SMTP server: multipart text and HTML, headers passed through."""

    name = "smtp"
    title = "SMTP"
    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.MESSAGES})
    config_model: ClassVar[type[BaseConfig]] = SmtpConfig
    credentials_model = SmtpCredentials
    # Mail relays take tens of messages a second; the pool caps concurrency, not this.
    policy: ClassVar[GatewayPolicy] = GatewayPolicy(
        timeout=30.0, max_attempts=3, rate_limit="100 per second"
    )
    message_channels: ClassVar[frozenset[str]] = frozenset({"email"})

    def __init__(self) -> None:
        self._pools: dict[str, _Pool] = {}

    def validate(self, config: BaseConfig, credentials: BaseCredentials) -> None:
        assert isinstance(config, SmtpConfig)
        assert isinstance(credentials, SmtpCredentials)
        if config.ca_certificate is not None:
            if config.security == "none":
                raise ValueError("config.ca_certificate needs security starttls or tls")
            try:
                ssl.create_default_context(cadata=config.ca_certificate)
            except (ssl.SSLError, ValueError):
                raise ValueError("config.ca_certificate is not a PEM certificate") from None
        if (credentials.username is None) != (credentials.password is None):
            raise ValueError("credentials.username and credentials.password go together")

    def outbound_hosts(self, config: BaseConfig) -> dict[str, tuple[str, int]]:
        assert isinstance(config, SmtpConfig)
        return {"config.host": (config.host, config.port)}

    async def check_connection(self, connection: Connection) -> str:
        config = _config(connection)
        client: aiosmtplib.SMTP | None = None
        try:
            client = await _connect(config, _policy(connection))
            await _login(client, connection.credentials)
            await client.quit()
        except (aiosmtplib.SMTPException, OSError, DestinationRefused) as exc:
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()
            raise ConnectionFailed(f"{config.host}:{config.port}: {exc}") from None
        return f"{config.host}:{config.port} accepted the session"

    async def send_message(self, connection: Connection, message: OutgoingMessage) -> SendResult:
        if message.channel != "email":
            raise SendRejected(f"smtp sends email, not {message.channel}", permanent=True)
        config = _config(connection)
        mail = build_email(config, message)
        message_id = mail["Message-ID"]

        async def send() -> None:
            await self._send(connection, config, mail)

        try:
            await connection.gateway.exchange(
                "SMTP",
                f"smtp://{config.host}:{config.port}",
                send,
                request_headers={"To": message.to, "Subject": mail["Subject"] or ""},
                request_summary=f"message {message.reference} to {message.to}",
            )
        except ExchangeRefused as exc:
            # 4xx: this message, for now; retried on schedule.
            permanent = exc.status is None or exc.status >= 500
            raise SendRejected(str(exc), permanent=permanent) from None
        return SendResult(provider_message_id=message_id)

    def delivery_reports(self, event_type: str, body: bytes) -> list[DeliveryReport]:
        return []  # SMTP has no callbacks; bounces arrive as mail

    async def aclose(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            for session in pool.idle:
                with contextlib.suppress(Exception):
                    session.client.close()

    # ------------------------------------------------------------ sessions

    def _pool(self, connection: Connection, config: SmtpConfig) -> _Pool:
        key = (
            config.host,
            config.port,
            config.security,
            config.ca_certificate,
            config.max_connections,
            connection.credentials.get("username"),
            connection.credentials.get("password"),
        )
        loop = asyncio.get_running_loop()
        pool = self._pools.get(connection.integration_id)
        if pool is None or pool.key != key or pool.loop is not loop:
            if pool is not None and pool.loop is loop:
                for session in pool.idle:
                    with contextlib.suppress(Exception):
                        session.client.close()
            pool = self._pools[connection.integration_id] = _Pool(
                key=key, loop=loop, slots=asyncio.Semaphore(config.max_connections)
            )
        return pool

    async def _send(self, connection: Connection, config: SmtpConfig, mail: Message) -> None:
        pool = self._pool(connection, config)
        loop = asyncio.get_running_loop()
        async with pool.slots:
            session = None
            while pool.idle:
                candidate = pool.idle.pop()
                if candidate.client.is_connected and (
                    loop.time() - candidate.last_used < IDLE_REUSE_SECONDS
                ):
                    session = candidate
                    break
                with contextlib.suppress(Exception):
                    candidate.client.close()
            if session is not None:
                try:
                    await _deliver(session.client, mail)
                except _Stale:
                    session = None  # closed by the server before the message: a fresh one
                else:
                    session.last_used = loop.time()
                    pool.idle.append(session)
                    return
            client = await _open(config, connection.credentials, _policy(connection))
            try:
                await _deliver(client, mail)
            except _Stale as exc:
                raise ExchangeNotSent(str(exc)) from None
            except BaseException:
                with contextlib.suppress(Exception):
                    client.close()
                raise
            pool.idle.append(_Session(client=client, last_used=loop.time()))


class _Stale(Exception):
    """The server had closed the session before the message went out."""


def _config(connection: Connection) -> SmtpConfig:
    config = connection.config
    assert isinstance(config, SmtpConfig)
    return config


def _policy(connection: Connection) -> UrlPolicy:
    return connection.url_policy if connection.url_policy is not None else _STRICT_POLICY


async def _connect(config: SmtpConfig, policy: UrlPolicy) -> aiosmtplib.SMTP:
    """A session with the server, greeting read: to the addresses its host resolves to
    now, each checked against `policy` (DestinationRefused when one may not be reached),
    tried in order. The client gets the connected socket and the host name, which TLS
    (implicit or STARTTLS) checks the certificate against."""
    addresses = await allowed_addresses(config.host, config.port, policy)
    loop = asyncio.get_running_loop()
    error: Exception | None = None
    for address in addresses:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        client = None
        try:
            async with asyncio.timeout(config.timeout_seconds):
                await loop.sock_connect(sock, (address, config.port))
            client = _client(config, sock)
            await client.connect()
        except (aiosmtplib.SMTPException, OSError) as exc:
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()
            sock.close()
            error = (
                exc
                if not isinstance(exc, TimeoutError)
                else TimeoutError(f"timed out connecting to {address} port {config.port}")
            )
            continue
        return client
    assert error is not None  # `allowed_addresses` never returns an empty list
    raise error


def _client(config: SmtpConfig, sock: socket.socket) -> aiosmtplib.SMTP:
    return aiosmtplib.SMTP(
        hostname=config.host,
        sock=sock,
        use_tls=config.security == "tls",
        start_tls=config.security == "starttls",
        timeout=config.timeout_seconds,
        tls_context=_tls_context(config.ca_certificate),
    )


@functools.lru_cache(maxsize=32)
def _tls_context(ca_certificate: str | None) -> ssl.SSLContext | None:
    """A context trusting `ca_certificate` (certificate and host name still checked); None
    lets the client use the system's trusted CAs."""
    if ca_certificate is None:
        return None
    return ssl.create_default_context(cadata=ca_certificate)


async def _login(client: aiosmtplib.SMTP, credentials: Mapping[str, Any]) -> None:
    username, password = credentials.get("username"), credentials.get("password")
    if username and password:
        await client.login(str(username), str(password))


async def _open(
    config: SmtpConfig, credentials: Mapping[str, Any], policy: UrlPolicy
) -> aiosmtplib.SMTP:
    """A connected, authenticated session; ExchangeNotSent when none could be made,
    ExchangeRefused when the server refused the login. DestinationRefused (the host now
    resolves where it may not go) passes through: the gateway records it as a failure and
    the notification is retried on its schedule, not in place."""
    try:
        client = await _connect(config, policy)
    except (aiosmtplib.SMTPException, OSError) as exc:
        raise ExchangeNotSent(f"no session with {config.host}:{config.port}: {exc}") from None
    try:
        await _login(client, credentials)
    except aiosmtplib.SMTPAuthenticationError as exc:
        client.close()
        raise ExchangeRefused(f"login refused: {exc.code} {exc.message}", status=exc.code) from None
    except (aiosmtplib.SMTPException, OSError) as exc:
        with contextlib.suppress(Exception):
            client.close()
        raise ExchangeNotSent(f"login failed: {exc}") from None
    return client


async def _deliver(client: aiosmtplib.SMTP, mail: Message) -> None:
    """Send on an open session. The server refusing this message (its recipient or its
    data) raises ExchangeRefused with the code: 5xx for good, 4xx for now (a greylisted or
    full mailbox; retried on schedule), neither a fault of the server. A 4xx refusal of the
    sender is the relay's own trouble: a plain error, counted against its health. A session
    found closed before MAIL FROM was answered raises _Stale."""
    try:
        await client.send_message(mail)
    except aiosmtplib.SMTPRecipientsRefused as exc:
        refusal = exc.recipients[0] if exc.recipients else None
        code = refusal.code if refusal is not None else 550
        text = refusal.message if refusal is not None else str(exc)
        if code >= 500:
            raise ExchangeRefused(f"{code} {text}", status=code) from None
        raise ExchangeRefused(f"recipient deferred: {code} {text}", status=code) from None
    except aiosmtplib.SMTPSenderRefused as exc:
        if exc.code >= 500:
            raise ExchangeRefused(f"{exc.code} {exc.message}", status=exc.code) from None
        raise RuntimeError(f"sender deferred: {exc.code} {exc.message}") from None
    except aiosmtplib.SMTPDataError as exc:
        if exc.code >= 500:
            raise ExchangeRefused(f"{exc.code} {exc.message}", status=exc.code) from None
        raise ExchangeRefused(
            f"message deferred: {exc.code} {exc.message}", status=exc.code
        ) from None
    except aiosmtplib.SMTPServerDisconnected as exc:
        raise _Stale(str(exc)) from None
    except aiosmtplib.SMTPResponseException as exc:
        if exc.code == 421:  # the server is closing the session (idle or shutting down)
            raise _Stale(f"{exc.code} {exc.message}") from None
        raise


def build_email(config: SmtpConfig, message: OutgoingMessage) -> Message:
    """The MIME message: text, or text and HTML as multipart/alternative, with the
    message's headers (List-Unsubscribe and the like) passed through.

    Built with the `email.mime` classes (the compat32 policy): they make the same MIME as
    `EmailMessage` at a fraction of its header-parsing cost, which dominated a send to a
    local relay. Non-ASCII header values are RFC 2047 encoded.
    """
    text = MIMEText(message.text, "plain", "utf-8")
    mail: Message
    if message.html is not None:
        mail = MIMEMultipart("alternative")
        mail.attach(text)
        mail.attach(MIMEText(message.html, "html", "utf-8"))
    else:
        mail = text
    sender = message.sender or str(config.from_address)
    name = config.from_name or ""
    mail["From"] = email.utils.formataddr((name, sender), charset="utf-8")
    mail["To"] = message.to
    mail["Subject"] = _header(message.subject or "")
    mail["Date"] = email.utils.formatdate(localtime=False)
    domain = sender.rpartition("@")[2] or "memberhub.local"
    # Our notification id, made unique per attempt: a resend is a new message to servers.
    mail["Message-ID"] = f"<{message.reference}.{secrets.token_hex(4)}@{domain}>"
    mail["X-Memberhub-Notification"] = message.reference
    for header, value in message.headers.items():
        mail[header] = _header(value)
    return mail


def _header(value: str) -> str:
    return value if value.isascii() else Header(value, "utf-8").encode()
