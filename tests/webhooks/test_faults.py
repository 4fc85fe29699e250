"""Failing, slow and rate-limiting receivers, with short retry schedules."""

from __future__ import annotations

import asyncio
import itertools

from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.settings import Settings
from memberhub.webhooks.delivery import (
    JITTER,
    AttemptResult,
    DeliveryConfig,
    fan_out,
    next_delay,
    record,
)
from tests.fakes.webhook_receiver import Received, Reply, WebhookReceiver, fail_times, retry_after
from tests.support import ApiClient
from tests.webhooks.conftest import (
    attempts_of,
    create_endpoint,
    delivery_loop,
    emit_alerts,
    running_loop,
)


async def test_a_receiver_failing_n_times_gets_the_event_on_schedule(
    api: ApiClient, db: Database, settings: Settings, receiver: WebhookReceiver
) -> None:
    endpoint = await create_endpoint(api, receiver.url("flaky"))
    receiver.set_secrets("flaky", endpoint["secret"])
    receiver.set_handler("flaky", fail_times(3))
    [event_id] = await emit_alerts(db, 1)

    async with running_loop(db, settings, webhook_retry_schedule="0.3s,0.6s,0.9s,5s"):
        await receiver.wait_for_count("flaky", 1, timeout=15)

    received = receiver.received("flaky")
    assert [r.status for r in received] == [500, 500, 500, 200]
    assert {r.webhook_id for r in received} == {event_id}
    assert all(r.verified for r in received)
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(received)]
    # Each delay with its ±20% jitter (and a little slack for the loop's polling).
    for gap, delay in zip(gaps, (0.3, 0.6, 0.9), strict=True):
        assert delay * 0.8 <= gap <= delay * 1.2 + 0.5, gaps
    attempts = await attempts_of(db, event_id)
    assert [(a.number, a.status_code, a.succeeded) for a in attempts] == [
        (1, 500, False),
        (2, 500, False),
        (3, 500, False),
        (4, 200, True),
    ]
    assert all(a.error == "HTTP 500" for a in attempts[:3])
    body = (await api.get(f"/api/v1/webhook-endpoints/{endpoint['id']}")).json()
    assert body["failing_since"] is None
    assert body["last_success_at"] is not None


async def test_after_the_last_attempt_the_delivery_is_failed(
    api: ApiClient, db: Database, settings: Settings, receiver: WebhookReceiver
) -> None:
    endpoint = await create_endpoint(api, receiver.url("down"))
    receiver.set_handler("down", fail_times(100, status=503))
    [event_id] = await emit_alerts(db, 1)

    async with running_loop(db, settings, webhook_retry_schedule="0.1s,0.1s"):
        await receiver.wait_for(lambda: len(receiver.received("down")) >= 3, timeout=10)
        await receiver.wait_for(
            lambda: len(receiver.received("down")) == 3, timeout=1, message="no 4th attempt"
        )

    deliveries = (await api.get(f"/api/v1/webhook-endpoints/{endpoint['id']}/deliveries")).json()[
        "data"
    ]
    [delivery] = deliveries
    assert delivery["event_id"] == event_id
    assert delivery["status"] == "failed"
    assert delivery["attempt_count"] == 3
    assert delivery["next_attempt_at"] is None
    assert [a["status_code"] for a in delivery["attempts"]] == [503, 503, 503]
    # Still failing, but not long enough to be disabled.
    body = (await api.get(f"/api/v1/webhook-endpoints/{endpoint['id']}")).json()
    assert body["enabled"] is True
    assert body["failing_since"] is not None


async def test_a_receiver_that_times_out_gets_the_event_later(
    api: ApiClient, db: Database, settings: Settings, receiver: WebhookReceiver
) -> None:
    await create_endpoint(api, receiver.url("slow"))

    def first_hangs(request: Received, seen: int) -> Reply:
        return Reply(delay=5.0) if seen == 0 else Reply()

    receiver.set_handler("slow", first_hangs)
    [event_id] = await emit_alerts(db, 1)

    async with running_loop(
        db, settings, webhook_timeout_seconds=0.5, webhook_retry_schedule="0.3s"
    ):
        await receiver.wait_for_count("slow", 1, timeout=10)

    received = receiver.received("slow")
    assert [r.webhook_id for r in received] == [event_id, event_id]
    assert 0.5 + 0.3 * 0.8 <= received[1].at - received[0].at < 3.0
    attempts = await attempts_of(db, event_id)
    assert attempts[0].status_code is None
    assert attempts[0].error == "timed out after 0.5 s"
    assert 400 <= attempts[0].duration_ms < 1500
    assert attempts[1].succeeded


