"""A reference_id belongs to the organisation of the member it was used for: the same
reference in two organisations makes two independent operations, a repeat inside one
organisation replays or is refused, and no answer ever names another organisation's
transaction."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import JSON, BigInteger, Boolean, Integer, String, column, insert, select, table
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from memberhub.auth.roles import Role
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database, UTCDateTime
from memberhub.kit.migrate import upgrade
from memberhub.organisations.models import Organisation
from memberhub.points.models import PointAccount, PointTransaction, TxnType
from tests.conftest import _create_pg_database, _drop_pg_database, issue_key
from tests.points.conftest import POINTS, check_ledger
from tests.support import ApiClient


@dataclass
class Tenant:
    """An organisation, one of its members and a manager key bound to it."""

    organisation_id: str
    member_id: str
    api: ApiClient


async def _tenant(api: ApiClient, db: Database, parent_id: str | None = None) -> Tenant:
    organisation = (await api.create_organisation(parent_id=parent_id))["id"]
    member = (await api.create_member(organisation_id=organisation))["id"]
    key = await issue_key(db, Role.MANAGER, organisation=organisation)
    return Tenant(organisation, member, api.with_key(key))


@pytest.fixture
async def tenants(api: ApiClient, db: Database) -> tuple[Tenant, Tenant]:
    return await _tenant(api, db), await _tenant(api, db)


async def _post(tenant: Tenant, operation: str, body: dict[str, Any], expect: int) -> Any:
    response = await tenant.api.post(f"{POINTS}/{operation}", body)
    assert response.status_code == expect, response.text
    return response.json()


def _award(tenant: Tenant, reference_id: str, points: int = 70) -> dict[str, Any]:
    return {
        "member_id": tenant.member_id,
        "points": points,
        "reason": "welcome",
        "reference_id": reference_id,
    }


def _earn(tenant: Tenant, reference_id: str, amount: int = 10_000) -> dict[str, Any]:
    return {
        "member_id": tenant.member_id,
        "amount": amount,
        "currency": "MYR",
        "reference_id": reference_id,
    }


async def test_the_same_award_reference_in_two_organisations_applies_in_each(
    tenants: tuple[Tenant, Tenant], db: Database
) -> None:
    first, second = tenants
    in_first = await _post(first, "award", _award(first, "shared-1"), expect=201)
    in_second = await _post(second, "award", _award(second, "shared-1", points=30), expect=201)

    assert in_second["replayed"] is False
    assert in_first["transaction"]["id"] != in_second["transaction"]["id"]
    assert in_first["balance"]["current_balance"] == 70
    assert in_second["balance"]["current_balance"] == 30
    # Each organisation's repeat replays its own transaction.
    again = await _post(first, "award", _award(first, "shared-1"), expect=200)
    assert (again["replayed"], again["transaction"]["id"]) == (True, in_first["transaction"]["id"])
    again = await _post(second, "award", _award(second, "shared-1", points=30), expect=200)
    assert (again["replayed"], again["transaction"]["id"]) == (True, in_second["transaction"]["id"])
    await check_ledger(db)


async def test_earn_redeem_and_reverse_keep_each_organisations_references_apart(
    tenants: tuple[Tenant, Tenant], db: Database
) -> None:
    first, second = tenants
    earned = {
        t.organisation_id: await _post(t, "earn", _earn(t, "order-1", amount), expect=201)
        for t, amount in ((first, 20_000), (second, 40_000))
    }
    for tenant in tenants:
        redeem = {"member_id": tenant.member_id, "points": 10, "reference_id": "spend-1"}
        spent = await _post(tenant, "redeem", redeem, expect=201)
        assert spent["replayed"] is False
        assert (await _post(tenant, "redeem", redeem, expect=200))["replayed"] is True
    # The earn named by reference is the caller's organisation's own.
    for tenant in tenants:
        reverse = {
            "member_id": tenant.member_id,
            "earn_reference_id": "order-1",
            "points": 5,
            "reference_id": "refund-1",
        }
        reversed_ = await _post(tenant, "reverse", reverse, expect=201)
        earn_id = earned[tenant.organisation_id]["transaction"]["id"]
        assert reversed_["transaction"]["details"]["earn_transaction_id"] == earn_id
    balances = [
        (await t.api.get(f"/api/v1/members/{t.member_id}/points")).json()["current_balance"]
        for t in tenants
    ]
    assert balances == [100 - 10 - 5, 200 - 10 - 5]
    await check_ledger(db)


def _spend(tenant: Tenant, reference_id: str, points: int) -> dict[str, Any]:
    return {
        "member_id": tenant.member_id,
        "points": points,
        "reason": "test",
        "reference_id": reference_id,
    }


async def test_a_reused_reference_is_refused_without_naming_another_organisations_transaction(
    tenants: tuple[Tenant, Tenant], db: Database
) -> None:
    first, second = tenants
    theirs = [
        await _post(first, "award", _award(first, "shared-2"), expect=201),
        await _post(first, "earn", _earn(first, "order-2"), expect=201),
        await _post(first, "redeem", _spend(first, "shared-2", 20), expect=201),
        await _post(first, "deduct", _spend(first, "shared-2", 1), expect=201),
    ]
    their_ids = {answer["transaction"]["id"] for answer in theirs}
    bodies: list[str] = []
    for operation, body, expect in (
        ("award", _award(second, "shared-2", points=30), 201),
        ("award", _award(second, "shared-2", points=31), 409),
        ("award", _award(second, "shared-2", points=30), 200),
        ("earn", _earn(second, "order-2", amount=5_000), 201),
        ("earn", _earn(second, "order-2", amount=6_000), 409),
        ("redeem", _spend(second, "shared-2", 20), 201),
        ("redeem", _spend(second, "shared-2", 21), 409),
        ("deduct", _spend(second, "shared-2", 1), 201),
        ("deduct", _spend(second, "shared-2", 1), 200),
    ):
        response = await second.api.post(f"{POINTS}/{operation}", body)
        assert response.status_code == expect, response.text
        bodies.append(response.text)
        if expect == 409:
            assert response.json()["error"]["code"] == "REFERENCE_ID_REUSED"
    for text in bodies:
        assert not any(their_id in text for their_id in their_ids), text
    await check_ledger(db)


async def test_a_reference_reused_for_another_member_of_the_organisation_is_refused(
    api: ApiClient, tenants: tuple[Tenant, Tenant]
) -> None:
    first, _ = tenants
    other = (await api.create_member(organisation_id=first.organisation_id))["id"]
    applied = await _post(first, "award", _award(first, "shared-3"), expect=201)
    error = await _post(first, "award", {**_award(first, "shared-3"), "member_id": other}, 409)
    assert error["error"]["code"] == "REFERENCE_ID_REUSED"
    # Only a transaction of the member asked about is ever named.
    assert error["error"]["details"] == {"reference_id": "shared-3"}
    assert applied["transaction"]["id"] not in str(error)
    error = await _post(first, "award", _award(first, "shared-3", points=71), 409)
    assert error["error"]["details"]["transaction_id"] == applied["transaction"]["id"]


async def test_sibling_chapters_and_members_without_an_organisation_have_their_own_references(
    api: ApiClient, db: Database
) -> None:
    hq = (await api.create_organisation())["id"]
    chapters = [await _tenant(api, db, parent_id=hq) for _ in range(2)]
    hq_key = api.with_key(await issue_key(db, Role.MANAGER, organisation=hq))
    unassigned = (await api.create_member())["id"]
    ids = [
        (await _post(chapter, "award", _award(chapter, "shared-4"), 201))["transaction"]["id"]
        for chapter in chapters
    ]
    body = {"member_id": unassigned, "points": 5, "reason": "welcome", "reference_id": "shared-4"}
    response = await api.post(f"{POINTS}/award", body)
    assert response.status_code == 201, response.text
    ids.append(response.json()["transaction"]["id"])
    assert len(set(ids)) == 3
    # HQ's key acts in each chapter's scope: it replays that chapter's own transaction.
    for chapter, chapter_txn in zip(chapters, ids, strict=False):
        response = await hq_key.post(f"{POINTS}/award", _award(chapter, "shared-4"))
        assert response.status_code == 200, response.text
        assert response.json()["transaction"]["id"] == chapter_txn


async def test_a_transfer_reference_is_per_organisation(
    api: ApiClient, db: Database, tenants: tuple[Tenant, Tenant]
) -> None:
    results = []
    for tenant in tenants:
        await _post(tenant, "award", _award(tenant, f"seed-{tenant.organisation_id}"), 201)
        other = (await api.create_member(organisation_id=tenant.organisation_id))["id"]
        body = {
            "from_member_id": tenant.member_id,
            "to_member_id": other,
            "points": 20,
            "reference_id": "gift-1",
        }
        created = await _post(tenant, "transfer", body, expect=201)
        replayed = await _post(tenant, "transfer", body, expect=200)
        assert replayed["transfer_in"]["id"] == created["transfer_in"]["id"]
        results.append(created["transfer_out"]["id"])
    assert len(set(results)) == 2
    await check_ledger(db)


# ---------------------------------------------------------------- the migration


@pytest.fixture
def fresh_database_url(database_url: str, tmp_path: Path) -> Iterator[str]:
    """An empty database of the kind the tests run on, to migrate step by step."""
    if not database_url.startswith("postgresql"):
        yield f"sqlite+aiosqlite:///{tmp_path / 'migrating.db'}"
        return
    name = f"memberhub_migration_{uuid.uuid4().hex[:12]}"
    asyncio.run(_create_pg_database(database_url, name))
    try:
        yield make_url(database_url).set(database=name).render_as_string(hide_password=False)
    finally:
        asyncio.run(_drop_pg_database(database_url, name))


def _ledger_row(public_id: str, member_id: int, reference_id: str | None, **more: Any) -> Any:
    """An award's row, naming only the columns that revision 0008 already has (and `more`)."""
    return insert(PointTransaction).values(
        public_id=public_id,
        member_id=member_id,
        type=TxnType.AWARD,
        balance_after=1,
        reference_id=reference_id,
        actor="test",
        **more,
    )


