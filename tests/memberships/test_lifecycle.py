"""Plans and the membership lifecycle through the HTTP API, plus the scheduled status job.

pending → active → grace → lapsed, with suspended and cancelled; every change writes the
status history and a member.status.changed event.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import insert, select, update

from memberhub.auth.roles import Role
from memberhub.kit.clock import add_months, utcnow
from memberhub.kit.db import Database
from memberhub.kit.ids import new_public_id
from memberhub.members.models import Member
from memberhub.memberships import service as membership_service
from memberhub.memberships.jobs import advance_membership_statuses
from memberhub.memberships.models import MembershipPlan
from memberhub.worker.models import WorkerHeartbeat
from memberhub.worker.runner import Worker
from tests.conftest import issue_key
from tests.memberships.conftest import RunJob, SetTermDates
from tests.support import ApiClient

PLANS = "/api/v1/plans"
MEMBERS = "/api/v1/members"
SECOND = timedelta(seconds=1)


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value)


def membership(member_id: str, operation: str) -> str:
    return f"{MEMBERS}/{member_id}/membership/{operation}"


async def do(
    api: ApiClient, member_id: str, operation: str, body: dict[str, Any] | None = None
) -> httpx.Response:
    return await api.post(membership(member_id, operation), body or {})


async def ok(
    api: ApiClient, member_id: str, operation: str, body: dict[str, Any] | None = None
) -> dict[str, Any]:
    response = await do(api, member_id, operation, body)
    assert response.status_code == 200, response.text
    return dict(response.json())


async def get_member(api: ApiClient, member_id: str) -> dict[str, Any]:
    response = await api.get(f"{MEMBERS}/{member_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


async def history(api: ApiClient, member_id: str) -> list[tuple[str, str, str]]:
    response = await api.get(f"{MEMBERS}/{member_id}/status-history", params={"limit": 500})
    assert response.status_code == 200, response.text
    return [(c["from_status"], c["to_status"], c["reason"]) for c in response.json()["data"]]


async def status_events(api: ApiClient, member_id: str) -> list[tuple[str, str, str]]:
    response = await api.get(
        "/api/v1/events",
        params={"type": "member.status.changed", "member_id": member_id, "limit": 500},
    )
    assert response.status_code == 200, response.text
    return [
        (e["data"]["from_status"], e["data"]["to_status"], e["data"]["reason"])
        for e in response.json()["data"]
    ]


async def terms(api: ApiClient, member_id: str) -> list[dict[str, Any]]:
    response = await api.get(f"{membership(member_id, 'terms')}", params={"limit": 500})
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


async def assert_changes(
    api: ApiClient, member_id: str, expected: list[tuple[str, str, str]]
) -> None:
    """The status history and the member.status.changed events both record `expected`."""
    assert await history(api, member_id) == expected
    assert await status_events(api, member_id) == expected


async def joined_member(api: ApiClient, plan: dict[str, Any]) -> dict[str, Any]:
    member = await api.create_member()
    return dict((await ok(api, member["id"], "join", {"plan_id": plan["id"]}))["member"])


# ---------------------------------------------------------------- plans


async def test_a_plan_is_created_with_defaults_and_can_be_read_and_listed(
    api: ApiClient,
) -> None:
    response = await api.post(
        PLANS,
        {
            "code": "STD",
            "name": "Standard",
            "term_months": 12,
            "price_amount": 24000,
            "currency": "MYR",
        },
    )
    assert response.status_code == 201, response.text
    plan = response.json()
    assert plan["id"].startswith("pln_")
    assert {k: v for k, v in plan.items() if k not in ("id", "created_at", "updated_at")} == {
        "code": "STD",
        "name": "Standard",
        "organisation_id": None,
        "term_months": 12,
        "price_amount": 24000,
        "currency": "MYR",
        "grace_days": 30,
        "renewal_window_days": 30,
        "auto_renew": False,
        "active": True,
    }
    assert (await api.get(f"{PLANS}/{plan['id']}")).json() == plan
    listed = await api.get(PLANS)
    assert [p["id"] for p in listed.json()["data"]] == [plan["id"]]


async def test_a_plan_can_be_updated_and_retired(api: ApiClient) -> None:
    plan = await api.create_plan(name="Standard", price_amount=100)
    response = await api.patch(
        f"{PLANS}/{plan['id']}",
        {"name": "Standard 2026", "price_amount": 200, "grace_days": 7, "active": False},
    )
    assert response.status_code == 200, response.text
    patched = response.json()
    assert patched["name"] == "Standard 2026"
    assert patched["price_amount"] == 200
    assert patched["grace_days"] == 7
    assert patched["active"] is False
    assert patched["code"] == plan["code"]
    assert patched["term_months"] == plan["term_months"]
    assert (await api.get(f"{PLANS}/{plan['id']}")).json() == patched


async def test_a_duplicate_plan_code_is_409(api: ApiClient) -> None:
    await api.create_plan(code="GOLD")
    response = await api.post(
        PLANS,
        {"code": "GOLD", "name": "Gold", "term_months": 12, "price_amount": 1, "currency": "MYR"},
    )
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "DUPLICATE_PLAN_CODE"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"term_months": 0}, "term_months"),
        ({"term_months": 121}, "term_months"),
        ({"price_amount": -1}, "price_amount"),
        ({"price_amount": 2**53}, "price_amount"),
        ({"currency": "myr"}, "currency"),
        ({"currency": "MYRR"}, "currency"),
        ({"grace_days": -1}, "grace_days"),
        ({"grace_days": 366}, "grace_days"),
        ({"renewal_window_days": 366}, "renewal_window_days"),
        ({"code": "has space"}, "code"),
        ({"code": ""}, "code"),
        ({"name": ""}, "name"),
        ({"colour": "gold"}, "colour"),
    ],
    ids=[
        "zero-term",
        "long-term",
        "negative-price",
        "price-beyond-safe-integer",
        "lower-currency",
        "long-currency",
        "negative-grace",
        "long-grace",
        "long-window",
        "code-space",
        "empty-code",
        "empty-name",
        "unknown-field",
    ],
)
async def test_an_invalid_plan_is_422_naming_the_field(
    api: ApiClient, change: dict[str, Any], field: str
) -> None:
    body = {"code": "OK", "name": "Ok", "term_months": 12, "price_amount": 1, "currency": "MYR"}
    response = await api.post(PLANS, {**body, **change})
    assert response.status_code == 422, response.text
    fields = response.json()["error"]["details"]["fields"]
    assert any(f["loc"][:2] == ["body", field] for f in fields), fields
    assert (await api.get(PLANS)).json()["data"] == []


@pytest.mark.parametrize("change", [{"term_months": 6}, {"code": "NEW"}, {"grace_days": 400}])
async def test_an_invalid_plan_patch_is_422_and_changes_nothing(
    api: ApiClient, change: dict[str, Any]
) -> None:
    plan = await api.create_plan()
    response = await api.patch(f"{PLANS}/{plan['id']}", change)
    assert response.status_code == 422
    assert (await api.get(f"{PLANS}/{plan['id']}")).json() == plan


async def test_an_unknown_plan_is_404(api: ApiClient) -> None:
    response = await api.get(f"{PLANS}/pln_doesnotexist")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "PLAN_NOT_FOUND"


async def test_a_plan_of_one_organisation_is_invisible_to_keys_of_another(
    api: ApiClient, http: httpx.AsyncClient, db: Database
) -> None:
    north = await api.create_organisation()
    south = await api.create_organisation()
    north_plan = await api.create_plan(organisation_id=north["id"])
    shared_plan = await api.create_plan()
    assert north_plan["organisation_id"] == north["id"]

    south_key = ApiClient(http, await issue_key(db, Role.MANAGER, organisation=south["id"]))
    assert (await south_key.get(f"{PLANS}/{north_plan['id']}")).status_code == 404
    listed = (await south_key.get(PLANS)).json()["data"]
    assert [p["id"] for p in listed] == [shared_plan["id"]]


async def test_a_member_holds_only_plans_of_its_organisation_or_those_above_it(
    api: ApiClient,
) -> None:
    """An HQ's plans are its chapters' members' too; another organisation's never, even
    through a key that sees both (it would be an organisation's member paying another's
    plan), nor an organisation's plan for a member of none."""
    hq = await api.create_organisation()
    chapter = await api.create_organisation(parent_id=hq["id"])
    other = await api.create_organisation()
    member = await api.create_member(organisation_id=chapter["id"])
    loner = await api.create_member()
    other_plan = await api.create_plan(organisation_id=other["id"])
    hq_plan = await api.create_plan(organisation_id=hq["id"])
    chapter_plan = await api.create_plan(organisation_id=chapter["id"])
    shared_plan = await api.create_plan()

    for who, plan in ((member, other_plan), (loner, hq_plan)):
        refused = await do(api, who["id"], "join", {"plan_id": plan["id"]})
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"]["code"] == "PLAN_OF_ANOTHER_ORGANISATION"
        assert (await get_member(api, who["id"]))["status"] == "pending"
    joined = await ok(api, loner["id"], "join", {"plan_id": shared_plan["id"]})
    assert joined["member"]["status"] == "active"
    joined = await ok(api, member["id"], "join", {"plan_id": hq_plan["id"]})
    assert joined["member"]["membership"]["plan_id"] == hq_plan["id"]
    changed = await do(api, member["id"], "upgrade", {"plan_id": other_plan["id"]})
    assert changed.status_code == 409, changed.text
    upgraded = await ok(api, member["id"], "upgrade", {"plan_id": chapter_plan["id"]})
    assert upgraded["member"]["membership"]["plan_id"] == chapter_plan["id"]


