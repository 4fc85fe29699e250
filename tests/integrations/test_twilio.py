"""Twilio as a notification channel: SMS through the gateway to the fake, errors as
permanent or retryable refusals, and status callbacks, signed as Twilio's own library
signs them, through the inbound endpoint."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx
import pytest
from twilio.request_validator import (
    SIGNATURE_SETTINGS_HEADER,
    RequestValidator,
    get_signature_algorithm,
)

from memberhub.integrations import signatures
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
from tests.fakes.twilio import FakeTwilio, running_fake_twilio
from tests.integrations.channels import connection_for, create_integration, no_wait, payload_log
from tests.support import ApiClient

ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "f0e1d2c3b4a5968778695a4b3c2d1e0f"
NUMBER = "+15005550006"
MEMBER_PHONE = "+60123456789"


def twilio() -> MessageChannel:
    provider = get_provider("twilio")
    assert provider is not None
    channel = as_message_channel(provider)
    assert channel is not None
    return channel


def sms(**fields: Any) -> OutgoingMessage:
    return OutgoingMessage(
        **{
            "channel": "sms",
            "to": MEMBER_PHONE,
            "reference": "ntf_0001",
            "text": "You earned 120 points at The Club.",
            **fields,
        }
    )


@pytest.fixture
async def fake() -> AsyncIterator[FakeTwilio]:
    async with running_fake_twilio(ACCOUNT_SID, AUTH_TOKEN) as fake:
        fake.add_number(NUMBER)
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


async def make_integration(
    api: ApiClient, fake: FakeTwilio, *, callbacks: bool = True, **config: Any
) -> dict[str, Any]:
    """A Twilio integration; with `callbacks`, its status callback URL is its inbound URL."""
    settings = {"base_url": fake.url, "from_number": NUMBER, **config}
    integration = await create_integration(
        api, "twilio", settings, {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN}
    )
    if callbacks:
        settings["status_callback_url"] = integration["inbound_url"]
        response = await api.patch(
            f"/api/v1/integrations/{integration['id']}", {"config": settings}
        )
        assert response.status_code == 200, response.text
        integration = dict(response.json())
    return integration


# ---------------------------------------------------------------- sending


async def test_send_posts_the_form_twilio_expects_and_returns_the_message_sid(
    api: ApiClient, db: Database, hub: IntegrationHub, fake: FakeTwilio
) -> None:
    integration = await make_integration(api, fake)
    connection = await connection_for(db, hub, integration["id"])

    result = await twilio().send_message(connection, sms())

    [(sid, message)] = fake.messages.items()
    assert result.provider_message_id == sid
    assert sid.startswith("SM")
    assert message["to"] == MEMBER_PHONE
    assert message["from"] == NUMBER
    assert message["body"] == "You earned 120 points at The Club."
    assert message["status_callback"] == integration["inbound_url"]
    [(_method, path, headers)] = [r for r in fake.requests if r[0] == "POST"]
    assert path == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
    assert headers["content-type"] == "application/x-www-form-urlencoded"
    assert headers["authorization"].startswith("Basic ")


async def test_a_messaging_service_and_an_api_key_may_be_used_instead(
    api: ApiClient, db: Database, hub: IntegrationHub, fake: FakeTwilio
) -> None:
    service = fake.add_messaging_service()
    key_sid, key_secret = fake.add_api_key()
    integration = await create_integration(
        api,
        "twilio",
        {"base_url": fake.url, "messaging_service_sid": service},
        {"account_sid": ACCOUNT_SID, "api_key_sid": key_sid, "api_key_secret": key_secret},
    )
    connection = await connection_for(db, hub, integration["id"])

    result = await twilio().send_message(connection, sms())

    message = fake.messages[str(result.provider_message_id)]
    assert message["messaging_service_sid"] == service
    assert message["status_callback"] is None


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (sms(to="0123 456"), 21211),
        (sms(sender="+15550001111"), 21606),
        (sms(text=""), 21602),
        (sms(text="x" * 1601), 21617),
    ],
)
async def test_a_refused_message_is_permanent_and_names_twilios_error(
    api: ApiClient,
    db: Database,
    hub: IntegrationHub,
    fake: FakeTwilio,
    message: OutgoingMessage,
    code: int,
) -> None:
    integration = await make_integration(api, fake, callbacks=False)
    connection = await connection_for(db, hub, integration["id"])

    with pytest.raises(SendRejected) as refused:
        await twilio().send_message(connection, message)

    assert refused.value.permanent is True
    assert str(refused.value).startswith(f"Twilio answered 400 (error {code}): ")
    assert fake.messages == {}


async def test_an_unsubscribed_recipient_is_a_permanent_21610(
    api: ApiClient, db: Database, hub: IntegrationHub, fake: FakeTwilio
) -> None:
    integration = await make_integration(api, fake, callbacks=False)
    connection = await connection_for(db, hub, integration["id"])
    fake.opt_out(MEMBER_PHONE)

    with pytest.raises(SendRejected) as refused:
        await twilio().send_message(connection, sms())

    assert refused.value.permanent is True
    assert str(refused.value) == (
        "Twilio answered 400 (error 21610): Attempt to send to unsubscribed recipient"
    )


async def test_a_rate_limit_is_waited_out_and_an_outage_left_to_the_retry_schedule(
    api: ApiClient, db: Database, hub: IntegrationHub, fake: FakeTwilio
) -> None:
    integration = await make_integration(api, fake, callbacks=False)
    connection = await connection_for(db, hub, integration["id"])

    fake.rate_limit_next(2)
    assert (await twilio().send_message(connection, sms())).provider_message_id
    fake.rate_limit_next(10)
    with pytest.raises(GatewayError) as limited:
        await twilio().send_message(connection, sms())
    fake.fail_next(1)
    with pytest.raises(GatewayError) as outage:
        await twilio().send_message(connection, sms())

    assert limited.value.status == 429
    assert (outage.value.status, outage.value.attempts) == (500, 1)
    assert len(fake.messages) == 1


async def test_the_auth_token_never_reaches_the_payload_log(
    api: ApiClient, db: Database, hub: IntegrationHub, fake: FakeTwilio
) -> None:
    integration = await make_integration(api, fake)
    connection = await connection_for(db, hub, integration["id"])
    await twilio().send_message(connection, sms())
    await hub.drain()

    logged = await payload_log(api, integration["id"])
    assert "Messages.json" in logged
    assert AUTH_TOKEN not in logged


async def test_the_connection_check_reads_the_account(api: ApiClient, fake: FakeTwilio) -> None:
    integration = await make_integration(api, fake, callbacks=False)
    path = f"/api/v1/integrations/{integration['id']}/test"

    ok = (await api.post(path)).json()
    await api.patch(
        f"/api/v1/integrations/{integration['id']}",
        {"credentials": {"auth_token": "00000000000000000000000000000000"}},
    )
    refused = (await api.post(path)).json()

    assert ok["ok"] is True
    assert ok["message"] == "connected to Twilio account Memberhub Test Club"
    assert refused["ok"] is False
    assert "20003" in refused["message"]


@pytest.mark.parametrize(
    ("config", "credentials", "expected"),
    [
        ({}, {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN}, "config"),
        (
            {"from_number": "0123"},
            {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN},
            "config.from_number",
        ),
        (
            {"from_number": NUMBER},
            {"account_sid": "AC123", "auth_token": AUTH_TOKEN},
            "credentials.account_sid",
        ),
        ({"from_number": NUMBER}, {"auth_token": AUTH_TOKEN}, "credentials.account_sid"),
    ],
)
async def test_settings_are_checked_field_by_field_when_saved(
    api: ApiClient, config: dict[str, Any], credentials: dict[str, Any], expected: str
) -> None:
    response = await api.post(
        "/api/v1/integrations",
        {"provider": "twilio", "name": "Twilio", "config": config, "credentials": credentials},
    )
    assert response.status_code == 422, response.text
    [error] = response.json()["error"]["details"]["fields"]
    assert error["field"] == expected
    if expected == "config":
        assert "from_number or messaging_service_sid" in error["message"]


@pytest.mark.parametrize(
    ("config", "credentials", "message"),
    [
        (
            {"from_number": NUMBER},
            {"account_sid": ACCOUNT_SID},
            "Set credentials.auth_token, or an API key (api_key_sid and secret).",
        ),
        (
            {"from_number": NUMBER},
            {"account_sid": ACCOUNT_SID, "api_key_sid": "SK" + "0" * 32},
            "Set both credentials.api_key_sid and credentials.api_key_secret.",
        ),
        (
            {"from_number": NUMBER, "status_callback_url": "https://club.example.com/in"},
            {
                "account_sid": ACCOUNT_SID,
                "api_key_sid": "SK" + "0" * 32,
                "api_key_secret": "a-secret-of-the-key",
            },
            "Status callbacks are signed with the Auth Token: set credentials.auth_token or "
            "remove config.status_callback_url.",
        ),
    ],
)
async def test_settings_are_checked_together_when_saved(
    api: ApiClient, config: dict[str, Any], credentials: dict[str, Any], message: str
) -> None:
    response = await api.post(
        "/api/v1/integrations",
        {"provider": "twilio", "name": "Twilio", "config": config, "credentials": credentials},
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["message"] == message


# ---------------------------------------------------------------- status callbacks


async def test_a_signed_status_callback_is_accepted_once_and_read_as_a_report(
    api: ApiClient, http: httpx.AsyncClient, db: Database, hub: IntegrationHub, fake: FakeTwilio
) -> None:
    integration = await make_integration(api, fake)
    connection = await connection_for(db, hub, integration["id"])
    sid = (await twilio().send_message(connection, sms())).provider_message_id
    assert sid is not None

    address, body, headers = fake.callback(sid, "delivered")
    first = await http.post(address, content=body, headers=headers)
    again = await http.post(address, content=body, headers=headers)
    failed = await fake.report(sid, "undelivered", via=http, error_code=30003)

    assert first.status_code == 200, first.text
    assert first.json()["status"] == "accepted"
    assert again.json()["status"] == "duplicate"
    assert failed.json()["status"] == "accepted"
    events = (await api.get(f"/api/v1/integrations/{integration['id']}/inbound-events")).json()
    assert sorted(e["provider_event_id"] for e in events["data"]) == [
        f"{sid}:delivered",
        f"{sid}:undelivered",
    ]
    [report] = twilio().delivery_reports("delivered", body)
    assert report.status == "delivered"
    assert report.provider_message_id == sid
    assert report.recipient == MEMBER_PHONE
    assert report.reference is None
    assert report.occurred_at is not None
    assert abs((report.occurred_at - datetime.now(UTC)).total_seconds()) < 120


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        ("body", "no_matching_signature"),
        ("wrong_token", "no_matching_signature"),
        ("other_url", "no_matching_signature"),
        ("unsigned", "missing_header"),
    ],
)
async def test_a_callback_that_fails_verification_is_refused(
    api: ApiClient,
    http: httpx.AsyncClient,
    db: Database,
    hub: IntegrationHub,
    fake: FakeTwilio,
    tamper: str,
    reason: str,
) -> None:
    integration = await make_integration(api, fake)
    connection = await connection_for(db, hub, integration["id"])
    sid = (await twilio().send_message(connection, sms())).provider_message_id
    assert sid is not None
    address, body, headers = fake.callback(sid, "delivered")
    params = dict(parse_qsl(body.decode()))
    if tamper == "body":
        body = urlencode({**params, "MessageStatus": "failed"}).encode()
    elif tamper == "wrong_token":
        headers["X-Twilio-Signature"] = RequestValidator("0" * 32).compute_signature(
            address, params
        )
    elif tamper == "other_url":
        headers["X-Twilio-Signature"] = RequestValidator(AUTH_TOKEN).compute_signature(
            "https://attacker.example/hook", params
        )
    else:
        del headers["X-Twilio-Signature"]

    response = await http.post(address, content=body, headers=headers)

    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "SIGNATURE_INVALID"
    assert response.json()["error"]["details"]["reason"] == reason


@pytest.mark.parametrize("host", ["testserver:abc", "testserver:99999"])
async def test_a_callback_with_a_host_whose_port_is_not_one_is_refused(
    api: ApiClient, http: httpx.AsyncClient, fake: FakeTwilio, host: str
) -> None:
    # Without a status callback URL, the signed URL is the request's own.
    integration = await make_integration(api, fake, callbacks=False)
    address = f"/api/v1/inbound/{integration['id']}"
    headers = {"Host": host, "X-Twilio-Signature": "c2lnbmF0dXJl"}
    body = urlencode({"MessageSid": "SM1", "MessageStatus": "delivered"})
    response = await http.post(
        address,
        content=body,
        headers={**headers, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "SIGNATURE_INVALID"


async def test_callbacks_behind_a_proxy_are_checked_against_the_configured_url(
    api: ApiClient, http: httpx.AsyncClient, fake: FakeTwilio
) -> None:
    integration = await make_integration(api, fake, callbacks=False)
    public = f"https://members.example.com/api/v1/inbound/{integration['id']}"
    await api.patch(
        f"/api/v1/integrations/{integration['id']}",
        {"config": {"base_url": fake.url, "from_number": NUMBER, "status_callback_url": public}},
    )
    params = {"MessageSid": "SM" + "1" * 32, "MessageStatus": "sent", "To": MEMBER_PHONE}
    signature = RequestValidator(AUTH_TOKEN).compute_signature(public, params)

    response = await http.post(
        integration["inbound_url"],
        content=urlencode(params).encode(),
        headers={
            "X-Twilio-Signature": signature,
            "Content-Type": "application/x-www-form-urlencoded",
        },
    )

    assert response.status_code == 200, response.text


async def test_the_secondary_auth_token_is_accepted_while_it_is_promoted(
    api: ApiClient, http: httpx.AsyncClient, fake: FakeTwilio
) -> None:
    integration = await make_integration(api, fake)
    secondary = "a" * 32
    await api.patch(
        f"/api/v1/integrations/{integration['id']}",
        {"credentials": {"previous_auth_token": secondary}},
    )
    params = {"MessageSid": "SM" + "2" * 32, "MessageStatus": "sent"}
    signature = RequestValidator(secondary).compute_signature(integration["inbound_url"], params)

    response = await http.post(
        integration["inbound_url"],
        content=urlencode(params).encode(),
        headers={"X-Twilio-Signature": signature},
    )

    assert response.status_code == 200, response.text


@pytest.mark.parametrize("algorithm", ["HMAC_SHA1", "HMAC_SHA256"])
async def test_callbacks_signed_by_a_webhooks_rule_are_checked_with_its_shared_key(
    api: ApiClient, http: httpx.AsyncClient, fake: FakeTwilio, algorithm: str
) -> None:
    integration = await make_integration(api, fake)
    url = f"/api/v1/integrations/{integration['id']}"
    shared_key_secret = "s" * 32
    params = {"MessageSid": "SM" + "3" * 32, "MessageStatus": "sent"}
    settings = f"key=webhooks_sharedkey_{'4' * 32},algorithm={algorithm}"
    rule = RequestValidator(shared_key_secret)
    headers = {
        "X-Twilio-Signature": rule.compute_signature(
            integration["inbound_url"], params, get_signature_algorithm(settings)
        ),
        SIGNATURE_SETTINGS_HEADER: settings,
    }
    assert rule.validate(
        integration["inbound_url"], params, headers["X-Twilio-Signature"], algorithm
    )

    async def deliver() -> httpx.Response:
        body = urlencode(params).encode()
        return await http.post(integration["inbound_url"], content=body, headers=headers)

    # Without the SharedKey secret the Auth Token cannot verify it: refused, saying why.
    refused = await deliver()
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["code"] == "SIGNATURE_INVALID"
    assert "webhook_shared_key_secret" in refused.json()["error"]["message"]
    saved = await api.patch(url, {"credentials": {"webhook_shared_key_secret": shared_key_secret}})
    assert saved.status_code == 200, saved.text
    assert shared_key_secret not in saved.text

    accepted = await deliver()
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["status"] == "accepted"
    # The SharedKey secret verifies only what a rule signed: not an Auth Token signature.
    del headers[SIGNATURE_SETTINGS_HEADER]
    params["MessageStatus"] = "delivered"
    headers["X-Twilio-Signature"] = RequestValidator(shared_key_secret).compute_signature(
        integration["inbound_url"], params
    )
    assert (await deliver()).json()["error"]["code"] == "SIGNATURE_INVALID"


async def test_a_callback_without_a_message_sid_is_not_understood(
    api: ApiClient, http: httpx.AsyncClient, fake: FakeTwilio
) -> None:
    integration = await make_integration(api, fake)
    params = {"AccountSid": ACCOUNT_SID}
    signature = RequestValidator(AUTH_TOKEN).compute_signature(integration["inbound_url"], params)

    response = await http.post(
        integration["inbound_url"],
        content=urlencode(params).encode(),
        headers={"X-Twilio-Signature": signature},
    )

    assert response.status_code == 422
    assert "MessageSid" in response.json()["error"]["message"]


# ---------------------------------------------------------------- the signature, against Twilio's


URLS = [
    "https://members.example.com/api/v1/inbound/int_1",
    "https://members.example.com:443/api/v1/inbound/int_1?x=1&y=two",
    "http://127.0.0.1:8000/api/v1/inbound/int_1",
]
FORMS: list[list[tuple[str, str]]] = [
    [],
    [("MessageSid", "SM1"), ("MessageStatus", "delivered"), ("To", "+60123456789")],
    [("B", "2"), ("A", "é ü"), ("A", "1"), ("A", "1"), ("Empty", "")],
]


def _multidict(pairs: list[tuple[str, str]]) -> Any:
    """The parameters as a framework hands them to Twilio's validator (`getall`)."""

    class MultiDict(dict[str, str]):
        def getall(self, name: str) -> list[str]:
            return [value for key, value in pairs if key == name]

    return MultiDict(pairs)