def _member_row(public_id: str, organisation_id: int | None) -> Any:
    """A member's row, naming only the columns that revision 0008 already has (the model
    has more, with defaults an insert through it would send)."""
    members = table(
        "members",
        column("id", BigInteger),
        column("public_id", String),
        column("organisation_id", BigInteger),
        column("status", String),
        column("consent_email", Boolean),
        column("consent_sms", Boolean),
        column("consent_analytics", Boolean),
        column("consent_profiling", Boolean),
        column("custom_fields", JSON),
        column("external_ids", JSON),
        column("cancel_at_period_end", Boolean),
        column("version", Integer),
        column("created_at", UTCDateTime),
        column("updated_at", UTCDateTime),
    )
    now = utcnow()
    return (
        insert(members)
        .values(
            public_id=public_id,
            organisation_id=organisation_id,
            status="active",
            consent_email=False,
            consent_sms=False,
            consent_analytics=False,
            consent_profiling=False,
            custom_fields={},
            external_ids={},
            cancel_at_period_end=False,
            version=1,
            created_at=now,
            updated_at=now,
        )
        .returning(members.c.id)
    )


async def test_the_migration_scopes_the_references_already_written(
    fresh_database_url: str,
) -> None:
    await asyncio.to_thread(upgrade, fresh_database_url, "0008")
    database = Database(fresh_database_url, pool_size=2)
    try:
        async with database.transaction() as session:
            organisation = Organisation(public_id="org_x", name="X", slug="x", kind="hq")
            session.add(organisation)
            await session.flush()
            organisation_id = organisation.id
            in_organisation_id = await session.scalar(_member_row("mem_x", organisation_id))
            unassigned_id = await session.scalar(_member_row("mem_y", None))
            assert in_organisation_id is not None
            assert unassigned_id is not None
            await session.execute(_ledger_row("txn_a", in_organisation_id, "ref-1"))
            await session.execute(_ledger_row("txn_b", unassigned_id, "ref-2"))
            await session.execute(_ledger_row("txn_c", unassigned_id, None))
        await asyncio.to_thread(upgrade, fresh_database_url, "head")

        async with database.transaction(read_only=True) as session:
            scopes = await session.execute(
                select(PointTransaction.public_id, PointTransaction.reference_scope).order_by(
                    PointTransaction.public_id
                )
            )
            assert [tuple(row) for row in scopes] == [
                ("txn_a", organisation_id),
                ("txn_b", 0),
                ("txn_c", None),
            ]
        # The reference organisation X applied is free for members without one, once.
        async with database.transaction() as session:
            await session.execute(_ledger_row("txn_d", unassigned_id, "ref-1", reference_scope=0))
        with pytest.raises(IntegrityError):
            async with database.transaction() as session:
                await session.execute(
                    _ledger_row("txn_e", unassigned_id, "ref-1", reference_scope=0)
                )
    finally:
        await database.dispose()


