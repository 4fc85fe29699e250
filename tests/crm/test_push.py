"""Pushing members to each CRM end to end: API → worker → fake vendor."""

from __future__ import annotations

from memberhub.integrations.hub import IntegrationHub
from memberhub.kit.db import Database
from tests.crm.conftest import Crm, create_integration, last_changes_run, seed_members, sync, tick
from tests.support import ApiClient

MEMBERS = 10_000


async def test_ten_thousand_members_then_nothing_then_one_change(
    api: ApiClient, db: Database, hub: IntegrationHub, crm: Crm
) -> None:
    await seed_members(db, MEMBERS)
    integration = await create_integration(api, crm.integration_body(pull=False))
    first = await sync(api, db, hub, integration["id"], mode="push")
    assert first["status"] == "completed", first
    assert (first["created"], first["failed"]) == (MEMBERS, 0), first
    assert len(crm.records()) == MEMBERS
    writes = crm.writes()

    second = await sync(api, db, hub, integration["id"], mode="push")
    assert second["status"] == "completed"
    assert second["skipped"] == MEMBERS
    assert second["created"] == second["updated"] == 0
    assert crm.writes() == writes

    member = (await api.get("/api/v1/members", {"limit": 1})).json()["data"][0]
    changed = await api.patch(f"/api/v1/members/{member['id']}", {"first_name": "Renamed"})
    assert changed.status_code == 200
    await tick(db, hub)
    run = await last_changes_run(db)
    assert run is not None
    assert (run.updated, run.skipped, run.failed) == (1, 0, 0)
    assert crm.writes() == writes + 1
    assert [r for r in crm.records().values() if r["first"] == "Renamed"]
    assert len(crm.records()) == MEMBERS
