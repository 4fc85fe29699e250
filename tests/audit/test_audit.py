"""The audit log: every write leaves a row saying who did what to which object, from
where; only admins read it; `memberhub audit verify` names every edited, re-hashed and
removed row, and with a head kept elsewhere, a rewritten or shortened chain."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import random
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory
from sqlalchemy import delete, select, update
from sqlalchemy.engine import make_url
from typer.testing import CliRunner, Result

from memberhub.app import create_app
from memberhub.audit.chain import (
    GENESIS_HASH,
    KEYED_CHAIN_REVISION,
    ChainKey,
    canonical_entry,
    canonical_json,
    entry_hash,
    legacy_entry_hash,
)
from memberhub.audit.chain import session_info as chain_session_info
from memberhub.audit.models import AuditEntry
from memberhub.audit.service import audit_row, record_write
from memberhub.auth import keys
from memberhub.auth.models import ApiKey
from memberhub.auth.roles import Role
from memberhub.cli import app as cli_app
from memberhub.events.sequencer import run_passes
from memberhub.kit.actor import Actor
from memberhub.kit.db import Database
from memberhub.kit.migrate import alembic_config, upgrade
from memberhub.settings import Settings
from tests.conftest import (
    TEST_DATABASE_URL,
    TEST_SECRET_KEY,
    _create_pg_database,
    _drop_pg_database,
    issue_key,
)
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


async def test_erasing_a_member_erases_its_personal_data_from_the_audit_log_too(
    db: Database, api: ApiClient, database_url: str, tmp_path: Path
) -> None:
    """The chain cannot change an entry once linked: personal values are stored sealed with
    the member's key, read opened, and unreadable once erasure deleted the key; the log
    still verifies."""
    member = await api.create_member(
        email="erase-me@example.com", first_name="Eve", custom_fields={"note": "VIP"}
    )
    patched = await api.patch(f"{MEMBERS}/{member['id']}", {"phone": "+60 12-345 6789"})
    assert patched.status_code == 200, patched.text
    other = await api.create_member(email="keep-me@example.com")
    await run_passes(db)

    def stored_text(entries: list[AuditEntry]) -> str:
        return " ".join(str(entry.changes) for entry in entries)

    async def stored(object_id: str) -> list[AuditEntry]:
        async with db.transaction(read_only=True) as session:
            rows = await session.scalars(
                select(AuditEntry).where(AuditEntry.object_id == object_id)
            )
            return list(rows.all())

    # Read back opened; stored sealed, the changed fields' names readable.
    [created] = await audit_for(api, object_id=member["id"], action="member.create")
    [updated] = await audit_for(api, object_id=member["id"], action="member.update")
    assert created["changes"]["email"] == {"before": None, "after": "erase-me@example.com"}
    assert created["changes"]["custom_fields"] == {"before": None, "after": {"note": "VIP"}}
    assert updated["changes"] == {"phone": {"before": None, "after": "+60 12-345 6789"}}
    raw = stored_text(await stored(member["id"]))
    for personal in ("erase-me@example.com", "Eve", "VIP", "345 6789"):
        assert personal not in raw
    assert "sealed" in raw

    assert (await api.delete(f"{MEMBERS}/{member['id']}")).status_code == 204
    created = (await audit_for(api, object_id=member["id"], action="member.create"))[0]
    assert created["changes"]["email"] == {"erased": True}
    assert created["changes"]["first_name"] == {"erased": True}
    assert created["changes"]["consent_email"] == {"before": None, "after": False}
    updated = (await audit_for(api, object_id=member["id"], action="member.update"))[0]
    assert updated["changes"] == {"phone": {"erased": True}}
    # Another member's entries read as before.
    kept = (await audit_for(api, object_id=other["id"], action="member.create"))[0]
    assert kept["changes"]["email"]["after"] == "keep-me@example.com"
    # The entries changed by nothing: the chain verifies.
    result = await run_verify(database_url, tmp_path)
    assert result.exit_code == 0, result.output


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


async def run_audit(
    database_url: str, tmp_path: Path, *args: str, secret: str = TEST_SECRET_KEY
) -> Result:
    """Run `memberhub audit ...` as an operator would, with the service's secret, in a thread
    (the CLI starts its own event loop)."""
    env = {
        "MEMBERHUB_DATABASE_URL": database_url,
        "MEMBERHUB_DATA_DIR": str(tmp_path / "cli"),
        "MEMBERHUB_SECRET_KEY": secret,
    }

    def invoke() -> Result:
        return CliRunner().invoke(cli_app, ["audit", *args], env=env)

    return await asyncio.to_thread(invoke)


async def run_verify(database_url: str, tmp_path: Path, *args: str) -> Result:
    return await run_audit(database_url, tmp_path, "verify", *args)


def tampered_lines(result: Result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("TAMPERED ")]


def plain_sha256(entry: AuditEntry, prev_hash: str) -> str:
    """What someone who can write to the database, but has no secret, can compute: SHA-256 of
    the very text the seal covers."""
    text = canonical_entry(entry, position=entry.chain_position or 0, prev_hash=prev_hash)
    return hashlib.sha256(text.encode()).hexdigest()


async def entries_in_chain(db: Database) -> list[AuditEntry]:
    async with db.transaction(read_only=True) as session:
        return list(
            (
                await session.scalars(
                    select(AuditEntry)
                    .where(AuditEntry.chain_position.is_not(None))
                    .order_by(AuditEntry.chain_position)
                )
            ).all()
        )


async def rewrite_from(
    db: Database, position: int, digest: Callable[[AuditEntry, str], str], seal: str | None
) -> None:
    """Re-hash every entry from `position` on with `digest`, as a forger would."""
    async with db.transaction() as session:
        entries = (
            await session.scalars(
                select(AuditEntry)
                .where(AuditEntry.chain_position.is_not(None))
                .order_by(AuditEntry.chain_position)
            )
        ).all()
        prev_hash = GENESIS_HASH
        for entry in entries:
            if (entry.chain_position or 0) >= position:
                entry.prev_hash = prev_hash
                entry.hash = digest(entry, prev_hash)
                entry.seal = seal
            prev_hash = entry.hash or ""


@pytest.fixture
async def five_entries(api: ApiClient, db: Database) -> list[int]:
    """The admin key's creation plus four member creations, linked into the chain."""
    for n in range(4):
        await api.create_member(email=f"chain{n}@example.com")
    await run_passes(db)
    ids = await audit_ids(db)
    assert len(ids) == 5
    return ids


