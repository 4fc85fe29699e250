"""One slow endpoint never holds up another; an ordered endpoint gets commit order."""

from __future__ import annotations

from memberhub.kit.db import Database
from memberhub.settings import Settings
from tests.fakes.webhook_receiver import Received, Reply, WebhookReceiver, hang
from tests.support import ApiClient
from tests.webhooks.conftest import create_endpoint, emit_alerts, running_loop


async def test_a_hanging_endpoint_does_not_delay_a_healthy_one(
    api: ApiClient, db: Database, settings: Settings, receiver: WebhookReceiver
) -> None:
    await create_endpoint(api, receiver.url("hanging"))
    await create_endpoint(api, receiver.url("healthy"))
    receiver.set_handler("hanging", hang(30.0))
    sent = await emit_alerts(db, 200)

    async with running_loop(db, settings, webhook_timeout_seconds=10.0):
        await receiver.wait_for_count("healthy", 200, timeout=20)
        first_hanging = receiver.received("hanging")[0].at

    healthy = receiver.received("healthy")
    assert sorted(r.webhook_id for r in healthy) == sorted(sent)
    # All 200 arrived before the first hanging attempt timed out.
    assert healthy[-1].at < first_hanging + 10.0
    # The hanging endpoint holds no more than its own share of the worker's slots.
    assert len(receiver.received("hanging")) == settings.webhook_endpoint_concurrency


async def test_an_ordered_endpoint_receives_events_in_commit_order(
    api: ApiClient, db: Database, settings: Settings, receiver: WebhookReceiver
) -> None:
    endpoint = await create_endpoint(api, receiver.url("ordered"), ordered=True)
    receiver.set_secrets("ordered", endpoint["secret"])
    requests = 0

    def first_attempt_fails(request: Received, seen: int) -> Reply:
        nonlocal requests
        requests += 1
        return Reply(status=500) if requests == 1 else Reply()

    receiver.set_handler("ordered", first_attempt_fails)
    sent = await emit_alerts(db, 100)

    async with running_loop(db, settings, webhook_retry_schedule="0.3s"):
        await receiver.wait_for_count("ordered", 100, timeout=30)

    received = receiver.received("ordered")
    assert received[0].webhook_id == sent[0]
    assert received[0].status == 500
    # Nothing overtook event 1 while it waited for its retry; then 1..100 in order.
    assert [r.webhook_id for r in received[1:]] == sent
    assert all(r.verified for r in received)
