"""An integration's uptime: the share of the last 30 days without an open incident."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update

from memberhub.integrations.models import Integration, IntegrationIncident
from memberhub.integrations.service import uptime_percent
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from tests.support import ApiClient

START = datetime(2026, 1, 1, tzinfo=UTC)
END = START + timedelta(days=10)
DAY = timedelta(days=1)


@pytest.mark.parametrize(
    ("incidents", "expected"),
    [
        ([], 100.0),
        ([(START + DAY, START + 2 * DAY)], 90.0),
        # Still open: down until the end.
        ([(END - DAY, None)], 90.0),
        # Opened before the span: only its part inside counts.
        ([(START - 5 * DAY, START + DAY)], 90.0),
        # Overlapping incidents count once.
        ([(START + DAY, START + 3 * DAY), (START + 2 * DAY, START + 4 * DAY)], 70.0),
        ([(START + DAY, START + 2 * DAY), (START + 5 * DAY, START + 6 * DAY)], 80.0),
        ([(START - DAY, None)], 0.0),
    ],
)
def test_uptime_is_the_share_of_the_span_outside_incidents(
    incidents: list[tuple[datetime, datetime | None]], expected: float
) -> None:
    assert uptime_percent(incidents, start=START, end=END) == expected


def test_an_empty_span_has_no_uptime() -> None:
    assert uptime_percent([], start=END, end=END) is None


async def test_health_reports_the_uptime_of_the_last_30_days(api: ApiClient, db: Database) -> None:
    created = await api.post(
        "/api/v1/integrations",
        {
            "provider": "webhook",
            "name": "Bookings",
            "config": {"scheme": "standard"},
            "credentials": {"signing_secret": "whsec_MDEyMzQ1Njc4OWFiY2RlZldYWVo="},
        },
    )
    assert created.status_code == 201, created.text
    now = utcnow()
    async with db.transaction() as session:
        integration = await session.scalar(
            select(Integration).where(Integration.public_id == created.json()["id"])
        )
        assert integration is not None
        await session.execute(
            update(Integration)
            .where(Integration.id == integration.id)
            .values(created_at=now - timedelta(days=60))
        )
        # 3 days down, 40 to 37 days ago (outside), and 1.5 of the last 30 days.
        for opened, closed in [
            (now - timedelta(days=40), now - timedelta(days=37)),
            (now - timedelta(days=31), now - timedelta(days=29)),
            (now - timedelta(days=10), now - timedelta(days=9, hours=12)),
        ]:
            session.add(
                IntegrationIncident(
                    integration_id=integration.id, opened_at=opened, closed_at=closed, reason="x"
                )
            )
    health = await api.get(f"/api/v1/integrations/{created.json()['id']}/health")
    assert health.status_code == 200, health.text
    assert health.json()["uptime_percent"] == pytest.approx(100 * (1 - 1.5 / 30), abs=0.01)
