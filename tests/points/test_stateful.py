"""Random sequences of every ledger operation, with the ledger's invariants checked after
each step: balance = sum of remaining in active batches; aggregates match the transaction
log; no negative balance unless the program allowed one; every spend's batch allocations
add up. Runs through the HTTP API on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Coroutine
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import select

from memberhub.app import create_app
from memberhub.auth.roles import Role
from memberhub.auth.service import create_api_key
from memberhub.kit.actor import Actor
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.members.models import Member
from memberhub.points.jobs import activate_pending_points, expire_points
from memberhub.points.models import PointAccount
from memberhub.settings import Settings
from tests.points.conftest import check_ledger

T = TypeVar("T")
_references = itertools.count()


class Harness:
    """An app, its database and an admin client on a private event loop (hypothesis runs
    synchronous steps)."""

    def __init__(self, database_url: str, data_dir: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.settings = Settings(
            database_url=database_url,
            data_dir=data_dir,
            secret_key="test-secret-key-not-for-production",
            env="test",
            log_level="WARNING",
            rate_limit="100000/minute",
        )
        self.db = Database(database_url, pool_size=2)
        self.app = create_app(self.settings)
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://testserver"
        )
        self.key = self.run(self._admin_key())

    async def _admin_key(self) -> str:
        async with self.db.transaction() as session:
            issued = await create_api_key(
                session, Actor.system("test"), name="stateful", role=Role.ADMIN
            )
            return issued.secret

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    def call(self, method: str, path: str, body: Any = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.key}"}
        return self.run(self.client.request(method, path, json=body, headers=headers))

    def close(self) -> None:
        self.run(self.client.aclose())
        self.run(self.app.state.db.dispose())
        self.run(self.db.dispose())
        self.loop.close()


HARNESS: Harness | None = None
Amount = st.integers(min_value=0, max_value=60_000)
Points = st.integers(min_value=1, max_value=400)
Days = st.integers(min_value=1, max_value=15)


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        assert HARNESS is not None
        self.h = HARNESS
        self.members: list[str] = []
        self.earns: list[tuple[str, str]] = []  # (member, earn reference)
        self.negative_allowed = False
        self.clock_days = 0
        self.reward_id = ""
        self.claims: list[str] = []

    def post(self, operation: str, body: dict[str, Any], allowed: set[int]) -> dict[str, Any]:
        response = self.h.call("POST", f"/api/v1/points/{operation}", body)
        assert response.status_code in allowed, (operation, body, response.text)
        if response.status_code == 409:
            code = response.json()["error"]["code"]
            assert code in {
                "INSUFFICIENT_POINTS",
                "EXCEEDS_REVERSIBLE",
                "NOTHING_TO_REVERSE",
                "NOTHING_TO_RECOVER",
                "EXCEEDS_RECOVERABLE",
                "BATCH_NOT_EXTENDABLE",
            }, response.text
        return dict(response.json())

    def batches(self, member: str, status: str) -> list[dict[str, Any]]:
        response = self.h.call(
            "GET", f"/api/v1/members/{member}/points/batches?status={status}&limit=500"
        )
        assert response.status_code == 200, response.text
        return list(response.json()["data"])

    @initialize()
    def create_members(self) -> None:
        self.h.call(
            "PATCH",
            "/api/v1/program",
            {"negative_balance_policy": "forbid", "pending_days": 0, "expiry_policy": "never"},
        )
        for _ in range(3):
            response = self.h.call(
                "POST", "/api/v1/members", {"email": f"s{next(_references)}@example.com"}
            )
            assert response.status_code == 201, response.text
            self.members.append(response.json()["id"])
        reward = {"code": f"R{next(_references)}", "name": "Mug", "points_cost": 150, "stock": 4}
        response = self.h.call("POST", "/api/v1/rewards", reward)
        assert response.status_code == 201, response.text
        self.reward_id = response.json()["id"]

    @rule(who=st.integers(0, 2), amount=Amount, repeat=st.booleans())
    def earn(self, who: int, amount: int, repeat: bool) -> None:
        member = self.members[who]
        mine = [ref for m, ref in self.earns if m == member]
        if repeat and mine:
            reference = mine[-1]
            # A repeat with the same reference either replays or, with another amount, is
            # refused: both leave the ledger as it was.
            response = self.h.call(
                "POST",
                "/api/v1/points/earn",
                {
                    "member_id": member,
                    "amount": amount,
                    "currency": "MYR",
                    "reference_id": reference,
                },
            )
            assert response.status_code in (200, 409), response.text
            return
        reference = f"order-{next(_references)}"
        body = {"member_id": member, "amount": amount, "currency": "MYR", "reference_id": reference}
        self.post("earn", body, {201})
        self.earns.append((member, reference))

    @rule(who=st.integers(0, 2), points=Points, expires_in=st.none() | Days)
    def award(self, who: int, points: int, expires_in: int | None) -> None:
        body: dict[str, Any] = {"member_id": self.members[who], "points": points, "reason": "r"}
        if expires_in is not None:
            expires = utcnow() + timedelta(days=self.clock_days + expires_in)
            body["expires_at"] = expires.isoformat()
        self.post("award", body, {201})

    @rule(who=st.integers(0, 2), points=Points)
    def redeem(self, who: int, points: int) -> None:
        self.post("redeem", {"member_id": self.members[who], "points": points}, {201, 409})

    @rule(who=st.integers(0, 2), points=Points)
    def deduct(self, who: int, points: int) -> None:
        body = {"member_id": self.members[who], "points": points, "reason": "correction"}
        self.post("deduct", body, {201, 409})

    @precondition(lambda self: bool(self.earns))
    @rule(pick=st.integers(0, 1000), points=st.none() | Points)
    def reverse(self, pick: int, points: int | None) -> None:
        member, reference = self.earns[pick % len(self.earns)]
        body: dict[str, Any] = {
            "member_id": member,
            "earn_reference_id": reference,
            "reference_id": f"refund-{next(_references)}",
        }
        if points is not None:
            body["points"] = points
        self.post("reverse", body, {201, 409})

    @rule(who=st.integers(0, 2), pick=st.integers(0, 1000), days=Days)
    def extend(self, who: int, pick: int, days: int) -> None:
        batches = [b for b in self.batches(self.members[who], "active") if b["expires_at"]]
        if not batches:
            return
        batch = batches[pick % len(batches)]
        expires = utcnow() + timedelta(days=self.clock_days + 61 + days)
        body = {"batch_id": batch["id"], "expires_at": expires.isoformat(), "reason": "r"}
        self.post("extend", body, {201, 409, 422})

    @rule(who=st.integers(0, 2), pick=st.integers(0, 1000), points=st.none() | Points)
    def recover(self, who: int, pick: int, points: int | None) -> None:
        batches = self.batches(self.members[who], "expired")
        if not batches:
            return
        batch = batches[pick % len(batches)]
        body: dict[str, Any] = {"batch_id": batch["id"], "reason": "r"}
        if points is not None:
            body["points"] = points
        self.post("recover", body, {201, 409})

    @rule(source=st.integers(0, 2), to=st.integers(0, 2), points=Points)
    def transfer(self, source: int, to: int, points: int) -> None:
        body = {
            "from_member_id": self.members[source],
            "to_member_id": self.members[to],
            "points": points,
        }
        self.post("transfer", body, {201, 409} if source != to else {422})

    @rule(who=st.integers(0, 2))
    def claim_reward(self, who: int) -> None:
        response = self.h.call(
            "POST", f"/api/v1/rewards/{self.reward_id}/claim", {"member_id": self.members[who]}
        )
        assert response.status_code in (201, 409), response.text
        if response.status_code == 201:
            self.claims.append(response.json()["claim"]["id"])
        else:
            assert response.json()["error"]["code"] in {"INSUFFICIENT_POINTS", "OUT_OF_STOCK"}

    @precondition(lambda self: bool(self.claims))
    @rule(pick=st.integers(0, 1000))
    def cancel_claim(self, pick: int) -> None:
        claim = self.claims[pick % len(self.claims)]
        response = self.h.call(
            "POST", f"/api/v1/rewards/claims/{claim}/cancel", {"reason": "changed mind"}
        )
        assert response.status_code in (200, 409), response.text

    @rule(days=st.integers(0, 40))
    def run_jobs(self, days: int) -> None:
        """Time passes: pending points activate and due points expire."""
        self.clock_days += days
        now = utcnow() + timedelta(days=self.clock_days)

        async def run() -> None:
            async with self.h.db.transaction() as session:
                await activate_pending_points(session, now)
            await expire_points(self.h.db, now)

        self.h.run(run())

    @rule(allow=st.booleans())
    def negative_policy(self, allow: bool) -> None:
        policy = "allow_for_reversals" if allow else "forbid"
        response = self.h.call("PATCH", "/api/v1/program", {"negative_balance_policy": policy})
        assert response.status_code == 200, response.text
        self.negative_allowed = self.negative_allowed or allow

    @rule(days=st.sampled_from([0, 7]))
    def pending_period(self, days: int) -> None:
        response = self.h.call("PATCH", "/api/v1/program", {"pending_days": days})
        assert response.status_code == 200, response.text

    @invariant()
    def ledger_holds(self) -> None:
        if not self.members:
            return
        self.h.run(check_ledger(self.h.db, self.members))
        if not self.negative_allowed:
            self.h.run(self._no_negative_balance())

    async def _no_negative_balance(self) -> None:
        async with self.h.db.transaction(read_only=True) as session:
            balances = await session.scalars(
                select(PointAccount.current)
                .join(Member, Member.id == PointAccount.member_id)
                .where(Member.public_id.in_(self.members))
            )
            assert all(balance >= 0 for balance in balances)


def test_random_operation_sequences_keep_the_ledger_consistent(
    database_url: str, tmp_path: Path
) -> None:
    global HARNESS
    HARNESS = Harness(database_url, tmp_path / "data")
    try:
        run_state_machine_as_test(
            LedgerMachine,
            settings=settings(
                max_examples=25,
                stateful_step_count=30,
                deadline=None,
                database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            ),
        )
    finally:
        HARNESS.close()
        HARNESS = None