async def test_429_with_retry_after_waits_as_asked_within_bounds(
    api: ApiClient, db: Database, settings: Settings, receiver: WebhookReceiver
) -> None:
    await create_endpoint(api, receiver.url("busy"))
    await create_endpoint(api, receiver.url("greedy"))
    receiver.set_handler("busy", retry_after(1.5))
    # Asks for an hour; the bound (2 s here) wins.
    receiver.set_handler("greedy", retry_after(3600, status=503))
    [event_id] = await emit_alerts(db, 1)

    async with running_loop(
        db, settings, webhook_retry_schedule="0.1s", webhook_max_retry_after_seconds=2.0
    ):
        await receiver.wait_for_count("busy", 1, timeout=10)
        await receiver.wait_for_count("greedy", 1, timeout=10)

    busy = receiver.received("busy")
    assert [r.status for r in busy] == [429, 200]
    assert 1.5 <= busy[1].at - busy[0].at < 2.5
    greedy = receiver.received("greedy")
    assert [r.status for r in greedy] == [503, 200]
    assert 2.0 <= greedy[1].at - greedy[0].at < 3.0
    assert {r.webhook_id for r in busy + greedy} == {event_id}


def test_retry_after_never_brings_an_attempt_before_the_schedule(settings: Settings) -> None:
    config = DeliveryConfig.from_settings(settings)  # 5 s … 10 h, bound 1 h
    low, high = 1 - JITTER, 1 + JITTER
    for index, gap in enumerate(config.schedule):
        for asked in (0.0, 30.0, 86_400.0):
            delay = next_delay(config, index, asked)
            # The receiver's wish within the bound, the schedule's gap at the least.
            wish = min(asked, config.max_retry_after)
            assert max(wish, gap * low) <= delay <= max(wish, gap * high), (index, asked)
    assert config.schedule[-1] > config.max_retry_after  # the case that was cut short


async def test_410_disables_the_endpoint(
    api: ApiClient, db: Database, settings: Settings, receiver: WebhookReceiver
) -> None:
    endpoint = await create_endpoint(api, receiver.url("gone"))
    receiver.set_handler("gone", fail_times(100, status=410))
    await emit_alerts(db, 2)
    path = f"/api/v1/webhook-endpoints/{endpoint['id']}"

    async with running_loop(db, settings, webhook_retry_schedule="0.1s,0.1s"):
        await receiver.wait_for_count("gone", 1, timeout=10, successful=False)
        for _ in range(100):
            if not (await api.get(path)).json()["enabled"]:
                break
            await asyncio.sleep(0.05)

    # No retry after a 410: one attempt per delivery at most, and both are failed.
    statuses = [r.status for r in receiver.received("gone")]
    assert statuses
    assert set(statuses) == {410}
    assert len(statuses) <= 2
    body = (await api.get(path)).json()
    assert body["enabled"] is False
    assert "410" in body["disabled_reason"]
    deliveries = (await api.get(f"{path}/deliveries")).json()["data"]
    assert [d["status"] for d in deliveries] == ["failed", "failed"]


async def test_results_for_an_endpoint_deleted_mid_send_do_not_sink_the_others(
    api: ApiClient, db: Database, settings: Settings
) -> None:
    doomed = await create_endpoint(api, "http://127.0.0.1:9/doomed")
    kept = await create_endpoint(api, "http://127.0.0.1:9/kept")
    [event_id] = await emit_alerts(db, 1)
    async with db.transaction() as session:
        assert await fan_out(session, utcnow()) == 1
    loop = delivery_loop(db, settings)
    claimed = await loop.claim()
    assert sorted(c.endpoint.public_id for c in claimed) == sorted([doomed["id"], kept["id"]])
    # The endpoint goes while its send is in flight.
    assert (await api.delete(f"/api/v1/webhook-endpoints/{doomed['id']}")).status_code == 204

    results = [AttemptResult(c, utcnow(), 0.01, 200, "ok", None) for c in claimed]
    finals = await record(db, results, loop.config, worker_id="test")

    by_endpoint = {c.endpoint.public_id: final for c, final in zip(claimed, finals, strict=True)}
    assert by_endpoint == {doomed["id"]: None, kept["id"]: "succeeded"}
    [delivery] = (await api.get(f"/api/v1/webhook-endpoints/{kept['id']}/deliveries")).json()[
        "data"
    ]
    assert delivery["event_id"] == event_id
    assert delivery["status"] == "succeeded"
    assert [a["status_code"] for a in delivery["attempts"]] == [200]
