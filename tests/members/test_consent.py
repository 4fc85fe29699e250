"""Consent by purpose: every change of a flag is kept in the member's history and announced
with `member.consent_changed`, whoever makes it."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select

from memberhub.kit.actor import Actor
from memberhub.kit.db import Database
from memberhub.members.consent import (
    PURPOSES,
    ConsentSource,
    consent_column,
    has_consent,
    set_consent,
)
from memberhub.members.models import ConsentChange, Member
from memberhub.members.repository import MemberRepository
from tests.bulk.test_member_import import finished, post_import
from tests.support import ApiClient

MEMBERS = "/api/v1/members"


async def history(api: ApiClient, member_id: str, **params: Any) -> list[dict[str, Any]]:
    response = await api.get(f"{MEMBERS}/{member_id}/consent-history", params=params or None)
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


async def consent_events(api: ApiClient, member_id: str) -> list[dict[str, Any]]:
    response = await api.get(
        "/api/v1/events",
        params={"member_id": member_id, "type": "member.consent_changed", "limit": 500},
    )
    assert response.status_code == 200, response.text
    return [event["data"] for event in response.json()["data"]]


def granted(rows: list[dict[str, Any]]) -> list[tuple[str, bool, str]]:
    return [(row["purpose"], row["granted"], row["source"]) for row in rows]


async def test_the_documented_purposes_are_flags_on_the_member(api: ApiClient) -> None:
    member = await api.create_member(consent={"crm": True, "marketing_email": True})
    assert set(member["consent"]) == set(PURPOSES)
    assert {"crm", "marketing_email", "analytics"} <= set(PURPOSES)
    assert member["consent"]["crm"] is True
    assert member["consent"]["marketing_email"] is True
    assert member["consent"]["analytics"] is False


async def test_a_new_members_grants_are_its_first_history_rows(api: ApiClient) -> None:
    member = await api.create_member(consent={"email": True, "crm": True})
    rows = await history(api, member["id"])
    assert sorted(granted(rows)) == [("crm", True, "api"), ("email", True, "api")]
    assert all(row["actor"].startswith("key_") for row in rows), rows
    assert all(row["client_ip"] == "127.0.0.1" for row in rows), rows
    # member.created carries the initial consent; no separate announcement.
    assert await consent_events(api, member["id"]) == []


async def test_a_patch_records_each_changed_flag_and_announces_it(api: ApiClient) -> None:
    member = await api.create_member(consent={"analytics": True})
    response = await api.patch(
        f"{MEMBERS}/{member['id']}",
        {"consent": {"analytics": False, "crm": True, "email": False}},
    )
    assert response.status_code == 200, response.text
    rows = await history(api, member["id"])
    assert granted(rows)[1:] == [("analytics", False, "api"), ("crm", True, "api")]
    events = await consent_events(api, member["id"])
    assert sorted((e["purpose"], e["granted"], e["source"]) for e in events) == [
        ("analytics", False, "api"),
        ("crm", True, "api"),
    ]
    assert all(e["member_id"] == member["id"] for e in events)


async def test_a_patch_that_changes_no_flag_records_nothing(api: ApiClient) -> None:
    member = await api.create_member(consent={"crm": True})
    response = await api.patch(
        f"{MEMBERS}/{member['id']}", {"consent": {"crm": True}, "first_name": "Ana"}
    )
    assert response.status_code == 200, response.text
    assert len(await history(api, member["id"])) == 1
    assert await consent_events(api, member["id"]) == []


async def test_erasure_withdraws_every_granted_purpose(api: ApiClient, db: Database) -> None:
    member = await api.create_member(consent={"analytics": True, "marketing_email": True})
    assert (await api.delete(f"{MEMBERS}/{member['id']}")).status_code == 204
    async with db.transaction(read_only=True) as session:
        row = await session.scalar(select(Member).where(Member.public_id == member["id"]))
        assert row is not None
        assert row.deleted_at is not None
        assert not any(getattr(row, f"consent_{purpose}") for purpose in PURPOSES)
        assert not has_consent(row, "email")
        withdrawn = (
            await session.execute(
                select(ConsentChange.purpose, ConsentChange.source)
                .where(ConsentChange.member_id == row.id, ConsentChange.granted.is_(False))
                .order_by(ConsentChange.purpose)
            )
        ).all()
    assert [tuple(w) for w in withdrawn] == [
        ("analytics", "erasure"),
        ("marketing_email", "erasure"),
    ]


async def test_set_consent_is_a_whole_write_for_code_outside_the_api(
    api: ApiClient, db: Database
) -> None:
    member = await api.create_member(consent={"marketing_email": True})
    vendor = Actor(id="integration:int_mailchimp")
    async with db.transaction() as session:
        row = await MemberRepository(session).get_by_public_id(member["id"])
        assert row is not None
        changed = await set_consent(
            session,
            vendor,
            row,
            "marketing_email",
            False,
            source=ConsentSource.VENDOR_WEBHOOK,
            ip="203.0.113.9",
        )
        assert changed is True
        again = await set_consent(
            session, vendor, row, "marketing_email", False, source=ConsentSource.VENDOR_WEBHOOK
        )
        assert again is False
    fresh = (await api.get(f"{MEMBERS}/{member['id']}")).json()
    assert fresh["consent"]["marketing_email"] is False
    assert fresh["version"] == member["version"] + 1
    last = (await history(api, member["id"]))[-1]
    assert (last["purpose"], last["granted"], last["source"]) == (
        "marketing_email",
        False,
        "vendor_webhook",
    )
    assert (last["actor"], last["client_ip"]) == ("integration:int_mailchimp", "203.0.113.9")
    [event] = await consent_events(api, member["id"])
    assert event["source"] == "vendor_webhook"
    audit = await api.get("/api/v1/audit", params={"object_id": member["id"]})
    assert audit.status_code == 200, audit.text
    assert "member.update" in {entry["action"] for entry in audit.json()["data"]}


async def test_set_consent_refuses_an_unknown_purpose_or_source(
    api: ApiClient, db: Database
) -> None:
    member = await api.create_member()
    async with db.transaction() as session:
        row = await MemberRepository(session).get_by_public_id(member["id"])
        assert row is not None
        with pytest.raises(ValueError, match="purpose"):
            await set_consent(session, Actor.system(), row, "fax", True, source="api")
        with pytest.raises(ValueError, match="source"):
            await set_consent(session, Actor.system(), row, "crm", True, source="carrier-pigeon")


async def test_consent_column_selects_members_by_purpose(api: ApiClient, db: Database) -> None:
    await api.create_member(consent={"analytics": True})
    await api.create_member(consent={"analytics": False})
    async with db.transaction(read_only=True) as session:
        count = await session.scalar(
            select(func.count(Member.id)).where(consent_column("analytics").is_(True))
        )
    assert count == 1


async def test_history_pages_and_refuses_bad_input(api: ApiClient) -> None:
    member = await api.create_member(
        consent={"email": True, "sms": True, "crm": True, "analytics": True}
    )
    first = await api.get(f"{MEMBERS}/{member['id']}/consent-history", params={"limit": 3})
    assert first.status_code == 200
    body = first.json()
    assert len(body["data"]) == 3
    assert body["pagination"]["has_more"] is True
    rest = await history(api, member["id"], cursor=body["pagination"]["next_cursor"])
    assert len(rest) == 1
    missing = await api.get(f"{MEMBERS}/mem_doesnotexist/consent-history")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "MEMBER_NOT_FOUND"
    bad = await api.get(f"{MEMBERS}/{member['id']}/consent-history", params={"cursor": "!!"})
    assert bad.status_code == 422
    too_many = await api.get(f"{MEMBERS}/{member['id']}/consent-history", params={"limit": 0})
    assert too_many.status_code == 422


async def test_the_data_export_holds_the_consent_history(api: ApiClient) -> None:
    member = await api.create_member(consent={"crm": True})
    await api.patch(f"{MEMBERS}/{member['id']}", {"consent": {"crm": False}})
    document = (await api.get(f"{MEMBERS}/{member['id']}/export")).json()
    assert document["consent"]["crm"] is False
    rows = document["records"]["consent_changes"]
    assert [(row["purpose"], row["granted"]) for row in rows] == [("crm", True), ("crm", False)]


async def test_an_import_records_its_consent_changes_as_from_the_import(
    api: ApiClient, db: Database
) -> None:
    body = "email,consent_crm,consent_marketing_email\nkim@example.org,true,false\n"
    job = await post_import(api, body)
    await finished(api, db, job["id"])
    [member] = (await api.get(MEMBERS, params={"email": "kim@example.org"})).json()["data"]
    assert member["consent"]["crm"] is True
    assert granted(await history(api, member["id"])) == [("crm", True, "import")]

    again = await post_import(api, "email,consent_crm\nkim@example.org,false\n")
    await finished(api, db, again["id"])
    assert granted(await history(api, member["id"]))[-1] == ("crm", False, "import")
    [event] = await consent_events(api, member["id"])
    assert (event["purpose"], event["granted"], event["source"]) == ("crm", False, "import")
