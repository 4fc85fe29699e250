"""No approvals, alerts, staff or API keys page answers 500, whatever the query string or
the form: fuzzed values get a 4xx page, or are valid and taken as such."""

from __future__ import annotations

import random

import httpx
import pytest

from memberhub.auth.roles import Role
from memberhub.kit.db import Database
from tests.conftest import issue_key
from tests.console.support import create_staff_user, csrf_of, sign_in
from tests.support import ApiClient

NASTY = [
    "",
    "\x00",
    "%00",
    "'; DROP TABLE staff_users; --",
    "<script>x</script>",
    "é" * 300,
    "a" * 600,
    "apr_",
    "0",
    "-1",
    "9" * 40,
    "1e309",
    "\u202e",
    "{{7*7}}",
    "pending\n",
    "open",
    "all",
    "true",
    "admin",
    "members:read",
    "100/minute",
    "1/0",
    "e30",
    "eyJhZnRlciI6IC0xfQ",
    "eyJhZnRlciI6IDk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5OX0",
]


def _value(chooser: random.Random) -> str:
    return chooser.choice(NASTY) + "".join(
        chr(chooser.randrange(1, 0x2FFF)) for _ in range(chooser.randrange(6))
    )


async def _data(api: ApiClient, db: Database) -> dict[str, str]:
    member = await api.create_member()
    award = await api.post(
        "/api/v1/points/award", {"member_id": member["id"], "points": 10, "reason": "x"}
    )
    assert award.status_code == 201
    agent = api.with_key(await issue_key(db, Role.SUPPORT_AGENT))
    held = await agent.post(
        "/api/v1/points/deduct", {"member_id": member["id"], "points": 5, "reason": "x"}
    )
    assert held.status_code == 202
    keys = (await api.get("/api/v1/api-keys")).json()["data"]
    return {"approval": held.json()["id"], "key": keys[0]["id"]}


@pytest.mark.parametrize("role", ["admin", "manager"])
async def test_fuzzed_query_strings_and_forms_never_give_a_500(
    browser: httpx.AsyncClient, api: ApiClient, db: Database, role: str
) -> None:
    ids = await _data(api, db)
    staff_id = await create_staff_user(db, role=role)
    await sign_in(browser)
    token = csrf_of(await browser.get("/console"))
    chooser = random.Random(f"console-admin-{role}")
    pages = [
        "/console/approvals",
        f"/console/approvals/{ids['approval']}",
        "/console/alerts",
        "/console/staff",
        f"/console/staff/{staff_id}",
        "/console/keys",
    ]
    names = ["status", "type", "priority", "cursor", "limit", "q", "x"]
    for _ in range(80):
        path = chooser.choice(pages)
        query = {chooser.choice(names): _value(chooser) for _ in range(chooser.randrange(1, 4))}
        answered = await browser.get(path, params=query)
        assert answered.status_code < 500, (path, query, answered.text[:300])
    for raw in ("status=%FF%FE", "cursor=%00", "%", "a=%E0%A4%A", "=&=&", "status=open&status=x"):
        for path in pages:
            answered = await browser.get(f"{path}?{raw}")
            assert answered.status_code < 500, (path, raw, answered.text[:300])

    forms = {
        f"/console/approvals/{ids['approval']}/reject": ["note"],
        "/console/alerts/alr_missing/acknowledge": ["note"],
        "/console/staff": ["email", "name", "role", "organisation_id", "password"],
        f"/console/staff/{staff_id}": ["name", "role", "organisation_id", "active"],
        "/console/keys": ["name", "role", "scopes", "organisation_id", "rate_limit"],
        f"/console/keys/{_value(chooser)[:40]}/revoke": [],
    }
    for _ in range(60):
        action = chooser.choice(list(forms))
        fields: dict[str, str | list[str]] = {
            name: _value(chooser) for name in forms[action] if chooser.random() < 0.8
        }
        # Half the time a valid role and email, so that the rest reaches the services.
        if "role" in fields and chooser.random() < 0.5:
            fields["role"] = chooser.choice(["admin", "manager", "support_agent"])
        if "email" in fields and chooser.random() < 0.5:
            fields["email"] = f"fuzz{chooser.randrange(5)}@example.org"
        if "scopes" in fields and chooser.random() < 0.5:
            fields["scopes"] = [_value(chooser) for _ in range(3)]
        answered = await browser.post(action, data={"csrf_token": token, **fields})
        assert answered.status_code < 500, (action, fields, answered.text[:300])
    # A fuzzed reject may be a valid one; a deduction is never applied by it.
    approval = (await api.get(f"/api/v1/approvals/{ids['approval']}")).json()
    assert approval["status"] in ("pending", "rejected")
    assert approval["transaction_id"] is None
