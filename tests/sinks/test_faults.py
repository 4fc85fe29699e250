"""A sink whose vendor is down loses nothing and catches up in order; one failing sink
holds up neither another sink nor webhook endpoints."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from memberhub.events.models import Event
from memberhub.integrations.hub import IntegrationHub
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.ops.retention import purge_expired_history
from memberhub.settings import Settings
from memberhub.sinks import forwarding
from memberhub.sinks.forwarding import MAX_BACKOFF_SECONDS, run_event_sinks
from tests.fakes.segment import FakeSegment, running_fake_segment
from tests.fakes.webhook_receiver import running_receiver
from tests.sinks.conftest import (
    ANALYTICS,
    PUBLIC_API_TOKEN,
    WRITE_KEY,
    Clock,
    award,
    create_sink,
    emit_earnings,
    forward,
    segment_integration,
)
from tests.support import ApiClient, age_the_feed
from tests.webhooks.conftest import create_endpoint, running_loop


def balances(fake: FakeSegment, member_id: str) -> list[int]:
    return [
        call["properties"]["balance_after"]
        for call in fake.calls_for(member_id)
        if call["type"] == "track" and call["event"] == "Points Earned"
    ]


async def test_a_vendor_down_for_an_hour_loses_nothing_and_the_sink_catches_up_in_order(
    api: ApiClient, db: Database, hub: IntegrationHub, segment: FakeSegment, clock: Clock
) -> None:
    integration = await segment_integration(api, segment)
    sink = await create_sink(api, integration["id"], ["points.earned"])
    member = await api.create_member(consent=ANALYTICS)
    for _ in range(3):
        await award(api, member["id"], 10)
    await forward(db, hub, clock.now)
    assert balances(segment, member["id"]) == [10, 20, 30]

    segment.down(503)
    attempts_before = segment.requests
    for _ in range(12):  # an hour, five minutes at a time, a change in each
        await award(api, member["id"], 10)
        clock.advance(300)
        await forward(db, hub, clock.now)
    assert balances(segment, member["id"]) == [10, 20, 30]
    assert segment.requests > attempts_before
    during = (await api.get(f"/api/v1/event-sinks/{sink['id']}")).json()
    assert during["failures"] > 0
    assert during["failing_since"] is not None
    assert "503" in during["last_error"]
    assert during["lag"] >= 12
    status = (await api.get("/api/v1/sync/status")).json()
    [shown] = status["event_sinks"]
    assert (shown["id"], shown["healthy"]) == (sink["id"], False)
    log = (await api.get(f"/api/v1/event-sinks/{sink['id']}/deliveries")).json()["data"]
    assert log[0]["status"] == "failed"

    segment.up()
    clock.advance(MAX_BACKOFF_SECONDS + 1)
    assert await forward(db, hub, clock.now) == 12
    assert balances(segment, member["id"]) == [10 * n for n in range(1, 16)]
    assert segment.duplicates == 0
    after = (await api.get(f"/api/v1/event-sinks/{sink['id']}")).json()
    assert (after["failures"], after["failing_since"], after["lag"]) == (0, None, 0)
    assert after["events_sent"] == 15
    status = (await api.get("/api/v1/sync/status")).json()
    assert status["event_sinks"][0]["healthy"] is True


async def _age_feed(db: Database, days: int) -> list[int]:
    """Every event now occurred `days` ago and was dispatched; the positions kept."""
    await age_the_feed(db, days)
    return await _positions(db)


async def _positions(db: Database) -> list[int]:
    async with db.transaction(read_only=True) as session:
        return list(await session.scalars(select(Event.position).order_by(Event.position)))


async def test_a_vendor_down_for_longer_than_the_retention_period_loses_nothing(
    api: ApiClient, db: Database, hub: IntegrationHub, segment: FakeSegment, clock: Clock
) -> None:
    integration = await segment_integration(api, segment)
    sink = await create_sink(api, integration["id"], ["points.earned"])
    member = await api.create_member(consent=ANALYTICS)
    await award(api, member["id"], 10)
    await forward(db, hub, clock.now)
    segment.down(503)
    for _ in range(3):
        await award(api, member["id"], 10)
    await forward(db, hub, clock.now)
    position = (await api.get(f"/api/v1/event-sinks/{sink['id']}")).json()["event_position"]
    feed = await _age_feed(db, 91)
    unsent = [p for p in feed if p > position]
    assert len(unsent) >= 3

    # The vendor has been down for longer than RETENTION_DAYS: what the sink passed goes,
    # what it has still to send stays.
    await purge_expired_history(db, older_than=utcnow() - timedelta(days=90))
    assert await _positions(db) == unsent

    segment.up()
    clock.advance(MAX_BACKOFF_SECONDS + 1)
    assert await forward(db, hub, clock.now) == 3
    assert balances(segment, member["id"]) == [10, 20, 30, 40]
    await purge_expired_history(db, older_than=utcnow() - timedelta(days=90))
    assert await _positions(db) == unsent[-1:]  # the newest is always kept


async def test_a_disabled_or_deleted_sink_holds_no_history(
    api: ApiClient, db: Database, hub: IntegrationHub, segment: FakeSegment, clock: Clock
) -> None:
    integration = await segment_integration(api, segment)
    paused = await create_sink(api, integration["id"], ["points.earned"], name="Paused")
    deleted = await create_sink(api, integration["id"], ["points.earned"], name="Deleted")
    member = await api.create_member(consent=ANALYTICS)
    for _ in range(3):
        await award(api, member["id"], 10)
    off = await api.patch(f"/api/v1/event-sinks/{paused['id']}", {"enabled": False})
    assert off.status_code == 200, off.text
    assert (await api.delete(f"/api/v1/event-sinks/{deleted['id']}")).status_code == 204
    await forward(db, hub, clock.now)
    feed = await _age_feed(db, 91)

    await purge_expired_history(db, older_than=utcnow() - timedelta(days=90))
    assert await _positions(db) == feed[-1:]

    # Enabled again, the sink goes on from the oldest event still kept: the newest.
    on = await api.patch(f"/api/v1/event-sinks/{paused['id']}", {"enabled": True})
    assert on.status_code == 200, on.text
    await award(api, member["id"], 10)
    assert await forward(db, hub, clock.now) == 2
    assert balances(segment, member["id"]) == [30, 40]


async def test_a_requested_replay_holds_the_events_it_has_still_to_send(
    api: ApiClient, db: Database, hub: IntegrationHub, segment: FakeSegment, clock: Clock
) -> None:
    integration = await segment_integration(api, segment)
    sink = await create_sink(api, integration["id"], ["points.earned"])
    member = await api.create_member(consent=ANALYTICS)
    for _ in range(3):
        await award(api, member["id"], 10)
    await forward(db, hub, clock.now)
    async with db.transaction(read_only=True) as session:
        first = await session.scalar(select(func.min(Event.occurred_at)))
    assert first is not None
    replay = await api.post(
        f"/api/v1/event-sinks/{sink['id']}/replay",
        {
            "since": (first - timedelta(seconds=1)).isoformat(),
            "until": (utcnow() + timedelta(seconds=1)).isoformat(),
        },
    )
    assert replay.status_code == 202, replay.text
    start = replay.json()["replay"]["from_position"]
    feed = await _age_feed(db, 91)

    await purge_expired_history(db, older_than=utcnow() - timedelta(days=90))
    assert await _positions(db) == [p for p in feed if p >= start]

    assert await forward(db, hub, clock.now) == 3
    assert segment.duplicates == 4  # the three tracks again, and the identify before them
    await purge_expired_history(db, older_than=utcnow() - timedelta(days=90))
    assert await _positions(db) == feed[-1:]


async def test_a_failing_sink_waits_out_its_backoff_before_trying_again(
    api: ApiClient, db: Database, hub: IntegrationHub, segment: FakeSegment, clock: Clock
) -> None:
    integration = await segment_integration(api, segment)
    await create_sink(api, integration["id"], ["points.earned"])
    member = await api.create_member(consent=ANALYTICS)
    await award(api, member["id"], 10)
    segment.down(503)
    await forward(db, hub, clock.now)
    tried = segment.requests
    clock.advance(1)
    await forward(db, hub, clock.now)
    assert segment.requests == tried  # inside the backoff: no request
    clock.advance(10)
    await forward(db, hub, clock.now)
    assert segment.requests > tried


async def test_one_failing_sink_delays_neither_another_sink_nor_webhook_endpoints(
    api: ApiClient, db: Database, hub: IntegrationHub, settings: Settings, segment: FakeSegment
) -> None:
    async with (
        running_fake_segment(WRITE_KEY, PUBLIC_API_TOKEN) as slow,
        running_receiver() as receiver,
    ):
        slow.hang(2.5)
        slow.down(503)
        healthy_integration = await segment_integration(api, segment, name="Healthy")
        slow_integration = await segment_integration(api, slow, name="Slow")
        await create_sink(api, healthy_integration["id"], ["points.earned"])
        await create_sink(api, slow_integration["id"], ["points.earned"])
        await create_endpoint(api, receiver.url("hook"), ["points.earned"])
        member = await api.create_member(consent=ANALYTICS)
        for _ in range(5):
            await award(api, member["id"], 10)

        async with running_loop(db, settings):
            started = time.monotonic()
            forwarding = asyncio.create_task(forward(db, hub))
            await receiver.wait_for_count("hook", 5, timeout=2.0)
            while len(balances(segment, member["id"])) < 5:
                assert time.monotonic() - started < 2.0, "the healthy sink waited"
                await asyncio.sleep(0.02)
            # Both got everything while the slow vendor still held its own sink.
            assert not forwarding.done()
            await forwarding
        assert slow.tracks() == []
        assert balances(segment, member["id"]) == [10, 20, 30, 40, 50]
        sinks = (await api.get("/api/v1/event-sinks")).json()["data"]
        by_integration = {s["integration_id"]: s for s in sinks}
        assert by_integration[slow_integration["id"]]["failures"] == 1
        assert by_integration[healthy_integration["id"]]["failures"] == 0
        # The slow sink's position did not move: nothing of it is lost.
        assert by_integration[slow_integration["id"]]["lag"] >= 5


async def test_the_worker_pass_forwards_every_enabled_sink_and_skips_disabled_ones(
    api: ApiClient, db: Database, hub: IntegrationHub, segment: FakeSegment
) -> None:
    integration = await segment_integration(api, segment)
    sink = await create_sink(api, integration["id"], ["points.earned"], enabled=False)
    member = await api.create_member(consent=ANALYTICS)
    await award(api, member["id"], 10)
    assert await run_event_sinks(db, hub, utcnow()) == 0
    assert segment.requests == 0
    enabled = await api.patch(f"/api/v1/event-sinks/{sink['id']}", {"enabled": True})
    assert enabled.status_code == 200, enabled.text
    assert await forward(db, hub) == 1


async def test_a_window_that_fails_part_way_resends_only_what_the_vendor_did_not_take(
    api: ApiClient, db: Database, hub: IntegrationHub, segment: FakeSegment, clock: Clock
) -> None:
    integration = await segment_integration(api, segment)
    sink = await create_sink(api, integration["id"], ["points.earned"])
    member = await api.create_member(consent=ANALYTICS)
    # Calls of about 2 KB: 400 of them need two batches.
    await emit_earnings(db, member["id"], 400, clock.now, reason=lambda _i: "r" * 2000)
    segment.answer_next(None, 503, 503)
    await forward(db, hub, clock.now)
    taken = len(segment.tracks())
    assert 0 < taken < 400
    log = (await api.get(f"/api/v1/event-sinks/{sink['id']}/deliveries")).json()["data"]
    assert log[0]["status"] == "partial"

    clock.advance(MAX_BACKOFF_SECONDS + 1)
    assert await forward(db, hub, clock.now) == 400 - taken
    assert [c["properties"]["balance_after"] for c in segment.tracks()] == list(range(400))
    assert segment.duplicates == 0


async def test_a_failure_after_the_first_window_keeps_its_position_and_drops_the_read_ahead(
    api: ApiClient,
    db: Database,
    hub: IntegrationHub,
    segment: FakeSegment,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Windows of three events: the next is read while one is sent.
    monkeypatch.setattr(forwarding, "EVENTS_PER_WINDOW", 3)
    integration = await segment_integration(api, segment)
    sink = await create_sink(api, integration["id"], ["points.earned"])
    member = await api.create_member(consent=ANALYTICS)
    await emit_earnings(db, member["id"], 9, clock.now, reason=lambda _i: "r")
    # Reads started once the vendor has taken a request hang, so one is still under way
    # when the next send fails.
    read_window = forwarding._read_window
    hold = True

    async def slow_read(*args: Any) -> Any:
        if hold and segment.requests >= 1:
            await asyncio.sleep(3600)
        return await read_window(*args)

    monkeypatch.setattr(forwarding, "_read_window", slow_read)
    segment.answer_next(None, 503, 503)  # the first request taken, the next one refused
    tasks_before = asyncio.all_tasks()
    await asyncio.wait_for(forward(db, hub, clock.now), 60)
    assert asyncio.all_tasks() - tasks_before == set()  # the read ahead was stopped
    hold = False
    taken = balances(segment, member["id"])
    assert taken == list(range(len(taken)))
    assert 0 < len(taken) < 9
    log = (await api.get(f"/api/v1/event-sinks/{sink['id']}/deliveries")).json()["data"]
    assert [row["status"] for row in log][:2] == ["failed", "succeeded"]
    assert log[0]["first_position"] == log[1]["last_position"] + 1

    clock.advance(MAX_BACKOFF_SECONDS + 1)
    assert await forward(db, hub, clock.now) == 9 - len(taken)
    assert balances(segment, member["id"]) == list(range(9))
    assert segment.duplicates == 0