async def test_renewing_onto_the_plan_of_an_organisation_the_member_left_is_refused(
    api: ApiClient,
) -> None:
    north = await api.create_organisation()
    south = await api.create_organisation()
    north_plan = await api.create_plan(
        organisation_id=north["id"], term_months=1, renewal_window_days=365
    )
    member = await api.create_member(organisation_id=north["id"])
    joined = await ok(api, member["id"], "join", {"plan_id": north_plan["id"]})
    moved = await api.patch(f"/api/v1/members/{member['id']}", {"organisation_id": south["id"]})
    assert moved.status_code == 200, moved.text
    # No plan_id: the member's own plan, which is north's, a member of south may not hold.
    refused = await do(api, member["id"], "renew", {})
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "PLAN_OF_ANOTHER_ORGANISATION"
    after = await get_member(api, member["id"])
    assert after["membership"]["term_ends_at"] == joined["member"]["membership"]["term_ends_at"]
    # Onto a plan the member may hold, it renews.
    shared_plan = await api.create_plan(term_months=1)
    renewed = await ok(api, member["id"], "renew", {"plan_id": shared_plan["id"]})
    assert renewed["member"]["membership"]["plan_id"] == shared_plan["id"]


async def test_only_admins_write_plans(
    api: ApiClient, http: httpx.AsyncClient, db: Database
) -> None:
    plan = await api.create_plan()
    manager = ApiClient(http, await issue_key(db, Role.MANAGER))
    assert (await manager.get(f"{PLANS}/{plan['id']}")).status_code == 200
    body = {"code": "X", "name": "X", "term_months": 1, "price_amount": 1, "currency": "MYR"}
    assert (await manager.post(PLANS, body)).status_code == 403
    assert (await manager.patch(f"{PLANS}/{plan['id']}", {"name": "Y"})).status_code == 403


async def test_a_key_bound_to_an_organisation_writes_only_plans_of_its_own_organisations(
    api: ApiClient, http: httpx.AsyncClient, db: Database
) -> None:
    north = await api.create_organisation()
    chapter = await api.create_organisation(parent_id=north["id"])
    south = await api.create_organisation()
    north_plan = await api.create_plan(organisation_id=north["id"])
    chapter_plan = await api.create_plan(organisation_id=chapter["id"])
    south_plan = await api.create_plan(organisation_id=south["id"])
    shared_plan = await api.create_plan()

    north_admin = ApiClient(http, await issue_key(db, Role.ADMIN, organisation=north["id"]))
    for plan in (north_plan, chapter_plan):
        response = await north_admin.patch(f"{PLANS}/{plan['id']}", {"active": False})
        assert response.status_code == 200, response.text
        assert response.json()["active"] is False

    # An installation-wide plan is readable by the bound key but not writable.
    response = await north_admin.patch(f"{PLANS}/{shared_plan['id']}", {"active": False})
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "FORBIDDEN"
    assert (await north_admin.get(f"{PLANS}/{shared_plan['id']}")).json() == shared_plan

    # Another organisation's plan stays invisible.
    response = await north_admin.patch(f"{PLANS}/{south_plan['id']}", {"active": False})
    assert response.status_code == 404
    assert (await api.get(f"{PLANS}/{south_plan['id']}")).json() == south_plan

    # A chapter's key sees only its chapter (and installation-wide plans), so the plans of the
    # organisation above it do not exist for it.
    chapter_admin = ApiClient(http, await issue_key(db, Role.ADMIN, organisation=chapter["id"]))
    response = await chapter_admin.patch(f"{PLANS}/{north_plan['id']}", {"name": "Mine"})
    assert response.status_code == 404
    assert (await api.get(f"{PLANS}/{north_plan['id']}")).json()["name"] == north_plan["name"]


async def test_an_unbound_key_writes_installation_wide_and_organisation_plans(
    api: ApiClient,
) -> None:
    org = await api.create_organisation()
    for plan in (await api.create_plan(), await api.create_plan(organisation_id=org["id"])):
        response = await api.patch(f"{PLANS}/{plan['id']}", {"name": "Renamed"})
        assert response.status_code == 200, response.text
        assert response.json()["name"] == "Renamed"


