"""Deliveries claimed ahead of the sends in flight are sent as slots free, and handed back
unsent when the loop stops. (A failed send hands back what was claimed ahead for its
endpoint: `test_a_410_disables_the_endpoint_fails_its_queue_and_raises_an_alert`.)"""

from __future__ import annotations

from sqlalchemy import func, select

from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.settings import Settings
from memberhub.webhooks.delivery import AHEAD_MAX_CAPS, DeliveryLoop, EndpointState
from memberhub.webhooks.models import DeliveryStatus, WebhookDelivery
from tests.fakes.webhook_receiver import WebhookReceiver, hang
from tests.support import ApiClient
from tests.webhooks.conftest import create_endpoint, emit_alerts, running_loop


async def _pending_claimed(db: Database) -> tuple[int, int]:
    """(pending deliveries, those of them still claimed by a worker)."""
    async with db.transaction(read_only=True) as session:
        pending = WebhookDelivery.status == DeliveryStatus.PENDING
        total = await session.scalar(select(func.count()).where(pending))
        claimed = await session.scalar(
            select(func.count()).where(pending, WebhookDelivery.claim_token.is_not(None))
        )
    return int(total or 0), int(claimed or 0)


async def test_a_stopped_loop_hands_back_what_it_claimed_ahead(
    api: ApiClient, db: Database, settings: Settings, receiver: WebhookReceiver
) -> None:
    await create_endpoint(api, receiver.url("slow"))
    receiver.set_handler("slow", hang(0.3))
    await emit_alerts(db, 20)

    async with running_loop(db, settings, webhook_endpoint_concurrency=2):
        await receiver.wait_for(lambda: len(receiver.received("slow")) >= 2, timeout=10)

    pending, claimed = await _pending_claimed(db)
    assert pending > 0, "the loop finished everything before it was stopped"
    # Nothing waits for a lease to run out: what was claimed and not sent is due again.
    assert claimed == 0
    async with db.transaction(read_only=True) as session:
        latest = await session.scalar(
            select(func.max(WebhookDelivery.next_attempt_at)).where(
                WebhookDelivery.status == DeliveryStatus.PENDING
            )
        )
    assert latest is not None
    assert latest <= utcnow()


def test_how_far_ahead_follows_the_pace_of_the_endpoint() -> None:
    def endpoint(**state: object) -> EndpointState:
        e = EndpointState(id=1, public_id="whk_1", url="http://x", ordered=False, rate_limit=None)
        for name, value in state.items():
            setattr(e, name, value)
        return e

    cap = 8
    # Nothing known yet: as many again as the cap.
    assert DeliveryLoop._ahead(endpoint(), cap) == cap
    # A receiver answering in 20 ms takes 100 in 0.25 s: held to 7 times the cap.
    fast = endpoint()
    for _ in range(20):
        fast.observe_send(0.02)
    assert DeliveryLoop._ahead(fast, cap) == AHEAD_MAX_CAPS * cap
    # One answering in 100 ms takes 20 in 0.25 s.
    assert DeliveryLoop._ahead(endpoint(send_seconds=0.1), cap) == 20
    # A slow one still gets its cap, so a finished send is followed at once.
    assert DeliveryLoop._ahead(endpoint(send_seconds=2.0), cap) == cap
    # Ordered and failing endpoints: nothing waits.
    assert DeliveryLoop._ahead(endpoint(ordered=True, send_seconds=0.02), cap) == 0
    assert DeliveryLoop._ahead(endpoint(failing=True, send_seconds=0.02), cap) == 0
    # The mean follows the latest sends: a receiver slowing down is given less.
    for _ in range(30):
        fast.observe_send(1.0)
    assert DeliveryLoop._ahead(fast, cap) == cap