async def test_audit_verify_exits_0_on_an_intact_log_and_prints_its_head(
    db: Database, five_entries: list[int], database_url: str, tmp_path: Path
) -> None:
    result = await run_verify(database_url, tmp_path)
    assert result.exit_code == 0, result.output
    assert "intact" in result.output
    assert "5 entries" in result.output
    last = (await entries_in_chain(db))[-1]
    assert result.output.splitlines()[-1] == f"head: 5:{last.hash}"


async def test_audit_verify_exits_0_on_an_empty_log(
    db: Database, database_url: str, tmp_path: Path
) -> None:
    async with db.transaction() as session:
        await session.execute(delete(AuditEntry))
    result = await run_verify(database_url, tmp_path)
    assert result.exit_code == 0, result.output
    assert f"head: 0:{GENESIS_HASH}" in result.output


async def test_entries_are_sealed_with_an_hmac_under_the_secrets_audit_key(
    db: Database, five_entries: list[int]
) -> None:
    key = ChainKey(TEST_SECRET_KEY)
    for entry in await entries_in_chain(db):
        assert entry.seal == key.seal
        assert entry.prev_hash is not None
        assert entry.hash == entry_hash(
            entry, position=entry.chain_position or 0, prev_hash=entry.prev_hash, key=key
        )
        assert entry.hash != plain_sha256(entry, entry.prev_hash)


