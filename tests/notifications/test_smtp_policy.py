"""The SMTP host is held to the outbound address policy: refused when saved if it is, or
resolves to, an address that is not globally routable (unless its network is allowed), and
checked again at every connection, which goes to the address checked (DNS rebinding)."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import func, select

from memberhub.app import create_app
from memberhub.integrations.hub import IntegrationHub
from memberhub.integrations.models import Integration
from memberhub.kit.crypto import SecretBox
from memberhub.kit.db import Database
from memberhub.notifications.planning import LinkSettings, plan_notifications
from memberhub.notifications.sending import NotificationSender
from memberhub.settings import Settings
from memberhub.webhooks import ssrf
from tests.fakes.smtp_server import SmtpServer
from tests.notifications.conftest import FROM, consenting_member, deliver, notifications
from tests.support import ApiClient

ApiFactory = Callable[..., Awaitable[ApiClient]]
RELAY = "relay.club.test"


@pytest.fixture
async def api_with(settings: Settings, admin_key: str) -> AsyncIterator[ApiFactory]:
    """An admin client of an app running with setting overrides (same database)."""
    async with contextlib.AsyncExitStack() as stack:

        async def build(**overrides: Any) -> ApiClient:
            application = create_app(settings.model_copy(update=overrides))
            stack.push_async_callback(application.state.db.dispose)
            client = await stack.enter_async_context(
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=application), base_url="http://testserver"
                )
            )
            return ApiClient(client, admin_key)

        yield build


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """What host names resolve to, as the tests say (changed mid-test for rebinding)."""
    answers: dict[str, list[str]] = {}

    async def resolve(host: str, port: int) -> list[str]:
        if host not in answers:
            raise OSError(f"unknown host {host}")
        return list(answers[host])

    monkeypatch.setattr(ssrf, "resolve", resolve)
    return answers


def _smtp(host: str, port: int = 2525, **config: Any) -> dict[str, Any]:
    return {
        "provider": "smtp",
        "name": "Mail relay",
        "config": {"host": host, "port": port, "security": "none", "from_address": FROM, **config},
    }


async def _integration_count(db: Database) -> int:
    async with db.transaction(read_only=True) as session:
        return int(await session.scalar(select(func.count()).select_from(Integration)) or 0)


async def test_an_smtp_host_at_an_internal_address_is_refused_when_saved(
    api_with: ApiFactory, db: Database, dns: dict[str, list[str]]
) -> None:
    strict = await api_with(webhook_allowed_networks="")
    dns[RELAY] = ["10.20.30.40"]

    for host, reason, shown in [
        ("127.0.0.1", "loopback", "127.0.0.1"),
        ("10.1.2.3", "private", "10.1.2.3"),
        ("169.254.169.254", "link-local", "169.254.169.254"),
        ("::1", "loopback", "::1"),
        (RELAY, "private", "10.20.30.40"),  # a name resolving to a private address
    ]:
        response = await strict.post("/api/v1/integrations", _smtp(host))

        assert response.status_code == 422, f"{host}: {response.text}"
        error = response.json()["error"]
        assert error["code"] == "INTEGRATION_URL_REFUSED", host
        assert error["details"]["field"] == "config.host"
        assert error["details"]["reason"] == reason, host
        assert error["message"].startswith("config.host may not be used: The SMTP host")
        assert shown in error["message"]
        assert f"({reason})" in error["message"]
        assert "MEMBERHUB_WEBHOOK_ALLOWED_NETWORKS" in error["message"]
    unknown = await strict.post("/api/v1/integrations", _smtp("nowhere.club.test"))
    assert unknown.status_code == 422, unknown.text
    assert unknown.json()["error"]["details"]["reason"] == "unresolvable"
    assert await _integration_count(db) == 0

    # A public address is accepted; changing it to an internal one is refused and changes
    # nothing.
    created = await strict.post("/api/v1/integrations", _smtp("8.8.8.8"))
    assert created.status_code == 201, created.text
    changed = await strict.patch(
        f"/api/v1/integrations/{created.json()['id']}", {"config": _smtp("127.0.0.1")["config"]}
    )
    assert changed.status_code == 422, changed.text
    assert changed.json()["error"]["code"] == "INTEGRATION_URL_REFUSED"
    kept = await strict.get(f"/api/v1/integrations/{created.json()['id']}")
    assert kept.json()["config"]["host"] == "8.8.8.8"


async def test_an_allowed_network_lets_a_relay_on_it_be_saved(
    api_with: ApiFactory, dns: dict[str, list[str]]
) -> None:
    allowing = await api_with(webhook_allowed_networks="10.20.0.0/16")
    dns[RELAY] = ["10.20.30.40"]
    for host in ("10.20.1.1", RELAY):
        response = await allowing.post("/api/v1/integrations", _smtp(host))
        assert response.status_code == 201, f"{host}: {response.text}"
    outside = await allowing.post("/api/v1/integrations", _smtp("10.21.0.1"))
    assert outside.status_code == 422, outside.text


async def test_a_host_that_resolves_elsewhere_after_it_was_saved_is_not_connected_to(
    api_with: ApiFactory,
    db: Database,
    settings: Settings,
    smtp: SmtpServer,
    dns: dict[str, list[str]],
) -> None:
    strict = await api_with(webhook_allowed_networks="")
    dns[RELAY] = ["8.8.8.8"]  # public when saved
    created = await strict.post("/api/v1/integrations", _smtp(RELAY, smtp.port))
    assert created.status_code == 201, created.text
    await consenting_member(strict)
    dns[RELAY] = ["127.0.0.1"]  # where the test's server listens: rebound to loopback
    hub = IntegrationHub(
        db,
        SecretBox(settings.resolved_secret_key),
        ssrf.UrlPolicy(allow_http=False, allowed_networks=()),
    )
    try:
        links = LinkSettings(public_url=settings.public_url, secret=settings.resolved_secret_key)
        assert await plan_notifications(db, datetime.now(UTC), links) == 1
        await NotificationSender(db, hub).send_due()
    finally:
        await hub.aclose()

    assert smtp.received() == []
    (logged,) = await notifications(strict)
    assert logged["status"] == "queued"  # tried again on its schedule
    assert f"Refusing to connect to '{RELAY}', which resolves to 127.0.0.1" in logged["error"]
    assert "(loopback)" in logged["error"]
    check = await strict.post(f"/api/v1/integrations/{created.json()['id']}/test")
    assert check.status_code == 200, check.text
    assert check.json()["ok"] is False
    assert "Refusing to connect" in check.text
    assert smtp.received() == []


async def test_a_name_is_connected_to_at_the_address_checked_and_tls_verifies_the_name(
    api: ApiClient,
    db: Database,
    app: Any,
    settings: Settings,
    tmp_path: Path,
    dns: dict[str, list[str]],
) -> None:
    # The name exists only in the test's resolver: the connection can only have gone to
    # the address it answered, and the certificate (for the name, not the address) can
    # only have been accepted if TLS checked the name.
    dns[RELAY] = ["127.0.0.1"]
    context, pem = _certificate_for(RELAY, tmp_path)
    with SmtpServer(tls=context) as server:
        created = await api.post(
            "/api/v1/integrations",
            _smtp(RELAY, server.port, security="tls", ca_certificate=pem),
        )
        assert created.status_code == 201, created.text
        check = await api.post(f"/api/v1/integrations/{created.json()['id']}/test")
        assert check.json()["ok"] is True, check.text
        member = await consenting_member(api)

        await deliver(db, app, settings)

        (received,) = server.received()
        assert received.recipients == [member["email"]]


def _certificate_for(name: str, tmp_path: Path) -> tuple[ssl.SSLContext, str]:
    """A server context with a self-signed certificate for the DNS name `name` only."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = certificate.public_bytes(serialization.Encoding.PEM).decode()
    (tmp_path / "cert.pem").write_text(pem)
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return server, pem
