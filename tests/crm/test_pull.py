"""Pulling from each CRM: cursors, page boundaries, matching, dry runs."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from memberhub.integrations.hub import IntegrationHub
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from tests.crm.conftest import CRM_CONSENT, Crm, create_integration, seed_members, sync
from tests.fakes.hubspot import FakeHubSpot
from tests.support import ApiClient

STAMP = datetime(2026, 1, 5, 12, 0, 0, tzinfo=UTC)
# More than one page of each vendor's change feed, all changed at the same instant.
SHARED = {"hubspot": 250, "salesforce": 250, "pipedrive": 250, "custom_crm": 250}
# Pages as small as each vendor allows, so that a few hundred records span two or more.
PAGE_SETTINGS: dict[str, dict[str, Any]] = {
    "hubspot": {},
    "salesforce": {"query_batch_size": 200},
    "pipedrive": {"page_size": 200},
    "custom_crm": {},  # its pages hold 100
}
PERSON_FIELDS = [
    {"source": "email", "target": "email"},
    {"source": "first_name", "target": "first_name"},
    {"source": "last_name", "target": "last_name"},
    {"source": "full_name", "target": "name"},
]


def add_remote(crm: Crm, index: int, at: datetime, first: str | None = None) -> str:
    email = f"lead.{index}@example.com"
    first = first or f"Lead{index}"
    if crm.name == "hubspot":
        return str(
            crm.fake.add_contact(
                {"email": email, "firstname": first, "lastname": "Remote"}, modified_at=at
            )
        )
    if crm.name == "custom_crm":
        return str(
            crm.fake.add_contact(
                {"email": email, "first_name": first, "last_name": "Remote"}, updated_at=at
            )
        )
    if crm.name == "salesforce":
        fields = {"Email": email, "FirstName": first, "LastName": "Remote", "Company": "Acme"}
        return str(crm.fake.add_record("Lead", fields, modstamp=at))
    return str(crm.fake.add_person(f"{first} Remote", email, update_time=at))


def edit_remote(crm: Crm, record_id: str, first: str, at: datetime) -> None:
    if crm.name == "hubspot":
        crm.fake.update_contact(record_id, {"firstname": first}, modified_at=at)
    elif crm.name == "salesforce":
        crm.fake.update_record("Lead", record_id, {"FirstName": first}, modstamp=at)
    elif crm.name == "custom_crm":
        crm.fake.update_contact(record_id, {"first_name": first}, updated_at=at)
    else:
        crm.fake.update_person(int(record_id), {"first_name": first}, update_time=at)


def pull_only(crm: Crm) -> dict[str, Any]:
    sync_settings: dict[str, Any] = {"push": False}
    if crm.name == "pipedrive":
        sync_settings["leads"] = {"object": "persons", "fields": PERSON_FIELDS}
    body = crm.integration_body(**sync_settings)
    body["config"].update(PAGE_SETTINGS[crm.name])
    return body


async def all_leads(api: ApiClient) -> list[dict[str, Any]]:
    leads: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 100}
        if cursor:
            params["cursor"] = cursor
        page = (await api.get("/api/v1/leads", params)).json()
        leads += page["data"]
        cursor = page["pagination"]["next_cursor"]
        if not cursor:
            return leads


async def test_records_sharing_a_timestamp_across_pages_are_taken_once_each(
    api: ApiClient, db: Database, hub: IntegrationHub, crm: Crm
) -> None:
    shared = SHARED[crm.name]
    ids = [add_remote(crm, index, STAMP) for index in range(shared)]
    integration = await create_integration(api, pull_only(crm))

    first = await sync(api, db, hub, integration["id"], mode="pull")
    assert first["status"] == "completed", first
    records = (
        await api.get(f"/api/v1/sync-runs/{first['id']}/records", {"outcome": "failed", "limit": 2})
    ).json()
    assert (first["created"], first["updated"], first["failed"]) == (shared, 0, 0), [
        r["error"] for r in records["data"]
    ]
    assert first["requests"] > 1  # it did cross page boundaries
    leads = await all_leads(api)
    assert len({lead["email"] for lead in leads}) == len(leads) == shared

    # Three more records changed at the very instant of the watermark, and one edit.
    for index in range(shared, shared + 3):
        add_remote(crm, index, STAMP)
    edit_remote(crm, ids[7], "Edited", STAMP + timedelta(seconds=1))
    second = await sync(api, db, hub, integration["id"], mode="pull")
    assert (second["created"], second["updated"], second["failed"]) == (3, 1, 0), second
    leads = await all_leads(api)
    assert len({lead["email"] for lead in leads}) == len(leads) == shared + 3
    assert [lead["first_name"] for lead in leads if lead["email"] == "lead.7@example.com"] == [
        "Edited"
    ]
    assert second["cursor_before"] == first["cursor_after"] != first["cursor_before"]


async def test_a_pull_matches_members_by_email_whatever_its_case(
    api: ApiClient, db: Database, hub: IntegrationHub, crm: Crm
) -> None:
    [member_id] = await seed_members(db, 1, prefix="match")
    remote_id = add_remote(crm, 0, STAMP)
    # The CRM has the member's email in other case; the pull links, and creates nothing.
    email = "Match.0@Example.com"
    if crm.name == "hubspot":
        crm.fake.update_contact(remote_id, {"email": email}, modified_at=STAMP)
    elif crm.name == "custom_crm":
        crm.fake.update_contact(remote_id, {"email": email}, updated_at=STAMP)
    elif crm.name == "salesforce":
        crm.fake.add_record(
            "Contact", {"Email": email, "FirstName": "Taken", "LastName": "Remote"}, modstamp=STAMP
        )
    else:
        crm.fake.update_person(int(remote_id), {"emails": [{"value": email, "primary": True}]})
    integration = await create_integration(api, pull_only(crm))
    run = await sync(api, db, hub, integration["id"], mode="pull")
    assert run["failed"] == 0, run
    member = (await api.get(f"/api/v1/members/{member_id}")).json()
    assert member["email"] == "match.0@example.com"
    leads = await all_leads(api)
    assert "match.0@example.com" not in {lead["email"].lower() for lead in leads}


async def test_a_dry_run_pull_reports_and_writes_nothing(
    api: ApiClient, db: Database, hub: IntegrationHub, crm: Crm
) -> None:
    for index in range(5):
        add_remote(crm, index, STAMP)
    integration = await create_integration(api, pull_only(crm))
    dry = await sync(api, db, hub, integration["id"], mode="pull", dry_run=True)
    assert (dry["dry_run"], dry["created"], dry["failed"]) == (True, 5, 0), dry
    assert await all_leads(api) == []
    assert dry["cursor_after"] == dry["cursor_before"] == {}
    real = await sync(api, db, hub, integration["id"], mode="pull")
    assert real["created"] == 5
    assert len(await all_leads(api)) == 5


async def test_the_lookback_finds_what_hubspots_search_indexed_late(
    api: ApiClient, db: Database, hub: IntegrationHub, hubspot: FakeHubSpot
) -> None:
    crm = Crm("hubspot", hubspot)
    body = crm.integration_body(push=False, pull_lookback_seconds=60)
    integration = await create_integration(api, body)
    now = utcnow()
    add_remote(crm, 0, now - timedelta(seconds=10))
    first = await sync(api, db, hub, integration["id"], mode="pull")
    assert first["created"] == 1

    hubspot.set_search_delay(1.0)
    add_remote(crm, 1, now)  # changed first, but searchable only a second later
    hubspot.set_search_delay(0)
    add_remote(crm, 2, now + timedelta(seconds=1))
    second = await sync(api, db, hub, integration["id"], mode="pull")
    assert second["created"] == 1  # lead.2 only: lead.1 is not searchable yet
    # The watermark is now past lead.1's change; the lookback reads before it.
    await asyncio.sleep(1.1)
    third = await sync(api, db, hub, integration["id"], mode="pull")
    assert (third["created"], third["failed"]) == (1, 0), third
    emails = sorted(lead["email"] for lead in await all_leads(api))
    assert emails == ["lead.0@example.com", "lead.1@example.com", "lead.2@example.com"]


async def test_a_boolean_or_number_pulled_from_hubspot_keeps_its_type(
    api: ApiClient, db: Database, hub: IntegrationHub, hubspot: FakeHubSpot
) -> None:
    fields = [
        {"source": "email", "target": "email"},
        {"source": "first_name", "target": "firstname"},
        {"source": "custom.vip", "target": "vip"},
        {"source": "custom.seats", "target": "seats"},
        {"source": "custom.note", "target": "note"},
    ]
    for name in ("vip", "seats", "note"):
        hubspot.add_property(name)
    member = await api.create_member(
        first_name="Ana",
        consent=CRM_CONSENT,
        custom_fields={"vip": True, "seats": 2, "note": "first"},
    )
    integration = await create_integration(
        api,
        Crm("hubspot", hubspot).integration_body(
            members={"object": "contacts", "fields": fields}, leads=None
        ),
    )
    assert (await sync(api, db, hub, integration["id"], mode="push"))["created"] == 1
    [contact_id] = list(hubspot.contacts)
    # HubSpot answers every property as a string, a checkbox's "false" included.
    hubspot.update_contact(
        contact_id,
        {"vip": "false", "seats": "5", "note": "12"},
        modified_at=utcnow() + timedelta(seconds=1),
    )
    pulled = await sync(api, db, hub, integration["id"], mode="pull")
    assert (pulled["updated"], pulled["failed"]) == (1, 0), pulled
    custom = (await api.get(f"/api/v1/members/{member['id']}")).json()["custom_fields"]
    assert custom == {"vip": False, "seats": 5, "note": "12"}


async def test_a_hubspot_contact_edited_during_a_pull_moves_no_other_past_a_page_boundary(
    api: ApiClient, db: Database, hub: IntegrationHub, hubspot: FakeHubSpot, monkeypatch: Any
) -> None:
    """HubSpot's search pages by offset into a live result sorted by lastmodifieddate: a
    contact of a page already read that is edited moves to the end, and every later one
    moves up a place. Paging by offset would skip the one moved across the boundary."""
    from memberhub.integrations.providers.hubspot import HubSpot

    crm = Crm("hubspot", hubspot)
    ids = [add_remote(crm, index, STAMP + timedelta(seconds=index)) for index in range(250)]
    original = HubSpot.changed_contacts
    pages = 0

    async def edit_after_first_page(self: HubSpot, *args: Any, **kwargs: Any) -> Any:
        nonlocal pages
        answer = await original(self, *args, **kwargs)
        pages += 1
        if pages == 1:  # a HubSpot user edits a contact the pull has just read
            edit_remote(crm, ids[0], "Edited", utcnow())
        return answer

    monkeypatch.setattr(HubSpot, "changed_contacts", edit_after_first_page)
    integration = await create_integration(api, pull_only(crm))
    run = await sync(api, db, hub, integration["id"], mode="pull")
    assert run["failed"] == 0, run
    assert pages > 1
    leads = await all_leads(api)
    assert sorted(lead["email"] for lead in leads) == sorted(
        f"lead.{index}@example.com" for index in range(250)
    )
