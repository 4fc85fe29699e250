"""Bad export definitions are refused with 422 (or 409) in the error shape, and change
nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from memberhub.auth.roles import Role
from memberhub.kit.db import Database
from tests.conftest import issue_key
from tests.exports.conftest import create_local_integration
from tests.support import ApiClient


@pytest.fixture
async def storage_id(api: ApiClient, tmp_path: Path) -> str:
    return await create_local_integration(api, tmp_path / "exports")


def _definition(storage_id: str, **changes: Any) -> dict[str, Any]:
    return {
        "name": "Ledger",
        "table": "point_transactions",
        "storage_integration_id": storage_id,
    } | changes


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"table": "api_keys"}, "VALIDATION_ERROR"),
        ({"format": "xlsx"}, "VALIDATION_ERROR"),
        ({"mode": "sometimes"}, "VALIDATION_ERROR"),
        ({"schedule": "every day"}, "VALIDATION_ERROR"),
        ({"schedule": "61 * * * *"}, "VALIDATION_ERROR"),
        ({"schedule": "0 0 * * * *"}, "VALIDATION_ERROR"),
        ({"schedule": "0 0 30 2 *"}, "VALIDATION_ERROR"),
        ({"schedule": "0 0 31 4 *"}, "VALIDATION_ERROR"),
        ({"storage_integration_id": "int_doesnotexist"}, "STORAGE_INTEGRATION_NOT_FOUND"),
        ({"storage_integration_id": "not an id"}, "VALIDATION_ERROR"),
        ({"unexpected": 1}, "VALIDATION_ERROR"),
    ],
)
async def test_a_bad_definition_is_refused_with_422_and_nothing_is_created(
    api: ApiClient, storage_id: str, changes: dict[str, Any], code: str
) -> None:
    response = await api.post("/api/v1/exports", _definition(storage_id, **changes))

    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == code
    assert (await api.get("/api/v1/exports")).json()["data"] == []


async def test_an_integration_that_stores_nothing_is_not_a_storage_target(
    api: ApiClient,
) -> None:
    webhook = {"provider": "webhook", "name": "Hooks", "credentials": {"signing_secret": "x" * 32}}
    created = await api.post("/api/v1/integrations", webhook)
    assert created.status_code == 201, created.text

    response = await api.post("/api/v1/exports", _definition(created.json()["id"]))

    assert response.status_code == 422
    assert response.json()["error"]["code"] == "NOT_A_STORAGE_INTEGRATION"


async def test_a_second_export_of_a_table_to_one_target_conflicts(
    api: ApiClient, storage_id: str
) -> None:
    assert (await api.post("/api/v1/exports", _definition(storage_id))).status_code == 201
    again = await api.post("/api/v1/exports", _definition(storage_id, format="csv"))
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "EXPORT_EXISTS"


async def test_one_run_at_a_time(api: ApiClient, storage_id: str) -> None:
    export = (await api.post("/api/v1/exports", _definition(storage_id))).json()
    runs = f"/api/v1/exports/{export['id']}/runs"
    first = await api.post(runs)
    assert first.status_code == 202
    assert first.json()["status"] == "queued"

    second = await api.post(runs)

    assert second.status_code == 409
    assert second.json()["error"]["code"] == "EXPORT_RUN_IN_PROGRESS"
    assert len((await api.get(runs)).json()["data"]) == 1


async def test_a_schedule_is_read_in_the_programs_time_zone(
    api: ApiClient, storage_id: str
) -> None:
    assert (await api.patch("/api/v1/program", {"timezone": "Asia/Tokyo"})).is_success
    export = await api.post("/api/v1/exports", _definition(storage_id, schedule="30  2 * * *"))

    assert export.status_code == 201, export.text
    assert export.json()["schedule"] == "30 2 * * *"
    assert export.json()["next_run_at"].endswith("17:30:00Z")


async def test_organisation_keys_may_not_export(
    api: ApiClient, db: Database, storage_id: str
) -> None:
    organisation = await api.create_organisation()
    scoped = api.with_key(await issue_key(db, Role.ADMIN, organisation=organisation["id"]))

    assert (await scoped.get("/api/v1/exports")).status_code in (403, 404)
    assert (await api.get("/api/v1/exports/exp_unknown")).status_code == 404
