"""The audit log: every write leaves a row saying who did what to which object, from
where; only admins read it; `memberhub audit verify` detects edited and removed rows."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, select, update
from typer.testing import CliRunner, Result

from memberhub.audit.models import AuditEntry
from memberhub.auth import keys
from memberhub.auth.models import ApiKey
from memberhub.auth.roles import Role
from memberhub.cli import app as cli_app
from memberhub.events.sequencer import run_passes
from memberhub.kit.db import Database
from tests.conftest import issue_key
from tests.support import ApiClient

MEMBERS = "/api/v1/members"


async def key_public_id(db: Database, secret: str) -> str:
    async with db.transaction(read_only=True) as session:
        public_id = await session.scalar(
            select(ApiKey.public_id).where(ApiKey.prefix == keys.lookup_prefix(secret))
        )
    assert public_id is not None
    return str(public_id)


async def audit_for(api: ApiClient, **filters: str) -> list[dict[str, Any]]:
    response = await api.get("/api/v1/audit", params={"limit": 500, **filters})
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


async def audit_ids(db: Database) -> list[int]:
    async with db.transaction(read_only=True) as session:
        return list((await session.scalars(select(AuditEntry.id).order_by(AuditEntry.id))).all())


# --- what a row records ---------------------------------------------------------------


async def test_member_create_is_audited_with_actor_action_object_request_id_and_ip(
    db: Database, api: ApiClient, admin_key: str
) -> None:
    created = await api.post(
        MEMBERS,
        {"email": "ana@example.com", "first_name": "Ana"},
        headers={"X-Request-ID": "req-create-ana"},
    )
    assert created.status_code == 201
    member_id = created.json()["id"]

    [entry] = await audit_for(api, object_id=member_id)

    actor = await key_public_id(db, admin_key)
    assert actor.startswith("key_")
    assert entry["actor"] == actor
    assert entry["action"] == "member.create"
    assert entry["object_type"] == "member"
    assert entry["object_id"] == member_id
    assert entry["request_id"] == "req-create-ana"
    assert entry["client_ip"] == "127.0.0.1"
    assert entry["changes"]["email"] == {"before": None, "after": "ana@example.com"}
    assert entry["changes"]["first_name"] == {"before": None, "after": "Ana"}


async def test_member_update_is_audited_with_before_and_after_of_changed_fields_only(
    db: Database, api: ApiClient
) -> None:
    agent_key = await issue_key(db, Role.SUPPORT_AGENT)
    member = await api.create_member(first_name="Ana", last_name="Lim")

    patched = await api.with_key(agent_key).patch(
        f"{MEMBERS}/{member['id']}",
        {"first_name": "Anna", "last_name": "Lim"},
        headers={"X-Request-ID": "req-rename"},
    )
    assert patched.status_code == 200, patched.text

    [entry] = await audit_for(api, object_id=member["id"], action="member.update")
    assert entry["actor"] == await key_public_id(db, agent_key)
    assert entry["changes"] == {"first_name": {"before": "Ana", "after": "Anna"}}
    assert entry["request_id"] == "req-rename"
    assert entry["client_ip"] == "127.0.0.1"


async def test_member_delete_is_audited_without_repeating_personal_data(
    api: ApiClient,
) -> None:
    member = await api.create_member(email="erase-me@example.com", first_name="Eve")

    assert (await api.delete(f"{MEMBERS}/{member['id']}")).status_code == 204

    [entry] = await audit_for(api, object_id=member["id"], action="member.delete")
    assert entry["object_type"] == "member"
    assert "email" in entry["changes"]["erased_fields"]
    assert "erase-me@example.com" not in str(entry["changes"])
    assert "Eve" not in str(entry["changes"])


async def test_request_without_x_request_id_is_audited_with_the_generated_id(
    api: ApiClient,
) -> None:
    created = await api.post(MEMBERS, {"email": "gen@example.com"})
    generated = created.headers["x-request-id"]
    assert generated

    [entry] = await audit_for(api, object_id=created.json()["id"])
    assert entry["request_id"] == generated


async def test_every_kind_of_write_is_audited(api: ApiClient) -> None:
    org = await api.create_organisation()
    plan = await api.create_plan()
    member = await api.create_member(organisation_id=org["id"])
    join = await api.post(f"{MEMBERS}/{member['id']}/membership/join", {"plan_id": plan["id"]})
    assert join.status_code == 200, join.text
    await api.patch(f"{MEMBERS}/{member['id']}", {"first_name": "Zed"})
    await api.delete(f"{MEMBERS}/{member['id']}")

    actions = [(e["action"], e["object_id"]) for e in await audit_for(api)]

    assert actions == [
        ("api_key.create", actions[0][1]),
        ("organisation.create", org["id"]),
        ("plan.create", plan["id"]),
        ("member.create", member["id"]),
        ("membership.join", member["id"]),
        ("member.update", member["id"]),
        ("member.delete", member["id"]),
    ]


async def test_reads_and_refused_writes_leave_no_audit_row(db: Database, api: ApiClient) -> None:
    member = await api.create_member(email="dup@example.com")
    before = await audit_ids(db)

    await api.get(MEMBERS)
    await api.get(f"{MEMBERS}/{member['id']}")
    assert (await api.post(MEMBERS, {"email": "dup@example.com"})).status_code == 409
    agent = api.with_key(await issue_key(db, Role.SUPPORT_AGENT))
    after_key = await audit_ids(db)
    assert (await agent.delete(f"{MEMBERS}/{member['id']}")).status_code == 403

    # Only the issuing of the agent key itself was recorded.
    assert len(after_key) == len(before) + 1
    assert await audit_ids(db) == after_key


async def test_audit_entries_form_a_hash_chain(api: ApiClient) -> None:
    for _ in range(3):
        await api.create_member()

    entries = await audit_for(api)

    assert len(entries) == 4
    assert entries[0]["prev_hash"] == "0" * 64
    for previous, entry in itertools.pairwise(entries):
        assert entry["prev_hash"] == previous["hash"]
    assert len({e["hash"] for e in entries}) == 4


# --- who may read it ------------------------------------------------------------------


@pytest.mark.parametrize("role", [Role.MANAGER, Role.SUPPORT_AGENT, Role.INTEGRATION])
async def test_audit_log_is_forbidden_to_non_admin_roles(
    db: Database, api: ApiClient, role: Role
) -> None:
    client = api.with_key(await issue_key(db, role))
    response = await client.get("/api/v1/audit")
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "FORBIDDEN"


async def test_audit_log_is_readable_by_an_admin(db: Database, api: ApiClient) -> None:
    other_admin = api.with_key(await issue_key(db, Role.ADMIN))
    response = await other_admin.get("/api/v1/audit")
    assert response.status_code == 200
    assert [e["action"] for e in response.json()["data"]] == ["api_key.create"] * 2


async def test_audit_log_is_forbidden_to_an_admin_bound_to_an_organisation(
    db: Database, api: ApiClient
) -> None:
    org = await api.create_organisation()
    await api.create_member(email="someone.else@example.com")
    bound_admin = api.with_key(await issue_key(db, Role.ADMIN, organisation=org["id"]))
    response = await bound_admin.get("/api/v1/audit")
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "AUDIT_REQUIRES_INSTALLATION_KEY"
    assert "someone.else" not in response.text


async def test_audit_log_filters_and_pages(db: Database, api: ApiClient, admin_key: str) -> None:
    members = [await api.create_member() for _ in range(3)]
    actor = await key_public_id(db, admin_key)

    mine = await audit_for(api, actor=actor)
    assert [e["object_id"] for e in mine] == [m["id"] for m in members]

    seen: list[int] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await api.get("/api/v1/audit", params=params)).json()
        seen += [e["id"] for e in page["data"]]
        cursor = page["pagination"]["next_cursor"]
        if not page["pagination"]["has_more"]:
            break
    assert seen == await audit_ids(db)


# --- `memberhub audit verify` ---------------------------------------------------------


async def run_verify(database_url: str, tmp_path: Path) -> Result:
    """Run the CLI as an operator would, in a thread (it starts its own event loop)."""
    env = {"MEMBERHUB_DATABASE_URL": database_url, "MEMBERHUB_DATA_DIR": str(tmp_path / "cli")}

    def invoke() -> Result:
        return CliRunner().invoke(cli_app, ["audit", "verify"], env=env)

    return await asyncio.to_thread(invoke)


@pytest.fixture
async def five_entries(api: ApiClient, db: Database) -> list[int]:
    """The admin key's creation plus four member creations, linked into the chain."""
    for n in range(4):
        await api.create_member(email=f"chain{n}@example.com")
    await run_passes(db)
    ids = await audit_ids(db)
    assert len(ids) == 5
    return ids


