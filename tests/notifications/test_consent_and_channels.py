"""SMS consent, quiet hours, staff messages, suppression and deduplication."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import pytest
from sqlalchemy import func, select

from memberhub.integrations import providers
from memberhub.integrations.inbound import process_inbound
from memberhub.integrations.providers.base import (
    BaseConfig,
    Capability,
    DeliveryReport,
    InboundIdentity,
    InboundRequest,
)
from memberhub.integrations.signatures import SignatureInvalid
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.notifications.models import DeviceToken, Notification
from memberhub.notifications.planning import LinkSettings, plan_notifications
from memberhub.notifications.service import apply_delivery_reports
from memberhub.settings import Settings
from tests.fakes.smtp_server import SmtpServer
from tests.notifications.conftest import (
    RecordingSms,
    award,
    consenting_member,
    deliver,
    notifications,
    registered,
)
from tests.support import ApiClient

SETTINGS = "/api/v1/notification-settings"


async def test_a_member_without_sms_consent_gets_no_sms_and_the_log_says_no_consent(
    api: ApiClient, db: Database, app: Any, settings: Settings, sms: RecordingSms
) -> None:
    member = await api.create_member(phone="+60123456789", consent={"sms": False})
    await award(api, member["id"], 40, notify=True)

    await deliver(db, app, settings, utcnow().replace(hour=12))

    assert sms.sent == []
    (logged,) = await notifications(api, channel="sms", message_type="points_earned")
    assert logged["status"] == "suppressed"
    assert logged["reason"] == "no_consent"
    assert logged["recipient"] == "+60123456789"


async def test_an_sms_due_at_3am_local_time_is_sent_when_the_quiet_hours_end(
    api: ApiClient, db: Database, app: Any, settings: Settings, sms: RecordingSms
) -> None:
    program = await api.patch("/api/v1/program", {"timezone": "Asia/Kuala_Lumpur"})
    assert program.status_code == 200, program.text
    member = await api.create_member(phone="+60123456789", consent={"sms": True})
    await award(api, member["id"], 40, notify=True)
    # 03:00 in Kuala Lumpur (UTC+8) is 19:00 UTC the day before.
    three_am = datetime(2027, 3, 10, 19, 0, tzinfo=UTC)

    await deliver(db, app, settings, three_am)

    assert sms.sent == []
    (queued,) = await notifications(api, channel="sms", message_type="points_earned")
    assert queued["status"] == "queued"
    # The quiet hours (21:00 to 08:00 by default) end at 08:00 local: 00:00 UTC.
    assert queued["next_attempt_at"] == "2027-03-11T00:00:00Z"
    await deliver(db, app, settings, datetime(2027, 3, 10, 23, 59, tzinfo=UTC))
    assert sms.sent == []

    await deliver(db, app, settings, datetime(2027, 3, 11, 0, 0, tzinfo=UTC))

    (sent,) = [m for m in sms.sent if "earned" in m.text]
    assert sent.to == "+60123456789"
    assert sent.text == "You earned 40 points. Balance: 40."
    (logged,) = await notifications(api, channel="sms", message_type="points_earned")
    assert logged["status"] == "sent"
    assert logged["provider_message_id"].startswith("SM")


async def test_the_members_own_time_zone_decides_their_quiet_hours(
    api: ApiClient, db: Database, app: Any, settings: Settings, sms: RecordingSms
) -> None:
    member = await api.create_member(phone="+447700900123", consent={"sms": True})
    patched = await api.patch(
        f"/api/v1/members/{member['id']}/notification-preferences", {"timezone": "Europe/London"}
    )
    assert patched.status_code == 200, patched.text
    await award(api, member["id"], 5, notify=True)
    # 14:00 in London, whatever the program's zone (UTC by default) says.
    await deliver(db, app, settings, datetime(2027, 1, 15, 14, 0, tzinfo=UTC))
    assert any("earned" in m.text for m in sms.sent)


async def test_an_sms_provider_refusing_a_number_marks_it_failed_without_retrying(
    api: ApiClient, db: Database, app: Any, settings: Settings, sms: RecordingSms
) -> None:
    sms.refused.add("+60100000000")
    member = await api.create_member(phone="+60100000000", consent={"sms": True})
    noon = datetime(2027, 1, 15, 12, 0, tzinfo=UTC)
    await award(api, member["id"], 5, notify=True)
    await deliver(db, app, settings, noon)
    await deliver(db, app, settings, noon + timedelta(days=1))
    (logged,) = await notifications(api, channel="sms", message_type="points_earned")
    assert logged["status"] == "failed"
    assert logged["error"] == "21211: The 'To' number is not a valid phone number."
    assert logged["attempts"] == 1


async def test_a_large_redemption_alert_reaches_every_manager_by_email(
    api: ApiClient, db: Database, app: Any, settings: Settings, smtp: SmtpServer, mail: Any
) -> None:
    staff = [
        {"email": "maya@club.example", "name": "Maya", "roles": ["manager"]},
        {"email": "omar@club.example", "name": "Omar", "roles": ["manager", "admin"]},
        {"email": "sam@club.example", "name": "Sam", "roles": ["support_agent"]},
    ]
    assert (await api.patch(SETTINGS, {"staff": staff})).status_code == 200
    program = await api.patch(
        "/api/v1/program", {"alert_thresholds": {"large_redemption_points": 50}}
    )
    assert program.status_code == 200, program.text
    member = await api.create_member()  # no consent: only staff hear of this
    await award(api, member["id"], 500)
    redeemed = await api.post("/api/v1/points/redeem", {"member_id": member["id"], "points": 51})
    assert redeemed.status_code == 201, redeemed.text

    await deliver(db, app, settings)

    alerts = [m for m in smtp.received() if "LARGE_REDEMPTION" in str(m.message["Subject"])]
    assert sorted(r for m in alerts for r in m.recipients) == [
        "maya@club.example",
        "omar@club.example",
    ]
    assert {str(m.message["Subject"]) for m in alerts} == {"[low] LARGE_REDEMPTION"}
    text = alerts[0].part("plain")
    assert text is not None
    assert "51 points" in text
    logged = await notifications(api, message_type="staff_alert_raised")
    assert {(n["audience"], n["status"], n["member_id"]) for n in logged} == {
        ("staff", "sent", None)
    }


async def test_a_bounce_report_suppresses_the_address(
    api: ApiClient, db: Database, app: Any, settings: Settings, smtp: SmtpServer, mail: Any
) -> None:
    member = await consenting_member(api, email="Bouncy@Example.com")
    await deliver(db, app, settings)
    (welcome,) = await notifications(api)
    assert welcome["status"] == "sent"

    async with db.transaction() as session:
        integration_id = await _integration_row_id(session, mail["id"])
        done = await apply_delivery_reports(
            session,
            integration_id,
            [
                DeliveryReport(
                    status="bounced",
                    provider_message_id=welcome["provider_message_id"],
                    recipient="bouncy@example.com",
                    reason="550 mailbox unavailable",
                )
            ],
        )
    assert done == {"updated": 1, "suppressed": 1, "unmatched": 0}
    (bounced,) = await notifications(api)
    assert (bounced["status"], bounced["reason"]) == ("bounced", "550 mailbox unavailable")
    listed = (await api.get("/api/v1/notification-suppressions")).json()["data"]
    assert [(s["channel"], s["address"], s["reason"]) for s in listed] == [
        ("email", "bouncy@example.com", "bounced")
    ]

    await award(api, member["id"], 5, notify=True)
    await deliver(db, app, settings)
    logged = await notifications(api, message_type="points_earned")
    assert [(n["status"], n["reason"]) for n in logged] == [
        ("suppressed", "suppressed_address:bounced")
    ]
    assert len(smtp.received()) == 1


async def test_a_report_counts_only_from_the_integration_the_message_went_through(
    api: ApiClient, db: Database, app: Any, settings: Settings, smtp: SmtpServer, mail: Any
) -> None:
    await consenting_member(api)
    await deliver(db, app, settings)
    (welcome,) = await notifications(api)
    report = DeliveryReport(
        status="delivered", provider_message_id=None, recipient=None, reference=welcome["id"]
    )

    async with db.transaction() as session:
        integration_id = await _integration_row_id(session, mail["id"])
        elsewhere = await apply_delivery_reports(session, integration_id + 1, [report])
    assert elsewhere == {"updated": 0, "suppressed": 0, "unmatched": 1}
    assert (await notifications(api))[0]["status"] == "sent"
    async with db.transaction() as session:
        through_it = await apply_delivery_reports(session, integration_id, [report])
    assert through_it == {"updated": 1, "suppressed": 0, "unmatched": 0}
    assert (await notifications(api))[0]["status"] == "delivered"


async def test_the_dedup_window_sends_one_message_of_a_type_per_member(
    api: ApiClient, db: Database, app: Any, settings: Settings, smtp: SmtpServer, mail: Any
) -> None:
    assert (await api.patch(SETTINGS, {"dedup_windows": {"points_earned": 60}})).is_success
    member = await consenting_member(api)
    await award(api, member["id"], 5, notify=True)
    await award(api, member["id"], 6, notify=True)
    await deliver(db, app, settings)
    await award(api, member["id"], 7, notify=True)
    await deliver(db, app, settings)
    logged = await notifications(api, message_type="points_earned")
    assert sorted((n["status"], n["reason"]) for n in logged) == [
        ("sent", None),
        ("suppressed", "duplicate"),
        ("suppressed", "duplicate"),
    ]


async def test_a_disabled_message_type_makes_no_notifications(
    api: ApiClient, db: Database, app: Any, settings: Settings, smtp: SmtpServer, mail: Any
) -> None:
    patched = await api.patch(SETTINGS, {"disabled_message_types": ["member_welcome"]})
    assert patched.status_code == 200, patched.text
    await consenting_member(api)
    await deliver(db, app, settings)
    assert await notifications(api) == []


async def _integration_row_id(session: Any, public_id: str) -> int:
    from sqlalchemy import select

    from memberhub.integrations.models import Integration

    found = await session.scalar(select(Integration.id).where(Integration.public_id == public_id))
    assert found is not None
    return int(found)


async def test_erasing_a_member_erases_their_notifications_and_sends_nothing_queued(
    api: ApiClient, db: Database, app: Any, settings: Settings, smtp: SmtpServer, mail: Any
) -> None:
    member = await consenting_member(api, email="gone@example.com")
    device = {"token": "token-" + "x" * 30, "platform": "ios"}
    assert (await api.post(f"/api/v1/members/{member['id']}/devices", device)).status_code == 201
    links = LinkSettings(public_url=settings.public_url, secret=settings.resolved_secret_key)
    assert await plan_notifications(db, utcnow(), links) == 1  # the welcome, queued
    assert (await api.delete(f"/api/v1/members/{member['id']}")).status_code == 204

    await deliver(db, app, settings)

    assert smtp.received() == []
    (logged,) = await notifications(api)
    assert (logged["status"], logged["reason"]) == ("suppressed", "member_deleted")
    assert logged["recipient"] is None
    assert logged["subject"] is None
    async with db.transaction(read_only=True) as session:
        assert await session.scalar(select(func.count()).select_from(DeviceToken)) == 0
        keys = list(await session.scalars(select(Notification.recipient_key)))
    assert keys == [f"erased:{logged['id']}"], "not even the normalised address is kept"


class CallbackSms(RecordingSms):
    """The test SMS channel with status callbacks: a JSON list of {id, to, status}."""

    name = "test_sms_callbacks"
    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {Capability.MESSAGES, Capability.EVENTS_SOURCE}
    )

    def verify(
        self, request: InboundRequest, connection_secrets: Mapping[str, Any], config: BaseConfig
    ) -> None:
        if request.headers.get("x-test-token") != "let-me-in":
            raise SignatureInvalid("no_matching_signature", "bad token")

    def identify(self, request: InboundRequest) -> InboundIdentity:
        return InboundIdentity(
            event_id=hashlib.sha256(request.body).hexdigest(), event_type="status"
        )

    def delivery_reports(self, event_type: str, body: bytes) -> list[DeliveryReport]:
        return [
            DeliveryReport(
                status=item["status"], provider_message_id=item["id"], recipient=item["to"]
            )
            for item in json.loads(body)
        ]


async def test_delivery_callbacks_through_the_inbound_endpoint_update_the_log_and_suppress(
    api: ApiClient, db: Database, app: Any, settings: Settings
) -> None:
    provider = CallbackSms()
    providers.register(provider)
    try:
        created = await api.post(
            "/api/v1/integrations", {"provider": provider.name, "name": "SMS", "config": {}}
        )
        assert created.status_code == 201, created.text
        first = await api.create_member(phone="+60111111111", consent={"sms": True})
        second = await api.create_member(phone="+60122222222", consent={"sms": True})
        noon = datetime(2027, 1, 15, 12, 0, tzinfo=UTC)
        await award(api, first["id"], 5, notify=True)
        await award(api, second["id"], 5, notify=True)
        await deliver(db, app, settings, noon)
        sent = {n["recipient"]: n for n in await notifications(api, channel="sms")}
        callbacks = [
            {
                "id": sent["+60111111111"]["provider_message_id"],
                "to": "+60111111111",
                "status": "delivered",
            },
            {
                "id": sent["+60122222222"]["provider_message_id"],
                "to": "+60122222222",
                "status": "unsubscribed",
            },
        ]
        inbound = f"/api/v1/inbound/{created.json()['id']}"
        refused = await api.http.post(inbound, json=callbacks)
        assert refused.status_code == 400
        accepted = await api.http.post(
            inbound, json=callbacks, headers={"x-test-token": "let-me-in"}
        )
        assert accepted.status_code < 300, accepted.text
        assert await process_inbound(db, utcnow()) == 1

        statuses = {n["recipient"]: n["status"] for n in await notifications(api, channel="sms")}
        assert statuses == {"+60111111111": "delivered", "+60122222222": "sent"}
        listed = (await api.get("/api/v1/notification-suppressions")).json()["data"]
        assert [(s["channel"], s["address"], s["reason"]) for s in listed] == [
            ("sms", "+60122222222", "unsubscribed")
        ]
    finally:
        providers._PROVIDERS.pop(provider.name, None)


class RecordingPush(RecordingSms):
    name = "test_push"
    message_channels: ClassVar[frozenset[str]] = frozenset({"push"})


@pytest.fixture
async def push(api: ApiClient) -> AsyncIterator[RecordingPush]:
    async with registered(api, RecordingPush(), "Push") as provider:
        yield provider


async def test_push_goes_to_every_device_of_a_member_who_allowed_it(
    api: ApiClient, db: Database, app: Any, settings: Settings, push: RecordingPush
) -> None:
    allowed = await api.create_member()
    refused = await api.create_member()
    without_devices = await api.create_member()
    for member in (allowed, without_devices):
        preferences = f"/api/v1/members/{member['id']}/notification-preferences"
        assert (await api.patch(preferences, {"push": True})).status_code == 200
    for member, token in (
        (allowed, "phone-" + "a" * 20),
        (allowed, "tablet-" + "b" * 20),
        (refused, "phone-" + "c" * 20),
    ):
        device = {"token": token, "platform": "android"}
        assert (await api.post(f"/api/v1/members/{member['id']}/devices", device)).is_success
    noon = datetime(2027, 1, 15, 12, 0, tzinfo=UTC)
    for member in (allowed, refused, without_devices):
        await award(api, member["id"], 30, notify=True)

    await deliver(db, app, settings, noon)

    assert sorted(m.to for m in push.sent) == ["phone-" + "a" * 20, "tablet-" + "b" * 20]
    (sent, _) = push.sent
    assert sent.subject == "You earned 30 points"
    assert sent.data["message_type"] == "points_earned"
    logged = await notifications(api, channel="push")
    outcomes = sorted((n["member_id"], n["status"], n["reason"]) for n in logged)
    assert outcomes == sorted(
        [
            (allowed["id"], "sent", None),
            (allowed["id"], "sent", None),
            (refused["id"], "suppressed", "no_consent"),
            (without_devices["id"], "suppressed", "no_address"),
        ]
    )


@pytest.mark.parametrize("how", ["moved", "forgotten"])
async def test_a_waiting_push_goes_only_to_a_device_still_the_members(
    api: ApiClient, db: Database, app: Any, settings: Settings, push: RecordingPush, how: str
) -> None:
    """A push waits out the quiet hours; meanwhile its device is forgotten, or its token is
    registered by another member (the phone changed hands). It is not sent to it."""
    dan, frank = await api.create_member(), await api.create_member()
    phone, tablet = "phone-" + "d" * 20, "tablet-" + "e" * 20
    preferences = f"/api/v1/members/{dan['id']}/notification-preferences"
    assert (await api.patch(preferences, {"push": True, "timezone": "UTC"})).status_code == 200
    devices = f"/api/v1/members/{dan['id']}/devices"
    registered_phone = await api.post(devices, {"token": phone, "platform": "android"})
    assert registered_phone.status_code == 201, registered_phone.text
    assert (await api.post(devices, {"token": tablet, "platform": "ios"})).status_code == 201
    await award(api, dan["id"], 30, notify=True)
    night = datetime(2027, 1, 15, 23, 0, tzinfo=UTC)
    await deliver(db, app, settings, night)
    assert push.sent == []  # held until the quiet hours end
    if how == "moved":
        moved = await api.post(
            f"/api/v1/members/{frank['id']}/devices", {"token": phone, "platform": "android"}
        )
        assert moved.status_code == 201, moved.text
    else:
        forgotten = await api.delete(f"{devices}/{registered_phone.json()['id']}")
        assert forgotten.status_code == 204, forgotten.text

    await deliver(db, app, settings, night + timedelta(hours=10))

    assert [m.to for m in push.sent] == [tablet]
    logged = await notifications(api, channel="push")
    assert sorted((n["status"], n["reason"]) for n in logged) == [
        ("sent", None),
        ("suppressed", "no_address"),
    ]


async def test_push_deduplicates_per_member_and_honours_suppressed_tokens(
    api: ApiClient, db: Database, app: Any, settings: Settings, push: RecordingPush
) -> None:
    """Deduplication counts a member's messages per channel, not per device: each device
    gets the push. A token on the suppression list gets none, planned or at send time."""
    window = await api.patch("/api/v1/notification-settings", {"dedup_window_minutes": 60})
    assert window.status_code == 200, window.text
    member = await api.create_member()
    preferences = f"/api/v1/members/{member['id']}/notification-preferences"
    assert (await api.patch(preferences, {"push": True})).status_code == 200
    phone, tablet, old = ("phone-" + "a" * 20, "tablet-" + "b" * 20, "old-" + "c" * 20)
    for token in (phone, tablet, old):
        device = {"token": token, "platform": "android"}
        assert (await api.post(f"/api/v1/members/{member['id']}/devices", device)).is_success
    listed = await api.post(
        "/api/v1/notification-suppressions", {"channel": "push", "address": old}
    )
    assert listed.status_code == 201, listed.text
    noon = datetime(2027, 1, 15, 12, 0, tzinfo=UTC)
    await award(api, member["id"], 30, notify=True)
    await deliver(db, app, settings, noon)

    assert sorted(m.to for m in push.sent) == [phone, tablet]
    logged = await notifications(api, channel="push")
    outcomes = sorted((n["recipient"], n["status"], n["reason"]) for n in logged)
    assert outcomes == [
        (old, "suppressed", "suppressed_address:manual"),
        (phone, "sent", None),
        (tablet, "sent", None),
    ]
    # A second award within the window: one message per channel, every device spared.
    await award(api, member["id"], 5, notify=True)
    await deliver(db, app, settings, noon)
    assert len(push.sent) == 2


async def test_a_token_moves_to_the_member_registering_it_and_a_gone_one_is_forgotten(
    api: ApiClient, db: Database, app: Any, settings: Settings, push: RecordingPush
) -> None:
    dan, frank = await api.create_member(), await api.create_member()
    shared, uninstalled = "phone-" + "d" * 20, "old-" + "e" * 20

    def devices_of(member: dict[str, Any]) -> str:
        return f"/api/v1/members/{member['id']}/devices"

    for member, token in ((dan, shared), (frank, uninstalled)):
        device = {"token": token, "platform": "android"}
        assert (await api.post(devices_of(member), device)).status_code == 201
    # The phone changed hands: registered for Frank, it is Dan's no more.
    moved = await api.post(devices_of(frank), {"token": shared, "platform": "android"})
    assert moved.status_code == 201, moved.text
    assert (await api.get(devices_of(dan))).json() == []
    audit = (await api.get("/api/v1/audit", {"object_id": dan["id"]})).json()["data"]
    (move,) = [entry for entry in audit if entry["action"] == "device.moved"]
    assert move["changes"]["to_member_id"] == frank["id"]
    assert {d["token"] for d in (await api.get(devices_of(frank))).json()} == {
        shared,
        uninstalled,
    }

    preferences = f"/api/v1/members/{frank['id']}/notification-preferences"
    assert (await api.patch(preferences, {"push": True})).status_code == 200
    push.gone.add(uninstalled)
    await award(api, frank["id"], 30, notify=True)
    await deliver(db, app, settings, datetime(2027, 1, 15, 12, 0, tzinfo=UTC))
    assert [m.to for m in push.sent] == [shared]
    # The vendor said the app is gone: the token is forgotten, nothing goes to it again.
    assert [d["token"] for d in (await api.get(devices_of(frank))).json()] == [shared]
