"""Concurrent requests over real HTTP: a balance is never overspent and a reference_id is
never applied twice, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from memberhub.auth.principal import Principal
from memberhub.auth.roles import Role
from memberhub.integrations import orders
from memberhub.kit.actor import Actor
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.members.models import Member
from memberhub.points.models import PointTransaction
from memberhub.points.repository import PointsRepository
from memberhub.settings import Settings
from tests.conftest import issue_key
from tests.points.conftest import award, check_ledger, op, summary
from tests.support import ApiClient
from tests.support_server import running_server


async def _post_all(
    base_url: str, key: str, path: str, bodies: list[dict[str, Any]]
) -> list[httpx.Response]:
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
        return list(
            await asyncio.gather(*(client.post(path, json=b, headers=headers) for b in bodies))
        )


async def test_fifty_concurrent_redemptions_never_overspend(
    api: ApiClient, admin_key: str, settings: Settings, db: Database
) -> None:
    member = await api.create_member()
    for _ in range(4):
        await award(api, member["id"], 250)
    bodies = [{"member_id": member["id"], "points": 100} for _ in range(50)]
    async with running_server(settings) as base_url:
        responses = await _post_all(base_url, admin_key, "/api/v1/points/redeem", bodies)
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {201: 10, 409: 40}, [r.text for r in responses if r.status_code >= 500]
    codes = {r.json()["error"]["code"] for r in responses if r.status_code == 409}
    assert codes == {"INSUFFICIENT_POINTS"}
    points = await summary(api, member["id"])
    assert points["current_balance"] == 0
    assert points["lifetime_redeemed"] == 1000
    await check_ledger(db, [member["id"]])


async def test_twenty_concurrent_awards_with_one_reference_apply_once(
    api: ApiClient, admin_key: str, settings: Settings, db: Database
) -> None:
    member = await api.create_member()
    body = {"member_id": member["id"], "points": 70, "reason": "welcome", "reference_id": "w-1"}
    async with running_server(settings) as base_url:
        responses = await _post_all(base_url, admin_key, "/api/v1/points/award", [body] * 20)
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {201: 1, 200: 19}, [r.text for r in responses]
    assert len({r.json()["transaction"]["id"] for r in responses}) == 1
    assert sum(r.json()["replayed"] for r in responses) == 19
    assert (await summary(api, member["id"]))["current_balance"] == 70
    listed = await api.get("/api/v1/events", params={"type": "points.earned"})
    assert len(listed.json()["data"]) == 1
    await check_ledger(db, [member["id"]])


async def test_concurrent_awards_with_one_reference_apply_once_in_each_organisation(
    api: ApiClient, settings: Settings, db: Database
) -> None:
    tenants = []
    for _ in range(2):
        organisation = (await api.create_organisation())["id"]
        member = (await api.create_member(organisation_id=organisation))["id"]
        tenants.append((member, await issue_key(db, Role.MANAGER, organisation=organisation)))
    async with running_server(settings) as base_url:
        answers = await asyncio.gather(
            *(
                _post_all(
                    base_url,
                    key,
                    "/api/v1/points/award",
                    [{"member_id": member, "points": 70, "reason": "x", "reference_id": "w-1"}]
                    * 10,
                )
                for member, key in tenants
            )
        )
    created = set()
    for responses in answers:
        assert Counter(r.status_code for r in responses) == {201: 1, 200: 9}, [
            r.text for r in responses
        ]
        ids = {r.json()["transaction"]["id"] for r in responses}
        assert len(ids) == 1
        created |= ids
    assert len(created) == 2
    for member, _ in tenants:
        assert (await summary(api, member))["current_balance"] == 70
    await check_ledger(db, [member for member, _ in tenants])


async def test_opposite_concurrent_transfers_neither_deadlock_nor_lose_points(
    api: ApiClient, admin_key: str, settings: Settings, db: Database
) -> None:
    first = await api.create_member()
    second = await api.create_member()
    await award(api, first["id"], 1000)
    await award(api, second["id"], 1000)
    forth = {"from_member_id": first["id"], "to_member_id": second["id"], "points": 30}
    back = {"from_member_id": second["id"], "to_member_id": first["id"], "points": 20}
    async with running_server(settings) as base_url:
        responses = await _post_all(
            base_url, admin_key, "/api/v1/points/transfer", [forth, back] * 15
        )
    assert Counter(r.status_code for r in responses) == {201: 30}, [r.text for r in responses]
    balances = [(await summary(api, m["id"]))["current_balance"] for m in (first, second)]
    assert balances == [1000 - 15 * 30 + 15 * 20, 1000 + 15 * 30 - 15 * 20]
    await check_ledger(db, [first["id"], second["id"]])


async def test_a_refund_reversal_and_a_redeem_of_the_member_at_once_both_go_through(
    api: ApiClient,
    admin_key: str,
    settings: Settings,
    db: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A refund's reversal locks the member's account before the earn's batch, as a spend
    does: the other order deadlocked with a redeem (PostgreSQL rolled one back, a 500).
    The reversal is held once it has locked the batch, to make the overlap certain."""
    member = await api.create_member()
    earned = await op(
        api,
        "earn",
        {"member_id": member["id"], "amount": 20_000, "currency": "MYR", "reference_id": "e-1"},
    )
    started = asyncio.Event()
    lock_batch = PointsRepository.batch_for_transaction

    async def lock_then_wait(self: PointsRepository, transaction_id: int) -> Any:
        batch = await lock_batch(self, transaction_id)
        started.set()
        await asyncio.sleep(0.3)  # the redeem arrives meanwhile
        return batch

    monkeypatch.setattr(PointsRepository, "batch_for_transaction", lock_then_wait)
    principal = Principal.system(Actor.system("integration:int_orders"))

    async def refund() -> int:
        async with db.transaction() as session:
            buyer = await session.scalar(select(Member).where(Member.public_id == member["id"]))
            earn = await session.scalar(
                select(PointTransaction).where(
                    PointTransaction.public_id == earned["transaction"]["id"]
                )
            )
            assert buyer is not None
            assert earn is not None
            return await orders._reverse_share(
                session,
                principal,
                buyer,
                earn,
                reference_id=f"int_orders:refund:r1:{earn.public_id}",
                refund_id="r1",
                order_amount=20_000,
                before=0,
                after=10_000,
                now=utcnow(),
            )

    async with (
        running_server(settings) as base_url,
        httpx.AsyncClient(base_url=base_url, timeout=60) as client,
    ):

        async def redeem() -> httpx.Response:
            await started.wait()
            return await client.post(
                "/api/v1/points/redeem",
                json={"member_id": member["id"], "points": 10},
                headers={"Authorization": f"Bearer {admin_key}"},
            )

        reversed_points, redeemed = await asyncio.gather(refund(), redeem())

    assert reversed_points == 50
    assert redeemed.status_code == 201, redeemed.text
    await check_ledger(db, [member["id"]])
