"""Concurrent activities over real HTTP, on SQLite and on PostgreSQL: a rule's caps are
never exceeded and a source id is recorded (and earns) once."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from memberhub.activities.schemas import ActivityIn
from memberhub.activities.service import MATCH_BATCH, record_activity
from memberhub.auth.principal import Principal
from memberhub.kit.actor import Actor
from memberhub.kit.db import Database
from memberhub.members.schemas import MemberCreate
from memberhub.members.service import create_member
from memberhub.settings import Settings
from tests.activities.conftest import (
    ACTIVITIES,
    RULES,
    activity_body,
    balance,
    create_rule,
    noon_yesterday,
    record,
)
from tests.points.conftest import check_ledger
from tests.support import ApiClient
from tests.support_server import running_server


async def _post_all(base_url: str, key: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
        return list(
            await asyncio.gather(
                *(client.post(ACTIVITIES, json=b, headers=headers) for b in bodies)
            )
        )


async def test_twenty_simultaneous_activities_against_a_daily_cap_of_three_award_three(
    api: ApiClient, admin_key: str, settings: Settings, db: Database
) -> None:
    member = await api.create_member()
    rule = await create_rule(api, caps={"per_member_per_day": {"awards": 3}})
    day = noon_yesterday()
    bodies = [activity_body(member, occurred_at=day) for _ in range(20)]
    async with running_server(settings) as base_url:
        responses = await _post_all(base_url, admin_key, bodies)
    assert Counter(r.status_code for r in responses) == {201: 20}, [
        r.text for r in responses if r.status_code != 201
    ]
    credited = [r.json()["activity"]["credits"] for r in responses]
    assert sorted(len(c) for c in credited) == [0] * 17 + [1] * 3
    assert {c[0]["rule_id"] for c in credited if c} == {rule["id"]}
    assert await balance(api, member["id"]) == 300
    simulated = await api.post(f"{RULES}/simulate", activity_body(member, occurred_at=day))
    assert simulated.json()["rules"][0]["capped_by"] == "per_member_per_day"
    await check_ledger(db, [member["id"]])


async def test_twenty_simultaneous_repeats_of_a_source_id_record_and_earn_once(
    api: ApiClient, admin_key: str, settings: Settings, db: Database
) -> None:
    member = await api.create_member()
    await create_rule(api)
    body = activity_body(member, source_id="order-1")
    async with running_server(settings) as base_url:
        responses = await _post_all(base_url, admin_key, [body] * 20)
    assert Counter(r.status_code for r in responses) == {201: 1, 200: 19}, [
        r.text for r in responses
    ]
    assert len({r.json()["activity"]["id"] for r in responses}) == 1
    assert await balance(api, member["id"]) == 100
    await check_ledger(db, [member["id"]])


async def test_an_overall_cap_holds_across_members_at_once(
    api: ApiClient, admin_key: str, settings: Settings, db: Database
) -> None:
    members = [await api.create_member() for _ in range(6)]
    await create_rule(api, caps={"overall": {"points": 250}})
    bodies = [activity_body(m) for m in members for _ in range(2)]
    async with running_server(settings) as base_url:
        responses = await _post_all(base_url, admin_key, bodies)
    assert Counter(r.status_code for r in responses) == {201: 12}
    points = sorted(
        credit["points"] for r in responses for credit in r.json()["activity"]["credits"]
    )
    assert points == [50, 100, 100]
    await check_ledger(db, [m["id"] for m in members])


async def _done_or_waiting(db: Database, task: asyncio.Task[Any], is_postgres: bool) -> None:
    if not is_postgres:  # writers take turns: the second waits for the first's commit
        for _ in range(20):
            await asyncio.sleep(0)
        return
    while not task.done():
        async with db.transaction(read_only=True) as session:
            if await session.scalar(
                text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
            ):
                return
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("first", ["member", "activity"])
async def test_an_activity_recorded_as_its_member_is_created_is_matched(
    api: ApiClient, db: Database, is_postgres: bool, first: str
) -> None:
    """A signup creating the member while the shop's webhook records the member's order,
    both in flight at once: whichever transaction commits first, the activity is matched."""
    await create_rule(api)  # 100 points for every activity
    principal = Principal.system(Actor.system("test"))
    email = "race@example.com"
    started, go_on = asyncio.Event(), asyncio.Event()
    created: list[str] = []

    async def signup() -> None:
        async with db.transaction() as session:
            member = await create_member(session, principal, MemberCreate(email=email))
            created.append(member.public_id)
            if first == "member":
                started.set()
                await go_on.wait()  # committed only once the webhook is under way

    async def webhook() -> str:
        async with db.transaction() as session:
            body = activity_body(email=email, source="shop", source_id="O-1")
            recorded = await record_activity(session, principal, ActivityIn.model_validate(body))
            if first == "activity":
                started.set()
                await go_on.wait()
            return recorded.activity.id

    leading = asyncio.create_task(signup() if first == "member" else webhook())
    await asyncio.wait_for(started.wait(), 10)
    following = asyncio.create_task(webhook() if first == "member" else signup())
    # The second transaction runs until it is done or waits for the first's lock.
    await asyncio.wait_for(_done_or_waiting(db, following, is_postgres), 10)
    go_on.set()
    results = await asyncio.wait_for(asyncio.gather(leading, following), 20)
    activity_id = next(r for r in results if isinstance(r, str))
    activity = (await api.get(f"{ACTIVITIES}/{activity_id}")).json()
    assert (activity["status"], activity["member_id"]) == ("matched", created[0]), activity
    assert await balance(api, created[0]) == 100


async def test_every_activity_waiting_for_a_new_member_is_matched(api: ApiClient) -> None:
    await create_rule(api, effect={"type": "fixed_points", "points": 1})
    for _ in range(MATCH_BATCH + 1):
        out = await record(api, activity_body(email="many@example.com"))
        assert out["activity"]["status"] == "unmatched"
    member = await api.create_member(email="many@example.com")
    waiting = (await api.get(ACTIVITIES, {"status": "unmatched"})).json()["data"]
    assert waiting == []
    assert await balance(api, member["id"]) == MATCH_BATCH + 1
