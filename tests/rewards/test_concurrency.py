"""Claims racing each other over real HTTP: stock, balances and per-member limits stay exact.

The application runs under uvicorn (tests/support_server.py) and the claims arrive at once
over separate connections, so they really overlap inside the server and the database
(on PostgreSQL they run in parallel transactions; on SQLite they queue for the write lock).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from memberhub.kit.db import Database
from memberhub.members.models import Member
from memberhub.points.models import PointTransaction
from memberhub.rewards.models import RewardClaim
from memberhub.settings import Settings
from tests.rewards.conftest import REWARDS, award, balance, create_reward, get_reward
from tests.support import ApiClient
from tests.support_server import running_server

CLAIMS_AT_ONCE = 20


@pytest.fixture
async def server(
    settings: Settings, db: Database, admin_key: str
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the real server, authenticated with the admin key."""
    limits = httpx.Limits(max_connections=CLAIMS_AT_ONCE, max_keepalive_connections=CLAIMS_AT_ONCE)
    async with (
        running_server(settings) as base_url,
        httpx.AsyncClient(
            base_url=base_url,
            headers={"Authorization": f"Bearer {admin_key}"},
            limits=limits,
            timeout=120,
        ) as client,
    ):
        yield client


async def claim_all(
    client: httpx.AsyncClient, reward_id: str, bodies: list[dict[str, Any]]
) -> list[httpx.Response]:
    return list(
        await asyncio.gather(
            *(client.post(f"{REWARDS}/{reward_id}/claim", json=body) for body in bodies)
        )
    )


def outcomes(responses: list[httpx.Response]) -> Counter[tuple[int, str | None]]:
    return Counter(
        (r.status_code, r.json()["error"]["code"] if r.status_code >= 400 else None)
        for r in responses
    )


async def stored(db: Database, member_public_id: str | None = None) -> tuple[int, int]:
    """(claim rows, redeem transactions), of one member or of everyone."""
    async with db.transaction(read_only=True) as session:
        claims = select(func.count()).select_from(RewardClaim)
        redeems = select(func.count()).where(PointTransaction.type == "redeem")
        if member_public_id is not None:
            member_id = await session.scalar(
                select(Member.id).where(Member.public_id == member_public_id)
            )
            claims = claims.where(RewardClaim.member_id == member_id)
            redeems = redeems.where(PointTransaction.member_id == member_id)
        return int(await session.scalar(claims) or 0), int(await session.scalar(redeems) or 0)


async def test_twenty_simultaneous_claims_of_five_units_sell_exactly_five(
    api: ApiClient, db: Database, server: httpx.AsyncClient
) -> None:
    member = await api.create_member()
    await award(api, member["id"], 100 * CLAIMS_AT_ONCE)
    reward = await create_reward(api, points_cost=100, stock=5)

    responses = await claim_all(
        server, reward["id"], [{"member_id": member["id"]}] * CLAIMS_AT_ONCE
    )

    assert outcomes(responses) == {(201, None): 5, (409, "OUT_OF_STOCK"): 15}
    claim_ids = {r.json()["claim"]["id"] for r in responses if r.status_code == 201}
    assert len(claim_ids) == 5
    assert (await get_reward(api, reward["id"]))["stock"] == 0
    assert await stored(db) == (5, 5)
    assert await balance(api, member["id"]) == 100 * CLAIMS_AT_ONCE - 5 * 100
    # Each success reported the balance right after its own claim: 5 distinct steps.
    balances = sorted(
        r.json()["balance"]["current_balance"] for r in responses if r.status_code == 201
    )
    assert balances == [1500, 1600, 1700, 1800, 1900]


async def test_simultaneous_claims_by_many_members_never_oversell(
    api: ApiClient, db: Database, server: httpx.AsyncClient
) -> None:
    members = [await api.create_member() for _ in range(CLAIMS_AT_ONCE)]
    for member in members:
        await award(api, member["id"], 250)
    reward = await create_reward(api, points_cost=200, stock=7)

    responses = await claim_all(server, reward["id"], [{"member_id": m["id"]} for m in members])

    assert outcomes(responses) == {(201, None): 7, (409, "OUT_OF_STOCK"): 13}
    assert (await get_reward(api, reward["id"]))["stock"] == 0
    assert await stored(db) == (7, 7)
    winners = {r.json()["claim"]["member_id"] for r in responses if r.status_code == 201}
    for member in members:
        assert await balance(api, member["id"]) == (50 if member["id"] in winners else 250)


