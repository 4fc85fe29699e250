"""API keys: authentication (401), role and scope checks (403), organisation scoping, and
how keys are stored."""

from __future__ import annotations

import hashlib
from typing import Any

import httpx
import pytest
from sqlalchemy import select, text

from memberhub.audit.models import AuditEntry
from memberhub.auth import keys
from memberhub.auth.models import ApiKey
from memberhub.auth.roles import Role
from memberhub.auth.service import create_api_key, revoke_api_key
from memberhub.kit.actor import Actor
from memberhub.kit.db import Database
from memberhub.kit.errors import ValidationFailed
from tests.auth.conftest import OrgTree
from tests.conftest import issue_key
from tests.support import ApiClient

PROTECTED = [
    ("GET", "/api/v1/members"),
    ("POST", "/api/v1/members"),
    ("GET", "/api/v1/events"),
    ("GET", "/api/v1/audit"),
    ("GET", "/api/v1/plans"),
]


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The response is an error of the documented shape, with this status and code."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert {"code", "message", "details"} <= set(error)
    assert error["code"] == code
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error["details"], dict)
    return dict(error)


async def key_row(db: Database, secret: str) -> ApiKey:
    prefix = keys.lookup_prefix(secret)
    assert prefix is not None
    async with db.transaction(read_only=True) as session:
        row = await session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    assert row is not None
    return row


# --- 401: who is calling? -------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), PROTECTED)
async def test_missing_key_gets_401(http: httpx.AsyncClient, method: str, path: str) -> None:
    response = await http.request(method, path, json={} if method == "POST" else None)
    error = assert_error(response, 401, "MISSING_API_KEY")
    assert "retry_after" not in error


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Token mh_abcdefghijklmnopqrstuvwxyz",
        "mh_abcdefghijklmnopqrstuvwxyz0123456789",
    ],
)
async def test_authorization_header_without_bearer_key_gets_401(
    http: httpx.AsyncClient, authorization: str
) -> None:
    response = await http.get("/api/v1/members", headers={"Authorization": authorization})
    assert_error(response, 401, "MISSING_API_KEY")


@pytest.mark.parametrize(
    "credential",
    [
        "not-a-key",
        "mh_short",
        "mh_" + "x" * 300,
        "MH_abcdefghijklmnopqrstuvwxyz0123456789",
        "mh_abc def ghi jkl mno pqr",
    ],
)
async def test_malformed_key_gets_401(http: httpx.AsyncClient, credential: str) -> None:
    response = await http.get("/api/v1/members", headers={"Authorization": f"Bearer {credential}"})
    assert_error(response, 401, "INVALID_API_KEY")


async def test_unknown_key_gets_401(http: httpx.AsyncClient, admin_key: str) -> None:
    never_issued = keys.generate_key()
    response = await http.get(
        "/api/v1/members", headers={"Authorization": f"Bearer {never_issued}"}
    )
    assert_error(response, 401, "INVALID_API_KEY")


async def test_key_with_a_known_prefix_but_wrong_secret_gets_401(
    http: httpx.AsyncClient, admin_key: str
) -> None:
    prefix = keys.lookup_prefix(admin_key)
    assert prefix is not None
    forged = prefix + ("A" if admin_key[len(prefix)] != "A" else "B") + admin_key[len(prefix) + 1 :]
    response = await http.get("/api/v1/members", headers={"Authorization": f"Bearer {forged}"})
    assert_error(response, 401, "INVALID_API_KEY")


async def test_revoked_key_gets_401(db: Database, api: ApiClient) -> None:
    secret = await issue_key(db, Role.MANAGER)
    client = api.with_key(secret)
    assert (await client.get("/api/v1/members")).status_code == 200

    row = await key_row(db, secret)
    async with db.transaction() as session:
        await revoke_api_key(session, Actor.system("test"), row.public_id)

    assert_error(await client.get("/api/v1/members"), 401, "API_KEY_REVOKED")
    assert_error(
        await client.post("/api/v1/members", {"email": "after-revoke@example.com"}),
        401,
        "API_KEY_REVOKED",
    )
    # Nothing was created with the revoked key.
    listed = await api.get("/api/v1/members", params={"email": "after-revoke@example.com"})
    assert listed.json()["data"] == []


async def test_valid_key_is_accepted_with_any_case_of_bearer(
    http: httpx.AsyncClient, admin_key: str
) -> None:
    response = await http.get("/api/v1/members", headers={"Authorization": f"bearer {admin_key}"})
    assert response.status_code == 200, response.text


# --- 403: role and scopes -------------------------------------------------------------


async def test_support_agent_cannot_create_plans(db: Database, api: ApiClient) -> None:
    agent = api.with_key(await issue_key(db, Role.SUPPORT_AGENT))
    response = await agent.post(
        "/api/v1/plans",
        {"code": "GOLD", "name": "Gold", "term_months": 12, "price_amount": 1, "currency": "MYR"},
    )
    error = assert_error(response, 403, "FORBIDDEN")
    assert error["details"]["required_scope"] == "plans:write"
    assert (await api.get("/api/v1/plans")).json()["data"] == []


