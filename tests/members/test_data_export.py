"""A member's data export: everything held about the member, in one JSON document."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select

from memberhub.auth.roles import Role
from memberhub.crm.models import CrmConflict, CrmLink, SyncRun, SyncRunRecord
from memberhub.integrations.models import Integration
from memberhub.kit.db import Base, Database
from memberhub.members.data_export import NAMED_TABLES, _member_keyed_columns
from memberhub.members.models import Member
from tests.activities.conftest import activity_body, record
from tests.bulk.conftest import csv_body
from tests.bulk.conftest import run_worker as run_bulk
from tests.bulk.conftest import upload as bulk_upload
from tests.bulk.test_member_import import finished, post_import
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


async def test_the_export_holds_what_names_the_member_without_a_key(
    api: ApiClient, db: Database, tmp_path: Path
) -> None:
    """CRM conflicts and sync records about the member (they hold the CRM's copy of its
    fields), the bulk report rows that named it by id or email, and the suppressions of
    its addresses: all held about the member, none of another's."""
    member = await api.create_member(email="Ada@Example.com", phone="+60 12-345 6789")
    other = await api.create_member(email="bob@example.com")
    created = await api.post(
        "/api/v1/integrations",
        {"provider": "local_storage", "name": "Dir", "config": {"directory": str(tmp_path)}},
    )
    assert created.status_code == 201, created.text
    for channel, address in (("email", "ada@example.com"), ("sms", "+60123456789")):
        body = {"channel": channel, "address": address}
        assert (await api.post("/api/v1/notification-suppressions", body)).is_success
    body = {"channel": "email", "address": "bob@example.com"}
    assert (await api.post("/api/v1/notification-suppressions", body)).is_success
    upload = await bulk_upload(
        api, csv_body("email,points", "ADA@example.com,5", "bob@example.com,7"), reason="promo"
    )
    await run_bulk(db)
    assert (await api.get(f"/api/v1/points/bulk-awards/{upload['id']}")).is_success
    await crm_copies(db, created.json()["id"], member, other)

    records = (await _export(api, member["id"]))["records"]
    assert [c["values"]["crm"] for c in records["crm_conflicts"]] == [
        f"crm-phone-of-{member['id']}"
    ]
    assert [r["changes"] for r in records["crm_sync_run_records"]] == [
        {"last_name": f"crm-name-of-{member['id']}"}
    ]
    assert [(r["member_id"], r["points"]) for r in records["bulk_job_rows"]] == [(member["id"], 5)]
    assert sorted(s["address"] for s in records["notification_suppressions"]) == [
        "+60123456789",
        "ada@example.com",
    ]
    assert other["id"] not in str(records)
    assert "bob@example.com" not in str(records)


def test_every_table_naming_a_member_other_than_by_key_is_in_the_export() -> None:
    """A column that can name a member without a foreign key (its public id, a polymorphic
    id, an email it was matched by) puts its table on the export's list."""
    naming_columns = {
        "entity_public_id",
        "member_public_id",
        "object_id",
        "entity_id",
        "member_id",
        "match_email",
    }
    naming = {
        table.name
        for table in Base.metadata.sorted_tables
        for column in table.c
        if column.name in naming_columns
        and not any(fk.column.table.name == "members" for fk in column.foreign_keys)
    }
    assert naming <= NAMED_TABLES, naming - NAMED_TABLES
    assert {"crm_conflicts", "crm_sync_run_records", "bulk_job_rows"} <= naming


async def crm_copies(db: Database, integration: str, *members: dict[str, Any]) -> None:
    """For each member, what a CRM sync keeps of it: a link, a conflict holding both sides'
    phone, and a pull's record of a changed last name."""
    async with db.transaction() as session:
        integration_id = await session.scalar(
            select(Integration.id).where(Integration.public_id == integration)
        )
        assert integration_id is not None
        for held in members:
            member_id = await session.scalar(
                select(Member.id).where(Member.public_id == held["id"])
            )
            link = CrmLink(
                integration_id=integration_id,
                entity_type="members",
                entity_id=member_id,
                external_id=f"hs-{held['id']}",
                synced={"phone": "+1"},
                written={},
                held={"phone": f"cfl_{held['id'][-8:]}"},
            )
            session.add(link)
            await session.flush()
            session.add(
                CrmConflict(
                    public_id=f"cfl_{held['id'][-8:]}",
                    integration_id=integration_id,
                    link_id=link.id,
                    entity_type="members",
                    entity_public_id=held["id"],
                    external_id=link.external_id,
                    field="phone",
                    property="phone",
                    values={"memberhub": "+1", "crm": f"crm-phone-of-{held['id']}"},
                )
            )
            run = SyncRun(
                public_id=f"run_{held['id'][-8:]}",
                integration_id=integration_id,
                mode="pull",
                trigger="manual",
                requested_by="test",
            )
            session.add(run)
            await session.flush()
            session.add(
                SyncRunRecord(
                    run_id=run.id,
                    entity_type="members",
                    entity_public_id=held["id"],
                    external_id=link.external_id,
                    outcome="updated",
                    changes={"last_name": f"crm-name-of-{held['id']}"},
                )
            )