# ------------------------------------------------- reward claims and held deductions


async def test_reward_claim_references_are_kept_apart_per_organisation(
    api: ApiClient, tenants: tuple[Tenant, Tenant], db: Database
) -> None:
    first, second = tenants
    reward = await api.post("/api/v1/rewards", {"code": "CUP-1", "name": "Cup", "points_cost": 10})
    assert reward.status_code == 201, reward.text
    reward_id = reward.json()["id"]
    other = await api.post("/api/v1/rewards", {"code": "CUP-2", "name": "Mug", "points_cost": 10})
    assert other.status_code == 201, other.text
    for tenant in tenants:
        await _post(tenant, "award", _award(tenant, f"seed-{tenant.organisation_id}"), 201)

    def claim_of(tenant: Tenant, reward: str = reward_id) -> tuple[str, dict[str, Any]]:
        body = {"member_id": tenant.member_id, "reference_id": "kiosk-1"}
        return f"/api/v1/rewards/{reward}/claim", body

    theirs = await first.api.post(*claim_of(first))
    assert theirs.status_code == 201, theirs.text
    their_claim = theirs.json()["claim"]["id"]
    ours = await second.api.post(*claim_of(second))
    assert ours.status_code == 201, ours.text  # a claim of its own, not a replay of theirs
    assert ours.json()["replayed"] is False
    assert ours.json()["claim"]["id"] != their_claim
    again = await second.api.post(*claim_of(second))
    assert again.status_code == 200, again.text
    assert again.json()["claim"]["id"] == ours.json()["claim"]["id"]
    refused = await second.api.post(*claim_of(second, other.json()["id"]))
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "REFERENCE_ID_REUSED"
    assert their_claim not in refused.text
    # Another member of the organisation: refused, and the first member's claim not named.
    neighbour = (await api.create_member(organisation_id=first.organisation_id))["id"]
    await _post(first, "award", {**_award(first, "seed-n"), "member_id": neighbour}, 201)
    body = {"member_id": neighbour, "reference_id": "kiosk-1"}
    response = await first.api.post(f"/api/v1/rewards/{reward_id}/claim", body)
    assert response.status_code == 409, response.text
    assert response.json()["error"]["details"] == {"reference_id": "kiosk-1"}
    await check_ledger(db)


