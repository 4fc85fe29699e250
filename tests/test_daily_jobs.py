"""Daily jobs run once a day at DAILY_JOBS_AT in the program's time zone, whichever worker
gets there first, not a day after a process started."""

from __future__ import annotations

from datetime import UTC, datetime, time
from zoneinfo import ZoneInfo

from memberhub.kit.db import Database
from memberhub.settings import Settings
from memberhub.worker.daily import claim_daily_run, last_scheduled
from memberhub.worker.runner import Worker
from tests.support import ApiClient

DAILY = {"tiers.review", "alerts.check_rates"}


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_the_last_scheduled_moment_follows_the_zone_and_its_daylight_saving() -> None:
    paris = ZoneInfo("Europe/Paris")
    # 03:00 in Paris is 01:00 UTC in summer and 02:00 UTC in winter.
    assert last_scheduled(at("2026-07-10T01:30:00"), time(3), paris) == at("2026-07-10T01:00:00")
    assert last_scheduled(at("2026-07-10T00:30:00"), time(3), paris) == at("2026-07-09T01:00:00")
    assert last_scheduled(at("2026-12-10T01:30:00"), time(3), paris) == at("2026-12-09T02:00:00")


def test_a_time_the_clock_skips_or_reads_twice_is_scheduled_once() -> None:
    new_york = ZoneInfo("America/New_York")
    # 8 March 2026: 02:00 EST jumps to 03:00 EDT (07:00 UTC); 02:30 never shows, and is
    # taken as 03:30 EDT. At 03:10 EDT the last run due is still the day before's.
    skipped = time(2, 30)
    assert last_scheduled(at("2026-03-08T07:10:00"), skipped, new_york) == at("2026-03-07T07:30:00")
    assert last_scheduled(at("2026-03-08T07:40:00"), skipped, new_york) == at("2026-03-08T07:30:00")
    # 1 November 2026: 01:30 shows twice (EDT, then EST); the first is the day's.
    twice = time(1, 30)
    first = at("2026-11-01T05:30:00")
    assert last_scheduled(at("2026-11-01T05:45:00"), twice, new_york) == first
    assert last_scheduled(at("2026-11-01T06:45:00"), twice, new_york) == first
    for moment in ("2026-03-08T07:10:00", "2026-03-08T07:40:00", "2026-11-01T06:45:00"):
        assert last_scheduled(at(moment), skipped, new_york) <= at(moment)


async def test_a_daily_job_runs_once_a_day_at_its_time_in_the_programs_zone(
    api: ApiClient, db: Database, settings: Settings
) -> None:
    patched = await api.patch("/api/v1/program", {"timezone": "Europe/Paris"})
    assert patched.status_code == 200, patched.text
    worker = Worker(db, settings=settings.model_copy(update={"daily_jobs_at": "03:00"}))

    async def daily_run_at(moment: str) -> set[str]:
        worker._last_run.clear()  # every job looks again, as after its interval
        return DAILY & set(await worker.tick(now=at(moment)))

    # Never run yet: the missed 03:00 of the day is caught up once, at start.
    assert await daily_run_at("2026-12-10T00:30:00") == DAILY  # 01:30 Paris
    assert await daily_run_at("2026-12-10T01:30:00") == set()  # 02:30 Paris
    assert await daily_run_at("2026-12-10T02:00:00") == DAILY  # 03:00 Paris
    assert await daily_run_at("2026-12-10T14:00:00") == set()
    assert await daily_run_at("2026-12-11T01:59:00") == set()
    assert await daily_run_at("2026-12-11T02:01:00") == DAILY


async def test_two_workers_claim_a_daily_run_once(db: Database) -> None:
    moment = at("2026-12-10T05:00:00")
    claims = [await claim_daily_run(db, "tiers.review", moment, time(3)) for _ in range(2)]
    assert claims == [True, False]
