"""What a template renders: times in the recipient's zone, values it may not build, the
plain-text part of HTML email and the locale a member gets."""

from __future__ import annotations

import re
from datetime import datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.notifications.templates import MAX_RENDER_STEPS, render
from memberhub.points.jobs import notify_expiring_points
from memberhub.settings import Settings
from tests.fakes.smtp_server import SmtpServer
from tests.notifications.conftest import award, consenting_member, deliver, notifications
from tests.support import ApiClient

TEMPLATES = "/api/v1/notification-templates"
NEW_YORK = ZoneInfo("America/New_York")


async def test_an_expiry_date_is_the_day_where_the_member_is(
    api: ApiClient,
    db: Database,
    app: Any,
    settings: Settings,
    smtp: SmtpServer,
    mail: dict[str, Any],
) -> None:
    assert (await api.patch("/api/v1/program", {"timezone": "America/New_York"})).is_success
    now = utcnow()
    in_program_zone = await consenting_member(api, email="ny@example.com")
    in_tokyo = await consenting_member(api, email="tokyo@example.com")
    prefs = await api.patch(
        f"/api/v1/members/{in_tokyo['id']}/notification-preferences", {"timezone": "Asia/Tokyo"}
    )
    assert prefs.status_code == 200, prefs.text
    # 23:30 on a day in New York is 04:30 UTC and 13:30 in Tokyo, both the next day.
    day = (now + timedelta(days=10)).astimezone(NEW_YORK).date()
    expires = datetime.combine(day, time(23, 30), tzinfo=NEW_YORK)
    for member in (in_program_zone, in_tokyo):
        await award(api, member["id"], 100, expires_at=expires.isoformat())
    async with db.transaction() as session:
        assert await notify_expiring_points(session, now) == 2
    await deliver(db, app, settings, now)
    subjects = {
        m.recipients[0]: str(m.message["Subject"])
        for m in smtp.received()
        if "expire" in str(m.message["Subject"])
    }
    next_day = day + timedelta(days=1)
    assert subjects == {
        "ny@example.com": f"100 points expire on {day.day} {day:%B %Y}",
        "tokyo@example.com": f"100 points expire on {next_day.day} {next_day:%B %Y}",
    }, subjects


async def test_a_preview_for_a_member_shows_times_in_their_zone(api: ApiClient) -> None:
    member = await api.create_member()
    await api.patch(
        f"/api/v1/members/{member['id']}/notification-preferences", {"timezone": "Asia/Tokyo"}
    )
    draft = {
        "message_type": "points_expiring",
        "channel": "sms",
        "body": "{{ event.expires_at | date('%d %H:%M') }}",
        "event": {"expires_at": "2027-01-05T16:30:00Z"},
    }
    shown = await api.post(f"{TEMPLATES}/preview", {**draft, "member_id": member["id"]})
    assert shown.status_code == 200, shown.text
    assert shown.json()["text"] == "06 01:30"
    # Without a member: the program's time zone (UTC by default).
    assert (await api.post(f"{TEMPLATES}/preview", draft)).json()["text"] == "05 16:30"