@pytest.mark.parametrize(
    "edit",
    [
        {"changes": {"email": {"before": None, "after": "forged@example.com"}}},
        {"actor": "key_someoneelse"},
        {"client_ip": "10.9.8.7"},
        {"action": "member.update"},
        {"chain_position": 99},
    ],
    ids=["changes", "actor", "client_ip", "action", "chain_position"],
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

    assert verdict.exit_code == 1
    assert f"entry {target}:" in verdict.output
    assert "TAMPERED" in verdict.output


async def test_an_edit_that_keeps_the_hash_names_only_that_entry(
    db: Database, five_entries: list[int], database_url: str, tmp_path: Path
) -> None:
    target = five_entries[1]
    async with db.transaction() as session:
        await session.execute(
            update(AuditEntry).where(AuditEntry.id == target).values(actor="key_forged")
        )

    verdict = await run_verify(database_url, tmp_path)

    assert verdict.exit_code == 1
    [line] = tampered_lines(verdict)
    assert line.startswith(f"TAMPERED entry {target}: content does not match its hash")


@pytest.mark.parametrize("scheme", ["sha256", "legacy"])
async def test_audit_verify_fails_when_an_entry_is_edited_and_rehashed_without_the_key(
    db: Database, five_entries: list[int], database_url: str, tmp_path: Path, scheme: str
) -> None:
    """Someone with database access and no secret recomputes the edited entry's hash, with
    SHA-256 over the sealed text, or the unkeyed way entries were hashed before: the entry no
    longer checks, and the next entry does not chain to it."""
    target = five_entries[1]
    async with db.transaction() as session:
        entry = await session.get(AuditEntry, target)
        assert entry is not None
        assert entry.prev_hash is not None
        entry.changes = {"email": {"before": None, "after": "forged@example.com"}}
        if scheme == "sha256":
            entry.hash = plain_sha256(entry, entry.prev_hash)
        else:
            entry.hash = legacy_entry_hash(entry, entry.prev_hash)
            entry.seal = None

    verdict = await run_verify(database_url, tmp_path)

    assert verdict.exit_code == 1
    named = tampered_lines(verdict)
    assert len(named) == 2, verdict.output
    assert named[0].startswith(f"TAMPERED entry {target}: ")
    assert named[1].startswith(f"TAMPERED entry {five_entries[2]}: prev_hash")


@pytest.mark.parametrize("scheme", ["sha256", "legacy"])
async def test_rehashing_the_rest_of_the_chain_without_the_key_is_caught_at_every_entry(
    db: Database, five_entries: list[int], database_url: str, tmp_path: Path, scheme: str
) -> None:
    """The forger re-links every entry after the edit too, so each prev_hash matches: each
    entry's own seal still gives it away."""
    async with db.transaction() as session:
        await session.execute(
            update(AuditEntry)
            .where(AuditEntry.id == five_entries[1])
            .values(changes={"email": {"before": None, "after": "forged@example.com"}})
        )
    if scheme == "sha256":
        await rewrite_from(db, 2, plain_sha256, ChainKey(TEST_SECRET_KEY).seal)
    else:
        await rewrite_from(db, 2, lambda e, prev: legacy_entry_hash(e, prev), None)

    verdict = await run_verify(database_url, tmp_path)

    assert verdict.exit_code == 1
    named = tampered_lines(verdict)
    assert [line.split(":")[0] for line in named] == [
        f"TAMPERED entry {entry_id}" for entry_id in five_entries[1:]
    ]
    assert "prev_hash" not in verdict.output


async def test_audit_verify_fails_when_a_middle_entry_is_deleted(
    db: Database, five_entries: list[int], database_url: str, tmp_path: Path
) -> None:
    removed = five_entries[2]
    async with db.transaction() as session:
        await session.execute(delete(AuditEntry).where(AuditEntry.id == removed))

    verdict = await run_verify(database_url, tmp_path)

    assert verdict.exit_code == 1
    assert "TAMPERED position 3: missing, removed from the chain" in verdict.output
    # The entry after the gap no longer chains to its predecessor.
    assert f"entry {five_entries[3]}:" in verdict.output
    assert "prev_hash" in verdict.output


async def test_audit_verify_fails_when_the_first_entry_is_deleted(
    db: Database, five_entries: list[int], database_url: str, tmp_path: Path
) -> None:
    async with db.transaction() as session:
        await session.execute(delete(AuditEntry).where(AuditEntry.id == five_entries[0]))

    verdict = await run_verify(database_url, tmp_path)

    assert verdict.exit_code == 1
    assert "position 1: missing" in verdict.output
    assert f"entry {five_entries[1]}:" in verdict.output


async def test_audit_verify_reports_every_bad_entry_not_only_the_first(
    db: Database, five_entries: list[int], database_url: str, tmp_path: Path
) -> None:
    first, *_, removed, last = five_entries
    async with db.transaction() as session:
        await session.execute(
            update(AuditEntry).where(AuditEntry.id == first).values(object_id="forged")
        )
        await session.execute(delete(AuditEntry).where(AuditEntry.id == removed))
        await session.execute(
            update(AuditEntry).where(AuditEntry.id == last).values(client_ip="10.0.0.9")
        )

    verdict = await run_verify(database_url, tmp_path)

    assert verdict.exit_code == 1
    named = tampered_lines(verdict)
    assert named[0].startswith(f"TAMPERED entry {first}: content does not match")
    assert named[1] == "TAMPERED position 4: missing, removed from the chain"
    assert named[2].startswith(f"TAMPERED entry {last}: prev_hash")
    assert named[3].startswith(f"TAMPERED entry {last}: content does not match")
    assert len(named) == 4
    assert "audit log TAMPERED: 4 problem(s) in 4 entries checked" in verdict.output


async def test_audit_verify_names_entries_sealed_under_another_secret(
    five_entries: list[int], database_url: str, tmp_path: Path
) -> None:
    verdict = await run_audit(
        database_url, tmp_path, "verify", secret="another-secret-that-is-32-characters-long"
    )
    assert verdict.exit_code == 1
    assert len(tampered_lines(verdict)) == 5
    assert "sealed under another secret" in verdict.output


# --- keeping the head elsewhere ---------------------------------------------------------


async def test_audit_head_prints_the_newest_position_and_hash(
    db: Database, five_entries: list[int], database_url: str, tmp_path: Path
) -> None:
    result = await run_audit(database_url, tmp_path, "head")
    assert result.exit_code == 0, result.output
    last = (await entries_in_chain(db))[-1]
    assert result.output.strip() == f"5:{last.hash}"


async def test_audit_head_links_what_has_committed_first(
    db: Database, api: ApiClient, database_url: str, tmp_path: Path
) -> None:
    await api.create_member()
    result = await run_audit(database_url, tmp_path, "head")
    assert result.output.startswith("2:"), result.output


async def test_expect_head_passes_while_the_chain_still_leads_to_it(
    api: ApiClient, five_entries: list[int], database_url: str, tmp_path: Path
) -> None:
    kept = (await run_audit(database_url, tmp_path, "head")).output.strip()
    await api.create_member()

    verdict = await run_verify(database_url, tmp_path, "--expect-head", kept)

    assert verdict.exit_code == 0, verdict.output
    assert f"6 entries verified, and the expected head {kept} is in it" in verdict.output


async def test_expect_head_catches_a_rewrite_by_someone_holding_the_key(
    db: Database, five_entries: list[int], database_url: str, tmp_path: Path
) -> None:
    """A consistent rewrite re-sealed with the key itself checks entry by entry; only a head
    kept elsewhere shows the history changed."""
    kept = (await run_audit(database_url, tmp_path, "head")).output.strip()
    key = ChainKey(TEST_SECRET_KEY)
    async with db.transaction() as session:
        await session.execute(
            update(AuditEntry).where(AuditEntry.id == five_entries[1]).values(actor="key_forged")
        )
    await rewrite_from(
        db,
        2,
        lambda e, prev: entry_hash(e, position=e.chain_position or 0, prev_hash=prev, key=key),
        key.seal,
    )
    assert (await run_verify(database_url, tmp_path)).exit_code == 0

    verdict = await run_verify(database_url, tmp_path, "--expect-head", kept)

    assert verdict.exit_code == 1
    [line] = tampered_lines(verdict)
    assert line.startswith(f"TAMPERED entry {five_entries[4]}: its hash is not the expected head")


async def test_expect_head_catches_entries_removed_from_the_end(
    db: Database, five_entries: list[int], database_url: str, tmp_path: Path
) -> None:
    kept = (await run_audit(database_url, tmp_path, "head")).output.strip()
    async with db.transaction() as session:
        await session.execute(delete(AuditEntry).where(AuditEntry.id.in_(five_entries[3:])))
    # Without the kept head a shorter chain checks: nothing after it says it was longer.
    assert (await run_verify(database_url, tmp_path)).exit_code == 0

    verdict = await run_verify(database_url, tmp_path, "--expect-head", kept)

    assert verdict.exit_code == 1
    assert "the chain ends at position 3, before the expected head at position 5" in (
        verdict.output
    )


async def test_expect_head_catches_its_own_position_removed(
    db: Database, five_entries: list[int], database_url: str, tmp_path: Path
) -> None:
    [_, second, *_] = await entries_in_chain(db)
    async with db.transaction() as session:
        await session.execute(delete(AuditEntry).where(AuditEntry.id == second.id))

    verdict = await run_verify(database_url, tmp_path, "--expect-head", f"2:{second.hash}")

    assert verdict.exit_code == 1
    assert "the expected head's position 2 is missing" in verdict.output


async def test_a_malformed_expected_head_is_a_usage_error(
    five_entries: list[int], database_url: str, tmp_path: Path
) -> None:
    verdict = await run_verify(database_url, tmp_path, "--expect-head", "5")
    assert verdict.exit_code == 2
    assert "not a chain head" in verdict.output


# --- what the database gives back -------------------------------------------------------


async def test_a_negative_zero_patch_verifies_on_every_backend(
    db: Database, api: ApiClient, database_url: str, tmp_path: Path
) -> None:
    """jsonb keeps -0.0 as 0 (and 20.0 as 20.0, 1e20 written out): the seal is over the
    value, so what was written and what is read back seal the same."""
    response = await api.patch(
        "/api/v1/program", {"alert_thresholds": {"high_expiration_rate_percent": -0.0}}
    )
    assert response.status_code == 200, response.text
    await run_passes(db)
    [*_, entry] = await entries_in_chain(db)
    assert entry.action == "program.update"
    written = replace_changes(
        entry,
        {
            key: {
                "before": value["before"],
                "after": {**value["after"], "high_expiration_rate_percent": -0.0},
            }
            for key, value in entry.changes.items()
        },
    )
    key = ChainKey(TEST_SECRET_KEY)
    assert entry.hash == entry_hash(
        written, position=entry.chain_position or 0, prev_hash=entry.prev_hash or "", key=key
    )

    verdict = await run_verify(database_url, tmp_path)

    assert verdict.exit_code == 0, verdict.output
    assert "2 entries verified" in verdict.output


def replace_changes(entry: AuditEntry, changes: dict[str, Any]) -> AuditEntry:
    """The entry as it was written, before the database normalised it."""
    return AuditEntry(
        occurred_at=entry.occurred_at,
        actor=entry.actor,
        action=entry.action,
        object_type=entry.object_type,
        object_id=entry.object_id,
        changes=changes,
        request_id=entry.request_id,
        client_ip=entry.client_ip,
    )


ROUND_TRIP_VALUES: list[Any] = [
    -0.0,
    0.0,
    20.0,
    1.5,
    0.1,
    1e-7,
    1e20,
    1e300,
    5e-324,
    -1.7976931348623157e308,
    2**53 + 1,
    2**63 + 1,
    -(10**30),
    True,
    False,
    None,
    "",
    "é ü ß 中文 😀 \u2028 \t \\ \" '",
    {"bb": 1, "a": 2, "ccc": {"z": [], "y": {}}},
    [1, "1", 1.0, [None]],
]


def random_text(rng: random.Random) -> str:
    # Any character PostgreSQL stores in text: no NUL, no lone surrogate.
    return "".join(
        chr(rng.choice([rng.randint(1, 0x7F), rng.randint(0x80, 0xD7FF), 0x1F600]))
        for _ in range(rng.randint(0, 8))
    )


def random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(6 if depth < 3 else 4)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.randint(-(2**70), 2**70)
    if kind == 2:
        value = rng.uniform(-10, 10) * 10 ** rng.randint(-300, 300)
        return rng.choice([value, float(round(value)), -0.0])
    if kind == 3:
        return random_text(rng)
    if kind == 4:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {random_text(rng): random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))}


