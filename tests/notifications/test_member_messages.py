"""The member message types their events make: membership, renewal reminders, tiers,
rewards."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest

from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.memberships.jobs import advance_membership_statuses
from memberhub.notifications import jobs as notification_jobs
from memberhub.notifications.jobs import announce_renewals_due
from memberhub.settings import Settings
from tests.fakes.smtp_server import SmtpServer
from tests.notifications.conftest import award, consenting_member, deliver, notifications
from tests.support import ApiClient


def subjects(smtp: SmtpServer) -> list[str]:
    return sorted(str(m.message["Subject"]) for m in smtp.received())


async def test_joining_and_the_renewal_reminders_once_per_notice_period(
    api: ApiClient, db: Database, app: Any, settings: Settings, smtp: SmtpServer, mail: Any
) -> None:
    patched = await api.patch("/api/v1/notification-settings", {"renewal_due_days": [40, 7]})
    assert patched.json()["renewal_due_days"] == [7, 40]
    plan = await api.create_plan(term_months=1)
    member = await consenting_member(api)
    joined = await api.post(
        f"/api/v1/members/{member['id']}/membership/join", {"plan_id": plan["id"]}
    )
    assert joined.status_code == 200, joined.text
    now = utcnow()

    async with db.transaction() as session:
        assert await announce_renewals_due(session, now) == 1
    async with db.transaction() as session:
        assert await announce_renewals_due(session, now + timedelta(days=1)) == 0
    await deliver(db, app, settings, now)

    reminders = [m for m in smtp.received() if "ends in" in str(m.message["Subject"])]
    assert len(reminders) == 1
    assert "Renew now" in (reminders[0].part("plain") or "")
    assert reminders[0].message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert "Your membership is active" in subjects(smtp)

    # Within the seven-day period: a second, last reminder.
    fetched = await api.get(f"/api/v1/members/{member['id']}")
    term_ends_at = datetime.fromisoformat(fetched.json()["membership"]["term_ends_at"])
    five_days_before = term_ends_at - timedelta(days=5)
    async with db.transaction() as session:
        assert await announce_renewals_due(session, five_days_before) == 1
    async with db.transaction() as session:
        assert await announce_renewals_due(session, five_days_before + timedelta(days=1)) == 0
    await deliver(db, app, settings, five_days_before)
    reminders = [m for m in smtp.received() if "ends in" in str(m.message["Subject"])]
    assert len(reminders) == 2
    assert str(reminders[-1].message["Subject"]) == "Your membership ends in 5 days"
    events = await api.get("/api/v1/events", {"type": "membership.renewal_due"})
    assert events.status_code == 200
    assert [e["data"]["member_id"] for e in events.json()["data"]] == [member["id"]] * 2


async def test_every_member_due_is_announced_however_many_there_are(
    api: ApiClient, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(notification_jobs, "RENEWAL_BATCH", 2)  # pages of 2 for 5 members
    plan = await api.create_plan(term_months=1)
    for _ in range(5):
        member = await api.create_member()
        joined = await api.post(
            f"/api/v1/members/{member['id']}/membership/join", {"plan_id": plan["id"]}
        )
        assert joined.status_code == 200, joined.text
    soon = utcnow() + timedelta(days=20)  # within the default 30-day notice
    async with db.transaction() as session:
        assert await announce_renewals_due(session, soon) == 5
    async with db.transaction() as session:
        assert await announce_renewals_due(session, soon + timedelta(days=1)) == 0


async def test_a_tier_upgrade_and_a_reward_claim_are_told_to_the_member(
    api: ApiClient, db: Database, app: Any, settings: Settings, smtp: SmtpServer, mail: Any
) -> None:
    tier = {"code": "GOLD", "name": "Gold", "rank": 1, "threshold": 50}
    assert (await api.post("/api/v1/tiers", tier)).status_code == 201
    reward = await api.post("/api/v1/rewards", {"code": "MUG", "name": "Mug", "points_cost": 10})
    assert reward.status_code == 201, reward.text
    member = await consenting_member(api)
    await award(api, member["id"], 100)
    claimed = await api.post(
        f"/api/v1/rewards/{reward.json()['id']}/claim", {"member_id": member["id"]}
    )
    assert claimed.status_code == 201, claimed.text

    await deliver(db, app, settings)

    assert subjects(smtp) == [
        "Welcome to GOLD",
        "Welcome to Our loyalty program",
        "Your reward MUG",
    ]
    kinds = {n["message_type"] for n in await notifications(api, member_id=member["id"])}
    assert kinds == {"member_welcome", "tier_upgraded", "reward_claimed"}


async def test_an_approval_request_reaches_managers_and_admins_but_not_support_agents(
    api: ApiClient, db: Database, app: Any, settings: Settings, smtp: SmtpServer, mail: Any
) -> None:
    staff = [
        {"email": "maya@club.example", "roles": ["manager"]},
        {"email": "ada@club.example", "roles": ["admin"]},
        {"email": "sam@club.example", "roles": ["support_agent"]},
    ]
    assert (await api.patch("/api/v1/notification-settings", {"staff": staff})).is_success
    member = await api.create_member()
    await award(api, member["id"], 100)
    body = {"member_id": member["id"], "points": 5, "reason": "fix", "require_approval": True}
    assert (await api.post("/api/v1/points/deduct", body)).status_code == 202

    await deliver(db, app, settings)

    recipients = sorted(
        r
        for m in smtp.received()
        if "Approval requested" in str(m.message["Subject"])
        for r in m.recipients
    )
    assert recipients == ["ada@club.example", "maya@club.example"]
    text = next(m.part("plain") for m in smtp.received() if "ada@club.example" in m.recipients)
    assert text is not None
    assert f"asks to deduct 5 points of {member['id']}: fix" in text


async def test_a_term_that_ends_enters_grace_then_lapses_and_the_member_hears_both(
    api: ApiClient, db: Database, app: Any, settings: Settings, smtp: SmtpServer, mail: Any
) -> None:
    plan = await api.create_plan(term_months=1, grace_days=10)
    member = await consenting_member(api)
    joined = await api.post(
        f"/api/v1/members/{member['id']}/membership/join", {"plan_id": plan["id"]}
    )
    assert joined.status_code == 200, joined.text
    fetched = await api.get(f"/api/v1/members/{member['id']}")
    term_ends_at = datetime.fromisoformat(fetched.json()["membership"]["term_ends_at"])

    for moment in (term_ends_at + timedelta(hours=1), term_ends_at + timedelta(days=11)):
        async with db.transaction() as session:
            assert await advance_membership_statuses(session, moment) == 1
        await deliver(db, app, settings, moment)

    assert "Your membership needs attention" in subjects(smtp)
    assert "Your membership has lapsed" in subjects(smtp)
    kinds = [n["message_type"] for n in await notifications(api, member_id=member["id"])]
    assert kinds.count("membership_grace") == 1
    assert kinds.count("membership_lapsed") == 1
