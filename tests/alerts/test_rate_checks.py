"""The daily `alerts.check_rates` job: HIGH_EXPIRATION_RATE and LOW_REDEMPTION_RATE over the
30 days before its `now`, once per calendar month.

Rates: expired (or redeemed, net of refunds) ÷ (liability at the window start + points
credited in the window) x 100.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select

from memberhub.alerts.jobs import check_rates
from memberhub.kit.actor import Actor
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.members.models import Member
from memberhub.points import service as points_service
from memberhub.points.jobs import expire_points
from memberhub.points.repository import PointsRepository
from memberhub.worker.runner import JOBS
from tests.alerts.conftest import (
    RunJob,
    alert_events,
    alerts,
    award,
    earn,
    first_of_next_month,
    mid_month_after,
    redeem,
    reverse,
    set_program,
)
from tests.support import ApiClient


async def _quarter_expires(api: ApiClient, db: Database, expires_at: datetime) -> None:
    """400 points credited; 100 of them expire at `expires_at`, 40 are redeemed."""
    expiring = await api.create_member()
    keeping = await api.create_member()
    await award(api, expiring["id"], 100, expires_at=expires_at)
    await award(api, keeping["id"], 300)
    await redeem(api, keeping["id"], 40)
    assert await expire_points(db, expires_at + timedelta(minutes=1)) == 1


async def test_an_expiration_rate_above_the_threshold_raises_a_system_alert(
    api: ApiClient, db: Database, run_job: RunJob
) -> None:
    expires_at = mid_month_after(utcnow())
    await _quarter_expires(api, db, expires_at)
    now = expires_at + timedelta(hours=1)

    assert await run_job(check_rates, now) == 1

    (alert,) = await alerts(api)
    assert alert["type"] == "HIGH_EXPIRATION_RATE"
    assert alert["priority"] == "medium"
    assert alert["member_id"] is None
    assert alert["points"] == 100
    assert alert["message"] == (
        "25.00% of the points expired in the last 30 days (threshold 20.0%)."
    )
    assert alert["data"] == {
        "rate_percent": 25.0,
        "threshold_percent": 20.0,
        "window_start": (now - timedelta(days=30)).isoformat(),
        "window_end": now.isoformat(),
        "outstanding_at_start": 0,
        "credited": 400,
        "redeemed": 40,
        "expired": 100,
    }
    (event,) = await alert_events(api)
    assert event["alert_id"] == alert["id"]
    assert event["member_id"] is None


async def test_an_expiration_rate_at_the_threshold_raises_nothing(
    api: ApiClient, db: Database, run_job: RunJob
) -> None:
    expires_at = mid_month_after(utcnow())
    await _quarter_expires(api, db, expires_at)
    now = expires_at + timedelta(hours=1)

    await set_program(api, alert_thresholds={"high_expiration_rate_percent": 25})
    assert await run_job(check_rates, now) == 0
    await set_program(api, alert_thresholds={"high_expiration_rate_percent": 24.9})
    assert await run_job(check_rates, now) == 1

    assert [a["type"] for a in await alerts(api)] == ["HIGH_EXPIRATION_RATE"]


async def test_a_redemption_rate_below_the_threshold_raises_a_system_alert(
    api: ApiClient, run_job: RunJob
) -> None:
    member = await api.create_member()
    await award(api, member["id"], 1000)
    await redeem(api, member["id"], 40)
    now = utcnow() + timedelta(minutes=1)

    assert await run_job(check_rates, now) == 1

    (alert,) = await alerts(api)
    assert alert["type"] == "LOW_REDEMPTION_RATE"
    assert alert["priority"] == "low"
    assert alert["member_id"] is None
    assert alert["points"] == 40
    assert alert["data"]["rate_percent"] == 4.0
    assert alert["data"]["threshold_percent"] == 5.0
    assert (alert["data"]["credited"], alert["data"]["redeemed"]) == (1000, 40)


async def test_a_redemption_rate_at_the_threshold_raises_nothing(
    api: ApiClient, run_job: RunJob
) -> None:
    member = await api.create_member()
    await award(api, member["id"], 1000)
    await redeem(api, member["id"], 50)

    assert await run_job(check_rates, utcnow() + timedelta(minutes=1)) == 0
    assert await alerts(api) == []


async def test_the_redemption_rate_counts_redemptions_net_of_refunds(
    api: ApiClient, db: Database, run_job: RunJob
) -> None:
    member = await api.create_member()
    await award(api, member["id"], 1000)
    refunded = await redeem(api, member["id"], 100)
    await redeem(api, member["id"], 30)
    async with db.transaction() as session:
        owner = await session.scalar(select(Member).where(Member.public_id == member["id"]))
        redemption = await PointsRepository(session).transaction_by_public_id(
            refunded["transaction"]["id"]
        )
        assert owner is not None
        assert redemption is not None
        await points_service.refund_redemption(
            session, Actor.system("test"), owner, redemption, reason="Claim cancelled"
        )

    assert await run_job(check_rates, utcnow() + timedelta(minutes=1)) == 1

    (alert,) = await alerts(api)
    assert alert["type"] == "LOW_REDEMPTION_RATE"
    assert (alert["data"]["redeemed"], alert["data"]["rate_percent"]) == (30, 3.0)


async def test_without_points_to_redeem_no_redemption_alert_is_raised(
    api: ApiClient, run_job: RunJob
) -> None:
    assert await run_job(check_rates, utcnow()) == 0
    member = await api.create_member()
    earned = await earn(api, member["id"], 20_000)
    await reverse(api, member["id"], earned["transaction"]["id"])  # a refunded purchase

    assert await run_job(check_rates, utcnow() + timedelta(minutes=1)) == 0
    assert await alerts(api) == []


async def test_the_daily_check_raises_each_rate_alert_once_per_calendar_month(
    api: ApiClient, db: Database, run_job: RunJob
) -> None:
    expires_at = mid_month_after(utcnow())
    await _quarter_expires(api, db, expires_at)
    same_month = [expires_at + timedelta(hours=1), expires_at + timedelta(days=2)]
    next_month = first_of_next_month(expires_at) + timedelta(hours=1)
    assert next_month - timedelta(days=30) < expires_at  # the expiry is still in its window

    assert [await run_job(check_rates, now) for now in same_month] == [1, 0]
    assert await run_job(check_rates, next_month) >= 1

    raised = await alerts(api, type="HIGH_EXPIRATION_RATE")
    assert [datetime.fromisoformat(a["raised_at"]) for a in raised] == [
        next_month,
        same_month[0],
    ]


def test_the_rate_check_is_a_daily_scheduled_job() -> None:
    (job,) = [job for job in JOBS if job.name == "alerts.check_rates"]
    assert job.daily
    assert job.run is check_rates
