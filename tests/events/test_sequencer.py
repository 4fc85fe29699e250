"""The sequencer: changes commit without a global lock, and the feed still gives every
event exactly once, in commit order, with no gap, however late a transaction commits."""

from __future__ import annotations

import asyncio
import functools
import itertools
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, text

from memberhub.audit.models import AuditEntry
from memberhub.audit.service import record_write, verify_chain
from memberhub.auth.principal import Principal
from memberhub.auth.roles import Role
from memberhub.events import sequencer
from memberhub.events.catalog import AlertRaised
from memberhub.events.models import Event
from memberhub.events.sequencer import SequencerLoop, run_passes
from memberhub.events.service import emit
from memberhub.kit.actor import Actor
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.members.service import delete_member, get_member
from memberhub.points.service import award_points
from tests.conftest import issue_key
from tests.support import ApiClient

EVENTS = "/api/v1/events"


def alert(label: str) -> AlertRaised:
    return AlertRaised(
        alert_id=f"alr_{label}",
        alert_type="LOW_REDEMPTION_RATE",
        priority="low",
        member_id=None,
        message=label,
        data={},
        occurred_at=utcnow(),
    )


class Poller:
    """A feed client that keeps its cursor, as an integration polling the feed would."""

    def __init__(self, api: ApiClient) -> None:
        self.api = api
        self.cursor: str | None = None
        self.received: list[str] = []

    async def poll(self) -> list[str]:
        got: list[str] = []
        while True:
            params: dict[str, Any] = {"limit": 50}
            if self.cursor is not None:
                params["cursor"] = self.cursor
            response = await self.api.get(EVENTS, params=params)
            assert response.status_code == 200, response.text
            body = response.json()
            # Alerts written by these tests are named by their message; others by their id.
            page = [event["data"].get("message", event["id"]) for event in body["data"]]
            got.extend(page)
            self.cursor = body["pagination"]["next_cursor"] or self.cursor
            if not body["pagination"]["has_more"]:
                break
        self.received.extend(got)
        return got


async def commit_alert(db: Database, label: str) -> None:
    async with db.transaction() as session:
        emit(session, alert(label))


async def hold_then_commit(
    db: Database, label: str, opened: asyncio.Event, gate: asyncio.Event
) -> None:
    """Write three events, say so, and commit only when the gate opens."""
    async with db.transaction() as session:
        for k in range(3):
            emit(session, alert(f"{label}-e{k}"))
        await session.flush()
        opened.set()
        await gate.wait()


async def positions(db: Database) -> list[int]:
    async with db.transaction(read_only=True) as session:
        rows = await session.scalars(select(Event.position).order_by(Event.position))
        return [p for p in rows if p is not None]


async def test_a_transaction_committing_late_is_received_after_the_others_once(
    db: Database, api: ApiClient, is_postgres: bool
) -> None:
    if not is_postgres:
        pytest.skip("SQLite has one writer at a time: no transaction commits out of order")
    poller = Poller(api)
    slow_started = asyncio.Event()
    release_slow = asyncio.Event()

    async def slow() -> None:
        async with db.transaction() as session:
            emit(session, alert("slow"))
            await session.flush()  # the event row exists, with an id below the others'
            slow_started.set()
            await release_slow.wait()

    holder = asyncio.create_task(slow())
    await slow_started.wait()
    for n in range(3):
        await commit_alert(db, f"fast-{n}")

    assert await poller.poll() == ["fast-0", "fast-1", "fast-2"]
    release_slow.set()
    await holder
    assert await poller.poll() == ["slow"]
    assert await poller.poll() == []
    assert await positions(db) == [1, 2, 3, 4]


async def test_eight_writers_committing_out_of_order_never_make_the_feed_skip_or_repeat(
    db: Database, api: ApiClient, is_postgres: bool
) -> None:
    """Eight writers, each with a transaction open at once, commit in a shuffled order while
    the sequencer loop runs and a poller reads; every event arrives exactly once, and every
    poll sees positions without a gap."""
    rng = random.Random(13)
    poller = Poller(api)
    stop = asyncio.Event()
    sequencer = asyncio.create_task(SequencerLoop(db, interval_seconds=0.01).run(stop))
    expected: list[str] = []
    writers = 8 if is_postgres else 1  # SQLite: one open writer at a time
    for round_number in range(6):
        gates = [asyncio.Event() for _ in range(writers)]
        opened = [asyncio.Event() for _ in range(writers)]

        tasks = [
            asyncio.create_task(hold_then_commit(db, f"r{round_number}-w{n}", opened[n], gates[n]))
            for n in range(writers)
        ]
        for flag in opened:
            await flag.wait()
        order = list(range(writers))
        rng.shuffle(order)
        for n in order:
            gates[n].set()
            await tasks[n]
            expected.extend(f"r{round_number}-w{n}-e{k}" for k in range(3))
            await poller.poll()
    await poller.poll()
    stop.set()
    await sequencer

    assert sorted(poller.received) == sorted(expected)
    assert len(poller.received) == len(set(poller.received))
    # Commit order: each writer's events arrive after those of every writer that committed
    # before it (a poll followed each commit), and in the order they were written.
    assert poller.received == expected
    assert await positions(db) == list(range(1, len(expected) + 1))