async def test_held_deduction_references_are_kept_apart_per_organisation(
    tenants: tuple[Tenant, Tenant], db: Database
) -> None:
    first, second = tenants
    for tenant in tenants:
        await _post(tenant, "award", _award(tenant, f"seed-{tenant.organisation_id}"), 201)

    def held(tenant: Tenant, points: int = 5) -> dict[str, Any]:
        return {**_spend(tenant, "hold-1", points), "require_approval": True}

    theirs = await _post(first, "deduct", held(first), 202)
    ours = await _post(second, "deduct", held(second), 202)
    assert ours["id"] != theirs["id"]
    assert (await _post(second, "deduct", held(second), 202))["id"] == ours["id"]
    response = await second.api.post(f"{POINTS}/deduct", held(second, points=6))
    assert response.status_code == 409, response.text
    assert response.json()["error"]["code"] == "REFERENCE_ID_REUSED"
    assert theirs["id"] not in response.text
    await check_ledger(db)


async def test_the_migration_takes_received_transfers_out_of_lifetime_earned(
    fresh_database_url: str,
) -> None:
    """Before 0027 an incoming transfer counted as earned: the accounts written then are
    corrected by the transfers they received, and only those."""
    await asyncio.to_thread(upgrade, fresh_database_url, "0026")
    database = Database(fresh_database_url, pool_size=2)
    try:
        async with database.transaction() as session:
            receiver = await session.scalar(_member_row("mem_r", None))
            other = await session.scalar(_member_row("mem_o", None))
            assert receiver is not None
            assert other is not None
            await session.execute(
                insert(PointAccount).values(member_id=receiver, current=1000, lifetime_earned=1000)
            )
            await session.execute(
                insert(PointAccount).values(member_id=other, current=50, lifetime_earned=50)
            )
            await session.execute(_ledger_row("txn_a", receiver, None, points=600))
            transfer_in = _ledger_row("txn_t", receiver, None, points=400)
            await session.execute(transfer_in.values(type=TxnType.TRANSFER_IN))
            await session.execute(_ledger_row("txn_o", other, None, points=50))
        await asyncio.to_thread(upgrade, fresh_database_url, "head")

        async with database.transaction(read_only=True) as session:
            rows = await session.execute(
                select(PointAccount.member_id, PointAccount.lifetime_earned)
            )
            earned = {member_id: value for member_id, value in rows}
        assert earned == {receiver: 600, other: 50}
    finally:
        await database.dispose()
