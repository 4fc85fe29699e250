"""The fake Algolia answers as Algolia's indexing API does."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from tests.fakes.algolia import (
    DEFAULT_API_KEY,
    DEFAULT_APPLICATION_ID,
    FakeAlgolia,
    running_fake_algolia,
)


@pytest.fixture(scope="module")
async def running() -> AsyncIterator[FakeAlgolia]:
    async with running_fake_algolia() as fake:
        yield fake


@pytest.fixture
def fake(running: FakeAlgolia) -> FakeAlgolia:
    running.reset()
    return running


@pytest.fixture
async def http(fake: FakeAlgolia) -> AsyncIterator[httpx.AsyncClient]:
    headers = {
        "X-Algolia-Application-Id": DEFAULT_APPLICATION_ID,
        "X-Algolia-API-Key": DEFAULT_API_KEY,
    }
    async with httpx.AsyncClient(base_url=fake.url, headers=headers, timeout=10) as client:
        yield client


async def test_a_wrong_key_is_refused_in_algolias_error_shape(fake: FakeAlgolia) -> None:
    async with httpx.AsyncClient(base_url=fake.url, timeout=10) as client:
        response = await client.get(
            "/1/indexes",
            headers={"X-Algolia-Application-Id": DEFAULT_APPLICATION_ID, "X-Algolia-API-Key": "x"},
        )

    assert response.status_code == 403
    assert response.json() == {"message": "Invalid Application-ID or API key", "status": 403}


async def test_a_batch_applies_its_operations_in_order_and_answers_a_task(
    fake: FakeAlgolia, http: httpx.AsyncClient
) -> None:
    fake.publish_after = 1
    response = await http.post(
        "/1/indexes/rewards/batch",
        json={
            "requests": [
                {"action": "updateObject", "body": {"objectID": "a", "name": "Mug", "cost": 1}},
                {"action": "addObject", "body": {"name": "Cap"}},
                {"action": "partialUpdateObject", "body": {"objectID": "a", "cost": 2}},
                {"action": "updateObject", "body": {"objectID": "b", "name": "Pen"}},
                {"action": "deleteObject", "body": {"objectID": "b"}},
            ]
        },
    )
    task_id = response.json()["taskID"]
    first = await http.get(f"/1/indexes/rewards/task/{task_id}")
    second = await http.get(f"/1/indexes/rewards/task/{task_id}")

    assert response.status_code == 200
    assert response.json()["objectIDs"] == ["a", "auto-1", "a", "b", "b"]
    assert fake.records("rewards") == {
        "a": {"objectID": "a", "name": "Mug", "cost": 2},
        "auto-1": {"objectID": "auto-1", "name": "Cap"},
    }
    assert first.json()["status"] == "notPublished"
    assert second.json()["status"] == "published"


async def test_an_invalid_batch_changes_nothing(fake: FakeAlgolia, http: httpx.AsyncClient) -> None:
    fake.max_batch_operations = 2
    ok = {"action": "updateObject", "body": {"objectID": "a"}}
    too_many = await http.post("/1/indexes/i/batch", json={"requests": [ok, ok, ok]})
    big = {"action": "updateObject", "body": {"objectID": "b", "text": "x" * 10_000}}
    too_big = await http.post("/1/indexes/i/batch", json={"requests": [ok, big]})
    unknown = await http.post(
        "/1/indexes/i/batch", json={"requests": [ok, {"action": "upsert", "body": {}}]}
    )
    no_id = await http.post(
        "/1/indexes/i/batch", json={"requests": [{"action": "deleteObject", "body": {}}]}
    )

    assert [r.status_code for r in (too_many, too_big, unknown, no_id)] == [400] * 4
    assert "too big" in too_big.json()["message"]
    assert too_big.json()["status"] == 400
    assert fake.records("i") == {}


async def test_copy_with_a_scope_and_move_swap_an_index_in(
    fake: FakeAlgolia, http: httpx.AsyncClient
) -> None:
    fake.put_records("live", [{"objectID": "old"}])
    fake.put_settings("live", {"searchableAttributes": ["name"]})

    copied = await http.post(
        "/1/indexes/live/operation",
        json={"operation": "copy", "destination": "tmp", "scope": ["settings"]},
    )
    fake.put_records("tmp", [{"objectID": "new"}])
    moved = await http.post(
        "/1/indexes/tmp/operation", json={"operation": "move", "destination": "live"}
    )
    missing = await http.post(
        "/1/indexes/nothing/operation", json={"operation": "move", "destination": "live"}
    )

    assert copied.status_code == moved.status_code == 200
    assert fake.records("live") == {"new": {"objectID": "new"}}
    assert fake.settings("live") == {"searchableAttributes": ["name"]}
    assert fake.index_names() == ["live"]
    assert missing.status_code == 404


async def test_outages_and_rate_limits_answer_before_anything_changes(
    fake: FakeAlgolia, http: httpx.AsyncClient
) -> None:
    body = {"requests": [{"action": "updateObject", "body": {"objectID": "a"}}]}
    fake.go_down()
    down = await http.post("/1/indexes/i/batch", json=body)
    fake.come_back()
    fake.rate_limit_next(1)
    limited = await http.post("/1/indexes/i/batch", json=body)

    assert down.status_code == 503
    assert limited.status_code == 429
    assert limited.headers["Retry-After"] == "1"
    assert fake.records("i") == {}
