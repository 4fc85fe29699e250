"""HubSpot and generic signed webhooks through the inbound endpoint, signed the way the
senders sign them."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import httpx
import pytest
from hubspot.utils.signature import Signature

from memberhub.integrations import signatures
from memberhub.kit.db import Database
from tests.integrations.conftest import run_worker
from tests.support import ApiClient

HUBSPOT_SECRET = "hubspot-app-client-secret-0123456789"
HMAC_SECRET = "generic-hmac-signing-secret-0123456789"


async def create(api: ApiClient, provider: str, config: dict[str, Any], **credentials: str) -> str:
    response = await api.post(
        "/api/v1/integrations",
        {"provider": provider, "name": provider, "config": config, "credentials": credentials},
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def arrived(api: ApiClient, integration_id: str) -> list[dict[str, Any]]:
    response = await api.get(f"/api/v1/integrations/{integration_id}/inbound-events")
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


def hubspot_batch(*event_ids: int) -> bytes:
    return json.dumps(
        [
            {
                "eventId": event_id,
                "subscriptionId": 7,
                "portalId": 42,
                "occurredAt": int(time.time() * 1000),
                "subscriptionType": "contact.propertyChange",
                "attemptNumber": 0,
                "objectId": 1000 + event_id,
                "propertyName": "email",
                "propertyValue": f"c{event_id}@example.com",
            }
            for event_id in event_ids
        ]
    ).encode()


def hubspot_headers(
    url: str, body: bytes, *, secret: str = HUBSPOT_SECRET, age_ms: int = 0
) -> dict[str, str]:
    timestamp = str(int(time.time() * 1000) - age_ms)
    signature = Signature.get_signature(
        secret, body.decode(), "v3", http_uri=url, http_method="POST", timestamp=timestamp
    )
    return {
        "X-HubSpot-Signature-v3": signature,
        "X-HubSpot-Request-Timestamp": timestamp,
        "Content-Type": "application/json",
    }


async def test_hubspot_v3_batches_are_verified_stored_once_and_processed(
    api: ApiClient, http: httpx.AsyncClient, db: Database
) -> None:
    integration = await create(api, "hubspot", {}, client_secret=HUBSPOT_SECRET)
    path = f"/api/v1/inbound/{integration}"
    url = f"http://testserver{path}"  # what HubSpot signs: the URL it called
    body = hubspot_batch(101, 102)

    accepted = await http.post(path, content=body, headers=hubspot_headers(url, body))
    assert accepted.status_code == 200, accepted.text
    again = await http.post(path, content=body, headers=hubspot_headers(url, body))
    assert again.status_code == 200
    [event] = await arrived(api, integration)
    assert event["provider_event_id"] == "101,102"
    assert event["event_type"] == "contact.propertyChange"
    assert event["duplicates"] == 1
    assert event["status"] == "pending"

    await run_worker(db)
    [event] = await arrived(api, integration)
    # Processed by CRM sync: two contacts no member or lead is linked to, so nothing changes.
    assert event["status"] == "processed"
    assert event["attempts"] == 1
    detail = (await api.get(f"/api/v1/inbound-events/{event['id']}")).json()
    assert detail["result"] == {"updated": 0, "skipped": 2, "failed": 0, "conflicts": 0}


async def test_hubspot_refuses_tampered_stale_future_and_wrongly_keyed_requests(
    api: ApiClient, http: httpx.AsyncClient
) -> None:
    integration = await create(api, "hubspot", {}, client_secret=HUBSPOT_SECRET)
    path = f"/api/v1/inbound/{integration}"
    url = f"http://testserver{path}"
    body = hubspot_batch(201)
    cases = {
        "tampered": (body.replace(b"c201", b"x201"), hubspot_headers(url, body)),
        "stale": (body, hubspot_headers(url, body, age_ms=360_000)),
        "future": (body, hubspot_headers(url, body, age_ms=-360_000)),
        "wrong secret": (body, hubspot_headers(url, body, secret="another-client-secret")),
        "other url": (body, hubspot_headers(url + "?x=1", body)),
    }
    for case, (content, headers) in cases.items():
        response = await http.post(path, content=content, headers=headers)
        assert response.status_code == 400, case
        assert response.json()["error"]["code"] == "SIGNATURE_INVALID", case
    assert await arrived(api, integration) == []


def hmac_headers(body: bytes, *, secret: str = HMAC_SECRET, age: int = 0) -> dict[str, str]:
    timestamp = str(int(time.time()) - age)
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha512).digest()
    return {
        "X-Acme-Signature": "sha512=" + base64.b64encode(digest).decode(),
        "X-Acme-Timestamp": timestamp,
        "Content-Type": "application/json",
    }


async def test_the_configured_signature_header_is_stored_masked(
    api: ApiClient, http: httpx.AsyncClient
) -> None:
    config = {"scheme": "hmac", "signature_header": "X-Acme-Digest", "algorithm": "sha512"}
    config |= {"encoding": "base64", "prefix": "sha512=", "timestamp_header": "X-Acme-Timestamp"}
    integration = await create(api, "webhook", config, signing_secret=HMAC_SECRET)
    body = json.dumps({"id": "acme-evt-9", "type": "order.created"}).encode()
    headers = hmac_headers(body)
    headers["X-Acme-Digest"] = headers.pop("X-Acme-Signature")
    accepted = await http.post(f"/api/v1/inbound/{integration}", content=body, headers=headers)
    assert accepted.status_code == 200, accepted.text
    [event] = await arrived(api, integration)
    shown = (await api.get(f"/api/v1/inbound-events/{event['id']}")).json()["headers"]
    assert shown["x-acme-digest"] == "***" + headers["X-Acme-Digest"][-4:]
    assert shown["x-acme-timestamp"] == headers["X-Acme-Timestamp"]


async def test_a_standard_webhooks_secret_that_is_not_base64_is_refused_when_saved(
    api: ApiClient, http: httpx.AsyncClient, db: Database
) -> None:
    body = {
        "provider": "webhook",
        "name": "Acme",
        "config": {"scheme": "standard"},
        "credentials": {"signing_secret": "my plain secret!"},
    }
    refused = await api.post("/api/v1/integrations", body)
    assert refused.status_code == 422, refused.text
    assert "base64" in refused.json()["error"]["message"]
    # An HMAC scheme takes any secret; switching it to Standard Webhooks is checked too.
    hmac_body = {**body, "config": {"scheme": "hmac"}}
    created = await api.post("/api/v1/integrations", hmac_body)
    assert created.status_code == 201, created.text
    path = f"/api/v1/integrations/{created.json()['id']}"
    switched = await api.patch(path, {"config": {"scheme": "standard"}})
    assert switched.status_code == 422, switched.text
    assert (await api.get(path)).json()["config"]["scheme"] == "hmac"


def test_a_secret_that_is_not_base64_matches_no_signature() -> None:
    with pytest.raises(signatures.SignatureInvalid):
        signatures.verify_standard(
            b"{}",
            {"webhook-id": "m", "webhook-timestamp": "1", "webhook-signature": "v1,c2ln"},
            "my plain secret!",
            now=1.0,
        )


async def test_generic_hmac_webhooks_follow_the_configured_scheme(
    api: ApiClient, http: httpx.AsyncClient
) -> None:
    config = {
        "scheme": "hmac",
        "signature_header": "X-Acme-Signature",
        "algorithm": "sha512",
        "encoding": "base64",
        "prefix": "sha512=",
        "timestamp_header": "X-Acme-Timestamp",
    }
    integration = await create(api, "webhook", config, signing_secret=HMAC_SECRET)
    path = f"/api/v1/inbound/{integration}"
    body = json.dumps({"id": "acme-evt-1", "type": "order.created", "total": 12}).encode()

    ok = await http.post(path, content=body, headers=hmac_headers(body))
    assert ok.status_code == 200, ok.text
    for headers in (
        hmac_headers(body, secret="not-the-signing-secret"),
        hmac_headers(body, age=400),
        hmac_headers(body, age=-400),
    ):
        refused = await http.post(path, content=body, headers=headers)
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "SIGNATURE_INVALID"
    tampered = await http.post(path, content=body.replace(b"12", b"13"), headers=hmac_headers(body))
    assert tampered.status_code == 400

    [event] = await arrived(api, integration)
    assert (event["provider_event_id"], event["event_type"]) == ("acme-evt-1", "order.created")
    assert event["duplicates"] == 0
