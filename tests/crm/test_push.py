"""Pushing members to each CRM end to end: API → worker → fake vendor."""

from __future__ import annotations

import pytest

from memberhub.integrations.hub import IntegrationHub
from memberhub.kit.db import Database
from tests.crm.conftest import Crm, create_integration, last_changes_run, seed_members, sync, tick
from tests.support import ApiClient


async def test_small_push_then_nothing_then_one_change(
    api: ApiClient, db: Database, hub: IntegrationHub, crm: Crm
) -> None:
    await seed_members(db, 25)
    integration = await create_integration(api, crm.integration_body())
    first = await sync(api, db, hub, integration["id"], mode="push")
    assert first["status"] == "completed", first
    assert (first["created"], first["failed"]) == (25, 0), first
    assert len(crm.records()) == 25
    writes = crm.writes()

    second = await sync(api, db, hub, integration["id"], mode="push")
    assert second["status"] == "completed"
    assert second["skipped"] == 25 and second["created"] == second["updated"] == 0
    assert crm.writes() == writes

    member = (await api.get("/api/v1/members", {"limit": 1})).json()["data"][0]
    changed = await api.patch(f"/api/v1/members/{member['id']}", {"first_name": "Renamed"})
    assert changed.status_code == 200
    await tick(db, hub)
    run = await last_changes_run(db)
    assert run is not None and run.updated == 1 and run.skipped == 0, run
    assert crm.writes() == writes + 1
    assert [r for r in crm.records().values() if r["first"] == "Renamed"]
    assert len(crm.records()) == 25
