"""The search-index sync: the rewards catalog and the consenting members' directory reach
Algolia from the event feed, one worker pass after their change."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from memberhub.integrations.hub import IntegrationHub
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.ops.retention import purge_expired_history
from tests.fakes.algolia import FakeAlgolia
from tests.search.conftest import (
    MEMBERS,
    REWARDS,
    algolia_settings,
    create_algolia,
    status,
    tick,
)
from tests.support import ApiClient, age_the_feed


async def create_reward(api: ApiClient, **fields: Any) -> dict[str, Any]:
    body = {"code": fields.pop("code"), "name": "Reward", "points_cost": 100, **fields}
    response = await api.post("/api/v1/rewards", body)
    assert response.status_code == 201, response.text
    return dict(response.json())


async def patch_reward(api: ApiClient, reward_id: str, **fields: Any) -> None:
    response = await api.patch(f"/api/v1/rewards/{reward_id}", fields)
    assert response.status_code == 200, response.text


async def test_created_updated_and_retired_rewards_reach_the_index_after_one_worker_pass(
    api: ApiClient, db: Database, hub: IntegrationHub, algolia: FakeAlgolia
) -> None:
    integration = await create_algolia(api, algolia)
    await tick(db, hub)  # the first pass builds the (empty) index
    mug = await create_reward(api, code="MUG", name="Mug", points_cost=250, stock=3)
    cap = await create_reward(api, code="CAP", name="Cap", description="A blue cap")

    await tick(db, hub)
    after_create = algolia.records(REWARDS)
    await patch_reward(api, mug["id"], name="Big mug", points_cost=300)
    await patch_reward(api, cap["id"], active=False)
    await tick(db, hub)
    after_update = algolia.records(REWARDS)

    assert set(after_create) == {mug["id"], cap["id"]}
    assert after_create[mug["id"]] | {"objectID": mug["id"]} == after_create[mug["id"]]
    assert after_create[mug["id"]]["name"] == "Mug"
    assert after_create[mug["id"]]["stock"] == 3
    assert after_create[mug["id"]]["in_stock"] is True
    assert after_create[cap["id"]]["description"] == "A blue cap"
    assert set(after_update) == {mug["id"]}  # the retired cap was deleted
    assert after_update[mug["id"]]["name"] == "Big mug"
    assert after_update[mug["id"]]["points_cost"] == 300
    shown = await status(api, integration["id"])
    assert shown["pending_events"] == 0
    assert shown["last_error"] is None
    assert shown["records_deleted"] == 1
    assert shown["indices"] == [REWARDS]
    assert shown["member_directory"] is False


async def test_a_claim_updates_the_rewards_stock_in_the_index(
    api: ApiClient, db: Database, hub: IntegrationHub, algolia: FakeAlgolia
) -> None:
    await create_algolia(api, algolia)
    await tick(db, hub)
    reward = await create_reward(api, code="TOTE", points_cost=10, stock=1)
    member = await api.create_member()
    award = {"member_id": member["id"], "points": 50, "reason": "welcome"}
    assert (await api.post("/api/v1/points/award", award)).status_code == 201
    claimed = await api.post(f"/api/v1/rewards/{reward['id']}/claim", {"member_id": member["id"]})
    assert claimed.status_code == 201, claimed.text

    await tick(db, hub)

    assert algolia.records(REWARDS)[reward["id"]]["stock"] == 0
    assert algolia.records(REWARDS)[reward["id"]]["in_stock"] is False
    # The directory is off by default: no member is ever sent.
    assert algolia.index_names() == [REWARDS]


async def test_members_without_the_directory_consent_never_appear(
    api: ApiClient, db: Database, hub: IntegrationHub, algolia: FakeAlgolia
) -> None:
    directory = {"index": MEMBERS, "consent": "profiling", "fields": ["first_name", "tier"]}
    integration = await create_algolia(api, algolia, member_directory=directory)
    listed = await api.create_member(first_name="Ana", consent={"profiling": True})
    await tick(db, hub)  # the first pass builds the directory from the database
    private = await api.create_member(first_name="Bo", consent={"email": True})
    joining = await api.create_member(first_name="Cy", consent={"profiling": True})
    await tick(db, hub)
    built = algolia.records(MEMBERS)

    await api.patch(f"/api/v1/members/{private['id']}", {"first_name": "Bob"})
    withdrawn = await api.patch(
        f"/api/v1/members/{joining['id']}", {"consent": {"profiling": False}}
    )
    assert withdrawn.status_code == 200, withdrawn.text
    assert (await api.delete(f"/api/v1/members/{listed['id']}")).status_code in (200, 204)
    await tick(db, hub)

    assert built == {
        listed["id"]: {"objectID": listed["id"], "first_name": "Ana", "tier": None},
        joining["id"]: {"objectID": joining["id"], "first_name": "Cy", "tier": None},
    }
    assert algolia.records(MEMBERS) == {}
    sent = [op for batch in algolia.batches(MEMBERS) for op in batch]
    assert all(
        op["body"]["objectID"] != private["id"] or op["action"] == "deleteObject" for op in sent
    )
    assert not any(
        op["action"] != "deleteObject" and op["body"]["objectID"] == private["id"] for op in sent
    )
    assert all("email" not in op["body"] for op in sent)  # only the chosen fields
    assert (await status(api, integration["id"]))["indices"] == [REWARDS, MEMBERS]


async def test_an_organisations_directory_lists_its_own_members_only(
    api: ApiClient, db: Database, hub: IntegrationHub, algolia: FakeAlgolia
) -> None:
    ours, theirs = await api.create_organisation(), await api.create_organisation()
    consent = {"profiling": True}
    before = await api.create_member(organisation_id=ours["id"], consent=consent)
    others = [await api.create_member(organisation_id=theirs["id"], consent=consent)]
    directory = {"index": MEMBERS, "consent": "profiling", "fields": ["email"]}
    body = {**algolia_settings(algolia, member_directory=directory), "organisation_id": ours["id"]}
    created = await api.post("/api/v1/integrations", body)
    assert created.status_code == 201, created.text
    await tick(db, hub)  # the first pass builds the directory from the database
    assert set(algolia.records(MEMBERS)) == {before["id"]}

    after = await api.create_member(organisation_id=ours["id"], consent=consent)
    others.append(await api.create_member(organisation_id=theirs["id"], consent=consent))
    moved = await api.patch(f"/api/v1/members/{before['id']}", {"organisation_id": theirs["id"]})
    assert moved.status_code == 200, moved.text
    await tick(db, hub)

    assert set(algolia.records(MEMBERS)) == {after["id"]}, "the moved member is taken out"
    saved = {
        op["body"]["objectID"]
        for batch in algolia.batches(MEMBERS)
        for op in batch
        if op["action"] != "deleteObject"
    }
    assert saved.isdisjoint(other["id"] for other in others), "no other organisation's member"


async def test_a_full_reindex_leaves_exactly_the_databases_records(
    api: ApiClient, db: Database, hub: IntegrationHub, algolia: FakeAlgolia
) -> None:
    integration = await create_algolia(api, algolia)
    await tick(db, hub)
    kept = [await create_reward(api, code=f"R{n}", name=f"Reward {n}") for n in range(5)]
    retired = await create_reward(api, code="OLD", name="Retired")
    await patch_reward(api, retired["id"], active=False)
    # Records memberhub does not have, and the index's own settings.
    algolia.put_records(REWARDS, [{"objectID": "stray-1"}, {"objectID": retired["id"]}])
    algolia.put_settings(REWARDS, {"searchableAttributes": ["name", "description"]})

    asked = await api.post(f"/api/v1/integrations/{integration['id']}/search/reindex")
    waiting = await status(api, integration["id"])
    await tick(db, hub)

    assert asked.status_code == 202, asked.text
    assert asked.json()["reindex_requested_at"] is not None
    assert waiting["reindex_requested_at"] is not None
    assert set(algolia.records(REWARDS)) == {reward["id"] for reward in kept}
    assert algolia.settings(REWARDS) == {"searchableAttributes": ["name", "description"]}
    assert algolia.index_names() == [REWARDS]  # the temporary index was moved in
    done = await status(api, integration["id"])
    assert done["reindex_requested_at"] is None
    assert done["last_reindex_at"] is not None
    assert done["pending_events"] == 0


async def test_an_index_that_fails_for_a_while_loses_nothing_and_catches_up_in_order(
    api: ApiClient, db: Database, hub: IntegrationHub, algolia: FakeAlgolia
) -> None:
    integration = await create_algolia(api, algolia)
    await tick(db, hub)
    first = await create_reward(api, code="FIRST", name="First")
    await tick(db, hub)
    algolia.go_down()
    second = await create_reward(api, code="SECOND", name="Second")
    await patch_reward(api, first["id"], name="First, renamed")
    gone = await create_reward(api, code="GONE", name="Gone")
    await patch_reward(api, gone["id"], active=False)

    await tick(db, hub)
    failing = await status(api, integration["id"])
    algolia.come_back()
    await tick(db, hub)  # still waiting out its backoff
    waiting = await status(api, integration["id"])
    later = utcnow() + timedelta(hours=1)
    await tick(db, hub, now=later)
    caught_up = await status(api, integration["id"])

    assert failing["failures"] == 1
    assert "503" in failing["last_error"]
    assert failing["pending_events"] > 0
    assert failing["next_attempt_at"] is not None
    assert waiting["position"] == failing["position"]
    assert caught_up["failures"] == 0
    assert caught_up["last_error"] is None
    assert caught_up["pending_events"] == 0
    records = algolia.records(REWARDS)
    assert set(records) == {first["id"], second["id"]}
    assert records[first["id"]]["name"] == "First, renamed"
    # Windows reach the index in feed order: the first reward's record was sent before the
    # outage, its renaming after.
    names = [
        op["body"].get("name")
        for batch in algolia.batches(REWARDS)
        for op in batch
        if op["body"]["objectID"] == first["id"] and op["action"] == "updateObject"
    ]
    assert names == ["First", "First, renamed"]


async def test_short_failures_are_retried_by_the_gateway_within_the_pass(
    api: ApiClient, db: Database, hub: IntegrationHub, algolia: FakeAlgolia
) -> None:
    integration = await create_algolia(api, algolia)
    await tick(db, hub)
    reward = await create_reward(api, code="RETRY")
    algolia.fail_next(2, status=502)
    algolia.rate_limit_next(1)

    await tick(db, hub)

    assert set(algolia.records(REWARDS)) == {reward["id"]}
    assert (await status(api, integration["id"]))["failures"] == 0


async def test_changed_index_settings_rebuild_the_indices(
    api: ApiClient, db: Database, hub: IntegrationHub, algolia: FakeAlgolia
) -> None:
    integration = await create_algolia(api, algolia)
    await tick(db, hub)
    member = await api.create_member(first_name="Di", consent={"analytics": True})
    await tick(db, hub)
    assert algolia.records(MEMBERS) == {}

    directory = {"index": MEMBERS, "consent": "analytics", "fields": ["first_name"]}
    patched = await api.patch(
        f"/api/v1/integrations/{integration['id']}",
        {"config": {"base_url": algolia.url, "member_directory": directory}},
    )
    assert patched.status_code == 200, patched.text
    await tick(db, hub)

    assert algolia.records(MEMBERS) == {
        member["id"]: {"objectID": member["id"], "first_name": "Di"}
    }


async def test_an_index_behind_events_the_retention_purged_is_rebuilt(
    api: ApiClient, db: Database, hub: IntegrationHub, algolia: FakeAlgolia
) -> None:
    """Algolia unreachable longer than RETENTION_DAYS: the events behind the sync's position
    (an erasure among them) are purged meanwhile. The gap they leave makes the sync rebuild
    the directory, so the erased member does not stay listed."""
    directory = {"index": MEMBERS, "consent": "profiling", "fields": ["first_name"]}
    integration = await create_algolia(api, algolia, member_directory=directory)
    erased = await api.create_member(first_name="Ana", consent={"profiling": True})
    await tick(db, hub)
    assert set(algolia.records(MEMBERS)) == {erased["id"]}

    algolia.go_down()
    assert (await api.delete(f"/api/v1/members/{erased['id']}")).status_code == 204
    later = await api.create_member(first_name="Lia", consent={"profiling": True})
    await tick(db, hub)
    assert (await status(api, integration["id"]))["failures"] == 1
    await age_the_feed(db)
    purged = await purge_expired_history(db, older_than=utcnow() - timedelta(days=90))
    assert purged["events"] >= 3

    algolia.come_back()
    await tick(db, hub, utcnow() + timedelta(hours=1))  # past the failure's backoff
    assert set(algolia.records(MEMBERS)) == {later["id"]}


async def test_an_organisations_directory_never_hears_of_other_organisations_members(
    api: ApiClient, db: Database, hub: IntegrationHub, algolia: FakeAlgolia
) -> None:
    """Not even in a delete: another organisation's members are never named to the
    vendor; one moving out of the organisation is taken out of its directory."""
    ours, theirs = await api.create_organisation(), await api.create_organisation()
    consent = {"profiling": True}
    directory = {"index": MEMBERS, "consent": "profiling", "fields": ["email"]}
    body = {**algolia_settings(algolia, member_directory=directory), "organisation_id": ours["id"]}
    created = await api.post("/api/v1/integrations", body)
    assert created.status_code == 201, created.text
    await tick(db, hub)

    stranger = await api.create_member(organisation_id=theirs["id"], consent=consent)
    leaving = await api.create_member(organisation_id=ours["id"], consent=consent)
    await tick(db, hub)
    assert set(algolia.records(MEMBERS)) == {leaving["id"]}
    moved = await api.patch(f"/api/v1/members/{stranger['id']}", {"first_name": "Still theirs"})
    assert moved.status_code == 200
    moved = await api.patch(f"/api/v1/members/{leaving['id']}", {"organisation_id": theirs["id"]})
    assert moved.status_code == 200, moved.text
    await tick(db, hub)

    sent = [op for batch in algolia.batches(MEMBERS) for op in batch]
    named = {op.get("body", {}).get("objectID") for op in sent}
    assert stranger["id"] not in named, sent
    assert algolia.records(MEMBERS) == {}