async def test_what_the_database_gives_back_seals_as_what_was_written(
    db: Database, database_url: str, tmp_path: Path
) -> None:
    rng = random.Random(20261205)
    written = [{"value": v} for v in ROUND_TRIP_VALUES] + [
        {"value": random_json(rng)} for _ in range(200)
    ]
    async with db.transaction() as session:
        await session.execute(delete(AuditEntry))
    async with db.transaction() as session:
        for n, changes in enumerate(written):
            record_write(
                session,
                Actor.system("test"),
                action="round.trip",
                object_type="value",
                object_id=str(n),
                changes=changes,
            )
    await run_passes(db)

    read_back = await entries_in_chain(db)
    assert len(read_back) == len(written)
    for entry in read_back:
        assert canonical_json(entry.changes) == canonical_json(written[int(entry.object_id)])
    verdict = await run_verify(database_url, tmp_path)
    assert verdict.exit_code == 0, verdict.output


# --- which processes seal ---------------------------------------------------------------


async def test_a_database_opened_without_the_key_numbers_events_but_leaves_audit_entries(
    db: Database, api: ApiClient, database_url: str
) -> None:
    await run_passes(db)
    await api.create_member()
    keyless = Database(database_url, pool_size=1)
    try:
        result = await run_passes(keyless)
    finally:
        await keyless.dispose()
    assert (result.events, result.audit_entries) == (1, 0)
    assert len(await entries_in_chain(db)) == 1

    assert (await run_passes(db)).audit_entries == 1
    assert len(await entries_in_chain(db)) == 2


