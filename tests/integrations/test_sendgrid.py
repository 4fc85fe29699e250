"""SendGrid as a notification channel: Mail Send through the gateway to the fake, errors
as permanent or retryable refusals, and the signed Event Webhook through the inbound
endpoint turned into delivery reports."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from memberhub.integrations.gateway import GatewayError
from memberhub.integrations.hub import IntegrationHub
from memberhub.integrations.providers import as_message_channel, get_provider
from memberhub.integrations.providers.base import (
    DeliveryReport,
    MessageChannel,
    OutgoingMessage,
    SendRejected,
)
from memberhub.kit.crypto import SecretBox
from memberhub.kit.db import Database
from memberhub.settings import Settings
from memberhub.webhooks.ssrf import UrlPolicy
from tests.fakes.sendgrid import FakeSendGrid, running_fake_sendgrid
from tests.integrations.channels import connection_for, create_integration, no_wait, payload_log
from tests.support import ApiClient

API_KEY = "SG.memberhub-test.0123456789abcdefghijklmnopqrstuvwxyz"
SENDER = "club@example.com"
TEMPLATE_ID = "d-0123456789abcdef0123456789abcdef"


def sendgrid() -> MessageChannel:
    provider = get_provider("sendgrid")
    assert provider is not None
    channel = as_message_channel(provider)
    assert channel is not None
    return channel


def email(**fields: Any) -> OutgoingMessage:
    return OutgoingMessage(
        **{
            "channel": "email",
            "to": "ana@example.org",
            "reference": "ntf_0001",
            "text": "You earned 120 points.",
            "subject": "Points earned",
            "html": "<p>You earned <b>120</b> points.</p>",
            **fields,
        }
    )


@pytest.fixture(scope="module")
def signing_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
async def fake(signing_key: ec.EllipticCurvePrivateKey) -> AsyncIterator[FakeSendGrid]:
    async with running_fake_sendgrid(API_KEY, signing_key) as fake:
        fake.verify_sender(SENDER)
        yield fake


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


async def make_integration(api: ApiClient, fake: FakeSendGrid, **config: Any) -> dict[str, Any]:
    return await create_integration(
        api,
        "sendgrid",
        {
            "base_url": fake.url,
            "from_email": SENDER,
            "from_name": "The Club",
            "webhook_public_key": fake.public_key_base64(),
            **config,
        },
        {"api_key": API_KEY},
    )


# ---------------------------------------------------------------- sending


async def test_send_posts_the_rendered_email_and_returns_sendgrids_message_id(
    api: ApiClient, db: Database, hub: IntegrationHub, fake: FakeSendGrid
) -> None:
    integration = await make_integration(api, fake, reply_to="help@example.com")
    connection = await connection_for(db, hub, integration["id"])
    unsubscribe = {"List-Unsubscribe": "<https://club.example.com/u/abc>"}

    result = await sendgrid().send_message(connection, email(headers=unsubscribe))

    [mail] = fake.sent
    assert result.provider_message_id == mail.message_id
    assert mail.to == "ana@example.org"
    assert mail.body["from"] == {"email": SENDER, "name": "The Club"}
    assert mail.body["reply_to"] == {"email": "help@example.com"}
    assert mail.body["subject"] == "Points earned"
    assert mail.body["content"] == [
        {"type": "text/plain", "value": "You earned 120 points."},
        {"type": "text/html", "value": "<p>You earned <b>120</b> points.</p>"},
    ]
    assert mail.body["headers"] == unsubscribe
    assert mail.custom_args == {"memberhub_reference": "ntf_0001"}


async def test_a_dynamic_template_gets_the_rendered_parts_as_template_data(
    api: ApiClient, db: Database, hub: IntegrationHub, fake: FakeSendGrid
) -> None:
    integration = await make_integration(api, fake, template_id=TEMPLATE_ID)
    connection = await connection_for(db, hub, integration["id"])

    await sendgrid().send_message(
        connection, email(html=None, sender="Front desk <club@example.com>")
    )

    [mail] = fake.sent
    assert mail.body["template_id"] == TEMPLATE_ID
    assert "content" not in mail.body
    assert mail.body["from"] == {"email": SENDER, "name": "Front desk"}
    assert mail.body["personalizations"][0]["dynamic_template_data"] == {
        "subject": "Points earned",
        "text": "You earned 120 points.",
        "html": "",
        "reference": "ntf_0001",
    }


async def test_sandbox_mode_is_accepted_without_a_message_id(
    api: ApiClient, db: Database, hub: IntegrationHub, fake: FakeSendGrid
) -> None:
    integration = await make_integration(api, fake, sandbox=True)
    connection = await connection_for(db, hub, integration["id"])

    result = await sendgrid().send_message(connection, email())

    assert result.provider_message_id is None
    assert fake.sent == []


async def test_a_refusal_is_permanent_and_in_sendgrids_words(
    api: ApiClient, db: Database, hub: IntegrationHub, fake: FakeSendGrid
) -> None:
    integration = await make_integration(api, fake)
    connection = await connection_for(db, hub, integration["id"])

    with pytest.raises(SendRejected) as bad_address:
        await sendgrid().send_message(connection, email(to="not-an-address"))
    with pytest.raises(SendRejected) as unverified:
        await sendgrid().send_message(connection, email(sender="someone@elsewhere.example"))

    assert bad_address.value.permanent is True
    assert str(bad_address.value) == (
        "SendGrid answered 400: Does not contain a valid address. (personalizations.0.to.0.email)"
    )
    assert unverified.value.permanent is True
    assert "403" in str(unverified.value)
    assert "verified Sender Identity" in str(unverified.value)
    assert fake.sent == []


async def test_a_rate_limit_is_waited_out_and_an_outage_left_to_the_retry_schedule(
    api: ApiClient, db: Database, hub: IntegrationHub, fake: FakeSendGrid
) -> None:
    integration = await make_integration(api, fake)
    connection = await connection_for(db, hub, integration["id"])

    fake.rate_limit_next(2)
    sent = await sendgrid().send_message(connection, email())
    assert sent.provider_message_id == fake.sent[0].message_id

    fake.rate_limit_next(10)
    with pytest.raises(GatewayError) as limited:
        await sendgrid().send_message(connection, email(reference="ntf_0002"))
    assert limited.value.status == 429

    fake.fail_next(1, status=503)
    with pytest.raises(GatewayError) as outage:
        await sendgrid().send_message(connection, email(reference="ntf_0003"))
    # A POST without an idempotency key is not resent in-process: the sender decides.
    assert outage.value.status == 503
    assert outage.value.attempts == 1
    assert len(fake.sent) == 1


async def test_the_api_key_never_reaches_the_payload_log(
    api: ApiClient, db: Database, hub: IntegrationHub, fake: FakeSendGrid
) -> None:
    integration = await make_integration(api, fake)
    connection = await connection_for(db, hub, integration["id"])
    await sendgrid().send_message(connection, email())
    await hub.drain()

    logged = await payload_log(api, integration["id"])
    assert "/v3/mail/send" in logged
    assert API_KEY not in logged


async def test_the_connection_check_needs_the_mail_send_permission(
    api: ApiClient, fake: FakeSendGrid
) -> None:
    integration = await make_integration(api, fake)
    path = f"/api/v1/integrations/{integration['id']}/test"

    ok = (await api.post(path)).json()
    fake.scopes = ["user.profile.read"]
    lacking = (await api.post(path)).json()
    await api.patch(
        f"/api/v1/integrations/{integration['id']}",
        {"credentials": {"api_key": "SG.revoked.000000000000000000000000"}},
    )
    refused = (await api.post(path)).json()

    assert ok["ok"] is True
    assert ok["message"] == "connected to SendGrid; the API key may send mail"
    assert lacking["ok"] is False
    assert "mail.send" in lacking["message"]
    assert refused["ok"] is False
    assert refused["message"] == (
        "SendGrid answered 401: The provided authorization grant is invalid, expired, or revoked"
    )


@pytest.mark.parametrize(
    ("config", "credentials", "field"),
    [
        ({}, {"api_key": API_KEY}, "config.from_email"),
        ({"from_email": "nobody"}, {"api_key": API_KEY}, "config.from_email"),
        ({"from_email": SENDER}, {}, "credentials.api_key"),
        ({"from_email": SENDER, "template_id": "1234"}, {"api_key": API_KEY}, "config.template_id"),
        (
            {"from_email": SENDER, "webhook_public_key": "bm90IGEga2V5"},
            {"api_key": API_KEY},
            "config.webhook_public_key",
        ),
    ],
)
async def test_settings_are_checked_when_saved(
    api: ApiClient, config: dict[str, Any], credentials: dict[str, Any], field: str
) -> None:
    response = await api.post(
        "/api/v1/integrations",
        {"provider": "sendgrid", "name": "SendGrid", "config": config, "credentials": credentials},
    )
    assert response.status_code == 422, response.text
    assert [error["field"] for error in response.json()["error"]["details"]["fields"]] == [field]


async def test_a_public_key_that_is_not_p256_is_refused_with_the_reason(api: ApiClient) -> None:
    other_curve = ec.generate_private_key(ec.SECP384R1()).public_key()
    pem = other_curve.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    response = await api.post(
        "/api/v1/integrations",
        {
            "provider": "sendgrid",
            "name": "SendGrid",
            "config": {"from_email": SENDER, "webhook_public_key": pem},
            "credentials": {"api_key": API_KEY},
        },
    )
    assert response.status_code == 422
    [error] = response.json()["error"]["details"]["fields"]
    assert "P-256" in error["message"]


# ---------------------------------------------------------------- the Event Webhook


async def test_a_signed_batch_is_accepted_once_and_read_as_delivery_reports(
    api: ApiClient, http: httpx.AsyncClient, db: Database, hub: IntegrationHub, fake: FakeSendGrid
) -> None:
    integration = await make_integration(api, fake)
    connection = await connection_for(db, hub, integration["id"])
    await sendgrid().send_message(connection, email())
    [mail] = fake.sent
    events = [fake.event(mail, "processed"), fake.event(mail, "delivered")]

    body, headers = fake.signed_batch(events)
    first = await http.post(integration["inbound_url"], content=body, headers=headers)
    again = await http.post(integration["inbound_url"], content=body, headers=headers)

    assert first.status_code == 200, first.text
    assert first.json()["status"] == "accepted"
    assert again.json()["status"] == "duplicate"
    stored = await api.get(f"/api/v1/integrations/{integration['id']}/inbound-events")
    [event] = stored.json()["data"]
    assert event["event_type"] == "batch"
    assert sendgrid().delivery_reports(event["event_type"], body) == [
        DeliveryReport(
            status="delivered",
            provider_message_id=mail.message_id,
            recipient="ana@example.org",
            reference="ntf_0001",
            reason="250 2.0.0 OK",
            occurred_at=datetime.fromtimestamp(events[1]["timestamp"], UTC),
        )
    ]


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        ("body", "no_matching_signature"),
        ("stale", "timestamp_out_of_range"),
        ("wrong_key", "no_matching_signature"),
        ("unsigned", "missing_header"),
        ("garbled", "malformed_header"),
    ],
)
async def test_a_batch_that_fails_verification_is_refused(
    api: ApiClient, http: httpx.AsyncClient, fake: FakeSendGrid, tamper: str, reason: str
) -> None:
    integration = await make_integration(api, fake)
    event = {"email": "ana@example.org", "event": "bounce", "sg_event_id": "ev1", "timestamp": 1}
    if tamper == "stale":
        body, headers = fake.signed_batch([event], timestamp=int(time.time()) - 3600)
    elif tamper == "wrong_key":
        body, headers = fake.signed_batch([event], key=ec.generate_private_key(ec.SECP256R1()))
    else:
        body, headers = fake.signed_batch([event])
    if tamper == "body":
        body = body.replace(b"bounce", b"delivered")
    elif tamper == "unsigned":
        del headers["X-Twilio-Email-Event-Webhook-Signature"]
    elif tamper == "garbled":
        headers["X-Twilio-Email-Event-Webhook-Signature"] = "not base64!"

    response = await http.post(integration["inbound_url"], content=body, headers=headers)

    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "SIGNATURE_INVALID"
    assert response.json()["error"]["details"]["reason"] == reason


async def test_events_are_refused_until_the_verification_key_is_set(
    api: ApiClient, http: httpx.AsyncClient, fake: FakeSendGrid
) -> None:
    integration = await make_integration(api, fake, webhook_public_key=None)
    body, headers = fake.signed_batch([{"event": "delivered", "sg_event_id": "ev1"}])

    response = await http.post(integration["inbound_url"], content=body, headers=headers)

    assert response.status_code == 400
    assert "webhook_public_key" in response.json()["error"]["message"]


async def test_a_pem_verification_key_verifies_as_the_base64_one(
    api: ApiClient, http: httpx.AsyncClient, fake: FakeSendGrid
) -> None:
    pem = (
        fake.signing_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    integration = await make_integration(api, fake, webhook_public_key=pem)
    body, headers = fake.signed_batch([{"event": "delivered", "sg_event_id": "ev1"}])

    response = await http.post(integration["inbound_url"], content=body, headers=headers)

    assert response.status_code == 200, response.text


async def test_a_batch_without_event_ids_is_not_understood(
    api: ApiClient, http: httpx.AsyncClient, fake: FakeSendGrid
) -> None:
    integration = await make_integration(api, fake)
    body, headers = fake.signed_batch([{"event": "delivered"}])

    response = await http.post(integration["inbound_url"], content=body, headers=headers)

    assert response.status_code == 422
    assert "sg_event_id" in response.json()["error"]["message"]


def test_delivery_reports_map_sendgrids_events() -> None:
    def event(kind: str, **fields: Any) -> dict[str, Any]:
        return {
            "email": "ana@example.org",
            "timestamp": 1_767_000_000,
            "event": kind,
            "sg_event_id": f"ev-{kind}",
            "sg_message_id": "AbC123xyz.filterdrecv-5bd4b9b4c-abcde-1-676F2A3B-7.0",
            "memberhub_reference": "ntf_9",
            **fields,
        }

    body = json.dumps(
        [
            event("processed"),
            event("delivered", response="250 OK"),
            event("bounce", type="bounce", reason="550 5.1.1 no such user", status="5.1.1"),
            event("bounce", type="blocked", reason="421 try later", status="4.0.0"),
            event("dropped", reason="Bounced Address", status="5.0.0"),
            event("spamreport"),
            event("unsubscribe"),
            event("group_unsubscribe", asm_group_id=7),
            event("open"),
            event("click", url="https://club.example.com"),
            event("deferred", response="400 try again later"),
        ]
    ).encode()

    reports = sendgrid().delivery_reports("batch", body)

    assert [(r.status, r.reason) for r in reports] == [
        ("delivered", "250 OK"),
        ("bounced", "550 5.1.1 no such user"),
        ("failed", "421 try later (4.0.0)"),
        ("dropped", "Bounced Address (5.0.0)"),
        ("spam_report", None),
        ("unsubscribed", None),
        ("unsubscribed", None),
    ]
    assert {r.provider_message_id for r in reports} == {"AbC123xyz"}
    assert {r.reference for r in reports} == {"ntf_9"}
    assert {r.recipient for r in reports} == {"ana@example.org"}
    assert {r.occurred_at for r in reports} == {datetime.fromtimestamp(1_767_000_000, UTC)}


def test_delivery_reports_of_a_body_that_is_no_batch_are_empty() -> None:
    assert sendgrid().delivery_reports("batch", b"{}") == []
    assert sendgrid().delivery_reports("batch", b"not json") == []
    assert sendgrid().delivery_reports("batch", b'["x", {"event": "delivered"}]') == [
        DeliveryReport(status="delivered", provider_message_id=None, recipient=None)
    ]


def test_the_verification_key_may_be_pasted_with_line_breaks() -> None:
    from memberhub.integrations.providers.sendgrid import load_public_key

    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    text = base64.b64encode(der).decode()
    assert load_public_key(text[:40] + "\n" + text[40:]).public_numbers() == key.public_numbers()
