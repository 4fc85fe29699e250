"""The Algolia provider and the search endpoints: batches within Algolia's limits, tasks
waited for, credentials and settings checked, and no key in any log."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from memberhub.integrations.hub import IntegrationHub
from memberhub.integrations.models import Integration
from memberhub.integrations.providers import as_search_index, get_provider
from memberhub.integrations.providers.algolia import SearchIndexError
from memberhub.integrations.providers.base import Connection, SearchIndex, SearchRecord
from memberhub.kit.db import Database
from tests.fakes.algolia import DEFAULT_API_KEY, FakeAlgolia
from tests.search.conftest import REWARDS, algolia_settings, create_algolia, status, tick
from tests.support import ApiClient


def algolia_index() -> SearchIndex:
    provider = get_provider("algolia")
    assert provider is not None
    found = as_search_index(provider)
    assert found is not None
    return found


async def connect(db: Database, hub: IntegrationHub, public_id: str) -> Connection:
    async with db.transaction(read_only=True) as session:
        integration = await session.scalar(
            select(Integration).where(Integration.public_id == public_id)
        )
    assert integration is not None
    return hub.connection(integration)


def records(n: int, **attributes: Any) -> list[SearchRecord]:
    return [SearchRecord(object_id=f"rwd_{i:05d}", attributes=attributes) for i in range(n)]


async def test_records_go_in_batches_of_at_most_1000_operations(
    api: ApiClient, db: Database, hub: IntegrationHub, algolia: FakeAlgolia
) -> None:
    integration = await create_algolia(api, algolia)
    connection = await connect(db, hub, integration["id"])

    await algolia_index().save_records(connection, "catalog", records(2500, name="x"))
    await algolia_index().delete_records(
        connection, "catalog", [f"rwd_{i:05d}" for i in range(1200)]
    )

    sizes = [len(batch) for batch in algolia.batches("catalog")]
    assert sizes == [1000, 1000, 500, 1000, 200]
    assert len(algolia.records("catalog")) == 1300


async def test_large_records_are_split_to_keep_each_request_under_the_size_limit(
    api: ApiClient, db: Database, hub: IntegrationHub, algolia: FakeAlgolia
) -> None:
    integration = await create_algolia(api, algolia, batch_size=1000)
    connection = await connect(db, hub, integration["id"])

    await algolia_index().save_records(connection, "catalog", records(1000, text="x" * 9500))

    sizes = [len(batch) for batch in algolia.batches("catalog")]
    assert sum(sizes) == 1000
    assert len(sizes) == 2  # ~9.5 MB of records: two requests under 9 MB each
    assert len(algolia.records("catalog")) == 1000


async def test_a_record_algolia_refuses_raises_with_algolias_words_and_changes_nothing(
    api: ApiClient, db: Database, hub: IntegrationHub, algolia: FakeAlgolia
) -> None:
    integration = await create_algolia(api, algolia)
    connection = await connect(db, hub, integration["id"])

    with pytest.raises(SearchIndexError, match="too big"):
        await algolia_index().save_records(connection, "catalog", records(3, text="x" * 20_000))

    assert algolia.records("catalog") == {}


async def test_wait_for_tasks_polls_each_task_until_published(
    api: ApiClient, db: Database, hub: IntegrationHub, algolia: FakeAlgolia
) -> None:
    integration = await create_algolia(api, algolia, wait_for_tasks=True)
    connection = await connect(db, hub, integration["id"])
    algolia.publish_after = 2

    await algolia_index().save_records(connection, "catalog", records(1500))

    polls = [r for r in algolia.requests() if "/task/" in r.path]
    assert len(polls) == 2 * 3  # two batches, each seen unpublished twice, then published
    assert len(algolia.records("catalog")) == 1500


async def test_a_wrong_key_fails_the_check_and_the_sync_with_algolias_message(
    api: ApiClient, db: Database, hub: IntegrationHub, algolia: FakeAlgolia
) -> None:
    wrong = "wrong-algolia-key-000000000000"
    body = algolia_settings(algolia)
    body["credentials"]["api_key"] = wrong
    created = await api.post("/api/v1/integrations", body)
    integration = created.json()

    check = await api.post(f"/api/v1/integrations/{integration['id']}/test")
    await tick(db, hub)
    shown = await status(api, integration["id"])

    assert check.json()["ok"] is False
    assert "403" in check.json()["message"]
    assert "Invalid Application-ID or API key" in check.json()["message"]
    assert "Invalid Application-ID or API key" in shown["last_error"]
    assert shown["failures"] == 1
    assert wrong not in check.text + str(shown)


async def test_the_api_key_never_reaches_the_payload_log(
    api: ApiClient, db: Database, hub: IntegrationHub, algolia: FakeAlgolia
) -> None:
    integration = await create_algolia(api, algolia)
    await tick(db, hub)
    assert (
        await api.post("/api/v1/rewards", {"code": "K", "name": "K", "points_cost": 1})
    ).status_code == 201
    await tick(db, hub)
    await hub.drain()
    assert (await api.post(f"/api/v1/integrations/{integration['id']}/test")).json()["ok"]

    calls = await api.get(f"/api/v1/integrations/{integration['id']}/calls?limit=500")
    shown = await api.get(f"/api/v1/integrations/{integration['id']}")

    assert "/batch" in calls.text
    assert DEFAULT_API_KEY not in calls.text
    assert DEFAULT_API_KEY not in shown.text
    assert DEFAULT_API_KEY[-12:] not in calls.text


@pytest.mark.parametrize(
    ("config", "credentials", "field"),
    [
        ({"member_directory": {"index": "m"}}, {}, "config.member_directory.consent"),
        (
            {"member_directory": {"index": "m", "consent": "newsletter"}},
            {},
            "config.member_directory.consent",
        ),
        (
            {"member_directory": {"index": "m", "consent": "email", "fields": ["password"]}},
            {},
            "config.member_directory.fields.0",
        ),
        (
            {"member_directory": {"index": "m", "consent": "email", "fields": []}},
            {},
            "config.member_directory.fields",
        ),
        ({"rewards_index": "has space"}, {}, "config.rewards_index"),
        ({"batch_size": 1001}, {}, "config.batch_size"),
        ({"wait_for_tasks": "yes"}, {}, "config.wait_for_tasks"),
        ({}, {"api_key": "short"}, "credentials.api_key"),
        ({}, {"application_id": "bad id!"}, "credentials.application_id"),
        ({}, {"application_id": None}, "credentials.application_id"),
    ],
)
async def test_bad_settings_are_refused_with_a_422_naming_the_field(
    api: ApiClient,
    algolia: FakeAlgolia,
    config: dict[str, Any],
    credentials: dict[str, Any],
    field: str,
) -> None:
    body = algolia_settings(algolia, **config)
    for name, value in credentials.items():
        if value is None:
            body["credentials"].pop(name)
        else:
            body["credentials"][name] = value

    response = await api.post("/api/v1/integrations", body)

    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert field in [f["field"] for f in error["details"]["fields"]], error
    assert DEFAULT_API_KEY not in response.text
    assert (await api.get("/api/v1/integrations")).json()["data"] == []


async def test_one_index_for_rewards_and_members_is_refused(
    api: ApiClient, algolia: FakeAlgolia
) -> None:
    directory = {"index": REWARDS, "consent": "email"}
    response = await api.post(
        "/api/v1/integrations", algolia_settings(algolia, member_directory=directory)
    )

    assert response.status_code == 422
    assert "must differ" in response.text


async def test_search_endpoints_answer_clear_errors_and_change_nothing(
    api: ApiClient, db: Database, hub: IntegrationHub, algolia: FakeAlgolia
) -> None:
    other = await api.post(
        "/api/v1/integrations",
        {
            "provider": "http",
            "name": "Partner",
            "config": {"base_url": algolia.url, "auth": "none"},
        },
    )
    assert other.status_code == 201, other.text
    integration = await create_algolia(api, algolia)
    await api.post(f"/api/v1/integrations/{integration['id']}/disable", {"reason": "paused"})

    not_search = await api.get(f"/api/v1/integrations/{other.json()['id']}/search")
    not_search_reindex = await api.post(f"/api/v1/integrations/{other.json()['id']}/search/reindex")
    unknown = await api.get("/api/v1/integrations/int_doesnotexist/search")
    malformed = await api.post("/api/v1/integrations/%20%00/search/reindex")
    disabled = await api.post(f"/api/v1/integrations/{integration['id']}/search/reindex")
    shown = await status(api, integration["id"])

    assert not_search.status_code == 409
    assert not_search.json()["error"]["code"] == "INTEGRATION_NOT_A_SEARCH_INDEX"
    assert not_search_reindex.status_code == 409
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "INTEGRATION_NOT_FOUND"
    assert 400 <= malformed.status_code < 500
    assert disabled.status_code == 409
    assert shown["reindex_requested_at"] is None
    assert shown["position"] is None
