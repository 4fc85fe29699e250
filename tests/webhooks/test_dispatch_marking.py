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


async def test_an_event_goes_where_the_endpoints_stood_when_it_was_committed(
    api: ApiClient, db: Database, settings: Settings, receiver: WebhookReceiver
) -> None:
    """However far behind the worker is: an endpoint disabled when an event is committed
    never gets it, one enabled then always does (failed, to recover, if it is disabled
    before the worker gets there)."""
    hooks = "/api/v1/webhook-endpoints"
    first = await create_endpoint(api, receiver.url("first"), ["member.created"])
    second = await create_endpoint(api, receiver.url("second"), ["member.created"])
    receiver.set_secrets("first", first["secret"])
    receiver.set_secrets("second", second["secret"])
    off = {"enabled": False, "disabled_reason": "maintenance"}
    assert (await api.patch(f"{hooks}/{first['id']}", off)).status_code == 200

    # No worker runs meanwhile: nothing is numbered or fanned out but by the changes.
    while_first_off = await api.create_member()
    assert (await api.patch(f"{hooks}/{first['id']}", {"enabled": True})).status_code == 200
    while_both_on = await api.create_member()
    assert (await api.patch(f"{hooks}/{second['id']}", off)).status_code == 200
    after = await api.create_member()
    await delivery_loop(db, settings).run_until_idle()

    def members_received(name: str) -> list[str]:
        return [r.payload["data"]["member"]["id"] for r in receiver.received(name)]

    # (Sent concurrently: in any order.)
    assert sorted(members_received("first")) == sorted([while_both_on["id"], after["id"]])
    assert members_received("second") == []
    failed = (await api.get(f"{hooks}/{second['id']}/deliveries", {"status": "failed"})).json()
    assert len(failed["data"]) == 2
    assert all("disabled" in d["last_error"] for d in failed["data"])

    # Enabled again, it gets back what was committed while it was on, and nothing else.
    assert (await api.patch(f"{hooks}/{second['id']}", {"enabled": True})).status_code == 200
    recovered = await api.post(f"{hooks}/{second['id']}/recover", {"since": "2020-01-01T00:00:00Z"})
    assert recovered.status_code == 200, recovered.text
    assert recovered.json()["requeued"] == 2
    await delivery_loop(db, settings).run_until_idle()
    assert sorted(members_received("second")) == sorted(
        [while_first_off["id"], while_both_on["id"]]
    )
