"""API keys over the API: the secret once, listing without secrets, revocation."""

from __future__ import annotations

from memberhub.auth.roles import Role
from memberhub.kit.db import Database
from tests.conftest import issue_key
from tests.support import ApiClient

KEYS = "/api/v1/api-keys"


async def test_a_key_created_over_the_api_works_and_is_listed_without_its_secret(
    api: ApiClient,
) -> None:
    created = await api.post(
        KEYS,
        {
            "name": "shop",
            "role": "support_agent",
            "scopes": ["members:read"],
            "rate_limit": "100/minute",
        },
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["secret"].startswith("mh_")
    assert (body["scopes"], body["rate_limit"]) == (["members:read"], "100/minute")
    shop = api.with_key(body["secret"])
    answered = await shop.get("/api/v1/members")
    assert answered.status_code == 200
    assert answered.headers["RateLimit-Limit"] == "100"
    assert (await shop.get("/api/v1/points/transactions")).status_code == 403
    listed = (await api.get(KEYS)).json()["data"]
    assert body["id"] in [k["id"] for k in listed]
    assert all("secret" not in k for k in listed)


async def test_a_revoked_key_is_refused_and_cannot_be_revoked_twice(api: ApiClient) -> None:
    created = (await api.post(KEYS, {"name": "tmp", "role": "integration"})).json()
    revoked = await api.post(f"{KEYS}/{created['id']}/revoke", {})
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["revoked_at"] is not None
    assert (await api.with_key(created["secret"]).get("/api/v1/members")).status_code == 401
    again = await api.post(f"{KEYS}/{created['id']}/revoke", {})
    assert again.status_code == 409


async def test_bad_key_requests_are_refused_and_create_nothing(api: ApiClient) -> None:
    before = len((await api.get(KEYS)).json()["data"])
    for payload in (
        {"name": "x", "role": "owner"},
        {"name": "x", "role": "integration", "scopes": ["audit:read"]},
        {"name": "x", "role": "integration", "scopes": ["no:such"]},
        {"name": "x", "role": "integration", "rate_limit": "lots"},
        {"name": "x", "role": "integration", "rate_limit": "0/minute"},
        # Only one limit is enforced; a window of no time is read as one unit.
        {"name": "x", "role": "integration", "rate_limit": "1/minute;1/hour"},
        {"name": "x", "role": "integration", "rate_limit": "1/0 second"},
        {"name": "", "role": "integration"},
    ):
        refused = await api.post(KEYS, payload)
        assert refused.status_code == 422, (payload, refused.text)
    assert len((await api.get(KEYS)).json()["data"]) == before
    assert (await api.post(f"{KEYS}/key_missing/revoke", {})).status_code == 404


async def test_key_management_is_for_admins_only(api: ApiClient, db: Database) -> None:
    manager = api.with_key(await issue_key(db, Role.MANAGER))
    assert (await manager.get(KEYS)).status_code == 403
    assert (await manager.post(KEYS, {"name": "x", "role": "admin"})).status_code == 403


async def test_a_narrowed_key_hands_out_no_scope_it_does_not_hold(
    api: ApiClient, db: Database
) -> None:
    keeper = api.with_key(await issue_key(db, Role.ADMIN, scopes=["api_keys:write"]))
    assert (await keeper.get("/api/v1/audit")).status_code == 403
    before = len((await api.get(KEYS, params={"limit": 200})).json()["data"])
    for body in (
        {"name": "everything", "role": "admin"},
        {"name": "reader", "role": "admin", "scopes": ["audit:read", "api_keys:write"]},
    ):
        refused = await keeper.post(KEYS, body)
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["code"] == "SCOPES_NOT_HELD"
        assert "audit:read" in refused.json()["error"]["details"]["scopes"]
    assert len((await api.get(KEYS, params={"limit": 200})).json()["data"]) == before
    # What it holds, it may hand on.
    same = await keeper.post(KEYS, {"name": "same", "role": "admin", "scopes": ["api_keys:write"]})
    assert same.status_code == 201, same.text
