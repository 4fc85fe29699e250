"""Members through the HTTP API: CRUD, list filters, uniqueness, ETags, merges, erasure."""

from __future__ import annotations

import asyncio
import unicodedata
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from memberhub.kit.db import Database
from memberhub.members.models import Member
from memberhub.settings import Settings
from tests.members.conftest import SetMemberColumns
from tests.support import ApiClient, unique
from tests.support_server import running_server

MEMBERS = "/api/v1/members"
# A to Z as full-width letters (U+FF21…), which an address may be typed in.
FULL_WIDTH = {code: code + 0xFEE0 for code in range(ord("A"), ord("Z") + 1)}


def ids(response_json: dict[str, Any]) -> list[str]:
    return [item["id"] for item in response_json["data"]]


async def list_ids(api: ApiClient, **params: Any) -> list[str]:
    response = await api.get(MEMBERS, params={"limit": 500, **params})
    assert response.status_code == 200, response.text
    assert response.json()["pagination"]["has_more"] is False
    return ids(response.json())


async def member_row(db: Database, public_id: str) -> Member:
    async with db.transaction(read_only=True) as session:
        member = await session.scalar(select(Member).where(Member.public_id == public_id))
        assert member is not None
        return member


async def events_of(api: ApiClient, member_id: str, event_type: str) -> list[dict[str, Any]]:
    response = await api.get(
        "/api/v1/events", params={"member_id": member_id, "type": event_type, "limit": 500}
    )
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


# ---------------------------------------------------------------- create / get / patch / delete


async def test_a_created_member_is_pending_and_returned_by_get_and_list(api: ApiClient) -> None:
    response = await api.post(
        MEMBERS,
        {
            "email": "Ana.Lim@Example.com",
            "first_name": "Ana",
            "last_name": "Lim",
            "phone": "+60 12-345 6789",
            "date_of_birth": "1990-02-03",
            "consent": {"email": True},
            "custom_fields": {"profession": "planner", "years": 7, "fellow": False},
            "external_ids": {"crm": "C-1"},
        },
    )
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["id"].startswith("mem_")
    assert response.headers["Location"] == f"{MEMBERS}/{created['id']}"
    assert response.headers["ETag"] == '"1"'
    assert created["status"] == "pending"
    assert created["email"] == "Ana.Lim@example.com"  # the domain is normalised, not the rest
    assert created["tier"] is None
    assert created["organisation_id"] is None
    assert created["consent"] == {
        "email": True,
        "sms": False,
        "analytics": False,
        "profiling": False,
        "crm": False,
        "marketing_email": False,
    }
    assert created["custom_fields"] == {"profession": "planner", "years": 7, "fellow": False}
    assert created["external_ids"] == {"crm": "C-1"}
    assert created["membership"] == {
        "plan_id": None,
        "member_since": None,
        "term_ends_at": None,
        "grace_ends_at": None,
        "cancel_at_period_end": False,
        "payment_status": None,
        "payment_updated_at": None,
    }
    assert created["version"] == 1

    fetched = await api.get(f"{MEMBERS}/{created['id']}")
    assert fetched.status_code == 200
    assert fetched.json() == created
    assert await list_ids(api) == [created["id"]]


async def test_a_created_member_emits_member_created(api: ApiClient) -> None:
    member = await api.create_member(first_name="Ana")
    events = await events_of(api, member["id"], "member.created")
    assert len(events) == 1
    assert events[0]["data"]["member"]["id"] == member["id"]
    assert events[0]["data"]["member"]["first_name"] == "Ana"


async def test_get_of_an_unknown_member_is_404(api: ApiClient) -> None:
    response = await api.get(f"{MEMBERS}/mem_doesnotexist")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "MEMBER_NOT_FOUND"


async def test_a_malformed_member_id_is_rejected_before_lookup(api: ApiClient) -> None:
    response = await api.get(f"{MEMBERS}/not-an-id")
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "VALIDATION_ERROR"


async def test_patch_changes_only_the_fields_sent(api: ApiClient) -> None:
    member = await api.create_member(first_name="Ana", last_name="Lim", phone="+6012345678")
    response = await api.patch(f"{MEMBERS}/{member['id']}", {"last_name": "Tan"})
    assert response.status_code == 200, response.text
    patched = response.json()
    assert patched["last_name"] == "Tan"
    assert patched["first_name"] == "Ana"
    assert patched["phone"] == "+6012345678"
    assert patched["email"] == member["email"]
    assert patched["version"] == 2
    assert (await api.get(f"{MEMBERS}/{member['id']}")).json() == patched