async def test_support_agent_cannot_read_the_audit_log(db: Database, api: ApiClient) -> None:
    agent = api.with_key(await issue_key(db, Role.SUPPORT_AGENT))
    error = assert_error(await agent.get("/api/v1/audit"), 403, "FORBIDDEN")
    assert error["details"]["required_scope"] == "audit:read"


async def test_support_agent_cannot_delete_a_member(db: Database, api: ApiClient) -> None:
    member = await api.create_member()
    agent = api.with_key(await issue_key(db, Role.SUPPORT_AGENT))

    assert_error(await agent.delete(f"/api/v1/members/{member['id']}"), 403, "FORBIDDEN")

    still_there = await api.get(f"/api/v1/members/{member['id']}")
    assert still_there.status_code == 200
    assert still_there.json()["email"] == member["email"]


async def test_support_agent_may_do_what_its_role_grants(db: Database, api: ApiClient) -> None:
    agent = api.with_key(await issue_key(db, Role.SUPPORT_AGENT))
    created = await agent.post("/api/v1/members", {"email": "agent-made@example.com"})
    assert created.status_code == 201, created.text
    assert (await agent.get(f"/api/v1/members/{created.json()['id']}")).status_code == 200


async def test_key_with_narrowed_scopes_gets_403_outside_them(db: Database, api: ApiClient) -> None:
    narrowed = api.with_key(await issue_key(db, Role.MANAGER, scopes=["members:read"]))

    assert (await narrowed.get("/api/v1/members")).status_code == 200
    error = assert_error(
        await narrowed.post("/api/v1/members", {"email": "n@example.com"}), 403, "FORBIDDEN"
    )
    assert error["details"]["required_scope"] == "members:write"
    # The manager role grants events:read, but this key was narrowed below it.
    assert_error(await narrowed.get("/api/v1/events"), 403, "FORBIDDEN")
    assert (await api.get("/api/v1/members")).json()["data"] == []


async def test_a_key_cannot_be_given_scopes_beyond_its_role(db: Database) -> None:
    async with db.transaction() as session:
        with pytest.raises(ValidationFailed) as raised:
            await create_api_key(
                session,
                Actor.system("test"),
                name="too-wide",
                role=Role.SUPPORT_AGENT,
                scopes=["audit:read"],
            )
    assert raised.value.details == {"scopes": ["audit:read"]}


# --- organisation scoping -------------------------------------------------------------


async def listed_member_ids(client: ApiClient) -> set[str]:
    response = await client.get("/api/v1/members", params={"limit": 500})
    assert response.status_code == 200, response.text
    return {m["id"] for m in response.json()["data"]}


async def test_key_bound_to_a_chapter_sees_only_that_chapters_members(
    db: Database, api: ApiClient, org_tree: OrgTree
) -> None:
    chapter_key = api.with_key(await issue_key(db, Role.MANAGER, organisation=org_tree.chapter_a))

    assert await listed_member_ids(chapter_key) == {org_tree.member_a}
    assert (await chapter_key.get(f"/api/v1/members/{org_tree.member_a}")).status_code == 200


async def test_key_bound_to_hq_sees_hq_and_its_chapters_members(
    db: Database, api: ApiClient, org_tree: OrgTree
) -> None:
    hq_key = api.with_key(await issue_key(db, Role.MANAGER, organisation=org_tree.hq))

    assert await listed_member_ids(hq_key) == {
        org_tree.member_hq,
        org_tree.member_a,
        org_tree.member_b,
    }
    for member_id in (org_tree.member_hq, org_tree.member_a, org_tree.member_b):
        assert (await hq_key.get(f"/api/v1/members/{member_id}")).status_code == 200


async def test_installation_wide_key_sees_every_member(api: ApiClient, org_tree: OrgTree) -> None:
    assert await listed_member_ids(api) == {
        org_tree.member_hq,
        org_tree.member_a,
        org_tree.member_b,
        org_tree.member_other,
        org_tree.member_unassigned,
    }


async def test_bound_key_gets_404_for_members_of_another_organisation(
    db: Database, api: ApiClient, org_tree: OrgTree
) -> None:
    chapter_key = api.with_key(await issue_key(db, Role.MANAGER, organisation=org_tree.chapter_a))

    # A sibling chapter, the parent HQ, an unrelated HQ and a member with no organisation.
    for member_id in (
        org_tree.member_b,
        org_tree.member_hq,
        org_tree.member_other,
        org_tree.member_unassigned,
    ):
        assert_error(await chapter_key.get(f"/api/v1/members/{member_id}"), 404, "MEMBER_NOT_FOUND")
        assert_error(
            await chapter_key.patch(f"/api/v1/members/{member_id}", {"first_name": "X"}),
            404,
            "MEMBER_NOT_FOUND",
        )
        assert_error(
            await chapter_key.delete(f"/api/v1/members/{member_id}"), 404, "MEMBER_NOT_FOUND"
        )

    # Nothing was changed by the refused writes.
    for member_id in (org_tree.member_b, org_tree.member_other):
        member = (await api.get(f"/api/v1/members/{member_id}")).json()
        assert member["first_name"] is None
        assert member["email"] is not None


