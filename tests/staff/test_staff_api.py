"""Staff accounts over the API: admins only, with the visibility rules of org-bound keys."""

from __future__ import annotations

from memberhub.auth.roles import Role
from memberhub.kit.db import Database
from tests.conftest import issue_key
from tests.support import ApiClient

STAFF = "/api/v1/staff"


async def test_an_admin_creates_a_staff_user_and_gets_a_one_time_password(
    api: ApiClient,
) -> None:
    created = await api.post(STAFF, {"email": "Ana@Example.org", "name": "Ana", "role": "manager"})
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["id"].startswith("stf_")
    assert body["email"] == "ana@example.org"
    assert len(body["one_time_password"]) >= 12
    assert (body["role"], body["active"], body["totp_enabled"]) == ("manager", True, False)
    fetched = (await api.get(f"{STAFF}/{body['id']}")).json()
    assert "one_time_password" not in fetched
    assert [s["id"] for s in (await api.get(STAFF)).json()["data"]] == [body["id"]]


async def test_a_given_password_is_not_returned(api: ApiClient) -> None:
    created = await api.post(
        STAFF, {"email": "b@example.org", "name": "B", "role": "admin", "password": "x" * 12}
    )
    assert created.status_code == 201, created.text
    assert created.json()["one_time_password"] is None


async def test_bad_staff_input_is_refused_and_changes_nothing(api: ApiClient) -> None:
    for payload in (
        {"email": "not-an-email", "name": "A", "role": "admin"},
        {"email": "a@example.org", "name": "A", "role": "integration"},
        {"email": "a@example.org", "name": "A", "role": "admin", "password": "short"},
        {"email": "a@example.org", "name": "A", "role": "admin", "extra": 1},
        {"email": "a@example.org", "name": "A", "role": "admin", "organisation_id": "org_nope"},
    ):
        refused = await api.post(STAFF, payload)
        assert 400 <= refused.status_code < 500, (payload, refused.text)
        assert "error" in refused.json()
    assert (await api.get(STAFF)).json()["data"] == []


async def test_a_second_account_with_the_same_email_conflicts(api: ApiClient) -> None:
    payload = {"email": "a@example.org", "name": "A", "role": "admin"}
    assert (await api.post(STAFF, payload)).status_code == 201
    again = await api.post(STAFF, {**payload, "email": "A@EXAMPLE.ORG"})
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "DUPLICATE_STAFF_EMAIL"


async def test_staff_management_is_for_admins_only(api: ApiClient, db: Database) -> None:
    manager = api.with_key(await issue_key(db, Role.MANAGER))
    refused = await manager.post(STAFF, {"email": "a@example.org", "name": "A", "role": "admin"})
    assert refused.status_code == 403
    assert refused.json()["error"]["details"]["required_scope"] == "staff:write"
    assert (await manager.get(STAFF)).status_code == 403


async def test_a_key_narrowed_to_staff_management_gives_no_role_more_than_it_holds(
    api: ApiClient, db: Database
) -> None:
    narrowed = api.with_key(await issue_key(db, Role.ADMIN, scopes=["staff:write", "staff:read"]))
    body = {"email": "boss@example.org", "name": "Boss", "role": "admin", "password": "x" * 16}
    refused = await narrowed.post(STAFF, body)
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["code"] == "SCOPES_NOT_HELD"
    assert (await api.get(STAFF)).json()["data"] == []
    # Nor raise an account made by a full admin to a role above the key's scopes.
    made = await api.post(STAFF, {**body, "role": "support_agent"})
    assert made.status_code == 201, made.text
    raised = await narrowed.patch(f"{STAFF}/{made.json()['id']}", {"role": "admin"})
    assert raised.status_code == 403, raised.text
    assert (await api.get(f"{STAFF}/{made.json()['id']}")).json()["role"] == "support_agent"


async def test_an_org_bound_admin_manages_staff_of_its_organisations_only(
    api: ApiClient, db: Database
) -> None:
    hq = (await api.create_organisation())["id"]
    other = (await api.create_organisation())["id"]
    bound = api.with_key(await issue_key(db, Role.ADMIN, organisation=hq))
    unbound = await bound.post(STAFF, {"email": "a@example.org", "name": "A", "role": "admin"})
    assert unbound.status_code == 403
    elsewhere = await bound.post(
        STAFF, {"email": "a@example.org", "name": "A", "role": "admin", "organisation_id": other}
    )
    assert elsewhere.status_code == 404
    mine = await bound.post(
        STAFF, {"email": "a@example.org", "name": "A", "role": "admin", "organisation_id": hq}
    )
    assert mine.status_code == 201, mine.text
    theirs = await api.post(
        STAFF, {"email": "b@example.org", "name": "B", "role": "admin", "organisation_id": other}
    )
    assert (await bound.get(f"{STAFF}/{theirs.json()['id']}")).status_code == 404
    assert [s["id"] for s in (await bound.get(STAFF)).json()["data"]] == [mine.json()["id"]]


async def test_updating_a_staff_user_is_audited(api: ApiClient) -> None:
    created = (
        await api.post(STAFF, {"email": "a@example.org", "name": "A", "role": "admin"})
    ).json()
    updated = await api.patch(
        f"{STAFF}/{created['id']}", {"role": "support_agent", "active": False}
    )
    assert updated.status_code == 200, updated.text
    assert (updated.json()["role"], updated.json()["active"]) == ("support_agent", False)
    audit = (await api.get("/api/v1/audit")).json()["data"]
    actions = [e["action"] for e in audit if e["object_id"] == created["id"]]
    assert actions == ["staff.create", "staff.update"] or actions == [
        "staff.update",
        "staff.create",
    ]
