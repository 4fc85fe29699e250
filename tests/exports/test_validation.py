"""Bad export definitions are refused with 422 (or 409) in the error shape, and change
nothing."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from memberhub.auth.roles import Role
from memberhub.exports import schedule
from memberhub.exports.jobs import process_exports
from memberhub.integrations.hub import IntegrationHub
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from tests.conftest import issue_key
from tests.exports.conftest import SMALL, create_local_integration
from tests.support import ApiClient

BERLIN = "Europe/Berlin"


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


async def test_a_change_of_the_programs_time_zone_moves_the_next_run(
    api: ApiClient, storage_id: str
) -> None:
    export = await api.post("/api/v1/exports", _definition(storage_id, schedule="30 2 * * *"))
    assert export.json()["next_run_at"].endswith("02:30:00Z")
    assert (await api.patch("/api/v1/program", {"timezone": "Asia/Tokyo"})).is_success
    shown = (await api.get(f"/api/v1/exports/{export.json()['id']}")).json()
    assert shown["next_run_at"].endswith("17:30:00Z"), shown


def _occasions(expression: str, after: datetime, zone: str, count: int) -> list[str]:
    found = []
    for _ in range(count):
        after = schedule.next_run(expression, after, zone)
        found.append(after.strftime("%Y-%m-%d %H:%M"))
    return found


def test_a_fixed_time_runs_once_on_the_night_the_clocks_go_back() -> None:
    # Berlin, 25 October 2026: 02:30 comes twice (CEST, then CET); cron runs it once.
    assert _occasions("30 2 * * *", datetime(2026, 10, 24, 1, 0, tzinfo=UTC), BERLIN, 3) == [
        "2026-10-25 00:30",
        "2026-10-26 01:30",
        "2026-10-27 01:30",
    ]


def test_an_hourly_schedule_runs_in_both_passes_of_the_repeated_hour() -> None:
    assert _occasions("0 * * * *", datetime(2026, 10, 24, 23, 10, tzinfo=UTC), BERLIN, 4) == [
        "2026-10-25 00:00",  # 02:00 CEST
        "2026-10-25 01:00",  # 02:00 CET
        "2026-10-25 02:00",  # 03:00 CET
        "2026-10-25 03:00",
    ]


def test_a_time_the_clocks_skip_runs_once_they_moved_on() -> None:
    # Berlin, 29 March 2026: 02:00 to 03:00 does not exist; 02:30 runs at 03:30 CEST.
    assert _occasions("30 2 * * *", datetime(2026, 3, 28, 1, 0, tzinfo=UTC), BERLIN, 3) == [
        "2026-03-28 01:30",
        "2026-03-29 01:30",
        "2026-03-30 00:30",
    ]
    assert _occasions("*/30 * * * *", datetime(2026, 3, 29, 0, 10, tzinfo=UTC), BERLIN, 4) == [
        "2026-03-29 00:30",  # 01:30 CET
        "2026-03-29 01:00",  # 03:00 CEST
        "2026-03-29 01:30",
        "2026-03-29 02:00",
    ]


async def test_organisation_keys_may_not_export(
    api: ApiClient, db: Database, storage_id: str
) -> None:
    organisation = await api.create_organisation()
    scoped = api.with_key(await issue_key(db, Role.ADMIN, organisation=organisation["id"]))

    assert (await scoped.get("/api/v1/exports")).status_code in (403, 404)
    assert (await api.get("/api/v1/exports/exp_unknown")).status_code == 404


async def test_an_organisations_storage_target_is_not_an_export_target(
    api: ApiClient, db: Database, hub: IntegrationHub, tmp_path: Path
) -> None:
    """Exports carry every organisation's rows (README): a target an organisation's key
    administers would hand them all to that organisation."""
    ours, theirs = await api.create_organisation(), await api.create_organisation()
    stranger = await api.create_member(organisation_id=theirs["id"], first_name="Secret")
    scoped = api.with_key(await issue_key(db, Role.ADMIN, organisation=ours["id"]))
    target = await scoped.post(
        "/api/v1/integrations",
        {
            "provider": "local_storage",
            "name": "Ours",
            "config": {"directory": str(tmp_path / "ours")},
        },
    )
    assert target.status_code == 201, target.text
    assert target.json()["organisation_id"] == ours["id"]

    created = await api.post(
        "/api/v1/exports",
        {
            "name": "Members",
            "table": "members",
            "format": "jsonl",
            "storage_integration_id": target.json()["id"],
        },
    )
    if created.status_code == 201:
        # The organisation's key re-points its target wherever it likes, and gets them all.
        moved = await scoped.patch(
            f"/api/v1/integrations/{target.json()['id']}",
            {"config": {"directory": str(tmp_path / "elsewhere")}},
        )
        assert moved.status_code == 200, moved.text
        await api.post(f"/api/v1/exports/{created.json()['id']}/runs")
        await process_exports(db, hub, utcnow(), SMALL)
        lines = [
            json.loads(line)
            for path in (tmp_path / "elsewhere").glob("members/dt=*/*.jsonl")
            for line in path.read_text().splitlines()
        ]
        leaked = [row["public_id"] for row in lines if row["public_id"] == stranger["id"]]
        assert not leaked, f"another organisation's member reached {ours['id']}'s target"
    assert created.status_code == 422, created.text
