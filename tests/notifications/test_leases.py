"""A worker that is alive but slow: its lease runs out mid-batch, another worker takes
over what it had not started, and nothing goes out twice but the send in flight."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, ClassVar

from memberhub.integrations.providers.base import (
    Capability,
    Connection,
    DeliveryReport,
    OutgoingMessage,
    Provider,
    SendResult,
)
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.notifications.planning import LinkSettings, plan_notifications
from memberhub.notifications.sending import NotificationSender
from memberhub.settings import Settings
from tests.notifications.conftest import consenting_member, hub_of, registered
from tests.support import ApiClient


class SlowEmail(Provider):
    """An email channel whose first send outlasts the lease: while it is in flight, a
    second worker's tick runs (`during_first_send`)."""

    name = "test_slow_email"
    title = "Slow email"
    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.MESSAGES})
    message_channels: ClassVar[frozenset[str]] = frozenset({"email"})

    def __init__(self) -> None:
        self.sent: list[OutgoingMessage] = []
        self.during_first_send: Callable[[], Awaitable[int]] | None = None

    async def send_message(self, connection: Connection, message: OutgoingMessage) -> SendResult:
        self.sent.append(message)
        if len(self.sent) == 1 and self.during_first_send is not None:
            hook, self.during_first_send = self.during_first_send, None
            await hook()
        return SendResult(provider_message_id=f"id-{len(self.sent)}")

    def delivery_reports(self, event_type: str, body: bytes) -> list[DeliveryReport]:
        return []


async def test_a_live_worker_leaves_alone_what_another_took_over_after_its_lease(
    api: ApiClient, db: Database, app: Any, settings: Settings
) -> None:
    async with registered(api, SlowEmail(), "Slow mail") as provider:
        for number in range(3):
            await consenting_member(api, email=f"m{number}@example.com")
        now = utcnow()
        links = LinkSettings(public_url=settings.public_url, secret=settings.resolved_secret_key)
        assert await plan_notifications(db, now, links) == 3
        # Worker A claims all three and sends a round (of one) at a time; its first send
        # outlasts the lease, and worker B ticks meanwhile.
        first = NotificationSender(db, hub_of(app), lease_seconds=60, concurrency=1)
        second = NotificationSender(db, hub_of(app), lease_seconds=60, concurrency=1)
        provider.during_first_send = lambda: second.send_due(now + timedelta(seconds=61))
        await first.send_due(now)
        recipients = sorted(m.to for m in provider.sent)
        # m0 was in flight when its lease ran out: sent again by B, as a crash would have it.
        # m1 and m2, not yet started by A, went out once: from B.
        assert recipients == [
            "m0@example.com",
            "m0@example.com",
            "m1@example.com",
            "m2@example.com",
        ], recipients
        listed = (await api.get("/api/v1/notifications")).json()["data"]
        assert sorted(n["status"] for n in listed) == ["sent"] * 3, listed