async def test_patch_with_null_clears_an_optional_field(api: ApiClient) -> None:
    member = await api.create_member(first_name="Ana", phone="+6012345678")
    response = await api.patch(f"{MEMBERS}/{member['id']}", {"phone": None})
    assert response.status_code == 200, response.text
    assert response.json()["phone"] is None
    assert response.json()["first_name"] == "Ana"


async def test_patch_emits_member_updated_with_the_changed_fields(api: ApiClient) -> None:
    member = await api.create_member(first_name="Ana")
    await api.patch(f"{MEMBERS}/{member['id']}", {"first_name": "Anna", "consent": {"sms": True}})
    events = await events_of(api, member["id"], "member.updated")
    assert len(events) == 1
    assert events[0]["data"]["changed_fields"] == ["consent_sms", "first_name"]
    assert events[0]["data"]["member"]["first_name"] == "Anna"


async def test_a_patch_that_changes_nothing_keeps_the_version_and_emits_nothing(
    api: ApiClient,
) -> None:
    member = await api.create_member(first_name="Ana")
    response = await api.patch(f"{MEMBERS}/{member['id']}", {"first_name": "Ana"})
    assert response.status_code == 200
    assert response.json()["version"] == 1
    assert response.json()["updated_at"] == member["updated_at"]
    assert await events_of(api, member["id"], "member.updated") == []


async def test_email_cannot_be_removed_by_patch(api: ApiClient) -> None:
    member = await api.create_member()
    response = await api.patch(f"{MEMBERS}/{member['id']}", {"email": None})
    assert response.status_code == 422
    assert "email cannot be null" in response.text
    assert (await api.get(f"{MEMBERS}/{member['id']}")).json()["email"] == member["email"]