async def test_an_application_refuses_a_database_opened_with_another_key(
    settings: Settings, database_url: str
) -> None:
    other = Database(
        database_url,
        pool_size=1,
        session_info=chain_session_info(ChainKey("another-secret-that-is-32-characters-long")),
    )
    try:
        with pytest.raises(ValueError, match="audit chain key"):
            create_app(settings, db=other)
    finally:
        await other.dispose()


# --- re-sealing: secret rotation, entries hashed before the chain was keyed -------------

NEW_SECRET = "the-next-master-secret-of-32-characters"


async def rotate(database_url: str, tmp_path: Path, new_secret: str) -> Result:
    env = {
        "MEMBERHUB_DATABASE_URL": database_url,
        "MEMBERHUB_DATA_DIR": str(tmp_path / "cli"),
        "MEMBERHUB_SECRET_KEY": TEST_SECRET_KEY,
    }

    def invoke() -> Result:
        return CliRunner().invoke(cli_app, ["secrets", "rotate", "--new-key", new_secret], env=env)

    return await asyncio.to_thread(invoke)


async def test_secrets_rotate_reseals_the_chain_under_the_new_secret(
    five_entries: list[int], database_url: str, tmp_path: Path
) -> None:
    rotated = await rotate(database_url, tmp_path, NEW_SECRET)
    assert rotated.exit_code == 0, rotated.output
    assert "audit_log: 5 entries re-sealed" in rotated.output

    with_new = await run_audit(database_url, tmp_path, "verify", secret=NEW_SECRET)
    assert with_new.exit_code == 0, with_new.output
    with_old = await run_verify(database_url, tmp_path)
    assert with_old.exit_code == 1
    assert "sealed under another secret" in with_old.output