# ---------------------------------------------------------------- join


async def test_join_makes_a_pending_member_active_for_the_plans_term(api: ApiClient) -> None:
    plan = await api.create_plan(term_months=12, grace_days=30)
    member = await api.create_member()
    before = utcnow()
    result = await ok(api, member["id"], "join", {"plan_id": plan["id"], "note": "paid cash"})
    after = utcnow()

    term = result["term"]
    starts, ends = ts(term["starts_at"]), ts(term["ends_at"])
    assert before <= starts <= after
    assert ends == add_months(starts, 12)
    assert term["kind"] == "join"
    assert term["plan_id"] == plan["id"]
    assert term["ended_early_at"] is None

    state = result["member"]
    assert state["status"] == "active"
    assert state["membership"]["plan_id"] == plan["id"]
    assert ts(state["membership"]["member_since"]) == starts
    assert ts(state["membership"]["term_ends_at"]) == ends
    assert ts(state["membership"]["grace_ends_at"]) == ends + timedelta(days=30)
    assert await get_member(api, member["id"]) == state
    assert await terms(api, member["id"]) == [term]

    await assert_changes(api, member["id"], [("pending", "active", "join")])
    change = (await api.get(f"{MEMBERS}/{member['id']}/status-history")).json()["data"][0]
    assert change["note"] == "paid cash"
    assert change["actor"].startswith("key_")


async def test_the_status_event_carries_the_new_membership_dates(api: ApiClient) -> None:
    plan = await api.create_plan()
    member = await joined_member(api, plan)
    response = await api.get(
        "/api/v1/events", params={"type": "member.status.changed", "member_id": member["id"]}
    )
    data = response.json()["data"][0]["data"]
    assert data["member_id"] == member["id"]
    assert data["plan_id"] == plan["id"]
    assert ts(data["term_ends_at"]) == ts(member["membership"]["term_ends_at"])
    assert ts(data["grace_ends_at"]) == ts(member["membership"]["grace_ends_at"])


async def test_joining_a_retired_plan_is_409(api: ApiClient) -> None:
    plan = await api.create_plan()
    await api.patch(f"{PLANS}/{plan['id']}", {"active": False})
    member = await api.create_member()
    response = await do(api, member["id"], "join", {"plan_id": plan["id"]})
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "PLAN_INACTIVE"
    assert (await get_member(api, member["id"]))["status"] == "pending"
    assert await history(api, member["id"]) == []


async def test_joining_an_unknown_plan_is_404(api: ApiClient) -> None:
    member = await api.create_member()
    response = await do(api, member["id"], "join", {"plan_id": "pln_doesnotexist"})
    assert response.status_code == 404
    assert (await get_member(api, member["id"]))["status"] == "pending"


async def test_membership_operations_on_an_unknown_member_are_404(api: ApiClient) -> None:
    plan = await api.create_plan()
    response = await do(api, "mem_doesnotexist", "join", {"plan_id": plan["id"]})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "MEMBER_NOT_FOUND"


# ---------------------------------------------------------------- renew


async def test_renewal_inside_the_window_extends_from_the_previous_terms_end(
    api: ApiClient,
) -> None:
    plan = await api.create_plan(term_months=1, renewal_window_days=60, grace_days=10)
    member = await joined_member(api, plan)
    previous_end = ts(member["membership"]["term_ends_at"])

    result = await ok(api, member["id"], "renew", {"note": "early bird"})
    term = result["term"]
    assert term["kind"] == "renew"
    assert ts(term["starts_at"]) == previous_end  # not today
    # A month after the previous end, on the day of the month the member joined.
    ends = add_months(previous_end, 1, anchor_day=ts(member["membership"]["member_since"]).day)
    assert ts(term["ends_at"]) == ends
    state = result["member"]["membership"]
    assert result["member"]["status"] == "active"
    assert ts(state["term_ends_at"]) == ends
    assert ts(state["grace_ends_at"]) == ends + timedelta(days=10)
    assert ts(state["member_since"]) == ts(member["membership"]["member_since"])
    assert len(await terms(api, member["id"])) == 2
    await assert_changes(
        api, member["id"], [("pending", "active", "join"), ("active", "active", "renew")]
    )


@pytest.mark.parametrize(
    ("joined", "term_months", "ends"),
    [
        # Monthly from 31 January (a leap year): each end keeps the 31st where the month has it.
        ("2024-01-31", 1, ["2024-02-29", "2024-03-31", "2024-04-30", "2024-05-31"]),
        # Yearly from 29 February: 28 February in common years, the 29th again in leap ones.
        ("2024-02-29", 12, ["2025-02-28", "2026-02-28", "2027-02-28", "2028-02-29"]),
        ("2024-01-15", 1, ["2024-02-15", "2024-03-15", "2024-04-15", "2024-05-15"]),
    ],
)
async def test_back_to_back_renewals_keep_the_day_of_the_month_the_member_joined_on(
    api: ApiClient, monkeypatch: pytest.MonkeyPatch, joined: str, term_months: int, ends: list[str]
) -> None:
    plan = await api.create_plan(term_months=term_months, renewal_window_days=7)
    member = await api.create_member()
    clock = [datetime.fromisoformat(f"{joined}T09:30:00+00:00")]
    monkeypatch.setattr(membership_service, "utcnow", lambda: clock[0])
    joined_term = (await ok(api, member["id"], "join", {"plan_id": plan["id"]}))["term"]
    term_ends = [joined_term["ends_at"]]
    for _ in ends[1:]:
        clock[0] = ts(term_ends[-1]) - timedelta(days=2)  # inside the renewal window
        term_ends.append((await ok(api, member["id"], "renew", {}))["term"]["ends_at"])

    assert [ts(end) for end in term_ends] == [
        datetime.fromisoformat(f"{day}T09:30:00+00:00") for day in ends
    ]


@pytest.mark.parametrize(
    ("zone", "joined", "ends"),
    [
        # 1 March in Auckland is still 28 February in UTC: a month runs to 1 April there.
        (
            "Pacific/Auckland",
            "2025-03-01T10:00:00+13:00",
            ["2025-04-01T10:00:00+13:00", "2025-05-01T10:00:00+12:00"],
        ),
        # 30 January evening in Los Angeles is the 31st in UTC: to 28 February, then the
        # 30th again; the wall clock kept across the change to daylight saving time.
        (
            "America/Los_Angeles",
            "2025-01-30T17:00:00-08:00",
            ["2025-02-28T17:00:00-08:00", "2025-03-30T17:00:00-07:00"],
        ),
    ],
)
async def test_terms_count_calendar_months_of_the_programs_zone(
    api: ApiClient, monkeypatch: pytest.MonkeyPatch, zone: str, joined: str, ends: list[str]
) -> None:
    assert (await api.patch("/api/v1/program", {"timezone": zone})).status_code == 200
    plan = await api.create_plan(term_months=1, renewal_window_days=7)
    member = await api.create_member()
    clock = [datetime.fromisoformat(joined)]
    monkeypatch.setattr(membership_service, "utcnow", lambda: clock[0])
    term_ends = [(await ok(api, member["id"], "join", {"plan_id": plan["id"]}))["term"]["ends_at"]]
    clock[0] = ts(term_ends[-1]) - timedelta(days=2)
    term_ends.append((await ok(api, member["id"], "renew", {}))["term"]["ends_at"])
    assert [ts(end) for end in term_ends] == [datetime.fromisoformat(end) for end in ends]