async def test_patch_of_an_unknown_member_is_404(api: ApiClient) -> None:
    response = await api.patch(f"{MEMBERS}/mem_doesnotexist", {"first_name": "X"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "MEMBER_NOT_FOUND"


# ---------------------------------------------------------------- list filters


async def test_list_filters_by_status(api: ApiClient, set_member_columns: SetMemberColumns) -> None:
    pending = await api.create_member()
    active = await api.create_member()
    lapsed = await api.create_member()
    await set_member_columns(active["id"], status="active")
    await set_member_columns(lapsed["id"], status="lapsed")

    assert await list_ids(api, status="pending") == [pending["id"]]
    assert await list_ids(api, status="active") == [active["id"]]
    assert await list_ids(api, status="lapsed") == [lapsed["id"]]
    assert await list_ids(api, status="grace") == []


async def test_list_rejects_an_unknown_status(api: ApiClient) -> None:
    response = await api.get(MEMBERS, params={"status": "retired"})
    assert response.status_code == 422
    fields = response.json()["error"]["details"]["fields"]
    assert any(f["loc"] == ["query", "status"] for f in fields)


async def test_list_filters_by_tier(api: ApiClient, set_member_columns: SetMemberColumns) -> None:
    gold = await api.create_member()
    silver = await api.create_member()
    await api.create_member()  # no tier
    await set_member_columns(gold["id"], tier="gold")
    await set_member_columns(silver["id"], tier="silver")

    assert await list_ids(api, tier="gold") == [gold["id"]]
    assert await list_ids(api, tier="silver") == [silver["id"]]
    assert await list_ids(api, tier="platinum") == []
    assert (await api.get(f"{MEMBERS}/{gold['id']}")).json()["tier"] == "gold"


async def test_list_filters_by_organisation(api: ApiClient) -> None:
    north = await api.create_organisation()
    south = await api.create_organisation()
    in_north = await api.create_member(organisation_id=north["id"])
    in_south = await api.create_member(organisation_id=south["id"])
    await api.create_member()  # no organisation

    assert await list_ids(api, organisation_id=north["id"]) == [in_north["id"]]
    assert await list_ids(api, organisation_id=south["id"]) == [in_south["id"]]
    assert in_north["organisation_id"] == north["id"]


async def test_list_by_an_unknown_organisation_is_404(api: ApiClient) -> None:
    response = await api.get(MEMBERS, params={"organisation_id": "org_doesnotexist"})
    assert response.status_code == 404


async def test_list_filters_by_email_exactly_and_case_insensitively(api: ApiClient) -> None:
    ana = await api.create_member(email="Ana.Lim@Example.com")
    await api.create_member(email="ana.lim@example.community")
    await api.create_member(email="xana.lim@example.com")

    assert await list_ids(api, email="ana.lim@example.com") == [ana["id"]]
    assert await list_ids(api, email="ANA.LIM@EXAMPLE.COM") == [ana["id"]]
    assert await list_ids(api, email="  Ana.Lim@example.com ") == [ana["id"]]
    assert await list_ids(api, email="ana.lim@example") == []
    assert await list_ids(api, email="ana.lim") == []


async def test_q_searches_first_name_last_name_and_email_case_insensitively(
    api: ApiClient,
) -> None:
    by_first = await api.create_member(first_name="Rosalind", last_name="Tan", email="a@x.com")
    by_last = await api.create_member(first_name="Mei", last_name="Rosario", email="b@x.com")
    by_email = await api.create_member(first_name="Ho", email="rosa.ng@example.com")
    await api.create_member(first_name="Daniel", last_name="Ng", email="daniel@example.com")

    assert await list_ids(api, q="ROSA") == [by_first["id"], by_last["id"], by_email["id"]]
    assert await list_ids(api, q="rosar") == [by_last["id"]]
    assert await list_ids(api, q="ng@exa") == [by_email["id"]]
    assert await list_ids(api, q="Mei Ros") == [by_last["id"]]
    assert await list_ids(api, q="nobody") == []


@pytest.mark.parametrize("q", ["Élodie", "élodie", "ÉLODIE", "MÜLLER", "müller", "łukasz"])
async def test_q_folds_the_case_of_every_script(api: ApiClient, q: str) -> None:
    member = await api.create_member(first_name="Élodie", last_name="Müller Łukasz")
    await api.create_member(first_name="Elodie", last_name="Muller")
    assert await list_ids(api, q=q) == [member["id"]]


async def test_q_treats_percent_and_underscore_literally(api: ApiClient) -> None:
    percent = await api.create_member(first_name="100%", email="p@x.com")
    hundred = await api.create_member(first_name="1000", email="q@x.com")
    underscore = await api.create_member(email="a_b@example.com")
    lookalike = await api.create_member(email="axb@example.com")
    backslash = await api.create_member(last_name="Back\\slash", email="r@x.com")

    assert await list_ids(api, q="100%") == [percent["id"]]
    assert await list_ids(api, q="%") == [percent["id"]]
    assert await list_ids(api, q="a_b") == [underscore["id"]]
    assert await list_ids(api, q="_") == [underscore["id"]]
    assert await list_ids(api, q="\\") == [backslash["id"]]
    assert hundred["id"] not in await list_ids(api, q="100%")
    assert lookalike["id"] not in await list_ids(api, q="a_b")


async def test_list_filters_by_updated_since_inclusively(
    api: ApiClient, set_member_columns: SetMemberColumns
) -> None:
    old = await api.create_member()
    edge = await api.create_member()
    new = await api.create_member()
    await set_member_columns(old["id"], updated_at=datetime(2024, 1, 1, tzinfo=UTC))
    await set_member_columns(edge["id"], updated_at=datetime(2024, 6, 1, tzinfo=UTC))
    await set_member_columns(new["id"], updated_at=datetime(2024, 9, 1, tzinfo=UTC))

    assert await list_ids(api, updated_since="2024-06-01T00:00:00Z") == [edge["id"], new["id"]]
    assert await list_ids(api, updated_since="2024-06-01T00:00:01Z") == [new["id"]]
    # Offsets are honoured: 08:00+08:00 is midnight UTC.
    assert await list_ids(api, updated_since="2024-06-01T08:00:00+08:00") == [
        edge["id"],
        new["id"],
    ]
    assert await list_ids(api, updated_since="2025-01-01T00:00:00Z") == []


async def test_list_filters_by_a_half_open_created_range(
    api: ApiClient, set_member_columns: SetMemberColumns
) -> None:
    january = await api.create_member()
    february = await api.create_member()
    march = await api.create_member()
    await set_member_columns(january["id"], created_at=datetime(2024, 1, 15, tzinfo=UTC))
    await set_member_columns(february["id"], created_at=datetime(2024, 2, 1, tzinfo=UTC))
    await set_member_columns(march["id"], created_at=datetime(2024, 3, 1, tzinfo=UTC))

    feb_only = {"created_from": "2024-02-01T00:00:00Z", "created_to": "2024-03-01T00:00:00Z"}
    assert await list_ids(api, **feb_only) == [february["id"]]
    assert await list_ids(api, created_from="2024-02-01T00:00:00Z") == [
        february["id"],
        march["id"],
    ]
    assert await list_ids(api, created_to="2024-02-01T00:00:00Z") == [january["id"]]


async def test_list_filters_combine(api: ApiClient, set_member_columns: SetMemberColumns) -> None:
    match = await api.create_member(first_name="Siti")
    wrong_tier = await api.create_member(first_name="Siti")
    await api.create_member(first_name="Mei")
    await set_member_columns(match["id"], tier="gold", status="active")
    await set_member_columns(wrong_tier["id"], tier="silver", status="active")

    assert await list_ids(api, q="siti", tier="gold", status="active") == [match["id"]]


async def test_list_rejects_a_malformed_date_filter(api: ApiClient) -> None:
    response = await api.get(MEMBERS, params={"updated_since": "yesterday"})
    assert response.status_code == 422
    fields = response.json()["error"]["details"]["fields"]
    assert any(f["loc"] == ["query", "updated_since"] for f in fields)


# ---------------------------------------------------------------- duplicate emails


async def test_duplicate_email_is_409_case_insensitively_within_an_organisation(
    api: ApiClient,
) -> None:
    org = await api.create_organisation()
    await api.create_member(email="ana@example.com", organisation_id=org["id"])
    response = await api.post(MEMBERS, {"email": "ANA@Example.COM", "organisation_id": org["id"]})
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "DUPLICATE_EMAIL"
    assert error["details"] == {"field": "email"}
    assert len(await list_ids(api, organisation_id=org["id"])) == 1


async def test_duplicate_email_is_409_among_members_without_an_organisation(
    api: ApiClient,
) -> None:
    await api.create_member(email="ana@example.com")
    response = await api.post(MEMBERS, {"email": "Ana@example.com"})
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "DUPLICATE_EMAIL"


async def test_the_same_email_is_allowed_in_another_organisation(api: ApiClient) -> None:
    north = await api.create_organisation()
    south = await api.create_organisation()
    first = await api.create_member(email="ana@example.com", organisation_id=north["id"])
    second = await api.create_member(email="Ana@example.com", organisation_id=south["id"])
    unscoped = await api.create_member(email="ana@example.com")
    assert len({first["id"], second["id"], unscoped["id"]}) == 3
    assert await list_ids(api, email="ana@example.com") == [
        first["id"],
        second["id"],
        unscoped["id"],
    ]


async def test_patching_to_a_taken_email_is_409_and_changes_nothing(api: ApiClient) -> None:
    org = await api.create_organisation()
    await api.create_member(email="ana@example.com", organisation_id=org["id"])
    other = await api.create_member(email="mei@example.com", organisation_id=org["id"])
    response = await api.patch(
        f"{MEMBERS}/{other['id']}", {"email": "ANA@example.com", "first_name": "Mei"}
    )
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "DUPLICATE_EMAIL"
    assert (await api.get(f"{MEMBERS}/{other['id']}")).json() == other


async def test_patching_a_members_own_email_to_another_case_is_allowed(api: ApiClient) -> None:
    member = await api.create_member(email="ana@example.com")
    response = await api.patch(f"{MEMBERS}/{member['id']}", {"email": "ANA@example.com"})
    assert response.status_code == 200, response.text
    assert response.json()["email"] == "ANA@example.com"


async def test_moving_a_member_into_an_organisation_holding_its_email_is_409(
    api: ApiClient,
) -> None:
    north = await api.create_organisation()
    south = await api.create_organisation()
    await api.create_member(email="ana@example.com", organisation_id=north["id"])
    mover = await api.create_member(email="Ana@example.com", organisation_id=south["id"])
    response = await api.patch(f"{MEMBERS}/{mover['id']}", {"organisation_id": north["id"]})
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "DUPLICATE_EMAIL"
    assert (await api.get(f"{MEMBERS}/{mover['id']}")).json()["organisation_id"] == south["id"]


async def test_patching_to_an_email_used_only_in_another_organisation_is_allowed(
    api: ApiClient,
) -> None:
    north = await api.create_organisation()
    south = await api.create_organisation()
    await api.create_member(email="ana@example.com", organisation_id=north["id"])
    member = await api.create_member(email="mei@example.com", organisation_id=south["id"])
    response = await api.patch(f"{MEMBERS}/{member['id']}", {"email": "ana@example.com"})
    assert response.status_code == 200, response.text


# ---------------------------------------------------------------- ETag / If-Match


async def test_get_and_patch_carry_an_etag_naming_the_version(api: ApiClient) -> None:
    member = await api.create_member()
    fetched = await api.get(f"{MEMBERS}/{member['id']}")
    assert fetched.headers["ETag"] == '"1"'
    patched = await api.patch(f"{MEMBERS}/{member['id']}", {"first_name": "Ana"})
    assert patched.headers["ETag"] == '"2"'
    assert patched.json()["version"] == 2
    assert (await api.get(f"{MEMBERS}/{member['id']}")).headers["ETag"] == '"2"'


async def test_a_matching_if_match_succeeds_and_bumps_the_version(api: ApiClient) -> None:
    member = await api.create_member()
    etag = (await api.get(f"{MEMBERS}/{member['id']}")).headers["ETag"]
    response = await api.patch(
        f"{MEMBERS}/{member['id']}", {"first_name": "Ana"}, headers={"If-Match": etag}
    )
    assert response.status_code == 200, response.text
    assert response.json()["version"] == 2
    assert response.headers["ETag"] == '"2"'


async def test_a_weak_if_match_never_matches(api: ApiClient) -> None:
    member = await api.create_member()
    response = await api.patch(
        f"{MEMBERS}/{member['id']}", {"first_name": "Ana"}, headers={"If-Match": 'W/"1"'}
    )
    assert response.status_code == 412, response.text


async def test_an_if_match_list_matches_any_of_its_versions(api: ApiClient) -> None:
    member = await api.create_member()
    response = await api.patch(
        f"{MEMBERS}/{member['id']}", {"first_name": "Ana"}, headers={"If-Match": '"7", "1"'}
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "header", ['"²"'.encode("latin-1"), b'"1', b"1", b'"99999999999999999999"', b""]
)
async def test_a_malformed_if_match_is_412_not_an_error(api: ApiClient, header: bytes) -> None:
    member = await api.create_member(first_name="Ana")
    response = await api.http.patch(
        f"{MEMBERS}/{member['id']}",
        json={"first_name": "X"},
        headers={b"Authorization": f"Bearer {api.key}".encode(), b"If-Match": header},
    )
    assert response.status_code == 412, response.text
    assert response.json()["error"]["message"].startswith(
        'If-Match names no version of the member: send its ETag as given, such as "1"'
    )


async def test_a_stale_if_match_is_412_and_changes_nothing(api: ApiClient) -> None:
    member = await api.create_member(first_name="Ana")
    stale = (await api.get(f"{MEMBERS}/{member['id']}")).headers["ETag"]
    first = await api.patch(
        f"{MEMBERS}/{member['id']}", {"first_name": "Anna"}, headers={"If-Match": stale}
    )
    assert first.status_code == 200

    second = await api.patch(
        f"{MEMBERS}/{member['id']}", {"first_name": "Hannah"}, headers={"If-Match": stale}
    )
    assert second.status_code == 412
    error = second.json()["error"]
    assert error["code"] == "PRECONDITION_FAILED"
    assert error["details"] == {"current_version": 2, "if_match": [1]}

    current = (await api.get(f"{MEMBERS}/{member['id']}")).json()
    assert current["first_name"] == "Anna"
    assert current["version"] == 2
    assert len(await events_of(api, member["id"], "member.updated")) == 1


async def test_an_if_match_that_names_no_version_is_412(api: ApiClient) -> None:
    member = await api.create_member(first_name="Ana")
    response = await api.patch(
        f"{MEMBERS}/{member['id']}", {"first_name": "X"}, headers={"If-Match": '"abc"'}
    )
    assert response.status_code == 412
    assert (await api.get(f"{MEMBERS}/{member['id']}")).json()["first_name"] == "Ana"


# ---------------------------------------------------------------- merges and consent


async def test_custom_fields_merge_and_null_removes_a_key(api: ApiClient) -> None:
    member = await api.create_member(custom_fields={"a": 1, "b": "two", "c": True})
    response = await api.patch(
        f"{MEMBERS}/{member['id']}", {"custom_fields": {"b": None, "c": False, "d": "new"}}
    )
    assert response.status_code == 200, response.text
    assert response.json()["custom_fields"] == {"a": 1, "c": False, "d": "new"}
    stored = (await api.get(f"{MEMBERS}/{member['id']}")).json()["custom_fields"]
    assert stored == {"a": 1, "c": False, "d": "new"}


async def test_removing_an_absent_custom_field_is_a_no_op(api: ApiClient) -> None:
    member = await api.create_member(custom_fields={"a": 1})
    response = await api.patch(f"{MEMBERS}/{member['id']}", {"custom_fields": {"zzz": None}})
    assert response.status_code == 200
    assert response.json()["custom_fields"] == {"a": 1}
    assert response.json()["version"] == 1


async def test_external_ids_merge_and_null_removes_a_key(api: ApiClient) -> None:
    member = await api.create_member(external_ids={"crm": "C-1", "erp": "E-1"})
    response = await api.patch(
        f"{MEMBERS}/{member['id']}", {"external_ids": {"erp": None, "pos": "P-9", "crm": "C-2"}}
    )
    assert response.status_code == 200, response.text
    assert response.json()["external_ids"] == {"crm": "C-2", "pos": "P-9"}


async def test_consent_is_updated_partially(api: ApiClient) -> None:
    member = await api.create_member(consent={"email": True, "analytics": True})
    response = await api.patch(
        f"{MEMBERS}/{member['id']}", {"consent": {"sms": True, "analytics": False}}
    )
    assert response.status_code == 200, response.text
    assert response.json()["consent"] == {
        "email": True,
        "sms": True,
        "analytics": False,
        "profiling": False,
        "crm": False,
        "marketing_email": False,
    }


async def test_a_null_consent_flag_is_refused_and_changes_nothing(api: ApiClient) -> None:
    member = await api.create_member(consent={"email": True})
    body = {"first_name": "Ana", "consent": {"email": None, "sms": True}}
    response = await api.patch(f"{MEMBERS}/{member['id']}", body)
    assert response.status_code == 422
    assert "email cannot be null" in response.text
    after = (await api.get(f"{MEMBERS}/{member['id']}")).json()
    assert (after["first_name"], after["consent"]["email"], after["consent"]["sms"]) == (
        member["first_name"],
        True,
        False,
    )


async def test_a_plan_setting_it_always_has_cannot_be_cleared(api: ApiClient) -> None:
    plan = await api.create_plan()
    response = await api.patch(f"/api/v1/plans/{plan['id']}", {"name": None, "active": None})
    assert response.status_code == 422
    assert "cannot be null" in response.text
    assert (await api.get(f"/api/v1/plans/{plan['id']}")).json()["name"] == plan["name"]


# ---------------------------------------------------------------- validation


def _field_locs(body: dict[str, Any]) -> list[list[str]]:
    assert body["error"]["code"] == "VALIDATION_ERROR"
    return [f["loc"] for f in body["error"]["details"]["fields"]]


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"email": "not-an-email"}, ["body", "email"]),
        ({}, ["body", "email"]),
        ({"email": "a@example.com", "first_name": ""}, ["body", "first_name"]),
        ({"email": "a@example.com", "first_name": "x" * 101}, ["body", "first_name"]),
        ({"email": "a@example.com", "phone": "call me"}, ["body", "phone"]),
        ({"email": "a@example.com", "date_of_birth": "1990-13-01"}, ["body", "date_of_birth"]),
        ({"email": "a@example.com", "date_of_birth": "2099-01-01"}, ["body", "date_of_birth"]),
        ({"email": "a@example.com", "date_of_birth": "1850-06-01"}, ["body", "date_of_birth"]),
        ({"email": "a@example.com", "nickname": "x"}, ["body", "nickname"]),
        ({"email": "a@example.com", "consent": {"fax": True}}, ["body", "consent", "fax"]),
        ({"email": "a@example.com", "custom_fields": {"1bad": 1}}, ["body", "custom_fields"]),
        (
            {"email": "a@example.com", "custom_fields": {"big": 2**60}},
            ["body", "custom_fields"],
        ),
        (
            {"email": "a@example.com", "custom_fields": {"nested": {"a": 1}}},
            ["body", "custom_fields", "nested"],
        ),
        ({"email": "a@example.com", "external_ids": {"CRM": "1"}}, ["body", "external_ids"]),
        ({"email": "a@example.com", "external_ids": {"crm": ""}}, ["body", "external_ids"]),
    ],
    ids=[
        "bad-email",
        "missing-email",
        "empty-first-name",
        "long-first-name",
        "bad-phone",
        "bad-date",
        "birth-in-the-future",
        "birth-before-1900",
        "unknown-field",
        "unknown-consent",
        "bad-custom-key",
        "unsafe-integer",
        "nested-custom-value",
        "bad-external-system",
        "empty-external-id",
    ],
)
async def test_invalid_create_is_422_naming_the_field(
    api: ApiClient, body: dict[str, Any], loc: list[str]
) -> None:
    response = await api.post(MEMBERS, body)
    assert response.status_code == 422, response.text
    locs = _field_locs(response.json())
    assert any(found[: len(loc)] == loc for found in locs), locs
    assert await list_ids(api) == []


