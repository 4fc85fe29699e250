"""The fake HubSpot API answers as HubSpot's CRM v3 contacts API does, and its webhooks
verify with HubSpot's own library."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from hubspot.utils.signature import Signature

from tests.fakes.hubspot import (
    CONTACTS_PATH,
    FakeHubSpot,
    epoch_ms,
    running_fake_hubspot,
)
from tests.fakes.webhook_receiver import WebhookReceiver, fail_times, running_receiver

TOKEN = "pat-na1-test-0000-1111"
CLIENT_SECRET = "hubspot-client-secret-for-tests"
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
UPSERT = f"{CONTACTS_PATH}/batch/upsert"
UPDATE = f"{CONTACTS_PATH}/batch/update"
READ = f"{CONTACTS_PATH}/batch/read"
SEARCH = f"{CONTACTS_PATH}/search"


@pytest.fixture(scope="module")
async def running() -> AsyncIterator[FakeHubSpot]:
    # One server for the module, as starting one costs ~0.2 s; each test starts from reset().
    async with running_fake_hubspot(access_token=TOKEN) as fake:
        yield fake


@pytest.fixture
def fake(running: FakeHubSpot) -> FakeHubSpot:
    running.reset()
    return running


@pytest.fixture
async def http(fake: FakeHubSpot) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=fake.url, headers=headers, timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
async def receiver() -> AsyncIterator[WebhookReceiver]:
    async with running_receiver() as started:
        yield started


def upsert_input(email: str, **properties: Any) -> dict[str, Any]:
    return {"idProperty": "email", "id": email, "properties": properties}


def modified_filter(operator: str, at: datetime) -> dict[str, Any]:
    return {"propertyName": "lastmodifieddate", "operator": operator, "value": str(epoch_ms(at))}


def search_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "filterGroups": [],
        "sorts": [{"propertyName": "lastmodifieddate", "direction": "ASCENDING"}],
        "properties": ["email", "firstname"],
        "limit": 100,
    }
    body.update(overrides)
    return body


# --------------------------------------------------------------------------- authentication


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", f"Basic {TOKEN}"])
async def test_missing_or_wrong_token_answers_401_with_hubspot_body(
    fake: FakeHubSpot, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"authorization": authorization}
    async with httpx.AsyncClient(base_url=fake.url, headers=headers) as client:
        response = await client.get(CONTACTS_PATH)

    assert response.status_code == 401
    body = response.json()
    assert body["status"] == "error"
    assert body["category"] == "INVALID_AUTHENTICATION"
    assert body["message"].startswith("Authentication credentials not found")
    assert re.fullmatch(r"[0-9a-f-]{36}", body["correlationId"])
    assert (fake.count(), fake.count_all()) == (0, 1)
    assert fake.requests[0].status == 401


# --------------------------------------------------------------------------- batch upsert


async def test_upsert_creates_then_matches_by_email_case_insensitively(
    fake: FakeHubSpot, http: httpx.AsyncClient
) -> None:
    first = await http.post(
        UPSERT, json={"inputs": [upsert_input("Ada@Example.com", firstname="Ada")]}
    )
    second = await http.post(
        UPSERT,
        json={"inputs": [upsert_input("ada@example.COM", lastname="Lovelace", phone=None)]},
    )

    assert first.status_code == 200
    created = first.json()
    assert created["status"] == "COMPLETE"
    assert ISO_MS.match(created["startedAt"])
    assert ISO_MS.match(created["completedAt"])
    [result] = created["results"]
    assert result["id"].isdigit()
    assert result["new"] is True
    assert result["archived"] is False
    assert ISO_MS.match(result["createdAt"])
    assert ISO_MS.match(result["updatedAt"])
    assert result["properties"]["email"] == "ada@example.com"
    assert result["properties"]["hs_object_id"] == result["id"]
    assert result["properties"]["lastmodifieddate"] == result["updatedAt"]
    assert result["properties"]["createdate"] == result["createdAt"]
    [updated] = second.json()["results"]
    assert (updated["id"], updated["new"]) == (result["id"], False)
    assert fake.contacts[result["id"]]["lastname"] == "Lovelace"
    assert fake.contact_by_email("ADA@example.com") == fake.contacts[result["id"]]
    assert len(fake.contacts) == 1
    assert fake.writes() == 2


async def test_write_without_a_change_keeps_lastmodifieddate_and_is_no_changing_write(
    fake: FakeHubSpot, http: httpx.AsyncClient
) -> None:
    at = datetime(2024, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    contact_id = fake.add_contact({"email": "ada@example.com", "firstname": "Ada"}, at)

    response = await http.post(
        UPSERT, json={"inputs": [upsert_input("ada@example.com", firstname="Ada")]}
    )

    assert response.status_code == 200
    assert fake.contacts[contact_id]["lastmodifieddate"] == "2024-01-02T03:04:05.678Z"
    assert (fake.writes(), fake.writes(changed_only=True)) == (1, 0)


async def test_batch_of_more_than_100_inputs_is_refused(
    fake: FakeHubSpot, http: httpx.AsyncClient
) -> None:
    inputs = [upsert_input(f"m{i}@example.com") for i in range(101)]

    response = await http.post(UPSERT, json={"inputs": inputs})

    assert response.status_code == 400
    assert response.json()["category"] == "VALIDATION_ERROR"
    assert fake.contacts == {}
    assert fake.writes() == 0


async def test_unknown_property_fails_the_whole_batch_until_it_is_created(
    fake: FakeHubSpot, http: httpx.AsyncClient
) -> None:
    inputs = [upsert_input("ada@example.com", member_tier="gold"), upsert_input("b@example.com")]

    refused = await http.post(UPSERT, json={"inputs": inputs})
    fake.add_property("member_tier")
    accepted = await http.post(UPSERT, json={"inputs": inputs})

    assert refused.status_code == 400
    body = refused.json()
    assert body["category"] == "VALIDATION_ERROR"
    assert body["message"].startswith("Property values were not valid: ")
    assert body["errors"] == [
        {
            "message": 'Property "member_tier" does not exist',
            "code": "PROPERTY_DOESNT_EXIST",
            "context": {"propertyName": ["member_tier"]},
        }
    ]
    assert accepted.status_code == 200
    assert fake.contact_by_email("ada@example.com")["member_tier"] == "gold"  # type: ignore[index]


async def test_invalid_inputs_fail_alone_with_207(
    fake: FakeHubSpot, http: httpx.AsyncClient
) -> None:
    inputs = [
        upsert_input("good@example.com", lifecyclestage="customer"),
        upsert_input("not-an-email"),
        upsert_input("bad-stage@example.com", lifecyclestage="vip"),
    ]

    response = await http.post(UPSERT, json={"inputs": inputs})

    assert response.status_code == 207
    body = response.json()
    assert body["status"] == "COMPLETE"
    assert [r["properties"]["email"] for r in body["results"]] == ["good@example.com"]
    assert body["numErrors"] == 2
    assert [(e["status"], e["category"], e["context"]) for e in body["errors"]] == [
        ("error", "VALIDATION_ERROR", {"ids": ["not-an-email"]}),
        ("error", "VALIDATION_ERROR", {"ids": ["bad-stage@example.com"]}),
    ]
    assert "INVALID_EMAIL" in body["errors"][0]["message"]
    assert "INVALID_OPTION" in body["errors"][1]["message"]
    assert [p["email"] for p in fake.contacts.values()] == ["good@example.com"]


async def test_duplicate_ids_in_one_batch_are_refused(http: httpx.AsyncClient) -> None:
    inputs = [upsert_input("ada@example.com"), upsert_input("ADA@example.com")]

    response = await http.post(UPSERT, json={"inputs": inputs})

    assert response.status_code == 400
    assert "Duplicate IDs" in response.json()["message"]


# --------------------------------------------------------------------------- batch update


async def test_batch_update_applies_found_ids_and_reports_missing_ones(
    fake: FakeHubSpot, http: httpx.AsyncClient
) -> None:
    ada = fake.add_contact({"email": "ada@example.com"})
    bob = fake.add_contact({"email": "bob@example.com"})

    response = await http.post(
        UPDATE,
        json={
            "inputs": [
                {"id": ada, "properties": {"city": "London"}},
                {"id": "999999", "properties": {"city": "Paris"}},
                {"id": bob, "properties": {"email": "bob@"}},
            ]
        },
    )

    assert response.status_code == 207
    body = response.json()
    assert [r["id"] for r in body["results"]] == [ada]
    assert body["numErrors"] == 2
    categories = {e["category"]: e["context"]["ids"] for e in body["errors"]}
    assert categories == {"VALIDATION_ERROR": [bob], "OBJECT_NOT_FOUND": ["999999"]}
    assert fake.contacts[ada]["city"] == "London"
    assert fake.contacts[bob]["email"] == "bob@example.com"


async def test_changing_email_moves_the_email_index(
    fake: FakeHubSpot, http: httpx.AsyncClient
) -> None:
    ada = fake.add_contact({"email": "ada@example.com"})

    response = await http.post(
        UPDATE, json={"inputs": [{"id": ada, "properties": {"email": "ada@new.example"}}]}
    )

    assert response.status_code == 200
    assert fake.contact_by_email("ada@example.com") is None
    assert fake.contact_by_email("ADA@new.example")["hs_object_id"] == ada  # type: ignore[index]


# --------------------------------------------------------------------------- reads


async def test_batch_read_by_id_and_by_email_with_requested_properties(
    fake: FakeHubSpot, http: httpx.AsyncClient
) -> None:
    ada = fake.add_contact({"email": "ada@example.com", "firstname": "Ada", "city": "London"})

    by_id = await http.post(
        READ, json={"properties": ["firstname", "phone"], "inputs": [{"id": ada}]}
    )
    by_email = await http.post(
        READ,
        json={
            "idProperty": "email",
            "properties": ["city"],
            "inputs": [{"id": "ADA@example.com"}, {"id": "nobody@example.com"}],
        },
    )

    assert by_id.status_code == 200
    [found] = by_id.json()["results"]
    assert set(found["properties"]) == {
        "firstname",
        "phone",
        "hs_object_id",
        "createdate",
        "lastmodifieddate",
    }
    assert (found["properties"]["firstname"], found["properties"]["phone"]) == ("Ada", None)
    assert by_email.status_code == 207
    assert by_email.json()["results"][0]["properties"]["city"] == "London"
    [error] = by_email.json()["errors"]
    assert (error["category"], error["context"]["ids"]) == (
        "OBJECT_NOT_FOUND",
        ["nobody@example.com"],
    )
    assert fake.writes() == 0


async def test_get_one_contact_or_404(fake: FakeHubSpot, http: httpx.AsyncClient) -> None:
    ada = fake.add_contact({"email": "ada@example.com", "firstname": "Ada"})

    found = await http.get(f"{CONTACTS_PATH}/{ada}", params={"properties": "firstname,email"})
    missing = await http.get(f"{CONTACTS_PATH}/424242")

    assert found.status_code == 200
    assert found.json()["properties"]["firstname"] == "Ada"
    assert missing.status_code == 404
    assert missing.json()["category"] == "OBJECT_NOT_FOUND"


async def test_list_pages_through_every_contact_by_cursor(
    fake: FakeHubSpot, http: httpx.AsyncClient
) -> None:
    ids = [fake.add_contact({"email": f"m{i}@example.com"}) for i in range(5)]

    seen: list[str] = []
    after: str | None = None
    pages = 0
    while True:
        params = {"limit": "2", "properties": "email"} | ({"after": after} if after else {})
        page = (await http.get(CONTACTS_PATH, params=params)).json()
        pages += 1
        seen += [r["id"] for r in page["results"]]
        if "paging" not in page:
            break
        after = page["paging"]["next"]["after"]
        assert page["paging"]["next"]["link"].startswith(f"{fake.url}{CONTACTS_PATH}?")
    too_many = await http.get(CONTACTS_PATH, params={"limit": "101"})

    assert (seen, pages) == (ids, 3)
    assert too_many.status_code == 400


# --------------------------------------------------------------------------- search


async def test_search_filters_on_lastmodifieddate_sorts_and_pages(
    fake: FakeHubSpot, http: httpx.AsyncClient
) -> None:
    base = datetime(2024, 5, 1, tzinfo=UTC)
    for minute in (3, 1, 2, 0):
        fake.add_contact({"email": f"m{minute}@example.com"}, base + timedelta(minutes=minute))
    body = search_body(filterGroups=[{"filters": [modified_filter("GTE", base)]}], limit=2)

    first = (await http.post(SEARCH, json=body)).json()
    second = await http.post(SEARCH, json={**body, "after": first["paging"]["next"]["after"]})
    later = await http.post(
        SEARCH,
        json=search_body(
            filterGroups=[{"filters": [modified_filter("GT", base + timedelta(minutes=2))]}]
        ),
    )

    assert first["total"] == 4
    assert [r["properties"]["email"] for r in first["results"]] == [
        "m0@example.com",
        "m1@example.com",
    ]
    assert first["paging"] == {"next": {"after": "2"}}
    assert [r["properties"]["email"] for r in second.json()["results"]] == [
        "m2@example.com",
        "m3@example.com",
    ]
    assert "paging" not in second.json()
    assert [r["properties"]["email"] for r in later.json()["results"]] == ["m3@example.com"]
    assert fake.writes() == 0


async def test_search_by_email_ignores_case(fake: FakeHubSpot, http: httpx.AsyncClient) -> None:
    ada = fake.add_contact({"email": "ada@example.com"})
    fake.add_contact({"email": "bob@example.com"})

    response = await http.post(
        SEARCH,
        json=search_body(
            filterGroups=[
                {
                    "filters": [
                        {"propertyName": "email", "operator": "EQ", "value": "Ada@Example.com"}
                    ]
                }
            ]
        ),
    )

    assert [r["id"] for r in response.json()["results"]] == [ada]


@pytest.mark.parametrize(("after", "limit"), [("9900", 101), ("10000", 1), ("0", 201)])
async def test_search_refuses_paging_past_10000_results_or_over_200_per_page(
    http: httpx.AsyncClient, after: str, limit: int
) -> None:
    response = await http.post(SEARCH, json=search_body(after=after, limit=limit))

    assert response.status_code == 400
    assert response.json()["category"] == "VALIDATION_ERROR"


async def test_search_sees_changes_only_after_the_indexing_delay(
    fake: FakeHubSpot, http: httpx.AsyncClient
) -> None:
    ada = fake.add_contact({"email": "ada@example.com", "firstname": "Ada"})
    fake.set_search_delay(0.3)
    fake.update_contact(ada, {"firstname": "Augusta"})
    fake.add_contact({"email": "bob@example.com"})

    before = (await http.post(SEARCH, json=search_body())).json()
    fetched = (await http.get(f"{CONTACTS_PATH}/{ada}")).json()
    await asyncio.sleep(0.35)
    after = (await http.post(SEARCH, json=search_body())).json()

    assert [r["properties"]["firstname"] for r in before["results"]] == ["Ada"]
    assert fetched["properties"]["firstname"] == "Augusta"
    assert after["total"] == 2
    assert after["results"][0]["properties"]["firstname"] == "Augusta"


# --------------------------------------------------------------------------- failures


async def test_injected_failure_changes_nothing_and_the_retry_succeeds(
    fake: FakeHubSpot, http: httpx.AsyncClient
) -> None:
    fake.fail_next(2, status=503)
    body = {"inputs": [upsert_input("ada@example.com")]}

    failed = [await http.post(UPSERT, json=body) for _ in range(2)]
    retried = await http.post(UPSERT, json=body)

    assert [r.status_code for r in failed] == [503, 503]
    assert failed[0].json()["status"] == "error"
    assert failed[0].json()["category"] == "INTERNAL_ERROR"
    assert retried.status_code == 200
    assert len(fake.contacts) == 1
    assert (fake.count("POST", UPSERT), fake.count_all("POST", UPSERT), fake.writes()) == (1, 3, 1)


async def test_internal_error_body(fake: FakeHubSpot, http: httpx.AsyncClient) -> None:
    fake.fail_next(1)

    response = await http.get(CONTACTS_PATH)

    body = response.json()
    assert response.status_code == 500
    assert (body["message"], body["category"]) == ("internal error", "INTERNAL_ERROR")
    assert body["correlationId"]


async def test_rate_limit_next_answers_429_with_hubspot_headers(
    fake: FakeHubSpot, http: httpx.AsyncClient
) -> None:
    fake.rate_limit_next(1)

    limited = await http.post(UPSERT, json={"inputs": [upsert_input("ada@example.com")]})
    allowed = await http.get(CONTACTS_PATH)

    assert limited.status_code == 429
    body = limited.json()
    assert body["errorType"] == "RATE_LIMIT"
    assert body["policyName"] == "TEN_SECONDLY_ROLLING"
    assert body["message"] == "You have reached your ten_secondly_rolling limit."
    assert limited.headers["X-HubSpot-RateLimit-Interval-Milliseconds"] == "10000"
    assert limited.headers["X-HubSpot-RateLimit-Remaining"] == "0"
    assert int(limited.headers["X-HubSpot-RateLimit-Max"]) > 0
    assert "retry-after" not in limited.headers
    assert allowed.status_code == 200
    assert fake.contacts == {}


async def test_rolling_rate_limit_counts_accepted_requests(
    fake: FakeHubSpot, http: httpx.AsyncClient
) -> None:
    fake.set_rate_limit(3, interval_seconds=0.5)

    statuses = [(await http.get(CONTACTS_PATH)).status_code for _ in range(4)]
    await asyncio.sleep(0.55)
    recovered = await http.get(CONTACTS_PATH)

    assert statuses == [200, 200, 200, 429]
    assert recovered.status_code == 200
    assert recovered.headers["X-HubSpot-RateLimit-Max"] == "3"
    assert recovered.headers["X-HubSpot-RateLimit-Remaining"] == "2"
    assert recovered.headers["X-HubSpot-RateLimit-Interval-Milliseconds"] == "500"


async def test_search_is_limited_to_five_per_second_when_limits_are_on(
    fake: FakeHubSpot, http: httpx.AsyncClient
) -> None:
    fake.set_rate_limit(100)

    statuses = [(await http.post(SEARCH, json=search_body())).status_code for _ in range(6)]

    assert statuses == [200] * 5 + [429]
    assert fake.requests[-1].status == 429
    assert (fake.count("POST", SEARCH), fake.count_all("POST", SEARCH)) == (5, 6)


async def test_random_failures_are_reproducible_and_can_be_turned_off(
    fake: FakeHubSpot, http: httpx.AsyncClient
) -> None:
    async def statuses() -> list[int]:
        return [(await http.get(CONTACTS_PATH)).status_code for _ in range(20)]

    fake.random_failures(0.5, seed=7)
    first = await statuses()
    fake.random_failures(0.5, seed=7)
    second = await statuses()
    fake.random_failures(0)
    third = await statuses()

    assert first == second
    assert {500, 502, 503} & set(first)
    assert 200 in first
    assert set(third) == {200}


async def test_latency_delays_answers(fake: FakeHubSpot, http: httpx.AsyncClient) -> None:
    fake.set_latency(0.2)

    started = time.monotonic()
    await http.get(CONTACTS_PATH)

    assert time.monotonic() - started >= 0.2


async def test_requests_log_records_query_body_and_status(
    fake: FakeHubSpot, http: httpx.AsyncClient
) -> None:
    await http.get(CONTACTS_PATH, params={"limit": "5"})
    await http.post(READ, json={"inputs": []})

    assert [tuple(r) for r in fake.requests] == [
        ("GET", CONTACTS_PATH, {"limit": "5"}, None, 200),
        ("POST", READ, {}, {"inputs": []}, 200),
    ]


# --------------------------------------------------------------------------- webhooks


def verified(delivery_headers: dict[str, str], body: bytes, url: str) -> bool:
    return bool(
        Signature.is_valid(
            signature=delivery_headers["x-hubspot-signature-v3"],
            client_secret=CLIENT_SECRET,
            request_body=body.decode(),
            http_uri=url,
            signature_version="v3",
            timestamp=delivery_headers["x-hubspot-request-timestamp"],
        )
    )


async def test_api_writes_send_signed_creation_and_property_change_events(
    fake: FakeHubSpot, http: httpx.AsyncClient, receiver: WebhookReceiver
) -> None:
    url = receiver.url("hubspot-api")
    fake.subscribe(url, CLIENT_SECRET, app_id=42)

    created = await http.post(
        UPSERT, json={"inputs": [upsert_input("ada@example.com", firstname="Ada")]}
    )
    contact_id = created.json()["results"][0]["id"]
    await http.post(UPDATE, json={"inputs": [{"id": contact_id, "properties": {"city": "Oslo"}}]})
    await http.post(UPDATE, json={"inputs": [{"id": contact_id, "properties": {"city": "Oslo"}}]})
    await fake.webhooks_idle()

    events = [event for r in receiver.received("hubspot-api") for event in r.payload]
    assert all(verified(r.headers, r.body, url) for r in receiver.received("hubspot-api"))
    assert all(
        r.headers["content-type"] == "application/json" for r in receiver.received("hubspot-api")
    )
    assert [
        (e["subscriptionType"], e.get("propertyName"), e.get("propertyValue")) for e in events
    ] == [
        ("contact.creation", None, None),
        ("contact.propertyChange", "email", "ada@example.com"),
        ("contact.propertyChange", "firstname", "Ada"),
        ("contact.propertyChange", "city", "Oslo"),
    ]
    first = events[0]
    assert (first["objectId"], first["appId"], first["attemptNumber"]) == (int(contact_id), 42, 0)
    assert {e["changeSource"] for e in events} == {"INTEGRATION"}
    assert all(
        isinstance(e[key], int)
        for e in events
        for key in ("eventId", "portalId", "occurredAt", "subscriptionId")
    )
    assert len({e["eventId"] for e in events}) == 4


async def test_user_edits_send_crm_ui_events_and_bump_lastmodifieddate(
    fake: FakeHubSpot, receiver: WebhookReceiver
) -> None:
    ada = fake.add_contact({"email": "ada@example.com"})
    url = receiver.url("hubspot-ui")
    fake.subscribe(url, CLIENT_SECRET)
    edited_at = datetime(2030, 1, 1, 12, tzinfo=UTC)

    fake.update_contact(ada, {"lastname": "Lovelace"}, modified_at=edited_at)
    await fake.webhooks_idle()

    [delivery] = receiver.received("hubspot-ui")
    [event] = delivery.payload
    assert (event["propertyName"], event["propertyValue"]) == ("lastname", "Lovelace")
    assert event["changeSource"] == "CRM_UI"
    assert event["occurredAt"] == epoch_ms(edited_at)
    assert fake.contacts[ada]["lastmodifieddate"] == "2030-01-01T12:00:00.000Z"


async def test_failed_deliveries_are_retried_with_a_higher_attempt_number(
    fake: FakeHubSpot, receiver: WebhookReceiver
) -> None:
    url = receiver.url("hubspot-retry")
    receiver.set_handler("hubspot-retry", fail_times(2))
    fake.subscribe(url, CLIENT_SECRET)

    fake.add_contact({"email": "ada@example.com"})
    await fake.webhooks_idle()

    deliveries = fake.webhook_deliveries
    assert [(d.attempt, d.status) for d in deliveries] == [(0, 500), (1, 500), (2, 200)]
    assert [e["attemptNumber"] for e in json.loads(deliveries[-1].body)] == [2, 2]
    assert len(fake.webhook_events_delivered) == 2


async def test_events_are_sent_in_batches_of_at_most_100(
    fake: FakeHubSpot, receiver: WebhookReceiver
) -> None:
    url = receiver.url("hubspot-batches")
    fake.subscribe(url, CLIENT_SECRET, properties=["firstname"])

    for i in range(150):
        fake.add_contact({"email": f"m{i}@example.com", "firstname": f"M{i}"})
    await fake.webhooks_idle()

    sizes = [len(r.payload) for r in receiver.received("hubspot-batches")]
    assert max(sizes) <= 100
    assert sum(sizes) == 300  # a creation and a firstname change each; email not subscribed
    fake.unsubscribe()
    fake.add_contact({"email": "late@example.com"})
    await fake.webhooks_idle()
    assert sum(len(r.payload) for r in receiver.received("hubspot-batches")) == 300


# --------------------------------------------------------------------------- volume


async def test_ten_thousand_contacts_sync_through_batches_and_search_quickly(
    fake: FakeHubSpot, http: httpx.AsyncClient
) -> None:
    started = time.monotonic()
    for batch in range(100):
        inputs = [
            upsert_input(f"m{batch * 100 + i}@example.com", firstname="M") for i in range(100)
        ]
        response = await http.post(UPSERT, json={"inputs": inputs})
        assert response.status_code == 200

    found = 0
    after = "0"
    while True:
        page = (await http.post(SEARCH, json=search_body(limit=200, after=after))).json()
        found += len(page["results"])
        if "paging" not in page:
            break
        after = page["paging"]["next"]["after"]
    repeat = await http.post(
        UPSERT, json={"inputs": [upsert_input("M5@EXAMPLE.com", firstname="M")]}
    )

    assert found == 10_000
    assert len(fake.contacts) == 10_000
    assert repeat.json()["results"][0]["new"] is False
    assert fake.writes(changed_only=True) == 100
    assert time.monotonic() - started < 30
