"""Edge cases: awkward receiver answers, retries racing claims, disabling mid-send."""

from __future__ import annotations

import asyncio

from sqlalchemy import select

from memberhub.kit.clock import utcnow
from memberhub.kit.crypto import SecretBox
from memberhub.kit.db import Database
from memberhub.ops.metrics import Metrics
from memberhub.settings import Settings
from memberhub.webhooks.delivery import (
    AttemptResult,
    Claimed,
    DeliveryConfig,
    DeliveryLoop,
    fan_out,
    record,
)
from memberhub.webhooks.models import WebhookAttempt
from tests.fakes.webhook_receiver import Reply, WebhookReceiver, always, fail_times
from tests.support import ApiClient
from tests.webhooks.conftest import create_endpoint, delivery_loop, emit_alerts


async def test_a_response_body_with_nul_bytes_is_stored_readably(
    api: ApiClient, db: Database, settings: Settings, receiver: WebhookReceiver
) -> None:
    await create_endpoint(api, receiver.url("binary"))
    receiver.set_handler("binary", always(Reply(status=500, body="bad\x00gateway")))
    await emit_alerts(db, 1)

    await delivery_loop(db, settings, webhook_retry_schedule="").run_until_idle()

    async with db.transaction() as session:
        [attempt] = (await session.scalars(select(WebhookAttempt))).all()
    assert attempt.status_code == 500
    assert attempt.response_body == "bad\ufffdgateway"


async def test_an_endpoint_with_a_long_url_can_be_disabled(
    api: ApiClient, db: Database, settings: Settings, receiver: WebhookReceiver
) -> None:
    url = receiver.url("gone") + "?" + "x" * 1900
    endpoint = await create_endpoint(api, url)
    receiver.set_handler("gone", always(Reply(status=410)))
    await emit_alerts(db, 1)

    await delivery_loop(db, settings).run_until_idle()

    body = (await api.get(f"/api/v1/webhook-endpoints/{endpoint['id']}")).json()
    assert body["enabled"] is False
    alerts = (await api.get("/api/v1/alerts", {"type": "WEBHOOK_ENDPOINT_DISABLED"})).json()
    [alert] = alerts["data"]
    assert endpoint["id"] in alert["message"]


async def test_a_host_name_with_an_empty_label_is_refused_clearly(api: ApiClient) -> None:
    for url in ("https://a..com/", "https://" + "x" * 64 + ".com/"):
        response = await api.post("/api/v1/webhook-endpoints", {"url": url, "event_types": ["*"]})
        assert response.status_code == 422, (url, response.text)
        assert response.json()["error"]["code"] == "WEBHOOK_URL_REFUSED"


async def test_a_retry_never_sends_two_deliveries_of_an_ordered_endpoint_at_once(
    api: ApiClient, db: Database, settings: Settings
) -> None:
    endpoint = await create_endpoint(api, "http://127.0.0.1:9/ordered", ordered=True)
    first_id, second_id = await emit_alerts(db, 2)
    async with db.transaction() as session:
        assert await fan_out(session, utcnow()) == 2
    worker_a = delivery_loop(db, settings, webhook_poll_seconds=0.01)
    [first] = await worker_a.claim()
    assert first.event_public_id == first_id
    await record(db, [succeeded(first)], worker_a.config, worker_id="a")
    await asyncio.sleep(0.02)  # past the poll interval an idle endpoint waits
    [second] = await worker_a.claim()
    assert second.event_public_id == second_id

    # While the second is being sent, someone asks for the first once more.
    [delivery] = (await api.get(f"/api/v1/events/{first_id}/deliveries")).json()["data"]
    assert (await api.post(f"/api/v1/deliveries/{delivery['id']}/retry")).status_code == 202

    worker_b = delivery_loop(db, settings, webhook_poll_seconds=0.01)
    assert await worker_b.claim() == []
    # Once the second is recorded, the first goes again.
    await record(db, [succeeded(second)], worker_a.config, worker_id="a")
    await asyncio.sleep(0.02)
    [again] = await worker_b.claim()
    assert again.event_public_id == first_id
    assert endpoint["id"] == again.endpoint.public_id


def succeeded(claimed: Claimed) -> AttemptResult:
    return AttemptResult(claimed, utcnow(), 0.01, 200, "ok", None)


async def test_a_delivery_being_sent_cannot_be_retried(
    api: ApiClient, db: Database, settings: Settings
) -> None:
    await create_endpoint(api, "http://127.0.0.1:9/busy")
    [event_id] = await emit_alerts(db, 1)
    async with db.transaction() as session:
        await fan_out(session, utcnow())
    assert len(await delivery_loop(db, settings).claim()) == 1
    [delivery] = (await api.get(f"/api/v1/events/{event_id}/deliveries")).json()["data"]

    response = await api.post(f"/api/v1/deliveries/{delivery['id']}/retry")

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "DELIVERY_IN_PROGRESS"