async def test_more_than_fifty_custom_fields_is_422(api: ApiClient) -> None:
    response = await api.post(
        MEMBERS,
        {"email": "a@example.com", "custom_fields": {f"f{i}": i for i in range(51)}},
    )
    assert response.status_code == 422
    assert ["body", "custom_fields"] in _field_locs(response.json())


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"email": "nope"}, ["body", "email"]),
        ({"last_name": ""}, ["body", "last_name"]),
        ({"consent": {"email": "maybe"}}, ["body", "consent", "email"]),
        ({"version": 7}, ["body", "version"]),
        ({"status": "active"}, ["body", "status"]),
    ],
    ids=["bad-email", "empty-last-name", "non-bool-consent", "version", "status"],
)
async def test_invalid_patch_is_422_and_changes_nothing(
    api: ApiClient, body: dict[str, Any], loc: list[str]
) -> None:
    member = await api.create_member(last_name="Lim")
    response = await api.patch(f"{MEMBERS}/{member['id']}", body)
    assert response.status_code == 422, response.text
    locs = _field_locs(response.json())
    assert any(found[: len(loc)] == loc for found in locs), locs
    assert (await api.get(f"{MEMBERS}/{member['id']}")).json() == member


# ---------------------------------------------------------------- delete (anonymise)


