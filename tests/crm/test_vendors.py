"""Vendor specifics end to end: OAuth renewal, webhooks sent back, emails changed at the CRM."""

from __future__ import annotations

import asyncio
from typing import Any

from memberhub.integrations.hub import IntegrationHub
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.settings import Settings
from tests.crm.conftest import CRM_CONSENT, Crm, create_integration, seed_members, sync, tick
from tests.fakes.hubspot import FakeHubSpot
from tests.fakes.salesforce import (
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_REFRESH_TOKEN,
    FakeSalesforce,
)
from tests.support import ApiClient
from tests.support_server import running_server


async def test_salesforce_tokens_are_renewed_when_they_expire_mid_sync(
    api: ApiClient, db: Database, hub: IntegrationHub, salesforce: FakeSalesforce
) -> None:
    await seed_members(db, 450, prefix="oauth")
    body = Crm("salesforce", salesforce).integration_body(pull=False)
    body["config"]["oauth"] = {"token_url": f"{salesforce.url}/services/oauth2/token"}
    body["credentials"].update(
        client_id=DEFAULT_CLIENT_ID,
        client_secret=DEFAULT_CLIENT_SECRET,
        refresh_token=DEFAULT_REFRESH_TOKEN,
    )
    integration = await create_integration(api, body)
    salesforce.expire_token()  # the stored access token no longer works
    run = await sync(api, db, hub, integration["id"], mode="push")
    assert (run["created"], run["failed"]) == (450, 0), run
    assert salesforce.count("POST", "/services/oauth2/token") == 1
    shown = (await api.get(f"/api/v1/integrations/{integration['id']}")).json()
    assert shown["credentials"]["access_token"].endswith(salesforce.access_token[-4:])


async def test_hubspots_webhooks_of_our_own_writes_change_nothing_here(
    api: ApiClient,
    db: Database,
    hub: IntegrationHub,
    hubspot: FakeHubSpot,
    settings: Settings,
) -> None:
    """The loop a sync must not make: we write, HubSpot tells us, we must not write again."""
    await seed_members(db, 20, prefix="loop")
    integration = await create_integration(
        api, Crm("hubspot", hubspot).integration_body(pull=False)
    )
    async with running_server(settings) as base_url:
        hubspot.subscribe(f"{base_url}/api/v1/inbound/{integration['id']}", "hubspot-app-secret")
        await sync(api, db, hub, integration["id"], mode="push")
        writes = hubspot.writes()
        await hubspot.webhooks_idle()
        member = (await api.get("/api/v1/members", {"limit": 1})).json()["data"][0]
        await api.patch(f"/api/v1/members/{member['id']}", {"last_name": "Changed"})
        await tick(db, hub)
        assert hubspot.writes() == writes + 1
        await hubspot.webhooks_idle()
        events = await inbound_events(api, integration["id"])
        assert events, "HubSpot's webhooks arrived"
        for _ in range(3):
            await tick(db, hub)
        hubspot.unsubscribe()
    events = await inbound_events(api, integration["id"])
    assert {e["status"] for e in events} == {"processed"}
    # Every change HubSpot reported was ours: nothing was applied, nothing written again.
    assert hubspot.writes() == writes + 1
    unchanged = (await api.get(f"/api/v1/members/{member['id']}")).json()
    assert (unchanged["last_name"], unchanged["version"]) == ("Changed", member["version"] + 1)


async def inbound_events(api: ApiClient, integration_id: str) -> list[dict[str, Any]]:
    response = await api.get(f"/api/v1/integrations/{integration_id}/inbound-events")
    return list(response.json()["data"])


async def test_an_email_changed_in_the_crm_moves_the_member_and_duplicates_nothing(
    api: ApiClient, db: Database, hub: IntegrationHub, hubspot: FakeHubSpot
) -> None:
    member = await api.create_member(first_name="Ana", email="ana@example.com", consent=CRM_CONSENT)
    integration = await create_integration(api, Crm("hubspot", hubspot).integration_body())
    await sync(api, db, hub, integration["id"], mode="push")
    [contact_id] = list(hubspot.contacts)
    await asyncio.sleep(0.01)
    hubspot.update_contact(contact_id, {"email": "ana.new@example.com"}, modified_at=utcnow())
    run = await sync(api, db, hub, integration["id"], mode="pull")
    assert (run["updated"], run["created"]) == (1, 0), run
    moved = (await api.get(f"/api/v1/members/{member['id']}")).json()
    assert moved["email"] == "ana.new@example.com"
    assert (await api.get("/api/v1/leads")).json()["data"] == []
    await tick(db, hub)
    assert list(hubspot.contacts) == [contact_id]


