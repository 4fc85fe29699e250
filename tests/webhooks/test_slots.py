"""An endpoint's slots: each goes straight on from a finished send to the endpoint's next
delivery claimed ahead, through a connection of its own; claims share what may be claimed
ahead and do not wait for a fan-out; what a receiver gets and what is kept of its answer."""

from __future__ import annotations

import asyncio
import functools
import operator
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime

import httpx
import pytest
from sqlalchemy import func, select, update

from memberhub.events.models import Event
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.settings import Settings
from memberhub.webhooks.delivery import (
    FAN_OUT_FIRST_BATCH,
    RECORD_BATCH_TARGET,
    RECORD_GATHER_SECONDS,
    RESPONSE_BODY_LIMIT,
    AttemptResult,
    Claimed,
    DeliveryLoop,
    EndpointState,
    fan_out,
)
from memberhub.webhooks.models import WebhookAttempt, WebhookDelivery
from tests.fakes.webhook_receiver import Reply, WebhookReceiver, always
from tests.support import ApiClient
from tests.webhooks.conftest import create_endpoint, delivery_loop, emit_alerts, running_loop


class GatedSends:
    """Stands in for `DeliveryLoop.send`: each send waits until the test lets it finish."""

    def __init__(self) -> None:
        self.started: list[int] = []
        self.transports: dict[int, httpx.AsyncBaseTransport] = {}
        self._gates: dict[int, asyncio.Event] = {}

    async def __call__(
        self, claimed: Claimed, transport: httpx.AsyncBaseTransport
    ) -> AttemptResult:
        self.started.append(claimed.delivery_id)
        self.transports[claimed.delivery_id] = transport
        gate = self._gates[claimed.delivery_id] = asyncio.Event()
        await gate.wait()
        return AttemptResult(claimed, utcnow(), 0.001, 200, "ok", None)

    def finish(self, delivery_id: int) -> None:
        self._gates[delivery_id].set()


def claimed_ahead(endpoint: EndpointState, delivery_id: int) -> Claimed:
    return Claimed(
        delivery_id=delivery_id,
        endpoint=endpoint,
        token="clm_test",
        attempt_number=1,
        schedule_index=0,
        event_public_id=f"evt_{delivery_id}",
        event_type="alert.raised",
        event_version=1,
        occurred_at=datetime(2025, 1, 1, tzinfo=utcnow().tzinfo),
        data={},
    )


async def settle(condition: Callable[[], bool]) -> None:
    """Let the event loop run until `condition` holds; a bounded number of passes, no
    clock: what is tested is that nothing else (a claim, a timer) has to happen first."""
    for _ in range(50):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("not reached without waiting for anything else")