async def test_delete_erases_personal_data_but_keeps_the_row(api: ApiClient, db: Database) -> None:
    org = await api.create_organisation()
    member = await api.create_member(
        email="ana@example.com",
        first_name="Ana",
        last_name="Lim",
        phone="+6012345678",
        date_of_birth="1990-02-03",
        organisation_id=org["id"],
        consent={"email": True, "sms": True},
        custom_fields={"profession": "planner"},
        external_ids={"crm": "C-1"},
    )
    response = await api.delete(f"{MEMBERS}/{member['id']}")
    assert response.status_code == 204
    assert response.content == b""

    row = await member_row(db, member["id"])
    assert row.email is None
    assert row.email_normalized is None
    assert row.first_name is None
    assert row.last_name is None
    assert row.phone is None
    assert row.date_of_birth is None
    assert row.custom_fields == {}
    assert row.external_ids == {}
    assert row.consent_email is False
    assert row.consent_sms is False
    assert row.deleted_at is not None
    assert row.organisation_id is not None  # references stay intact


async def test_delete_emits_member_deleted(api: ApiClient) -> None:
    org = await api.create_organisation()
    member = await api.create_member(organisation_id=org["id"])
    await api.delete(f"{MEMBERS}/{member['id']}")
    events = await events_of(api, member["id"], "member.deleted")
    assert len(events) == 1
    data = events[0]["data"]
    assert data["member_id"] == member["id"]
    assert data["organisation_id"] == org["id"]
    assert data["deleted_at"]
    assert member["email"] not in str(data)


