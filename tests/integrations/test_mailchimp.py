"""The Mailchimp provider: the data centre from the API key, Basic authentication, the
connection test against the fake, and what the list webhook's form bodies mean."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import AsyncIterator

import pytest

from memberhub.integrations.providers import get_provider
from memberhub.integrations.providers.base import AudienceChange, InboundRequest
from memberhub.integrations.providers.mailchimp import (
    Mailchimp,
    MailchimpConfig,
    MailchimpCredentials,
    data_centre,
    subscriber_hash,
    webhook_token_matches,
)
from memberhub.integrations.signatures import SignatureInvalid
from tests.fakes.mailchimp import FakeMailchimp, running_fake_mailchimp
from tests.support import ApiClient

SECRET = "webhook-secret-0123456789"


@pytest.fixture
async def fake() -> AsyncIterator[FakeMailchimp]:
    async with running_fake_mailchimp() as running:
        yield running


def provider() -> Mailchimp:
    found = get_provider("mailchimp")
    assert isinstance(found, Mailchimp)
    return found


def test_the_api_keys_suffix_names_the_data_centre() -> None:
    config = MailchimpConfig(list_id="abc123")
    mailchimp = provider()

    assert data_centre("0123456789abcdef0123456789abcdef-us21") == "us21"
    assert data_centre("no-suffix-here") is None
    assert (
        mailchimp.base_url_for(config, {"api_key": "0123abcd-us21"})
        == "https://us21.api.mailchimp.com/3.0"
    )
    assert (
        mailchimp.base_url_for(
            MailchimpConfig(list_id="abc123", server_prefix="us6"), {"access_token": "t"}
        )
        == "https://us6.api.mailchimp.com/3.0"
    )
    overridden = MailchimpConfig(list_id="abc123", base_url="http://127.0.0.1:9/3.0")
    assert mailchimp.base_url_for(overridden, {"api_key": "k-us21"}) == "http://127.0.0.1:9/3.0"


def test_an_api_key_goes_as_basic_auth_and_a_token_as_bearer() -> None:
    basic = provider().auth_headers({"api_key": "secret-us21"})["Authorization"]
    bearer = provider().auth_headers({"access_token": "tok"})["Authorization"]

    scheme, _, encoded = basic.partition(" ")
    assert scheme == "Basic"
    assert base64.b64decode(encoded).decode().split(":", 1)[1] == "secret-us21"
    assert bearer == "Bearer tok"


def test_settings_without_a_way_to_the_data_centre_are_refused() -> None:
    config = MailchimpConfig(list_id="abc123")
    with pytest.raises(ValueError, match="data centre"):
        provider().validate(config, MailchimpCredentials(api_key="keywithoutsuffix"))
    with pytest.raises(ValueError, match="server_prefix"):
        provider().validate(config, MailchimpCredentials(access_token="token"))
    with pytest.raises(ValueError, match="api_key"):
        provider().validate(config, MailchimpCredentials())
    provider().validate(config, MailchimpCredentials(api_key="k-us21"))


def test_the_subscriber_hash_is_the_md5_of_the_lower_cased_address() -> None:
    assert subscriber_hash(" Ana@Example.COM ") == subscriber_hash("ana@example.com")
    expected = hashlib.md5(b"ana@example.com", usedforsecurity=False).hexdigest()
    assert subscriber_hash("ana@example.com") == expected


def test_the_webhook_token_is_compared_with_the_secret() -> None:
    credentials = {"webhook_secret": SECRET}
    assert webhook_token_matches(f"https://h/api/v1/inbound/int_1?token={SECRET}", credentials)
    assert not webhook_token_matches("https://h/api/v1/inbound/int_1?token=nope", credentials)
    assert not webhook_token_matches("https://h/api/v1/inbound/int_1", credentials)
    assert not webhook_token_matches(f"https://h/x?token={SECRET}", {})
    request = InboundRequest("POST", "https://h/x?token=wrong", {}, b"type=unsubscribe", 0.0)
    with pytest.raises(SignatureInvalid):
        provider().verify(request, credentials, MailchimpConfig(list_id="abc123"))


def test_the_list_webhooks_form_bodies_become_audience_changes(fake: FakeMailchimp) -> None:
    mailchimp = provider()
    list_id = "abc123"

    unsubscribed = mailchimp.audience_changes(
        "unsubscribe", fake.webhook_body("unsubscribe", list_id, "ana@example.com")
    )
    cleaned = mailchimp.audience_changes(
        "cleaned", fake.webhook_body("cleaned", list_id, "bo@example.com", reason="abuse")
    )
    profile = mailchimp.audience_changes(
        "profile", fake.webhook_body("profile", list_id, "cy@example.com", FNAME="Cy", LNAME="Li")
    )
    moved = mailchimp.audience_changes(
        "upemail", fake.webhook_body("upemail", list_id, "old@example.com", new_email="n@x.org")
    )
    subscribed = mailchimp.audience_changes(
        "subscribe", fake.webhook_body("subscribe", list_id, "dee@example.com")
    )

    assert unsubscribed == [AudienceChange("unsubscribed", "ana@example.com", reason="manual")]
    assert cleaned == [AudienceChange("cleaned", "bo@example.com", reason="abuse")]
    assert profile == [AudienceChange("profile", "cy@example.com", first_name="Cy", last_name="Li")]
    assert moved == [AudienceChange("email_changed", "old@example.com", new_email="n@x.org")]
    assert subscribed == []  # consent is given in memberhub, never by the vendor
    identity = mailchimp.identify(
        InboundRequest("POST", "u", {}, fake.webhook_body("cleaned", list_id, "bo@x.org"), 0.0)
    )
    assert identity.event_type == "cleaned"
    with pytest.raises(ValueError, match="type"):
        mailchimp.identify(InboundRequest("POST", "u", {}, b"data[email]=x", 0.0))


async def test_the_connection_test_pings_and_reads_the_audience(
    api: ApiClient, fake: FakeMailchimp
) -> None:
    list_id = fake.add_list("Club news")
    good = await api.post(
        "/api/v1/integrations",
        {
            "provider": "mailchimp",
            "name": "Mailchimp",
            "config": {"base_url": fake.url, "list_id": list_id},
            "credentials": {"api_key": fake.api_key},
        },
    )
    wrong_key = await api.post(
        "/api/v1/integrations",
        {
            "provider": "mailchimp",
            "name": "Wrong key",
            "config": {"base_url": fake.url, "list_id": list_id},
            "credentials": {"api_key": "ffffffffffffffffffffffffffffffff-us21"},
        },
    )
    assert good.status_code == 201, good.text
    assert wrong_key.status_code == 201, wrong_key.text

    passed = await api.post(f"/api/v1/integrations/{good.json()['id']}/test", {})
    failed = await api.post(f"/api/v1/integrations/{wrong_key.json()['id']}/test", {})

    assert passed.status_code == 200, passed.text
    assert passed.json()["ok"] is True
    assert "Club news" in passed.json()["message"]
    assert failed.json()["ok"] is False
    assert "401" in failed.json()["message"]
    assert fake.api_key not in failed.text


async def test_an_oauth_connection_starts_at_mailchimps_authorization_server(
    api: ApiClient,
) -> None:
    created = await api.post(
        "/api/v1/integrations",
        {
            "provider": "mailchimp",
            "name": "Mailchimp",
            "config": {"list_id": "abc123", "server_prefix": "us19"},
            "credentials": {"client_id": "123456789", "client_secret": "app-secret-value"},
        },
    )
    assert created.status_code == 201, created.text

    started = await api.get(f"/api/v1/integrations/{created.json()['id']}/oauth/authorize")

    assert started.status_code == 200, started.text
    url = started.json()["authorization_url"]
    assert url.startswith("https://login.mailchimp.com/oauth2/authorize?")
    assert "client_id=123456789" in url
    assert "app-secret-value" not in started.text
