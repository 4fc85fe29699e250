"""Alerts the ledger raises (negative balance, large redemption, points expiring), and the
alerts API: list with filters, read, acknowledge, organisation-bound visibility."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from memberhub.alerts.jobs import check_rates
from memberhub.auth.roles import Role
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.points.jobs import notify_expiring_points
from tests.alerts.conftest import (
    ALERTS,
    RunJob,
    alert_events,
    alerts,
    award,
    earn,
    redeem,
    reverse,
    set_program,
)
from tests.conftest import issue_key
from tests.support import ApiClient

# ---------------------------------------------------------------- raised by the ledger


async def test_a_reversal_that_takes_the_balance_below_zero_raises_a_negative_balance_alert(
    api: ApiClient,
) -> None:
    await set_program(api, negative_balance_policy="allow_for_reversals")
    member = await api.create_member()
    earned = await earn(api, member["id"], 20_000)  # 100 points at 1 point per 200
    await redeem(api, member["id"], 80)

    reversed_ = await reverse(api, member["id"], earned["transaction"]["id"])

    assert reversed_["balance"]["current_balance"] == -80
    (alert,) = await alerts(api, type="NEGATIVE_BALANCE")
    assert alert["member_id"] == member["id"]
    assert alert["priority"] == "high"
    assert alert["status"] == "open"
    assert alert["points"] == -80
    assert alert["data"] == {"transaction_id": reversed_["transaction"]["id"], "balance": -80}


async def test_a_reversal_the_balance_covers_raises_no_alert(api: ApiClient) -> None:
    await set_program(api, negative_balance_policy="allow_for_reversals")
    member = await api.create_member()
    earned = await earn(api, member["id"], 20_000)
    await award(api, member["id"], 500)
    await redeem(api, member["id"], 80)  # from the earn, the older batch

    reversed_ = await reverse(api, member["id"], earned["transaction"]["id"])

    # 20 unspent points are cancelled and the 80 spent ones taken from the balance.
    assert reversed_["balance"]["current_balance"] == 420
    assert await alerts(api) == []


async def test_a_redemption_above_the_threshold_raises_a_large_redemption_alert(
    api: ApiClient,
) -> None:
    await set_program(api, alert_thresholds={"large_redemption_points": 50})
    member = await api.create_member()
    await award(api, member["id"], 500)

    await redeem(api, member["id"], 50)
    assert await alerts(api) == []
    large = await redeem(api, member["id"], 51)

    (alert,) = await alerts(api)
    assert alert["type"] == "LARGE_REDEMPTION"
    assert alert["priority"] == "low"
    assert alert["member_id"] == member["id"]
    assert alert["points"] == 51
    assert alert["data"] == {"transaction_id": large["transaction"]["id"], "threshold": 50}


async def test_redemptions_up_to_the_default_threshold_of_10000_raise_nothing(
    api: ApiClient,
) -> None:
    member = await api.create_member()
    await award(api, member["id"], 20_001)

    await redeem(api, member["id"], 10_000)
    assert await alerts(api) == []
    await redeem(api, member["id"], 10_001)
    assert [a["points"] for a in await alerts(api, type="LARGE_REDEMPTION")] == [10_001]


async def test_points_expiring_within_the_alert_window_raise_one_alert_per_batch(
    api: ApiClient, run_job: RunJob
) -> None:
    now = utcnow()
    member = await api.create_member()
    expires_at = now + timedelta(days=10)
    awarded = await award(api, member["id"], 120, expires_at=expires_at)

    assert await run_job(notify_expiring_points, now + timedelta(days=1)) == 1
    assert await run_job(notify_expiring_points, now + timedelta(days=2)) == 0

    (alert,) = await alerts(api)
    assert alert["type"] == "POINTS_EXPIRING"
    assert alert["priority"] == "medium"
    assert alert["member_id"] == member["id"]
    assert alert["points"] == 120
    assert alert["message"] == f"120 points of {member['id']} expire in 9 days."
    assert alert["data"]["batch_id"] == awarded["transaction"]["batch_id"]


async def test_a_batch_noticed_before_the_alert_window_raises_its_alert_on_entering_it(
    api: ApiClient, run_job: RunJob
) -> None:
    """Notices go 30 days ahead (the default), alerts are for batches expiring within 7:
    the batch is noticed 20 days out, and its alert comes once it is 7 days out."""
    await set_program(api, alert_thresholds={"points_expiring_days": 7})
    now = utcnow()
    member = await api.create_member()
    awarded = await award(api, member["id"], 500, expires_at=now + timedelta(days=20))

    assert await run_job(notify_expiring_points, now) == 1
    assert await alerts(api) == []
    await run_job(notify_expiring_points, now + timedelta(days=12, hours=23))
    assert await alerts(api) == []
    for hours in range(13 * 24 + 1, 13 * 24 + 4):
        assert await run_job(notify_expiring_points, now + timedelta(hours=hours)) == 0
    found = await alerts(api, type="POINTS_EXPIRING")
    assert [a["data"]["batch_id"] for a in found] == [awarded["transaction"]["batch_id"]]


async def test_points_expiring_below_the_minimum_or_beyond_the_alert_days_raise_nothing(
    api: ApiClient, run_job: RunJob
) -> None:
    await set_program(
        api, alert_thresholds={"points_expiring_days": 7, "points_expiring_min_points": 100}
    )
    now = utcnow()
    member = await api.create_member()
    await award(api, member["id"], 99, expires_at=now + timedelta(days=5))  # too few
    await award(api, member["id"], 100, expires_at=now + timedelta(days=10))  # too far off
    alerted = await award(api, member["id"], 100, expires_at=now + timedelta(days=6))

    # Each batch inside the notice period gets its points.expiring notice...
    assert await run_job(notify_expiring_points, now) == 3

    # ...but only the one at or over both thresholds an alert.
    (alert,) = await alerts(api)
    assert alert["data"]["batch_id"] == alerted["transaction"]["batch_id"]


async def test_every_alert_writes_an_alert_raised_event(api: ApiClient) -> None:
    await set_program(api, alert_thresholds={"large_redemption_points": 10})
    member = await api.create_member()
    await award(api, member["id"], 100)
    await redeem(api, member["id"], 11)

    (alert,) = await alerts(api)
    (event,) = await alert_events(api)
    assert event == {
        "alert_id": alert["id"],
        "alert_type": "LARGE_REDEMPTION",
        "priority": "low",
        "member_id": member["id"],
        "message": alert["message"],
        "data": alert["data"],
        "occurred_at": event["occurred_at"],
    }


# ---------------------------------------------------------------- the API


async def _three_alerts(api: ApiClient) -> tuple[dict[str, Any], dict[str, Any]]:
    """A large redemption of one member, then a negative balance of another."""
    await set_program(
        api,
        negative_balance_policy="allow_for_reversals",
        alert_thresholds={"large_redemption_points": 50},
    )
    first = await api.create_member()
    second = await api.create_member()
    await award(api, first["id"], 100)
    await redeem(api, first["id"], 60)
    earned = await earn(api, second["id"], 20_000)
    await redeem(api, second["id"], 100)  # a large redemption too
    await reverse(api, second["id"], earned["transaction"]["id"])
    return first, second


async def test_alerts_are_listed_newest_first_and_filtered(api: ApiClient) -> None:
    first, second = await _three_alerts(api)

    everything = await alerts(api)
    assert [(a["type"], a["member_id"]) for a in everything] == [
        ("NEGATIVE_BALANCE", second["id"]),
        ("LARGE_REDEMPTION", second["id"]),
        ("LARGE_REDEMPTION", first["id"]),
    ]
    assert [a["member_id"] for a in await alerts(api, type="LARGE_REDEMPTION")] == [
        second["id"],
        first["id"],
    ]
    assert [a["type"] for a in await alerts(api, priority="high")] == ["NEGATIVE_BALANCE"]
    assert [a["type"] for a in await alerts(api, member_id=first["id"])] == ["LARGE_REDEMPTION"]
    acknowledged = await api.post(f"{ALERTS}/{everything[1]['id']}/acknowledge", {})
    assert acknowledged.status_code == 200, acknowledged.text
    assert [a["id"] for a in await alerts(api, status="acknowledged")] == [everything[1]["id"]]
    assert [a["id"] for a in await alerts(api, status="open")] == [
        everything[0]["id"],
        everything[2]["id"],
    ]


async def test_alert_pages_follow_the_cursor_without_repeats(api: ApiClient) -> None:
    await _three_alerts(api)
    everything = [a["id"] for a in await alerts(api)]

    first_page = await api.get(ALERTS, {"limit": 2})
    assert first_page.status_code == 200, first_page.text
    body = first_page.json()
    assert body["pagination"]["has_more"] is True
    second_page = await api.get(ALERTS, {"limit": 2, "cursor": body["pagination"]["next_cursor"]})
    assert second_page.status_code == 200, second_page.text
    assert second_page.json()["pagination"] == {"next_cursor": None, "has_more": False}
    paged = [a["id"] for a in body["data"] + second_page.json()["data"]]
    assert paged == everything


async def test_an_alert_is_read_by_its_id(api: ApiClient) -> None:
    first, _second = await _three_alerts(api)
    (listed,) = await alerts(api, member_id=first["id"])

    response = await api.get(f"{ALERTS}/{listed['id']}")

    assert response.status_code == 200, response.text
    assert response.json() == listed


async def test_acknowledging_records_who_when_and_the_note_and_is_audited(
    api: ApiClient,
) -> None:
    first, _second = await _three_alerts(api)
    (alert,) = await alerts(api, member_id=first["id"])

    response = await api.post(f"{ALERTS}/{alert['id']}/acknowledge", {"note": "Called them"})

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "acknowledged"
    assert body["note"] == "Called them"
    assert body["acknowledged_by"].startswith("key_")
    assert body["acknowledged_at"] is not None
    assert (await api.get(f"{ALERTS}/{alert['id']}")).json() == body
    audit = await api.get("/api/v1/audit", {"action": "alert.acknowledge"})
    assert audit.status_code == 200, audit.text
    (entry,) = audit.json()["data"]
    assert entry["object_id"] == alert["id"]
    assert entry["changes"] == {
        "status": {"before": "open", "after": "acknowledged"},
        "note": "Called them",
    }


async def test_acknowledging_needs_no_body(api: ApiClient) -> None:
    first, _second = await _three_alerts(api)
    (alert,) = await alerts(api, member_id=first["id"])

    response = await api.http.post(
        f"{ALERTS}/{alert['id']}/acknowledge", headers={"Authorization": f"Bearer {api.key}"}
    )

    assert response.status_code == 200, response.text
    assert response.json()["status"] == "acknowledged"
    assert response.json()["note"] is None


async def test_acknowledging_twice_is_a_conflict_that_changes_nothing(api: ApiClient) -> None:
    first, _second = await _three_alerts(api)
    (alert,) = await alerts(api, member_id=first["id"])
    once = await api.post(f"{ALERTS}/{alert['id']}/acknowledge", {"note": "first"})
    assert once.status_code == 200, once.text

    twice = await api.post(f"{ALERTS}/{alert['id']}/acknowledge", {"note": "second"})

    assert twice.status_code == 409, twice.text
    error = twice.json()["error"]
    assert error["code"] == "ALERT_ALREADY_ACKNOWLEDGED"
    assert error["details"]["acknowledged_by"] == once.json()["acknowledged_by"]
    assert (await api.get(f"{ALERTS}/{alert['id']}")).json()["note"] == "first"


async def test_unknown_alerts_and_bad_filters_are_refused(api: ApiClient) -> None:
    missing = await api.get(f"{ALERTS}/alr_doesnotexist")
    assert missing.status_code == 404, missing.text
    assert missing.json()["error"]["code"] == "ALERT_NOT_FOUND"
    acknowledge_missing = await api.post(f"{ALERTS}/alr_doesnotexist/acknowledge", {})
    assert acknowledge_missing.status_code == 404, acknowledge_missing.text
    unknown_member = await api.get(ALERTS, {"member_id": "mem_doesnotexist"})
    assert unknown_member.status_code == 404, unknown_member.text
    assert unknown_member.json()["error"]["code"] == "MEMBER_NOT_FOUND"
    for bad in (
        {"type": "SOMETHING"},
        {"status": "closed"},
        {"priority": "urgent"},
        {"member_id": "not an id"},
        {"limit": 0},
        {"cursor": "!!"},
    ):
        response = await api.get(ALERTS, bad)
        assert response.status_code == 422, (bad, response.text)
    too_long = await api.post(f"{ALERTS}/alr_doesnotexist/acknowledge", {"note": "x" * 1001})
    assert too_long.status_code == 422, too_long.text
    extra = await api.post(f"{ALERTS}/alr_doesnotexist/acknowledge", {"notes": "typo"})
    assert extra.status_code == 422, extra.text


async def test_a_support_agent_reads_alerts_but_cannot_acknowledge_them(
    api: ApiClient, db: Database
) -> None:
    first, _second = await _three_alerts(api)
    (alert,) = await alerts(api, member_id=first["id"])
    agent = api.with_key(await issue_key(db, Role.SUPPORT_AGENT))

    assert len(await alerts(agent)) == 3
    refused = await agent.post(f"{ALERTS}/{alert['id']}/acknowledge", {})

    assert refused.status_code == 403, refused.text
    assert (await api.get(f"{ALERTS}/{alert['id']}")).json()["status"] == "open"


async def test_organisation_bound_keys_see_only_their_members_alerts_and_no_system_alerts(
    api: ApiClient, db: Database, run_job: RunJob
) -> None:
    await set_program(api, alert_thresholds={"large_redemption_points": 10})
    head_office = await api.create_organisation()
    chapter = await api.create_organisation(parent_id=head_office["id"])
    elsewhere = await api.create_organisation()
    ours = await api.create_member(organisation_id=chapter["id"])
    theirs = await api.create_member(organisation_id=elsewhere["id"])
    unassigned = await api.create_member()
    for member in (ours, theirs, unassigned):
        await award(api, member["id"], 1000)
        await redeem(api, member["id"], 11)
    # 33 of 3000 points redeemed: 1.1%, below the 5% threshold.
    assert await run_job(check_rates, utcnow() + timedelta(minutes=1)) == 1
    everything = await alerts(api)
    assert len(everything) == 4
    system = next(a for a in everything if a["member_id"] is None)
    their_alert = next(a for a in everything if a["member_id"] == theirs["id"])
    manager = api.with_key(await issue_key(db, Role.MANAGER, organisation=head_office["id"]))

    visible = await alerts(manager)

    assert [a["member_id"] for a in visible] == [ours["id"]]
    for hidden in (system, their_alert):
        read = await manager.get(f"{ALERTS}/{hidden['id']}")
        assert read.status_code == 404, read.text
        acknowledged = await manager.post(f"{ALERTS}/{hidden['id']}/acknowledge", {})
        assert acknowledged.status_code == 404, acknowledged.text
    filtered = await manager.get(ALERTS, {"member_id": theirs["id"]})
    assert filtered.status_code == 404, filtered.text
    mine = await manager.post(f"{ALERTS}/{visible[0]['id']}/acknowledge", {})
    assert mine.status_code == 200, mine.text