async def test_renewal_before_the_window_opens_is_409_and_changes_nothing(
    api: ApiClient,
) -> None:
    plan = await api.create_plan(term_months=12, renewal_window_days=30)
    member = await joined_member(api, plan)
    term_end = ts(member["membership"]["term_ends_at"])

    response = await do(api, member["id"], "renew")
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "RENEWAL_WINDOW_NOT_OPEN"
    assert ts(error["details"]["opens_at"]) == term_end - timedelta(days=30)
    assert await get_member(api, member["id"]) == member
    assert len(await terms(api, member["id"])) == 1
    await assert_changes(api, member["id"], [("pending", "active", "join")])


async def test_renewal_in_grace_extends_from_the_previous_terms_end(
    api: ApiClient, set_term_dates: SetTermDates, run_job: RunJob
) -> None:
    plan = await api.create_plan(term_months=12, grace_days=30)
    member = await joined_member(api, plan)
    ended = utcnow() - timedelta(days=5)
    await set_term_dates(member["id"], ended, ended + timedelta(days=30))
    assert await run_job(utcnow()) == 1
    assert (await get_member(api, member["id"]))["status"] == "grace"

    result = await ok(api, member["id"], "renew")
    assert ts(result["term"]["starts_at"]) == ended  # five days ago, not today
    assert ts(result["term"]["ends_at"]) == add_months(ended, 12)
    assert result["member"]["status"] == "active"
    await assert_changes(
        api,
        member["id"],
        [
            ("pending", "active", "join"),
            ("active", "grace", "grace"),
            ("grace", "active", "renew"),
        ],
    )


async def test_renewal_in_a_grace_longer_than_the_term_starts_today(
    api: ApiClient, set_term_dates: SetTermDates, run_job: RunJob
) -> None:
    # A monthly plan with 60 days of grace; the term ended 40 days ago: a term back to back
    # with it would be over already.
    plan = await api.create_plan(term_months=1, grace_days=60)
    member = await joined_member(api, plan)
    ended = utcnow() - timedelta(days=40)
    await set_term_dates(member["id"], ended, ended + timedelta(days=60))
    assert await run_job(utcnow()) == 1
    before = utcnow()
    result = await ok(api, member["id"], "renew")
    assert result["member"]["status"] == "active"
    starts = ts(result["term"]["starts_at"])
    assert before <= starts <= utcnow()
    assert ts(result["term"]["ends_at"]) == add_months(starts, 1)
    # The member who just renewed stays active.
    assert await run_job(utcnow()) == 0
    assert (await get_member(api, member["id"]))["status"] == "active"


async def test_renewal_after_lapsing_starts_now(
    api: ApiClient, set_term_dates: SetTermDates, run_job: RunJob
) -> None:
    plan = await api.create_plan(term_months=12, grace_days=30)
    member = await joined_member(api, plan)
    ended = utcnow() - timedelta(days=60)
    await set_term_dates(member["id"], ended, ended + timedelta(days=30))
    assert await run_job(utcnow()) == 1
    assert (await get_member(api, member["id"]))["status"] == "lapsed"

    before = utcnow()
    result = await ok(api, member["id"], "renew")
    after = utcnow()
    starts = ts(result["term"]["starts_at"])
    assert before <= starts <= after
    assert ts(result["term"]["ends_at"]) == add_months(starts, 12)
    assert result["member"]["status"] == "active"
    await assert_changes(
        api,
        member["id"],
        [
            ("pending", "active", "join"),
            ("active", "lapsed", "lapse"),
            ("lapsed", "active", "renew"),
        ],
    )


async def test_renewal_onto_another_plan_uses_that_plans_term(api: ApiClient) -> None:
    monthly = await api.create_plan(term_months=1, renewal_window_days=60)
    yearly = await api.create_plan(term_months=12)
    member = await joined_member(api, monthly)
    previous_end = ts(member["membership"]["term_ends_at"])
    result = await ok(api, member["id"], "renew", {"plan_id": yearly["id"]})
    assert result["term"]["plan_id"] == yearly["id"]
    assert ts(result["term"]["ends_at"]) == add_months(previous_end, 12)
    assert result["member"]["membership"]["plan_id"] == yearly["id"]


async def test_renewal_onto_a_retired_current_plan_is_409(api: ApiClient) -> None:
    plan = await api.create_plan(term_months=1, renewal_window_days=60)
    member = await joined_member(api, plan)
    await api.patch(f"{PLANS}/{plan['id']}", {"active": False})
    response = await do(api, member["id"], "renew")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "PLAN_INACTIVE"


async def test_renewal_onto_another_plan_opens_in_the_current_plans_renewal_window(
    api: ApiClient,
) -> None:
    wide = await api.create_plan(term_months=12, renewal_window_days=365)
    narrow = await api.create_plan(term_months=12, renewal_window_days=0)

    member = await joined_member(api, wide)
    result = await ok(api, member["id"], "renew", {"plan_id": narrow["id"]})
    assert result["term"]["plan_id"] == narrow["id"]
    assert ts(result["term"]["starts_at"]) == ts(member["membership"]["term_ends_at"])

    other = await joined_member(api, narrow)
    term_end = ts(other["membership"]["term_ends_at"])
    response = await do(api, other["id"], "renew", {"plan_id": wide["id"]})
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "RENEWAL_WINDOW_NOT_OPEN"
    assert ts(error["details"]["opens_at"]) == term_end
    assert len(await terms(api, other["id"])) == 1


# ---------------------------------------------------------------- lapse, cancel


async def test_lapse_ends_the_term_early_and_leaves_no_grace(api: ApiClient) -> None:
    plan = await api.create_plan()
    member = await joined_member(api, plan)
    before = utcnow()
    result = await ok(api, member["id"], "lapse", {"note": "bounced"})
    assert result["member"]["status"] == "lapsed"
    assert result["member"]["membership"]["grace_ends_at"] is None
    ended_early = ts(result["term"]["ended_early_at"])
    assert before <= ended_early <= utcnow()
    await assert_changes(
        api, member["id"], [("pending", "active", "join"), ("active", "lapsed", "lapse")]
    )