async def test_a_record_that_began_in_salesforce_is_updated_not_copied(
    api: ApiClient, db: Database, hub: IntegrationHub, salesforce: FakeSalesforce
) -> None:
    fields = {
        "Email": "sf.lead@example.com",
        "FirstName": "Sam",
        "LastName": "Ng",
        "Company": "Acme",
    }
    lead_id = salesforce.add_record("Lead", fields)
    integration = await create_integration(api, Crm("salesforce", salesforce).integration_body())
    pulled = await sync(api, db, hub, integration["id"], mode="pull")
    assert pulled["created"] == 1, pulled
    [lead] = (await api.get("/api/v1/leads")).json()["data"]
    await api.patch(f"/api/v1/leads/{lead['id']}", {"first_name": "Samuel", "status": "contacted"})
    await tick(db, hub)
    records = salesforce.records("Lead")
    assert list(records) == [lead_id]
    assert records[lead_id]["FirstName"] == "Samuel"
    assert records[lead_id]["Status"] == "Working - Contacted"
    assert records[lead_id]["Memberhub_Id__c"] == lead["id"]


async def test_an_enrolment_sends_the_leads_new_status(
    api: ApiClient, db: Database, hub: IntegrationHub, hubspot: FakeHubSpot
) -> None:
    lead = (await api.post("/api/v1/leads", {"email": "enrol@example.com"})).json()
    integration = await create_integration(
        api, Crm("hubspot", hubspot).integration_body(pull=False)
    )
    await sync(api, db, hub, integration["id"], mode="push")
    [contact_id] = list(hubspot.contacts)
    assert hubspot.contacts[contact_id]["hs_lead_status"] == "NEW"
    enrolled = await api.post(f"/api/v1/leads/{lead['id']}/enroll", {})
    assert enrolled.status_code == 201, enrolled.text
    await tick(db, hub)
    assert list(hubspot.contacts) == [contact_id]  # the member is the same contact
    assert hubspot.contacts[contact_id]["hs_lead_status"] == "OPEN_DEAL"


async def test_salesforces_request_limit_fails_a_batch_without_splitting_it(
    api: ApiClient, db: Database, hub: IntegrationHub, salesforce: FakeSalesforce
) -> None:
    await seed_members(db, 200, prefix="limit")
    integration = await create_integration(
        api, Crm("salesforce", salesforce).integration_body(pull=False)
    )
    salesforce.set_daily_limit(0)  # 403 REQUEST_LIMIT_EXCEEDED to every call
    run = await sync(api, db, hub, integration["id"], mode="push")
    assert run["failed"] == 200, run
    # One refused write per batch of 200, not 2n - 1 of them to find a record at fault.
    assert salesforce.count_all() <= 2, salesforce.count_all()
    records = (
        await api.get(f"/api/v1/sync-runs/{run['id']}/records", {"outcome": "failed", "limit": 1})
    ).json()["data"]
    assert "REQUEST_LIMIT_EXCEEDED" in records[0]["error"]


async def test_a_member_whose_email_a_salesforce_contact_holds_is_linked_not_duplicated(
    api: ApiClient, db: Database, hub: IntegrationHub, salesforce: FakeSalesforce
) -> None:
    """A Contact created in Salesforce, not by memberhub, has no memberhub id to upsert on:
    the push finds it by email and links it rather than creating a second one."""
    contact_id = salesforce.add_record(
        "Contact", {"Email": "Ana.Lim@Example.com", "FirstName": "Ann", "LastName": "Lim"}
    )
    # Another Contact with the address, already another member's: not this member's.
    taken = salesforce.add_record(
        "Contact",
        {"Email": "bo@example.com", "LastName": "Bo", "Memberhub_Id__c": "mem_someoneelse"},
    )
    ana = await api.create_member(
        first_name="Ana", last_name="Lim", email="ana.lim@example.com", consent=CRM_CONSENT
    )
    bo = await api.create_member(
        first_name="Bo", last_name="Tan", email="bo@example.com", consent=CRM_CONSENT
    )
    integration = await create_integration(
        api, Crm("salesforce", salesforce).integration_body(pull=False)
    )

    run = await sync(api, db, hub, integration["id"], mode="push")

    assert (run["created"], run["updated"], run["failed"]) == (1, 1, 0), run
    records = salesforce.records("Contact")
    assert len(records) == 3
    assert records[contact_id]["FirstName"] == "Ana"
    assert records[contact_id]["Memberhub_Id__c"] == ana["id"]
    assert records[taken]["Memberhub_Id__c"] == "mem_someoneelse"
    [created] = [r for r in records.values() if r.get("Memberhub_Id__c") == bo["id"]]
    assert created["LastName"] == "Tan"