async def test_audit_verify_exits_0_on_an_intact_log(
    five_entries: list[int], database_url: str, tmp_path: Path
) -> None:
    result = await run_verify(database_url, tmp_path)
    assert result.exit_code == 0, result.output
    assert "intact" in result.output
    assert "5 entries" in result.output


async def test_audit_verify_exits_0_on_an_empty_log(
    db: Database, database_url: str, tmp_path: Path
) -> None:
    async with db.transaction() as session:
        await session.execute(delete(AuditEntry))
    result = await run_verify(database_url, tmp_path)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "edit",
    [
        {"changes": {"email": {"before": None, "after": "forged@example.com"}}},
        {"actor": "key_someoneelse"},
        {"client_ip": "10.9.8.7"},
        {"action": "member.update"},
    ],
    ids=["changes", "actor", "client_ip", "action"],
)
async def test_audit_verify_fails_naming_an_edited_entry(
    db: Database,
    five_entries: list[int],
    database_url: str,
    tmp_path: Path,
    edit: dict[str, Any],
) -> None:
    target = five_entries[2]
    async with db.transaction() as session:
        result = await session.execute(
            update(AuditEntry).where(AuditEntry.id == target).values(**edit)
        )
        assert result.rowcount == 1  # type: ignore[attr-defined]

    verdict = await run_verify(database_url, tmp_path)

    assert verdict.exit_code != 0
    assert f"entry {target}:" in verdict.output
    assert "TAMPERED" in verdict.output