async def test_cancel_now_cancels_and_ends_the_term_early(api: ApiClient) -> None:
    plan = await api.create_plan()
    member = await joined_member(api, plan)
    result = await ok(api, member["id"], "cancel", {"note": "moved abroad"})
    assert result["member"]["status"] == "cancelled"
    assert result["member"]["membership"]["cancel_at_period_end"] is False
    assert result["member"]["membership"]["grace_ends_at"] is None
    assert result["term"]["ended_early_at"] is not None
    await assert_changes(
        api, member["id"], [("pending", "active", "join"), ("active", "cancelled", "cancel")]
    )


async def test_cancel_at_period_end_keeps_the_member_active_until_the_job_cancels(
    api: ApiClient, run_job: RunJob
) -> None:
    plan = await api.create_plan(term_months=12, grace_days=30)
    member = await joined_member(api, plan)
    term_end = ts(member["membership"]["term_ends_at"])

    result = await ok(api, member["id"], "cancel", {"at_period_end": True})
    assert result["member"]["status"] == "active"
    assert result["member"]["membership"]["cancel_at_period_end"] is True
    assert result["term"]["ended_early_at"] is None
    await assert_changes(api, member["id"], [("pending", "active", "join")])
    # Consumers hear of it now, as a change of the member's membership.
    updated = await api.get("/api/v1/events", {"type": "member.updated"})
    (scheduled,) = [e for e in updated.json()["data"] if e["member_id"] == member["id"]]
    assert scheduled["data"]["changed_fields"] == ["membership.cancel_at_period_end"]
    assert scheduled["data"]["member"]["membership"]["cancel_at_period_end"] is True

    again = await do(api, member["id"], "cancel", {"at_period_end": True})
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "ALREADY_SCHEDULED"

    assert await run_job(term_end - SECOND) == 0
    assert (await get_member(api, member["id"]))["status"] == "active"
    assert await run_job(term_end) == 1
    cancelled = await get_member(api, member["id"])
    assert cancelled["status"] == "cancelled"  # no grace period when cancelled
    assert cancelled["membership"]["cancel_at_period_end"] is False
    assert await run_job(term_end + timedelta(days=365)) == 0
    await assert_changes(
        api, member["id"], [("pending", "active", "join"), ("active", "cancelled", "cancel")]
    )


async def test_cancel_at_period_end_in_grace_cancels_now(api: ApiClient, run_job: RunJob) -> None:
    plan = await api.create_plan(term_months=12, grace_days=30)
    member = await joined_member(api, plan)
    await run_job(ts(member["membership"]["term_ends_at"]))
    result = await ok(api, member["id"], "cancel", {"at_period_end": True})
    assert result["member"]["status"] == "cancelled"
    assert (await history(api, member["id"]))[-1] == ("grace", "cancelled", "cancel")


async def test_a_renewal_withdraws_a_scheduled_cancellation(
    api: ApiClient, run_job: RunJob
) -> None:
    plan = await api.create_plan(term_months=1, renewal_window_days=60, grace_days=10)
    member = await joined_member(api, plan)
    first_end = ts(member["membership"]["term_ends_at"])
    await ok(api, member["id"], "cancel", {"at_period_end": True})
    renewed = await ok(api, member["id"], "renew")
    assert renewed["member"]["membership"]["cancel_at_period_end"] is False
    assert await run_job(first_end) == 0
    assert (await get_member(api, member["id"]))["status"] == "active"


async def test_a_cancelled_member_can_join_again_from_now(api: ApiClient) -> None:
    plan = await api.create_plan(term_months=12)
    member = await joined_member(api, plan)
    await ok(api, member["id"], "cancel")
    before = utcnow()
    result = await ok(api, member["id"], "join", {"plan_id": plan["id"]})
    assert result["member"]["status"] == "active"
    assert before <= ts(result["term"]["starts_at"]) <= utcnow()
    # member_since keeps the date of the first join.
    assert result["member"]["membership"]["member_since"] == member["membership"]["member_since"]
    assert len(await terms(api, member["id"])) == 2


async def test_terms_are_listed_newest_first_page_by_page(api: ApiClient) -> None:
    plan = await api.create_plan(term_months=1, renewal_window_days=365)
    member = await joined_member(api, plan)
    for _ in range(2):
        await ok(api, member["id"], "renew")
    url = membership(member["id"], "terms")
    first = (await api.get(url, params={"limit": 2})).json()
    assert [t["kind"] for t in first["data"]] == ["renew", "renew"]
    assert first["data"][0]["starts_at"] == first["data"][1]["ends_at"]
    cursor = first["pagination"]["next_cursor"]
    rest = (await api.get(url, params={"limit": 2, "cursor": cursor})).json()
    assert [t["kind"] for t in rest["data"]] == ["join"]
    assert rest["data"][0]["ends_at"] == first["data"][1]["starts_at"]


# ---------------------------------------------------------------- after an early renewal


