"""What changes between planning a notification and sending it is honoured when it is sent:
consent withdrawn, marketing turned off, the address suppressed, the quiet hours begun."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.notifications.planning import LinkSettings, plan_notifications
from memberhub.notifications.sending import NotificationSender
from memberhub.points.jobs import notify_expiring_points
from memberhub.settings import Settings
from tests.fakes.smtp_server import SmtpServer
from tests.notifications.conftest import (
    RecordingSms,
    award,
    consenting_member,
    deliver,
    hub_of,
    notifications,
)
from tests.support import ApiClient


async def _plan(db: Database, settings: Settings, now: datetime | None = None) -> int:
    links = LinkSettings(public_url=settings.public_url, secret=settings.resolved_secret_key)
    return await plan_notifications(db, now or utcnow(), links)


async def test_an_address_suppressed_after_planning_is_not_sent_to(
    api: ApiClient, db: Database, app: Any, settings: Settings, smtp: SmtpServer, mail: Any
) -> None:
    await consenting_member(api, email="Late.Bounce@Example.com")
    assert await _plan(db, settings) == 1  # the welcome, queued
    added = await api.post(
        "/api/v1/notification-suppressions",
        {"channel": "email", "address": "late.bounce@example.com", "reason": "bounced"},
    )
    assert added.status_code == 201, added.text

    await deliver(db, app, settings)

    assert smtp.received() == []
    (logged,) = await notifications(api)
    assert (logged["status"], logged["reason"]) == ("suppressed", "suppressed_address:bounced")
    assert logged["next_attempt_at"] is None


async def test_consent_withdrawn_after_planning_stops_the_message(
    api: ApiClient, db: Database, app: Any, settings: Settings, smtp: SmtpServer, mail: Any
) -> None:
    member = await consenting_member(api)
    assert await _plan(db, settings) == 1
    patched = await api.patch(f"/api/v1/members/{member['id']}", {"consent": {"email": False}})
    assert patched.status_code == 200, patched.text

    await deliver(db, app, settings)

    assert smtp.received() == []
    (logged,) = await notifications(api)
    assert (logged["status"], logged["reason"]) == ("suppressed", "no_consent")


async def test_marketing_turned_off_after_planning_stops_marketing_but_not_the_rest(
    api: ApiClient, db: Database, app: Any, settings: Settings, smtp: SmtpServer, mail: Any
) -> None:
    now = utcnow()
    member = await consenting_member(api)
    await award(api, member["id"], 100, expires_at=(now + timedelta(days=10)).isoformat())
    await award(api, member["id"], 5, notify=True)
    async with db.transaction() as session:
        assert await notify_expiring_points(session, now) == 1
    # The welcome, the points earned (transactional) and the points expiring (marketing).
    assert await _plan(db, settings, now) == 3
    patched = await api.patch(
        f"/api/v1/members/{member['id']}/notification-preferences", {"marketing_email": False}
    )
    assert patched.status_code == 200, patched.text

    await deliver(db, app, settings, now)

    logged = {n["message_type"]: (n["status"], n["reason"]) for n in await notifications(api)}
    assert logged == {
        "member_welcome": ("sent", None),
        "points_earned": ("sent", None),
        "points_expiring": ("suppressed", "opted_out"),
    }
    assert not any("expire" in str(m.message["Subject"]) for m in smtp.received())
    assert len(smtp.received()) == 2


async def test_a_staff_address_suppressed_after_planning_gets_no_alert(
    api: ApiClient, db: Database, app: Any, settings: Settings, smtp: SmtpServer, mail: Any
) -> None:
    staff = [
        {"email": "maya@club.example", "name": "Maya", "roles": ["manager"]},
        {"email": "omar@club.example", "name": "Omar", "roles": ["manager"]},
    ]
    assert (await api.patch("/api/v1/notification-settings", {"staff": staff})).is_success
    program = await api.patch(
        "/api/v1/program", {"alert_thresholds": {"large_redemption_points": 50}}
    )
    assert program.status_code == 200, program.text
    member = await api.create_member()
    await award(api, member["id"], 500)
    redeemed = await api.post("/api/v1/points/redeem", {"member_id": member["id"], "points": 51})
    assert redeemed.status_code == 201, redeemed.text
    # The two alerts, and the member's welcome (suppressed: no consent).
    assert await _plan(db, settings) == 3
    added = await api.post(
        "/api/v1/notification-suppressions",
        {"channel": "email", "address": "Maya@Club.example", "reason": "spam_report"},
    )
    assert added.status_code == 201, added.text

    await deliver(db, app, settings)

    assert [r for m in smtp.received() for r in m.recipients] == ["omar@club.example"]
    logged = await notifications(api, message_type="staff_alert_raised")
    assert sorted((n["recipient"], n["status"], n["reason"]) for n in logged) == [
        ("maya@club.example", "suppressed", "suppressed_address:spam_report"),
        ("omar@club.example", "sent", None),
    ]


async def test_an_sms_falling_due_in_the_quiet_hours_waits_for_their_end(
    api: ApiClient, db: Database, app: Any, settings: Settings, sms: RecordingSms
) -> None:
    member = await api.create_member(phone="+60123456789", consent={"sms": True})
    await award(api, member["id"], 40, notify=True)
    noon = datetime(2027, 3, 10, 12, 0, tzinfo=UTC)
    assert await _plan(db, settings, noon) >= 1
    # Planned at noon, due at once; but the sender only gets to it at 03:00 (UTC, the
    # program's zone), inside the quiet hours (21:00 to 08:00 by default).
    sender = NotificationSender(db, hub_of(app))
    await sender.send_due(datetime(2027, 3, 11, 3, 0, tzinfo=UTC))

    assert sms.sent == []
    (waiting,) = await notifications(api, channel="sms", message_type="points_earned")
    assert waiting["status"] == "queued"
    assert waiting["next_attempt_at"] == "2027-03-11T08:00:00Z"
    assert waiting["attempts"] == 0

    await sender.send_due(datetime(2027, 3, 11, 8, 0, tzinfo=UTC))

    assert [m.text for m in sms.sent if "earned" in m.text] == [
        "You earned 40 points. Balance: 40."
    ]
    (sent,) = await notifications(api, channel="sms", message_type="points_earned")
    assert (sent["status"], sent["attempts"]) == ("sent", 1)
