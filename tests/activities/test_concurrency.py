"""Concurrent activities over real HTTP, on SQLite and on PostgreSQL: a rule's caps are
never exceeded and a source id is recorded (and earns) once."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import httpx

from memberhub.kit.db import Database
from memberhub.settings import Settings
from tests.activities.conftest import (
    ACTIVITIES,
    RULES,
    activity_body,
    balance,
    create_rule,
    noon_yesterday,
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
