"""Event sink tests: the Segment and GA4 fakes, integrations pointed at them, and a hub
whose circuit breakers follow a clock the tests move (no sleeping through an outage)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from typing import Any

import pytest

from memberhub.events.catalog import PointsEarned
from memberhub.events.sequencer import run_passes
from memberhub.events.service import emit_many
from memberhub.integrations.hub import IntegrationHub
from memberhub.kit.clock import utcnow
from memberhub.kit.crypto import SecretBox
from memberhub.kit.db import Database
from memberhub.settings import Settings
from memberhub.sinks.forwarding import run_event_sinks
from memberhub.webhooks.ssrf import UrlPolicy
from tests.fakes.ga4 import FakeGa4, running_fake_ga4
from tests.fakes.segment import FakeSegment, running_fake_segment
from tests.support import ApiClient

WRITE_KEY = "segment-write-key-0001"
PUBLIC_API_TOKEN = "sgp_public_api_token_01"
MEASUREMENT_ID = "G-TEST1234"
API_SECRET = "ga4-api-secret-0001"
ANALYTICS = {"analytics": True}


class Clock:
    """Simulated time: `now` for the sinks' schedule, `monotonic` for the breakers."""

    def __init__(self) -> None:
        self.now = utcnow()
        self.seconds = 1_000.0

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
        self.seconds += seconds

    def monotonic(self) -> float:
        return self.seconds


async def no_wait(_seconds: float) -> None:
    """Gateway retry backoffs pass at once: the sink's own schedule is what is tested."""


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def hub(settings: Settings, db: Database, clock: Clock) -> AsyncIterator[IntegrationHub]:
    integrations = IntegrationHub(
        db,
        SecretBox(settings.resolved_secret_key),
        UrlPolicy.from_settings(settings),
        retry_sleep=no_wait,
        clock=clock.monotonic,
    )
    yield integrations
    await integrations.aclose()


@pytest.fixture
async def segment() -> AsyncIterator[FakeSegment]:
    async with running_fake_segment(WRITE_KEY, PUBLIC_API_TOKEN) as fake:
        yield fake


@pytest.fixture
async def ga4() -> AsyncIterator[FakeGa4]:
    async with running_fake_ga4(MEASUREMENT_ID, API_SECRET) as fake:
        yield fake


async def create_integration(api: ApiClient, body: dict[str, Any]) -> dict[str, Any]:
    response = await api.post("/api/v1/integrations", body)
    assert response.status_code == 201, response.text
    return dict(response.json())


async def segment_integration(
    api: ApiClient, fake: FakeSegment, *, deletion: bool = True, name: str = "Segment"
) -> dict[str, Any]:
    credentials: dict[str, Any] = {"write_key": WRITE_KEY}
    if deletion:
        credentials["public_api_token"] = PUBLIC_API_TOKEN
    return await create_integration(
        api,
        {
            "provider": "segment",
            "name": name,
            "config": {"base_url": fake.url, "public_api_url": fake.url},
            "credentials": credentials,
        },
    )


async def ga4_integration(api: ApiClient, fake: FakeGa4) -> dict[str, Any]:
    return await create_integration(
        api,
        {
            "provider": "ga4",
            "name": "GA4",
            "config": {"base_url": fake.url, "measurement_id": MEASUREMENT_ID},
            "credentials": {"api_secret": API_SECRET},
        },
    )


async def create_sink(
    api: ApiClient, integration_id: str, event_types: list[str] | None = None, **fields: Any
) -> dict[str, Any]:
    body = {
        "integration_id": integration_id,
        "name": fields.pop("name", "Analytics"),
        "event_types": event_types or ["member.*", "points.*"],
        **fields,
    }
    response = await api.post("/api/v1/event-sinks", body)
    assert response.status_code == 201, response.text
    return dict(response.json())


async def forward(db: Database, hub: IntegrationHub, now: datetime | None = None) -> int:
    """One worker pass of the sinks, after the feed has numbered what committed."""
    await run_passes(db, wait=False)
    return await run_event_sinks(db, hub, now or utcnow())


async def award(api: ApiClient, member_id: str, points: int, reason: str = "test") -> None:
    response = await api.post(
        "/api/v1/points/award", {"member_id": member_id, "points": points, "reason": reason}
    )
    assert response.status_code == 201, response.text


async def emit_earnings(
    db: Database,
    member_id: str,
    count: int,
    now: datetime,
    *,
    reason: Callable[[int], str | None] = lambda _i: None,
    points: Callable[[int], int] = lambda _i: 1,
) -> None:
    """`count` committed `points.earned` events for the member, in one transaction, the
    i-th with `balance_after` i (so their order can be checked at the vendor)."""
    events = [
        (
            PointsEarned(
                member_id=member_id,
                transaction_id=f"txn_{i}",
                transaction_type="award",
                points=points(i),
                pending_points=0,
                balance_after=i,
                pending_after=0,
                reason=reason(i),
                reference_id=None,
                occurred_at=now,
            ),
            None,
            member_id,
        )
        for i in range(count)
    ]
    async with db.transaction() as session:
        await emit_many(session, events, occurred_at=now)


async def event_ids(api: ApiClient, member_id: str, event_type: str) -> list[str]:
    response = await api.get(
        "/api/v1/events", params={"member_id": member_id, "type": event_type, "limit": 500}
    )
    assert response.status_code == 200, response.text
    return [event["id"] for event in response.json()["data"]]
