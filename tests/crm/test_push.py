"""Pushing members to each CRM end to end: API → worker → fake vendor."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select

from memberhub.crm import sync as crm_sync
from memberhub.crm.models import SyncRun
from memberhub.integrations.hub import IntegrationHub
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.ops.retention import purge_expired_history
from tests.crm.conftest import (
    CRM_CONSENT,
    Crm,
    create_integration,
    last_changes_run,
    seed_members,
    sync,
    tick,
)
from tests.fakes.pipedrive import FakePipedrive
from tests.support import ApiClient, age_the_feed

# Our members are read 1,000 a page; the test reads them 200 a page, so that a few hundred
# members make several pages of ours and many of every vendor's batches (100 or 200) and
# more than one of its listings (500). `bench.crm_sync` runs the same push at ten thousand.
TEST_PAGE = 200
MEMBERS = 650
# Vendors written one request per record cost ~7 ms a record against an in-process fake;
# PostgreSQL runs them at a third of the size, still two pages of ours (the batch vendors
# cover it at full size).
PER_RECORD = {"pipedrive", "custom_crm"}


async def test_many_pages_of_members_then_nothing_then_one_change(
    api: ApiClient,
    db: Database,
    hub: IntegrationHub,
    crm: Crm,
    is_postgres: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(crm_sync, "PAGE", TEST_PAGE)
    members = MEMBERS // 3 if is_postgres and crm.name in PER_RECORD else MEMBERS
    assert members > TEST_PAGE
    await seed_members(db, members)
    integration = await create_integration(api, crm.integration_body(pull=False))
    first = await sync(api, db, hub, integration["id"], mode="push")
    assert first["status"] == "completed", first
    assert (first["created"], first["failed"]) == (members, 0), first
    assert len(crm.records()) == members
    writes = crm.writes()

    second = await sync(api, db, hub, integration["id"], mode="push")
    assert second["status"] == "completed"
    assert second["skipped"] == members
    assert second["created"] == second["updated"] == 0
    assert crm.writes() == writes

    member = (await api.get("/api/v1/members", {"limit": 1})).json()["data"][0]
    changed = await api.patch(f"/api/v1/members/{member['id']}", {"first_name": "Renamed"})
    assert changed.status_code == 200
    await tick(db, hub)
    run = await last_changes_run(db)
    assert run is not None
    assert (run.updated, run.skipped, run.failed) == (1, 0, 0)
    assert crm.writes() == writes + 1
    assert [r for r in crm.records().values() if r["first"] == "Renamed"]
    assert len(crm.records()) == members


async def test_changes_whose_events_were_purged_while_disabled_are_pushed_all_the_same(
    api: ApiClient, db: Database, hub: IntegrationHub, crm: Crm
) -> None:
    """The integration is off for longer than RETENTION_DAYS while members change: the
    events that told of the changes are purged before it reads them. Enabled again, it
    notices the gap in the feed and pushes everything (a full push), not only what the
    events left say."""
    await seed_members(db, 3, prefix="gap")
    integration = await create_integration(api, crm.integration_body(pull=False))
    first = await sync(api, db, hub, integration["id"], mode="push")
    assert first["created"] == 3, first
    path = f"/api/v1/integrations/{integration['id']}"
    assert (await api.patch(path, {"enabled": False})).status_code == 200
    members = (await api.get("/api/v1/members", {"limit": 3})).json()["data"]
    for member, name in zip(members[:2], ("Early", "Late"), strict=True):
        changed = await api.patch(f"/api/v1/members/{member['id']}", {"first_name": name})
        assert changed.status_code == 200, changed.text
    await tick(db, hub)  # sequences the feed; the integration is off
    await age_the_feed(db)
    purged = await purge_expired_history(db, older_than=utcnow() - timedelta(days=90))
    assert purged["events"] > 0  # the early rename's event among them; the newest is kept

    assert (await api.patch(path, {"enabled": True})).status_code == 200
    await tick(db, hub)
    names = {r["first"] for r in crm.records().values()}
    assert {"Early", "Late"} <= names, names
    async with db.transaction(read_only=True) as session:
        triggers = list(await session.scalars(select(SyncRun.trigger).order_by(SyncRun.id)))
    assert "gap" in triggers, triggers


async def test_a_dry_run_push_reports_and_writes_nothing(
    api: ApiClient, db: Database, hub: IntegrationHub, crm: Crm
) -> None:
    await seed_members(db, 30, prefix="dry")
    integration = await create_integration(api, crm.integration_body(pull=False))
    dry = await sync(api, db, hub, integration["id"], mode="push", dry_run=True)
    assert (dry["dry_run"], dry["created"], dry["updated"], dry["failed"]) == (True, 30, 0, 0)
    assert dry["requests"] == 0
    assert crm.writes() == 0
    assert crm.records() == {}
    records = (await api.get(f"/api/v1/sync-runs/{dry['id']}/records", {"limit": 100})).json()
    assert len(records["data"]) == 30
    assert {r["outcome"] for r in records["data"]} == {"created"}
    assert all(r["changes"] for r in records["data"])

    real = await sync(api, db, hub, integration["id"], mode="push")
    assert real["created"] == 30
    assert len(crm.records()) == 30


def storm(crm: Crm) -> None:
    """A burst of rate limiting, then one request in four failing with a 5xx. (The seed
    is one whose failures do not bunch at the start: half the first ten calls failing
    would rightly open the integration's circuit breaker for half a minute.)"""
    if crm.name == "hubspot":
        crm.fake.set_rate_limit(None, interval_seconds=0.2)  # the window its 429s announce
    crm.fake.rate_limit_next(10)
    crm.fake.random_failures(0.25, seed=1)


async def test_a_429_storm_and_random_5xx_leave_no_duplicate_and_no_gap(
    api: ApiClient, db: Database, hub: IntegrationHub, crm: Crm
) -> None:
    await seed_members(db, 200, prefix="storm")
    integration = await create_integration(api, crm.integration_body(pull=False))
    storm(crm)
    runs = []
    for _ in range(15):
        run = await sync(api, db, hub, integration["id"], mode="push")
        runs.append(run)
        if run["failed"] == 0:
            break
    errors = await api.get(
        f"/api/v1/sync-runs/{runs[-1]['id']}/records", {"outcome": "failed", "limit": 3}
    )
    assert runs[-1]["failed"] == 0, [r["error"] for r in errors.json()["data"]]
    crm.fake.random_failures(0)
    final = await sync(api, db, hub, integration["id"], mode="push")
    assert (final["skipped"], final["failed"], final["created"], final["updated"]) == (200, 0, 0, 0)
    emails = [record["email"] for record in crm.records().values()]
    assert len(emails) == len(set(emails)) == 200
    assert set(emails) == {f"storm.{index}@example.com" for index in range(200)}
    # Failed records were reported with their reason while it lasted.
    if len(runs) > 1:
        failed = await api.get(
            f"/api/v1/sync-runs/{runs[0]['id']}/records", {"outcome": "failed", "limit": 1}
        )
        assert failed.json()["data"][0]["error"]


def add_remote_person(crm: Crm, email: str, at: datetime) -> None:
    if crm.name == "custom_crm":
        crm.fake.add_contact({"email": email, "first_name": "Remote"}, updated_at=at)
    else:
        crm.fake.add_person("Remote Person", email, update_time=at)


def requests_received(crm: Crm) -> int:
    """Every request the fake answered, searches and listings included."""
    return int(crm.fake.count_all())


async def test_a_first_push_links_what_the_crm_has_and_creates_the_rest_one_request_each(
    api: ApiClient, db: Database, hub: IntegrationHub, crm: Crm
) -> None:
    """A CRM without a batch write is not searched once per new record: the push lists what
    it holds, updates the members it already has (no duplicate) and creates the others."""
    if crm.name not in PER_RECORD:
        pytest.skip("HubSpot and Salesforce upsert by key in batches: nothing to look up")
    now = utcnow()
    held = {f"bulk.{index}@example.com" for index in range(5)}
    for email in held:  # five members the CRM already holds, added behind our back
        add_remote_person(crm, email, now)
    await seed_members(db, 300)
    integration = await create_integration(api, crm.integration_body(pull=False))
    before = requests_received(crm)

    run = await sync(api, db, hub, integration["id"], mode="push")

    # 295 created; the five it held are linked and updated, not counted as created.
    assert (run["created"], run["updated"], run["failed"]) == (295, 5, 0), run
    logged = (await api.get(f"/api/v1/sync-runs/{run['id']}/records", {"limit": 500})).json()
    assert Counter(r["outcome"] for r in logged["data"]) == {"created": 295, "updated": 5}
    records = crm.records().values()
    assert sorted(r["email"] for r in records) == sorted(
        f"bulk.{index}@example.com" for index in range(300)
    )
    # The five it had are the same persons, now carrying the members' names.
    assert {r["first"] for r in records if r["email"] in held} == {
        f"First{index}" for index in range(5)
    }
    # One write per record, plus the listing's single page.
    assert requests_received(crm) - before == 300 + 1


async def test_a_pipedrive_person_holding_the_email_as_another_address_is_linked_not_duplicated(
    api: ApiClient, db: Database, hub: IntegrationHub, pipedrive: FakePipedrive
) -> None:
    person_id = pipedrive.add_person("Ana Lim", "ana.work@example.com")
    pipedrive.update_person(
        person_id,
        {
            "emails": [
                {"value": "ana.work@example.com", "primary": True},
                {"value": "Ana@Example.com", "primary": False},
            ]
        },
    )
    await api.create_member(first_name="Ana", email="ana@example.com", consent=CRM_CONSENT)
    integration = await create_integration(
        api, Crm("pipedrive", pipedrive).integration_body(pull=False)
    )

    run = await sync(api, db, hub, integration["id"], mode="push")

    assert (run["created"], run["updated"], run["failed"]) == (0, 1, 0), run  # linked
    assert list(pipedrive.persons) == [person_id]  # the same person: no second one


async def test_pushing_a_pipedrive_person_keeps_the_emails_added_in_pipedrive(
    api: ApiClient, db: Database, hub: IntegrationHub, pipedrive: FakePipedrive
) -> None:
    """Pipedrive replaces a person's whole `emails` list on update: ours becomes primary,
    and the addresses a Pipedrive user added stay, with their labels."""
    person_id = pipedrive.add_person("Ana Lim", "ana.work@example.com")
    pipedrive.update_person(
        person_id,
        {
            "emails": [
                {"value": "ana.work@example.com", "primary": True, "label": "work"},
                {"value": "Ana@Example.com", "primary": False, "label": "home"},
            ]
        },
    )
    member = await api.create_member(first_name="Ana", email="ana@example.com", consent=CRM_CONSENT)
    integration = await create_integration(
        api, Crm("pipedrive", pipedrive).integration_body(pull=False)
    )
    run = await sync(api, db, hub, integration["id"], mode="push")
    assert (run["created"], run["updated"], run["failed"]) == (0, 1, 0), run

    def emails() -> list[tuple[str, bool]]:
        entries = pipedrive.persons[person_id]["emails"]
        return sorted((e["value"].lower(), bool(e["primary"])) for e in entries)

    assert emails() == [("ana.work@example.com", False), ("ana@example.com", True)]

    # A Pipedrive user adds one more; then the member's address changes here.
    pipedrive.update_person(
        person_id,
        {"emails": [*pipedrive.persons[person_id]["emails"], {"value": "a.lim@example.org"}]},
    )
    response = await api.patch(f"/api/v1/members/{member['id']}", {"email": "ana.new@example.com"})
    assert response.status_code == 200, response.text
    await tick(db, hub)
    primary = [e["value"] for e in pipedrive.persons[person_id]["emails"] if e["primary"]]
    assert primary == ["ana.new@example.com"]
    kept = {e["value"].lower() for e in pipedrive.persons[person_id]["emails"]}
    assert {"ana.work@example.com", "a.lim@example.org"} <= kept
    assert list(pipedrive.persons) == [person_id]
