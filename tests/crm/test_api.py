"""CRM sync through the API: mapping validation, runs, errors, status."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

from memberhub.crm.models import CrmSyncState, RunStatus, SyncRun
from memberhub.integrations.hub import IntegrationHub
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from tests.crm.conftest import CRM_CONSENT, Crm, create_integration, seed_members, sync, tick
from tests.fakes.hubspot import FakeHubSpot
from tests.support import ApiClient


def hubspot_body(hubspot: FakeHubSpot, **sync_settings: Any) -> dict[str, Any]:
    return Crm("hubspot", hubspot).integration_body(**sync_settings)


async def test_the_defaults_are_seed_003s_table_and_shown_in_force(
    api: ApiClient, hubspot: FakeHubSpot
) -> None:
    integration = await create_integration(api, hubspot_body(hubspot))
    shown = await api.get(f"/api/v1/integrations/{integration['id']}/mappings")
    assert shown.status_code == 200
    members = {f["source"]: f["target"] for f in shown.json()["members"]["fields"]}
    assert members["first_name"] == "firstname"
    assert members["tier"] == "memberhub_tier"
    leads = {f["source"]: f for f in shown.json()["leads"]["fields"]}
    assert leads["status"]["transform"]["new"] == "NEW"


async def test_invalid_mappings_are_refused_when_saved_and_say_why(
    api: ApiClient, hubspot: FakeHubSpot
) -> None:
    cases = {
        "unknown source": [
            {"source": "shoe_size", "target": "x"},
            {"source": "email", "target": "email"},
        ],
        "computed pulled": [
            {"source": "tier", "target": "t", "direction": "both"},
            {"source": "email", "target": "email"},
        ],
        "twice": [
            {"source": "email", "target": "email"},
            {"source": "first_name", "target": "EMAIL"},
        ],
        "no email": [{"source": "first_name", "target": "firstname"}],
        "ambiguous transform": [
            {"source": "email", "target": "email"},
            {"source": "status", "target": "s", "transform": {"new": "A", "contacted": "A"}},
        ],
    }
    expected = {
        "unknown source": "is not a member field",
        "computed pulled": "can only be pushed",
        "twice": "mapped twice",
        "no email": "email must be mapped",
        "ambiguous transform": "cannot be read backwards",
    }
    for name, fields in cases.items():
        entity = "leads" if name == "ambiguous transform" else "members"
        body = hubspot_body(hubspot, **{entity: {"object": "contacts", "fields": fields}})
        response = await api.post("/api/v1/integrations", body)
        assert response.status_code == 422, (name, response.text)
        assert expected[name] in response.text, (name, response.text)
    listed = (await api.get("/api/v1/integrations")).json()["data"]
    assert listed == []


async def test_sync_requests_are_validated(
    api: ApiClient, db: Database, hub: IntegrationHub, hubspot: FakeHubSpot
) -> None:
    integration = await create_integration(api, hubspot_body(hubspot))
    path = f"/api/v1/integrations/{integration['id']}/sync"
    assert (await api.post(path, {"mode": "both"})).status_code == 422
    assert (await api.post(path, {"mode": "push", "extra": 1})).status_code == 422
    assert (
        await api.post("/api/v1/integrations/int_missing/sync", {"mode": "push"})
    ).status_code == 404
    webhook = await api.post(
        "/api/v1/integrations",
        {
            "provider": "webhook",
            "name": "Hook",
            "config": {},
            "credentials": {"signing_secret": "s" * 32},
        },
    )
    assert webhook.status_code == 201, webhook.text
    not_crm = await api.post(f"/api/v1/integrations/{webhook.json()['id']}/sync", {"mode": "push"})
    assert not_crm.status_code == 409
    assert not_crm.json()["error"]["code"] == "INTEGRATION_NOT_A_CRM"
    assert (await api.get("/api/v1/sync-runs/syr_missing")).status_code == 404
    await api.post(f"/api/v1/integrations/{integration['id']}/disable")
    assert (await api.post(path, {"mode": "push"})).status_code == 409


async def test_runs_are_listed_and_failed_records_carry_their_reason(
    api: ApiClient, db: Database, hub: IntegrationHub, hubspot: FakeHubSpot
) -> None:
    await seed_members(db, 3, prefix="reason")
    bad = await api.create_member(
        first_name="Bad",
        email="bad.person@example.com",
        custom_fields={"stage": "not-a-stage"},
        consent=CRM_CONSENT,
    )
    # HubSpot refuses this contact's lifecycle stage; the other three go through.
    body = hubspot_body(
        hubspot,
        pull=False,
        members={
            "object": "contacts",
            "fields": [
                {"source": "email", "target": "email"},
                {"source": "first_name", "target": "firstname"},
                {"source": "custom.stage", "target": "lifecyclestage", "direction": "push",
                 "default": "customer"},
            ],
        },
    )  # fmt: skip
    integration = await create_integration(api, body)
    run = await sync(api, db, hub, integration["id"], mode="push")
    # The refusal is the record's alone: the run completes and the three are created.
    errors = (await api.get(f"/api/v1/sync-runs/{run['id']}/records")).json()["data"]
    assert (run["status"], run["created"], run["failed"]) == ("completed", 3, 1), [
        e["error"] for e in errors
    ]
    failed = (await api.get(f"/api/v1/sync-runs/{run['id']}/records", {"outcome": "failed"})).json()
    [record] = failed["data"]
    assert record["entity_id"] == bad["id"]
    assert "lifecyclestage" in record["error"] or "VALIDATION" in record["error"]
    runs = (await api.get(f"/api/v1/integrations/{integration['id']}/runs")).json()["data"]
    assert run["id"] in [r["id"] for r in runs]

    status = (await api.get("/api/v1/external/sync/status")).json()
    assert status["connected_crms"] == ["hubspot"]
    assert status["sync_errors"] == 1
    assert status["pending_updates"] == 1  # the failed record waits for the next run
    assert status["last_sync"] is not None

    # Fixed at the source, it goes through on the next run.
    await api.patch(f"/api/v1/members/{bad['id']}", {"custom_fields": {"stage": "lead"}})
    again = await sync(api, db, hub, integration["id"], mode="push")
    assert (again["created"], again["failed"]) == (1, 0), again
    status = (await api.get("/api/v1/external/sync/status")).json()
    assert (status["sync_errors"], status["pending_updates"]) == (0, 0)


async def test_a_run_whose_worker_stopped_is_marked_abandoned_when_its_lease_runs_out(
    api: ApiClient, db: Database, hub: IntegrationHub, hubspot: FakeHubSpot
) -> None:
    await seed_members(db, 2, prefix="lease")
    integration = await create_integration(api, hubspot_body(hubspot, pull=False))
    stuck = await api.post(f"/api/v1/integrations/{integration['id']}/sync", {"mode": "push"})
    async with db.transaction() as session:
        run = await session.scalar(select(SyncRun).where(SyncRun.public_id == stuck.json()["id"]))
        assert run is not None
        run.status = RunStatus.RUNNING  # as a worker that then died left it
        state = await session.get(CrmSyncState, run.integration_id)
        assert state is not None
        state.active_run_id = run.id
        state.lease_until = utcnow() + timedelta(minutes=5)
        integration_pk = run.integration_id
    # While the lease holds, a new run waits.
    waiting = await sync(api, db, hub, integration["id"], mode="push")
    assert waiting["status"] == "queued"
    async with db.transaction() as session:
        await session.execute(
            update(CrmSyncState)
            .where(CrmSyncState.integration_id == integration_pk)
            .values(lease_until=utcnow() - timedelta(seconds=1))
        )
    await tick(db, hub)
    abandoned = (await api.get(f"/api/v1/sync-runs/{stuck.json()['id']}")).json()
    assert abandoned["status"] == "failed"
    assert "abandoned" in abandoned["error"]
    done = (await api.get(f"/api/v1/sync-runs/{waiting['id']}")).json()
    assert (done["status"], done["created"]) == ("completed", 2)


async def test_null_turns_lead_sync_off_and_stays_off(api: ApiClient, hubspot: FakeHubSpot) -> None:
    integration = await create_integration(api, hubspot_body(hubspot, leads=None))
    shown = (await api.get(f"/api/v1/integrations/{integration['id']}/mappings")).json()
    assert shown["leads"] is None
    assert shown["members"]["fields"]  # the default member mapping is kept
    stored = (await api.get(f"/api/v1/integrations/{integration['id']}")).json()
    assert stored["config"]["sync"]["leads"] is None
    # A later change elsewhere in the config does not bring the default lead mapping back.
    config = stored["config"]
    config["sync"] = {**config["sync"], "coalesce_seconds": 1}
    patched = await api.patch(f"/api/v1/integrations/{integration['id']}", {"config": config})
    assert patched.status_code == 200, patched.text
    again = (await api.get(f"/api/v1/integrations/{integration['id']}/mappings")).json()
    assert again["leads"] is None


async def test_with_lead_sync_null_a_run_pushes_no_lead_and_pulls_none_in(
    api: ApiClient, db: Database, hub: IntegrationHub, hubspot: FakeHubSpot
) -> None:
    hubspot.add_contact({"email": "stranger@example.com", "firstname": "Stranger"})
    lead = await api.post("/api/v1/leads", {"email": "prospect@example.com", "first_name": "Pat"})
    assert lead.status_code == 201, lead.text
    await api.create_member(first_name="Mel", email="mel@example.com", consent=CRM_CONSENT)
    integration = await create_integration(api, hubspot_body(hubspot, leads=None))

    pushed = await sync(api, db, hub, integration["id"], mode="push")
    assert (pushed["status"], pushed["created"], pushed["failed"]) == ("completed", 1, 0)
    # Only the member went to HubSpot; the lead did not.
    emails = {contact.get("email") for contact in hubspot.contacts.values()}
    assert emails == {"stranger@example.com", "mel@example.com"}

    # A CRM record that matches nothing here would become a lead: with leads off it does not.
    pulled = await sync(api, db, hub, integration["id"], mode="pull")
    assert pulled["status"] == "completed", pulled
    leads = (await api.get("/api/v1/leads")).json()["data"]
    assert [found["email"] for found in leads] == ["prospect@example.com"]