async def test_concurrent_api_writes_reach_the_feed_exactly_once(
    db: Database, api: ApiClient
) -> None:
    poller = Poller(api)
    stop = asyncio.Event()
    sequencer = asyncio.create_task(SequencerLoop(db, interval_seconds=0.01).run(stop))

    async def writer(n: int) -> None:
        for k in range(5):
            response = await api.post(
                "/api/v1/members", {"email": f"w{n}-{k}@example.com", "first_name": "W"}
            )
            assert response.status_code == 201, response.text

    async def keep_polling() -> None:
        while not stop.is_set():
            await poller.poll()
            await asyncio.sleep(0)

    reader = asyncio.create_task(keep_polling())
    await asyncio.gather(*(writer(n) for n in range(8)))
    stop.set()
    await asyncio.gather(reader, sequencer)
    await poller.poll()

    async with db.transaction(read_only=True) as session:
        total = await session.scalar(select(func.count()).select_from(Event))
    assert total == 40
    assert len(poller.received) == 40
    assert await positions(db) == list(range(1, 41))


async def test_audit_entries_are_chained_in_the_order_the_sequencer_saw_them(
    db: Database, is_postgres: bool
) -> None:
    actor = Actor.system("test")
    if is_postgres:
        # An entry written early and committed late is chained after the others.
        started, release = asyncio.Event(), asyncio.Event()

        async def slow() -> None:
            async with db.transaction() as session:
                record_write(
                    session, actor, action="slow", object_type="t", object_id="1", changes={}
                )
                await session.flush()
                started.set()
                await release.wait()

        holder = asyncio.create_task(slow())
        await started.wait()
    for n in range(3):
        async with db.transaction() as session:
            record_write(
                session, actor, action=f"fast{n}", object_type="t", object_id="1", changes={}
            )
    await run_passes(db)
    if is_postgres:
        release.set()
        await holder
        await run_passes(db)

    async with db.transaction(read_only=True) as session:
        actions = list(
            await session.scalars(select(AuditEntry.action).order_by(AuditEntry.chain_position))
        )
        verdict = await verify_chain(session)
    assert actions == ["fast0", "fast1", "fast2", *(["slow"] if is_postgres else [])]
    assert verdict.intact
    assert verdict.checked == len(actions)


async def write_then_fail(db: Database) -> None:
    async with db.transaction() as session:
        emit(session, alert("rolled back"))
        await session.flush()
        raise RuntimeError("roll back")


async def test_nothing_committed_means_nothing_sequenced(db: Database) -> None:
    async with db.transaction() as session:
        emit(session, alert("kept"))
    with pytest.raises(RuntimeError, match="roll back"):
        await write_then_fail(db)
    result = await run_passes(db)
    assert (result.events, result.audit_entries) == (1, 0)
    assert await run_passes(db) == type(result)(0, 0)


