"""GET /api/v1/external/sync/activity: what today's CRM sync runs did (seed 003's
"today's activity"), from the runs' per-record outcomes."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from memberhub.auth.roles import Role
from memberhub.integrations.hub import IntegrationHub
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from tests.conftest import issue_key
from tests.crm.conftest import CRM_CONSENT, Crm, create_integration, sync
from tests.fakes.hubspot import FakeHubSpot
from tests.support import ApiClient

ACTIVITY = "/api/v1/external/sync/activity"


@pytest.fixture
async def synced(
    api: ApiClient, db: Database, hub: IntegrationHub, hubspot: FakeHubSpot
) -> dict[str, Any]:
    """An organisation's HubSpot: a member pushed, then a pull that imports two leads, a
    second pull that updates one of them; a dry run besides."""
    organisation = await api.create_organisation()
    await api.create_member(
        organisation_id=organisation["id"], first_name="Ana", consent=CRM_CONSENT
    )
    body = {**Crm("hubspot", hubspot).integration_body(), "organisation_id": organisation["id"]}
    integration = await create_integration(api, body)
    push = await sync(api, db, hub, integration["id"], mode="push")
    assert push["created"] == 1, push
    first = hubspot.add_contact({"email": "lead.one@example.com", "firstname": "One"})
    hubspot.add_contact({"email": "lead.two@example.com", "firstname": "Two"})
    pull = await sync(api, db, hub, integration["id"], mode="pull")
    assert pull["created"] == 2, pull
    hubspot.update_contact(first, {"firstname": "Uno"})
    again = await sync(api, db, hub, integration["id"], mode="pull")
    assert again["updated"] == 1, again
    dry = await sync(api, db, hub, integration["id"], mode="push", dry_run=True)
    assert dry["status"] == "completed", dry
    return {"organisation": organisation, "integration": integration, "runs": [push, pull, again]}


async def test_todays_activity_counts_what_the_runs_did(
    api: ApiClient, synced: dict[str, Any]
) -> None:
    response = await api.get(ACTIVITY)
    assert response.status_code == 200, response.text
    body = response.json()
    # The worker follows each pull with a push of what changed: count what the API lists.
    listed = await api.get(f"/api/v1/integrations/{synced['integration']['id']}/runs")
    runs = [r for r in listed.json()["data"] if not r["dry_run"]]
    assert len(runs) >= 3
    assert {k: v for k, v in body.items() if k not in ("since", "average_run_seconds")} == {
        "runs": len(runs),
        "completed_runs": len(runs),
        "failed_runs": 0,
        "leads_imported": 2,
        "leads_updated": 1,
        "records_created": sum(r["created"] for r in runs),
        "records_updated": sum(r["updated"] for r in runs),
        "records_failed": 0,
        "success_rate": 100.0,
    }
    assert body["since"].startswith(utcnow().date().isoformat())
    assert body["average_run_seconds"] >= 0


async def test_runs_before_since_are_left_out(api: ApiClient, synced: dict[str, Any]) -> None:
    later = utcnow().isoformat()
    body = (await api.get(ACTIVITY, {"since": later})).json()
    assert (body["runs"], body["leads_imported"], body["average_run_seconds"]) == (0, 0, None)
    assert body["success_rate"] is None


async def test_a_key_of_another_organisation_sees_none_of_it(
    api: ApiClient, db: Database, synced: dict[str, Any]
) -> None:
    other = await api.create_organisation()
    key = api.with_key(await issue_key(db, Role.MANAGER, organisation=other["id"]))
    body = (await key.get(ACTIVITY)).json()
    assert (body["runs"], body["leads_imported"], body["records_created"]) == (0, 0, 0)
    own = api.with_key(await issue_key(db, Role.MANAGER, organisation=synced["organisation"]["id"]))
    assert (await own.get(ACTIVITY)).json()["leads_imported"] == 2


@pytest.mark.parametrize("since", ["tomorrow", "2026-13-01T00:00:00Z", "1700000000"])
async def test_a_bad_since_is_refused(api: ApiClient, since: str) -> None:
    assert (await api.get(ACTIVITY, {"since": since})).status_code == 422


async def test_a_future_since_is_refused(api: ApiClient) -> None:
    since = (utcnow() + timedelta(hours=1)).isoformat()
    response = await api.get(ACTIVITY, {"since": since})
    assert response.status_code == 422
    assert "past" in response.json()["error"]["message"]
