"""FCM as a notification channel: a service-account token by the JWT bearer grant, kept
until shortly before it expires, and pushes through the gateway to the fake, with FCM's
errors as permanent or retryable refusals."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from memberhub.integrations.gateway import GatewayError
from memberhub.integrations.hub import IntegrationHub
from memberhub.integrations.providers import as_events_source, as_message_channel, get_provider
from memberhub.integrations.providers.base import MessageChannel, OutgoingMessage, SendRejected
from memberhub.integrations.providers.fcm import SCOPE
from memberhub.kit.crypto import SecretBox
from memberhub.kit.db import Database
from memberhub.settings import Settings
from memberhub.webhooks.ssrf import UrlPolicy
from tests.fakes.fcm import FakeFcm, running_fake_fcm
from tests.integrations.channels import connection_for, create_integration, no_wait, payload_log
from tests.support import ApiClient

PROJECT = "memberhub-club"


def fcm() -> MessageChannel:
    provider = get_provider("fcm")
    assert provider is not None
    channel = as_message_channel(provider)
    assert channel is not None
    return channel


def push(to: str, **fields: Any) -> OutgoingMessage:
    return OutgoingMessage(
        **{
            "channel": "push",
            "to": to,
            "reference": "ntf_0001",
            "text": "You earned 120 points.",
            "subject": "Points earned",
            "data": {"type": "points.earned", "points": "120"},
            **fields,
        }
    )


@pytest.fixture(scope="module")
def account_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
async def fake() -> AsyncIterator[FakeFcm]:
    async with running_fake_fcm(PROJECT) as fake:
        yield fake


@pytest.fixture
def key_file(fake: FakeFcm, account_key: rsa.RSAPrivateKey) -> dict[str, Any]:
    return fake.service_account(key=account_key)


@pytest.fixture
async def hub(settings: Settings, db: Database) -> AsyncIterator[IntegrationHub]:
    integrations = IntegrationHub(
        db,
        SecretBox(settings.resolved_secret_key),
        UrlPolicy.from_settings(settings),
        retry_sleep=no_wait,
    )
    yield integrations
    await integrations.aclose()


async def make_integration(
    api: ApiClient, fake: FakeFcm, key_file: dict[str, Any], **config: Any
) -> dict[str, Any]:
    return await create_integration(
        api, "fcm", {"base_url": fake.url, **config}, {"service_account": json.dumps(key_file)}
    )


async def test_a_push_goes_to_the_device_with_a_service_account_token(
    api: ApiClient, db: Database, hub: IntegrationHub, fake: FakeFcm, key_file: dict[str, Any]
) -> None:
    integration = await make_integration(api, fake, key_file)
    connection = await connection_for(db, hub, integration["id"])
    device = fake.register_device()

    result = await fcm().send_message(connection, push(device))

    [sent] = fake.sent
    assert result.provider_message_id == sent.name
    assert sent.name.startswith(f"projects/{PROJECT}/messages/")
    assert sent.message == {
        "token": device,
        "notification": {"title": "Points earned", "body": "You earned 120 points."},
        "data": {"type": "points.earned", "points": "120"},
    }


async def test_the_assertion_is_the_jwt_bearer_grant_google_asks_for(
    api: ApiClient,
    db: Database,
    hub: IntegrationHub,
    fake: FakeFcm,
    key_file: dict[str, Any],
    account_key: rsa.RSAPrivateKey,
) -> None:
    integration = await make_integration(api, fake, key_file)
    connection = await connection_for(db, hub, integration["id"])
    await fcm().send_message(connection, push(fake.register_device()))

    [form] = fake.token_requests
    assert form["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    header = jwt.get_unverified_header(form["assertion"])
    claims = jwt.decode(
        form["assertion"], account_key.public_key(), algorithms=["RS256"], audience=fake.token_uri
    )
    assert header == {"alg": "RS256", "typ": "JWT", "kid": key_file["private_key_id"]}
    assert claims["iss"] == key_file["client_email"]
    assert claims["scope"] == SCOPE == "https://www.googleapis.com/auth/firebase.messaging"
    assert claims["exp"] - claims["iat"] == 3600


async def test_the_token_is_reused_until_fcm_refuses_it_then_renewed_once(
    api: ApiClient, db: Database, hub: IntegrationHub, fake: FakeFcm, key_file: dict[str, Any]
) -> None:
    integration = await make_integration(api, fake, key_file)
    connection = await connection_for(db, hub, integration["id"])
    device = fake.register_device()

    for _ in range(3):
        await fcm().send_message(connection, push(device))
    assert len(fake.token_requests) == 1

    fake.expire_tokens()
    await fcm().send_message(connection, push(device))

    assert len(fake.token_requests) == 2
    assert len(fake.sent) == 4


async def test_concurrent_sends_share_one_token_request(
    api: ApiClient, db: Database, hub: IntegrationHub, fake: FakeFcm, key_file: dict[str, Any]
) -> None:
    integration = await make_integration(api, fake, key_file)
    connection = await connection_for(db, hub, integration["id"])
    device = fake.register_device()

    await asyncio.gather(*(fcm().send_message(connection, push(device)) for _ in range(5)))

    assert len(fake.token_requests) == 1
    assert len(fake.sent) == 5


async def test_a_token_close_to_expiry_is_not_used(
    api: ApiClient, db: Database, hub: IntegrationHub, fake: FakeFcm, key_file: dict[str, Any]
) -> None:
    integration = await make_integration(api, fake, key_file)
    connection = await connection_for(db, hub, integration["id"])
    device = fake.register_device()
    fake.token_lifetime = 240  # within the five minutes before expiry a token is renewed

    await fcm().send_message(connection, push(device))
    await fcm().send_message(connection, push(device))

    assert len(fake.token_requests) == 2


async def test_an_unregistered_device_is_a_permanent_refusal_named_unregistered(
    api: ApiClient, db: Database, hub: IntegrationHub, fake: FakeFcm, key_file: dict[str, Any]
) -> None:
    integration = await make_integration(api, fake, key_file)
    connection = await connection_for(db, hub, integration["id"])
    device = fake.register_device()
    fake.unregister(device)

    with pytest.raises(SendRejected) as gone:
        await fcm().send_message(connection, push(device))
    with pytest.raises(SendRejected) as unknown:
        await fcm().send_message(connection, push("not-a-registration-token"))

    assert gone.value.permanent is True
    assert gone.value.recipient_gone is True  # the sender forgets the token
    assert str(gone.value) == "UNREGISTERED: FCM answered 404: Requested entity was not found."
    assert unknown.value.permanent is True
    assert unknown.value.recipient_gone is False
    assert str(unknown.value).startswith("INVALID_ARGUMENT: FCM answered 400: ")
    assert fake.sent == []


async def test_quota_and_outages_are_left_to_the_retry_schedule(
    api: ApiClient, db: Database, hub: IntegrationHub, fake: FakeFcm, key_file: dict[str, Any]
) -> None:
    integration = await make_integration(api, fake, key_file)
    connection = await connection_for(db, hub, integration["id"])
    device = fake.register_device()

    fake.rate_limit_next(2)
    assert (await fcm().send_message(connection, push(device))).provider_message_id
    fake.rate_limit_next(10)
    with pytest.raises(GatewayError) as quota:
        await fcm().send_message(connection, push(device))
    fake.fail_next(1, status=503)
    with pytest.raises(GatewayError) as unavailable:
        await fcm().send_message(connection, push(device))
    fake.fail_next(1, status=500)
    with pytest.raises(GatewayError) as internal:
        await fcm().send_message(connection, push(device))

    assert quota.value.status == 429
    assert "QUOTA_EXCEEDED" in quota.value.body_excerpt
    assert unavailable.value.status == 503
    assert internal.value.status == 500
    assert len(fake.sent) == 1


async def test_a_key_google_does_not_know_is_refused_without_blaming_the_message(
    api: ApiClient, db: Database, hub: IntegrationHub, fake: FakeFcm, key_file: dict[str, Any]
) -> None:
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = {**key_file, "private_key": fake.service_account(key=other_key)["private_key"]}
    integration = await make_integration(api, fake, forged)
    connection = await connection_for(db, hub, integration["id"])

    with pytest.raises(SendRejected) as refused:
        await fcm().send_message(connection, push(fake.register_device()))

    assert refused.value.permanent is False
    assert str(refused.value) == (
        f"Google refused the service account {key_file['client_email']}: Invalid JWT Signature."
    )


async def test_no_secret_reaches_the_payload_log(
    api: ApiClient, db: Database, hub: IntegrationHub, fake: FakeFcm, key_file: dict[str, Any]
) -> None:
    integration = await make_integration(api, fake, key_file)
    connection = await connection_for(db, hub, integration["id"])
    await fcm().send_message(connection, push(fake.register_device()))
    await hub.drain()

    logged = await payload_log(api, integration["id"])
    calls = json.loads(logged)["data"]
    assert [call["url"] for call in reversed(calls)] == [
        fake.token_uri,
        f"{fake.url}/v1/projects/{PROJECT}/messages:send",
    ]
    assertion = fake.token_requests[0]["assertion"]
    assert assertion[:-4] not in logged
    assert "ya29." not in logged
    assert "PRIVATE KEY" not in logged


async def test_the_connection_check_validates_a_message_without_sending_it(
    api: ApiClient, fake: FakeFcm, key_file: dict[str, Any]
) -> None:
    integration = await make_integration(api, fake, key_file)
    elsewhere = await make_integration(api, fake, key_file, project_id="another-project")

    ok = (await api.post(f"/api/v1/integrations/{integration['id']}/test")).json()
    denied = (await api.post(f"/api/v1/integrations/{elsewhere['id']}/test")).json()

    assert ok["ok"] is True
    assert ok["message"] == (
        f"connected to Firebase project {PROJECT} as {key_file['client_email']}"
    )
    assert fake.sent == []
    assert denied["ok"] is False
    assert denied["message"].startswith("PERMISSION_DENIED: FCM answered 403: ")


@pytest.mark.parametrize(
    ("service_account", "message"),
    [
        ("{not json", "is not JSON"),
        (json.dumps({"type": "authorized_user"}), "is not a service account key file"),
        (
            json.dumps({"type": "service_account", "client_email": "a@b.c"}),
            "lacks private_key, token_uri",
        ),
        (
            json.dumps(
                {
                    "type": "service_account",
                    "client_email": "a@b.c",
                    "token_uri": "https://oauth2.googleapis.com/token",
                    "private_key": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
                }
            ),
            "has a private_key that is not an unencrypted PEM key",
        ),
    ],
)
async def test_a_bad_key_file_is_refused_when_saved_with_the_reason(
    api: ApiClient, service_account: str, message: str
) -> None:
    response = await api.post(
        "/api/v1/integrations",
        {"provider": "fcm", "name": "Push", "credentials": {"service_account": service_account}},
    )
    assert response.status_code == 422, response.text
    [error] = response.json()["error"]["details"]["fields"]
    assert error["field"] == "credentials.service_account"
    assert message in error["message"]
    assert "PRIVATE KEY" not in response.text


async def test_a_key_file_object_is_accepted_and_a_project_is_required(
    api: ApiClient, fake: FakeFcm, key_file: dict[str, Any]
) -> None:
    as_object = await api.post(
        "/api/v1/integrations",
        {"provider": "fcm", "name": "Push", "credentials": {"service_account": key_file}},
    )
    no_project = await api.post(
        "/api/v1/integrations",
        {
            "provider": "fcm",
            "name": "Push",
            "credentials": {"service_account": {**key_file, "project_id": None}},
        },
    )

    assert as_object.status_code == 201, as_object.text
    assert "PRIVATE KEY" not in as_object.text
    assert no_project.status_code == 422
    assert no_project.json()["error"]["message"] == (
        "Set config.project_id: the service account's key file names no project_id."
    )


def test_fcm_sends_but_takes_no_callbacks() -> None:
    provider = get_provider("fcm")
    assert provider is not None
    assert as_events_source(provider) is None
    assert fcm().message_channels == frozenset({"push"})
    assert fcm().delivery_reports("any", b"[]") == []
