"""Email end to end: events over the API, the worker's passes, a real SMTP server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import func, select

from memberhub.auth.roles import Role
from memberhub.kit.clock import days_until, utcnow
from memberhub.kit.db import Database
from memberhub.notifications.models import Notification, NotificationFeedState
from memberhub.notifications.templates import html_to_text, render
from memberhub.points.jobs import notify_expiring_points
from memberhub.settings import Settings
from memberhub.worker.runner import Worker
from tests.conftest import issue_key
from tests.fakes.smtp_server import SmtpServer
from tests.notifications.conftest import (
    FROM,
    award,
    consenting_member,
    deliver,
    hub_of,
    notifications,
)
from tests.support import ApiClient


async def test_points_awarded_with_notify_reach_the_member_in_exactly_one_email(
    api: ApiClient,
    db: Database,
    app: Any,
    settings: Settings,
    smtp: SmtpServer,
    mail: dict[str, Any],
) -> None:
    member = await consenting_member(api, first_name="Aisha")
    await award(api, member["id"], 150, notify=True)
    worker = Worker(db, settings=settings, hub=hub_of(app))

    await worker.tick(force=True)
    await worker.tick(force=True)  # a second pass sends nothing again

    # The welcome of the new member, and exactly one email for the points.
    assert sorted(str(m.message["Subject"]) for m in smtp.received()) == [
        "Welcome to Our loyalty program",
        "You earned 150 points",
    ]
    (received,) = [m for m in smtp.received() if "points" in str(m.message["Subject"])]
    assert received.recipients == [member["email"]]
    assert received.sender == FROM
    assert received.message["Subject"] == "You earned 150 points"
    text = received.part("plain")
    assert text is not None
    assert "Hello Aisha" in text
    assert "You earned 150 points (Welcome bonus). Your balance is 150 points." in text
    # Transactional: no unsubscribe headers.
    assert received.message["List-Unsubscribe"] is None
    (logged,) = await notifications(api, message_type="points_earned")
    assert logged["status"] == "sent"
    assert logged["channel"] == "email"
    assert logged["member_id"] == member["id"]
    assert logged["integration_id"] == mail["id"]
    assert logged["provider_message_id"] == str(received.message["Message-ID"]).strip()
    assert received.reference == logged["id"]
    member_log = await api.get(f"/api/v1/members/{member['id']}/notifications")
    assert [n["id"] for n in member_log.json()["data"]] == [
        n["id"] for n in await notifications(api, member_id=member["id"])
    ]


async def test_an_award_without_notify_sends_no_email(
    api: ApiClient, db: Database, app: Any, settings: Settings, smtp: SmtpServer, mail: Any
) -> None:
    member = await consenting_member(api)
    await award(api, member["id"], 150)
    await deliver(db, app, settings)
    assert [n["message_type"] for n in await notifications(api)] == ["member_welcome"]
    assert [m.message["Subject"] for m in smtp.received()] == ["Welcome to Our loyalty program"]


async def test_reading_the_feed_again_makes_no_second_notification(
    api: ApiClient, db: Database, app: Any, settings: Settings, smtp: SmtpServer, mail: Any
) -> None:
    member = await consenting_member(api)
    await award(api, member["id"], 10, notify=True)
    await deliver(db, app, settings)
    async with db.transaction() as session:
        # As if the cursor were restored from a backup: every event is read again.
        state = await session.get(NotificationFeedState, 1)
        assert state is not None
        state.event_position = 0
    await deliver(db, app, settings)
    async with db.transaction() as session:
        assert await session.scalar(select(func.count()).select_from(Notification)) == 2
    assert len(smtp.received()) == 2  # welcome and points, once each


async def test_the_points_expiring_job_sends_one_email_per_expiring_batch(
    api: ApiClient, db: Database, app: Any, settings: Settings, smtp: SmtpServer, mail: Any
) -> None:
    now = utcnow()
    member = await consenting_member(api, consent={"email": True, "marketing_email": True})
    await award(api, member["id"], 100, expires_at=(now + timedelta(days=10)).isoformat())
    await award(api, member["id"], 200, expires_at=(now + timedelta(days=20)).isoformat())
    await award(api, member["id"], 300, expires_at=(now + timedelta(days=200)).isoformat())
    async with db.transaction() as session:
        assert await notify_expiring_points(session, now) == 2

    await deliver(db, app, settings)

    expiring = sorted(
        (m for m in smtp.received() if "expire" in str(m.message["Subject"])),
        key=lambda m: str(m.message["Subject"]),
    )
    assert [m.message["Subject"] for m in expiring] == [
        f"100 points expire on {(now + timedelta(days=10)).strftime('%d %B %Y').lstrip('0')}",
        f"200 points expire on {(now + timedelta(days=20)).strftime('%d %B %Y').lstrip('0')}",
    ]
    # Marketing: a signed one-click unsubscribe link in the headers.
    header = str(expiring[0].message["List-Unsubscribe"]).strip()
    assert header.startswith(f"<{settings.public_url}/api/v1/unsubscribe/")
    assert expiring[0].message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    link = header.strip("<>").removeprefix(settings.public_url)

    async with db.transaction() as session:
        assert await notify_expiring_points(session, now) == 0  # once per batch
    await deliver(db, app, settings)
    assert len([m for m in smtp.received() if "expire" in str(m.message["Subject"])]) == 2

    # One click (RFC 8058) turns marketing email off; the page alone changes nothing.
    http: httpx.AsyncClient = api.http
    assert (await http.get(link)).status_code == 200
    clicked = await http.post(link, content=b"List-Unsubscribe=One-Click")
    assert clicked.status_code == 200, clicked.text
    assert clicked.json() == {"unsubscribed": True, "channel": "email"}
    preferences = await api.get(f"/api/v1/members/{member['id']}/notification-preferences")
    assert preferences.json()["marketing_email"] is False
    # The member's consent to marketing email is withdrawn with it, for every connector.
    shown = (await api.get(f"/api/v1/members/{member['id']}")).json()
    assert shown["consent"] == {**shown["consent"], "email": True, "marketing_email": False}
    history = (await api.get(f"/api/v1/members/{member['id']}/consent-history")).json()["data"]
    assert [(c["purpose"], c["granted"], c["source"]) for c in history][-1] == (
        "marketing_email",
        False,
        "unsubscribe_link",
    )
    again = await http.post(link, content=b"List-Unsubscribe=One-Click")
    assert again.status_code == 200
    assert len(
        (await api.get(f"/api/v1/members/{member['id']}/consent-history")).json()["data"]
    ) == len(history)
    tampered = link[:-3] + ("AAA" if not link.endswith("AAA") else "BBB")
    assert (await http.post(tampered)).status_code == 404

    later = now + timedelta(days=190)
    async with db.transaction() as session:
        assert await notify_expiring_points(session, later) == 1
    await deliver(db, app, settings, later)
    logged = await notifications(api, message_type="points_expiring")
    assert (logged[0]["status"], logged[0]["reason"]) == ("suppressed", "opted_out")
    assert len([m for m in smtp.received() if "expire" in str(m.message["Subject"])]) == 2


async def test_a_member_without_email_consent_gets_no_email(
    api: ApiClient, db: Database, app: Any, settings: Settings, smtp: SmtpServer, mail: Any
) -> None:
    member = await api.create_member(consent={"email": False})
    await award(api, member["id"], 10, notify=True)
    await deliver(db, app, settings)
    assert smtp.received() == []
    logged = await notifications(api)
    assert {(n["message_type"], n["status"], n["reason"]) for n in logged} == {
        ("member_welcome", "suppressed", "no_consent"),
        ("points_earned", "suppressed", "no_consent"),
    }


async def test_a_refused_recipient_fails_with_the_servers_words_and_is_never_retried(
    api: ApiClient, db: Database, app: Any, settings: Settings, smtp: SmtpServer, mail: Any
) -> None:
    member = await consenting_member(api, email="nobody@example.com")
    smtp.refused.add("nobody@example.com")
    await deliver(db, app, settings)

    (logged,) = await notifications(api)
    assert logged["status"] == "failed"
    assert logged["reason"] == "rejected"
    assert "550" in logged["error"]
    assert "No such mailbox" in logged["error"]
    assert logged["attempts"] == 1
    assert logged["next_attempt_at"] is None
    await deliver(db, app, settings, utcnow() + timedelta(days=2))
    (again,) = await notifications(api, member_id=member["id"])
    assert again["attempts"] == 1
    assert smtp.received() == []


async def test_a_deferred_recipient_is_retried_on_schedule(
    api: ApiClient, db: Database, app: Any, settings: Settings, smtp: SmtpServer, mail: Any
) -> None:
    later = await consenting_member(api, email="later@example.com")
    smtp.deferred.add("later@example.com")
    now = utcnow()
    await deliver(db, app, settings, now)
    (logged,) = await notifications(api, member_id=later["id"])
    assert logged["status"] == "queued"
    assert logged["attempts"] == 1
    assert "451" in logged["error"]
    # One mailbox deferring its mail says nothing of the relay: no incident, and mail to
    # others goes on (many deferrals in a row do not open the circuit either).
    for n in range(12):
        smtp.deferred.add(f"greylisted{n}@example.com")
        await consenting_member(api, email=f"greylisted{n}@example.com")
    await deliver(db, app, settings, now)
    await consenting_member(api, email="now@example.com")
    await deliver(db, app, settings, now)
    assert [m.recipients for m in smtp.received()] == [["now@example.com"]]
    incidents = await api.get("/api/v1/events", {"type": "integration.incident.opened"})
    assert incidents.json()["data"] == []

    smtp.deferred.clear()
    await deliver(db, app, settings, now + timedelta(seconds=30))
    assert len(smtp.received()) == 1  # not yet: the first retry waits a minute
    await deliver(db, app, settings, now + timedelta(seconds=61))
    (logged,) = await notifications(api, member_id=later["id"])
    assert logged["status"] == "sent"
    assert logged["attempts"] == 2


async def test_an_html_template_is_sent_with_a_plain_text_part(
    api: ApiClient, db: Database, app: Any, settings: Settings, smtp: SmtpServer, mail: Any
) -> None:
    template = {
        "message_type": "member_welcome",
        "channel": "email",
        "locale": "en",
        "subject": "Welcome, {{ member.first_name }}",
        "body": "<h1>Welcome {{ member.first_name }}</h1>"
        "<p>Your id: <b>{{ member.id }}</b></p><p><a href='https://club.example/app'>Open</a></p>",
        "format": "html",
    }
    created = await api.post("/api/v1/notification-templates", template)
    assert created.status_code == 201, created.text
    member = await consenting_member(api, first_name="Ben & Jerry")

    await deliver(db, app, settings)

    (received,) = smtp.received()
    assert received.message["Subject"] == "Welcome, Ben & Jerry"
    assert received.message.get_content_type() == "multipart/alternative"
    html = received.part("html")
    text = received.part("plain")
    assert html is not None
    assert text is not None
    assert "<h1>Welcome Ben &amp; Jerry</h1>" in html
    assert "Welcome Ben & Jerry" in text
    assert f"Your id: {member['id']}" in text
    assert "Open (https://club.example/app)" in text


async def test_the_log_is_paged_newest_first_and_scoped_to_the_keys_organisation(
    api: ApiClient, db: Database, app: Any, settings: Settings, smtp: SmtpServer, mail: Any
) -> None:
    chapter = await api.create_organisation()
    inside = await consenting_member(api, organisation_id=chapter["id"])
    for _ in range(2):
        await consenting_member(api)
    await deliver(db, app, settings)

    first = await api.get("/api/v1/notifications", {"limit": 2})
    assert first.status_code == 200
    page = first.json()
    assert page["pagination"]["has_more"] is True
    rest = await api.get(
        "/api/v1/notifications", {"limit": 2, "cursor": page["pagination"]["next_cursor"]}
    )
    ids = [n["id"] for n in page["data"] + rest.json()["data"]]
    assert len(ids) == len(set(ids)) == 3
    assert rest.json()["pagination"]["has_more"] is False

    scoped = api.with_key(await issue_key(db, Role.MANAGER, organisation=chapter["id"]))
    seen = await scoped.get("/api/v1/notifications")
    assert seen.status_code == 200, seen.text
    assert [n["member_id"] for n in seen.json()["data"]] == [inside["id"]]
    bad_cursor = await api.get("/api/v1/notifications", {"cursor": "not-a-cursor"})
    assert bad_cursor.status_code == 422


def test_the_text_part_decodes_the_html_once() -> None:
    """A name that reads `Ana <b>&amp; Co</b>` (escaped once in the HTML) reads the same in
    the text part, not decoded a second time."""
    html = "<p>Hi Ana &lt;b&gt;&amp;amp; Co&lt;/b&gt;,</p><p>Fish &amp; chips</p>"
    assert html_to_text(html) == "Hi Ana <b>&amp; Co</b>,\n\nFish & chips"


def test_days_left_count_a_part_of_a_day_as_a_day() -> None:
    now = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
    assert days_until(now + timedelta(days=9, hours=23), now) == 10
    assert days_until(now + timedelta(days=10), now) == 10
    assert days_until(now + timedelta(seconds=1), now) == 1
    assert days_until(now - timedelta(hours=1), now) == 0


def test_the_date_filter_formats_as_asked_and_by_default_without_a_leading_zero() -> None:
    body = (
        "{{ event.at | date }}|{{ event.at | date('%H:%M') }}|"
        "{{ event.at | date('%m/%d/%Y') }}|{{ event.late | date }}"
    )
    event = {"at": "2026-01-05T00:30:00Z", "late": "2026-12-25T10:00:00+00:00"}
    rendered = render(subject=None, body=body, format="text", context={"event": event})
    assert rendered.text == "5 January 2026|00:30|01/05/2026|25 December 2026"