@pytest.fixture
def slots(
    db: Database, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> tuple[DeliveryLoop, EndpointState, GatedSends]:
    """A loop whose endpoint has 2 slots and 5 deliveries claimed ahead; sends are gated."""
    loop = delivery_loop(db, settings, webhook_endpoint_concurrency=2)
    endpoint = EndpointState(
        id=1, public_id="whk_1", url="http://127.0.0.1:9/hooks/a", ordered=False, rate_limit=None
    )
    loop._endpoints[endpoint.id] = endpoint
    endpoint.ready.extend(claimed_ahead(endpoint, n) for n in range(5))
    sends = GatedSends()
    monkeypatch.setattr(loop, "send", sends)

    async def no_claim_expected() -> list[Claimed]:
        raise AssertionError("a slot waited for a claim")

    monkeypatch.setattr(loop, "claim", no_claim_expected)
    return loop, endpoint, sends


async def test_a_finished_send_is_followed_at_once_by_the_next_claimed_ahead(
    slots: tuple[DeliveryLoop, EndpointState, GatedSends],
) -> None:
    loop, endpoint, sends = slots
    async with loop._closing_transports():
        loop._start_all_ready()
        await settle(lambda: sends.started == [0, 1])
        slot_tasks = set(loop._tasks)

        sends.finish(0)
        # No step, no claim, no new task: the slot that sent 0 goes on with 2.
        await settle(lambda: sends.started == [0, 1, 2])
        assert endpoint.in_flight == 2
        assert loop._tasks == slot_tasks
        assert loop._results.qsize() == 1  # 0's result, for the recorder

        sends.finish(1)
        await settle(lambda: sends.started == [0, 1, 2, 3])
        sends.finish(2)
        await settle(lambda: sends.started == [0, 1, 2, 3, 4])
        assert loop._tasks == slot_tasks
        sends.finish(3)
        sends.finish(4)
        # Nothing left claimed ahead: the slots end.
        await settle(lambda: endpoint.in_flight == 0 and not loop._tasks)
        assert loop._results.qsize() == 5


async def test_nothing_claimed_ahead_is_sent_once_the_endpoint_is_disabled(
    slots: tuple[DeliveryLoop, EndpointState, GatedSends],
) -> None:
    loop, endpoint, sends = slots
    async with loop._closing_transports():
        loop._start_all_ready()
        await settle(lambda: sends.started == [0, 1])
        # The refresh saw the endpoint disabled: the sends under way finish, no other starts.
        endpoint.enabled = False
        sends.finish(0)
        sends.finish(1)
        await settle(lambda: endpoint.in_flight == 0 and not loop._tasks)
        loop._start_all_ready()

    assert sends.started == [0, 1]
    assert endpoint.ready == type(endpoint.ready)()
    assert sorted(item.delivery_id for item in loop._unsent) == [2, 3, 4]  # handed back


async def test_the_recorder_gathers_results_while_sends_are_in_flight_and_no_longer(
    slots: tuple[DeliveryLoop, EndpointState, GatedSends],
) -> None:
    loop, endpoint, sends = slots
    async with loop._closing_transports():
        loop._start_all_ready()
        await settle(lambda: sends.started == [0, 1])
        sends.finish(0)
        await settle(lambda: loop._results.qsize() == 1)
        # Sends in flight: the recorder waits for their results (one transaction for all).
        gathering = asyncio.create_task(loop._gather_results(time.monotonic() + 3600))
        await asyncio.sleep(RECORD_GATHER_SECONDS)
        assert not gathering.done()
        # The last send finishes: nothing more is coming, it stops waiting at once.
        for delivery_id in range(1, 5):
            await settle(functools.partial(operator.contains, sends.started, delivery_id))
            sends.finish(delivery_id)
        await settle(gathering.done)
        assert endpoint.in_flight == 0
        assert loop._results.qsize() == 5


async def test_the_recorder_stops_waiting_when_a_full_batch_is_queued(
    slots: tuple[DeliveryLoop, EndpointState, GatedSends],
) -> None:
    loop, endpoint, _ = slots
    loop._in_flight = 1  # a send that never finishes
    result = AttemptResult(claimed_ahead(endpoint, 0), utcnow(), 0.001, 200, "ok", None)
    gathering = asyncio.create_task(loop._gather_results(time.monotonic() + 3600))
    for _ in range(RECORD_BATCH_TARGET - 2):  # the recorder holds the first of the batch
        loop._queue_result(result)
    await asyncio.sleep(RECORD_GATHER_SECONDS)
    assert not gathering.done()
    loop._queue_result(result)
    await settle(gathering.done)
    assert loop._results.qsize() == RECORD_BATCH_TARGET - 1


async def test_each_slot_sends_through_a_connection_of_its_own(
    slots: tuple[DeliveryLoop, EndpointState, GatedSends],
) -> None:
    loop, endpoint, sends = slots
    async with loop._closing_transports():
        loop._start_all_ready()
        await settle(lambda: sends.started == [0, 1])
        sends.finish(0)
        await settle(lambda: sends.started == [0, 1, 2])
        sends.finish(2)
        await settle(lambda: sends.started == [0, 1, 2, 3])
        # 0, 2 and 3 went one after another through the first slot's connection.
        first, second = sends.transports[0], sends.transports[1]
        assert first is not second
        assert sends.transports[2] is first
        assert sends.transports[3] is first
        sends.finish(1)
        await settle(lambda: sends.started == [0, 1, 2, 3, 4])
        assert sends.transports[4] is second
        sends.finish(3)
        sends.finish(4)
        await settle(lambda: endpoint.in_flight == 0 and not loop._tasks)
        # Kept for the next sends: no more connections than the endpoint has slots.
        assert {id(lane.transport) for lane in endpoint.idle_lanes} == {id(first), id(second)}

        # A new URL: the next send opens a new connection, the old ones are closed.
        endpoint.url = "http://127.0.0.1:9/hooks/b"
        loop._retire_lanes(endpoint)
        endpoint.ready.append(claimed_ahead(endpoint, 5))
        loop._start_all_ready()
        await settle(lambda: 5 in sends.started)
        assert sends.transports[5] not in (first, second)
        sends.finish(5)
        await settle(lambda: not loop._tasks)


async def test_a_delivery_names_its_sender_and_asks_for_an_uncompressed_answer(
    api: ApiClient, db: Database, settings: Settings, receiver: WebhookReceiver
) -> None:
    endpoint = await create_endpoint(api, receiver.url("crm"))
    receiver.set_secrets("crm", endpoint["secret"])
    await emit_alerts(db, 1)

    await delivery_loop(db, settings).run_until_idle()

    [received] = receiver.received("crm")
    assert received.verified
    assert received.headers["user-agent"] == "memberhub-webhooks/1"
    assert received.headers["content-type"] == "application/json"
    assert received.headers["accept-encoding"] == "identity"
    assert received.headers["host"] == httpx.URL(receiver.url("crm")).netloc.decode()
    assert int(received.headers["content-length"]) == len(received.body)


async def test_only_the_start_of_a_long_answer_is_kept_and_the_slot_goes_on(
    api: ApiClient, db: Database, settings: Settings, receiver: WebhookReceiver
) -> None:
    await create_endpoint(api, receiver.url("chatty"))
    receiver.set_handler("chatty", always(Reply(body="é" * 100_000)))
    await emit_alerts(db, 3)

    # One slot: the answers left unread close its connection, and the next send opens one.
    await delivery_loop(db, settings, webhook_endpoint_concurrency=1).run_until_idle()

    async with db.transaction() as session:
        attempts = (await session.scalars(select(WebhookAttempt))).all()
    assert [a.succeeded for a in attempts] == [True, True, True]
    # The first 2 KB of the body (two bytes a character), not the 200 KB sent.
    kept = "é" * (RESPONSE_BODY_LIMIT // 2)
    assert [a.response_body for a in attempts] == [kept] * 3


async def test_deliveries_already_fanned_out_are_sent_while_a_fan_out_is_under_way(
    api: ApiClient,
    db: Database,
    settings: Settings,
    receiver: WebhookReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await create_endpoint(api, receiver.url("crm"))
    first = await emit_alerts(db, 3)
    async with db.transaction() as session:
        await fan_out(session, utcnow())
    later = await emit_alerts(db, 2)
    # The next fan-out does not get past its first look until the test lets it.
    fanning = asyncio.Event()
    go_on = asyncio.Event()
    undispatched = DeliveryLoop._undispatched

    async def held_up(self: DeliveryLoop) -> bool | None:
        fanning.set()
        await go_on.wait()
        return await undispatched(self)

    monkeypatch.setattr(DeliveryLoop, "_undispatched", held_up)

    async with running_loop(db, settings):
        await receiver.wait_for_count("crm", 3, timeout=10)
        assert fanning.is_set()
        assert sorted(receiver.ids("crm")) == sorted(first)
        go_on.set()
        await receiver.wait_for_count("crm", 5, timeout=10)

    assert sorted(receiver.ids("crm")) == sorted(first + later)


async def test_a_backlog_is_fanned_out_in_batches_growing_from_a_small_first_one(
    api: ApiClient, db: Database, settings: Settings
) -> None:
    """The first deliveries can be claimed and sent while the rest of a backlog is written,
    and each look at a backlog takes twice as many events as the last."""
    await create_endpoint(api, "http://127.0.0.1:9/hooks/crm")
    first = FAN_OUT_FIRST_BATCH
    await emit_alerts(db, 4 * first)
    loop = delivery_loop(db, settings)

    fanned = [await loop._fan_out() for _ in range(3)]

    assert fanned == [first, 2 * first, first]
    assert loop._fan_out_backlog is False
    async with db.transaction() as session:
        created = await session.scalar(select(func.count()).select_from(WebhookDelivery))
    assert created == 4 * first
    # Caught up: the next backlog starts small again.
    await emit_alerts(db, 2 * first)
    assert await loop._fan_out() == first
    assert loop._fan_out_backlog is True


async def test_a_claim_reads_an_events_data_again_once_its_kept_body_is_a_second_old(
    api: ApiClient, db: Database, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bodies are kept for the event's other claims, but not for long: a deleted member's
    earlier events are erased, and what is sent later must be the erased data."""
    await create_endpoint(api, "http://127.0.0.1:9/hooks/crm")
    (event_id,) = await emit_alerts(db, 1)
    async with db.transaction() as session:
        await fan_out(session, utcnow())
    loop = delivery_loop(db, settings)

    async def claim_again() -> str:
        for endpoint in loop._endpoints.values():
            endpoint.idle_until = 0.0  # it found less than it wanted: not asked again at once
        (item,) = await loop.claim()
        item.endpoint.ready.append(item)
        await loop._release_ready()  # handed back: due again at once
        return loop.payload(item)

    assert '"message":"event 0"' in await claim_again()
    async with db.transaction() as session:
        await session.execute(
            update(Event).where(Event.public_id == event_id).values(data={"message": "erased"})
        )
    # Within the second: the body read moments ago.
    assert '"message":"event 0"' in await claim_again()
    monkeypatch.setattr("memberhub.webhooks.delivery.BODIES_KEPT_SECONDS", 0.0)
    assert '"data":{"message":"erased"}' in await claim_again()


async def test_a_claim_shares_what_may_be_claimed_ahead_among_the_endpoints(
    api: ApiClient, db: Database, settings: Settings
) -> None:
    for name in ("a", "b", "c", "d"):
        await create_endpoint(api, f"http://127.0.0.1:9/hooks/{name}")
    await emit_alerts(db, 40)
    async with db.transaction() as session:
        await fan_out(session, utcnow())
    # 4 slots an endpoint and 4 in all: 32 may be held, sent or claimed ahead.
    loop = delivery_loop(db, settings, webhook_concurrency=4, webhook_endpoint_concurrency=4)
    async with db.transaction() as session:
        await loop._refresh_endpoints(session)
    for endpoint in loop._endpoints.values():
        endpoint.send_seconds = 0.001  # fast receivers: each would take 32 ahead alone
        assert loop._room(endpoint) == 32

    claimed = await loop.claim()

    by_endpoint = Counter(item.endpoint.id for item in claimed)
    assert sorted(by_endpoint.values()) == [8, 8, 8, 8]


async def test_two_loops_claiming_at_once_over_several_endpoints_never_share_a_delivery(
    api: ApiClient, db: Database, settings: Settings
) -> None:
    # On PostgreSQL one statement claims for all three endpoints (a lateral join, SKIP
    # LOCKED in each endpoint's part); the two claims run side by side.
    for name in ("a", "b", "c"):
        await create_endpoint(api, f"http://127.0.0.1:9/hooks/{name}")
    await emit_alerts(db, 40)
    async with db.transaction() as session:
        await fan_out(session, utcnow())
    loops = [
        delivery_loop(db, settings, webhook_concurrency=4, webhook_endpoint_concurrency=4)
        for _ in range(2)
    ]
    for loop in loops:
        async with db.transaction() as session:
            await loop._refresh_endpoints(session)
        for endpoint in loop._endpoints.values():
            endpoint.send_seconds = 0.001

    first, second = await asyncio.gather(*(loop.claim() for loop in loops))

    assert first
    assert second
    ids = [item.delivery_id for item in first + second]
    assert len(ids) == len(set(ids)), "a delivery was claimed twice"
    for claimed in (first, second):
        assert len({item.endpoint.id for item in claimed}) == 3
    # Each holds the lease of the claim that returned it.
    tokens = {item.delivery_id: item.token for item in first + second}
    async with db.transaction(read_only=True) as session:
        rows = await session.execute(
            select(WebhookDelivery.id, WebhookDelivery.claim_token).where(
                WebhookDelivery.claim_token.is_not(None)
            )
        )
        assert {row.id: row.claim_token for row in rows} == tokens
