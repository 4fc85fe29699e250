"""The integrations registry and the credential vault."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

import pytest
from sqlalchemy import select, text
from typer.testing import CliRunner

from memberhub.cli import app as cli
from memberhub.integrations import vault
from memberhub.integrations.models import Integration
from memberhub.kit.crypto import SecretBox, SecretUnreadable
from memberhub.kit.db import Database
from memberhub.kit.rotation import ENCRYPTED_COLUMNS
from memberhub.models import Base
from memberhub.settings import Settings
from memberhub.webhooks.models import WebhookEndpoint
from tests.integrations.conftest import API_KEY, WEBHOOK_SECRET, create_stripe_integration
from tests.support import ApiClient

NEW_MASTER_SECRET = "a-brand-new-master-secret-for-rotation-0123456789"


async def dump(db: Database) -> str:
    """Every row of every table, as text: what a database dump would hold."""
    parts: list[str] = []
    async with db.transaction(read_only=True) as session:
        for table in Base.metadata.sorted_tables:
            rows = await session.execute(text(f'SELECT * FROM "{table.name}"'))
            parts.extend(repr(tuple(row)) for row in rows)
    return "\n".join(parts)


async def test_credentials_are_shown_by_their_last_four_characters_only(api: ApiClient) -> None:
    created = await create_stripe_integration(api)
    assert created["provider"] == "stripe"
    assert sorted(created["capabilities"]) == ["events_source", "payments"]
    assert created["credentials"] == {
        "api_key": "…" + API_KEY[-4:],
        "webhook_secret": "…" + WEBHOOK_SECRET[-4:],
    }
    assert created["inbound_url"].endswith(f"/api/v1/inbound/{created['id']}")
    for response in (
        await api.get(f"/api/v1/integrations/{created['id']}"),
        await api.get("/api/v1/integrations"),
    ):
        assert response.status_code == 200
        assert API_KEY not in response.text
        assert WEBHOOK_SECRET not in response.text


async def test_a_database_dump_holds_no_plaintext_secret(api: ApiClient, db: Database) -> None:
    await create_stripe_integration(api)
    hook = await api.post(
        "/api/v1/webhook-endpoints", {"url": "http://127.0.0.1:9/h", "event_types": ["*"]}
    )
    assert hook.status_code == 201
    signing_secret = hook.json()["secret"]

    dumped = await dump(db)
    assert "enc1:" in dumped  # the secrets are there, encrypted
    for secret in (API_KEY, WEBHOOK_SECRET, signing_secret):
        assert secret not in dumped
        assert secret[8:24] not in dumped  # no fragment either


async def test_patch_merges_credentials_and_validates_config(
    api: ApiClient, db: Database, settings: Settings
) -> None:
    created = await create_stripe_integration(api)
    path = f"/api/v1/integrations/{created['id']}"
    response = await api.patch(
        path, {"credentials": {"webhook_secret": "whsec_rotated_secret_9876"}}
    )
    assert response.status_code == 200, response.text
    assert response.json()["credentials"]["webhook_secret"] == "…9876"
    assert response.json()["credentials"]["api_key"] == "…" + API_KEY[-4:]
    async with db.transaction(read_only=True) as session:
        row = await session.scalar(
            select(Integration).where(Integration.public_id == created["id"])
        )
        assert row is not None
        stored = vault.unseal(SecretBox(settings.resolved_secret_key), row.credentials)
    assert stored == {"api_key": API_KEY, "webhook_secret": "whsec_rotated_secret_9876"}

    bad = await api.patch(path, {"config": {"grace_days": -1, "surprise": 1}})
    assert bad.status_code == 422
    fields = {f["field"] for f in bad.json()["error"]["details"]["fields"]}
    assert fields == {"config.grace_days", "config.surprise"}
    # Each in the shape of every VALIDATION_ERROR: where, what and which rule.
    by_place = {tuple(f["loc"]): f for f in bad.json()["error"]["details"]["fields"]}
    assert set(by_place) == {("body", "config", "grace_days"), ("body", "config", "surprise")}
    assert by_place["body", "config", "surprise"]["type"] == "extra_forbidden"
    assert all(f["message"] for f in by_place.values())


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"provider": "nope", "name": "x"}, "UNKNOWN_PROVIDER"),
        ({"provider": "stripe", "name": "x", "credentials": {"api_key": 5}}, "VALIDATION_ERROR"),
        ({"provider": "http", "name": "x", "config": {}}, "VALIDATION_ERROR"),
        (
            {"provider": "stripe", "name": "x", "config": {"inbound_allowed_ips": ["1.2.3.4/33"]}},
            "VALIDATION_ERROR",
        ),
        (
            {"provider": "http", "name": "x", "config": {"base_url": "https://10.0.0.1/"}},
            "INTEGRATION_URL_REFUSED",
        ),
        # URLs a provider posts secrets to besides its base URL follow the same rules.
        (
            {
                "provider": "onedrive",
                "name": "x",
                "config": {"login_url": "https://10.1.2.3", "drive_id": "b!drive"},
                "credentials": {
                    "tenant_id": "contoso.onmicrosoft.com",
                    "client_id": "00000000-0000-0000-0000-000000000001",
                    "client_secret": "client-secret-1",
                },
            },
            "INTEGRATION_URL_REFUSED",
        ),
        (
            {
                "provider": "segment",
                "name": "x",
                "config": {"public_api_url": "https://10.1.2.3"},
                "credentials": {"write_key": "write-key-1", "public_api_token": "api-token-1"},
            },
            "INTEGRATION_URL_REFUSED",
        ),
        ({"provider": "stripe", "name": "x", "config": {"rate_limit": "lots"}}, "VALIDATION_ERROR"),
        (
            {"provider": "stripe", "name": "x", "config": {"rate_limit": "0/second"}},
            "VALIDATION_ERROR",
        ),
    ],
)
async def test_invalid_integrations_are_refused_with_a_clear_error(
    api: ApiClient, db: Database, body: dict[str, Any], code: str
) -> None:
    response = await api.post("/api/v1/integrations", body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == code
    async with db.transaction(read_only=True) as session:
        assert await session.scalar(select(Integration.id)) is None


async def test_providers_are_listed_with_their_capabilities(api: ApiClient) -> None:
    response = await api.get("/api/v1/integration-providers")
    assert response.status_code == 200
    providers = {p["name"]: p for p in response.json()}
    assert set(providers) >= {"stripe", "hubspot", "http", "webhook"}
    assert "payments" in providers["stripe"]["capabilities"]
    assert providers["hubspot"]["oauth"] is True
    assert "webhook_secret" in providers["stripe"]["credentials_schema"]["properties"]


async def test_secrets_rotate_re_encrypts_everything_and_the_old_key_no_longer_decrypts(
    settings: Settings, api: ApiClient, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    await create_stripe_integration(api)
    hook = await api.post(
        "/api/v1/webhook-endpoints",
        {"url": "http://127.0.0.1:9/h", "event_types": ["*"]},
        headers={"Idempotency-Key": "rotate-test"},
    )
    assert hook.status_code == 201
    signing_secret = hook.json()["secret"]

    monkeypatch.setenv("MEMBERHUB_DATABASE_URL", settings.resolved_database_url)
    monkeypatch.setenv("MEMBERHUB_SECRET_KEY", settings.resolved_secret_key)
    monkeypatch.setenv("MEMBERHUB_DATA_DIR", str(settings.data_dir))
    result = await asyncio.to_thread(
        CliRunner().invoke, cli, ["secrets", "rotate", "--new-key", NEW_MASTER_SECRET]
    )
    assert result.exit_code == 0, result.output
    assert "integrations.credentials: 1 re-encrypted" in result.output
    assert "webhook_endpoints.secret: 1 re-encrypted" in result.output
    assert "idempotency_records.response_body: 1 re-encrypted" in result.output

    old, new = SecretBox(settings.resolved_secret_key), SecretBox(NEW_MASTER_SECRET)
    async with db.transaction(read_only=True) as session:
        integration = await session.scalar(select(Integration))
        endpoint = await session.scalar(select(WebhookEndpoint))
    assert integration is not None
    assert endpoint is not None
    assert vault.unseal(new, integration.credentials) == {
        "api_key": API_KEY,
        "webhook_secret": WEBHOOK_SECRET,
    }
    assert new.decrypt(endpoint.secret) == signing_secret
    with pytest.raises(SecretUnreadable):
        vault.unseal(old, integration.credentials)
    with pytest.raises(SecretUnreadable):
        old.decrypt(endpoint.secret)

    # A second rotation with the old key configured finds nothing it can read: refused,
    # nothing changed.
    again = await asyncio.to_thread(
        CliRunner().invoke, cli, ["secrets", "rotate", "--new-key", "x" * 40]
    )
    assert again.exit_code == 1
    assert "cannot be read with the current master secret" in again.output
    async with db.transaction(read_only=True) as session:
        unchanged = await session.scalar(select(Integration))
    assert unchanged is not None
    assert unchanged.credentials == integration.credentials


async def ciphertext_columns(db: Database) -> set[tuple[str, str]]:
    """Every (table, column) of the schema holding at least one value the SecretBox wrote."""
    found: set[tuple[str, str]] = set()
    async with db.transaction(read_only=True) as session:
        for table in Base.metadata.sorted_tables:
            for row in (await session.execute(select(table))).mappings():
                for column, value in row.items():
                    if (isinstance(value, str) and value.startswith("enc1:")) or (
                        isinstance(value, bytes) and value.startswith(b"enc1:")
                    ):
                        found.add((table.name, column))
    return found


async def opened_secrets(db: Database, box: SecretBox) -> dict[tuple[str, str, int], Any]:
    """Every value of every encrypted column, opened with `box`, by (table, column, row id);
    SecretUnreadable if `box` cannot read one of them."""
    opened: dict[tuple[str, str, int], Any] = {}
    async with db.transaction(read_only=True) as session:
        for model, column, binary in ENCRYPTED_COLUMNS:
            for row in await session.scalars(select(model)):
                value = getattr(row, column)
                if value is None:
                    continue
                plain = box.open(value) if binary else box.decrypt(value)
                opened[(model.__tablename__, column, row.id)] = plain
    return opened


async def test_secrets_rotate_in_its_own_process_with_every_secret_table_populated(
    settings: Settings, api: ApiClient, db: Database
) -> None:
    """The command run as an operator runs it: a fresh process that has loaded nothing else
    (it once failed with NoReferencedTableError as soon as an integration existed)."""
    await create_stripe_integration(api)
    oauth = await api.post(
        "/api/v1/integrations",
        {
            "provider": "http",
            "name": "Partner",
            "config": {
                "base_url": "http://127.0.0.1:9",
                "auth": "oauth2",
                "oauth": {
                    "authorize_url": "http://127.0.0.1:9/authorize",
                    "token_url": "http://127.0.0.1:9/token",
                },
            },
            "credentials": {"client_id": "partner-client", "client_secret": "partner-secret-1"},
        },
    )
    assert oauth.status_code == 201, oauth.text
    started = await api.get(f"/api/v1/integrations/{oauth.json()['id']}/oauth/authorize")
    assert started.status_code == 200, started.text
    hook = await api.post(
        "/api/v1/webhook-endpoints",
        {"url": "http://127.0.0.1:9/h", "event_types": ["*"]},
        headers={"Idempotency-Key": "rotate-in-a-process"},
    )
    assert hook.status_code == 201
    first_secret = hook.json()["secret"]
    rotated = await api.post(f"/api/v1/webhook-endpoints/{hook.json()['id']}/rotate-secret")
    assert rotated.status_code == 200, rotated.text
    new_secret = rotated.json()["secret"]

    # Every column holding ciphertext is one the rotation knows, and each has a value here.
    assert await ciphertext_columns(db) == {
        (model.__tablename__, column) for model, column, _ in ENCRYPTED_COLUMNS
    }
    old, new = SecretBox(settings.resolved_secret_key), SecretBox(NEW_MASTER_SECRET)
    before = await opened_secrets(db, old)

    env = {
        **os.environ,
        "MEMBERHUB_DATABASE_URL": settings.resolved_database_url,
        "MEMBERHUB_SECRET_KEY": settings.resolved_secret_key,
        "MEMBERHUB_DATA_DIR": str(settings.data_dir),
    }
    command = [sys.executable, "-c", "from memberhub.cli import app; app()"]
    done = await asyncio.to_thread(
        subprocess.run,
        [*command, "secrets", "rotate", "--new-key", NEW_MASTER_SECRET],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for line in (
        "integrations.credentials: 2 re-encrypted",
        "oauth_authorizations.code_verifier: 1 re-encrypted",
        "webhook_endpoints.secret: 1 re-encrypted",
        "webhook_endpoints.previous_secret: 1 re-encrypted",
        "idempotency_records.response_body: 1 re-encrypted",
    ):
        assert line in done.stdout, done.stdout

    # Each secret reads the same under the new key, and the old key reads none of them.
    assert await opened_secrets(db, new) == before
    async with db.transaction(read_only=True) as session:
        for model, column, binary in ENCRYPTED_COLUMNS:
            for row in await session.scalars(select(model)):
                value = getattr(row, column)
                if value is None:
                    continue
                with pytest.raises(SecretUnreadable):
                    old.open(value) if binary else old.decrypt(value)
        endpoint = await session.scalar(select(WebhookEndpoint))
        partner = await session.scalar(select(Integration).where(Integration.provider == "http"))
    assert endpoint is not None
    assert partner is not None
    assert new.decrypt(endpoint.secret) == new_secret
    assert endpoint.previous_secret is not None
    assert new.decrypt(endpoint.previous_secret) == first_secret
    assert vault.unseal(new, partner.credentials)["client_secret"] == "partner-secret-1"
