"""Leads through the API: create, list, move along the pipeline, enroll."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from memberhub.audit.models import AuditEntry
from memberhub.audit.service import verify_chain
from memberhub.auth.roles import Role
from memberhub.events.sequencer import run_passes
from memberhub.kit.db import Database
from tests.conftest import issue_key
from tests.support import ApiClient

LEADS = "/api/v1/leads"


async def create_lead(api: ApiClient, **fields: Any) -> dict[str, Any]:
    body = {"email": "Lee.Tan@Example.com", "first_name": "Lee", "last_name": "Tan", **fields}
    response = await api.post(LEADS, body)
    assert response.status_code == 201, response.text
    return dict(response.json())


async def events_of(api: ApiClient, event_type: str) -> list[dict[str, Any]]:
    response = await api.get("/api/v1/events", params={"type": event_type, "limit": 500})
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


async def test_a_lead_is_created_new_and_found_by_get_and_filters(api: ApiClient) -> None:
    lead = await create_lead(
        api,
        phone="210-555-0123",
        source="Website",
        agent_id="agent123",
        custom_fields={"interest_level": "High"},
        external_ids={"salesforce": "SF-12345"},
    )
    assert lead["id"].startswith("led_")
    assert (lead["status"], lead["member_id"], lead["version"]) == ("new", None, 1)
    assert lead["external_ids"] == {"salesforce": "SF-12345"}
    await create_lead(api, email="other@example.com", source="Referral")

    fetched = await api.get(f"{LEADS}/{lead['id']}")
    assert fetched.status_code == 200
    assert fetched.json() == lead
    by_source = (await api.get(LEADS, params={"source": "Website"})).json()["data"]
    assert [row["id"] for row in by_source] == [lead["id"]]
    by_email = (await api.get(LEADS, params={"email": "lee.tan@example.com"})).json()["data"]
    assert [row["id"] for row in by_email] == [lead["id"]]
    [created] = [
        e for e in await events_of(api, "lead.created") if e["data"]["lead"]["id"] == lead["id"]
    ]
    assert created["data"]["lead"]["source"] == "Website"


async def test_the_pipeline_moves_forward_to_lost_and_back_but_never_skips_enrolling(
    api: ApiClient,
) -> None:
    lead = await create_lead(api)
    path = f"{LEADS}/{lead['id']}"
    contacted = await api.patch(path, {"status": "contacted"})
    assert contacted.status_code == 200, contacted.text
    assert contacted.json()["status"] == "contacted"
    assert (await api.patch(path, {"status": "qualified"})).json()["status"] == "qualified"

    unexplained = await api.patch(path, {"status": "lost"})
    assert unexplained.status_code == 422, unexplained.text
    assert unexplained.json()["error"]["details"] == {"field": "lost_reason"}
    assert (await api.get(path)).json()["status"] == "qualified"
    lost = await api.patch(path, {"status": "lost", "lost_reason": "chose another provider"})
    assert (lost.json()["status"], lost.json()["lost_reason"]) == (
        "lost",
        "chose another provider",
    )
    refused = await api.patch(path, {"status": "qualified"})
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "LEAD_TRANSITION_REFUSED"
    assert refused.json()["error"]["details"] == {"from": "lost", "to": "qualified"}
    enrolled_by_patch = await api.patch(path, {"status": "enrolled"})
    assert enrolled_by_patch.status_code == 422

    reopened = await api.patch(path, {"status": "new"})
    assert (reopened.json()["status"], reopened.json()["lost_reason"]) == ("new", None)
    updates = [
        e["data"]["changed_fields"]
        for e in await events_of(api, "lead.updated")
        if e["data"]["lead"]["id"] == lead["id"]
    ]
    assert updates == [
        ["status"],
        ["status"],
        ["lost_reason", "status"],
        ["lost_reason", "status"],
    ]
    unchanged = await api.patch(path, {"status": "new", "first_name": "Lee"})
    assert unchanged.json()["version"] == reopened.json()["version"]


async def test_enrolling_creates_the_member_joins_the_plan_and_emits_enrollment_completed(
    api: ApiClient,
) -> None:
    plan = await api.create_plan()
    lead = await create_lead(api, custom_fields={"employer": "Acme"})
    response = await api.post(f"{LEADS}/{lead['id']}/enroll", {"plan_id": plan["id"]})
    assert response.status_code == 201, response.text
    enrolled = response.json()
    assert enrolled["lead"]["status"] == "enrolled"
    assert enrolled["plan_id"] == plan["id"]
    assert enrolled["lead"]["member_id"] == enrolled["member_id"]
    assert response.headers["Location"] == f"/api/v1/members/{enrolled['member_id']}"

    member = (await api.get(response.headers["Location"])).json()
    assert member["email"] == "Lee.Tan@example.com"
    assert (member["first_name"], member["status"]) == ("Lee", "active")
    assert member["custom_fields"] == {"employer": "Acme"}
    [completed] = [
        e
        for e in await events_of(api, "enrollment.completed")
        if e["data"]["lead_id"] == lead["id"]
    ]
    assert completed["data"]["member_id"] == enrolled["member_id"]
    assert completed["data"]["plan_id"] == plan["id"]

    again = await api.post(f"{LEADS}/{lead['id']}/enroll", {})
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "LEAD_TRANSITION_REFUSED"


async def test_erasing_an_enrolled_member_erases_the_lead_they_came_from(api: ApiClient) -> None:
    lead = await create_lead(api, phone="+60123456789", custom_fields={"employer": "Acme"})
    response = await api.post(f"{LEADS}/{lead['id']}/enroll", {})
    assert response.status_code == 201, response.text
    member_id = response.json()["member_id"]
    other = await create_lead(api, email="kept@example.com")

    assert (await api.delete(f"/api/v1/members/{member_id}")).status_code == 204

    erased = (await api.get(f"{LEADS}/{lead['id']}")).json()
    personal = ("email", "first_name", "last_name", "phone")
    assert [erased[field] for field in personal] == [None] * 4
    assert (erased["custom_fields"], erased["status"]) == ({}, "enrolled")
    for event in [*await events_of(api, "lead.created"), *await events_of(api, "lead.updated")]:
        if event["data"]["lead"]["id"] == lead["id"]:
            assert "lee" not in str(event["data"]).lower(), event
    assert (await api.get(f"{LEADS}/{other['id']}")).json()["email"] == "kept@example.com"
    exported = await api.get("/api/v1/external/leads/export")
    assert exported.status_code == 200, exported.text
    assert "lee.tan@example.com" not in exported.text.lower()
    assert "kept@example.com" in exported.text


async def test_an_enrollment_that_cannot_complete_changes_nothing(api: ApiClient) -> None:
    taken = await api.create_member(email="taken@example.com")
    lead = await create_lead(api, email="TAKEN@example.com")
    duplicate = await api.post(f"{LEADS}/{lead['id']}/enroll", {})
    assert duplicate.status_code == 409
    assert duplicate.json()["error"]["code"] == "DUPLICATE_EMAIL"

    fresh = await create_lead(api, email="fresh@example.com")
    no_plan = await api.post(f"{LEADS}/{fresh['id']}/enroll", {"plan_id": "pln_doesnotexist"})
    assert no_plan.status_code == 404
    assert (await api.get(f"{LEADS}/{fresh['id']}")).json()["status"] == "new"
    members = (await api.get("/api/v1/members", params={"email": "fresh@example.com"})).json()
    assert members["data"] == []
    assert (await api.get(f"/api/v1/members/{taken['id']}")).status_code == 200

    without_email = await create_lead(api, email=None)
    refused = await api.post(f"{LEADS}/{without_email['id']}/enroll", {})
    assert refused.status_code == 422
    assert refused.json()["error"]["details"] == {"field": "email"}


async def test_leads_are_scoped_to_the_keys_organisation(api: ApiClient, db: Database) -> None:
    org = await api.create_organisation()
    other = await api.create_organisation()
    key = await issue_key(db, Role.MANAGER, organisation=org["id"])
    scoped = api.with_key(key)
    mine = await create_lead(scoped, email="mine@example.com")
    assert mine["organisation_id"] == org["id"]
    theirs = await create_lead(api, email="theirs@example.com", organisation_id=other["id"])

    listed = (await scoped.get(LEADS)).json()["data"]
    assert [row["id"] for row in listed] == [mine["id"]]
    hidden = await scoped.get(f"{LEADS}/{theirs['id']}")
    assert hidden.status_code == 404
    assert hidden.json()["error"]["code"] == "LEAD_NOT_FOUND"

    support = api.with_key(await issue_key(db, Role.SUPPORT_AGENT))
    assert (await support.get(LEADS)).status_code == 200


async def test_a_leads_audit_entries_are_sealed_and_erased_with_the_member_it_became(
    api: ApiClient, db: Database
) -> None:
    """A lead's personal values in its audit entries are sealed with the lead's key, shown
    opened, and unreadable once the member it was enrolled as is erased (the chain keeps
    the entries, and they still verify)."""
    created = await api.post(
        LEADS,
        {"email": "Secret.Person@example.com", "first_name": "Zorblax", "phone": "+60123456789"},
    )
    assert created.status_code == 201, created.text
    lead = created.json()
    assert (await api.patch(f"{LEADS}/{lead['id']}", {"last_name": "Quuxley"})).status_code == 200
    async with db.transaction(read_only=True) as session:
        stored = await session.scalars(
            select(AuditEntry.changes).where(AuditEntry.object_id == lead["id"])
        )
        assert "zorblax" not in str(list(stored)).lower()
    shown = await api.get("/api/v1/audit", params={"object_id": lead["id"]})
    assert "Zorblax" in shown.text
    assert "Quuxley" in shown.text

    enrolled = await api.post(f"{LEADS}/{lead['id']}/enroll", {})
    assert enrolled.status_code == 201, enrolled.text
    erased = await api.delete(f"/api/v1/members/{enrolled.json()['member_id']}")
    assert erased.status_code == 204

    audit = await api.get("/api/v1/audit", params={"object_id": lead["id"], "limit": 500})
    assert audit.status_code == 200, audit.text
    text = audit.text.lower()
    for personal in ("secret.person@example.com", "zorblax", "quuxley", "+60123456789"):
        assert personal not in text, f"{personal} still in the lead's audit entries"
    created_entry = next(e for e in audit.json()["data"] if e["action"] == "lead.create")
    assert created_entry["changes"]["first_name"] == {"erased": True}
    await run_passes(db)
    async with db.transaction(read_only=True) as session:
        assert (await verify_chain(session)).intact


async def test_the_lead_email_filter_finds_a_lead_by_the_address_it_was_created_with(
    api: ApiClient,
) -> None:
    created = await api.post("/api/v1/leads", {"email": "kim@xn--bcher-kva.de"})
    assert created.status_code == 201, created.text
    found = await api.get("/api/v1/leads", params={"email": "kim@xn--bcher-kva.de"})
    assert [lead["id"] for lead in found.json()["data"]] == [created.json()["id"]]


async def test_a_null_custom_field_on_a_new_lead_made_over_the_api_sets_nothing(
    api: ApiClient,
) -> None:
    body = {"email": "n@example.com", "custom_fields": {"gone": None, "kept": 1}}
    response = await api.post("/api/v1/leads", body)
    assert response.status_code == 201, response.text
    assert response.json()["custom_fields"] == {"kept": 1}


def _phone_refused(response: Any) -> None:
    assert response.status_code == 422, response.text
    (field,) = response.json()["error"]["details"]["fields"]
    assert field["loc"] == ["body", "phone"], field
    assert field["message"] == "A phone number needs at least 3 digits.", field


@pytest.mark.parametrize("phone", ["--- ()", "+ ( ) / .", "1-2"])
async def test_a_phone_of_punctuation_alone_is_refused_on_create_update_and_import(
    api: ApiClient, phone: str
) -> None:
    _phone_refused(await api.post(LEADS, {"email": "x@example.com", "phone": phone}))
    lead = await create_lead(api, phone="210-555-0123")
    _phone_refused(await api.patch(f"{LEADS}/{lead['id']}", {"phone": phone}))
    assert (await api.get(f"{LEADS}/{lead['id']}")).json()["phone"] == "210-555-0123"
    record = {"external_id": "SF-1", "email": "y@example.com", "phone": phone}
    imported = await api.post(
        "/api/v1/external/leads/import", {"source": "salesforce", "leads": [record]}
    )
    (result,) = imported.json()["results"]
    assert result["outcome"] == "failed", result
    assert [error["field"] for error in result["errors"]] == ["phone"], result
    assert "at least 3 digits" in result["errors"][0]["message"], result
