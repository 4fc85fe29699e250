"""The event outbox: an event exists if and only if its change committed; the event list
filters and pages; every event's data matches the schema published for its type."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NoReturn

import httpx
import jsonschema_rs
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from memberhub.audit.models import AuditEntry
from memberhub.auth.principal import Principal
from memberhub.auth.roles import Role
from memberhub.events.catalog import CATALOG
from memberhub.events.models import Event
from memberhub.events.sequencer import run_passes
from memberhub.exports.jobs import process_exports
from memberhub.integrations.hub import IntegrationHub
from memberhub.kit.actor import Actor
from memberhub.kit.clock import utcnow
from memberhub.kit.crypto import SecretBox
from memberhub.kit.db import Database
from memberhub.kit.errors import Conflict
from memberhub.members import service as members
from memberhub.members.models import Member
from memberhub.members.schemas import MemberCreate
from memberhub.settings import Settings
from memberhub.webhooks.ssrf import UrlPolicy
from tests.conftest import TEST_SECRET_KEY, issue_key
from tests.support import ApiClient
from tests.support_server import bind_local_socket, serving_in_thread

MEMBERS = "/api/v1/members"
EVENTS = "/api/v1/events"


class Boom(RuntimeError):
    """A failure injected half-way through a request."""


def boom(*_args: Any, **_kwargs: Any) -> NoReturn:
    raise Boom("injected failure")


async def count(db: Database, model: Any, *conditions: Any) -> int:
    async with db.transaction(read_only=True) as session:
        total = await session.scalar(select(func.count()).select_from(model).where(*conditions))
    return int(total or 0)


@pytest.fixture
async def tolerant_api(app: FastAPI, admin_key: str) -> AsyncIterator[ApiClient]:
    """Like `api`, but an unhandled error comes back as the 500 a client would see."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield ApiClient(client, admin_key)


async def list_events(api: ApiClient, **params: Any) -> list[dict[str, Any]]:
    response = await api.get(EVENTS, params={"limit": 500, **params})
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


# --- an event exists if and only if its change committed ------------------------------


async def test_committed_create_has_exactly_one_event_and_one_audit_row(
    db: Database, api: ApiClient
) -> None:
    member = await api.create_member()

    [event] = await list_events(api)
    assert event["type"] == "member.created"
    assert event["member_id"] == member["id"]
    assert event["id"].startswith("evt_")
    assert event["data"]["member"] == member
    assert await count(db, AuditEntry, AuditEntry.object_id == member["id"]) == 1