async def test_secrets_rotate_refuses_to_reseal_a_tampered_chain_and_changes_nothing(
    db: Database, five_entries: list[int], database_url: str, tmp_path: Path
) -> None:
    async with db.transaction() as session:
        await session.execute(
            update(AuditEntry).where(AuditEntry.id == five_entries[3]).values(actor="key_x")
        )
    before = [(e.hash, e.seal) for e in await entries_in_chain(db)]

    rotated = await rotate(database_url, tmp_path, NEW_SECRET)

    assert rotated.exit_code == 1
    assert f"entry {five_entries[3]}: content does not match its hash" in rotated.output
    assert "The secrets were not rotated either" in rotated.output
    assert [(e.hash, e.seal) for e in await entries_in_chain(db)] == before


async def test_entries_sealed_under_a_previous_secret_are_resealed_with_it_given(
    db: Database, five_entries: list[int], database_url: str, tmp_path: Path
) -> None:
    """After a rotation, a process still running with the old secret linked entries: named
    until `audit reseal --previous-key-file` checks them with it and re-seals them."""
    assert (await rotate(database_url, tmp_path, NEW_SECRET)).exit_code == 0
    async with db.transaction() as session:
        record_write(
            session, Actor.system("test"), action="late", object_type="t", object_id="1", changes={}
        )
    await run_passes(db)  # the test's database still holds the old secret
    named = await run_audit(database_url, tmp_path, "verify", secret=NEW_SECRET)
    assert len(tampered_lines(named)) == 1
    old_secret_file = tmp_path / "old-secret"
    old_secret_file.write_text(TEST_SECRET_KEY)

    resealed = await run_audit(
        database_url,
        tmp_path,
        "reseal",
        "--previous-key-file",
        str(old_secret_file),
        secret=NEW_SECRET,
    )

    assert resealed.exit_code == 0, resealed.output
    assert "re-sealed: 1 entries" in resealed.output
    verdict = await run_audit(database_url, tmp_path, "verify", secret=NEW_SECRET)
    assert verdict.exit_code == 0, verdict.output