async def test_a_deleted_member_is_gone_from_the_api(api: ApiClient) -> None:
    member = await api.create_member(first_name="Ana")
    kept = await api.create_member()
    await api.delete(f"{MEMBERS}/{member['id']}")

    assert (await api.get(f"{MEMBERS}/{member['id']}")).status_code == 404
    assert (await api.patch(f"{MEMBERS}/{member['id']}", {"first_name": "X"})).status_code == 404
    assert (await api.delete(f"{MEMBERS}/{member['id']}")).status_code == 404
    assert await list_ids(api) == [kept["id"]]
    assert await list_ids(api, q="ana") == []


async def test_a_deleted_members_email_can_be_reused(api: ApiClient) -> None:
    org = await api.create_organisation()
    member = await api.create_member(email="ana@example.com", organisation_id=org["id"])
    await api.delete(f"{MEMBERS}/{member['id']}")
    again = await api.create_member(email="Ana@example.com", organisation_id=org["id"])
    assert again["id"] != member["id"]
    assert await list_ids(api, email="ana@example.com") == [again["id"]]


async def test_delete_of_an_unknown_member_is_404(api: ApiClient) -> None:
    response = await api.delete(f"{MEMBERS}/mem_doesnotexist")
    assert response.status_code == 404


async def test_members_are_listed_in_creation_order(api: ApiClient) -> None:
    created = [(await api.create_member(email=f"{unique('o')}@x.com"))["id"] for _ in range(5)]
    assert await list_ids(api) == created