async def test_create_failing_after_the_insert_leaves_no_member_event_or_audit_row(
    db: Database, tolerant_api: ApiClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    audit_before = await count(db, AuditEntry)
    # The member, its event and its audit entry are written (one statement on PostgreSQL)
    # before its consent is recorded, which fails here.
    monkeypatch.setattr("memberhub.members.service.record_consent_changes", boom)

    response = await tolerant_api.post(MEMBERS, {"email": "half@example.com"})

    assert response.status_code == 500
    assert response.json()["error"]["code"] == "INTERNAL_ERROR"
    assert await count(db, Member) == 0
    assert await count(db, Event) == 0
    assert await count(db, AuditEntry) == audit_before
    monkeypatch.undo()
    assert await list_events(tolerant_api) == []
    assert (await tolerant_api.get(MEMBERS)).json()["data"] == []


async def test_create_failing_at_commit_leaves_no_member_event_or_audit_row(
    db: Database, tolerant_api: ApiClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    audit_before = await count(db, AuditEntry)
    # Everything is flushed; the COMMIT itself fails.
    monkeypatch.setattr("sqlalchemy.ext.asyncio.AsyncSession.commit", boom)

    response = await tolerant_api.post(MEMBERS, {"email": "late@example.com"})

    assert response.status_code == 500
    monkeypatch.undo()
    assert await count(db, Member) == 0
    assert await count(db, Event) == 0
    assert await count(db, AuditEntry) == audit_before


async def test_a_failed_sequencing_pass_loses_nothing(
    db: Database, api: ApiClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The change commits without the sequencer; a pass that fails changes nothing, and the
    # next one numbers the event and links the audit entry.
    monkeypatch.setattr("memberhub.events.sequencer.entry_hash", boom)
    member = await api.create_member()
    with pytest.raises(Boom):
        await run_passes(db)
    assert await count(db, Event, Event.position.is_not(None)) == 0
    assert await count(db, AuditEntry, AuditEntry.chain_position.is_not(None)) == 0
    monkeypatch.undo()

    [event] = await list_events(api)
    assert event["member_id"] == member["id"]
    assert await count(db, AuditEntry, AuditEntry.chain_position.is_(None)) == 0


async def test_update_failing_half_way_leaves_the_member_and_events_unchanged(
    db: Database, api: ApiClient, tolerant_api: ApiClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    member = await api.create_member(first_name="Before")
    monkeypatch.setattr("memberhub.members.service.record_write", boom)

    response = await tolerant_api.patch(f"{MEMBERS}/{member['id']}", {"first_name": "After"})

    assert response.status_code == 500
    monkeypatch.undo()
    current = (await api.get(f"{MEMBERS}/{member['id']}")).json()
    assert current["first_name"] == "Before"
    assert current["version"] == member["version"]
    assert [e["type"] for e in await list_events(api)] == ["member.created"]
    assert await count(db, AuditEntry, AuditEntry.action == "member.update") == 0


async def test_refused_change_emits_no_event(api: ApiClient) -> None:
    await api.create_member(email="one@example.com")
    duplicate = await api.post(MEMBERS, {"email": "one@example.com"})
    assert duplicate.status_code == 409

    assert len(await list_events(api)) == 1


async def test_refused_create_writes_no_event_or_audit_row_into_a_going_transaction(
    db: Database, api: ApiClient
) -> None:
    await api.create_member(email="one@example.com")
    events_before, audit_before = await count(db, Event), await count(db, AuditEntry)

    async with db.transaction() as session:
        with pytest.raises(Conflict):
            await members.create_member(
                session,
                Principal.system(Actor.system("test")),
                MemberCreate(email="ONE@example.com"),
            )
        # The transaction goes on past the refusal (as a bulk import's does past a refused
        # row, in a savepoint or not): nothing of the refused member is in it.
        assert await session.scalar(select(func.count()).select_from(Event)) == events_before
        assert await session.scalar(select(func.count()).select_from(AuditEntry)) == audit_before
        assert await session.scalar(select(func.count()).select_from(Member)) == 1


async def test_each_committed_change_emits_its_event(api: ApiClient) -> None:
    member = await api.create_member(first_name="A")
    plan = await api.create_plan()
    await api.patch(f"{MEMBERS}/{member['id']}", {"first_name": "B"})
    await api.post(f"{MEMBERS}/{member['id']}/membership/join", {"plan_id": plan["id"]})
    await api.delete(f"{MEMBERS}/{member['id']}")

    events = await list_events(api, member_id=member["id"])

    assert [e["type"] for e in events] == [
        "member.created",
        "member.updated",
        "member.status.changed",
        "member.deleted",
    ]
    assert events[1]["data"]["changed_fields"] == ["first_name"]
    assert events[2]["data"]["from_status"] == "pending"
    assert events[2]["data"]["to_status"] == "active"


# --- GET /api/v1/events ---------------------------------------------------------------


async def test_events_filter_by_type(api: ApiClient) -> None:
    first = await api.create_member()
    second = await api.create_member()
    await api.patch(f"{MEMBERS}/{first['id']}", {"first_name": "Changed"})

    created = await list_events(api, type="member.created")
    updated = await list_events(api, type="member.updated")
    both = await list_events(api, type=["member.created", "member.updated"])

    assert [e["member_id"] for e in created] == [first["id"], second["id"]]
    assert [e["member_id"] for e in updated] == [first["id"]]
    assert len(both) == 3
    assert {e["type"] for e in both} == {"member.created", "member.updated"}


async def test_events_filter_by_unknown_type_is_422(api: ApiClient) -> None:
    response = await api.get(EVENTS, params={"type": "member.exploded"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["details"]["unknown_types"] == ["member.exploded"]
    assert set(error["details"]["known_types"]) == set(CATALOG)


async def test_events_filter_by_member_id(api: ApiClient) -> None:
    first = await api.create_member()
    second = await api.create_member()
    await api.patch(f"{MEMBERS}/{second['id']}", {"first_name": "Changed"})

    of_second = await list_events(api, member_id=second["id"])

    assert [e["type"] for e in of_second] == ["member.created", "member.updated"]
    assert {e["member_id"] for e in of_second} == {second["id"]}
    assert [e["member_id"] for e in await list_events(api, member_id=first["id"])] == [first["id"]]


async def test_events_filter_by_occurred_from_inclusive_and_occurred_to_exclusive(
    api: ApiClient,
) -> None:
    members = []
    for _ in range(3):
        members.append(await api.create_member())
        await asyncio.sleep(0.01)  # distinct timestamps, whatever the clock resolution
    events = await list_events(api)
    middle = events[1]["occurred_at"]

    from_middle = await list_events(api, occurred_from=middle)
    before_middle = await list_events(api, occurred_to=middle)
    only_middle = await list_events(api, occurred_from=middle, occurred_to=events[2]["occurred_at"])

    assert [e["member_id"] for e in from_middle] == [members[1]["id"], members[2]["id"]]
    assert [e["member_id"] for e in before_middle] == [members[0]["id"]]
    assert [e["member_id"] for e in only_middle] == [members[1]["id"]]


async def test_events_filters_combine(api: ApiClient) -> None:
    member = await api.create_member()
    other = await api.create_member()
    await api.patch(f"{MEMBERS}/{member['id']}", {"first_name": "X"})
    await api.patch(f"{MEMBERS}/{other['id']}", {"first_name": "Y"})

    events = await list_events(api, type="member.updated", member_id=member["id"])

    assert [(e["type"], e["member_id"]) for e in events] == [("member.updated", member["id"])]


async def test_events_page_with_a_cursor_without_gaps_or_repeats(api: ApiClient) -> None:
    for _ in range(5):
        await api.create_member()
    everything = [e["id"] for e in await list_events(api)]
    assert len(everything) == 5

    seen: list[str] = []
    pages: list[int] = []
    late: dict[str, Any] | None = None
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        response = await api.get(EVENTS, params=params)
        assert response.status_code == 200, response.text
        body = response.json()
        seen += [e["id"] for e in body["data"]]
        pages.append(len(body["data"]))
        if not body["pagination"]["has_more"]:
            # The feed's last page still hands out a cursor to poll from.
            assert body["pagination"]["next_cursor"]
            break
        cursor = body["pagination"]["next_cursor"]
        assert cursor

        if len(seen) == 2:
            # A change committed while paging shows up once, at the end.
            late = await api.create_member()

    assert pages == [2, 2, 2]
    assert seen == [*everything, seen[-1]]
    assert len(set(seen)) == 6
    assert late is not None
    assert (await list_events(api, member_id=late["id"]))[0]["id"] == seen[-1]


async def test_events_cursor_keeps_the_filters_order(api: ApiClient) -> None:
    members = [await api.create_member() for _ in range(3)]
    for member in members:
        await api.patch(f"{MEMBERS}/{member['id']}", {"first_name": "P"})

    first = (await api.get(EVENTS, params={"type": "member.updated", "limit": 2})).json()
    rest = (
        await api.get(
            EVENTS,
            params={
                "type": "member.updated",
                "limit": 2,
                "cursor": first["pagination"]["next_cursor"],
            },
        )
    ).json()

    ids = [e["member_id"] for e in first["data"] + rest["data"]]
    assert ids == [m["id"] for m in members]
    assert rest["pagination"]["has_more"] is False
    after_last = await api.get(
        EVENTS, params={"type": "member.updated", "cursor": rest["pagination"]["next_cursor"]}
    )
    assert after_last.json() == {"data": [], "pagination": {"next_cursor": None, "has_more": False}}


async def test_invalid_cursor_is_422(api: ApiClient) -> None:
    response = await api.get(EVENTS, params={"cursor": "not-a-cursor!"})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "INVALID_CURSOR"


async def test_single_event_can_be_fetched(api: ApiClient) -> None:
    await api.create_member()
    [listed] = await list_events(api)

    fetched = await api.get(f"{EVENTS}/{listed['id']}")

    assert fetched.status_code == 200
    assert fetched.json() == listed
    assert (await api.get(f"{EVENTS}/evt_doesnotexist")).status_code == 404


async def test_events_need_the_events_read_scope(db: Database, api: ApiClient) -> None:
    agent = api.with_key(await issue_key(db, Role.SUPPORT_AGENT))
    assert (await agent.get(EVENTS)).status_code == 403
    assert (await agent.get("/api/v1/event-types")).status_code == 403


# --- GET /api/v1/event-types ----------------------------------------------------------


async def event_schemas(api: ApiClient) -> dict[str, dict[str, Any]]:
    response = await api.get("/api/v1/event-types")
    assert response.status_code == 200, response.text
    return {t["type"]: t for t in response.json()["data"]}


async def test_event_types_publish_a_json_schema_for_every_type(api: ApiClient) -> None:
    types = await event_schemas(api)

    assert set(types) == set(CATALOG)
    for name, entry in types.items():
        assert entry["version"] == CATALOG[name].version
        assert entry["description"]
        schema = entry["schema"]
        assert schema["type"] == "object"
        assert schema["properties"]
        jsonschema_rs.meta.validate(schema)  # a well-formed JSON Schema


async def test_member_created_event_data_validates_against_its_schema(api: ApiClient) -> None:
    await api.create_member(
        first_name="Ana",
        phone="+60 12 345 6789",
        date_of_birth="1990-02-03",
        custom_fields={"size": "M", "vip": True, "visits": 3},
        external_ids={"shopify": "123"},
    )
    schema = (await event_schemas(api))["member.created"]["schema"]
    [event] = await list_events(api, type="member.created")

    validator = jsonschema_rs.validator_for(schema, validate_formats=True)
    validator.validate(event["data"])

    # The schema is not vacuous: data missing the member, or with an extra field, fails.
    assert not validator.is_valid({})
    assert not validator.is_valid({**event["data"], "surprise": 1})
    broken = {"member": {**event["data"]["member"], "status": 7}}
    assert not validator.is_valid(broken)


async def _emit_loyalty_events(api: ApiClient, db: Database) -> None:
    """One of each loyalty event: tier change, points, reward claim, approval, alerts."""
    from datetime import timedelta

    from memberhub.kit.clock import utcnow
    from memberhub.points.jobs import expire_points, notify_expiring_points

    async def ok(path: str, body: dict[str, Any], status: int = 201) -> dict[str, Any]:
        response = await api.post(path, body)
        assert response.status_code == status, response.text
        return dict(response.json())

    await api.patch("/api/v1/program", {"alert_thresholds": {"large_redemption_points": 10}})
    await ok("/api/v1/tiers", {"code": "GOLD", "name": "Gold", "rank": 1, "threshold": 50})
    member = await api.create_member()
    soon = (utcnow() + timedelta(days=3)).isoformat()
    award = {"member_id": member["id"], "points": 100, "reason": "welcome", "expires_at": soon}
    awarded = await ok("/api/v1/points/award", award)
    await ok("/api/v1/points/redeem", {"member_id": member["id"], "points": 20})
    await ok("/api/v1/points/deduct", {"member_id": member["id"], "points": 5, "reason": "fix"})
    body = {"member_id": member["id"], "points": 5, "reason": "fix", "require_approval": True}
    held = await ok("/api/v1/points/deduct", body, 202)
    decider = api.with_key(await issue_key(db, Role.MANAGER))  # not the requester
    rejected = await decider.post(f"/api/v1/approvals/{held['id']}/reject", {"note": "no"})
    assert rejected.status_code == 200, rejected.text
    later = (utcnow() + timedelta(days=4)).isoformat()
    batch = awarded["transaction"]["batch_id"]
    await ok("/api/v1/points/extend", {"batch_id": batch, "expires_at": later, "reason": "x"})
    reward = await ok("/api/v1/rewards", {"code": "MUG", "name": "Mug", "points_cost": 10})
    renamed = await api.patch(f"/api/v1/rewards/{reward['id']}", {"name": "Big mug"})
    assert renamed.status_code == 200, renamed.text
    claimed = await ok(f"/api/v1/rewards/{reward['id']}/claim", {"member_id": member["id"]})
    await ok(f"/api/v1/rewards/claims/{claimed['claim']['id']}/cancel", {"reason": "x"}, 200)
    async with db.transaction() as session:
        assert await notify_expiring_points(session, utcnow()) == 2
    assert await expire_points(db, utcnow() + timedelta(days=5)) == 2


async def _renewal_due(api: ApiClient, db: Database) -> None:
    """membership.renewal_due: a member's term ends within a notice period."""
    from memberhub.kit.clock import utcnow
    from memberhub.notifications.jobs import announce_renewals_due

    monthly = await api.create_plan(term_months=1)
    member = await api.create_member()
    joined = await api.post(f"{MEMBERS}/{member['id']}/membership/join", {"plan_id": monthly["id"]})
    assert joined.status_code == 200, joined.text
    settings = await api.patch("/api/v1/notification-settings", {"renewal_due_days": [60]})
    assert settings.status_code == 200, settings.text
    async with db.transaction() as session:
        assert await announce_renewals_due(session, utcnow()) == 1


async def _pay_through_stripe(api: ApiClient, db: Database, plan: dict[str, Any]) -> None:
    """member.payment.changed: a Stripe payment received and processed."""
    from tests.integrations.conftest import (
        create_stripe_integration,
        run_worker,
        send,
        stripe_event,
    )

    payer = await api.create_member()
    integration = await create_stripe_integration(api)
    checkout = {
        "id": "cs_test_outbox",
        "object": "checkout.session",
        "payment_status": "paid",
        "metadata": {"member_id": payer["id"], "plan_id": plan["id"]},
        "amount_total": 100,
        "currency": "myr",
    }
    response = await send(api.http, integration["id"], stripe_event(
        "checkout.session.completed", checkout
    ))  # fmt: skip
    assert response.status_code == 200, response.text
    await run_worker(db)


async def _integration_incident(api: ApiClient) -> None:
    """An http integration whose partner refuses it once, then answers: an incident opens
    and closes."""
    refusing = [True]

    async def ping(_request: Request) -> Response:
        return Response(status_code=401 if refusing[0] else 200)

    sock, base_url = bind_local_socket()
    partner = Starlette(routes=[Route("/ping", ping)])
    async with serving_in_thread(partner, sock, name="partner", lifespan="off"):
        config = {"base_url": base_url, "auth": "none", "test_path": "/ping"}
        created = await api.post(
            "/api/v1/integrations", {"provider": "http", "name": "Partner", "config": config}
        )
        assert created.status_code == 201, created.text
        test = f"/api/v1/integrations/{created.json()['id']}/test"
        assert (await api.post(test)).json()["ok"] is False
        refusing[0] = False
        assert (await api.post(test)).json()["ok"] is True


async def _export_run(api: ApiClient, db: Database, settings: Settings, directory: Path) -> None:
    storage = {
        "provider": "local_storage",
        "name": "Files",
        "config": {"directory": str(directory)},
    }
    integration = (await api.post("/api/v1/integrations", storage)).json()
    definition = {"name": "Leads", "table": "leads", "storage_integration_id": integration["id"]}
    export = (await api.post("/api/v1/exports", definition)).json()
    assert (await api.post(f"/api/v1/exports/{export['id']}/runs")).status_code == 202
    hub = IntegrationHub(db, SecretBox(TEST_SECRET_KEY), UrlPolicy.from_settings(settings))
    try:
        await process_exports(db, hub, utcnow())
    finally:
        await hub.aclose()


async def test_every_emitted_event_validates_against_its_types_schema(
    api: ApiClient, db: Database, settings: Settings, tmp_path: Path
) -> None:
    await _emit_loyalty_events(api, db)
    member = await api.create_member(first_name="A")
    plan = await api.create_plan()
    await api.patch(f"{MEMBERS}/{member['id']}", {"first_name": "B", "consent": {"crm": True}})
    await api.post(f"{MEMBERS}/{member['id']}/membership/join", {"plan_id": plan["id"]})
    await api.delete(f"{MEMBERS}/{member['id']}")
    hook = {"url": "http://127.0.0.1:9/hook", "event_types": ["*"]}
    endpoint = (await api.post("/api/v1/webhook-endpoints", hook)).json()
    assert (await api.post(f"/api/v1/webhook-endpoints/{endpoint['id']}/test")).status_code == 202
    disable = {"enabled": False, "disabled_reason": "maintenance"}
    assert (await api.patch(f"/api/v1/webhook-endpoints/{endpoint['id']}", disable)).is_success
    await _pay_through_stripe(api, db, plan)
    lead = (await api.post("/api/v1/leads", {"email": "lead@example.com"})).json()
    assert (await api.patch(f"/api/v1/leads/{lead['id']}", {"status": "qualified"})).is_success
    enrolled = await api.post(f"/api/v1/leads/{lead['id']}/enroll", {"plan_id": plan["id"]})
    assert enrolled.status_code == 201, enrolled.text
    await _integration_incident(api)
    await _renewal_due(api, db)
    attended = {
        "type": "event.attended",
        "occurred_at": "2026-01-05T10:00:00Z",
        "source": "outbox-test",
        "source_id": "attendee-1",
        "email": "attendee@example.com",
        "attributes": {"event_id": "E-1", "cpd_hours": 2.5},
    }
    assert (await api.post("/api/v1/activities", attended)).status_code == 201
    await api.create_member(email="attendee@example.com")  # matches it: activity.matched
    await _export_run(api, db, settings, tmp_path / "exports")
    schemas = await event_schemas(api)

    events = await list_events(api)

    assert {e["type"] for e in events} == set(CATALOG)
    for event in events:
        validator = jsonschema_rs.validator_for(
            schemas[event["type"]]["schema"], validate_formats=True
        )
        errors = [str(error) for error in validator.iter_errors(event["data"])]
        assert errors == [], (event["type"], errors)
        # The catalog model accepts it too.
        CATALOG[event["type"]].model_validate(event["data"])
        assert event["version"] == CATALOG[event["type"]].version


async def test_events_are_listed_in_commit_order_so_a_cursor_never_passes_a_late_commit(
    db: Database, api: ApiClient, is_postgres: bool
) -> None:
    """Transaction A inserts its event first but commits after B: a reader who paged past
    B's event must still get A's on the next poll."""
    if not is_postgres:
        pytest.skip("SQLite admits one writing transaction at a time, so commits cannot cross")
    from memberhub.events.catalog import MemberDeleted
    from memberhub.events.service import emit
    from memberhub.kit.clock import utcnow

    def deleted(member_id: str) -> MemberDeleted:
        return MemberDeleted(member_id=member_id, organisation_id=None, deleted_at=utcnow())

    async with db.sessionmaker() as slow, slow.begin():
        early = emit(slow, deleted("mem_early"), member_public_id="mem_early")
        await slow.flush()  # inserted, with the lower id, but not committed
        async with db.transaction() as fast:
            late = emit(fast, deleted("mem_late"), member_public_id="mem_late")
        assert early.id < late.id

        first_poll = await api.get("/api/v1/events")
        assert [e["member_id"] for e in first_poll.json()["data"]] == ["mem_late"]
        cursor = first_poll.json()["pagination"]["next_cursor"]
    second_poll = await api.get("/api/v1/events", {"cursor": cursor})
    assert [e["member_id"] for e in second_poll.json()["data"]] == ["mem_early"]


async def test_a_rolled_back_savepoint_drops_only_its_own_events_and_audit_entries(
    db: Database, api: ApiClient
) -> None:
    from memberhub.audit.service import record_write
    from memberhub.events.catalog import MemberDeleted
    from memberhub.events.service import emit
    from memberhub.kit.actor import Actor
    from memberhub.kit.clock import utcnow

    def deleted(member_id: str) -> MemberDeleted:
        return MemberDeleted(member_id=member_id, organisation_id=None, deleted_at=utcnow())

    actor = Actor.system("test")
    async with db.transaction() as session:
        emit(session, deleted("mem_kept1"), member_public_id="mem_kept1")
        record_write(session, actor, action="a.kept", object_type="t", object_id="1", changes={})
        async with session.begin_nested():
            emit(session, deleted("mem_kept2"), member_public_id="mem_kept2")
            record_write(
                session, actor, action="a.kept", object_type="t", object_id="2", changes={}
            )
        savepoint = await session.begin_nested()
        emit(session, deleted("mem_dropped"), member_public_id="mem_dropped")
        record_write(session, actor, action="a.dropped", object_type="t", object_id="3", changes={})
        await session.flush()
        await savepoint.rollback()
    listed = await api.get("/api/v1/events")
    assert [e["member_id"] for e in listed.json()["data"]] == ["mem_kept1", "mem_kept2"]
    assert all(e["id"] for e in listed.json()["data"])
    audit = await api.get("/api/v1/audit", params={"limit": 500})
    actions = [entry["action"] for entry in audit.json()["data"]]
    assert actions.count("a.kept") == 2
    assert "a.dropped" not in actions