async def test_audit_verify_fails_when_an_entry_is_edited_and_rehashed(
    db: Database, five_entries: list[int], database_url: str, tmp_path: Path
) -> None:
    """Recomputing the edited entry's own hash does not help: the next entry names it."""
    from memberhub.audit.service import entry_hash

    target = five_entries[1]
    async with db.transaction() as session:
        entry = await session.get(AuditEntry, target)
        assert entry is not None
        entry.changes = {"email": {"before": None, "after": "forged@example.com"}}
        assert entry.prev_hash is not None
        entry.hash = entry_hash(entry, entry.prev_hash)

    verdict = await run_verify(database_url, tmp_path)

    assert verdict.exit_code != 0
    assert f"entry {five_entries[2]}:" in verdict.output


async def test_audit_verify_fails_when_a_middle_entry_is_deleted(
    db: Database, five_entries: list[int], database_url: str, tmp_path: Path
) -> None:
    removed = five_entries[2]
    async with db.transaction() as session:
        await session.execute(delete(AuditEntry).where(AuditEntry.id == removed))

    verdict = await run_verify(database_url, tmp_path)

    assert verdict.exit_code != 0
    # The entry after the gap no longer chains to its predecessor.
    assert f"entry {five_entries[3]}:" in verdict.output
    assert "prev_hash" in verdict.output


async def test_audit_verify_fails_when_the_first_entry_is_deleted(
    db: Database, five_entries: list[int], database_url: str, tmp_path: Path
) -> None:
    async with db.transaction() as session:
        await session.execute(delete(AuditEntry).where(AuditEntry.id == five_entries[0]))

    verdict = await run_verify(database_url, tmp_path)

    assert verdict.exit_code != 0
    assert f"entry {five_entries[1]}:" in verdict.output
