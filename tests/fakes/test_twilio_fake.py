"""The fake Twilio answers the Messages resource as Twilio does (Twilio's own client reads
its answers), and signs status callbacks as Twilio's validator expects."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import parse_qsl

import httpx
import pytest
from twilio.base.exceptions import TwilioRestException
from twilio.request_validator import RequestValidator
from twilio.rest import Client

from tests.fakes.twilio import FakeTwilio, running_fake_twilio

ACCOUNT_SID = "AC" + "fedcba9876543210" * 2
AUTH_TOKEN = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
NUMBER = "+15005550006"


@pytest.fixture
async def fake() -> AsyncIterator[FakeTwilio]:
    async with running_fake_twilio(ACCOUNT_SID, AUTH_TOKEN) as fake:
        fake.add_number(NUMBER)
        yield fake


@pytest.fixture
async def http(fake: FakeTwilio) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=f"{fake.url}/2010-04-01/Accounts/{ACCOUNT_SID}",
        auth=(ACCOUNT_SID, AUTH_TOKEN),
        timeout=5,
    ) as client:
        yield client


def official_client(fake: FakeTwilio) -> Client:
    client = Client(ACCOUNT_SID, AUTH_TOKEN)
    client.api.base_url = fake.url
    return client


async def test_twilios_own_client_sends_through_the_fake(fake: FakeTwilio) -> None:
    client = official_client(fake)

    message = await asyncio.to_thread(
        client.messages.create, to="+60123456789", from_=NUMBER, body="Hello"
    )

    assert message.sid is not None
    assert message.sid.startswith("SM")
    assert message.status == "queued"
    assert fake.messages[message.sid]["body"] == "Hello"


async def test_twilios_own_client_reads_the_fakes_errors(fake: FakeTwilio) -> None:
    client = official_client(fake)

    with pytest.raises(TwilioRestException) as refused:
        await asyncio.to_thread(client.messages.create, to="12", from_=NUMBER, body="Hello")

    assert refused.value.status == 400
    assert refused.value.code == 21211
    assert refused.value.msg.endswith("Invalid 'To' Phone Number: 12")


async def test_a_wrong_token_is_a_401_with_code_20003(fake: FakeTwilio) -> None:
    async with httpx.AsyncClient(auth=(ACCOUNT_SID, "nope"), timeout=5) as client:
        response = await client.get(f"{fake.url}/2010-04-01/Accounts/{ACCOUNT_SID}.json")

    assert response.status_code == 401
    assert response.json() == {
        "code": 20003,
        "message": "Authentication Error - invalid username",
        "more_info": "https://www.twilio.com/docs/errors/20003",
        "status": 401,
    }


async def test_another_accounts_resources_are_not_found(fake: FakeTwilio) -> None:
    other = "AC" + "0" * 32
    async with httpx.AsyncClient(auth=(ACCOUNT_SID, AUTH_TOKEN), timeout=5) as client:
        response = await client.post(f"{fake.url}/2010-04-01/Accounts/{other}/Messages.json")

    assert response.status_code == 404
    assert response.json()["code"] == 20404


@pytest.mark.parametrize(
    ("form", "code"),
    [
        ({"From": NUMBER, "Body": "x"}, 21604),
        ({"To": "+60123456789", "Body": "x"}, 21603),
        ({"To": "+60123456789", "From": NUMBER}, 21602),
        ({"To": "+60123456789", "MessagingServiceSid": "MG" + "0" * 32, "Body": "x"}, 21701),
        ({"To": "+60123456789", "From": NUMBER, "Body": "x", "Colour": "red"}, 21612),
    ],
)
async def test_messages_are_checked_as_twilio_checks_them(
    http: httpx.AsyncClient, form: dict[str, str], code: int
) -> None:
    response = await http.post("/Messages.json", data=form)

    assert response.status_code == 400
    assert response.json()["code"] == code


async def test_the_rate_limit_answers_429_with_code_20429(
    fake: FakeTwilio, http: httpx.AsyncClient
) -> None:
    fake.set_rate_limit(1)
    form = {"To": "+60123456789", "From": NUMBER, "Body": "x"}
    first = await http.post("/Messages.json", data=form)
    second = await http.post("/Messages.json", data=form)

    assert first.status_code == 201
    assert (second.status_code, second.json()["code"]) == (429, 20429)


async def test_a_status_callback_validates_with_twilios_validator(
    fake: FakeTwilio, http: httpx.AsyncClient
) -> None:
    callback = "https://members.example.com/api/v1/inbound/int_1"
    created = await http.post(
        "/Messages.json",
        data={"To": "+60123456789", "From": NUMBER, "Body": "x", "StatusCallback": callback},
    )
    sid = created.json()["sid"]

    address, body, headers = fake.callback(sid, "undelivered", error_code=30003)

    params = dict(parse_qsl(body.decode()))
    assert address == callback
    assert params["MessageStatus"] == params["SmsStatus"] == "undelivered"
    assert params["ErrorCode"] == "30003"
    assert RequestValidator(AUTH_TOKEN).validate(address, params, headers["X-Twilio-Signature"])
    assert fake.messages[sid]["status"] == "undelivered"
