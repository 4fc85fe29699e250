"""Mailchimp's list webhooks: an unsubscribe or a cleaned address withdraws the member's
email-marketing consent (recorded in the consent history) and the member is never written
again; a profile update brings the names back; only a URL with the secret is heard."""

from __future__ import annotations

from typing import Any

import httpx

from memberhub.integrations.hub import IntegrationHub
from memberhub.kit.db import Database
from tests.fakes.mailchimp import FakeMailchimp
from tests.marketing.conftest import WEBHOOK_SECRET, create_mailchimp, status, tick
from tests.support import ApiClient

FORM = {"Content-Type": "application/x-www-form-urlencoded", "User-Agent": "MailChimp"}


async def post_webhook(
    http: httpx.AsyncClient, integration_id: str, body: bytes, token: str = WEBHOOK_SECRET
) -> httpx.Response:
    return await http.post(
        f"/api/v1/inbound/{integration_id}", params={"token": token}, content=body, headers=FORM
    )


async def consent(api: ApiClient, member_id: str) -> dict[str, Any]:
    response = await api.get(f"/api/v1/members/{member_id}")
    assert response.status_code == 200, response.text
    return dict(response.json()["consent"])


async def test_an_unsubscribe_withdraws_consent_and_the_member_is_never_sent_again(
    api: ApiClient,
    http: httpx.AsyncClient,
    db: Database,
    hub: IntegrationHub,
    mailchimp: FakeMailchimp,
) -> None:
    list_id = mailchimp.add_list()
    member = await api.create_member(first_name="Ana", consent={"marketing_email": True})
    integration = await create_mailchimp(api, mailchimp, list_id)
    await tick(db, hub)
    mailchimp.set_status(list_id, member["email"], "unsubscribed")  # the reader clicked
    body = mailchimp.webhook_body("unsubscribe", list_id, member["email"].upper())

    forged = await post_webhook(http, integration["id"], body, token="guessed-token-000000")
    received = await post_webhook(http, integration["id"], body)
    again = await post_webhook(http, integration["id"], body)  # Mailchimp retries
    await tick(db, hub)
    writes_after_webhook = len(mailchimp.writes())
    await api.patch(f"/api/v1/members/{member['id']}", {"first_name": "Ana Maria"})
    await tick(db, hub)

    assert forged.status_code == 400
    assert received.status_code == 200, received.text
    assert again.json()["status"] == "duplicate"
    assert (await consent(api, member["id"]))["marketing_email"] is False
    history = await api.get(f"/api/v1/members/{member['id']}/consent-history")
    withdrawn = [c for c in history.json()["data"] if c["purpose"] == "marketing_email"]
    assert withdrawn[-1]["granted"] is False
    assert withdrawn[-1]["source"] == "vendor_webhook"
    assert withdrawn[-1]["actor"] == f"integration:{integration['id']}"
    assert len(mailchimp.writes()) == writes_after_webhook  # nothing more about the member
    assert mailchimp.member(list_id, member["email"])["status"] == "unsubscribed"  # type: ignore[index]
    assert (await status(api, integration["id"]))["contacts"] == {"unsubscribed": 1}


async def test_a_cleaned_address_is_never_written_again_even_with_consent_given_again(
    api: ApiClient,
    http: httpx.AsyncClient,
    db: Database,
    hub: IntegrationHub,
    mailchimp: FakeMailchimp,
) -> None:
    list_id = mailchimp.add_list()
    member = await api.create_member(consent={"marketing_email": True})
    integration = await create_mailchimp(api, mailchimp, list_id)
    await tick(db, hub)
    mailchimp.set_status(list_id, member["email"], "cleaned")
    received = await post_webhook(
        http, integration["id"], mailchimp.webhook_body("cleaned", list_id, member["email"])
    )
    await tick(db, hub)
    writes = len(mailchimp.writes())
    regiven = await api.patch(
        f"/api/v1/members/{member['id']}", {"consent": {"marketing_email": True}}
    )
    await tick(db, hub)

    assert received.status_code == 200, received.text
    assert regiven.status_code == 200, regiven.text
    assert len(mailchimp.writes()) == writes
    assert (await status(api, integration["id"]))["contacts"] == {"cleaned": 1}