async def test_erasure_takes_the_members_values_out_of_what_crm_syncs_kept(
    api: ApiClient, db: Database, tmp_path: Path
) -> None:
    """The CRM's copy of an erased member's fields is erased too: its conflicts (closed,
    nothing is left to settle), its sync records' changes and its link's agreed values;
    another member's stay."""
    member, other = await api.create_member(), await api.create_member()
    created = await api.post(
        "/api/v1/integrations",
        {"provider": "local_storage", "name": "Dir", "config": {"directory": str(tmp_path)}},
    )
    assert created.status_code == 201, created.text
    await crm_copies(db, created.json()["id"], member, other)
    assert (await api.delete(f"/api/v1/members/{member['id']}")).status_code == 204

    async with db.transaction(read_only=True) as session:
        conflicts = {c.entity_public_id: c for c in await session.scalars(select(CrmConflict))}
        records = {r.entity_public_id: r for r in await session.scalars(select(SyncRunRecord))}
        links = {link.external_id: link for link in await session.scalars(select(CrmLink))}
    erased = conflicts[member["id"]]
    assert erased.values == {"memberhub": {"erased": True}, "crm": {"erased": True}}
    assert (erased.status, erased.resolution) == ("resolved", "erased")
    assert records[member["id"]].changes == {"last_name": {"erased": True}}
    assert (links[f"hs-{member['id']}"].synced, links[f"hs-{member['id']}"].held) == ({}, {})
    kept = conflicts[other["id"]]
    assert (kept.status, kept.values["crm"]) == ("open", f"crm-phone-of-{other['id']}")
    assert records[other["id"]].changes == {"last_name": f"crm-name-of-{other['id']}"}


async def test_the_export_holds_nothing_of_another_organisations_member_of_the_same_email(
    api: ApiClient, db: Database
) -> None:
    ours_org = await api.create_organisation()
    their_org = await api.create_organisation()
    ours = await api.create_member(email="kim@example.com", organisation_id=ours_org["id"])
    theirs = await api.create_member(email="kim@example.com", organisation_id=their_org["id"])
    # The other organisation dry-runs an import that updates its own Kim.
    their_key = api.with_key(await issue_key(db, Role.ADMIN, organisation=their_org["id"]))
    dry = await post_import(
        their_key, "email,first_name\nkim@example.com,Kimberly\n", dry_run="true"
    )
    await finished(their_key, db, dry["id"])

    response = await api.get(f"/api/v1/members/{ours['id']}/export")
    assert response.status_code == 200, response.text
    assert response.json()["records"].get("bulk_job_rows", []) == []
    assert theirs["id"] not in response.text


async def test_the_export_holds_no_data_key_of_the_lead_the_member_came_from(
    api: ApiClient,
) -> None:
    lead = await api.post("/api/v1/leads", {"email": "lee@example.com", "first_name": "Lee"})
    assert lead.status_code == 201, lead.text
    enrolled = await api.post(f"/api/v1/leads/{lead.json()['id']}/enroll", {})
    assert enrolled.status_code == 201, enrolled.text

    response = await api.get(f"/api/v1/members/{enrolled.json()['member_id']}/export")
    assert response.status_code == 200, response.text
    [row] = response.json()["records"]["leads"]
    assert "data_key" not in row


async def test_the_export_holds_the_history_of_the_lead_the_member_came_from(
    api: ApiClient,
) -> None:
    """What was recorded of the person as a lead (its audit entries, sealed with the lead's
    key) is held about the member it became."""
    lead = await api.post(
        "/api/v1/leads", {"email": "lee@example.com", "first_name": "Lee", "phone": "+60123456789"}
    )
    assert lead.status_code == 201, lead.text
    renamed = await api.patch(f"/api/v1/leads/{lead.json()['id']}", {"last_name": "Tan"})
    assert renamed.status_code == 200, renamed.text
    other = await api.post("/api/v1/leads", {"email": "other@example.com", "first_name": "O"})
    assert other.status_code == 201, other.text
    enrolled = await api.post(f"/api/v1/leads/{lead.json()['id']}/enroll", {})
    assert enrolled.status_code == 201, enrolled.text

    document = await _export(api, enrolled.json()["member_id"])
    entries = document["audit_log"]
    lead_entries = [entry for entry in entries if entry["object_id"] == lead.json()["id"]]
    assert [entry["action"] for entry in lead_entries] == [
        "lead.create",
        "lead.update",
        "lead.update",
    ]
    assert lead_entries[0]["changes"]["email"]["after"] == "lee@example.com"
    assert lead_entries[1]["changes"]["last_name"]["after"] == "Tan"
    assert "member.create" in [entry["action"] for entry in entries]
    # ...and its events, which carried the same.
    lead_events = [
        e["type"]
        for e in document["events"]
        if e["data"].get("lead", {}).get("id") == lead.json()["id"]
    ]
    assert lead_events == ["lead.created", "lead.updated", "lead.updated"]  # made, renamed, joined
    assert other.json()["id"] not in str(document)
    assert "other@example.com" not in str(document)
