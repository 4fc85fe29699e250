"""A member's data export: everything held about the member, in one JSON document."""

from __future__ import annotations

from typing import Any

from memberhub.auth.roles import Role
from memberhub.kit.db import Base, Database
from memberhub.members.data_export import _member_keyed_columns
from tests.activities.conftest import activity_body, record
from tests.conftest import issue_key
from tests.support import ApiClient


async def _export(api: ApiClient, member_id: str, expect: int = 200) -> dict[str, Any]:
    response = await api.get(f"/api/v1/members/{member_id}/export")
    assert response.status_code == expect, response.text
    return dict(response.json())


async def test_the_export_holds_profile_consent_memberships_ledger_and_activities(
    api: ApiClient,
) -> None:
    plan = await api.create_plan()
    member = await api.create_member(
        email="ada@example.com", first_name="Ada", consent={"email": True}, custom_fields={"k": "v"}
    )
    other = await api.create_member(email="bob@example.com")
    joined = await api.post(
        f"/api/v1/members/{member['id']}/membership/join", {"plan_id": plan["id"]}
    )
    assert joined.status_code == 200, joined.text
    for points, reference in ((120, "first"), (30, "second")):
        award = {"member_id": member["id"], "points": points, "reason": reference}
        assert (await api.post("/api/v1/points/award", award)).status_code == 201
    await api.post(
        "/api/v1/points/award", {"member_id": other["id"], "points": 999, "reason": "not hers"}
    )
    await record(api, activity_body(member))

    document = await _export(api, member["id"])
    assert document["format"] == "memberhub-member-export"
    assert document["member"]["id"] == member["id"]
    assert document["member"]["first_name"] == "Ada"
    assert document["member"]["custom_fields"] == {"k": "v"}
    assert document["consent"]["email"] is True
    records = document["records"]
    assert sorted(t["points"] for t in records["point_transactions"]) == [30, 120]
    assert {t["reason"] for t in records["point_transactions"]} == {"first", "second"}
    assert sum(b["initial"] for b in records["point_batches"]) == 150
    assert records["point_accounts"][0]["current"] == 150
    assert len(records["membership_terms"]) == 1
    assert records["activities"][0]["type"] == "booking.completed"
    # Nothing of another member's.
    assert "not hers" not in str(records)
    assert "bob@example.com" not in str(document)
    types = {event["type"] for event in document["events"]}
    assert {
        "member.created",
        "points.earned",
        "member.status.changed",
        "activity.recorded",
    } <= types
    assert any(entry["action"] == "member.create" for entry in document["audit_log"])


async def test_every_table_keyed_by_member_is_in_the_export() -> None:
    # The walk finds tables from the schema: a table keyed by member is never left out.
    keyed = {table.name for table, _ in _member_keyed_columns()}
    expected = {
        table.name
        for table in Base.metadata.sorted_tables
        if any(fk.column.table.name == "members" for fk in table.foreign_keys)
    }
    assert keyed == expected
    assert {"point_transactions", "membership_terms", "activities", "reward_claims"} <= keyed


async def test_an_export_is_audited_and_needs_the_erasure_permission(
    api: ApiClient, db: Database
) -> None:
    member = await api.create_member()
    await _export(api, member["id"])
    entries = (await api.get("/api/v1/audit", params={"object_id": member["id"]})).json()
    assert "member.export" in {entry["action"] for entry in entries["data"]}
    agent = api.with_key(await issue_key(db, Role.SUPPORT_AGENT))
    forbidden = await agent.get(f"/api/v1/members/{member['id']}/export")
    assert forbidden.status_code == 403
    assert (await api.get("/api/v1/members/mem_doesnotexist/export")).status_code == 404


async def test_a_member_outside_the_keys_organisation_is_not_found(
    api: ApiClient, db: Database
) -> None:
    org = await api.create_organisation()
    other = await api.create_organisation()
    outside = await api.create_member(organisation_id=other["id"])
    bound = api.with_key(await issue_key(db, Role.ADMIN, organisation=org["id"]))
    response = await bound.get(f"/api/v1/members/{outside['id']}/export")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "MEMBER_NOT_FOUND"