async def test_simultaneous_claims_by_one_member_respect_the_per_member_limit(
    api: ApiClient, db: Database, server: httpx.AsyncClient
) -> None:
    member = await api.create_member()
    await award(api, member["id"], 10 * CLAIMS_AT_ONCE)
    reward = await create_reward(api, points_cost=10, per_member_limit=3)

    responses = await claim_all(
        server, reward["id"], [{"member_id": member["id"]}] * CLAIMS_AT_ONCE
    )

    assert outcomes(responses) == {(201, None): 3, (409, "CLAIM_LIMIT_REACHED"): 17}
    assert await stored(db, member["id"]) == (3, 3)
    assert await balance(api, member["id"]) == 10 * CLAIMS_AT_ONCE - 30


async def test_simultaneous_claims_beyond_the_balance_redeem_only_what_it_covers(
    api: ApiClient, db: Database, server: httpx.AsyncClient
) -> None:
    member = await api.create_member()
    await award(api, member["id"], 350)
    reward = await create_reward(api, points_cost=100, stock=10)

    responses = await claim_all(
        server, reward["id"], [{"member_id": member["id"]}] * CLAIMS_AT_ONCE
    )

    assert outcomes(responses) == {(201, None): 3, (409, "INSUFFICIENT_POINTS"): 17}
    assert (await get_reward(api, reward["id"]))["stock"] == 7
    assert await stored(db) == (3, 3)
    assert await balance(api, member["id"]) == 50


async def test_simultaneous_repeats_of_one_reference_claim_once(
    api: ApiClient, db: Database, server: httpx.AsyncClient
) -> None:
    member = await api.create_member()
    await award(api, member["id"], 1000)
    reward = await create_reward(api, points_cost=100, stock=10)
    body = {"member_id": member["id"], "reference_id": "order-42"}

    responses = await claim_all(server, reward["id"], [body] * CLAIMS_AT_ONCE)

    assert outcomes(responses) == {(201, None): 1, (200, None): CLAIMS_AT_ONCE - 1}
    assert len({r.json()["claim"]["id"] for r in responses}) == 1
    assert (await get_reward(api, reward["id"]))["stock"] == 9
    assert await stored(db) == (1, 1)
    assert await balance(api, member["id"]) == 900


async def test_one_reference_sent_for_many_members_at_once_claims_for_one_of_them(
    api: ApiClient, db: Database, server: httpx.AsyncClient
) -> None:
    members = [await api.create_member() for _ in range(10)]
    for member in members:
        await award(api, member["id"], 100)
    reward = await create_reward(api, points_cost=100)
    bodies = [{"member_id": m["id"], "reference_id": "order-43"} for m in members]

    responses = await claim_all(server, reward["id"], bodies)

    assert outcomes(responses) == {(201, None): 1, (409, "REFERENCE_ID_REUSED"): 9}
    assert await stored(db) == (1, 1)


async def test_simultaneous_cancels_of_one_claim_refund_once(
    api: ApiClient, db: Database, server: httpx.AsyncClient
) -> None:
    member = await api.create_member()
    await award(api, member["id"], 1000)
    reward = await create_reward(api, points_cost=100, stock=1)
    made = await server.post(f"{REWARDS}/{reward['id']}/claim", json={"member_id": member["id"]})
    claim_id = made.json()["claim"]["id"]

    responses = await asyncio.gather(
        *(
            server.post(f"{REWARDS}/claims/{claim_id}/cancel", json={"reason": "duplicate"})
            for _ in range(10)
        )
    )

    assert outcomes(list(responses)) == {(200, None): 1, (409, "CLAIM_ALREADY_CANCELLED"): 9}
    assert (await get_reward(api, reward["id"]))["stock"] == 1
    assert await balance(api, member["id"]) == 1000
    async with db.transaction(read_only=True) as session:
        refunds = await session.scalar(
            select(func.count()).where(PointTransaction.type == "redeem_refund")
        )
    assert refunds == 1