async def test_bound_key_gets_403_creating_a_member_in_another_organisation(
    db: Database, api: ApiClient, org_tree: OrgTree
) -> None:
    chapter_key = api.with_key(await issue_key(db, Role.MANAGER, organisation=org_tree.chapter_a))

    for target in (org_tree.chapter_b, org_tree.hq, org_tree.other_hq):
        response = await chapter_key.post(
            "/api/v1/members",
            {"email": f"intruder-{target}@example.com", "organisation_id": target},
        )
        assert_error(response, 403, "FORBIDDEN")

    everyone = (await api.get("/api/v1/members", params={"q": "intruder"})).json()["data"]
    assert everyone == []


async def test_bound_key_creates_members_in_its_own_organisation_by_default(
    db: Database, api: ApiClient, org_tree: OrgTree
) -> None:
    chapter_key = api.with_key(await issue_key(db, Role.MANAGER, organisation=org_tree.chapter_a))
    hq_key = api.with_key(await issue_key(db, Role.MANAGER, organisation=org_tree.hq))

    defaulted = await chapter_key.post("/api/v1/members", {"email": "own@example.com"})
    assert defaulted.status_code == 201, defaulted.text
    assert defaulted.json()["organisation_id"] == org_tree.chapter_a

    in_chapter = await hq_key.post(
        "/api/v1/members", {"email": "hq-made@example.com", "organisation_id": org_tree.chapter_b}
    )
    assert in_chapter.status_code == 201, in_chapter.text
    assert in_chapter.json()["organisation_id"] == org_tree.chapter_b


async def test_bound_key_event_list_excludes_other_organisations(
    db: Database, api: ApiClient, org_tree: OrgTree
) -> None:
    chapter_key = api.with_key(await issue_key(db, Role.MANAGER, organisation=org_tree.chapter_a))
    hq_key = api.with_key(await issue_key(db, Role.MANAGER, organisation=org_tree.hq))

    chapter_events = await chapter_key.get("/api/v1/events", params={"limit": 500})
    assert chapter_events.status_code == 200, chapter_events.text
    assert {e["member_id"] for e in chapter_events.json()["data"]} == {org_tree.member_a}

    hq_events = (await hq_key.get("/api/v1/events", params={"limit": 500})).json()["data"]
    assert {e["member_id"] for e in hq_events} == {
        org_tree.member_hq,
        org_tree.member_a,
        org_tree.member_b,
    }

    # Asking for another organisation's member explicitly yields nothing, too.
    filtered = await chapter_key.get("/api/v1/events", params={"member_id": org_tree.member_b})
    assert filtered.status_code == 200
    assert filtered.json()["data"] == []

    # A single event of another organisation is a 404, not a leak.
    all_events = (await api.get("/api/v1/events", params={"limit": 500})).json()["data"]
    foreign = next(e for e in all_events if e["member_id"] == org_tree.member_other)
    assert_error(await chapter_key.get(f"/api/v1/events/{foreign['id']}"), 404, "NOT_FOUND")


async def test_bound_key_gets_404_filtering_members_by_another_organisation(
    db: Database, api: ApiClient, org_tree: OrgTree
) -> None:
    chapter_key = api.with_key(await issue_key(db, Role.MANAGER, organisation=org_tree.chapter_a))
    response = await chapter_key.get(
        "/api/v1/members", params={"organisation_id": org_tree.chapter_b}
    )
    # Another organisation is hidden from the key: it does not exist as far as it knows.
    assert_error(response, 404, "NOT_FOUND")


# --- key storage ----------------------------------------------------------------------


async def test_api_key_is_stored_only_as_prefix_and_sha256_digest(
    db: Database, admin_key: str
) -> None:
    secret = await issue_key(db, Role.INTEGRATION, rate_limit="5/second")
    row = await key_row(db, secret)

    assert row.prefix == secret[: len(keys.KEY_PREFIX) + 12]
    assert row.key_hash == hashlib.sha256(secret.encode()).hexdigest()

    # No column of any key row (nor any audit entry) holds a raw key, or its unstored part.
    async with db.transaction(read_only=True) as session:
        raw_rows = (await session.execute(text("SELECT * FROM api_keys"))).all()
        audit_rows = (await session.scalars(select(AuditEntry))).all()
    assert len(raw_rows) == 2
    stored = " ".join(str(value) for raw in raw_rows for value in raw)
    stored += " ".join(str(entry.changes) for entry in audit_rows)
    for issued in (secret, admin_key):
        assert issued not in stored
        assert issued[len(row.prefix) :] not in stored
