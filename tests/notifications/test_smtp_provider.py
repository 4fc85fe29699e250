"""The smtp provider: login, refusals, an unreachable server, the payload log, the
connection check; its credentials never leave the vault."""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from memberhub.kit.db import Database
from memberhub.settings import Settings
from tests.fakes.smtp_server import SmtpServer
from tests.notifications.conftest import (
    consenting_member,
    create_smtp_integration,
    deliver,
    hub_of,
    notifications,
)
from tests.support import ApiClient

USER, PASSWORD = "relay-user", "s3cret-relay-password"


@pytest.fixture
def guarded_smtp() -> Iterator[SmtpServer]:
    with SmtpServer(credentials=(USER, PASSWORD)) as server:
        yield server


async def _integration(api: ApiClient, port: int, password: str) -> dict[str, Any]:
    body = {
        "provider": "smtp",
        "name": "Relay with login",
        "config": {"host": "127.0.0.1", "port": port, "security": "none", "from_address": "a@b.co"},
        "credentials": {"username": USER, "password": password},
    }
    response = await api.post("/api/v1/integrations", body)
    assert response.status_code == 201, response.text
    assert PASSWORD not in response.text
    return dict(response.json())


async def test_a_relay_that_needs_a_login_gets_one_and_the_check_passes(
    api: ApiClient, db: Database, app: Any, settings: Settings, guarded_smtp: SmtpServer
) -> None:
    integration = await _integration(api, guarded_smtp.port, PASSWORD)
    check = await api.post(f"/api/v1/integrations/{integration['id']}/test")
    assert check.status_code == 200, check.text
    assert check.json()["ok"] is True

    member = await consenting_member(api)
    await deliver(db, app, settings)

    (received,) = guarded_smtp.received()
    assert received.recipients == [member["email"]]
    await hub_of(app).drain()
    calls = await api.get(f"/api/v1/integrations/{integration['id']}/calls")
    assert calls.status_code == 200, calls.text
    logged = calls.json()["data"]
    assert [(c["method"], c["outcome"]) for c in logged] == [("SMTP", "ok")]
    assert PASSWORD not in calls.text


async def test_a_refused_login_fails_the_notification_for_good(
    api: ApiClient, db: Database, app: Any, settings: Settings, guarded_smtp: SmtpServer
) -> None:
    integration = await _integration(api, guarded_smtp.port, "wrong-password")
    check = await api.post(f"/api/v1/integrations/{integration['id']}/test")
    assert check.json()["ok"] is False
    await consenting_member(api)

    await deliver(db, app, settings)

    (logged,) = await notifications(api)
    assert logged["status"] == "failed"
    assert "login refused: 535" in logged["error"]
    assert "wrong-password" not in logged["error"]
    assert guarded_smtp.received() == []


async def test_an_unreachable_server_leaves_the_notification_queued_for_a_retry(
    api: ApiClient, db: Database, app: Any, settings: Settings
) -> None:
    with SmtpServer() as stopped:
        port = stopped.port  # nothing listens there once the block ends
    await create_smtp_integration(api, port)
    await consenting_member(api)

    await deliver(db, app, settings)

    (logged,) = await notifications(api)
    assert logged["status"] == "queued"
    assert logged["attempts"] == 1
    assert "no session with 127.0.0.1" in logged["error"]
    assert logged["next_attempt_at"] is not None


def _self_signed(tmp_path: Path) -> tuple[ssl.SSLContext, str]:
    """A server context with a certificate for 127.0.0.1, and that certificate's PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay.test")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
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
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return context, pem


@pytest.mark.parametrize("security", ["tls", "starttls"])
async def test_mail_goes_over_tls_to_a_relay_whose_certificate_is_trusted(
    api: ApiClient,
    db: Database,
    app: Any,
    settings: Settings,
    tmp_path: Path,
    security: str,
) -> None:
    context, pem = _self_signed(tmp_path)
    server = SmtpServer(tls=context) if security == "tls" else SmtpServer(starttls=context)
    with server:
        untrusted = await create_smtp_integration(api, server.port, security=security)
        check = await api.post(f"/api/v1/integrations/{untrusted['id']}/test")
        assert check.json()["ok"] is False  # its certificate is not one the system trusts
        disabled = await api.post(f"/api/v1/integrations/{untrusted['id']}/disable")
        assert disabled.status_code == 200, disabled.text
        trusted = await create_smtp_integration(
            api, server.port, security=security, ca_certificate=pem
        )
        check = await api.post(f"/api/v1/integrations/{trusted['id']}/test")
        assert check.json()["ok"] is True, check.text
        member = await consenting_member(api)

        await deliver(db, app, settings)

        (received,) = server.received()
        assert received.recipients == [member["email"]]


async def test_a_certificate_that_is_not_one_is_refused(api: ApiClient) -> None:
    response = await api.post(
        "/api/v1/integrations",
        {
            "provider": "smtp",
            "name": "Relay",
            "config": {
                "host": "127.0.0.1",
                "security": "tls",
                "from_address": "a@b.co",
                "ca_certificate": "-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----",
            },
        },
    )
    assert response.status_code == 422, response.text
