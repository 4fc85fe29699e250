"""The fake Pipedrive answers persons and personFields requests as Pipedrive does."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from tests.fakes.pipedrive import (
    ERROR_INFO,
    FakePipedrive,
    PipedriveRequest,
    running_fake_pipedrive,
)

TOKEN = "f0e1d2c3b4a5968778695a4b3c2d1e0f00112233"
T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
async def running() -> AsyncIterator[FakePipedrive]:
    # One server for the module; each test starts from reset().
    async with running_fake_pipedrive(api_token=TOKEN) as fake:
        yield fake


@pytest.fixture
def fake(running: FakePipedrive) -> FakePipedrive:
    running.reset()
    return running


@pytest.fixture
async def http(fake: FakePipedrive) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"x-api-token": TOKEN}
    async with httpx.AsyncClient(base_url=fake.url, headers=headers, timeout=10) as client:
        yield client


def new_person(**overrides: object) -> dict[str, object]:
    body: dict[str, object] = {
        "name": "Ada Lovelace",
        "emails": [{"value": "ada@example.com", "primary": True, "label": "work"}],
    }
    body.update(overrides)
    return body


# --------------------------------------------------------------------------- auth


async def test_token_in_header_query_or_oauth_bearer_is_accepted(fake: FakePipedrive) -> None:
    fake.set_oauth_token("oauth-abc")
    async with httpx.AsyncClient(base_url=fake.url) as client:
        by_header = await client.get("/api/v2/persons", headers={"x-api-token": TOKEN})
        by_query = await client.get("/api/v2/persons", params={"api_token": TOKEN})
        by_bearer = await client.get(
            "/api/v2/persons", headers={"authorization": "Bearer oauth-abc"}
        )
        wrong = await client.get("/api/v2/persons", headers={"x-api-token": "nope"})
        missing = await client.get("/api/v2/persons")

    assert [r.status_code for r in (by_header, by_query, by_bearer)] == [200, 200, 200]
    assert wrong.status_code == missing.status_code == 401
    assert wrong.json() == {
        "success": False,
        "error": "unauthorized access",
        "errorCode": 401,
        "error_info": ERROR_INFO,
        "data": None,
        "additional_data": None,
    }
    assert fake.count() == 3
    assert fake.count_all() == 5


# --------------------------------------------------------------------------- create, get, patch


async def test_create_answers_the_v2_person_and_counts_as_a_write(
    fake: FakePipedrive, http: httpx.AsyncClient
) -> None:
    tier = fake.add_field("Tier")
    fake.set_now(T0)

    response = await http.post(
        "/api/v2/persons",
        json=new_person(
            phones=[{"value": "+44 20 7946 0000", "label": "mobile"}],
            custom_fields={tier: "gold"},
        ),
    )

    assert response.status_code == 200
    body = response.json()
    assert body["success"] is True
    person = body["data"]
    assert person["name"] == "Ada Lovelace"
    assert (person["first_name"], person["last_name"]) == ("Ada", "Lovelace")
    assert person["add_time"] == person["update_time"] == "2024-05-01T12:00:00Z"
    assert person["emails"] == [{"value": "ada@example.com", "primary": True, "label": "work"}]
    assert person["phones"] == [{"value": "+44 20 7946 0000", "primary": True, "label": "mobile"}]
    assert person["custom_fields"] == {tier: "gold"}
    assert (person["visible_to"], person["label_ids"], person["owner_id"]) == (3, [], 1)
    assert re.fullmatch(r"[0-9a-f]{40}", tier)
    assert fake.persons[person["id"]] == person
    assert fake.writes() == 1


async def test_create_validates_like_v2(fake: FakePipedrive, http: httpx.AsyncClient) -> None:
    no_name = await http.post("/api/v2/persons", json={"emails": [{"value": "a@x.com"}]})
    unknown_field = await http.post(
        "/api/v2/persons", json=new_person(custom_fields={"0" * 40: "x"})
    )
    string_owner = await http.post("/api/v2/persons", json=new_person(owner_id="7"))
    unknown_key = await http.post("/api/v2/persons", json=new_person(email="a@x.com"))

    for answer in (no_name, unknown_field, string_owner, unknown_key):
        assert answer.status_code == 400
        assert answer.json()["success"] is False
        assert answer.json()["code"] == "ERR_SCHEMA_VALIDATION_FAILED"
    assert "name" in no_name.json()["error"]
    assert fake.persons == {}
    assert fake.writes() == 0


async def test_patch_changes_update_time_only_when_a_value_changes(
    fake: FakePipedrive, http: httpx.AsyncClient
) -> None:
    tier = fake.add_field("Tier")
    person_id = fake.add_person("Ada Lovelace", "ada@example.com", {"Tier": "gold"}, T0)
    fake.set_now(T0 + timedelta(hours=1))

    same = await http.patch(f"/api/v2/persons/{person_id}", json={"custom_fields": {tier: "gold"}})
    changed = await http.patch(
        f"/api/v2/persons/{person_id}", json={"custom_fields": {tier: "silver"}}
    )
    fetched = await http.get(f"/api/v2/persons/{person_id}")

    assert same.json()["data"]["update_time"] == "2024-05-01T12:00:00Z"
    assert changed.json()["data"]["update_time"] == "2024-05-01T13:00:00Z"
    assert fetched.json()["data"]["custom_fields"] == {tier: "silver"}
    assert fetched.json()["data"]["name"] == "Ada Lovelace"
    assert fake.count("PATCH") == 2
    assert fake.writes() == 1


async def test_patch_of_emails_moves_the_email_index(
    fake: FakePipedrive, http: httpx.AsyncClient
) -> None:
    person_id = fake.add_person("Ada Lovelace", "ada@example.com")

    await http.patch(f"/api/v2/persons/{person_id}", json={"emails": [{"value": "ada@new.org"}]})

    assert fake.person_by_email("ada@example.com") is None
    found = fake.person_by_email("ADA@new.org")
    assert found is not None
    assert found["id"] == person_id


async def test_unknown_person_is_404(fake: FakePipedrive, http: httpx.AsyncClient) -> None:
    get = await http.get("/api/v2/persons/999")
    patch = await http.patch("/api/v2/persons/999", json={"name": "X"})

    assert get.status_code == patch.status_code == 404
    assert get.json()["error"] == "Person not found"
    assert get.json()["success"] is False
    assert fake.writes() == 0


# --------------------------------------------------------------------------- search


async def test_exact_email_search_is_case_insensitive(
    fake: FakePipedrive, http: httpx.AsyncClient
) -> None:
    person_id = fake.add_person("Ada Lovelace", "Ada@Example.com", update_time=T0)
    fake.add_person("Grace Hopper", "grace@example.com")

    response = await http.get(
        "/api/v2/persons/search",
        params={"term": "ada@EXAMPLE.com", "fields": "email", "exact_match": "true"},
    )

    assert response.status_code == 200
    body = response.json()
    [found] = body["data"]["items"]
    assert found["result_score"] == 1.0
    assert found["item"] == {
        "id": person_id,
        "type": "person",
        "name": "Ada Lovelace",
        "phones": [],
        "emails": ["Ada@Example.com"],
        "visible_to": 3,
        "owner": {"id": 1},
        "organization": None,
        "custom_fields": [],
        "notes": [],
        "update_time": "2024-05-01T12:00:00Z",
    }
    assert body["additional_data"] == {"next_cursor": None}
    assert fake.writes() == 0


async def test_search_rejects_short_terms_and_unknown_fields(http: httpx.AsyncClient) -> None:
    short = await http.get("/api/v2/persons/search", params={"term": "a"})
    short_exact = await http.get(
        "/api/v2/persons/search", params={"term": "a", "exact_match": "true"}
    )
    bad_field = await http.get("/api/v2/persons/search", params={"term": "ada", "fields": "x"})

    assert short.status_code == 400
    assert short_exact.status_code == 200
    assert bad_field.status_code == 400


async def test_substring_search_pages_with_a_cursor(
    fake: FakePipedrive, http: httpx.AsyncClient
) -> None:
    ids = [fake.add_person(f"Member {n}", f"m{n}@club.org") for n in range(5)]
    fake.add_person("Other", "other@else.org")

    seen: list[int] = []
    cursor: str | None = None
    for _ in range(5):
        params = {"term": "club.org", "fields": "email", "limit": "2"}
        if cursor:
            params["cursor"] = cursor
        body = (await http.get("/api/v2/persons/search", params=params)).json()
        seen += [entry["item"]["id"] for entry in body["data"]["items"]]
        cursor = body["additional_data"]["next_cursor"]
        if cursor is None:
            break

    assert seen == ids


# --------------------------------------------------------------------------- list


async def test_list_pages_by_update_time_without_skipping_ties_across_pages(
    fake: FakePipedrive, http: httpx.AsyncClient
) -> None:
    # Seven persons share one update time, so every page boundary falls inside a tie.
    tied = [fake.add_person(f"P{n}", f"p{n}@x.org", update_time=T0) for n in range(7)]
    later = fake.add_person("Later", "later@x.org", update_time=T0 + timedelta(seconds=1))

    seen: list[int] = []
    cursor: str | None = None
    for _ in range(10):
        params = {"sort_by": "update_time", "limit": "3"}
        if cursor:
            params["cursor"] = cursor
        body = (await http.get("/api/v2/persons", params=params)).json()
        assert body["success"] is True
        seen += [person["id"] for person in body["data"]]
        cursor = body["additional_data"]["next_cursor"]
        if cursor is None:
            break

    assert seen == [*tied, later]


async def test_list_descending_pages_cover_everything_once(
    fake: FakePipedrive, http: httpx.AsyncClient
) -> None:
    ids = [
        fake.add_person(f"P{n}", f"p{n}@x.org", update_time=T0 + timedelta(seconds=n // 2))
        for n in range(7)
    ]

    seen: list[int] = []
    cursor: str | None = None
    for _ in range(10):
        params = {"sort_by": "update_time", "sort_direction": "desc", "limit": "2"}
        if cursor:
            params["cursor"] = cursor
        body = (await http.get("/api/v2/persons", params=params)).json()
        seen += [person["id"] for person in body["data"]]
        cursor = body["additional_data"]["next_cursor"]
        if cursor is None:
            break

    assert seen == sorted(ids, key=lambda i: (fake.persons[i]["update_time"], i), reverse=True)


async def test_updated_since_is_inclusive_and_updated_until_exclusive(
    fake: FakePipedrive, http: httpx.AsyncClient
) -> None:
    before = fake.add_person("Before", "b@x.org", update_time=T0 - timedelta(seconds=1))
    at_since = fake.add_person("AtSince", "s@x.org", update_time=T0)
    at_until = fake.add_person("AtUntil", "u@x.org", update_time=T0 + timedelta(minutes=1))

    for sort_by in ("update_time", "id", "add_time"):
        body = (
            await http.get(
                "/api/v2/persons",
                params={
                    "updated_since": "2024-05-01T12:00:00Z",
                    "updated_until": "2024-05-01T12:01:00Z",
                    "sort_by": sort_by,
                },
            )
        ).json()
        assert [p["id"] for p in body["data"]] == [at_since], sort_by
    assert before != at_until


async def test_list_defaults_to_id_order_and_rejects_bad_parameters(
    fake: FakePipedrive, http: httpx.AsyncClient
) -> None:
    late = fake.add_person("Late", "l@x.org", update_time=T0 + timedelta(days=1))
    early = fake.add_person("Early", "e@x.org", update_time=T0)

    listed = await http.get("/api/v2/persons")
    too_many = await http.get("/api/v2/persons", params={"limit": "501"})
    bad_sort = await http.get("/api/v2/persons", params={"sort_by": "name"})
    bad_cursor = await http.get("/api/v2/persons", params={"cursor": "not-a-cursor"})

    assert [p["id"] for p in listed.json()["data"]] == [late, early]
    assert listed.json()["additional_data"] == {"next_cursor": None}
    assert too_many.status_code == bad_sort.status_code == bad_cursor.status_code == 400


async def test_user_edit_with_a_timestamp_moves_the_person_in_the_update_order(
    fake: FakePipedrive, http: httpx.AsyncClient
) -> None:
    first = fake.add_person("First", "f@x.org", update_time=T0)
    second = fake.add_person("Second", "s@x.org", update_time=T0 + timedelta(seconds=5))

    fake.update_person(first, {"name": "First Edited"}, update_time=T0 + timedelta(seconds=9))
    body = (
        await http.get(
            "/api/v2/persons",
            params={"sort_by": "update_time", "updated_since": "2024-05-01T12:00:06Z"},
        )
    ).json()

    assert [p["id"] for p in body["data"]] == [first]
    assert body["data"][0]["update_time"] == "2024-05-01T12:00:09Z"
    assert body["data"][0]["first_name"] == "First"
    assert second in fake.persons


# --------------------------------------------------------------------------- personFields


async def test_person_fields_lists_standard_and_custom_fields(
    fake: FakePipedrive, http: httpx.AsyncClient
) -> None:
    tier = fake.add_field("Tier")
    points = fake.add_field("Points", "double")

    response = await http.get("/v1/personFields")

    assert response.status_code == 200
    data = response.json()["data"]
    by_key = {field["key"]: field for field in data}
    assert {"name", "email", "phone", "owner_id"} <= set(by_key)
    assert (by_key[tier]["name"], by_key[tier]["field_type"]) == ("Tier", "varchar")
    assert by_key[points]["field_type"] == "double"
    assert by_key[tier]["edit_flag"] is True
    assert response.json()["additional_data"]["pagination"]["more_items_in_collection"] is False
    wrong_type = await http.post("/api/v2/persons", json=new_person(custom_fields={points: "x"}))
    assert wrong_type.status_code == 400


# --------------------------------------------------------------------------- faults


async def test_fail_next_answers_server_errors_without_changing_state(
    fake: FakePipedrive, http: httpx.AsyncClient
) -> None:
    fake.fail_next(2, status=503)

    answers = [await http.post("/api/v2/persons", json=new_person()) for _ in range(3)]

    assert [a.status_code for a in answers] == [503, 503, 200]
    assert answers[0].json()["success"] is False
    assert answers[0].json()["errorCode"] == 503
    assert len(fake.persons) == 1
    assert fake.writes() == 1
    assert fake.count("POST") == 1
    assert fake.count_all("POST") == 3


async def test_rate_limit_next_answers_429_with_pipedrive_headers(
    fake: FakePipedrive, http: httpx.AsyncClient
) -> None:
    fake.rate_limit_next(1)

    limited = await http.post("/api/v2/persons", json=new_person())
    allowed = await http.get("/api/v2/persons")

    assert limited.status_code == 429
    assert limited.json() == {
        "success": False,
        "error": "Request over limit",
        "errorCode": 429,
        "error_info": ERROR_INFO,
        "data": None,
        "additional_data": None,
    }
    assert limited.headers["x-ratelimit-limit"] == "20"
    assert limited.headers["x-ratelimit-remaining"] == "0"
    assert int(limited.headers["x-ratelimit-reset"]) >= 1
    assert limited.headers["retry-after"] == limited.headers["x-ratelimit-reset"]
    assert allowed.status_code == 200
    assert fake.persons == {}


async def test_rate_limit_window_refuses_requests_above_it_until_it_resets(
    fake: FakePipedrive, http: httpx.AsyncClient
) -> None:
    fake.set_rate_limit(3, window_seconds=0.5)

    burst = await asyncio.gather(*(http.get("/api/v2/persons") for _ in range(5)))
    await asyncio.sleep(0.55)
    after = await http.get("/api/v2/persons")

    assert sorted(r.status_code for r in burst) == [200, 200, 200, 429, 429]
    ok = [r for r in burst if r.status_code == 200]
    assert sorted(r.headers["x-ratelimit-remaining"] for r in ok) == ["0", "1", "2"]
    assert all(r.headers["x-ratelimit-limit"] == "3" for r in burst)
    assert after.status_code == 200
    assert fake.count() == 4


async def test_search_has_its_own_lower_limit(fake: FakePipedrive, http: httpx.AsyncClient) -> None:
    fake.set_rate_limit(100, search_max_requests=2)
    params = {"term": "ada@x.org", "fields": "email", "exact_match": "true"}

    searches = [await http.get("/api/v2/persons/search", params=params) for _ in range(3)]
    listing = await http.get("/api/v2/persons")

    assert [r.status_code for r in searches] == [200, 200, 429]
    assert listing.status_code == 200


async def test_random_failures_are_reproducible_and_can_be_turned_off(
    fake: FakePipedrive, http: httpx.AsyncClient
) -> None:
    fake.random_failures(0.5, seed=7)
    first = [(await http.get("/api/v2/persons")).status_code for _ in range(20)]
    fake.random_failures(0.5, seed=7)
    second = [(await http.get("/api/v2/persons")).status_code for _ in range(20)]
    fake.random_failures(0)
    third = [(await http.get("/api/v2/persons")).status_code for _ in range(5)]

    assert first == second
    assert {500, 502, 503} & set(first)
    assert 200 in first
    assert third == [200] * 5


async def test_latency_delays_every_answer(fake: FakePipedrive, http: httpx.AsyncClient) -> None:
    fake.set_latency(0.2)

    started = time.monotonic()
    response = await http.get("/api/v2/persons")

    assert response.status_code == 200
    assert time.monotonic() - started >= 0.2


async def test_requests_are_recorded_with_query_body_and_status(
    fake: FakePipedrive, http: httpx.AsyncClient
) -> None:
    await http.post("/api/v2/persons", json={"name": "Ada"})
    await http.get("/api/v2/persons", params={"limit": "1"})

    assert fake.requests == [
        PipedriveRequest("POST", "/api/v2/persons", {}, {"name": "Ada"}, 200),
        PipedriveRequest("GET", "/api/v2/persons", {"limit": "1"}, None, 200),
    ]
    method, path, query, body, status = fake.requests[0]
    assert (method, status, body) == ("POST", 200, {"name": "Ada"})
    assert fake.count("GET", "/api/v2/persons") == 1
    assert fake.count(None, "/v1/personFields") == 0
    assert path == "/api/v2/persons"
    assert query == {}


# --------------------------------------------------------------------------- scale


async def test_ten_thousand_persons_are_found_by_email_and_paged_quickly(
    fake: FakePipedrive, http: httpx.AsyncClient
) -> None:
    for n in range(10_000):
        fake.add_person(f"Member {n}", f"member{n}@club.org", update_time=T0)

    started = time.monotonic()
    found = await http.get(
        "/api/v2/persons/search",
        params={"term": "MEMBER9999@club.org", "fields": "email", "exact_match": "true"},
    )
    total = 0
    cursor: str | None = None
    for _ in range(30):
        params = {"sort_by": "update_time", "limit": "500"}
        if cursor:
            params["cursor"] = cursor
        body = (await http.get("/api/v2/persons", params=params)).json()
        total += len(body["data"])
        cursor = body["additional_data"]["next_cursor"]
        if cursor is None:
            break

    assert [i["item"]["name"] for i in found.json()["data"]["items"]] == ["Member 9999"]
    assert total == 10_000
    assert time.monotonic() - started < 10