@pytest.mark.parametrize("url", URLS)
@pytest.mark.parametrize("pairs", FORMS)
def test_a_signature_made_by_twilios_validator_verifies_with_ours(
    url: str, pairs: list[tuple[str, str]]
) -> None:
    signature = RequestValidator(AUTH_TOKEN).compute_signature(url, _multidict(pairs))

    signatures.verify_twilio(
        url=url, body=urlencode(pairs).encode(), signature=signature, secrets=[AUTH_TOKEN]
    )
    with pytest.raises(signatures.SignatureInvalid):
        signatures.verify_twilio(
            url=url, body=urlencode(pairs).encode(), signature=signature, secrets=["x" * 32]
        )


@pytest.mark.parametrize("url", URLS)
@pytest.mark.parametrize("pairs", FORMS)
@pytest.mark.parametrize("algorithm", ["sha1", "sha256"])
def test_a_signature_made_by_ours_validates_with_twilios_validator(
    url: str, pairs: list[tuple[str, str]], algorithm: Any
) -> None:
    ours = signatures.twilio_signature(url, pairs, AUTH_TOKEN, algorithm)
    named = {"sha1": "HMAC_SHA1", "sha256": "HMAC_SHA256"}[algorithm]

    assert RequestValidator(AUTH_TOKEN).validate(url, _multidict(pairs), ours, named)