async def test_a_failure_in_flight_while_the_endpoint_was_disabled_ends_failed(
    api: ApiClient, db: Database, settings: Settings
) -> None:
    endpoint = await create_endpoint(api, "http://127.0.0.1:9/paused")
    [event_id] = await emit_alerts(db, 1)
    async with db.transaction() as session:
        await fan_out(session, utcnow())
    loop = delivery_loop(db, settings)
    [claimed] = await loop.claim()
    path = f"/api/v1/webhook-endpoints/{endpoint['id']}"
    assert (await api.patch(path, {"enabled": False})).status_code == 200

    result = AttemptResult(claimed, utcnow(), 0.01, 503, "busy", "HTTP 503")
    assert await record(db, [result], loop.config, worker_id="test") == ["failed"]

    [delivery] = (await api.get(f"/api/v1/events/{event_id}/deliveries")).json()["data"]
    assert delivery["status"] == "failed"
    assert delivery["next_attempt_at"] is None
    assert "disabled" in delivery["last_error"]


async def test_a_success_in_flight_while_the_endpoint_was_disabled_ends_succeeded(
    api: ApiClient, db: Database, settings: Settings
) -> None:
    endpoint = await create_endpoint(api, "http://127.0.0.1:9/paused")
    [event_id] = await emit_alerts(db, 1)
    async with db.transaction() as session:
        await fan_out(session, utcnow())
    loop = delivery_loop(db, settings)
    [claimed] = await loop.claim()  # being sent...
    path = f"/api/v1/webhook-endpoints/{endpoint['id']}"
    assert (await api.patch(path, {"enabled": False})).status_code == 200
    # ...and the receiver accepts it.
    result = AttemptResult(claimed, utcnow(), 0.01, 200, "ok", None)
    assert await record(db, [result], loop.config, worker_id="test") == ["succeeded"]
    [delivery] = (await api.get(f"/api/v1/events/{event_id}/deliveries")).json()["data"]
    assert delivery["status"] == "succeeded", delivery
    assert [a["succeeded"] for a in delivery["attempts"]] == [True]
    # The receiver has it: nothing for `recover` to send again.
    assert (await api.patch(path, {"enabled": True})).status_code == 200
    recovered = await api.post(f"{path}/recover", {"since": "2000-01-01T00:00:00Z"})
    assert recovered.json() == {"requeued": 0}


async def test_events_waiting_when_a_410_disables_the_endpoint_stay_recoverable(
    api: ApiClient, db: Database, settings: Settings, receiver: WebhookReceiver
) -> None:
    endpoint = await create_endpoint(api, receiver.url("gone"), ["alert.raised"])
    path = f"/api/v1/webhook-endpoints/{endpoint['id']}"
    receiver.set_handler("gone", always(Reply(status=410, body="gone")))
    # A backlog committed while the endpoint was enabled, larger than one fan-out batch.
    await emit_alerts(db, 100)
    await delivery_loop(db, settings, webhook_endpoint_concurrency=1).run_until_idle(within=30)
    assert (await api.get(path)).json()["enabled"] is False
    page = (await api.get(f"{path}/deliveries", params={"limit": 500})).json()["data"]
    assert len(page) == 100
    assert {d["status"] for d in page} == {"failed"}
    receiver.set_handler("gone", always(Reply(status=200, body="ok")))
    assert (await api.patch(path, {"enabled": True})).status_code == 200
    recovered = await api.post(f"{path}/recover", {"since": "2000-01-01T00:00:00Z"})
    assert recovered.json() == {"requeued": 100}


async def test_the_worker_counts_attempts_deliveries_and_latency(
    api: ApiClient, db: Database, settings: Settings, receiver: WebhookReceiver
) -> None:
    endpoint = await create_endpoint(api, receiver.url("counted"))
    receiver.set_handler("counted", fail_times(1))
    await emit_alerts(db, 3)
    metrics = Metrics()
    loop = DeliveryLoop(
        db,
        DeliveryConfig.from_settings(settings.model_copy(update={"webhook_retry_schedule": "0s"})),
        SecretBox(settings.resolved_secret_key),
        worker_id="test",
        metrics=metrics,
    )

    await loop.run_until_idle()

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    ours = endpoint["id"]
    assert value("memberhub_webhook_attempts_total", endpoint=ours, outcome="failure") == 3
    assert value("memberhub_webhook_attempts_total", endpoint=ours, outcome="success") == 3
    assert value("memberhub_webhook_attempts_overall_total", outcome="success") == 3
    assert value("memberhub_webhook_deliveries_total", endpoint=ours, outcome="succeeded") == 3
    assert value("memberhub_webhook_deliveries_overall_total", outcome="succeeded") == 3
    assert value("memberhub_webhook_attempt_duration_seconds_count", endpoint=ours) == 6
    assert value("memberhub_webhook_attempt_duration_overall_seconds_count") == 6
