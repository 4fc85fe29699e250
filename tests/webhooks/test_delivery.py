from __future__ import annotations

import json

import pytest

from memberhub.kit.db import Database
from memberhub.settings import Settings
from memberhub.webhooks import delivery
from tests.fakes.webhook_receiver import WebhookReceiver
from tests.support import ApiClient
from tests.webhooks.conftest import create_endpoint, delivery_loop, emit_alerts


async def test_events_reach_a_verifying_receiver_once(
    api: ApiClient, db: Database, settings: Settings, receiver: WebhookReceiver
) -> None:
    endpoint = await create_endpoint(api, receiver.url("crm"), ["member.*"])
    receiver.set_secrets("crm", endpoint["secret"])
    members = [await api.create_member() for _ in range(3)]

    await delivery_loop(db, settings).run_until_idle()

    received = receiver.received("crm")
    # Not an ordered endpoint: the three may arrive in any order.
    assert sorted(r.payload["data"]["member"]["id"] for r in received) == sorted(
        m["id"] for m in members
    )
    assert all(r.verified for r in received)
    assert len({r.webhook_id for r in received}) == 3
    first = received[0]
    assert set(first.payload) == {"id", "type", "version", "occurred_at", "data"}
    assert first.payload["type"] == "member.created"
    assert first.webhook_id == first.payload["id"]
    assert json.loads(first.body) == first.payload


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


async def test_fan_out_asked_more_often_than_its_pause_still_looks_again(
    api: ApiClient, db: Database, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop asks for fan-out every poll; an empty look waits FAN_OUT_CHECK_SECONDS
    before the next, and asking again meanwhile must not put that moment off."""
    clock = _Clock()
    monkeypatch.setattr(delivery, "time", clock)
    await create_endpoint(api, "http://127.0.0.1:9/hook")
    loop = delivery_loop(db, settings)
    while await loop._fan_out():  # whatever is there already
        pass
    looked = clock.now
    assert await loop._fan_out() == 0  # an empty look, just now
    await emit_alerts(db, 1)
    clock.now = looked + delivery.FAN_OUT_CHECK_SECONDS / 2
    assert await loop._fan_out() == 0  # too soon to look again
    clock.now = looked + delivery.FAN_OUT_CHECK_SECONDS
    assert await loop._fan_out() == 1