def test_a_default_port_in_the_signed_url_is_optional_as_for_twilios_validator() -> None:
    params = [("MessageSid", "SM1"), ("MessageStatus", "sent")]
    signed_with_port = signatures.twilio_signature(
        "https://members.example.com:443/in", params, AUTH_TOKEN
    )

    signatures.verify_twilio(
        url="https://members.example.com/in",
        body=urlencode(params).encode(),
        signature=signed_with_port,
        secrets=[AUTH_TOKEN],
    )


def test_a_json_body_is_checked_by_its_bodysha256() -> None:
    body = json.dumps({"MessageSid": "SM1"}).encode()
    url = f"https://members.example.com/in?bodySHA256={hashlib.sha256(body).hexdigest()}"
    signature = RequestValidator(AUTH_TOKEN).compute_signature(url, {})
    assert RequestValidator(AUTH_TOKEN).validate(url, body.decode(), signature)

    signatures.verify_twilio(url=url, body=body, signature=signature, secrets=[AUTH_TOKEN])
    with pytest.raises(signatures.SignatureInvalid):
        signatures.verify_twilio(
            url=url, body=body + b" ", signature=signature, secrets=[AUTH_TOKEN]
        )


def test_delivery_reports_map_twilios_statuses_and_error_codes() -> None:
    def report(status: str, code: str | None = None) -> list[DeliveryReport]:
        fields = {"MessageSid": "SM9", "MessageStatus": status, "To": MEMBER_PHONE}
        if code:
            fields["ErrorCode"] = code
        return twilio().delivery_reports(status, urlencode(fields).encode())

    assert report("queued") == []
    assert report("sending") == []
    assert [r.status for r in report("sent")] == ["sent"]
    assert [r.status for r in report("delivered")] == ["delivered"]
    assert [(r.status, r.reason) for r in report("undelivered", "30003")] == [
        ("failed", "Twilio error 30003")
    ]
    assert [r.status for r in report("failed", "21610")] == ["unsubscribed"]
    assert [r.status for r in report("undelivered", "30005")] == ["bounced"]
    [delivered] = report("delivered")
    assert (delivered.provider_message_id, delivered.recipient) == ("SM9", MEMBER_PHONE)