async def _save_seeing_errors(app: Any, admin_key: str, body: str) -> httpx.Response:
    """A welcome email template with `body` saved by a client that sees what the server
    answers, a 500 included."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        return await http.post(
            TEMPLATES,
            headers={"Authorization": f"Bearer {admin_key}"},
            json={
                "message_type": "member_welcome",
                "channel": "email",
                "locale": "en",
                "subject": "Hi",
                "body": body,
            },
        )


@pytest.mark.parametrize(
    "body",
    [
        "{{ 'a' * 2**62 }}",
        "{{ 'a' * 10**9 }}",
        "{{ ['a'] * 10**8 }}",
        "{{ 7 ** 1000000 }}",
        "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}",
        # Built, not printed: refused as it is made, whichever way it is made.
        "{% set s = 'a' * 200000 %}{% set t = s ~ s %}ok",
        "{% set t = '%-300000000s' % 'a' %}ok",
        "{% set t = '%-*s' % (300000000, 'a') %}ok",
        "{% set t = 'a' | center(300000000) %}ok",
        "{% set t = 'a'.ljust(300000000) %}ok",
        "{% set t = '{:>300000000}'.format('a') %}ok",
        "{% set x = (7 ** 1000) ** 1000 %}ok",
        "{% set ns = namespace(x=10 ** 1000) %}"
        "{% for i in range(20) %}{% set ns.x = ns.x * ns.x %}{% endfor %}ok",
        "{% set s = 'a' * 100000 %}{% set t = s | replace('a', s) %}ok",
        "{% set s = 'a' * 100000 %}{% set t = s.replace('a', s) %}ok",
        "{% set t = (['a' * 100000] * 1000) | join %}ok",
        "{% set t = ''.join(['a' * 100000] * 1000) %}ok",
        "{{ ['a' * 100000] * 1000 }}",
        "{% set t = ('a\n' * 50000) | indent(100000) %}ok",
    ],
)
async def test_a_template_that_builds_a_huge_value_is_refused_not_a_500(
    app: Any, admin_key: str, api: ApiClient, body: str
) -> None:
    response = await _save_seeing_errors(app, admin_key, body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "INVALID_TEMPLATE"
    assert (await api.get(TEMPLATES, {"include_defaults": "false"})).json() == []


async def test_the_plain_text_part_keeps_cells_headings_and_line_breaks(api: ApiClient) -> None:
    preview = await api.post(
        f"{TEMPLATES}/preview",
        {
            "message_type": "points_earned",
            "channel": "email",
            "format": "html",
            "subject": "Points",
            "body": "<table><tr><td>Points</td><td>{{ event.points }}</td></tr>"
            "<tr><th>Balance</th><td>{{ event.balance_after }}</td></tr></table>"
            "<h5>Thanks</h5><h6>The club</h6><p>Line one<br/>Line two</p>",
        },
    )
    assert preview.status_code == 200, preview.text
    text = preview.json()["text"]
    assert re.search(r"^Points \d+$", text, re.M), text
    assert re.search(r"^Balance \d+$", text, re.M), text
    assert "\nThanks\n\nThe club\n" in text, text
    assert text.endswith("Line one\nLine two"), text


async def test_a_locale_falls_back_a_subtag_at_a_time(api: ApiClient) -> None:
    for locale, subject in (("zh-Hant", "繁體 welcome"), ("zh", "简体 welcome")):
        created = await api.post(
            TEMPLATES,
            {
                "message_type": "member_welcome",
                "channel": "email",
                "locale": locale,
                "subject": subject,
                "body": "Hi {{ member.first_name }}",
            },
        )
        assert created.status_code == 201, created.text
    for asked, subject in (
        ("zh-Hant-TW", "繁體 welcome"),
        ("zh-Hans-CN", "简体 welcome"),
        ("zh-TW", "简体 welcome"),
    ):
        preview = await api.post(
            f"{TEMPLATES}/preview",
            {"message_type": "member_welcome", "channel": "email", "locale": asked},
        )
        assert preview.status_code == 200, preview.text
        assert preview.json()["subject"] == subject, asked


@pytest.mark.parametrize(
    "body",
    [
        "Hello\n{{ member.first_name | truncate(-1) }}",
        "Hello\n{{ member.first_name | xmlattr }}",
        "Hello\n{{ cycler().next() }}",
    ],
)
async def test_a_template_a_filter_fails_in_is_refused_with_its_line_not_a_500(
    app: Any, admin_key: str, api: ApiClient, body: str
) -> None:
    response = await _save_seeing_errors(app, admin_key, body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "INVALID_TEMPLATE"
    assert response.json()["error"]["details"]["line"] == 2


async def test_a_template_failing_on_one_members_data_fails_only_their_notification(
    api: ApiClient, db: Database, app: Any, settings: Settings, smtp: SmtpServer, mail: Any
) -> None:
    # Renders for the sample member (Alex) when saved; fails for a two-letter name.
    welcome = {
        "message_type": "member_welcome",
        "channel": "email",
        "locale": "en",
        "subject": "Welcome",
        "body": "Hi {{ member.first_name | truncate(member.first_name | length) }}",
    }
    assert (await api.post(TEMPLATES, welcome)).status_code == 201
    short = await consenting_member(api, first_name="Al")
    other = await consenting_member(api, first_name="Johanna")
    await deliver(db, app, settings)
    assert [message.recipients for message in smtp.received()] == [[other["email"]]]
    (failed,) = await notifications(api, member_id=short["id"])
    assert (failed["status"], failed["reason"]) == ("failed", "render_failed")
    assert "line 1" in failed["error"]


# Work, not size: each prints nothing and builds nothing large, but would run for hours.
_ENDLESS = [
    "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}ok",
    "{% set s = 'a' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}ok",
    "{% for a in range(100000) %}{% for b in range(100000) if false %}{% endfor %}{% endfor %}",
    "{% for a in range(100000) %}{% set x = range(100000) | sum %}{% endfor %}ok",
    "{% set xs = range(10000) | list %}"
    "{% for a in range(100000) %}{% for b in range(100) %}{% if -1 in xs %}{% endif %}"
    "{% endfor %}{% endfor %}ok",
    "{% set xs = range(10000) | list %}"
    "{% for a in range(100000) %}{% set n = range(100000) | select('in', xs) | list %}"
    "{% endfor %}ok",
    "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}ok",
    "{% set n = lipsum(10 ** 7) %}ok",
]


@pytest.mark.parametrize("body", _ENDLESS)
async def test_a_template_doing_endless_work_is_refused_when_saved(
    app: Any, admin_key: str, api: ApiClient, body: str
) -> None:
    response = await _save_seeing_errors(app, admin_key, body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "INVALID_TEMPLATE"
    assert "too much work" in error["details"]["reason"], error
    assert (await api.get(TEMPLATES, {"include_defaults": "false"})).json() == []


async def test_a_template_doing_endless_work_is_refused_in_a_preview(api: ApiClient) -> None:
    preview = await api.post(
        f"{TEMPLATES}/preview",
        {
            "message_type": "member_welcome",
            "channel": "email",
            "subject": "Hi",
            "body": "Hello\n" + _ENDLESS[0],
        },
    )
    assert preview.status_code == 422, preview.text
    details = preview.json()["error"]["details"]
    assert (details["part"], details["line"]) == ("body", 2), details
    assert f"more than {MAX_RENDER_STEPS} steps" in details["reason"], details


async def test_a_template_endless_on_one_members_data_fails_only_their_notification(
    api: ApiClient, db: Database, app: Any, settings: Settings, smtp: SmtpServer, mail: Any
) -> None:
    # No loop for the sample member (Alex, four letters) when saved; for a longer name,
    # 10**15 passes through empty loops: a worker's CPU for weeks, were they not counted.
    welcome = {
        "message_type": "member_welcome",
        "channel": "email",
        "locale": "en",
        "subject": "Welcome",
        "body": "Hi {{ member.first_name }}"
        "{% for a in range(member.first_name | length > 4 and 100000 or 0) %}"
        "{% for b in range(100000) %}{% for c in range(100000) %}{% endfor %}{% endfor %}"
        "{% endfor %}",
    }
    assert (await api.post(TEMPLATES, welcome)).status_code == 201
    long_name = await consenting_member(api, first_name="Johanna")
    other = await consenting_member(api, first_name="Al")
    await deliver(db, app, settings)
    assert [message.recipients for message in smtp.received()] == [[other["email"]]]
    (failed,) = await notifications(api, member_id=long_name["id"])
    assert (failed["status"], failed["reason"]) == ("failed", "render_failed")
    assert "too much work" in failed["error"], failed


def test_a_template_within_the_work_budget_renders_as_written() -> None:
    rendered = render(
        subject=None,
        body="{% macro row(n) %}{{ n }};{% endmacro %}"
        "{% for a in range(100) %}{% for b in range(100) if b == a %}{{ row(b) }}{% endfor %}"
        "{% endfor %}",
        format="text",
        context={},
    )
    assert rendered.text == "".join(f"{n};" for n in range(100))
