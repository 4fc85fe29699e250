"""Events that no endpoint would receive are marked dispatched as the sequencer numbers
them, in the same write; the others wait for fan-out."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from memberhub.events.models import Event
from memberhub.events.sequencer import run_passes
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.settings import Settings
from memberhub.webhooks.delivery import fan_out
from tests.fakes.webhook_receiver import WebhookReceiver
from tests.support import ApiClient
from tests.webhooks.conftest import create_endpoint, delivery_loop


async def _numbered_event_of(db: Database, member: dict[str, Any]) -> Event:
    await run_passes(db)
    async with db.transaction(read_only=True) as session:
        event = await session.scalar(
            select(Event).where(
                Event.type == "member.created", Event.member_public_id == member["id"]
            )
        )
    assert event is not None
    assert event.position is not None
    return event


async def _fanned_out(db: Database) -> int:
    async with db.transaction() as session:
        return await fan_out(session, utcnow())


async def test_an_event_numbered_while_no_endpoint_exists_is_dispatched_at_once(
    api: ApiClient, db: Database
) -> None:
    event = await _numbered_event_of(db, await api.create_member())
    assert event.dispatched_at is not None
    assert await _fanned_out(db) == 0


async def test_an_event_numbered_while_an_endpoint_is_enabled_is_left_to_fan_out(
    api: ApiClient, db: Database, settings: Settings, receiver: WebhookReceiver
) -> None:
    endpoint = await create_endpoint(api, receiver.url("crm"), ["member.*"])
    receiver.set_secrets("crm", endpoint["secret"])
    member = await api.create_member()
    event = await _numbered_event_of(db, member)
    assert event.dispatched_at is None

    await delivery_loop(db, settings).run_until_idle()

    assert [r.payload["data"]["member"]["id"] for r in receiver.received("crm")] == [member["id"]]


async def test_an_event_numbered_while_every_endpoint_is_disabled_is_dispatched_at_once(
    api: ApiClient, db: Database, receiver: WebhookReceiver
) -> None:
    endpoint = await create_endpoint(api, receiver.url("crm"), ["member.*"])
    disabled = await api.patch(f"/api/v1/webhook-endpoints/{endpoint['id']}", {"enabled": False})
    assert disabled.status_code == 200, disabled.text
    event = await _numbered_event_of(db, await api.create_member())
    assert event.dispatched_at is not None
    assert await _fanned_out(db) == 0