async def test_delete_erases_the_profile_from_earlier_member_events(api: ApiClient) -> None:
    member = await api.create_member(email="erase.me@example.com", first_name="Erin")
    patched = await api.patch(f"/api/v1/members/{member['id']}", {"last_name": "Gone"})
    assert patched.status_code == 200

    assert (await api.delete(f"/api/v1/members/{member['id']}")).status_code == 204

    events = await api.get(
        "/api/v1/events",
        params={"member_id": member["id"], "type": ["member.created", "member.updated"]},
    )
    assert [e["type"] for e in events.json()["data"]] == ["member.created", "member.updated"]
    for event in events.json()["data"]:
        assert event["data"]["member"]["email"] is None
        assert event["data"]["member"]["first_name"] is None
        assert "erase.me" not in str(event)
    updated = events.json()["data"][1]
    assert updated["data"]["changed_fields"] == ["last_name"]


async def test_concurrent_creates_of_one_email_make_one_member(
    api: ApiClient, admin_key: str, settings: Settings
) -> None:
    emails = [f"{case}@example.com" for case in ("ana", "ANA", "Ana", "aNa")] * 5
    headers = {"Authorization": f"Bearer {admin_key}"}
    async with running_server(settings) as base_url:
        limits = httpx.Limits(max_connections=len(emails))
        async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
            responses = await asyncio.gather(
                *(client.post(MEMBERS, json={"email": e}, headers=headers) for e in emails)
            )
    assert Counter(r.status_code for r in responses) == {201: 1, 409: 19}, [
        r.text for r in responses if r.status_code >= 500
    ]
    assert {r.json()["error"]["code"] for r in responses if r.status_code == 409} == {
        "DUPLICATE_EMAIL"
    }
    assert len(await list_ids(api, email="ana@example.com")) == 1
    created = (await api.get("/api/v1/events", params={"type": "member.created"})).json()
    assert len(created["data"]) == 1