async def make_unkeyed(db: Database) -> None:
    """Turn the chain into what the version before the keyed chain left: no seal, and each
    entry's unkeyed SHA-256 of the entry as read back."""
    await rewrite_from(db, 1, lambda e, prev: legacy_entry_hash(e, prev), None)


async def test_entries_hashed_before_the_chain_was_keyed_are_named_until_resealed(
    db: Database, five_entries: list[int], database_url: str, tmp_path: Path
) -> None:
    await make_unkeyed(db)
    old_head = (await entries_in_chain(db))[-1].hash

    named = await run_verify(database_url, tmp_path)
    assert named.exit_code == 1
    assert len(tampered_lines(named)) == 5
    assert "hashed without the key, before the chain was keyed" in named.output

    resealed = await run_audit(database_url, tmp_path, "reseal", "--expect-head", f"5:{old_head}")
    assert resealed.exit_code == 0, resealed.output
    assert f"re-sealed: 5 entries; head was 5:{old_head}" in resealed.output
    assert (await run_verify(database_url, tmp_path)).exit_code == 0
    again = await run_audit(database_url, tmp_path, "reseal")
    assert "re-sealed: 0 entries" in again.output


async def test_db_upgrade_does_not_reseal_a_chain_rewritten_without_the_key(
    db: Database, five_entries: list[int], database_url: str, tmp_path: Path
) -> None:
    """Whoever can write to the database, without SECRET_KEY, edits an entry and re-hashes
    the whole chain the old, unkeyed way: a routine upgrade must not make that pass."""
    async with db.transaction() as session:
        await session.execute(
            update(AuditEntry).where(AuditEntry.id == five_entries[0]).values(actor="key_x")
        )
    await make_unkeyed(db)
    env = {
        "MEMBERHUB_DATABASE_URL": database_url,
        "MEMBERHUB_DATA_DIR": str(tmp_path / "cli"),
        "MEMBERHUB_SECRET_KEY": TEST_SECRET_KEY,
    }
    upgraded = await asyncio.to_thread(
        lambda: CliRunner().invoke(cli_app, ["db", "upgrade"], env=env)
    )
    assert upgraded.exit_code == 0, upgraded.output
    assert "5 entries are hashed without the key and not re-sealed" in upgraded.output
    assert "audit log re-sealed" not in upgraded.output
    assert all(entry.seal is None for entry in await entries_in_chain(db))
    named = await run_verify(database_url, tmp_path)
    assert named.exit_code == 1
    assert len(tampered_lines(named)) == 5


async def test_reseal_refuses_a_chain_that_does_not_check_and_changes_nothing(
    db: Database, five_entries: list[int], database_url: str, tmp_path: Path
) -> None:
    await make_unkeyed(db)
    async with db.transaction() as session:
        await session.execute(
            update(AuditEntry).where(AuditEntry.id == five_entries[2]).values(actor="key_x")
        )
    before = [(e.hash, e.seal) for e in await entries_in_chain(db)]

    refused = await run_audit(database_url, tmp_path, "reseal")

    assert refused.exit_code == 1
    assert "not re-sealed (nothing was changed)" in refused.output
    assert f"entry {five_entries[2]}: content does not match its hash" in refused.output
    assert [(e.hash, e.seal) for e in await entries_in_chain(db)] == before


async def test_reseal_refuses_unkeyed_entries_after_keyed_ones(
    db: Database, five_entries: list[int], database_url: str, tmp_path: Path
) -> None:
    """Re-hashing the newest entries the old, unkeyed way is a rewrite, not an old entry."""
    async with db.transaction() as session:
        await session.execute(
            update(AuditEntry).where(AuditEntry.id == five_entries[4]).values(actor="key_x")
        )
    await rewrite_from(db, 5, lambda e, prev: legacy_entry_hash(e, prev), None)

    refused = await run_audit(database_url, tmp_path, "reseal")

    assert refused.exit_code == 1
    assert "hashed without the key after keyed entries" in refused.output


