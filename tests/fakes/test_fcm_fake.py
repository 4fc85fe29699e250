"""The fake FCM grants tokens only for assertions a service account signed, and answers
messages:send with Google's shapes."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.fakes.fcm import FCM_SCOPE, JWT_BEARER, FakeFcm, running_fake_fcm

PROJECT = "fake-fcm-project"


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
async def fake() -> AsyncIterator[FakeFcm]:
    async with running_fake_fcm(PROJECT) as fake:
        yield fake


@pytest.fixture
async def http(fake: FakeFcm) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=fake.url, timeout=5) as client:
        yield client


def assertion(account: dict[str, Any], signing_key: rsa.RSAPrivateKey, **claims: Any) -> str:
    now = int(time.time())
    pem = signing_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return jwt.encode(
        {
            "iss": account["client_email"],
            "scope": FCM_SCOPE,
            "aud": account["token_uri"],
            "iat": now,
            "exp": now + 3600,
            **claims,
        },
        pem,
        algorithm="RS256",
        headers={"kid": account["private_key_id"]},
    )


async def grant(
    http: httpx.AsyncClient, signed: str, grant_type: str = JWT_BEARER
) -> httpx.Response:
    return await http.post("/token", data={"grant_type": grant_type, "assertion": signed})


async def test_a_signed_assertion_gets_an_access_token(
    fake: FakeFcm, http: httpx.AsyncClient, key: rsa.RSAPrivateKey
) -> None:
    account = fake.service_account(key=key)

    response = await grant(http, assertion(account, key))

    assert response.status_code == 200
    answer = response.json()
    assert answer["access_token"].startswith("ya29.")
    assert answer["expires_in"] == 3599
    assert answer["token_type"] == "Bearer"


@pytest.mark.parametrize(
    ("claims", "error", "description"),
    [
        ({"aud": "https://elsewhere.example/token"}, "invalid_grant", "Failed audience check"),
        ({"exp": int(time.time()) + 7200}, "invalid_grant", "short-lived token"),
        (
            {"exp": int(time.time()) - 600, "iat": int(time.time()) - 900},
            "invalid_grant",
            "short-lived",
        ),
        (
            {"scope": "https://www.googleapis.com/auth/cloud-platform.read-only"},
            "invalid_scope",
            "scope",
        ),
        ({"iss": "stranger@x.iam.gserviceaccount.com"}, "invalid_grant", "account not found"),
    ],
)
async def test_assertions_google_would_refuse_are_refused(
    fake: FakeFcm,
    http: httpx.AsyncClient,
    key: rsa.RSAPrivateKey,
    claims: dict[str, Any],
    error: str,
    description: str,
) -> None:
    account = fake.service_account(key=key)

    response = await grant(http, assertion(account, key, **claims))

    assert response.status_code == 400
    assert response.json()["error"] == error
    assert description in response.json()["error_description"]


async def test_an_assertion_signed_with_another_key_is_an_invalid_signature(
    fake: FakeFcm, http: httpx.AsyncClient, key: rsa.RSAPrivateKey
) -> None:
    account = fake.service_account(key=key)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    refused = await grant(http, assertion(account, other))
    wrong_grant = await grant(http, assertion(account, key), grant_type="client_credentials")

    assert refused.json() == {
        "error": "invalid_grant",
        "error_description": "Invalid JWT Signature.",
    }
    assert wrong_grant.json()["error"] == "unsupported_grant_type"


async def send(
    http: httpx.AsyncClient, token: str, message: dict[str, Any], project: str = PROJECT
) -> httpx.Response:
    return await http.post(
        f"/v1/projects/{project}/messages:send",
        json={"message": message},
        headers={"authorization": f"Bearer {token}"},
    )


async def test_messages_send_answers_in_googles_shapes(
    fake: FakeFcm, http: httpx.AsyncClient, key: rsa.RSAPrivateKey
) -> None:
    account = fake.service_account(key=key)
    token = (await grant(http, assertion(account, key))).json()["access_token"]
    device = fake.register_device()

    sent = await send(http, token, {"token": device, "notification": {"title": "Hi"}})
    no_target = await send(http, token, {"notification": {"title": "Hi"}})
    bad_data = await send(http, token, {"token": device, "data": {"points": 120}})
    unknown = await send(http, token, {"token": "bogus"})
    fake.unregister(device)
    gone = await send(http, token, {"token": device})
    other_project = await send(http, token, {"token": device}, project="someone-else")
    fake.expire_tokens()
    expired = await send(http, token, {"token": device})

    assert sent.status_code == 200
    assert sent.json()["name"].startswith(f"projects/{PROJECT}/messages/0:")
    assert (no_target.status_code, no_target.json()["error"]["status"]) == (400, "INVALID_ARGUMENT")
    assert bad_data.status_code == 400
    assert unknown.json()["error"]["details"] == [
        {
            "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
            "errorCode": "INVALID_ARGUMENT",
        }
    ]
    assert gone.status_code == 404
    assert gone.json() == {
        "error": {
            "code": 404,
            "message": "Requested entity was not found.",
            "status": "NOT_FOUND",
            "details": [
                {
                    "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                    "errorCode": "UNREGISTERED",
                }
            ],
        }
    }
    assert other_project.json()["error"]["status"] == "PERMISSION_DENIED"
    assert (expired.status_code, expired.json()["error"]["status"]) == (401, "UNAUTHENTICATED")
    assert len(fake.sent) == 1


async def test_quota_and_validate_only(
    fake: FakeFcm, http: httpx.AsyncClient, key: rsa.RSAPrivateKey
) -> None:
    account = fake.service_account(key=key)
    token = (await grant(http, assertion(account, key))).json()["access_token"]

    fake.rate_limit_next(1)
    limited = await send(http, token, {"topic": "news"})
    validated = await http.post(
        f"/v1/projects/{PROJECT}/messages:send",
        json={"message": {"topic": "news"}, "validate_only": True},
        headers={"authorization": f"Bearer {token}"},
    )

    assert limited.status_code == 429
    assert limited.json()["error"]["details"][0]["errorCode"] == "QUOTA_EXCEEDED"
    assert limited.headers["retry-after"] == "1"
    assert validated.status_code == 200
    assert fake.sent == []
