"""Unmatched activities that make leads, where the program's `unmatched_activity_leads`
says so: one lead per email in an organisation, the activity's source on it, the activity
still waiting for its member, and matched when the lead is enrolled."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from memberhub.auth.roles import Role
from memberhub.kit.db import Database
from memberhub.leads.models import Lead
from memberhub.settings import Settings
from tests.activities.conftest import ACTIVITIES, activity_body, balance, create_rule, record
from tests.conftest import issue_key
from tests.points.conftest import set_program
from tests.support import ApiClient
from tests.support_server import running_server

LEADS = "/api/v1/leads"


async def _leads(api: ApiClient, **params: Any) -> list[dict[str, Any]]:
    response = await api.get(LEADS, params)
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


async def _lead_count(db: Database) -> int:
    async with db.transaction(read_only=True) as session:
        return int(await session.scalar(select(func.count()).select_from(Lead)) or 0)


async def test_by_default_an_unmatched_activity_makes_no_lead(api: ApiClient, db: Database) -> None:
    program = (await api.get("/api/v1/program")).json()
    assert program["unmatched_activity_leads"] == {"enabled": False, "sources": None}
    waiting = (await record(api, activity_body(email="walk.in@example.com")))["activity"]
    assert (waiting["status"], waiting["lead_id"]) == ("unmatched", None)
    assert await _lead_count(db) == 0


async def test_an_unmatched_activity_with_an_email_makes_one_lead_per_email(
    api: ApiClient, db: Database
) -> None:
    await set_program(api, unmatched_activity_leads={"enabled": True})
    first = (
        await record(
            api,
            activity_body(
                type="event.attended",
                source="eventbrite",
                email="Walk.In@example.com",
                external_id="eventbrite:A-1",
            ),
        )
    )["activity"]
    assert first["status"] == "unmatched"
    assert first["member_id"] is None
    (lead,) = await _leads(api)
    assert first["lead_id"] == lead["id"]
    assert (lead["email"], lead["status"], lead["source"]) == (
        "Walk.In@example.com",
        "new",
        "eventbrite",
    )
    assert lead["external_ids"] == {"eventbrite": "A-1"}
    events = (await api.get("/api/v1/events", {"type": "lead.created"})).json()["data"]
    assert [e["data"]["lead"]["id"] for e in events] == [lead["id"]]
    # Another activity with the email (any case, any source) finds the same lead.
    second = (await record(api, activity_body(source="shop", email="walk.in@EXAMPLE.com")))[
        "activity"
    ]
    assert second["lead_id"] == lead["id"]
    # A replay makes nothing more.
    replay = await record(api, {**activity_body(email="x@example.com"), "source_id": "R-1"})
    again = await record(api, {**activity_body(email="x@example.com"), "source_id": "R-1"}, 200)
    assert again["activity"]["lead_id"] == replay["activity"]["lead_id"] is not None
    assert await _lead_count(db) == 2
    listed = (await api.get(ACTIVITIES, {"lead_id": lead["id"]})).json()["data"]
    assert [a["id"] for a in listed] == [second["id"], first["id"]]
    fetched = (await api.get(f"{ACTIVITIES}/{first['id']}")).json()
    assert fetched["lead_id"] == lead["id"]
    audit = (await api.get("/api/v1/audit", {"object_id": lead["id"]})).json()["data"]
    assert [entry["action"] for entry in audit] == ["lead.create"]


async def test_enrolling_the_lead_matches_its_activities_and_they_earn(
    api: ApiClient, db: Database
) -> None:
    await set_program(api, unmatched_activity_leads={"enabled": True})
    await create_rule(api)
    waiting = (await record(api, activity_body(email="prospect@example.com")))["activity"]
    enrolled = await api.post(f"{LEADS}/{waiting['lead_id']}/enroll", {})
    assert enrolled.status_code == 201, enrolled.text
    member_id = enrolled.json()["member_id"]
    assert enrolled.json()["lead"]["status"] == "enrolled"
    matched = (await api.get(f"{ACTIVITIES}/{waiting['id']}")).json()
    assert (matched["status"], matched["member_id"], matched["matched_by"]) == (
        "matched",
        member_id,
        "email",
    )
    assert matched["lead_id"] == waiting["lead_id"]
    assert await balance(api, member_id) == 100
    # The member's later activities match it: no lead, and the enrolled one is not reused.
    later = (await record(api, activity_body(email="prospect@example.com")))["activity"]
    assert (later["member_id"], later["lead_id"]) == (member_id, None)
    assert await _lead_count(db) == 1


async def test_only_the_sources_named_make_leads_and_only_for_nobodys_email(
    api: ApiClient, db: Database
) -> None:
    await set_program(api, unmatched_activity_leads={"enabled": True, "sources": ["eventbrite"]})
    other_source = await record(api, activity_body(source="shop", email="a@example.com"))
    assert other_source["activity"]["lead_id"] is None
    external_only = await record(api, activity_body(source="eventbrite", external_id="x:1"))
    assert external_only["activity"]["lead_id"] is None
    # The same email in two organisations: ambiguous, but those people are members.
    for _ in range(2):
        organisation = (await api.create_organisation())["id"]
        await api.create_member(organisation_id=organisation, email="twin@example.com")
    ambiguous = await record(api, activity_body(source="eventbrite", email="twin@example.com"))
    assert (ambiguous["activity"]["status"], ambiguous["activity"]["lead_id"]) == (
        "unmatched",
        None,
    )
    assert await _lead_count(db) == 0
    made = await record(api, activity_body(source="eventbrite", email="new@example.com"))
    assert made["activity"]["lead_id"] is not None


async def test_a_lead_belongs_to_the_activitys_organisation(api: ApiClient, db: Database) -> None:
    await set_program(api, unmatched_activity_leads={"enabled": True})
    mine = (await api.create_organisation())["id"]
    theirs = (await api.create_organisation())["id"]
    their_lead = await api.post(LEADS, {"email": "same@example.com", "organisation_id": theirs})
    assert their_lead.status_code == 201, their_lead.text
    key = await issue_key(db, Role.INTEGRATION, organisation=mine)
    waiting = await record(api.with_key(key), activity_body(email="same@example.com"))
    lead_id = waiting["activity"]["lead_id"]
    assert lead_id not in (None, their_lead.json()["id"])
    lead = (await api.get(f"{LEADS}/{lead_id}")).json()
    assert lead["organisation_id"] == mine
    other = api.with_key(await issue_key(db, Role.MANAGER, organisation=theirs))
    refused = await other.get(ACTIVITIES, {"lead_id": lead_id})
    assert refused.status_code == 404, refused.text


@pytest.mark.parametrize(
    ("setting", "problem"),
    [
        ({"enabled": "yes"}, "enabled"),
        ({"enabled": True, "sources": []}, "sources"),
        ({"enabled": True, "sources": ["Not A Source"]}, "sources"),
        ({"enabled": True, "sources": ["ok"] * 51}, "sources"),
        ({"enabled": True, "colour": "red"}, "colour"),
        (None, "unmatched_activity_leads"),
    ],
)
async def test_a_bad_setting_is_refused_and_changes_nothing(
    api: ApiClient, setting: Any, problem: str
) -> None:
    response = await api.patch("/api/v1/program", {"unmatched_activity_leads": setting})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "VALIDATION_ERROR"
    assert problem in response.text
    program = (await api.get("/api/v1/program")).json()
    assert program["unmatched_activity_leads"] == {"enabled": False, "sources": None}


async def test_an_unknown_lead_filter_is_not_found_and_a_malformed_one_refused(
    api: ApiClient,
) -> None:
    assert (await api.get(ACTIVITIES, {"lead_id": "led_nothere"})).status_code == 404
    assert (await api.get(ACTIVITIES, {"lead_id": "mem_1"})).status_code == 422


async def test_simultaneous_activities_with_one_email_make_one_lead(
    api: ApiClient, admin_key: str, settings: Settings, db: Database
) -> None:
    await set_program(api, unmatched_activity_leads={"enabled": True})
    bodies = [activity_body(email="crowd@example.com") for _ in range(10)]
    headers = {"Authorization": f"Bearer {admin_key}"}
    async with (
        running_server(settings) as base_url,
        httpx.AsyncClient(base_url=base_url, timeout=60) as client,
    ):
        responses = await asyncio.gather(
            *(client.post(ACTIVITIES, json=b, headers=headers) for b in bodies)
        )
    assert Counter(r.status_code for r in responses) == {201: 10}, [r.text for r in responses]
    assert len({r.json()["activity"]["lead_id"] for r in responses}) == 1
    assert await _lead_count(db) == 1