async def test_a_member_whose_address_was_cleaned_is_subscribed_at_a_new_one(
    api: ApiClient,
    http: httpx.AsyncClient,
    db: Database,
    hub: IntegrationHub,
    mailchimp: FakeMailchimp,
) -> None:
    list_id = mailchimp.add_list()
    member = await api.create_member(
        email="bouncing@example.com", consent={"marketing_email": True}
    )
    integration = await create_mailchimp(api, mailchimp, list_id)
    await tick(db, hub)
    mailchimp.set_status(list_id, "bouncing@example.com", "cleaned")
    received = await post_webhook(
        http, integration["id"], mailchimp.webhook_body("cleaned", list_id, "bouncing@example.com")
    )
    assert received.status_code == 200, received.text
    await tick(db, hub)
    fixed = await api.patch(
        f"/api/v1/members/{member['id']}",
        {"email": "working@example.com", "consent": {"marketing_email": True}},
    )
    assert fixed.status_code == 200, fixed.text
    await tick(db, hub)
    held = mailchimp.member(list_id, "working@example.com")
    assert held is not None
    assert held["status"] == "subscribed"
    cleaned = mailchimp.member(list_id, "bouncing@example.com")
    assert cleaned is not None
    assert cleaned["status"] == "cleaned"  # the bounced address is left alone


async def test_a_profile_update_brings_the_names_back(
    api: ApiClient,
    http: httpx.AsyncClient,
    db: Database,
    hub: IntegrationHub,
    mailchimp: FakeMailchimp,
) -> None:
    list_id = mailchimp.add_list()
    member = await api.create_member(first_name="Ana", consent={"marketing_email": True})
    integration = await create_mailchimp(api, mailchimp, list_id)
    await tick(db, hub)
    body = mailchimp.webhook_body("profile", list_id, member["email"], FNAME="Anabel", LNAME="Ng")

    received = await post_webhook(http, integration["id"], body)
    await tick(db, hub)

    assert received.status_code == 200, received.text
    shown = (await api.get(f"/api/v1/members/{member['id']}")).json()
    assert (shown["first_name"], shown["last_name"]) == ("Anabel", "Ng")
    assert (await consent(api, member["id"]))["marketing_email"] is True


async def test_the_webhook_url_check_answers_only_with_the_secret(
    api: ApiClient, http: httpx.AsyncClient, mailchimp: FakeMailchimp
) -> None:
    integration = await create_mailchimp(api, mailchimp, mailchimp.add_list())
    other = await api.post(
        "/api/v1/integrations",
        {
            "provider": "webhook",
            "name": "Hooks",
            "config": {},
            "credentials": {"signing_secret": "whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQ="},
        },
    )
    assert other.status_code == 201, other.text

    good = await http.get(f"/api/v1/inbound/{integration['id']}", params={"token": WEBHOOK_SECRET})
    bad = await http.get(f"/api/v1/inbound/{integration['id']}", params={"token": "nope"})
    bare = await http.get(f"/api/v1/inbound/{integration['id']}")
    not_mailchimp = await http.get(f"/api/v1/inbound/{other.json()['id']}")
    unknown = await http.get("/api/v1/inbound/int_doesnotexist")

    assert good.status_code == 200
    assert bad.status_code == 400
    assert bare.status_code == 400
    assert not_mailchimp.status_code == 404  # no other provider answers a GET
    assert unknown.status_code == 404


async def test_a_body_that_is_not_a_mailchimp_webhook_is_refused(
    api: ApiClient, http: httpx.AsyncClient, mailchimp: FakeMailchimp
) -> None:
    integration = await create_mailchimp(api, mailchimp, mailchimp.add_list())

    response = await post_webhook(http, integration["id"], b"data[email]=a@example.com")

    assert response.status_code == 422, response.text
    events = await api.get(f"/api/v1/integrations/{integration['id']}/inbound-events")
    assert events.json()["data"] == []
