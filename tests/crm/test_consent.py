"""CRM pushes follow the `crm` consent purpose: nothing about a member without it reaches
any CRM, and withdrawing it stops further pushes."""

from __future__ import annotations

from memberhub.integrations.hub import IntegrationHub
from memberhub.kit.db import Database
from tests.crm.conftest import Crm, create_integration, last_changes_run, seed_members, sync, tick
from tests.support import ApiClient


async def test_members_without_crm_consent_produce_no_request_to_any_crm(
    api: ApiClient, db: Database, hub: IntegrationHub, crm: Crm
) -> None:
    await seed_members(db, 12, prefix="refused", crm_consent=False)
    integration = await create_integration(api, crm.integration_body(pull=False))

    full = await sync(api, db, hub, integration["id"], mode="push")
    assert full["status"] == "completed", full
    assert (full["created"], full["updated"], full["failed"], full["requests"]) == (0, 0, 0, 0)
    assert crm.writes() == 0
    assert crm.records() == {}


async def test_only_consenting_members_are_pushed_and_withdrawal_stops_further_pushes(
    api: ApiClient, db: Database, hub: IntegrationHub, crm: Crm
) -> None:
    agreed = await seed_members(db, 5, prefix="agreed")
    await seed_members(db, 5, prefix="refused", crm_consent=False)
    integration = await create_integration(api, crm.integration_body(pull=False))

    first = await sync(api, db, hub, integration["id"], mode="push")
    assert (first["created"], first["failed"]) == (5, 0), first
    emails = {record["email"] for record in crm.records().values()}
    assert emails == {f"agreed.{index}@example.com" for index in range(5)}

    withdrawn = agreed[0]
    response = await api.patch(f"/api/v1/members/{withdrawn}", {"consent": {"crm": False}})
    assert response.status_code == 200, response.text
    await tick(db, hub)
    writes = crm.writes()
    renamed = await api.patch(f"/api/v1/members/{withdrawn}", {"first_name": "Withdrawn"})
    assert renamed.status_code == 200, renamed.text
    await tick(db, hub)
    full = await sync(api, db, hub, integration["id"], mode="push")
    assert full["failed"] == 0, full
    assert crm.writes() == writes
    assert not [r for r in crm.records().values() if r["first"] == "Withdrawn"]


async def test_granting_crm_consent_pushes_the_member_with_the_next_changes(
    api: ApiClient, db: Database, hub: IntegrationHub, crm: Crm
) -> None:
    [member] = await seed_members(db, 1, prefix="later", crm_consent=False)
    integration = await create_integration(api, crm.integration_body(pull=False))
    await sync(api, db, hub, integration["id"], mode="push")
    assert crm.records() == {}

    granted = await api.patch(f"/api/v1/members/{member}", {"consent": {"crm": True}})
    assert granted.status_code == 200, granted.text
    await tick(db, hub)
    run = await last_changes_run(db)
    assert run is not None
    assert (run.created, run.failed) == (1, 0)
    assert {r["email"] for r in crm.records().values()} == {"later.0@example.com"}
