"""The notification API: templates (checked at save time), preview, settings, preferences,
devices and suppressions; bad input is refused and changes nothing."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from memberhub.auth.roles import Role
from memberhub.kit.db import Database
from memberhub.notifications.catalog import MESSAGE_TYPES
from memberhub.notifications.models import NotificationTemplate
from memberhub.notifications.template_service import choose_template
from memberhub.settings import Settings
from tests.conftest import issue_key
from tests.fakes.smtp_server import SmtpServer
from tests.notifications.conftest import award, consenting_member, deliver, notifications
from tests.support import ApiClient

TEMPLATES = "/api/v1/notification-templates"


def _template(**fields: Any) -> dict[str, Any]:
    return {
        "message_type": "points_earned",
        "channel": "email",
        "locale": "ms",
        "subject": "Mata ganjaran: {{ event.points }}",
        "body": "Hai {{ member.first_name }},\nanda mendapat {{ event.points }} mata.",
        **fields,
    }


async def _stored_templates(api: ApiClient) -> list[dict[str, Any]]:
    response = await api.get(TEMPLATES, {"include_defaults": "false"})
    assert response.status_code == 200, response.text
    return list(response.json())


@pytest.mark.parametrize(
    ("body", "line", "reason"),
    [
        ("Hello\n{{ member.__class__.__mro__ }}", 2, "not allowed"),
        ("Hello\n\n{{ event.points.__class__ }}", 3, "not allowed"),
        ("Hello\n{% for x in %}", 2, "Expected an expression"),
        ("Hello {{ member.nickname }}", 1, "has no attribute 'nickname'"),
        ("One\nTwo\n{{ event.points / 0 }}", 3, "ZeroDivisionError"),
    ],
)
async def test_a_template_that_fails_to_render_is_refused_with_the_line_and_reason(
    api: ApiClient, body: str, line: int, reason: str
) -> None:
    response = await api.post(TEMPLATES, _template(body=body))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "INVALID_TEMPLATE"
    assert error["details"]["part"] == "body"
    assert error["details"]["line"] == line
    assert reason in error["details"]["reason"]
    assert await _stored_templates(api) == []


async def test_a_bad_subject_is_refused_and_an_email_template_needs_one(api: ApiClient) -> None:
    bad = await api.post(TEMPLATES, _template(subject="{{ program.__init__ }}"))
    assert bad.status_code == 422
    assert bad.json()["error"]["details"]["part"] == "subject"
    missing = await api.post(TEMPLATES, _template(subject=None))
    assert missing.status_code == 422
    assert missing.json()["error"]["details"] == {"field": "subject"}
    html_sms = await api.post(TEMPLATES, _template(channel="sms", format="html"))
    assert html_sms.status_code == 422
    # Staff get email only: a template for another channel would never be sent.
    staff_sms = await api.post(
        TEMPLATES,
        _template(message_type="staff_alert_raised", channel="sms", subject=None, body="Alert"),
    )
    assert staff_sms.status_code == 422, staff_sms.text
    assert staff_sms.json()["error"]["details"] == {"field": "channel"}
    assert await _stored_templates(api) == []


@pytest.mark.parametrize(
    "changes",
    [
        {"message_type": "no_such_type"},
        {"channel": "fax"},
        {"locale": "English"},
        {"body": ""},
        {"body": "x\x00"},
        {"format": "markdown"},
        {"enabled": "yes"},
        {"unknown": 1},
    ],
)
async def test_bad_template_input_is_refused(api: ApiClient, changes: dict[str, Any]) -> None:
    response = await api.post(TEMPLATES, _template(**changes))
    assert response.status_code == 422, response.text
    assert await _stored_templates(api) == []


async def test_templates_are_created_changed_listed_and_removed(api: ApiClient) -> None:
    created = await api.post(TEMPLATES, _template())
    assert created.status_code == 201, created.text
    template = created.json()
    assert template["default"] is False
    again = await api.post(TEMPLATES, _template())
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "TEMPLATE_EXISTS"

    changed = await api.patch(f"{TEMPLATES}/{template['id']}", {"body": "{{ event.points }} mata"})
    assert changed.status_code == 200, changed.text
    refused = await api.patch(f"{TEMPLATES}/{template['id']}", {"body": "{{ nope }}"})
    assert refused.status_code == 422
    fetched = await api.get(f"{TEMPLATES}/{template['id']}")
    assert fetched.json()["body"] == "{{ event.points }} mata"

    listed = await api.get(TEMPLATES, {"message_type": "points_earned", "channel": "email"})
    assert [(t["locale"], t["default"]) for t in listed.json()] == [("ms", False), (None, True)]

    assert (await api.delete(f"{TEMPLATES}/{template['id']}")).status_code == 204
    assert (await api.get(f"{TEMPLATES}/{template['id']}")).status_code == 404
    assert (await api.delete(f"{TEMPLATES}/{template['id']}")).status_code == 404


async def test_every_message_type_is_documented_with_its_variables(api: ApiClient) -> None:
    response = await api.get("/api/v1/notification-message-types")
    assert response.status_code == 200
    types = {t["name"]: t for t in response.json()}
    assert {
        "member_welcome",
        "membership_joined",
        "membership_renewed",
        "membership_renewal_due",
        "membership_grace",
        "membership_lapsed",
        "points_earned",
        "points_expiring",
        "points_expired",
        "tier_upgraded",
        "tier_downgraded",
        "reward_claimed",
        "staff_alert_raised",
        "staff_approval_requested",
        "staff_integration_incident",
        "staff_webhook_disabled",
    } == set(types)
    assert "event.expires_at" in types["points_expiring"]["variables"]
    assert "unsubscribe_url" in types["points_expiring"]["variables"]
    assert types["membership_renewal_due"]["event_type"] == "membership.renewal_due"
    assert types["staff_alert_raised"]["staff_roles"] == ["manager", "admin"]


async def test_a_preview_renders_for_a_chosen_member_in_their_locale_with_fallback(
    api: ApiClient,
) -> None:
    assert (await api.post(TEMPLATES, _template())).status_code == 201
    member = await api.create_member(first_name="Siti")
    preferences = f"/api/v1/members/{member['id']}/notification-preferences"
    assert (await api.patch(preferences, {"locale": "ms"})).status_code == 200

    malay = await api.post(
        f"{TEMPLATES}/preview",
        {
            "message_type": "points_earned",
            "channel": "email",
            "locale": "ms",
            "member_id": member["id"],
            "event": {"points": 75},
        },
    )
    assert malay.status_code == 200, malay.text
    assert malay.json() == {
        "subject": "Mata ganjaran: 75",
        "text": "Hai Siti,\nanda mendapat 75 mata.",
        "html": None,
    }
    # No French template: the default locale's (en) has none either, so the default.
    french = await api.post(
        f"{TEMPLATES}/preview",
        {
            "message_type": "points_earned",
            "channel": "email",
            "locale": "fr",
            "member_id": member["id"],
        },
    )
    assert french.status_code == 200
    assert french.json()["subject"] == "You earned 120 points"
    assert french.json()["text"].startswith("Hello Siti,")
    # A regional locale falls back to its language, and tags compare case aside.
    for regional in ("ms-MY", "ms-my"):
        preview = {"message_type": "points_earned", "channel": "email", "locale": regional}
        shown = await api.post(f"{TEMPLATES}/preview", {**preview, "event": {"points": 5}})
        assert shown.status_code == 200, shown.text
        assert shown.json()["subject"] == "Mata ganjaran: 5", regional
    # A disabled template would send nothing: the preview says so rather than show it.
    listed = (await api.get(TEMPLATES, {"include_defaults": "false"})).json()
    (malay_template,) = [t for t in listed if t["locale"] == "ms"]
    assert (await api.patch(f"{TEMPLATES}/{malay_template['id']}", {"enabled": False})).is_success
    off = await api.post(
        f"{TEMPLATES}/preview",
        {"message_type": "points_earned", "channel": "email", "locale": "ms"},
    )
    assert off.status_code == 409, off.text
    assert off.json()["error"]["code"] == "TEMPLATE_DISABLED"

    draft = await api.post(
        f"{TEMPLATES}/preview",
        {
            "message_type": "member_welcome",
            "channel": "email",
            "subject": "Hi",
            "body": "<p>{{ member.first_name }}</p>",
            "format": "html",
            "member_id": member["id"],
        },
    )
    assert draft.json() == {"subject": "Hi", "text": "Siti", "html": "<p>Siti</p>"}

    unknown_member = await api.post(
        f"{TEMPLATES}/preview",
        {"message_type": "points_earned", "channel": "email", "member_id": "mem_nothere"},
    )
    assert unknown_member.status_code == 404
    no_sms_template = await api.post(
        f"{TEMPLATES}/preview", {"message_type": "member_welcome", "channel": "sms"}
    )
    assert no_sms_template.status_code == 422


async def test_the_members_locale_chooses_the_template_sent(
    api: ApiClient, db: Database, app: Any, settings: Settings, smtp: SmtpServer, mail: Any
) -> None:
    welcome = _template(
        message_type="member_welcome", subject="Selamat datang", body="Hai {{ member.first_name }}"
    )
    assert (await api.post(TEMPLATES, welcome)).status_code == 201
    member = await consenting_member(api, first_name="Siti")
    preferences = f"/api/v1/members/{member['id']}/notification-preferences"
    assert (await api.patch(preferences, {"locale": "ms"})).status_code == 200
    await consenting_member(api, first_name="John")

    await deliver(db, app, settings)

    assert sorted(str(m.message["Subject"]) for m in smtp.received()) == [
        "Selamat datang",
        "Welcome to Our loyalty program",
    ]


@pytest.mark.parametrize(
    "body",
    [
        {"staff": [{"email": "not-an-email", "roles": ["manager"]}]},
        {"staff": [{"email": "a@example.com", "roles": ["owner"]}]},
        {"staff": [{"email": "a@example.com", "roles": []}]},
        {"quiet_hours": {"start": "25:00", "end": "08:00"}},
        {"renewal_due_days": [0]},
        {"dedup_window_minutes": -1},
        {"dedup_windows": {"no_such_type": 5}},
        {"disabled_message_types": ["no_such_type"]},
        {"default_locale": None},
        {"retry_delays_seconds": []},
    ],
)
async def test_bad_settings_are_refused_and_change_nothing(
    api: ApiClient, body: dict[str, Any]
) -> None:
    before = (await api.get("/api/v1/notification-settings")).json()
    response = await api.patch("/api/v1/notification-settings", body)
    assert response.status_code == 422, response.text
    assert (await api.get("/api/v1/notification-settings")).json() == before


async def test_one_end_of_the_quiet_hours_changes_alone(api: ApiClient) -> None:
    path = "/api/v1/notification-settings"
    first = await api.patch(path, {"quiet_hours": {"start": "22:00", "end": "07:00"}})
    assert first.status_code == 200, first.text
    later = await api.patch(path, {"quiet_hours": {"start": "23:00"}})
    assert later.status_code == 200, later.text
    assert later.json()["quiet_hours"] == {"start": "23:00", "end": "07:00"}


async def test_a_refused_setting_is_named_in_the_error(api: ApiClient) -> None:
    response = await api.patch("/api/v1/notification-settings", {"renewal_due_days": [0]})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["message"].startswith("renewal_due_days")
    assert [f["field"] for f in error["details"]["fields"]] == ["renewal_due_days"]


async def test_preferences_and_devices(api: ApiClient) -> None:
    member = await api.create_member(consent={"email": True})
    base = f"/api/v1/members/{member['id']}"
    preferences = (await api.get(f"{base}/notification-preferences")).json()
    assert preferences == {
        "member_id": member["id"],
        "email": True,
        "sms": False,
        "push": False,
        "marketing_email": True,
        "marketing_sms": True,
        "marketing_push": True,
        "locale": None,
        "timezone": None,
        "updated_at": None,
    }
    bad_bodies = ({"timezone": "Mars/Olympus"}, {"timezone": "localtime"}, {"push": 1})
    for bad in (*bad_bodies, {"locale": "x"}, {"push": None}):
        assert (await api.patch(f"{base}/notification-preferences", bad)).status_code == 422
    changed = await api.patch(f"{base}/notification-preferences", {"push": True})
    assert changed.json()["push"] is True

    device = {"token": "fcm-token-" + "a" * 40, "platform": "android"}
    first = await api.post(f"{base}/devices", device)
    assert first.status_code == 201, first.text
    second = await api.post(f"{base}/devices", device)
    assert second.status_code == 200
    assert second.json()["id"] == first.json()["id"]
    for bad in ({"token": "short", "platform": "ios"}, {"token": "x" * 20, "platform": "nokia"}):
        assert (await api.post(f"{base}/devices", bad)).status_code == 422
    listed = await api.get(f"{base}/devices")
    assert [d["id"] for d in listed.json()] == [first.json()["id"]]
    assert (await api.delete(f"{base}/devices/{first.json()['id']}")).status_code == 204
    assert (await api.get(f"{base}/devices")).json() == []
    assert (await api.delete(f"{base}/devices/{first.json()['id']}")).status_code == 404
    assert (await api.get("/api/v1/members/mem_nothere/devices")).status_code == 404


async def test_suppressions_are_added_listed_and_removed(api: ApiClient) -> None:
    added = await api.post(
        "/api/v1/notification-suppressions", {"channel": "email", "address": " Ann@Example.com "}
    )
    assert added.status_code == 201, added.text
    assert added.json()["address"] == "ann@example.com"
    bad = await api.post("/api/v1/notification-suppressions", {"channel": "fax", "address": "x@y"})
    assert bad.status_code == 422
    # An address its channel could never send to would suppress nothing.
    for channel, address in (("sms", "not a phone"), ("sms", "+1 2"), ("email", "nobody")):
        refused = await api.post(
            "/api/v1/notification-suppressions", {"channel": channel, "address": address}
        )
        assert refused.status_code == 422, (channel, address, refused.text)
    number = await api.post(
        "/api/v1/notification-suppressions", {"channel": "sms", "address": "+60 12-345 6789"}
    )
    assert number.status_code == 201, number.text
    assert number.json()["address"] == "+60123456789"
    assert (await api.delete(f"/api/v1/notification-suppressions/{number.json()['id']}")).is_success
    listed = (await api.get("/api/v1/notification-suppressions")).json()["data"]
    assert [s["id"] for s in listed] == [added.json()["id"]]
    removed = await api.delete(f"/api/v1/notification-suppressions/{added.json()['id']}")
    assert removed.status_code == 204
    assert (await api.get("/api/v1/notification-suppressions")).json()["data"] == []


async def test_list_filters_are_checked(api: ApiClient) -> None:
    for params in ({"status": "lost"}, {"channel": "fax"}, {"message_type": "x"}, {"limit": 0}):
        assert (await api.get("/api/v1/notifications", params)).status_code == 422
    assert (await api.get("/api/v1/notifications", {"member_id": "mem_nothere"})).status_code == 404


async def test_an_unsubscribe_link_that_is_not_ours_is_refused(api: ApiClient) -> None:
    for token in ("abc", "bWVtX3g6ZW1haWw.AAAA", "a.b.c", "é.x"):
        response = await api.http.post(f"/api/v1/unsubscribe/{token}")
        assert response.status_code in (404, 422), (token, response.text)


def test_the_template_sent_falls_back_from_a_region_to_its_language() -> None:
    def template(locale: str) -> NotificationTemplate:
        return NotificationTemplate(
            message_type="points_earned",
            channel="email",
            locale=locale,
            subject=f"subject {locale}",
            body="body",
            format="text",
            enabled=True,
        )

    stored = {("points_earned", "email", t): template(t) for t in ("fr", "pt-BR")}
    message = MESSAGE_TYPES["points_earned"]

    def chosen(*locales: str | None) -> str | None:
        picked = choose_template(stored, message, "email", locales)
        assert not isinstance(picked, str), picked
        return picked[3]

    assert chosen("fr-CA", "en") == "fr"
    assert chosen("pt-br", "en") == "pt-BR"
    assert chosen("pt", "fr") == "fr"  # no Portuguese but Brazil's: the next locale
    assert chosen("de", "en") is None  # the built-in default


async def test_two_spellings_of_one_locale_are_one_template(api: ApiClient) -> None:
    body = {
        "message_type": "points_earned",
        "channel": "email",
        "format": "text",
        "subject": "Points",
        "body": "You have {{ event.points }} more points.",
    }
    created = await api.post("/api/v1/notification-templates", {**body, "locale": "pt-br"})
    assert created.status_code == 201, created.text
    assert created.json()["locale"] == "pt-BR"
    again = await api.post("/api/v1/notification-templates", {**body, "locale": "PT-BR"})
    assert again.status_code == 409, again.text
    preference = await api.create_member()
    patched = await api.patch(
        f"/api/v1/members/{preference['id']}/notification-preferences", {"locale": "zh-hant-tw"}
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["locale"] == "zh-Hant-TW"


async def test_a_key_bound_to_an_organisation_cannot_touch_what_every_organisation_shares(
    api: ApiClient, http: httpx.AsyncClient, db: Database
) -> None:
    a = await api.create_organisation()
    b = await api.create_organisation()
    await api.create_member(organisation_id=b["id"], email="bob-of-b@example.com")
    listed = {"channel": "email", "address": "bob-of-b@example.com", "reason": "unsubscribed"}
    suppression = await api.post("/api/v1/notification-suppressions", listed)
    assert suppression.status_code == 201, suppression.text
    template = {
        "message_type": "member_welcome",
        "channel": "email",
        "locale": "en",
        "subject": "Welcome",
        "body": "Hello {{ member.first_name }}",
    }
    created = await api.post("/api/v1/notification-templates", template)
    assert created.status_code == 201, created.text
    bound_admin = ApiClient(http, await issue_key(db, Role.ADMIN, organisation=a["id"]))
    bound_manager = ApiClient(http, await issue_key(db, Role.MANAGER, organisation=a["id"]))
    settings_before = (await api.get("/api/v1/notification-settings")).json()

    refused = [
        await bound_manager.get("/api/v1/notification-suppressions"),
        await bound_admin.get("/api/v1/notification-suppressions"),
        await bound_admin.post("/api/v1/notification-suppressions", {**listed, "address": "x@y.z"}),
        await bound_admin.delete(f"/api/v1/notification-suppressions/{suppression.json()['id']}"),
        await bound_admin.post("/api/v1/notification-templates", {**template, "locale": "fr"}),
        await bound_admin.patch(
            f"/api/v1/notification-templates/{created.json()['id']}", {"subject": "Hi"}
        ),
        await bound_admin.delete(f"/api/v1/notification-templates/{created.json()['id']}"),
        await bound_admin.patch(
            "/api/v1/notification-settings",
            {"staff": [{"email": "someone@a.example", "roles": ["admin"]}]},
        ),
    ]

    assert [r.status_code for r in refused] == [403] * len(refused), [r.text for r in refused]
    assert {r.json()["error"]["code"] for r in refused} == {"FORBIDDEN"}
    kept = (await api.get("/api/v1/notification-suppressions")).json()["data"]
    assert [s["address"] for s in kept] == ["bob-of-b@example.com"]
    templates = (await api.get("/api/v1/notification-templates")).json()
    saved = [(t["locale"], t["subject"]) for t in templates if t["locale"] in ("en", "fr")]
    assert saved == [("en", "Welcome")]  # the built-in ones have no locale
    assert (await api.get("/api/v1/notification-settings")).json() == settings_before


async def test_a_token_registered_for_two_members_at_once_ends_with_one_of_them(
    api: ApiClient, is_postgres: bool
) -> None:
    """The phone changed hands while both accounts signed in at the same moment: the token
    is one app on one phone, so it ends registered for exactly one of the members (the
    last), never both (both would get each other's pushes)."""
    token = {"token": "fcm-token-" + "r" * 40, "platform": "ios"}
    for round_ in range(5 if is_postgres else 2):
        members = [await api.create_member() for _ in range(4)]
        answers = await asyncio.gather(
            *(api.post(f"/api/v1/members/{m['id']}/devices", token) for m in members)
        )
        assert [a.status_code for a in answers] == [201] * 4, [a.text for a in answers]
        holding = [
            m["id"] for m in members if (await api.get(f"/api/v1/members/{m['id']}/devices")).json()
        ]
        assert len(holding) == 1, (round_, holding)


async def test_a_key_bound_to_an_organisation_sees_no_staff_notifications(
    api: ApiClient, db: Database, app: Any, settings: Settings, smtp: SmtpServer, mail: Any
) -> None:
    staff = [{"email": "maya@club.example", "roles": ["manager"]}]
    assert (await api.patch("/api/v1/notification-settings", {"staff": staff})).is_success
    chapter = await api.create_organisation()
    member = await api.create_member(organisation_id=chapter["id"])
    await award(api, member["id"], 100)
    body = {"member_id": member["id"], "points": 5, "reason": "fix", "require_approval": True}
    assert (await api.post("/api/v1/points/deduct", body)).status_code == 202
    await deliver(db, app, settings)
    assert [message.recipients for message in smtp.received()] == [["maya@club.example"]]
    # The installation's staff list is no organisation's: its messages (and addresses)
    # are not shown to a key bound to the organisation the event was in.
    scoped = api.with_key(await issue_key(db, Role.MANAGER, organisation=chapter["id"]))
    seen = await scoped.get("/api/v1/notifications")
    assert seen.status_code == 200, seen.text
    assert {n["audience"] for n in seen.json()["data"]} <= {"member"}
    everything = (await api.get("/api/v1/notifications")).json()["data"]
    assert [n["recipient"] for n in everything if n["audience"] == "staff"] == ["maya@club.example"]


async def test_a_preview_for_a_member_shows_the_template_in_their_locale(
    api: ApiClient, db: Database
) -> None:
    welcome = {
        "message_type": "member_welcome",
        "channel": "email",
        "locale": "ms",
        "subject": "Selamat datang",
        "body": "Hai {{ member.first_name }}",
    }
    assert (await api.post(TEMPLATES, welcome)).status_code == 201
    member = await api.create_member(first_name="Siti")
    preferences = f"/api/v1/members/{member['id']}/notification-preferences"
    assert (await api.patch(preferences, {"locale": "ms"})).status_code == 200
    ask = {"message_type": "member_welcome", "channel": "email", "member_id": member["id"]}
    preview = await api.post(f"{TEMPLATES}/preview", ask)
    assert preview.status_code == 200, preview.text
    assert (preview.json()["subject"], preview.json()["text"]) == ("Selamat datang", "Hai Siti")
    # A locale asked for wins; without a member, the default locale's (the built-in one).
    english = await api.post(f"{TEMPLATES}/preview", {**ask, "locale": "en"})
    assert english.json()["subject"] != "Selamat datang"
    del ask["member_id"]
    assert (await api.post(f"{TEMPLATES}/preview", ask)).json()["subject"] != "Selamat datang"
    # A member the key cannot see is not found, whatever their locale.
    chapter = await api.create_organisation()
    scoped = api.with_key(await issue_key(db, Role.MANAGER, organisation=chapter["id"]))
    hidden = await scoped.post(f"{TEMPLATES}/preview", {**ask, "member_id": member["id"]})
    assert hidden.status_code == 404, hidden.text


async def test_a_type_without_a_template_for_the_channel_is_logged_as_having_none(
    api: ApiClient,
    db: Database,
    app: Any,
    settings: Settings,
    smtp: SmtpServer,
    mail: Any,
    sms: Any,
) -> None:
    only_malay = {
        "message_type": "member_welcome",
        "channel": "sms",
        "locale": "ms",
        "body": "Selamat datang",
    }
    assert (await api.post(TEMPLATES, only_malay)).status_code == 201
    member = await api.create_member(consent={"sms": True}, phone="+60123456780")
    await deliver(db, app, settings)
    logged = await notifications(api, member_id=member["id"], channel="sms")
    # No template was disabled: there is none in the member's locales, nor a built-in one.
    assert [(n["status"], n["reason"]) for n in logged] == [("suppressed", "no_template")]