@pytest.fixture
async def unmigrated_database_url(database_url: str, tmp_path: Path) -> AsyncIterator[str]:
    """A database of its own, on the backend under test, for migration tests."""
    if not database_url.startswith("postgresql"):
        yield f"sqlite+aiosqlite:///{tmp_path / 'unmigrated.db'}"
        return
    assert TEST_DATABASE_URL is not None
    name = f"memberhub_mig_{uuid.uuid4().hex[:12]}"
    await _create_pg_database(TEST_DATABASE_URL, name)
    try:
        yield make_url(database_url).set(database=name).render_as_string(hide_password=False)
    finally:
        await _drop_pg_database(TEST_DATABASE_URL, name)


@pytest.mark.parametrize("first_run_keyless", [False, True], ids=["one-run", "keyless-first"])
async def test_db_upgrade_reseals_the_entries_hashed_before_the_chain_was_keyed(
    unmigrated_database_url: str, tmp_path: Path, first_run_keyless: bool
) -> None:
    url = unmigrated_database_url
    script = ScriptDirectory.from_config(alembic_config(url))
    before_keyed = script.get_revision(KEYED_CHAIN_REVISION).down_revision
    assert isinstance(before_keyed, str)
    await asyncio.to_thread(upgrade, url, before_keyed)
    # Entries as the previous version wrote and linked them: no seal column yet.
    old_log = sa.Table(
        "audit_log",
        sa.MetaData(),
        *(
            sa.Column(c.name, c.type, primary_key=c.primary_key)
            for c in AuditEntry.__table__.c
            if c.name != "seal"
        ),
    )
    old_db = Database(url, pool_size=1)
    try:
        async with old_db.transaction() as session:
            for n in range(3):
                await session.execute(
                    sa.insert(old_log).values(
                        audit_row(
                            Actor.system("test"),
                            "old.write",
                            "t",
                            str(n),
                            {"rate": -0.0, "n": n * 1.0},
                        )
                    )
                )
        async with old_db.transaction() as session:
            rows = (await session.execute(sa.select(old_log).order_by(old_log.c.id))).all()
            prev_hash = GENESIS_HASH
            for position, row in enumerate(rows, start=1):
                digest = legacy_entry_hash(row, prev_hash)
                await session.execute(
                    sa.update(old_log)
                    .where(old_log.c.id == row.id)
                    .values(chain_position=position, prev_hash=prev_hash, hash=digest)
                )
                prev_hash = digest
    finally:
        await old_db.dispose()
    env = {
        "MEMBERHUB_DATABASE_URL": url,
        "MEMBERHUB_DATA_DIR": str(tmp_path / "cli"),
        "MEMBERHUB_SECRET_KEY": TEST_SECRET_KEY,
    }

    def invoke(*args: str) -> Result:
        return CliRunner().invoke(cli_app, list(args), env=env)

    if first_run_keyless:
        # In production without the key: the migrations apply, the sealing cannot.
        keyless = {**env, "MEMBERHUB_SECRET_KEY": None, "MEMBERHUB_ENV": "production"}
        stopped = await asyncio.to_thread(
            lambda: CliRunner().invoke(cli_app, ["db", "upgrade"], env=keyless)
        )
        assert stopped.exit_code == 1, stopped.output
        assert f"applied {KEYED_CHAIN_REVISION}: " in stopped.output

    upgraded = await asyncio.to_thread(invoke, "db", "upgrade")

    assert upgraded.exit_code == 0, upgraded.output
    if first_run_keyless:
        # A later run seals nothing by itself (the unkeyed entries might have been
        # rewritten since) but says how to: the operator checks them against the head kept.
        assert "nothing to apply" in upgraded.output
        assert "3 entries are hashed without the key and not re-sealed" in upgraded.output
        assert "audit reseal --expect-head" in upgraded.output
        unsealed = await asyncio.to_thread(invoke, "audit", "verify")
        assert unsealed.exit_code != 0, unsealed.output
        upgraded = await asyncio.to_thread(
            invoke, "audit", "reseal", "--expect-head", f"3:{prev_hash}"
        )
        assert upgraded.exit_code == 0, upgraded.output
    else:
        assert f"applied {KEYED_CHAIN_REVISION}: " in upgraded.output
        assert "audit log: 3 entries were hashed without a key" in upgraded.output
    assert f"re-sealed: 3 entries; head was 3:{prev_hash}" in upgraded.output
    verdict = await asyncio.to_thread(invoke, "audit", "verify")
    assert verdict.exit_code == 0, verdict.output
    assert "3 entries verified" in verdict.output