@pytest.mark.parametrize(
    "email",
    [
        "kim@xn--bcher-kva.de",  # an IDN domain in its ASCII form
        "ana@" + "EXAMPLE".translate(FULL_WIDTH) + ".com",  # full-width letters
        unicodedata.normalize("NFD", "josé@example.com"),  # accents as macOS writes them
    ],
)
async def test_the_email_filter_finds_a_member_by_the_address_it_was_created_with(
    api: ApiClient, email: str
) -> None:
    created = await api.post(MEMBERS, {"email": email})
    assert created.status_code == 201, created.text
    # The same address again is a duplicate: the two are one address.
    assert (await api.post(MEMBERS, {"email": email})).status_code == 409
    found = await api.get(MEMBERS, params={"email": email})
    assert found.status_code == 200, found.text
    assert [m["id"] for m in found.json()["data"]] == [created.json()["id"]]


async def test_a_null_custom_field_on_a_new_member_sets_nothing(api: ApiClient) -> None:
    response = await api.post(
        MEMBERS, {"email": "n@example.com", "custom_fields": {"gone": None, "kept": 1}}
    )
    assert response.status_code == 201, response.text
    assert response.json()["custom_fields"] == {"kept": 1}


_PHONES_WITHOUT_A_NUMBER = ["--- ()", "+ ( ) / .", "1-2", "(1) - -"]


def _phone_refused(response: Any) -> None:
    assert response.status_code == 422, response.text
    (field,) = response.json()["error"]["details"]["fields"]
    assert field["loc"] == ["body", "phone"], field
    assert field["message"] == "A phone number needs at least 3 digits.", field


@pytest.mark.parametrize("phone", _PHONES_WITHOUT_A_NUMBER)
async def test_a_phone_of_punctuation_alone_is_refused_on_create_and_update(
    api: ApiClient, phone: str
) -> None:
    _phone_refused(await api.post(MEMBERS, {"email": "a@example.com", "phone": phone}))
    member = await api.create_member(phone="+60 12-345 6789")
    _phone_refused(await api.patch(f"{MEMBERS}/{member['id']}", {"phone": phone}))
    fetched = (await api.get(f"{MEMBERS}/{member['id']}")).json()
    assert fetched["phone"] == "+60 12-345 6789"


async def test_a_short_number_is_a_phone(api: ApiClient) -> None:
    member = await api.create_member(phone="112")
    assert member["phone"] == "112"
