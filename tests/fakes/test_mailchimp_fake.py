"""The Mailchimp fake answers as Mailchimp documents: Basic auth with the API key, batch
subscribe's per-member results and 500-member limit, static segments, journey triggers,
problem-detail errors and the 10-connection limit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.fakes.mailchimp import FakeMailchimp, running_fake_mailchimp, subscriber_hash


@pytest.fixture
async def fake() -> AsyncIterator[FakeMailchimp]:
    async with running_fake_mailchimp() as running:
        yield running


def client(fake: FakeMailchimp, key: str | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=fake.url, auth=("anystring", key or fake.api_key))


async def test_a_wrong_key_is_refused_with_a_problem_document(fake: FakeMailchimp) -> None:
    async with client(fake, "not-the-key-us21") as http:
        response = await http.get("/ping")
    assert response.status_code == 401
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert set(problem) == {"type", "title", "status", "detail", "instance"}
    assert problem["title"] == "API Key Invalid"
    assert problem["status"] == 401


async def test_batch_subscribe_creates_updates_and_reports_errors_per_member(
    fake: FakeMailchimp,
) -> None:
    list_id = fake.add_list()
    ana = {"email_address": "Ana@Example.com", "status": "subscribed", "tags": ["tier:GOLD"]}
    async with client(fake) as http:
        first = await http.post(f"/lists/{list_id}", json={"members": [ana]})
        again = await http.post(f"/lists/{list_id}", json={"members": [ana]})
        updated = await http.post(
            f"/lists/{list_id}",
            json={
                "members": [
                    {**ana, "merge_fields": {"POINTS": 700}, "tags": ["tier:SILVER"]},
                    {
                        "email_address": "bo@example.com",
                        "status": "subscribed",
                        "merge_fields": {"NOPE": "x"},
                    },
                    {
                        "email_address": "cy@example.com",
                        "status": "subscribed",
                        "merge_fields": {"POINTS": "many"},
                    },
                ],
                "update_existing": True,
                "sync_tags": True,
            },
        )
        too_many = await http.post(
            f"/lists/{list_id}",
            json={
                "members": [
                    {"email_address": f"m{i}@example.com", "status": "subscribed"}
                    for i in range(501)
                ]
            },
        )
    assert first.status_code == 200
    assert first.json()["total_created"] == 1
    assert again.json()["error_count"] == 1
    assert again.json()["errors"][0]["error_code"] == "ERROR_CONTACT_EXISTS"
    answer = updated.json()
    assert updated.status_code == 200  # partial failures still answer 200
    assert answer["total_updated"] == 1
    assert {e["email_address"] for e in answer["errors"]} == {"bo@example.com", "cy@example.com"}
    member = fake.member(list_id, "ana@example.com")
    assert member is not None
    assert member["id"] == subscriber_hash("ana@example.com")
    assert member["merge_fields"]["POINTS"] == 700
    assert [t["name"] for t in member["tags"]] == ["tier:SILVER"]
    assert too_many.status_code == 400
    assert too_many.json()["title"] == "Invalid Resource"
    assert len(fake.members(list_id)) == 1


async def test_static_segments_journeys_and_the_member_upsert(fake: FakeMailchimp) -> None:
    list_id = fake.add_list()
    fake.add_journey(77, list_id, {5})
    async with client(fake) as http:
        put = await http.put(
            f"/lists/{list_id}/members/{subscriber_hash('ana@example.com')}",
            json={"email_address": "ana@example.com", "status_if_new": "subscribed"},
        )
        mismatch = await http.put(
            f"/lists/{list_id}/members/{subscriber_hash('x@example.com')}",
            json={"email_address": "ana@example.com", "status_if_new": "subscribed"},
        )
        created = await http.post(
            f"/lists/{list_id}/segments", json={"name": "Lapsing", "static_segment": []}
        )
        segment_id = created.json()["id"]
        changed = await http.post(
            f"/lists/{list_id}/segments/{segment_id}",
            json={"members_to_add": ["ana@example.com", "ghost@example.com"]},
        )
        fired = await http.post(
            "/customer-journeys/journeys/77/steps/5/actions/trigger",
            json={"email_address": "ana@example.com"},
        )
        stranger = await http.post(
            "/customer-journeys/journeys/77/steps/5/actions/trigger",
            json={"email_address": "ghost@example.com"},
        )
        wrong_step = await http.post(
            "/customer-journeys/journeys/77/steps/6/actions/trigger",
            json={"email_address": "ana@example.com"},
        )
    assert put.status_code == 200
    assert mismatch.status_code == 400
    assert changed.json()["total_added"] == 1
    assert changed.json()["errors"][0]["email_addresses"] == ["ghost@example.com"]
    assert fake.segment_members(list_id, "Lapsing") == {"ana@example.com"}
    assert fired.status_code == 204
    assert stranger.status_code == 400
    assert wrong_step.status_code == 404
    assert [t.email_address for t in fake.triggers] == ["ana@example.com"]


async def test_an_eleventh_connection_at_once_is_answered_429(fake: FakeMailchimp) -> None:
    fake.latency = 0.3
    async with httpx.AsyncClient(
        base_url=fake.url,
        auth=("anystring", fake.api_key),
        limits=httpx.Limits(max_connections=20),
    ) as http:
        answers = await asyncio.gather(*(http.get("/ping") for _ in range(11)))
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [200] * 10 + [429]
    limited = next(r for r in answers if r.status_code == 429)
    assert limited.json()["title"] == "Too Many Requests"
    assert fake.max_in_flight == 11
