"""The fake SendGrid answers Mail Send as SendGrid does, and signs its event batches as
the Signed Event Webhook does."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key

from tests.fakes.sendgrid import FakeSendGrid, running_fake_sendgrid

API_KEY = "SG.fake-test.abcdefghijklmnopqrstuvwxyz0123456789"
SENDER = "club@example.com"


@pytest.fixture
async def fake() -> AsyncIterator[FakeSendGrid]:
    async with running_fake_sendgrid(API_KEY) as fake:
        fake.verify_sender(SENDER)
        yield fake


@pytest.fixture
async def http(fake: FakeSendGrid) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=fake.url, headers=headers, timeout=5) as client:
        yield client


def mail(**fields: Any) -> dict[str, Any]:
    return {
        "personalizations": [{"to": [{"email": "ana@example.org"}]}],
        "from": {"email": SENDER},
        "subject": "Hello",
        "content": [{"type": "text/plain", "value": "Hi"}],
        **fields,
    }


async def test_an_accepted_mail_answers_202_with_its_message_id(
    fake: FakeSendGrid, http: httpx.AsyncClient
) -> None:
    response = await http.post("/v3/mail/send", json=mail())

    assert response.status_code == 202
    assert response.content == b""
    [sent] = fake.sent
    assert response.headers["x-message-id"] == sent.message_id
    assert sent.to == "ana@example.org"


async def test_a_wrong_key_is_refused_with_sendgrids_error_shape(fake: FakeSendGrid) -> None:
    async with httpx.AsyncClient(base_url=fake.url) as client:
        response = await client.post(
            "/v3/mail/send", json=mail(), headers={"authorization": "Bearer SG.wrong"}
        )

    assert response.status_code == 401
    assert response.json() == {
        "errors": [
            {
                "message": "The provided authorization grant is invalid, expired, or revoked",
                "field": None,
                "help": None,
            }
        ]
    }


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (mail(personalizations=[]), 400, "personalizations"),
        (
            mail(personalizations=[{"to": [{"email": "nope"}]}]),
            400,
            "personalizations.0.to.0.email",
        ),
        (mail(subject=None), 400, "subject"),
        (mail(content=None), 400, "content"),
        (mail(content=[{"type": "text/plain", "value": ""}]), 400, "content.0.value"),
        (
            mail(
                content=[
                    {"type": "text/html", "value": "<p>Hi</p>"},
                    {"type": "text/plain", "value": "Hi"},
                ]
            ),
            400,
            "content",
        ),
        (mail(headers={"Subject": "x"}), 400, "headers"),
        (mail(**{"from": {"email": "other@example.com"}}), 403, "from"),
    ],
)
async def test_mail_send_checks_the_body_as_sendgrid_does(
    http: httpx.AsyncClient, body: dict[str, Any], status: int, field: str
) -> None:
    response = await http.post(
        "/v3/mail/send", json={k: v for k, v in body.items() if v is not None}
    )

    assert response.status_code == status
    [error] = response.json()["errors"]
    assert error["field"] == field
    assert error["message"]


async def test_a_template_replaces_subject_and_content(
    fake: FakeSendGrid, http: httpx.AsyncClient
) -> None:
    body = {
        k: v
        for k, v in mail(template_id="d-" + "0" * 32).items()
        if k not in ("subject", "content")
    }
    response = await http.post("/v3/mail/send", json=body)
    assert response.status_code == 202


async def test_the_rate_limit_answers_429_with_its_reset(
    fake: FakeSendGrid, http: httpx.AsyncClient
) -> None:
    fake.set_rate_limit(1)
    first = await http.post("/v3/mail/send", json=mail())
    second = await http.post("/v3/mail/send", json=mail())

    assert first.status_code == 202
    assert second.status_code == 429
    assert second.json() == {
        "errors": [{"message": "too many requests", "field": None, "help": None}]
    }
    assert second.headers["x-ratelimit-remaining"] == "0"
    assert int(second.headers["x-ratelimit-reset"]) > 0
    assert len(fake.sent) == 1


async def test_sandbox_mode_answers_200_and_sends_nothing(
    fake: FakeSendGrid, http: httpx.AsyncClient
) -> None:
    response = await http.post(
        "/v3/mail/send", json=mail(mail_settings={"sandbox_mode": {"enable": True}})
    )
    assert response.status_code == 200
    assert fake.sent == []


async def test_events_carry_the_custom_args_and_verify_with_the_shown_key(
    fake: FakeSendGrid, http: httpx.AsyncClient
) -> None:
    personalization = {"to": [{"email": "ana@example.org"}], "custom_args": {"ref": "ntf_1"}}
    await http.post("/v3/mail/send", json=mail(personalizations=[personalization]))
    [sent] = fake.sent

    event = fake.event(sent, "bounce")
    body, headers = fake.signed_batch([event])

    assert event["ref"] == "ntf_1"
    assert event["sg_message_id"].startswith(sent.message_id + ".filter")
    assert json.loads(body) == [event]
    key = load_der_public_key(base64.b64decode(fake.public_key_base64()))
    assert isinstance(key, ec.EllipticCurvePublicKey)
    signed = headers["X-Twilio-Email-Event-Webhook-Timestamp"].encode() + body
    signature = base64.b64decode(headers["X-Twilio-Email-Event-Webhook-Signature"])
    key.verify(signature, signed, ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        key.verify(signature, signed + b" ", ec.ECDSA(hashes.SHA256()))