async def test_a_failing_pass_is_retried_ever_less_often(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    tries: list[float] = []

    async def unreachable(*_args: object, **_kwargs: object) -> sequencer.PassResult:
        tries.append(time.monotonic())
        raise ConnectionRefusedError("the database is gone")

    # The waits the loop asks for, read as it asks (a busy machine stretches the real ones).
    waits: list[float] = []
    real_wait_for = asyncio.wait_for

    async def wait_for(awaitable: Any, delay: float | None) -> Any:
        if delay is not None and delay < 5:
            waits.append(delay)
        return await real_wait_for(awaitable, delay)

    monkeypatch.setattr(sequencer, "run_passes", unreachable)
    monkeypatch.setattr(sequencer.asyncio, "wait_for", wait_for)
    stop = asyncio.Event()
    loop = asyncio.create_task(sequencer.SequencerLoop(db, interval_seconds=0.001).run(stop))
    await asyncio.sleep(0.3)
    stop.set()
    await real_wait_for(loop, 5)  # a stop ends the wait between tries at once
    # Without a backoff, hundreds of tries (each logged with its traceback) in 0.3 s.
    assert 3 <= len(tries) <= 10, len(tries)
    assert len(waits) == len(tries)
    assert all(later == 2 * earlier for earlier, later in itertools.pairwise(waits)), waits


async def _until_a_lock_is_awaited(db: Database) -> None:
    """Return once some session of this database waits for a row lock."""
    waiting = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock'"
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        async with db.transaction(read_only=True) as session:
            if await session.scalar(text(waiting)):
                return
        await asyncio.sleep(0.005)
    raise AssertionError("nothing came to wait for the lock")


async def test_points_and_an_erasure_of_one_member_follow_one_another(
    db: Database, api: ApiClient, is_postgres: bool
) -> None:
    """A member's events keep the order of its changes: an award arriving while the member
    is being erased waits for the erasure (points lock the member's row as profile changes
    do), then finds no member, so nothing is fed after `member.deleted`."""
    if not is_postgres:
        pytest.skip("SQLite runs one writer at a time: the order holds by construction")
    member = await api.create_member()
    award = {"member_id": member["id"], "points": 10, "reason": "r"}
    assert (await api.post("/api/v1/points/award", award)).status_code == 201
    awarding = functools.partial(api.post, "/api/v1/points/award", award)
    assert (await _during_erasure(db, member["id"], awarding)).status_code == 404

    feed = await api.get(EVENTS, params={"member_id": member["id"]})
    types = [e["type"] for e in feed.json()["data"]]
    assert types == ["member.created", "points.earned", "member.deleted"], types


async def test_a_profile_change_waits_for_a_points_change_of_the_member_under_way(
    db: Database, api: ApiClient, is_postgres: bool
) -> None:
    if not is_postgres:
        pytest.skip("SQLite runs one writer at a time: the order holds by construction")
    member = await api.create_member()
    awarding, release = asyncio.Event(), asyncio.Event()

    async def award() -> None:
        async with db.transaction() as session:
            system = Principal.system(Actor.system("t"))
            held = await get_member(session, system, member["id"])
            await award_points(session, system.actor, held, points=5, reason="held")
            await session.flush()
            awarding.set()
            await release.wait()

    holder = asyncio.create_task(award())
    await awarding.wait()
    patching = asyncio.create_task(
        api.patch(f"/api/v1/members/{member['id']}", {"first_name": "Later"})
    )
    try:
        await _until_a_lock_is_awaited(db)
        assert not patching.done()
    finally:
        release.set()
        await holder
    assert (await patching).status_code == 200

    feed = await api.get(EVENTS, params={"member_id": member["id"]})
    types = [e["type"] for e in feed.json()["data"]]
    assert types == ["member.created", "points.earned", "member.updated"], types


async def _during_erasure(
    db: Database, member_id: str, call: Callable[[], Coroutine[Any, Any, httpx.Response]]
) -> httpx.Response:
    """Run `call` while the member's erasure is under way; answer what it answered once the
    erasure committed."""
    erasing, release = asyncio.Event(), asyncio.Event()

    async def erase() -> None:
        async with db.transaction() as session:
            await delete_member(session, Principal.system(Actor.system("t")), member_id)
            await session.flush()
            erasing.set()
            await release.wait()

    holder = asyncio.create_task(erase())
    await erasing.wait()
    pending = asyncio.create_task(call())
    try:
        await _until_a_lock_is_awaited(db)
        assert not pending.done()
    finally:
        release.set()
        await holder
    return await pending


@pytest.mark.parametrize("operation", ["redeem", "claim", "approve"])
async def test_what_waits_for_a_members_erasure_finds_no_member(
    db: Database, api: ApiClient, is_postgres: bool, operation: str
) -> None:
    """A redeem, a reward claim or an approval arriving while the member is being erased
    finds the member gone (404) and writes nothing after `member.deleted`."""
    if not is_postgres:
        pytest.skip("SQLite runs one writer at a time: the order holds by construction")
    member = await api.create_member()
    award = {"member_id": member["id"], "points": 100, "reason": "r"}
    assert (await api.post("/api/v1/points/award", award)).status_code == 201
    if operation == "redeem":
        body = {"member_id": member["id"], "points": 40}
        call = functools.partial(api.post, "/api/v1/points/redeem", body)
    elif operation == "claim":
        reward = await api.post(
            "/api/v1/rewards", {"code": "ERASE1", "name": "x", "points_cost": 10, "stock": 5}
        )
        assert reward.status_code == 201, reward.text
        path = f"/api/v1/rewards/{reward.json()['id']}/claim"
        call = functools.partial(api.post, path, {"member_id": member["id"]})
    else:
        body = {"member_id": member["id"], "points": 30, "reason": "fix", "require_approval": True}
        held = await api.post("/api/v1/points/deduct", body)
        assert held.status_code == 202, held.text
        manager = api.with_key(await issue_key(db, Role.MANAGER))
        call = functools.partial(manager.post, f"/api/v1/approvals/{held.json()['id']}/approve", {})

    answer = await _during_erasure(db, member["id"], call)

    assert answer.status_code == 404, answer.text
    feed = await api.get(EVENTS, params={"member_id": member["id"]})
    assert feed.json()["data"][-1]["type"] == "member.deleted"
    if operation == "claim":
        assert (await api.get(f"/api/v1/rewards/{reward.json()['id']}")).json()["stock"] == 5
