from __future__ import annotations

import json

from memberhub.kit.db import Database
from memberhub.settings import Settings
from tests.fakes.webhook_receiver import WebhookReceiver
from tests.support import ApiClient
from tests.webhooks.conftest import create_endpoint, delivery_loop


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
