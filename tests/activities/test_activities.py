"""Recording activities over the API: matching, replays, unmatched ones matched later, the
member's history, and bad input refused with nothing written."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from memberhub.activities.models import Activity
from memberhub.auth.roles import Role
from memberhub.events.models import Event
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from tests.activities.conftest import (
    ACTIVITIES,
    activity_body,
    balance,
    create_rule,
    iso,
    on_type,
    record,
    transactions,
)
from tests.conftest import issue_key
from tests.points.conftest import check_ledger
from tests.support import ApiClient


async def _count(db: Database, model: Any) -> int:
    async with db.transaction(read_only=True) as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


async def test_an_activity_of_a_member_earns_by_the_rule_and_names_it(
    api: ApiClient, db: Database
) -> None:
    member = await api.create_member()
    rule = await create_rule(api, name="Bookings", conditions=on_type("booking.completed"))
    recorded = await record(api, activity_body(member))
    activity = recorded["activity"]
    assert recorded["replayed"] is False
    assert activity["member_id"] == member["id"]
    assert activity["status"] == "matched"
    assert activity["matched_by"] == "member_id"
    (credit,) = activity["credits"]
    assert credit["rule_id"] == rule["id"]
    assert credit["rule_version"] == 1
    assert credit["points"] == 100
    assert await balance(api, member["id"]) == 100
    (txn,) = await transactions(api, member["id"])
    assert txn["id"] == credit["transaction_id"]
    assert txn["type"] == "earn"
    assert txn["reason"] == "Bookings"
    assert txn["details"]["rule_id"] == rule["id"]
    assert txn["details"]["rule_version"] == 1
    assert txn["details"]["activity_id"] == activity["id"]
    assert txn["reference_id"] == f"activity:{activity['id']}:{rule['id']}"
    events = (await api.get("/api/v1/events", {"type": "activity.recorded"})).json()["data"]
    (event,) = events
    assert event["data"]["activity"]["id"] == activity["id"]
    assert event["data"]["activity"]["credits"] == [credit]
    await check_ledger(db, [member["id"]])


async def test_a_repeated_source_id_returns_the_first_activity_and_earns_once(
    api: ApiClient, db: Database
) -> None:
    member = await api.create_member()
    await create_rule(api)
    body = activity_body(member, source_id="B-1", attributes={"category": "spa"})
    first = await record(api, body)
    again = await record(api, body, expect=200)
    other_body = await record(api, {**body, "type": "order.paid"}, expect=200)
    assert again["replayed"] is other_body["replayed"] is True
    assert again["activity"] == other_body["activity"] == first["activity"]
    assert await balance(api, member["id"]) == 100
    assert len(await transactions(api, member["id"])) == 1
    assert await _count(db, Activity) == 1
    # Another source may use the same id.
    await record(api, {**body, "source": "other-system"})
    assert await balance(api, member["id"]) == 200


async def test_a_source_id_belongs_to_the_activitys_organisation(
    api: ApiClient, db: Database
) -> None:
    await create_rule(api)
    recorded = []
    for _ in range(2):
        organisation = (await api.create_organisation())["id"]
        member = await api.create_member(organisation_id=organisation)
        key = await issue_key(db, Role.INTEGRATION, organisation=organisation)
        body = activity_body(source_id="order-1", email=member["email"])
        recorded.append(await record(api.with_key(key), body))
        assert recorded[-1]["activity"]["organisation_id"] == organisation
        assert await balance(api, member["id"]) == 100
    assert recorded[0]["activity"]["id"] != recorded[1]["activity"]["id"]


async def test_a_member_is_found_by_external_id_then_by_email(api: ApiClient) -> None:
    by_external = await api.create_member(external_ids={"shop": "C-9"})
    by_email = await api.create_member()
    both = activity_body(external_id="shop:C-9", email=by_email["email"])
    matched = (await record(api, both))["activity"]
    assert (matched["member_id"], matched["matched_by"]) == (by_external["id"], "external_id")
    unknown_external = activity_body(external_id="shop:C-404", email=by_email["email"].upper())
    matched = (await record(api, unknown_external))["activity"]
    assert (matched["member_id"], matched["matched_by"]) == (by_email["id"], "email")
    assert matched["email"] is None  # the key is not kept once matched


async def test_erasing_a_member_erases_the_email_their_activities_waited_with(
    api: ApiClient, db: Database
) -> None:
    # Recorded by email before the member existed (its event holds the email), then matched.
    waited = await record(api, activity_body(email="zed.secret@example.com"))
    member = await api.create_member(email="Zed.Secret@example.com", first_name="Zed")
    at_once = await record(api, activity_body(member))
    # Another organisation's member with the same address is another member: untouched.
    other = await api.create_organisation()
    namesake = await api.create_member(email="zed.secret@example.com", organisation_id=other["id"])
    theirs = await record(
        api, activity_body(email="zed.secret@example.com", organisation_id=other["id"])
    )

    assert (await api.delete(f"/api/v1/members/{member['id']}")).status_code == 204

    async with db.transaction(read_only=True) as session:
        events = (await session.scalars(select(Event))).all()
    recorded = {
        e.data["activity"]["id"]: e.data["activity"]
        for e in events
        if e.type == "activity.recorded"
    }
    assert recorded[waited["activity"]["id"]]["email"] is None
    assert recorded[at_once["activity"]["id"]]["member_id"] == member["id"]
    assert recorded[theirs["activity"]["id"]]["member_id"] == namesake["id"]
    zeds = [e.type for e in events if "zed.secret" in str(e.data).lower()]
    assert zeds == ["member.created"], zeds  # the namesake's own


async def test_an_unmatched_activity_waits_and_earns_when_its_member_is_created(
    api: ApiClient, db: Database
) -> None:
    await create_rule(api, conditions=on_type("event.attended"))
    body = activity_body(
        type="event.attended", email="Late.Comer@example.com", attributes={"cpd_hours": 1.5}
    )
    waiting = (await record(api, body))["activity"]
    assert (waiting["status"], waiting["member_id"], waiting["credits"]) == ("unmatched", None, [])
    assert waiting["email"] == "late.comer@example.com"
    unmatched = (await api.get(ACTIVITIES, {"status": "unmatched"})).json()["data"]
    assert [a["id"] for a in unmatched] == [waiting["id"]]
    member = await api.create_member(email="late.comer@example.com")
    matched = (await api.get(f"{ACTIVITIES}/{waiting['id']}")).json()
    assert matched["member_id"] == member["id"]
    assert (matched["status"], matched["matched_by"], matched["email"]) == (
        "matched",
        "email",
        None,
    )
    assert [c["points"] for c in matched["credits"]] == [100]
    assert await balance(api, member["id"]) == 100
    assert (await api.get(ACTIVITIES, {"status": "unmatched"})).json()["data"] == []
    history = (await api.get(f"/api/v1/members/{member['id']}/activities")).json()["data"]
    assert [a["id"] for a in history] == [waiting["id"]]
    events = (await api.get("/api/v1/events", {"type": "activity.matched"})).json()["data"]
    assert [e["data"]["activity"]["id"] for e in events] == [waiting["id"]]
    # Recording it again changes nothing.
    assert (await record(api, body, expect=200))["activity"]["member_id"] == member["id"]
    assert await balance(api, member["id"]) == 100
    await check_ledger(db, [member["id"]])


async def test_a_key_an_existing_member_gains_matches_the_activities_waiting_for_it(
    api: ApiClient, db: Database
) -> None:
    await create_rule(api)
    member = await api.create_member(email="first@example.com")
    by_external = (await record(api, activity_body(external_id="pos:555")))["activity"]
    by_email = (await record(api, activity_body(email="second@example.com")))["activity"]
    assert by_external["status"] == by_email["status"] == "unmatched"

    linked = await api.patch(f"/api/v1/members/{member['id']}", {"external_ids": {"pos": "555"}})
    assert linked.status_code == 200, linked.text
    matched = (await api.get(f"{ACTIVITIES}/{by_external['id']}")).json()
    assert (matched["member_id"], matched["matched_by"]) == (member["id"], "external_id")
    assert await balance(api, member["id"]) == 100

    moved = await api.patch(f"/api/v1/members/{member['id']}", {"email": "second@example.com"})
    assert moved.status_code == 200, moved.text
    matched = (await api.get(f"{ACTIVITIES}/{by_email['id']}")).json()
    assert (matched["member_id"], matched["matched_by"]) == (member["id"], "email")
    assert await balance(api, member["id"]) == 200
    await check_ledger(db, [member["id"]])


async def test_an_external_id_of_a_new_member_matches_waiting_activities(api: ApiClient) -> None:
    await create_rule(api)
    waiting = (await record(api, activity_body(external_id="crm:77")))["activity"]
    member = await api.create_member(external_ids={"crm": "77"})
    matched = (await api.get(f"{ACTIVITIES}/{waiting['id']}")).json()
    assert (matched["member_id"], matched["matched_by"]) == (member["id"], "external_id")
    assert await balance(api, member["id"]) == 100


async def test_an_activity_matches_only_members_of_its_organisation(
    api: ApiClient, db: Database
) -> None:
    await create_rule(api)
    mine = (await api.create_organisation())["id"]
    theirs = (await api.create_organisation())["id"]
    key = await issue_key(db, Role.INTEGRATION, organisation=mine)
    outsider = await api.create_member(organisation_id=theirs, email="same@example.com")
    waiting = (await record(api.with_key(key), activity_body(email="same@example.com")))["activity"]
    assert waiting["member_id"] is None
    assert await balance(api, outsider["id"]) == 0
    chapter = (await api.create_organisation(parent_id=mine))["id"]
    member = await api.create_member(organisation_id=chapter, email="same@example.com")
    matched = (await api.get(f"{ACTIVITIES}/{waiting['id']}")).json()
    assert matched["member_id"] == member["id"]
    # The other organisation's key sees neither the activity nor its member's history.
    other = api.with_key(await issue_key(db, Role.MANAGER, organisation=theirs))
    assert (await other.get(f"{ACTIVITIES}/{waiting['id']}")).status_code == 404
    assert (await other.get(ACTIVITIES)).json()["data"] == []
    named = activity_body(member_id=member["id"])
    refused = await api.with_key(await issue_key(db, Role.INTEGRATION, organisation=theirs)).post(
        ACTIVITIES, named
    )
    assert refused.status_code == 404, refused.text


async def test_an_ambiguous_key_waits_until_staff_name_the_member(
    api: ApiClient, db: Database
) -> None:
    await create_rule(api)
    first = await api.create_member(
        organisation_id=(await api.create_organisation())["id"], email="twin@example.com"
    )
    await api.create_member(
        organisation_id=(await api.create_organisation())["id"], email="twin@example.com"
    )
    waiting = (await record(api, activity_body(email="twin@example.com")))["activity"]
    assert waiting["member_id"] is None
    again = await api.post(f"{ACTIVITIES}/{waiting['id']}/match", {})
    assert again.status_code == 409, again.text
    assert again.json()["error"]["code"] == "NO_MATCHING_MEMBER"
    matched = await api.post(f"{ACTIVITIES}/{waiting['id']}/match", {"member_id": first["id"]})
    assert matched.status_code == 200, matched.text
    assert (matched.json()["member_id"], matched.json()["matched_by"]) == (first["id"], "manual")
    assert await balance(api, first["id"]) == 100
    twice = await api.post(f"{ACTIVITIES}/{waiting['id']}/match", {"member_id": first["id"]})
    assert twice.status_code == 409
    assert twice.json()["error"]["code"] == "ACTIVITY_ALREADY_MATCHED"
    assert await balance(api, first["id"]) == 100
    await check_ledger(db, [first["id"]])


@pytest.mark.parametrize(
    "attributes",
    [
        {"amount": "12.50", "currency": "MYR"},
        {"amount": 12.5, "currency": "MYR"},
        {"amount": -1, "currency": "MYR"},
        {"amount": True, "currency": "MYR"},
        {"amount": 2**53, "currency": "MYR"},
        {"amount": 1250},
        {"amount": 1250, "currency": "myr"},
        {"amount": 1250, "currency": "MYR", "colour": "red"},
    ],
)
async def test_an_activity_with_a_bad_amount_is_refused_with_nothing_written(
    api: ApiClient, db: Database, attributes: dict[str, Any]
) -> None:
    member = await api.create_member()
    await create_rule(api)
    events_before = await _count(db, Event)
    response = await api.post(ACTIVITIES, activity_body(member, attributes=attributes))
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"]["fields"][0]["loc"][:2] == ["body", "attributes"]
    assert await _count(db, Activity) == 0
    assert await _count(db, Event) == events_before
    assert await balance(api, member["id"]) == 0


async def test_an_activity_needs_a_member_key_and_a_past_time(api: ApiClient, db: Database) -> None:
    member = await api.create_member()
    body = activity_body(member)
    del body["member_id"]
    assert (await api.post(ACTIVITIES, body)).status_code == 422
    future = activity_body(member, occurred_at=utcnow() + timedelta(hours=1))
    response = await api.post(ACTIVITIES, future)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"]["fields"][0]["path"] == "$.occurred_at"
    assert await _count(db, Activity) == 0


async def test_the_members_history_is_paged_newest_first_and_sets_last_activity(
    api: ApiClient,
) -> None:
    member = await api.create_member()
    other = await api.create_member()
    start = utcnow() - timedelta(hours=1)
    ids = [
        (await record(api, activity_body(member, occurred_at=start + timedelta(minutes=i))))[
            "activity"
        ]["id"]
        for i in range(5)
    ]
    await record(api, activity_body(other))
    seen = []
    params: dict[str, Any] = {"limit": 2}
    while True:
        page = (await api.get(f"/api/v1/members/{member['id']}/activities", params)).json()
        seen += [a["id"] for a in page["data"]]
        if not page["pagination"]["has_more"]:
            break
        params["cursor"] = page["pagination"]["next_cursor"]
    assert seen == ids[::-1]
    summary = (await api.get(f"/api/v1/members/{member['id']}/points")).json()
    assert summary["last_activity_at"] is not None
    filtered = await api.get(
        ACTIVITIES, {"member_id": member["id"], "date_from": iso(start + timedelta(minutes=3))}
    )
    assert [a["id"] for a in filtered.json()["data"]] == ids[:2:-1]


async def test_a_replay_is_answered_as_a_replay_after_its_member_is_erased(
    api: ApiClient,
) -> None:
    member = await api.create_member()
    await create_rule(api)
    body = activity_body(member)
    first = (await record(api, body))["activity"]
    assert (await api.delete(f"/api/v1/members/{member['id']}")).status_code == 204
    response = await api.post(ACTIVITIES, body)
    assert response.status_code == 200, response.text
    assert response.json()["replayed"] is True
    assert response.json()["activity"]["id"] == first["id"]
