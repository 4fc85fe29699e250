"""End to end through SendGrid: a notification goes out by Mail Send, SendGrid's signed
bounce event comes back through the inbound endpoint, and the address is suppressed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from memberhub.integrations.inbound import process_inbound
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.settings import Settings
from tests.fakes.sendgrid import FakeSendGrid, running_fake_sendgrid
from tests.integrations.test_sendgrid import API_KEY, SENDER, make_integration
from tests.notifications.conftest import (
    award,
    consenting_member,
    deliver,
    hub_of,
    notifications,
)
from tests.support import ApiClient


@pytest.fixture
async def sendgrid_fake() -> AsyncIterator[FakeSendGrid]:
    async with running_fake_sendgrid(API_KEY, ec.generate_private_key(ec.SECP256R1())) as fake:
        fake.verify_sender(SENDER)
        yield fake


async def test_a_sendgrid_bounce_suppresses_the_address_for_later_messages(
    api: ApiClient,
    http: httpx.AsyncClient,
    db: Database,
    app: Any,
    settings: Settings,
    sendgrid_fake: FakeSendGrid,
) -> None:
    integration = await make_integration(api, sendgrid_fake)
    member = await consenting_member(api, email="gone@example.org")
    await award(api, member["id"], 120, notify=True)
    await deliver(db, app, settings)

    sent = {mail.custom_args.get("memberhub_reference"): mail for mail in sendgrid_fake.sent}
    logged = await notifications(api, member_id=member["id"])
    assert {n["status"] for n in logged} == {"sent"}
    assert {n["id"] for n in logged} == set(sent), "one SendGrid message per notification"
    points_mail = next(n for n in logged if n["message_type"] == "points_earned")
    mail = sent[points_mail["id"]]
    assert mail.to == "gone@example.org"
    assert points_mail["provider_message_id"] == mail.message_id

    # SendGrid reports the bounce, signed, through the inbound endpoint; the worker reads it.
    body, headers = sendgrid_fake.signed_batch([sendgrid_fake.event(mail, "bounce")])
    accepted = await http.post(integration["inbound_url"], content=body, headers=headers)
    assert accepted.status_code == 200, accepted.text
    assert await process_inbound(db, utcnow(), hub_of(app)) == 1

    bounced = next(n for n in await notifications(api) if n["id"] == points_mail["id"])
    assert bounced["status"] == "bounced"
    listed = (await api.get("/api/v1/notification-suppressions")).json()["data"]
    assert [(s["channel"], s["address"], s["reason"]) for s in listed] == [
        ("email", "gone@example.org", "bounced")
    ]

    await award(api, member["id"], 5, notify=True)
    await deliver(db, app, settings)
    later = [
        n
        for n in await notifications(api, message_type="points_earned")
        if n["id"] != points_mail["id"]
    ]
    assert [(n["status"], n["reason"]) for n in later] == [
        ("suppressed", "suppressed_address:bounced")
    ]
    assert len(sendgrid_fake.sent) == len(sent), "nothing more went to SendGrid"
