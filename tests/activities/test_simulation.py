"""Simulation equals evaluation: for random rules (every points effect, conditions, caps,
priorities, stop-processing, versions) and a random history, what
`POST /earning-rules/simulate` says an activity would credit is exactly what recording it
credits, and the ledger's transactions name those rules and versions. On SQLite and on
PostgreSQL."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Coroutine
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memberhub.app import create_app
from memberhub.auth.roles import Role
from memberhub.auth.service import create_api_key
from memberhub.kit.actor import Actor
from memberhub.kit.db import Database
from memberhub.settings import Settings
from tests.activities.conftest import ACTIVITIES, RULES, iso, noon_yesterday

T = TypeVar("T")
_ids = itertools.count()

TYPES = ("booking.completed", "order.paid")


class Harness:
    """An app and an admin client on a private event loop (hypothesis runs synchronous
    examples)."""

    def __init__(self, database_url: str, data_dir: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.app = create_app(
            Settings(
                database_url=database_url,
                data_dir=data_dir,
                secret_key="test-secret-key-not-for-production",
                env="test",
                log_level="WARNING",
                rate_limit="100000/minute",
            )
        )
        self.db = Database(database_url, pool_size=2)
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://testserver"
        )
        self.key = self.run(self._admin_key())

    async def _admin_key(self) -> str:
        async with self.db.transaction() as session:
            issued = await create_api_key(
                session, Actor.system("test"), name="simulation", role=Role.ADMIN
            )
            return issued.secret

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    def call(self, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
        headers = {"Authorization": f"Bearer {self.key}"}
        response = self.run(self.client.request(method, path, json=body, headers=headers))
        assert response.status_code == expect, (method, path, body, response.text)
        return response.json() if response.content else None

    def close(self) -> None:
        self.run(self.client.aclose())
        self.run(self.app.state.db.dispose())
        self.run(self.db.dispose())
        self.loop.close()


effects = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("fixed_points"), "points": st.integers(1, 100)},
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("points_per_amount"),
            "points": st.integers(1, 3),
            "per_amount": st.integers(50, 500),
            "currency": st.sampled_from(["MYR", "EUR"]),
            "max_points": st.integers(1, 1000),
        }
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("multiplier"),
            "percent": st.sampled_from([150, 200, 300]),
            "max_points": st.integers(1, 500),
        }
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("nth_activity_bonus"),
            "points": st.integers(1, 50),
            "nth": st.integers(1, 3),
            "period": st.sampled_from(["day", "month", "all_time"]),
            "repeat": st.booleans(),
        }
    ),
)
conditions = st.sampled_from(
    [
        {},
        {"field": "activity.type", "op": "eq", "value": "booking.completed"},
        {"field": "activity.attributes.amount", "op": "gte", "value": 1000},
        {"field": "activity.attributes.category", "op": "in", "value": ["spa", "gym"]},
        {"field": "member.status", "op": "eq", "value": "pending"},
        {"not": {"field": "activity.attributes.currency", "op": "eq", "value": "EUR"}},
        {
            "any": [
                {"field": "activity.attributes.amount", "op": "lt", "value": 500},
                {"field": "activity.type", "op": "ne", "value": "order.paid"},
            ]
        },
    ]
)
caps = st.fixed_dictionaries(
    {},
    optional={
        "per_member_per_day": st.fixed_dictionaries(
            {}, optional={"awards": st.integers(1, 3), "points": st.integers(10, 300)}
        ).filter(bool),
        "per_member_per_month": st.fixed_dictionaries({"points": st.integers(10, 500)}),
        "overall": st.fixed_dictionaries({"awards": st.integers(1, 4)}),
    },
)
rules = st.lists(
    st.fixed_dictionaries(
        {
            "priority": st.integers(0, 3),
            "stop_processing": st.booleans(),
            "conditions": conditions,
            "effect": effects,
            "caps": caps,
            "revise": st.booleans(),
        }
    ),
    min_size=1,
    max_size=4,
)
activities = st.fixed_dictionaries(
    {
        "type": st.sampled_from(TYPES),
        "attributes": st.one_of(
            st.just({}),
            st.fixed_dictionaries(
                {
                    "amount": st.integers(0, 20_000),
                    "currency": st.sampled_from(["MYR", "EUR"]),
                },
                optional={"category": st.sampled_from(["spa", "gym", "food"])},
            ),
        ),
        "minutes": st.integers(0, 120),
    }
)

HARNESS: Harness | None = None


def _activity(member_id: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": spec["type"],
        "occurred_at": iso(noon_yesterday() + timedelta(minutes=spec["minutes"])),
        "source": "simulation",
        "source_id": f"sim-{next(_ids)}",
        "member_id": member_id,
        "attributes": spec["attributes"],
    }


def _archive_every_rule(h: Harness) -> None:
    """Rules of earlier examples (and tests) are archived: each example has its own."""
    for rule in h.call("GET", f"{RULES}?limit=500")["data"]:
        h.call("DELETE", f"{RULES}/{rule['id']}", expect=204)


@settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(rules=rules, history=st.lists(activities, max_size=3), activity=activities)
def _simulation_equals_recording(
    rules: list[dict[str, Any]], history: list[dict[str, Any]], activity: dict[str, Any]
) -> None:
    h = HARNESS
    assert h is not None
    _archive_every_rule(h)
    for spec in rules:
        body = {k: v for k, v in spec.items() if k != "revise"}
        rule = h.call("POST", RULES, {"name": f"r{next(_ids)}", **body}, expect=201)
        if spec["revise"]:
            h.call("PATCH", f"{RULES}/{rule['id']}", {"priority": spec["priority"] + 1})
    member = h.call("POST", "/api/v1/members", {"email": f"sim{next(_ids)}@example.com"}, 201)
    for past in history:
        h.call("POST", ACTIVITIES, _activity(member["id"], past), expect=201)
    body = _activity(member["id"], activity)
    simulated = h.call("POST", f"{RULES}/simulate", body)
    recorded = h.call("POST", ACTIVITIES, body, expect=201)["activity"]
    expected = [
        (rule["rule_id"], rule["rule_version"], rule["effect"], rule["points"])
        for rule in simulated["rules"]
        if rule["points"] > 0
    ]
    credited = [
        (credit["rule_id"], credit["rule_version"], credit["effect"], credit["points"])
        for credit in recorded["credits"]
    ]
    assert credited == expected, (simulated, recorded)
    assert simulated["total_points"] == sum(points for *_, points in credited)
    txns = h.call("GET", f"/api/v1/members/{member['id']}/points/transactions?limit=500")
    produced = [
        (t["details"]["rule_id"], t["details"]["rule_version"], t["points"] + t["pending_points"])
        for t in reversed(txns["data"])
        if t["details"]["activity_id"] == recorded["id"]
    ]
    assert produced == [(rule, version, points) for rule, version, _, points in credited]
    # Recorded now, the same activity would be a replay that credits nothing.
    again = h.call("POST", f"{RULES}/simulate", body)
    assert (again["replay_of"], again["rules"]) == (recorded["id"], [])


def test_simulation_equals_the_real_evaluation(database_url: str, tmp_path: Path) -> None:
    global HARNESS
    HARNESS = Harness(database_url, tmp_path / "data")
    try:
        _simulation_equals_recording()
    finally:
        HARNESS.close()
        HARNESS = None