async def renewed_early(api: ApiClient) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A member whose running join term is followed by a prepaid renewal term."""
    plan = await api.create_plan(term_months=1, renewal_window_days=60, grace_days=10)
    member = await joined_member(api, plan)
    await ok(api, member["id"], "renew")
    prepaid, running = await terms(api, member["id"])  # newest first
    assert ts(prepaid["starts_at"]) == ts(running["ends_at"]) > utcnow()
    return member, running, prepaid


async def test_the_term_shown_is_the_running_one_not_a_prepaid_renewal(api: ApiClient) -> None:
    member, running, _ = await renewed_early(api)
    result = await ok(api, member["id"], "suspend")
    assert result["term"] == running


@pytest.mark.parametrize("operation", ["lapse", "cancel"])
async def test_lapse_and_cancel_end_the_running_term_and_void_prepaid_renewals(
    api: ApiClient, operation: str
) -> None:
    member, running, prepaid = await renewed_early(api)
    before = utcnow()
    result = await ok(api, member["id"], operation)
    after = utcnow()

    assert result["term"]["id"] == running["id"]
    voided, ended_running = await terms(api, member["id"])
    assert result["term"] == ended_running
    assert before <= ts(ended_running["ended_early_at"]) <= after
    assert voided["id"] == prepaid["id"]
    assert voided["ended_early_at"] == ended_running["ended_early_at"]
    assert ts(voided["ended_early_at"]) < ts(voided["starts_at"])  # it never started
    # The member's term ended then, not when the voided renewal would have.
    ended = result["member"]["membership"]["term_ends_at"]
    assert ts(ended) == ts(ended_running["ended_early_at"])
    response = await api.get(
        "/api/v1/events", params={"type": "member.status.changed", "member_id": member["id"]}
    )
    (event,) = [e["data"] for e in response.json()["data"] if e["data"]["reason"] == operation]
    assert ts(event["term_ends_at"]) == ts(ended)


async def test_upgrade_ends_the_running_term_and_voids_prepaid_renewals(api: ApiClient) -> None:
    member, running, prepaid = await renewed_early(api)
    premium = await api.create_plan(term_months=12)
    before = utcnow()
    result = await ok(api, member["id"], "upgrade", {"plan_id": premium["id"]})
    after = utcnow()

    upgraded, voided, ended_running = await terms(api, member["id"])
    assert (ended_running["id"], voided["id"]) == (running["id"], prepaid["id"])
    assert before <= ts(ended_running["ended_early_at"]) <= after
    assert voided["ended_early_at"] == ended_running["ended_early_at"]
    assert upgraded == result["term"]
    assert upgraded["ended_early_at"] is None
    assert ts(upgraded["starts_at"]) == ts(ended_running["ended_early_at"])
    assert ts(result["member"]["membership"]["term_ends_at"]) == ts(upgraded["ends_at"])


# ---------------------------------------------------------------- suspend, reinstate


async def test_suspend_and_reinstate_return_an_active_member_to_active(api: ApiClient) -> None:
    plan = await api.create_plan()
    member = await joined_member(api, plan)
    suspended = await ok(api, member["id"], "suspend", {"note": "dues query"})
    assert suspended["member"]["status"] == "suspended"
    assert suspended["member"]["membership"] == member["membership"]
    reinstated = await ok(api, member["id"], "reinstate")
    assert reinstated["member"]["status"] == "active"
    assert reinstated["member"]["membership"] == member["membership"]
    await assert_changes(
        api,
        member["id"],
        [
            ("pending", "active", "join"),
            ("active", "suspended", "suspend"),
            ("suspended", "active", "reinstate"),
        ],
    )


@pytest.mark.parametrize(
    ("ended_days_ago", "expected"),
    [(-10, "active"), (5, "grace"), (45, "lapsed")],
    ids=["term-running", "inside-grace", "grace-over"],
)
async def test_reinstate_returns_to_the_status_the_dates_give(
    api: ApiClient, set_term_dates: SetTermDates, ended_days_ago: int, expected: str
) -> None:
    plan = await api.create_plan(term_months=12, grace_days=30)
    member = await joined_member(api, plan)
    await ok(api, member["id"], "suspend")
    ended = utcnow() - timedelta(days=ended_days_ago)
    await set_term_dates(member["id"], ended, ended + timedelta(days=30))

    result = await ok(api, member["id"], "reinstate")
    assert result["member"]["status"] == expected
    assert (await history(api, member["id"]))[-1] == ("suspended", expected, "reinstate")


@pytest.mark.parametrize("ended_days_ago", [5, 45], ids=["inside-grace", "grace-over"])
async def test_reinstate_after_the_term_ended_honours_a_scheduled_cancellation(
    api: ApiClient, set_term_dates: SetTermDates, ended_days_ago: int
) -> None:
    plan = await api.create_plan(term_months=12, grace_days=30)
    member = await joined_member(api, plan)
    await ok(api, member["id"], "cancel", {"at_period_end": True})
    await ok(api, member["id"], "suspend")
    ended = utcnow() - timedelta(days=ended_days_ago)
    await set_term_dates(member["id"], ended, ended + timedelta(days=30))

    result = await ok(api, member["id"], "reinstate")
    assert result["member"]["status"] == "cancelled"
    assert result["member"]["membership"]["cancel_at_period_end"] is False
    assert result["member"]["membership"]["grace_ends_at"] is None
    assert (await history(api, member["id"]))[-1] == ("suspended", "cancelled", "reinstate")


async def test_reinstate_before_the_term_ends_keeps_the_scheduled_cancellation(
    api: ApiClient, run_job: RunJob
) -> None:
    plan = await api.create_plan(term_months=12, grace_days=30)
    member = await joined_member(api, plan)
    term_end = ts(member["membership"]["term_ends_at"])
    await ok(api, member["id"], "cancel", {"at_period_end": True})
    await ok(api, member["id"], "suspend")
    result = await ok(api, member["id"], "reinstate")
    assert result["member"]["status"] == "active"
    assert result["member"]["membership"]["cancel_at_period_end"] is True

    assert await run_job(term_end) == 1
    assert (await get_member(api, member["id"]))["status"] == "cancelled"
    assert (await history(api, member["id"]))[-1] == ("active", "cancelled", "cancel")


async def test_the_job_cancels_a_grace_member_with_a_scheduled_cancellation(
    api: ApiClient, db: Database, run_job: RunJob
) -> None:
    plan = await api.create_plan(term_months=1, grace_days=30)
    member = await joined_member(api, plan)
    term_end = ts(member["membership"]["term_ends_at"])
    assert await run_job(term_end) == 1
    async with db.transaction() as session:  # as left by an earlier release
        await session.execute(
            update(Member).where(Member.public_id == member["id"]).values(cancel_at_period_end=True)
        )

    assert await run_job(term_end + SECOND) == 1  # grace is not over yet
    cancelled = await get_member(api, member["id"])
    assert cancelled["status"] == "cancelled"
    assert cancelled["membership"]["cancel_at_period_end"] is False
    assert cancelled["membership"]["grace_ends_at"] is None
    assert (await history(api, member["id"]))[-1] == ("grace", "cancelled", "cancel")


async def test_suspend_and_reinstate_leave_status_before_suspension_unwritten(
    api: ApiClient, db: Database
) -> None:
    plan = await api.create_plan()
    member = await joined_member(api, plan)

    async def stored() -> str | None:
        async with db.transaction(read_only=True) as session:
            return await session.scalar(
                select(Member.status_before_suspension).where(Member.public_id == member["id"])
            )

    await ok(api, member["id"], "suspend")
    assert await stored() is None
    await ok(api, member["id"], "reinstate")
    assert await stored() is None


async def test_the_job_leaves_suspended_members_alone(api: ApiClient, run_job: RunJob) -> None:
    plan = await api.create_plan(term_months=12, grace_days=30)
    member = await joined_member(api, plan)
    await ok(api, member["id"], "suspend")
    assert await run_job(utcnow() + timedelta(days=800)) == 0
    assert (await get_member(api, member["id"]))["status"] == "suspended"


# ---------------------------------------------------------------- upgrade


async def test_upgrade_changes_the_plan_now_and_ends_the_old_term_early(api: ApiClient) -> None:
    standard = await api.create_plan(term_months=12, grace_days=30)
    premium = await api.create_plan(term_months=24, grace_days=60)
    member = await joined_member(api, standard)

    before = utcnow()
    result = await ok(api, member["id"], "upgrade", {"plan_id": premium["id"]})
    after = utcnow()
    new_term = result["term"]
    starts = ts(new_term["starts_at"])
    assert new_term["kind"] == "upgrade"
    assert new_term["plan_id"] == premium["id"]
    assert before <= starts <= after
    assert ts(new_term["ends_at"]) == add_months(starts, 24)
    state = result["member"]
    assert state["status"] == "active"
    assert state["membership"]["plan_id"] == premium["id"]
    assert ts(state["membership"]["grace_ends_at"]) == add_months(starts, 24) + timedelta(days=60)

    upgraded, old_term = await terms(api, member["id"])
    assert old_term["plan_id"] == standard["id"]
    assert before <= ts(old_term["ended_early_at"]) <= after
    assert upgraded == new_term
    await assert_changes(
        api, member["id"], [("pending", "active", "join"), ("active", "active", "upgrade")]
    )
    # The audit entry records the term end the member had, not the moment it was cut.
    audit = (await api.get("/api/v1/audit", {"action": "membership.upgrade"})).json()["data"]
    (entry,) = audit
    ended = entry["changes"]["term_ends_at"]
    assert ts(ended["before"]) == ts(member["membership"]["term_ends_at"])
    assert ts(ended["after"]) == add_months(starts, 24)


async def test_upgrade_to_the_current_plan_is_409(api: ApiClient) -> None:
    plan = await api.create_plan()
    member = await joined_member(api, plan)
    response = await do(api, member["id"], "upgrade", {"plan_id": plan["id"]})
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "SAME_PLAN"
    assert len(await terms(api, member["id"])) == 1


async def test_upgrade_from_grace_makes_the_member_active(api: ApiClient, run_job: RunJob) -> None:
    standard = await api.create_plan(term_months=1, grace_days=30)
    premium = await api.create_plan(term_months=12)
    member = await joined_member(api, standard)
    await run_job(ts(member["membership"]["term_ends_at"]))
    result = await ok(api, member["id"], "upgrade", {"plan_id": premium["id"]})
    assert result["member"]["status"] == "active"
    assert (await history(api, member["id"]))[-1] == ("grace", "active", "upgrade")


# ---------------------------------------------------------------- the transition matrix

# Which statuses each operation may start from; every other start is INVALID_TRANSITION.
ALLOWED_FROM: dict[str, tuple[str, ...]] = {
    "join": ("pending", "lapsed", "cancelled"),
    "renew": ("active", "grace", "lapsed"),
    "upgrade": ("active", "grace"),
    "lapse": ("active", "grace"),
    "cancel": ("pending", "active", "grace", "lapsed", "suspended"),
    "cancel_at_period_end": ("active", "grace"),
    "suspend": ("active", "grace"),
    "reinstate": ("suspended",),
}
STATUSES = ("pending", "active", "grace", "lapsed", "suspended", "cancelled")
RESULT_STATUS = {
    "join": "active",
    "renew": "active",
    "upgrade": "active",
    "lapse": "lapsed",
    "cancel": "cancelled",
    "suspend": "suspended",
    "reinstate": "active",
}


async def member_in_status(
    api: ApiClient, status: str, plan: dict[str, Any], run_job: RunJob
) -> dict[str, Any]:
    member = await api.create_member()
    if status == "pending":
        return member
    joined = await ok(api, member["id"], "join", {"plan_id": plan["id"]})
    if status == "grace":
        await run_job(ts(joined["member"]["membership"]["term_ends_at"]))
    elif status in ("lapsed", "suspended", "cancelled"):
        await ok(
            api, member["id"], {"lapsed": "lapse", "suspended": "suspend"}.get(status, "cancel")
        )
    current = await get_member(api, member["id"])
    assert current["status"] == status
    return current


def _request(operation: str, other_plan: dict[str, Any], plan: dict[str, Any]) -> tuple[str, Any]:
    if operation == "cancel_at_period_end":
        return "cancel", {"at_period_end": True}
    if operation == "join":
        return "join", {"plan_id": plan["id"]}
    if operation == "upgrade":
        return "upgrade", {"plan_id": other_plan["id"]}
    return operation, {}


INVALID = [
    (status, operation)
    for operation, allowed in ALLOWED_FROM.items()
    for status in STATUSES
    if status not in allowed
]
VALID = [(status, operation) for operation, allowed in ALLOWED_FROM.items() for status in allowed]


@pytest.mark.parametrize(("status", "operation"), INVALID, ids=[f"{s}-{o}" for s, o in INVALID])
async def test_an_operation_not_allowed_from_a_status_is_409_invalid_transition(
    api: ApiClient, run_job: RunJob, status: str, operation: str
) -> None:
    plan = await api.create_plan(term_months=1, renewal_window_days=60, grace_days=30)
    other_plan = await api.create_plan(term_months=12)
    member = await member_in_status(api, status, plan, run_job)
    changes_before = await history(api, member["id"])

    path, body = _request(operation, other_plan, plan)
    response = await do(api, member["id"], path, body)
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert error["code"] == "INVALID_TRANSITION"
    assert error["details"]["status"] == status
    assert await get_member(api, member["id"]) == member
    assert await history(api, member["id"]) == changes_before


@pytest.mark.parametrize(("status", "operation"), VALID, ids=[f"{s}-{o}" for s, o in VALID])
async def test_an_operation_allowed_from_a_status_succeeds_and_is_recorded(
    api: ApiClient, run_job: RunJob, status: str, operation: str
) -> None:
    plan = await api.create_plan(term_months=1, renewal_window_days=60, grace_days=30)
    other_plan = await api.create_plan(term_months=12)
    member = await member_in_status(api, status, plan, run_job)
    changes_before = await history(api, member["id"])

    path, body = _request(operation, other_plan, plan)
    result = await ok(api, member["id"], path, body)
    if operation == "cancel_at_period_end":
        expected = "active" if status == "active" else "cancelled"
    else:
        expected = RESULT_STATUS[operation]
    assert result["member"]["status"] == expected
    changes = await history(api, member["id"])
    if operation == "cancel_at_period_end" and status == "active":
        assert changes == changes_before  # only scheduled
    else:
        reason = "cancel" if operation == "cancel_at_period_end" else operation
        assert changes == [*changes_before, (status, expected, reason)]
        assert (await status_events(api, member["id"]))[-1] == (status, expected, reason)


# ---------------------------------------------------------------- the scheduled job


async def test_the_job_moves_active_to_grace_at_term_end_and_grace_to_lapsed_at_grace_end(
    api: ApiClient, run_job: RunJob
) -> None:
    plan = await api.create_plan(term_months=12, grace_days=30)
    member = await joined_member(api, plan)
    term_end = ts(member["membership"]["term_ends_at"])
    grace_end = ts(member["membership"]["grace_ends_at"])

    assert await run_job(term_end - SECOND) == 0
    assert (await get_member(api, member["id"]))["status"] == "active"
    assert await run_job(term_end) == 1
    assert (await get_member(api, member["id"]))["status"] == "grace"
    assert await run_job(grace_end - SECOND) == 0
    assert (await get_member(api, member["id"]))["status"] == "grace"
    assert await run_job(grace_end) == 1
    lapsed = await get_member(api, member["id"])
    assert lapsed["status"] == "lapsed"
    assert lapsed["membership"]["plan_id"] == plan["id"]

    await assert_changes(
        api,
        member["id"],
        [
            ("pending", "active", "join"),
            ("active", "grace", "grace"),
            ("grace", "lapsed", "lapse"),
        ],
    )
    scheduled = (await api.get(f"{MEMBERS}/{member['id']}/status-history")).json()["data"][1:]
    assert {c["actor"] for c in scheduled} == {"system:scheduler"}
    assert [ts(c["occurred_at"]) for c in scheduled] == [term_end, grace_end]


async def test_the_job_lapses_at_term_end_when_the_plan_has_no_grace_days(
    api: ApiClient, run_job: RunJob
) -> None:
    plan = await api.create_plan(term_months=1, grace_days=0)
    member = await joined_member(api, plan)
    assert await run_job(ts(member["membership"]["term_ends_at"])) == 1
    assert (await get_member(api, member["id"]))["status"] == "lapsed"
    assert (await history(api, member["id"]))[-1] == ("active", "lapsed", "lapse")


async def test_a_member_long_overdue_moves_straight_to_lapsed_in_one_step(
    api: ApiClient, run_job: RunJob
) -> None:
    plan = await api.create_plan(term_months=1, grace_days=30)
    member = await joined_member(api, plan)
    assert await run_job(utcnow() + timedelta(days=400)) == 1
    assert await history(api, member["id"]) == [
        ("pending", "active", "join"),
        ("active", "lapsed", "lapse"),
    ]


async def test_running_the_job_twice_moves_nothing_the_second_time(
    api: ApiClient, run_job: RunJob
) -> None:
    plan = await api.create_plan(term_months=1, grace_days=30)
    members = [await joined_member(api, plan) for _ in range(3)]
    now = max(ts(m["membership"]["term_ends_at"]) for m in members) + SECOND

    assert await run_job(now) == 3
    assert await run_job(now) == 0
    for member in members:
        assert (await get_member(api, member["id"]))["status"] == "grace"
        await assert_changes(
            api, member["id"], [("pending", "active", "join"), ("active", "grace", "grace")]
        )


async def test_the_job_ignores_deleted_members(api: ApiClient, run_job: RunJob) -> None:
    plan = await api.create_plan(term_months=1)
    member = await joined_member(api, plan)
    assert (await api.delete(f"{MEMBERS}/{member['id']}")).status_code == 204
    assert await run_job(utcnow() + timedelta(days=400)) == 0


async def _insert_due_members(db: Database, count: int) -> tuple[list[str], datetime]:
    """`count` active members whose term ended yesterday, straight into the table."""
    now = utcnow()
    async with db.transaction() as session:
        plan = MembershipPlan(
            public_id=new_public_id("pln"),
            code=new_public_id("P"),
            name="Bulk",
            term_months=12,
            price_amount=1,
            currency="MYR",
            grace_days=30,
        )
        session.add(plan)
        await session.flush()
        rows: list[dict[str, Any]] = [
            {
                "public_id": new_public_id("mem"),
                "email": f"due{i}@example.com",
                "email_normalized": f"due{i}@example.com",
                "status": "active",
                "plan_id": plan.id,
                "member_since": now - timedelta(days=366),
                "term_ends_at": now - timedelta(days=1),
                "grace_ends_at": now + timedelta(days=29),
                "custom_fields": {},
                "external_ids": {},
                "created_at": now,
                "updated_at": now,
            }
            for i in range(count)
        ]
        await session.execute(insert(Member), rows)
    return [r["public_id"] for r in rows], now


async def _grace_events_per_member(api: ApiClient, member_ids: list[str]) -> dict[str, int]:
    response = await api.get(
        "/api/v1/events", params={"type": "member.status.changed", "limit": 500}
    )
    counts = dict.fromkeys(member_ids, 0)
    for event in response.json()["data"]:
        assert event["data"]["to_status"] == "grace"
        counts[event["member_id"]] += 1
    return counts


async def test_concurrent_jobs_move_each_member_exactly_once(
    api: ApiClient, db: Database, is_postgres: bool
) -> None:
    if not is_postgres:
        pytest.skip("SQLite serialises writers; concurrent workers need PostgreSQL")
    member_ids, now = await _insert_due_members(db, 60)

    async def one_worker() -> int:
        async with db.transaction() as session:
            return await advance_membership_statuses(session, now)

    moved = await asyncio.gather(*(one_worker() for _ in range(4)))
    assert sum(moved) == 60
    assert await _grace_events_per_member(api, member_ids) == dict.fromkeys(member_ids, 1)
    async with db.transaction(read_only=True) as session:
        statuses = set(await session.scalars(select(Member.status)))
    assert statuses == {"grace"}


async def test_a_job_overlapping_an_open_one_skips_the_rows_it_holds(
    api: ApiClient, db: Database, is_postgres: bool
) -> None:
    if not is_postgres:
        pytest.skip("needs row locks (PostgreSQL)")
    member_ids, now = await _insert_due_members(db, 10)
    async with db.transaction() as first:
        assert await advance_membership_statuses(first, now) == 10
        # A second worker runs while the first has not committed yet.
        async with db.transaction() as second:
            assert await advance_membership_statuses(second, now) == 0
    async with db.transaction() as third:
        assert await advance_membership_statuses(third, now) == 0
    assert await _grace_events_per_member(api, member_ids) == dict.fromkeys(member_ids, 1)


# ---------------------------------------------------------------- the worker


async def test_a_worker_tick_runs_the_job_and_its_heartbeat_shows_in_health(
    api: ApiClient, http: httpx.AsyncClient, db: Database, set_term_dates: SetTermDates
) -> None:
    before = (await http.get("/health")).json()
    assert before["worker"]["heartbeat_age_seconds"] is None
    assert (before["status"], before["worker"]["status"]) == ("degraded", "never seen")

    plan = await api.create_plan(term_months=12, grace_days=30)
    member = await joined_member(api, plan)
    ended = utcnow() - timedelta(days=1)
    await set_term_dates(member["id"], ended, ended + timedelta(days=30))

    results = await Worker(db).tick(force=True)
    assert results["memberships.advance_statuses"] == 1
    assert (await get_member(api, member["id"]))["status"] == "grace"

    health = await http.get("/health")
    assert health.status_code == 200
    body = health.json()
    assert (body["status"], body["worker"]["status"]) == ("ok", "ok")
    assert 0 <= body["worker"]["heartbeat_age_seconds"] < 60


async def test_health_is_degraded_once_no_worker_has_beaten_for_a_while(
    http: httpx.AsyncClient, db: Database
) -> None:
    await Worker(db).tick(force=True)
    assert (await http.get("/health")).json()["status"] == "ok"
    async with db.transaction() as session:
        await session.execute(
            update(WorkerHeartbeat).values(last_seen_at=utcnow() - timedelta(minutes=5))
        )
    health = await http.get("/health")
    assert health.status_code == 200
    body = health.json()
    assert (body["status"], body["worker"]["status"]) == ("degraded", "stale")
    assert body["worker"]["heartbeat_age_seconds"] >= 300
